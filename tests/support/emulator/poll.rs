//! The emulator's view of LocalStack: the poll loop, what it lists and describes (load
//! balancers, listeners, target groups, targets), and applying that view to the running listeners.

use super::*;

pub(super) async fn poll_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut last_error = String::new();
    loop {
        let t0 = Instant::now();
        let r = poll_once(&shared).await;
        if std::env::var_os("NLB_EMULATOR_DEBUG").is_some() {
            log(&format!("poll took {:?}: {r:?}", t0.elapsed()));
        }
        match r {
            Ok(()) => last_error.clear(),
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    log(&format!("polling LocalStack failed: {e}"));
                    last_error = e;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
        }
    }
}

pub(super) fn log(msg: &str) {
    eprintln!("[nlb-emulator {}] {msg}", clock());
}

pub(super) fn clock() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// The cloud's view of one load balancer.
pub(super) struct ObservedLb {
    arn: String,
    dns_name: String,
    /// (port, protocol, target group arn)
    listeners: Vec<(i32, String, String)>,
}

/// The cloud's view of one target group.
pub(super) struct ObservedTg {
    settings: TgSettings,
    target_type: String,
    /// (id, port)
    targets: Vec<(String, i32)>,
}

/// A load balancer's (ARN, DNS name).
pub(super) type LbName = (String, String);

/// Every network load balancer we serve (per the cluster filter).
pub(super) async fn list_load_balancers(shared: &Arc<Shared>) -> anyhow::Result<Vec<LbName>> {
    let elb = &shared.elb;
    let mut all = Vec::new();
    let mut marker = None;
    loop {
        let page = elb
            .describe_load_balancers()
            .page_size(400) // the most ELBv2 allows: one call for a whole rig
            .set_marker(marker)
            .send()
            .await?;
        all.extend(page.load_balancers().iter().cloned());
        marker = page.next_marker().map(str::to_string);
        if marker.is_none() {
            break;
        }
    }
    let mut candidates = Vec::new();
    for lb in &all {
        let network = lb
            .r#type()
            .is_none_or(|t| *t == elbv2::types::LoadBalancerTypeEnum::Network);
        if let (true, Some(arn), Some(dns)) = (network, lb.load_balancer_arn(), lb.dns_name()) {
            candidates.push((arn.to_string(), dns.to_string()));
        }
    }
    // Ownership by tag, read once per load balancer.
    if let Some(cluster) = &shared.config.cluster {
        let unknown: Vec<String> = {
            let st = shared.state.lock().unwrap();
            candidates
                .iter()
                .filter(|(a, _)| !st.ownership.contains_key(a))
                .map(|(a, _)| a.clone())
                .collect()
        };
        for chunk in unknown.chunks(20) {
            let tags = elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await?;
            let mut st = shared.state.lock().unwrap();
            for d in tags.tag_descriptions() {
                let owned = d.tags().iter().any(|t| {
                    t.key() == Some("cloudlb.io/cluster") && t.value() == Some(cluster.as_str())
                });
                if let Some(a) = d.resource_arn() {
                    st.ownership.insert(a.to_string(), owned);
                }
            }
        }
        let st = shared.state.lock().unwrap();
        candidates.retain(|(a, _)| st.ownership.get(a) == Some(&true));
    }

    Ok(candidates)
}

/// How often the whole account's load balancers are listed (new ones found). Known ones are
/// read at every poll; listing is the costly call when LocalStack holds many.
pub(super) const LISTING_INTERVAL: Duration = Duration::from_secs(1);

pub(super) async fn poll_once(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let elb = &shared.elb;
    let cached = {
        let listing = shared.listing.lock().unwrap();
        listing
            .as_ref()
            .filter(|(at, _)| at.elapsed() < LISTING_INTERVAL)
            .map(|(_, lbs)| lbs.clone())
    };
    let candidates = match cached {
        Some(c) => c,
        None => {
            let c = list_load_balancers(shared).await?;
            *shared.listing.lock().unwrap() = Some((Instant::now(), c.clone()));
            c
        }
    };
    let mut observed = Vec::new();
    for (arn, dns_name) in candidates {
        let ls = match elb
            .describe_listeners()
            .load_balancer_arn(&arn)
            .send()
            .await
        {
            Ok(ls) => ls,
            Err(_) => continue, // deleted in between
        };
        let listeners = ls
            .listeners()
            .iter()
            .filter_map(|l| {
                let tg = l
                    .default_actions()
                    .first()
                    .and_then(|a| a.target_group_arn())?;
                Some((
                    l.port()?,
                    l.protocol()?.as_str().to_string(),
                    tg.to_string(),
                ))
            })
            .collect();
        observed.push(ObservedLb {
            arn,
            dns_name,
            listeners,
        });
    }

    let mut tg_arns: Vec<String> = observed
        .iter()
        .flat_map(|lb| lb.listeners.iter().map(|l| l.2.clone()))
        .collect();
    tg_arns.sort();
    tg_arns.dedup();
    let mut tgs = HashMap::new();
    for arn in &tg_arns {
        if let Some(tg) = observe_target_group(shared, arn).await? {
            tgs.insert(arn.clone(), tg);
        }
    }

    // Instance ids → private IPs (cached: an instance's primary private IP never changes).
    // (Unique ids: moto fails DescribeInstances when one is given twice.)
    let unknown: Vec<String> = {
        let st = shared.state.lock().unwrap();
        let ids: std::collections::BTreeSet<String> = tgs
            .values()
            .filter(|tg| tg.target_type == "instance")
            .flat_map(|tg| tg.targets.iter().map(|(id, _)| id.clone()))
            .filter(|id| !st.instance_ips.contains_key(id))
            .collect();
        ids.into_iter().collect()
    };
    if !unknown.is_empty() {
        let out = shared
            .ec2
            .describe_instances()
            .set_instance_ids(Some(unknown))
            .send()
            .await?;
        let mut st = shared.state.lock().unwrap();
        for r in out.reservations() {
            for i in r.instances() {
                if let (Some(id), Some(ip)) = (i.instance_id(), i.private_ip_address())
                    && let Ok(ip) = ip.parse()
                {
                    st.instance_ips.insert(id.to_string(), ip);
                }
            }
        }
    }

    apply(shared, observed, tgs).await;
    Ok(())
}

