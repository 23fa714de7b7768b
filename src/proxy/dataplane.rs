//! Makes the running sockets match the table: binds new frontends and health-check ports, swaps
//! the endpoint set of changed ones in place (listener untouched, open connections untouched),
//! and closes removed ones. A Service port that moved to a new nodePort keeps its old one
//! accepting for `--node-port-linger` (its load balancer sends there until the listener moves
//! to the new target group). Logs each change once, at info.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::tracker::Tracker;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::clusterleg::{ClusterLeg, Shared};
use super::frontend::{Caps, Lifecycle, PortState, Timeouts};
use super::health::{self, ProxyHealth};
use super::metrics::Metrics;
use super::nft::Nft;
use super::table::{Frontend, FrontendKey, HealthCheck, Protocol, Table};
use super::{tcp, udp};
use crate::runtime::http::{self, HttpLimits, HttpThread};

struct RunningFrontend {
    config: watch::Sender<Arc<Frontend>>,
    removed: CancellationToken,
    port: Arc<PortState>,
}

/// An old nodePort still accepting after its Service port moved; `kept` is cancelled when the
/// port is taken back into the table (its closing timer then stands down).
struct Retired {
    running: RunningFrontend,
    kept: CancellationToken,
}

struct RunningHealthCheck {
    check: watch::Sender<HealthCheck>,
    stop: CancellationToken,
}

/// The sockets the proxy runs, by table key.
pub struct Dataplane {
    bind: IpAddr,
    metrics: Arc<Metrics>,
    proxy: Arc<ProxyHealth>,
    timeouts: Timeouts,
    caps: Arc<Caps>,
    http: (HttpThread, Arc<HttpLimits>),
    draining: CancellationToken,
    tracker: Tracker,
    frontends: BTreeMap<FrontendKey, RunningFrontend>,
    health_checks: BTreeMap<u16, RunningHealthCheck>,
    cluster: Option<ClusterLeg>,
    retired: BTreeMap<FrontendKey, Retired>,
    linger: Duration,
}

