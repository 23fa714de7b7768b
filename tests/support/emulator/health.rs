//! Target health: transitions, the health checker per target (TCP connect or HTTP GET with the
//! group's thresholds), and ELBv2's success-code matcher.

use super::*;

pub(super) fn transition(shared: &Shared, tg: &str, target: SocketAddr, from: Health, to: Health) {
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
pub(super) fn sync_targets(
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

pub(super) async fn health_checker(
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
pub(super) fn record_check(t: &TargetRuntime, settings: &TgSettings, ok: bool) -> (Health, Health) {
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
pub(super) async fn check(shared: &Shared, s: &TgSettings, target: SocketAddr) -> bool {
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
