//! What TCP and UDP frontends share: per-port state that outlives endpoint updates, and the
//! signals that end a frontend.

use std::sync::Arc;
use std::time::Duration;

use super::tracker::Tracker;
use tokio_util::sync::CancellationToken;

use super::balance::Balancer;
use super::limits::{Budget, TcpLimits};
use super::metrics::{LimitCounters, PortMetrics};
use super::table::FrontendKey;

/// State of one frontend for its whole life (endpoint sets come and go through a watch channel).
#[derive(Debug)]
pub struct PortState {
    /// Protocol and node port, for logs.
    pub key: FrontendKey,
    /// Round robin position and affinity table.
    pub balancer: Balancer,
    /// Metric handles.
    pub metrics: PortMetrics,
    /// How long a TCP connect to a backend may take.
    pub connect_timeout: Duration,
    /// How long a UDP flow lives without a datagram either way.
    pub udp_idle_timeout: Duration,
    /// The process-wide caps.
    pub caps: Arc<Caps>,
}

impl PortState {
    /// State for a new frontend.
    pub fn new(
        key: FrontendKey,
        metrics: PortMetrics,
        timeouts: Timeouts,
        caps: Arc<Caps>,
    ) -> Arc<PortState> {
        Arc::new(PortState {
            key,
            balancer: Balancer::new(
                caps.affinity_max_clients,
                caps.counters.affinity_evicted.clone(),
            ),
            metrics,
            connect_timeout: timeouts.connect,
            udp_idle_timeout: timeouts.udp_idle,
            caps,
        })
    }
}

/// Caps from the command line, shared by every frontend (see `limits`).
#[derive(Debug)]
pub struct Caps {
    /// Open TCP connections, overall and per client IP.
    pub tcp: Arc<TcpLimits>,
    /// Live UDP flows over all node ports.
    pub udp_flows: Arc<Budget>,
    /// Live UDP flows per client IP and node port (0 = no limit).
    pub udp_flows_per_source: usize,
    /// Idle TCP connections are closed after this long (`None` = never).
    pub tcp_idle: Option<Duration>,
    /// Clients remembered per node port for session affinity.
    pub affinity_max_clients: usize,
    /// What the caps refused, evicted and closed.
    pub counters: LimitCounters,
}

/// Timeouts from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Backend TCP connect timeout.
    pub connect: Duration,
    /// UDP flow idle timeout.
    pub udp_idle: Duration,
}

/// How a frontend ends: `removed` (its Service port is gone: close the socket now) or
/// `draining` (the proxy shuts down: take nothing new, let flows finish). Flows and connections
/// run on `tracker`, so shutdown can wait for them.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// Cancelled when the frontend leaves the table.
    pub removed: CancellationToken,
    /// Cancelled when the proxy stops accepting.
    pub draining: CancellationToken,
    /// Tracks connection and flow tasks.
    pub tracker: Tracker,
}