impl Dataplane {
    /// An empty dataplane; `tracker` will carry every connection and flow task.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bind: IpAddr,
        metrics: Arc<Metrics>,
        proxy: Arc<ProxyHealth>,
        timeouts: Timeouts,
        caps: Arc<Caps>,
        http: (HttpThread, Arc<HttpLimits>),
        draining: CancellationToken,
        tracker: Tracker,
    ) -> Dataplane {
        Dataplane {
            bind,
            metrics,
            proxy,
            timeouts,
            caps,
            http,
            draining,
            tracker,
            frontends: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            cluster: None,
            retired: BTreeMap::new(),
            linger: Duration::ZERO,
        }
    }

    /// Serves the ClusterIP leg too, with nftables table `nft.table` (replaced on the first
    /// apply, removed by [`Dataplane::remove_rules`]).
    pub fn with_cluster_leg(mut self, nft: Nft) -> Dataplane {
        let shared = Shared {
            metrics: Arc::clone(&self.metrics),
            timeouts: self.timeouts,
            caps: Arc::clone(&self.caps),
            draining: self.draining.clone(),
            tracker: self.tracker.clone(),
        };
        self.cluster = Some(ClusterLeg::new(nft, shared));
        self
    }

    /// Removes the ClusterIP leg's nftables table (clean shutdown).
    pub async fn remove_rules(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.remove().await;
        }
    }

    /// Old nodePorts of Services that moved keep accepting for `linger` (zero: closed at once).
    pub fn with_node_port_linger(mut self, linger: Duration) -> Dataplane {
        self.linger = linger;
        self
    }

    /// Applies `table`. Returns false when some socket could not be bound (retry later).
    pub async fn apply(&mut self, table: &Table) -> bool {
        let mut all_bound = true;
        self.metrics.table_updated();

        self.reclaim_retired(table);
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !table.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.retire_or_close(key, table);
        }
        for (key, frontend) in &table.frontends {
            let same_service = self
                .frontends
                .get(key)
                .map(|r| r.config.borrow().service == frontend.service);
            match same_service {
                Some(true) => self.update_frontend(*key, frontend),
                Some(false) => {
                    self.close_frontend(*key);
                    all_bound &= self.open_frontend(*key, frontend).await;
                }
                None => all_bound &= self.open_frontend(*key, frontend).await,
            }
        }

        self.follow_successors(table);

        let gone: Vec<u16> = self
            .health_checks
            .keys()
            .filter(|k| !table.health_checks.contains_key(k))
            .copied()
            .collect();
        for port in gone {
            if let Some(hc) = self.health_checks.remove(&port) {
                hc.stop.cancel();
                let c = hc.check.borrow();
                info!(port, service = %format!("{}/{}", c.namespace, c.name), "health check closed");
            }
        }
        for (port, check) in &table.health_checks {
            if let Some(running) = self.health_checks.get(port) {
                running.check.send_if_modified(|current| {
                    if current == check {
                        return false;
                    }
                    info!(port, service = %format!("{}/{}", check.namespace, check.name),
                          local_endpoints = check.local_endpoints, "health check changed");
                    *current = check.clone();
                    true
                });
            } else {
                all_bound &= self.open_health_check(*port, check);
            }
        }
        if let Some(cluster) = &mut self.cluster {
            all_bound &= cluster.apply(&table.vips).await;
        }
        all_bound
    }

    fn update_frontend(&self, key: FrontendKey, frontend: &Arc<Frontend>) {
        let Some(running) = self.frontends.get(&key) else {
            return;
        };
        running.config.send_if_modified(|current| {
            if **current == **frontend {
                return false;
            }
            info!(frontend = %key, service = %frontend.service,
                  endpoints = frontend.targets.len(), was = current.targets.len(),
                  "endpoints changed");
            running
                .port
                .metrics
                .endpoints
                .set(gauge_value(frontend.targets.len()));
            *current = Arc::clone(frontend);
            true
        });
    }

    async fn open_frontend(&mut self, key: FrontendKey, frontend: &Arc<Frontend>) -> bool {
        if self.draining.is_cancelled() {
            return true;
        }
        let addr = SocketAddr::new(self.bind, key.node_port);
        let metrics = self.metrics.port(key, &frontend.service);
        metrics.endpoints.set(gauge_value(frontend.targets.len()));
        let port = PortState::new(key, metrics, self.timeouts, Arc::clone(&self.caps));
        let (config, config_rx) = watch::channel(Arc::clone(frontend));
        let removed = CancellationToken::new();
        let life = Lifecycle {
            removed: removed.clone(),
            draining: self.draining.clone(),
            tracker: self.tracker.clone(),
        };
        let bound = match key.protocol {
            Protocol::Tcp => tcp::bind(addr).map(|listener| {
                tokio::spawn(tcp::serve(listener, config_rx, Arc::clone(&port), life));
            }),
            Protocol::Udp => udp::bind(addr).await.map(|socket| {
                self.tracker
                    .spawn(udp::serve(socket, config_rx, Arc::clone(&port), life));
            }),
        };
        if let Err(e) = bound {
            warn!(frontend = %key, service = %frontend.service, error = %e, "cannot bind; will retry");
            self.metrics.remove_port(&port.metrics);
            return false;
        }
        info!(frontend = %key, service = %frontend.service, endpoints = frontend.targets.len(),
              "listening");
        self.frontends.insert(
            key,
            RunningFrontend {
                config,
                removed,
                port,
            },
        );
        true
    }

    fn close_frontend(&mut self, key: FrontendKey) {
        if let Some(running) = self.frontends.remove(&key) {
            running.removed.cancel();
            self.metrics.remove_port(&running.port.metrics);
            info!(frontend = %key, service = %running.config.borrow().service, "closed");
        }
    }

    /// A removed frontend whose Service port lives on under another nodePort lingers (still
    /// accepting, closed by a timer); any other closes now.
    fn retire_or_close(&mut self, key: FrontendKey, table: &Table) {
        let moved = self
            .frontends
            .get(&key)
            .is_some_and(|r| successor(table, key, &r.config.borrow().service).is_some());
        if !moved || self.linger.is_zero() || self.draining.is_cancelled() {
            self.close_frontend(key);
            return;
        }
        let Some(running) = self.frontends.remove(&key) else {
            return;
        };
        let kept = CancellationToken::new();
        let (stop, metrics, port) = (
            running.removed.clone(),
            Arc::clone(&self.metrics),
            Arc::clone(&running.port),
        );
        let (linger, stand_down) = (self.linger, kept.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {
                    stop.cancel();
                    metrics.remove_port(&port.metrics);
                    info!(frontend = %key, "old node port closed after lingering");
                }
                _ = stand_down.cancelled() => {}
            }
        });
        info!(frontend = %key, service = %running.config.borrow().service, ?linger,
              "service port moved to another node port; the old one keeps accepting");
        self.retired.insert(key, Retired { running, kept });
    }

    /// Lingering ports the table wants again: the same Service port takes it back as it is;
    /// another one gets it fresh (closed here, opened by `apply`). Closed ones are forgotten.
    fn reclaim_retired(&mut self, table: &Table) {
        let keys: Vec<FrontendKey> = self.retired.keys().copied().collect();
        for key in keys {
            let closed = self.retired[&key].running.removed.is_cancelled();
            let Some(wanted) = table.frontends.get(&key) else {
                if closed {
                    self.retired.remove(&key);
                }
                continue;
            };
            let Some(r) = self.retired.remove(&key) else {
                continue;
            };
            r.kept.cancel();
            if !closed && r.running.config.borrow().service == wanted.service {
                info!(frontend = %key, "node port back in use by its service port");
                self.frontends.insert(key, r.running);
            } else if !closed {
                r.running.removed.cancel();
                self.metrics.remove_port(&r.running.port.metrics);
                info!(frontend = %key, "lingering node port handed to another service port");
            }
        }
    }

    /// Lingering ports send to their Service port's current endpoints.
    fn follow_successors(&self, table: &Table) {
        for (key, r) in &self.retired {
            let service = r.running.config.borrow().service.clone();
            if let Some(next) = successor(table, *key, &service) {
                r.running.config.send_if_modified(|current| {
                    if current.targets == next.targets && current.serving == next.serving {
                        return false;
                    }
                    *current = Arc::new(Frontend {
                        service: current.service.clone(),
                        ..(**next).clone()
                    });
                    true
                });
            }
        }
    }

    fn open_health_check(&mut self, port: u16, check: &HealthCheck) -> bool {
        let addr = SocketAddr::new(self.bind, port);
        let listener = match http::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                warn!(port, error = %e, "cannot bind health check port; will retry");
                return false;
            }
        };
        let (tx, rx) = watch::channel(check.clone());
        let stop = CancellationToken::new();
        let (thread, limits) = &self.http;
        thread.serve(
            listener,
            health::health_check_app(rx, Arc::clone(&self.proxy)),
            Arc::clone(limits),
            stop.clone(),
        );
        info!(port, service = %format!("{}/{}", check.namespace, check.name),
              local_endpoints = check.local_endpoints, "health check listening");
        self.health_checks
            .insert(port, RunningHealthCheck { check: tx, stop });
        true
    }
}

/// The frontend the Service port of `key` has now under another nodePort (same protocol).
fn successor<'t>(
    table: &'t Table,
    key: FrontendKey,
    service: &super::table::ServicePortName,
) -> Option<&'t Arc<Frontend>> {
    table
        .frontends
        .iter()
        .find(|(k, f)| **k != key && k.protocol == key.protocol && f.service == *service)
        .map(|(_, f)| f)
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
