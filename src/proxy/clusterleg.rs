//! Runs the ClusterIP leg: one listener per Service port and leg (TCP listener or UDP socket on
//! an ephemeral port of all addresses, served by the same `tcp`/`udp` code as a node port) and
//! the nftables table that redirects the Service's virtual addresses to them. Endpoint updates
//! swap a listener's frontend in place and leave the rules alone; the table is rewritten only
//! when listeners or addresses change, after new listeners are up and before old ones close.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::frontend::{Caps, Lifecycle, PortState, Timeouts};
use super::metrics::Metrics;
use super::nft::{self, Nft, Redirect};
use super::table::{Frontend, FrontendKey, Protocol};
use super::tracker::Tracker;
use super::vips::{VipFrontend, VipKey};
use super::{tcp, udp};

struct RunningVip {
    config: watch::Sender<Arc<Frontend>>,
    removed: CancellationToken,
    port: Arc<PortState>,
    local_port: u16,
    vips: Vec<SocketAddr>,
}

/// What the leg's listeners share with the node-port ones.
pub struct Shared {
    /// Metric registry.
    pub metrics: Arc<Metrics>,
    /// Connect and UDP idle timeouts.
    pub timeouts: Timeouts,
    /// Process-wide caps.
    pub caps: Arc<Caps>,
    /// Cancelled when the proxy stops accepting.
    pub draining: CancellationToken,
    /// Connection and flow tasks.
    pub tracker: Tracker,
}

/// The ClusterIP leg's listeners and rules.
pub struct ClusterLeg {
    nft: Nft,
    shared: Shared,
    running: BTreeMap<VipKey, RunningVip>,
    /// The ruleset the kernel holds, once applied.
    applied: Option<String>,
}

impl ClusterLeg {
    /// A leg with no listeners; [`ClusterLeg::apply`] replaces whatever table of this name a
    /// previous run left (after a SIGKILL, say) on its first call.
    pub fn new(nft: Nft, shared: Shared) -> ClusterLeg {
        ClusterLeg {
            nft,
            shared,
            running: BTreeMap::new(),
            applied: None,
        }
    }

    /// Makes listeners and rules match `vips`. False when a listener could not be bound or
    /// nft failed (retried later).
    pub async fn apply(&mut self, vips: &BTreeMap<VipKey, VipFrontend>) -> bool {
        let mut ok = true;
        for (key, vip) in vips {
            let same = self
                .running
                .get(key)
                .map(|r| r.config.borrow().service == vip.frontend.service);
            match same {
                Some(true) => self.update(key, vip),
                Some(false) => {
                    self.close(key);
                    ok &= self.open(key, vip).await;
                }
                None => ok &= self.open(key, vip).await,
            }
        }
        let gone: Vec<VipKey> = self
            .running
            .keys()
            .filter(|k| !vips.contains_key(k))
            .cloned()
            .collect();
        // Rules first, without the gone ones, so nothing is redirected to a closed port.
        let keep = |k: &VipKey| vips.contains_key(k);
        ok &= self.write_rules(keep).await;
        for key in gone {
            self.close(&key);
        }
        ok
    }

    /// Removes the table (clean shutdown).
    pub async fn remove(&mut self) {
        match self.nft.run(&nft::deletion(&self.nft.table)).await {
            Ok(()) => info!(table = %self.nft.table, "nftables table removed"),
            Err(e) => {
                warn!(table = %self.nft.table, error = %e, "cannot remove the nftables table")
            }
        }
        self.applied = None;
    }

    async fn write_rules(&mut self, keep: impl Fn(&VipKey) -> bool) -> bool {
        let redirects: Vec<Redirect> = self
            .running
            .iter()
            .filter(|(k, _)| keep(k))
            .flat_map(|(k, r)| Redirect::of(k.protocol, &r.vips, r.local_port))
            .collect();
        let ruleset = nft::ruleset(&self.nft.table, &redirects);
        if self.applied.as_deref() == Some(ruleset.as_str()) {
            return true;
        }
        match self.nft.run(&ruleset).await {
            Ok(()) => {
                info!(table = %self.nft.table, redirects = redirects.len(), "nftables table replaced");
                self.applied = Some(ruleset);
                true
            }
            Err(e) => {
                warn!(table = %self.nft.table, error = %e, "cannot apply the nftables table; will retry");
                false
            }
        }
    }

    fn update(&mut self, key: &VipKey, vip: &VipFrontend) {
        let Some(running) = self.running.get_mut(key) else {
            return;
        };
        running.vips.clone_from(&vip.vips);
        running.config.send_if_modified(|current| {
            if **current == *vip.frontend {
                return false;
            }
            info!(leg = key.leg.as_str(), protocol = %key.protocol, service = %key.service,
                  endpoints = vip.frontend.targets.len(), was = current.targets.len(),
                  "endpoints changed");
            running
                .port
                .metrics
                .endpoints
                .set(i64::try_from(vip.frontend.targets.len()).unwrap_or(i64::MAX));
            *current = Arc::clone(&vip.frontend);
            true
        });
    }

    async fn open(&mut self, key: &VipKey, vip: &VipFrontend) -> bool {
        let s = &self.shared;
        if s.draining.is_cancelled() {
            return true;
        }
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let metrics = s
            .metrics
            .frontend(key.protocol, key.leg.as_str().to_string(), &key.service);
        metrics
            .endpoints
            .set(i64::try_from(vip.frontend.targets.len()).unwrap_or(i64::MAX));
        let (config, config_rx) = watch::channel(Arc::clone(&vip.frontend));
        let removed = CancellationToken::new();
        let life = Lifecycle {
            removed: removed.clone(),
            draining: s.draining.clone(),
            tracker: s.tracker.clone(),
        };
        let state = |local_port| {
            let frontend_key = FrontendKey {
                protocol: key.protocol,
                node_port: local_port,
            };
            PortState::new(
                frontend_key,
                metrics.clone(),
                s.timeouts,
                Arc::clone(&s.caps),
            )
        };
        let bound = match key.protocol {
            Protocol::Tcp => tcp::bind(any).and_then(|listener| {
                let local_port = listener.local_addr()?.port();
                let port = state(local_port);
                tokio::spawn(tcp::serve(listener, config_rx, Arc::clone(&port), life));
                Ok(port)
            }),
            Protocol::Udp => match udp::bind(any).await {
                Ok(socket) => socket.local_addr().map(|a| {
                    let port = state(a.port());
                    s.tracker
                        .spawn(udp::serve(socket, config_rx, Arc::clone(&port), life));
                    port
                }),
                Err(e) => Err(e),
            },
        };
        let port = match bound {
            Ok(port) => port,
            Err(e) => {
                warn!(leg = key.leg.as_str(), service = %key.service, error = %e,
                      "cannot bind a ClusterIP-leg listener; will retry");
                s.metrics.remove_port(&metrics);
                return false;
            }
        };
        let local_port = port.key.node_port;
        info!(leg = key.leg.as_str(), protocol = %key.protocol, service = %key.service,
              vips = ?vip.vips, local_port, endpoints = vip.frontend.targets.len(), "listening");
        self.running.insert(
            key.clone(),
            RunningVip {
                config,
                removed,
                port,
                local_port,
                vips: vip.vips.clone(),
            },
        );
        true
    }

    fn close(&mut self, key: &VipKey) {
        if let Some(running) = self.running.remove(key) {
            running.removed.cancel();
            self.shared.metrics.remove_port(&running.port.metrics);
            info!(leg = key.leg.as_str(), protocol = %key.protocol, service = %key.service, "closed");
        }
    }
}
