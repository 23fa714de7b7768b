//! NLB data-plane emulator for the rig (issue 8). LocalStack records load balancers, listeners
//! and targets but carries no traffic; this polls its ELBv2 and EC2 state and, for every network
//! load balancer, serves each listener on an address of its own in a rig network namespace,
//! spreading TCP connections and UDP flows over the target group's healthy targets as AWS
//! documents NLBs:
//!
//! - health checks from the target group's settings: TCP connect, or HTTP GET on the port and
//!   path with the success codes; interval, timeout, healthy and unhealthy thresholds. A new
//!   target gets traffic after its first passing check ("initial" → "healthy").
//! - no healthy target at all: fail open to every registered target (AWS's documented fail-open).
//! - a deregistered target gets no new flows; established flows go on ("draining") for
//!   `deregistration_delay.timeout_seconds`, after which they are closed only when
//!   `deregistration_delay.connection_termination.enabled` is true (AWS's default: false).
//! - a target turning unhealthy has its established connections reset, as AWS does by default
//!   (`target_health_state.unhealthy.connection_termination.enabled`, default true); when that is
//!   false they continue, and are reset after `target_health_state.unhealthy.draining_interval_seconds`.
//! - `proxy_protocol_v2.enabled`: each TCP connection to a target starts with a PPv2 header
//!   carrying the client's and the listener's addresses.
//!
//! Every duration from the cloud (intervals, timeouts, delays) is multiplied by `time_scale`, so
//! tests run in seconds. Instance targets resolve to the instance's private IP (DescribeInstances),
//! ip targets are used as they are. Health transitions are logged and kept for tests; the DNS
//! name → address map is a method and, optionally, a file (`NAME ADDRESS` lines) for the demo.
//! Test rig only: never part of the product binary.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::netns::NetnsSockets;

/// What the emulator serves and how fast its clock runs.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// The `dev/netns` name of the namespace the load balancers' addresses live in (`clb-NAME`).
    pub netns: String,
    /// Only load balancers tagged `cloudlb.io/cluster=<this>`; `None` serves every one.
    pub cluster: Option<String>,
    /// Multiplies every cloud duration (health-check interval and timeout, delays).
    pub time_scale: f64,
    /// How often LocalStack is read.
    pub poll_interval: Duration,
    /// Where to write the `DNS-NAME ADDRESS` map after each change.
    pub map_file: Option<PathBuf>,
    /// How long a newly registered target waits for its first health check, staying `initial`
    /// (AWS takes a while to register a target; unscaled). Zero by default.
    pub registration_delay: Duration,
}

impl EmulatorConfig {
    pub fn new(netns: &str) -> EmulatorConfig {
        EmulatorConfig {
            netns: netns.to_string(),
            cluster: None,
            time_scale: 0.05,
            poll_interval: Duration::from_millis(300),
            map_file: None,
            registration_delay: Duration::ZERO,
        }
    }
}

/// A target's health as the emulated NLB sees it (DescribeTargetHealth's states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Initial,
    Healthy,
    Unhealthy,
    /// Failed its checks; established connections continue for the unhealthy draining interval.
    UnhealthyDraining,
    /// Deregistered; established flows continue for the deregistration delay.
    Draining,
    /// Gone (after draining).
    Unused,
}

/// One logged health transition.
#[derive(Clone, Debug)]
pub struct Transition {
    pub at: Instant,
    pub target_group: String,
    pub target: SocketAddr,
    pub from: Health,
    pub to: Health,
}

/// Counters over the emulator's whole life.
#[derive(Debug, Default)]
pub struct Counters {
    pub tcp_connections: AtomicU64,
    pub udp_flows: AtomicU64,
    /// Client connections refused because no target could take them.
    pub no_target: AtomicU64,
    /// Client connections reset because the target refused or failed to connect.
    pub target_connect_failures: AtomicU64,
    /// Established connections the emulator reset (unhealthy or deregistered with termination).
    pub terminated: AtomicU64,
}