pub(super) async fn observe_target_group(
    shared: &Arc<Shared>,
    arn: &str,
) -> anyhow::Result<Option<ObservedTg>> {
    let elb = &shared.elb;
    let Ok(out) = elb
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
    else {
        return Ok(None);
    };
    let Some(tg) = out.target_groups().first() else {
        return Ok(None);
    };
    let attrs = elb
        .describe_target_group_attributes()
        .target_group_arn(arn)
        .send()
        .await?;
    let attr: HashMap<&str, &str> = attrs
        .attributes()
        .iter()
        .filter_map(|a| Some((a.key()?, a.value()?)))
        .collect();
    let flag = |k: &str, default: bool| attr.get(k).map(|v| *v == "true").unwrap_or(default);
    let secs = |k: &str, default: f64| {
        attr.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(default)
    };
    let scale = |s: f64| Duration::from_secs_f64((s * shared.config.time_scale).max(0.0));
    let settings = TgSettings {
        arn: arn.to_string(),
        name: tg.target_group_name().unwrap_or_default().to_string(),
        hc_protocol: tg
            .health_check_protocol()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "TCP".into()),
        hc_port: tg.health_check_port().unwrap_or("traffic-port").to_string(),
        hc_path: tg.health_check_path().unwrap_or("/").to_string(),
        hc_interval: scale(tg.health_check_interval_seconds().unwrap_or(30) as f64)
            .max(Duration::from_millis(20)),
        hc_timeout: scale(tg.health_check_timeout_seconds().unwrap_or(10) as f64)
            .max(Duration::from_millis(20)),
        healthy_threshold: tg.healthy_threshold_count().unwrap_or(5).max(1) as u32,
        unhealthy_threshold: tg.unhealthy_threshold_count().unwrap_or(2).max(1) as u32,
        success_codes: tg
            .matcher()
            .and_then(|m| m.http_code())
            .unwrap_or("200-399")
            .to_string(),
        deregistration_delay: scale(secs("deregistration_delay.timeout_seconds", 300.0)),
        deregistration_termination: flag(
            "deregistration_delay.connection_termination.enabled",
            false,
        ),
        unhealthy_termination: flag(
            "target_health_state.unhealthy.connection_termination.enabled",
            true,
        ),
        unhealthy_draining: scale(secs(
            "target_health_state.unhealthy.draining_interval_seconds",
            0.0,
        )),
        proxy_protocol_v2: flag("proxy_protocol_v2.enabled", false),
    };
    let health = elb
        .describe_target_health()
        .target_group_arn(arn)
        .send()
        .await?;
    let targets = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let t = d.target()?;
            Some((t.id()?.to_string(), t.port().unwrap_or_default()))
        })
        .collect();
    Ok(Some(ObservedTg {
        settings,
        target_type: tg
            .target_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_else(|| "instance".into()),
        targets,
    }))
}