/// The running emulator; stops (and removes its addresses) when dropped.
pub struct Emulator {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Shared {
    config: EmulatorConfig,
    sockets: NetnsSockets,
    elb: elbv2::Client,
    ec2: aws_sdk_ec2::Client,
    state: Mutex<State>,
    transitions: Mutex<Vec<Transition>>,
    counters: Counters,
    /// The last account-wide listing: when, and the load balancers served.
    listing: Mutex<Option<(Instant, Vec<LbName>)>>,
}

#[derive(Default)]
struct State {
    load_balancers: BTreeMap<String, LbRuntime>,
    target_groups: HashMap<String, Arc<TgRuntime>>,
    /// load balancer ARN → owned (per the cluster filter)
    ownership: HashMap<String, bool>,
    instance_ips: HashMap<String, Ipv4Addr>,
}

struct LbRuntime {
    dns_name: String,
    address: Ipv4Addr,
    /// (port, protocol) → listener
    listeners: BTreeMap<(i32, String), ListenerRuntime>,
}

struct ListenerRuntime {
    target_group: Arc<Mutex<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ListenerRuntime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Target-group settings read from the cloud.
#[derive(Clone, Debug, PartialEq)]
struct TgSettings {
    arn: String,
    name: String,
    hc_protocol: String,
    hc_port: String,
    hc_path: String,
    hc_interval: Duration,
    hc_timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    success_codes: String,
    deregistration_delay: Duration,
    deregistration_termination: bool,
    unhealthy_termination: bool,
    unhealthy_draining: Duration,
    proxy_protocol_v2: bool,
}

struct TgRuntime {
    settings: Mutex<TgSettings>,
    /// (target id, port) → target
    targets: Mutex<BTreeMap<(String, i32), Arc<TargetRuntime>>>,
}

struct TargetRuntime {
    addr: SocketAddr,
    state: Mutex<TargetState>,
    /// Cancelled to reset every established flow to this target; replaced afterwards.
    kill: Mutex<CancellationToken>,
    checker: Mutex<Option<JoinHandle<()>>>,
    active: AtomicUsize,
    flows: AtomicU64,
}

struct TargetState {
    health: Health,
    /// The health before deregistration (restored when registered again while draining).
    before_draining: Health,
    successes: u32,
    failures: u32,
    /// Bumped on each drain start, so a stale drain timer does nothing.
    drain_epoch: u64,
}

impl Drop for TargetRuntime {
    fn drop(&mut self) {
        if let Some(t) = self.checker.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl TargetRuntime {
    fn health(&self) -> Health {
        self.state.lock().unwrap().health
    }

    fn terminate_flows(&self) -> usize {
        let mut kill = self.kill.lock().unwrap();
        kill.cancel();
        *kill = CancellationToken::new();
        self.active.load(Ordering::Relaxed)
    }
}

/// One target as the tests see it.
#[derive(Clone, Debug)]
pub struct TargetView {
    pub id: String,
    pub addr: SocketAddr,
    pub health: Health,
    pub active: usize,
    pub flows: u64,
}

impl Emulator {
    /// Starts polling LocalStack (through `aws`) and serving what it finds.
    pub async fn start(aws: &aws_config::SdkConfig, config: EmulatorConfig) -> Emulator {
        let sockets = NetnsSockets::enter(&format!("clb-{}", config.netns))
            .unwrap_or_else(|e| panic!("enter netns clb-{}: {e}", config.netns));
        let shared = Arc::new(Shared {
            sockets,
            elb: elbv2::Client::new(aws),
            ec2: aws_sdk_ec2::Client::new(aws),
            config,
            state: Mutex::new(State::default()),
            transitions: Mutex::new(Vec::new()),
            counters: Counters::default(),
            listing: Mutex::new(None),
        });
        write_map(&shared); // empty until the first load balancer appears
        let cancel = CancellationToken::new();
        let task = tokio::spawn(poll_loop(shared.clone(), cancel.clone()));
        Emulator {
            shared,
            cancel,
            task,
        }
    }

    /// The address serving `dns_name`, once the emulator has picked the load balancer up.
    pub fn address(&self, dns_name: &str) -> Option<Ipv4Addr> {
        let st = self.shared.state.lock().unwrap();
        st.load_balancers
            .values()
            .find(|lb| lb.dns_name == dns_name)
            .map(|lb| lb.address)
    }

    /// Waits up to `timeout` for `dns_name` to get an address.
    pub async fn resolve(&self, dns_name: &str, timeout: Duration) -> Ipv4Addr {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.address(dns_name) {
                return a;
            }
            assert!(Instant::now() < deadline, "{dns_name} got no address");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `DNS-NAME → address` for every load balancer served.
    pub fn dns_map(&self) -> BTreeMap<String, Ipv4Addr> {
        let st = self.shared.state.lock().unwrap();
        st.load_balancers
            .values()
            .map(|lb| (lb.dns_name.clone(), lb.address))
            .collect()
    }

    /// The targets of the target group behind `dns_name`'s listener on `port`.
    pub fn targets(&self, dns_name: &str, port: i32) -> Vec<TargetView> {
        let st = self.shared.state.lock().unwrap();
        let Some(lb) = st
            .load_balancers
            .values()
            .find(|lb| lb.dns_name == dns_name)
        else {
            return Vec::new();
        };
        let Some(l) = lb.listeners.iter().find(|((p, _), _)| *p == port) else {
            return Vec::new();
        };
        let tg_arn = l.1.target_group.lock().unwrap().clone();
        let Some(tg) = st.target_groups.get(&tg_arn) else {
            return Vec::new();
        };
        tg.targets
            .lock()
            .unwrap()
            .iter()
            .map(|((id, _), t)| TargetView {
                id: id.clone(),
                addr: t.addr,
                health: t.health(),
                active: t.active.load(Ordering::Relaxed),
                flows: t.flows.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// A handle on the emulator's target health, for the rig's AWS endpoint
    /// ([`super::health_endpoint`]) to answer `DescribeTargetHealth` from.
    pub fn health_view(&self) -> HealthView {
        HealthView(self.shared.clone())
    }

    /// Every health transition so far.
    pub fn transitions(&self) -> Vec<Transition> {
        self.shared.transitions.lock().unwrap().clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Stops serving; the load balancers' addresses are removed.
    pub fn stop(&self) {
        self.cancel.cancel();
        let mut st = self.shared.state.lock().unwrap();
        let lbs = std::mem::take(&mut st.load_balancers);
        st.target_groups.clear();
        drop(st);
        for lb in lbs.values() {
            release_address(&self.shared.config.netns, lb.address);
        }
    }
}

/// Read-only view of the emulated NLB's target health (cheap to clone).
#[derive(Clone)]
pub struct HealthView(Arc<Shared>);

impl HealthView {
    /// `(target id, port) → health` of every target the emulator tracks in the group, draining
    /// ones included; `None` when it does not serve the group (yet).
    pub fn target_group(&self, arn: &str) -> Option<BTreeMap<(String, i32), Health>> {
        let tg = self.0.state.lock().unwrap().target_groups.get(arn)?.clone();
        let targets = tg.targets.lock().unwrap();
        Some(
            targets
                .iter()
                .map(|(k, t)| (k.clone(), t.health()))
                .collect(),
        )
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
        self.task.abort();
    }
}

async fn poll_loop(shared: Arc<Shared>, cancel: CancellationToken) {
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

fn log(msg: &str) {
    eprintln!("[nlb-emulator {}] {msg}", clock());
}

fn clock() -> String {
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
struct ObservedLb {
    arn: String,
    dns_name: String,
    /// (port, protocol, target group arn)
    listeners: Vec<(i32, String, String)>,
}

/// The cloud's view of one target group.
struct ObservedTg {
    settings: TgSettings,
    target_type: String,
    /// (id, port)
    targets: Vec<(String, i32)>,
}

/// A load balancer's (ARN, DNS name).
type LbName = (String, String);

/// Every network load balancer we serve (per the cluster filter).
async fn list_load_balancers(shared: &Arc<Shared>) -> anyhow::Result<Vec<LbName>> {
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
const LISTING_INTERVAL: Duration = Duration::from_secs(1);

async fn poll_once(shared: &Arc<Shared>) -> anyhow::Result<()> {
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

async fn observe_target_group(
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
async fn apply(shared: &Arc<Shared>, observed: Vec<ObservedLb>, tgs: HashMap<String, ObservedTg>) {
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

fn write_map(shared: &Arc<Shared>) {
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

fn allocate_address(netns: &str) -> io::Result<Ipv4Addr> {
    let out = std::process::Command::new(super::repo_root().join("dev/netns"))
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

fn release_address(netns: &str, ip: Ipv4Addr) {
    let _ = std::process::Command::new(super::repo_root().join("dev/netns"))
        .args(["unaddr", netns, &ip.to_string()])
        .status();
}

fn transition(shared: &Shared, tg: &str, target: SocketAddr, from: Health, to: Health) {
    if from == to {
        return;
    }
    log(&format!("{tg} target {target}: {from:?} → {to:?}"));
    shared.transitions.lock().unwrap().push(Transition {
        at: Instant::now(),
        target_group: tg.to_string(),
        target,
        from,
        to,
    });
}

/// New targets start health checks; missing ones start draining; re-registered ones stop it.
fn sync_targets(
    shared: &Arc<Shared>,
    tg: &Arc<TgRuntime>,
    observed: Vec<((String, i32), SocketAddr)>,
) {
    let settings = tg.settings.lock().unwrap().clone();
    let mut targets = tg.targets.lock().unwrap();
    let keys: Vec<&(String, i32)> = observed.iter().map(|(k, _)| k).collect();
    for (key, addr) in &observed {
        match targets.get(key) {
            Some(t) => {
                let mut s = t.state.lock().unwrap();
                if s.health == Health::Draining {
                    let back = s.before_draining;
                    s.health = back;
                    s.drain_epoch += 1;
                    drop(s);
                    transition(shared, &settings.name, t.addr, Health::Draining, back);
                }
            }
            None => {
                let t = Arc::new(TargetRuntime {
                    addr: *addr,
                    state: Mutex::new(TargetState {
                        health: Health::Initial,
                        before_draining: Health::Initial,
                        successes: 0,
                        failures: 0,
                        drain_epoch: 0,
                    }),
                    kill: Mutex::new(CancellationToken::new()),
                    checker: Mutex::new(None),
                    active: AtomicUsize::new(0),
                    flows: AtomicU64::new(0),
                });
                log(&format!("{} target {addr} registered", settings.name));
                let checker = tokio::spawn(health_checker(
                    shared.clone(),
                    tg.clone(),
                    Arc::downgrade(&t),
                ));
                *t.checker.lock().unwrap() = Some(checker);
                targets.insert(key.clone(), t);
            }
        }
    }
    let gone: Vec<(String, i32)> = targets
        .keys()
        .filter(|k| !keys.contains(k))
        .cloned()
        .collect();
    for key in gone {
        let t = targets[&key].clone();
        let mut s = t.state.lock().unwrap();
        if s.health == Health::Draining {
            continue;
        }
        let from = s.health;
        s.before_draining = from;
        s.health = Health::Draining;
        s.drain_epoch += 1;
        let epoch = s.drain_epoch;
        drop(s);
        transition(shared, &settings.name, t.addr, from, Health::Draining);
        let shared = shared.clone();
        let tg = tg.clone();
        tokio::spawn(async move {
            let (delay, terminate, name) = {
                let s = tg.settings.lock().unwrap();
                (
                    s.deregistration_delay,
                    s.deregistration_termination,
                    s.name.clone(),
                )
            };
            tokio::time::sleep(delay).await;
            let mut targets = tg.targets.lock().unwrap();
            if t.state.lock().unwrap().drain_epoch != epoch {
                return; // registered again meanwhile
            }
            if terminate {
                let n = t.terminate_flows();
                shared
                    .counters
                    .terminated
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            targets.remove(&key);
            transition(&shared, &name, t.addr, Health::Draining, Health::Unused);
        });
    }
}

async fn health_checker(
    shared: Arc<Shared>,
    tg: Arc<TgRuntime>,
    target: std::sync::Weak<TargetRuntime>,
) {
    tokio::time::sleep(shared.config.registration_delay).await;
    loop {
        let settings = tg.settings.lock().unwrap().clone();
        let Some(t) = target.upgrade() else { return };
        let addr = t.addr;
        drop(t);
        let ok = check(&shared, &settings, addr).await;
        let Some(t) = target.upgrade() else { return };
        let (from, next) = record_check(&t, &settings, ok);
        if next != from {
            transition(&shared, &settings.name, addr, from, next);
            match next {
                Health::Unhealthy => {
                    let n = t.terminate_flows();
                    shared
                        .counters
                        .terminated
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Health::UnhealthyDraining => {
                    let weak = target.clone();
                    let shared = shared.clone();
                    let name = settings.name.clone();
                    let wait = settings.unhealthy_draining;
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let Some(t) = weak.upgrade() else { return };
                        let mut s = t.state.lock().unwrap();
                        if s.health == Health::UnhealthyDraining {
                            s.health = Health::Unhealthy;
                            drop(s);
                            transition(
                                &shared,
                                &name,
                                t.addr,
                                Health::UnhealthyDraining,
                                Health::Unhealthy,
                            );
                            let n = t.terminate_flows();
                            shared
                                .counters
                                .terminated
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                    });
                }
                _ => {}
            }
        }
        drop(t);
        tokio::time::sleep(settings.hc_interval).await;
    }
}

/// Counts one check result; returns the health before and after it. A draining target keeps
/// being checked (a re-registration restores the result) but stays `Draining`.
fn record_check(t: &TargetRuntime, settings: &TgSettings, ok: bool) -> (Health, Health) {
    let mut s = t.state.lock().unwrap();
    if ok {
        s.successes += 1;
        s.failures = 0;
    } else {
        s.failures += 1;
        s.successes = 0;
    }
    let draining = s.health == Health::Draining;
    let health_now = if draining {
        s.before_draining
    } else {
        s.health
    };
    let next = match health_now {
        Health::Initial if ok => Health::Healthy,
        Health::Initial if s.failures >= settings.unhealthy_threshold => Health::Unhealthy,
        Health::Healthy if s.failures >= settings.unhealthy_threshold => {
            if settings.unhealthy_termination {
                Health::Unhealthy
            } else {
                Health::UnhealthyDraining
            }
        }
        Health::Unhealthy | Health::UnhealthyDraining
            if s.successes >= settings.healthy_threshold =>
        {
            Health::Healthy
        }
        h => h,
    };
    if draining {
        s.before_draining = next;
        return (Health::Draining, Health::Draining);
    }
    s.health = next;
    (health_now, next)
}

/// One health check of `target` per the group's settings.
async fn check(shared: &Shared, s: &TgSettings, target: SocketAddr) -> bool {
    let port: u16 = if s.hc_port == "traffic-port" {
        target.port()
    } else {
        s.hc_port.parse().unwrap_or(target.port())
    };
    let addr = SocketAddr::new(target.ip(), port);
    let sockets = shared.sockets.clone();
    let attempt = async move {
        let mut conn = sockets.tcp_connect(None, addr).await.ok()?;
        if s.hc_protocol == "TCP" {
            return Some(true);
        }
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ELB-HealthChecker/2.0\r\nConnection: close\r\n\r\n",
            s.hc_path
        );
        conn.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let code: u16 = line.split(' ').nth(1)?.trim().parse().ok()?;
        Some(success_code_matches(&s.success_codes, code))
    };
    matches!(
        tokio::time::timeout(s.hc_timeout, attempt).await,
        Ok(Some(true))
    )
}

/// ELBv2 matcher syntax: `200`, `200,202`, `200-399`.
pub fn success_code_matches(spec: &str, code: u16) -> bool {
    spec.split(',')
        .map(str::trim)
        .any(|part| match part.split_once('-') {
            Some((lo, hi)) => match (lo.parse::<u16>(), hi.parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&code),
                _ => false,
            },
            None => part.parse::<u16>() == Ok(code),
        })
}

/// The PROXY protocol v2 header for a TCP (or UDP) flow over IPv4, as an NLB sends it.
pub fn proxy_protocol_v2_header(client: SocketAddr, listener: SocketAddr, udp: bool) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (client, listener) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(if udp { 0x12 } else { 0x11 });
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
        (c, l) => {
            h.push(if udp { 0x22 } else { 0x21 });
            h.extend_from_slice(&36u16.to_be_bytes());
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            h.extend_from_slice(&v6(c));
            h.extend_from_slice(&v6(l));
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    h
}

/// The targets that may take a new flow: healthy ones, or — when none is healthy but some
/// failed their checks — every registered one (fail open).
fn pick_target(tg: &TgRuntime, flow_hash: u64) -> Option<Arc<TargetRuntime>> {
    let targets = tg.targets.lock().unwrap();
    let healthy: Vec<&Arc<TargetRuntime>> = targets
        .values()
        .filter(|t| t.health() == Health::Healthy)
        .collect();
    let pool = if healthy.is_empty() {
        let registered: Vec<&Arc<TargetRuntime>> = targets
            .values()
            .filter(|t| {
                matches!(
                    t.health(),
                    Health::Unhealthy | Health::UnhealthyDraining | Health::Initial
                )
            })
            .collect();
        if registered.iter().any(|t| t.health() != Health::Initial) {
            registered
        } else {
            Vec::new()
        }
    } else {
        healthy
    };
    if pool.is_empty() {
        return None;
    }
    Some(pool[(flow_hash % pool.len() as u64) as usize].clone())
}

fn flow_hash(client: SocketAddr, listener: SocketAddr, udp: bool) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (client, listener, udp).hash(&mut h);
    h.finish()
}

fn start_listener(
    shared: &Arc<Shared>,
    address: Ipv4Addr,
    port: u16,
    protocol: &str,
    target_group: &Arc<Mutex<String>>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let addr = SocketAddr::new(IpAddr::V4(address), port);
    let mut tasks = Vec::new();
    if matches!(protocol, "TCP" | "TCP_UDP" | "TLS") {
        let listener = shared.sockets.tcp_listener(addr)?;
        tasks.push(tokio::spawn(tcp_accept_loop(
            shared.clone(),
            listener,
            addr,
            target_group.clone(),
        )));
    }
    if matches!(protocol, "UDP" | "TCP_UDP") {
        let socket = shared.sockets.udp_socket(addr)?;
        tasks.push(tokio::spawn(udp_loop(
            shared.clone(),
            Arc::new(socket),
            addr,
            target_group.clone(),
        )));
    }
    Ok(tasks)
}

fn target_group_of(shared: &Shared, arn: &Mutex<String>) -> Option<Arc<TgRuntime>> {
    let arn = arn.lock().unwrap().clone();
    shared
        .state
        .lock()
        .unwrap()
        .target_groups
        .get(&arn)
        .cloned()
}

/// Drops a TCP stream with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn tcp_accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    target_group: Arc<Mutex<String>>,
) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        shared
            .counters
            .tcp_connections
            .fetch_add(1, Ordering::Relaxed);
        let tg = target_group_of(&shared, &target_group);
        let target = tg
            .as_ref()
            .and_then(|tg| pick_target(tg, flow_hash(peer, addr, false)));
        let (Some(tg), Some(target)) = (tg, target) else {
            shared.counters.no_target.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        };
        let ppv2 = tg.settings.lock().unwrap().proxy_protocol_v2;
        tokio::spawn(tcp_flow(shared.clone(), client, peer, addr, target, ppv2));
    }
}

async fn tcp_flow(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    listener: SocketAddr,
    target: Arc<TargetRuntime>,
    ppv2: bool,
) {
    let kill = target.kill.lock().unwrap().clone();
    target.active.fetch_add(1, Ordering::Relaxed);
    target.flows.fetch_add(1, Ordering::Relaxed);
    let connect = shared.sockets.tcp_connect(Some(listener.ip()), target.addr);
    let upstream = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), connect) => r.ok().and_then(Result::ok),
        _ = kill.cancelled() => None,
    };
    let Some(mut upstream) = upstream else {
        shared
            .counters
            .target_connect_failures
            .fetch_add(1, Ordering::Relaxed);
        target.active.fetch_sub(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    if ppv2 {
        let header = proxy_protocol_v2_header(peer, listener, false);
        if upstream.write_all(&header).await.is_err() {
            target.active.fetch_sub(1, Ordering::Relaxed);
            reset(client);
            return;
        }
    }
    // Each direction on its own, FIN for FIN: what one side sent before closing (or resetting)
    // still reaches the other, as through an NLB. A reset on either side resets both at the end.
    let outcome = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let to_target = async {
            let r = tokio::io::copy(&mut cr, &mut uw).await;
            let _ = uw.shutdown().await;
            r
        };
        let to_client = async {
            let r = tokio::io::copy(&mut ur, &mut cw).await;
            let _ = cw.shutdown().await;
            r
        };
        tokio::select! {
            (a, b) = async { tokio::join!(to_target, to_client) } => Some(a.is_ok() && b.is_ok()),
            _ = kill.cancelled() => None,
        }
    };
    target.active.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Some(true) => {}
        Some(false) => {
            // the target reset or failed: the client sees a reset too
            reset(client);
            reset(upstream);
        }
        None => {
            reset(client);
            reset(upstream);
        }
    }
}

struct UdpFlow {
    upstream: Arc<UdpSocket>,
    last_seen: Arc<Mutex<Instant>>,
}

async fn udp_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    target_group: Arc<Mutex<String>>,
) {
    // NLB's UDP flow idle timeout is 120 s, scaled like every cloud duration (at least 2 s).
    let idle = Duration::from_secs_f64((120.0 * shared.config.time_scale).max(2.0));
    let flows: Arc<Mutex<HashMap<SocketAddr, UdpFlow>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let existing = flows
            .lock()
            .unwrap()
            .get(&peer)
            .map(|f| (f.upstream.clone(), f.last_seen.clone()));
        if let Some((up, seen)) = existing {
            *seen.lock().unwrap() = Instant::now();
            let _ = up.send(&buf[..n]).await;
            continue;
        }
        let tg = target_group_of(&shared, &target_group);
        let target = tg
            .as_ref()
            .and_then(|tg| pick_target(tg, flow_hash(peer, addr, true)));
        let Some(target) = target else {
            shared.counters.no_target.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(up) = shared
            .sockets
            .udp_socket(SocketAddr::new(addr.ip(), 0))
            .map(Arc::new)
        else {
            continue;
        };
        if up.connect(target.addr).await.is_err() {
            continue;
        }
        shared.counters.udp_flows.fetch_add(1, Ordering::Relaxed);
        target.flows.fetch_add(1, Ordering::Relaxed);
        target.active.fetch_add(1, Ordering::Relaxed);
        let seen = Arc::new(Mutex::new(Instant::now()));
        flows.lock().unwrap().insert(
            peer,
            UdpFlow {
                upstream: up.clone(),
                last_seen: seen.clone(),
            },
        );
        let _ = up.send(&buf[..n]).await;
        let kill = target.kill.lock().unwrap().clone();
        let socket = socket.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            let mut rbuf = vec![0u8; 65536];
            loop {
                let since = seen.lock().unwrap().elapsed();
                if since >= idle {
                    break;
                }
                tokio::select! {
                    r = up.recv(&mut rbuf) => match r {
                        Ok(n) => {
                            *seen.lock().unwrap() = Instant::now();
                            let _ = socket.send_to(&rbuf[..n], peer).await;
                        }
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep(idle - since) => {}
                    _ = kill.cancelled() => break,
                }
            }
            flows.lock().unwrap().remove(&peer);
            target.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