/// Makes the running listeners, target groups and health checkers match what was observed.
pub(super) async fn apply(
    shared: &Arc<Shared>,
    observed: Vec<ObservedLb>,
    tgs: HashMap<String, ObservedTg>,
) {
    // Addresses for new load balancers first (a subprocess each; outside the lock).
    let new_lbs: Vec<(String, String)> = {
        let st = shared.state.lock().unwrap();
        observed
            .iter()
            .filter(|lb| !st.load_balancers.contains_key(&lb.arn))
            .map(|lb| (lb.arn.clone(), lb.dns_name.clone()))
            .collect()
    };
    let mut addresses = Vec::new();
    for (arn, dns) in new_lbs {
        let netns = shared.config.netns.clone();
        match tokio::task::spawn_blocking(move || allocate_address(&netns)).await {
            Ok(Ok(ip)) => {
                log(&format!("load balancer {dns} → {ip}"));
                addresses.push((arn, dns, ip));
            }
            Ok(Err(e)) => log(&format!("no address for {dns}: {e}")),
            Err(e) => log(&format!("no address for {dns}: {e}")),
        }
    }

    let mut released = Vec::new();
    let map_changed;
    {
        let mut st = shared.state.lock().unwrap();
        map_changed = !addresses.is_empty();
        for (arn, dns_name, address) in addresses {
            st.load_balancers.insert(
                arn,
                LbRuntime {
                    dns_name,
                    address,
                    listeners: BTreeMap::new(),
                },
            );
        }

        // Target groups: settings and targets.
        for (arn, otg) in &tgs {
            let tg = st
                .target_groups
                .entry(arn.clone())
                .or_insert_with(|| {
                    Arc::new(TgRuntime {
                        settings: Mutex::new(otg.settings.clone()),
                        targets: Mutex::new(BTreeMap::new()),
                    })
                })
                .clone();
            *tg.settings.lock().unwrap() = otg.settings.clone();
            let resolved: Vec<((String, i32), SocketAddr)> = otg
                .targets
                .iter()
                .filter_map(|(id, port)| {
                    let ip = if otg.target_type == "instance" {
                        *st.instance_ips.get(id)?
                    } else {
                        id.parse().ok()?
                    };
                    Some((
                        (id.clone(), *port),
                        SocketAddr::new(IpAddr::V4(ip), *port as u16),
                    ))
                })
                .collect();
            sync_targets(shared, &tg, resolved);
        }
        // Target groups no longer behind any listener: their targets drain like deregistered ones.
        let gone: Vec<String> = st
            .target_groups
            .keys()
            .filter(|a| !tgs.contains_key(*a))
            .cloned()
            .collect();
        for arn in gone {
            if let Some(tg) = st.target_groups.get(&arn).cloned() {
                sync_targets(shared, &tg, Vec::new());
                if tg.targets.lock().unwrap().is_empty() {
                    st.target_groups.remove(&arn);
                }
            }
        }

        // Listeners.
        let observed_arns: Vec<&String> = observed.iter().map(|l| &l.arn).collect();
        let removed: Vec<String> = st
            .load_balancers
            .keys()
            .filter(|a| !observed_arns.contains(a))
            .cloned()
            .collect();
        for arn in removed {
            if let Some(lb) = st.load_balancers.remove(&arn) {
                log(&format!("load balancer {} deleted", lb.dns_name));
                released.push(lb.address);
            }
        }
        for olb in &observed {
            let Some(lb) = st.load_balancers.get_mut(&olb.arn) else {
                continue;
            };
            let address = lb.address;
            let want: BTreeMap<(i32, String), String> = olb
                .listeners
                .iter()
                .map(|(p, proto, tg)| ((*p, proto.clone()), tg.clone()))
                .collect();
            lb.listeners.retain(|k, _| want.contains_key(k));
            for (key, tg_arn) in want {
                if let Some(l) = lb.listeners.get(&key) {
                    *l.target_group.lock().unwrap() = tg_arn;
                    continue;
                }
                let target_group = Arc::new(Mutex::new(tg_arn));
                match start_listener(shared, address, key.0 as u16, &key.1, &target_group) {
                    Ok(tasks) => {
                        log(&format!(
                            "{} listener {}/{} on {address}",
                            lb.dns_name, key.0, key.1
                        ));
                        lb.listeners.insert(
                            key,
                            ListenerRuntime {
                                target_group,
                                tasks,
                            },
                        );
                    }
                    Err(e) => log(&format!(
                        "{} listener {}/{}: {e}",
                        lb.dns_name, key.0, key.1
                    )),
                }
            }
        }
    }
    for ip in &released {
        release_address(&shared.config.netns, *ip);
    }
    if map_changed || !released.is_empty() {
        write_map(shared);
    }
}

pub(super) fn write_map(shared: &Arc<Shared>) {
    let Some(path) = &shared.config.map_file else {
        return;
    };
    let text: String = {
        let st = shared.state.lock().unwrap();
        st.load_balancers
            .values()
            .map(|lb| format!("{} {}\n", lb.dns_name, lb.address))
            .collect()
    };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

pub(super) fn allocate_address(netns: &str) -> io::Result<Ipv4Addr> {
    let out = std::process::Command::new(crate::repo_root().join("dev/netns"))
        .args(["addr", netns])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).to_string(),
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(io::Error::other)
}

pub(super) fn release_address(netns: &str, ip: Ipv4Addr) {
    let _ = std::process::Command::new(crate::repo_root().join("dev/netns"))
        .args(["unaddr", netns, &ip.to_string()])
        .status();
}
