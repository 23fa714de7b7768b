//! Prometheus metrics of the node proxy, per Service port. Hot paths hold cloned handles
//! ([`PortMetrics`]) and update atomics in place; label lookups happen once per frontend.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

use super::table::{FrontendKey, Protocol, ServicePortName};

/// Labels that identify one Service port's frontend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    namespace: String,
    service: String,
    port: String,
    protocol: String,
    node_port: String,
}

/// Direction of a byte count.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend.
    In,
    /// Backend → client.
    Out,
}

/// Why a connection or datagram failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    /// No endpoint to send to: TCP reset at once, UDP dropped.
    NoEndpoints,
    /// The backend could not be reached.
    Connect,
    /// A socket error after the flow was set up (or on accept).
    Io,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Reason::NoEndpoints => "no_endpoints",
            Reason::Connect => "connect",
            Reason::Io => "io",
        })
    }
}

/// A cap of the proxy (see `limits`), as the `limit` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Limit {
    UdpFlows,
    UdpFlowsPerSource,
    TcpConnections,
    TcpConnectionsPerSource,
    TcpIdle,
    AffinityClients,
    HttpConnections,
    HttpHeaderTimeout,
}

/// What a cap did, as the `action` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    /// A new connection or flow was turned away.
    Refused,
    /// An old one was closed to make room for a new one.
    Evicted,
    /// One was closed because it stayed idle or too slow.
    Closed,
}

impl EncodeLabelValue for Limit {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Limit::UdpFlows => "udp_flows",
            Limit::UdpFlowsPerSource => "udp_flows_per_source",
            Limit::TcpConnections => "tcp_connections",
            Limit::TcpConnectionsPerSource => "tcp_connections_per_source",
            Limit::TcpIdle => "tcp_idle",
            Limit::AffinityClients => "affinity_clients",
            Limit::HttpConnections => "http_connections",
            Limit::HttpHeaderTimeout => "http_header_timeout",
        })
    }
}

impl EncodeLabelValue for Action {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Action::Refused => "refused",
            Action::Evicted => "evicted",
            Action::Closed => "closed",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Limit,
    action: Action,
}

/// Counters of what each cap refused, evicted or closed (process-wide, not per port).
#[derive(Clone, Debug)]
pub struct LimitCounters {
    /// New UDP flows dropped: the flow budget is spent and their port has no flow to evict.
    pub udp_refused: Counter,
    /// UDP flows evicted (the port's idlest) to stay within the flow budget.
    pub udp_evicted: Counter,
    /// UDP flows evicted (the client's idlest) to stay within the per-source cap.
    pub udp_source_evicted: Counter,
    /// TCP connections reset at accept: too many open.
    pub tcp_refused: Counter,
    /// TCP connections reset at accept: too many open from that client IP.
    pub tcp_source_refused: Counter,
    /// TCP connections closed for being idle.
    pub tcp_idle_closed: Counter,
    /// Session-affinity entries forgotten to stay within the per-port cap.
    pub affinity_evicted: Counter,
    /// HTTP connections closed (the server's oldest) to make room for a new one.
    pub http_evicted: Counter,
    /// HTTP connections closed for not sending their request headers in time.
    pub http_header_timeout: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    reason: Reason,
}

/// The node proxy's metric families and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    active: Family<PortLabels, Gauge>,
    connections: Family<PortLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    endpoints: Family<PortLabels, Gauge>,
    table_updates: Counter,
    limited: Family<LimitLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cloudlb_proxy");
        let m = Metrics {
            active: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            endpoints: Family::default(),
            table_updates: Counter::default(),
            limited: Family::default(),
            registry: Arc::default(),
        };
        registry.register(
            "connections_active",
            "Open TCP connections and live UDP flows",
            m.active.clone(),
        );
        registry.register(
            "connections",
            "TCP connections and UDP flows set up to a backend",
            m.connections.clone(),
        );
        registry.register(
            "bytes",
            "Bytes forwarded (in: client to backend, out: backend to client)",
            m.bytes.clone(),
        );
        registry.register(
            "errors",
            "Failed connections and datagrams by reason",
            m.errors.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints new connections may go to",
            m.endpoints.clone(),
        );
        registry.register(
            "table_updates",
            "Changes of the proxy table applied",
            m.table_updates.clone(),
        );
        registry.register(
            "limited",
            "Connections, flows and requests refused, evicted or closed by a cap of the proxy",
            m.limited.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }
}

impl Metrics {
    /// Handles for one frontend, created (at zero) on first use.
    pub fn port(&self, key: FrontendKey, svc: &ServicePortName) -> PortMetrics {
        self.frontend(key.protocol, key.node_port.to_string(), svc)
    }

    /// Handles for a frontend whose `node_port` label is `node_port` (a number, or
    /// `cluster-ip` / `external-ip` on the ClusterIP leg).
    pub fn frontend(
        &self,
        protocol: Protocol,
        node_port: String,
        svc: &ServicePortName,
    ) -> PortMetrics {
        let labels = PortLabels {
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            port: svc.port.clone(),
            protocol: protocol.as_str().to_string(),
            node_port,
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    port: labels.clone(),
                    direction,
                })
                .clone()
        };
        let errors = |reason| {
            self.errors
                .get_or_create(&ErrorLabels {
                    port: labels.clone(),
                    reason,
                })
                .clone()
        };
        PortMetrics {
            active: self.active.get_or_create(&labels).clone(),
            connections: self.connections.get_or_create(&labels).clone(),
            bytes_in: bytes(Direction::In),
            bytes_out: bytes(Direction::Out),
            no_endpoints: errors(Reason::NoEndpoints),
            connect_errors: errors(Reason::Connect),
            io_errors: errors(Reason::Io),
            endpoints: self.endpoints.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Drops a removed frontend's series so /metrics does not list Services long gone.
    pub fn remove_port(&self, port: &PortMetrics) {
        let labels = &port.labels;
        self.active.remove(labels);
        self.connections.remove(labels);
        self.endpoints.remove(labels);
        for direction in [Direction::In, Direction::Out] {
            self.bytes.remove(&BytesLabels {
                port: labels.clone(),
                direction,
            });
        }
        for reason in [Reason::NoEndpoints, Reason::Connect, Reason::Io] {
            self.errors.remove(&ErrorLabels {
                port: labels.clone(),
                reason,
            });
        }
    }

    /// Handles of the caps' counters (every series exists from the start, at zero).
    pub fn limits(&self) -> LimitCounters {
        let c = |limit, action| {
            self.limited
                .get_or_create(&LimitLabels { limit, action })
                .clone()
        };
        LimitCounters {
            udp_refused: c(Limit::UdpFlows, Action::Refused),
            udp_evicted: c(Limit::UdpFlows, Action::Evicted),
            udp_source_evicted: c(Limit::UdpFlowsPerSource, Action::Evicted),
            tcp_refused: c(Limit::TcpConnections, Action::Refused),
            tcp_source_refused: c(Limit::TcpConnectionsPerSource, Action::Refused),
            tcp_idle_closed: c(Limit::TcpIdle, Action::Closed),
            affinity_evicted: c(Limit::AffinityClients, Action::Evicted),
            http_evicted: c(Limit::HttpConnections, Action::Evicted),
            http_header_timeout: c(Limit::HttpHeaderTimeout, Action::Closed),
        }
    }

    /// Counts one applied table change.
    pub fn table_updated(&self) {
        self.table_updates.inc();
    }

    /// The registry `/metrics` serves.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The text exposition format for `/metrics`.
    #[cfg(test)]
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// One frontend's metric handles: cheap clones of atomics, updated without lookups.
#[derive(Clone, Debug)]
pub struct PortMetrics {
    labels: PortLabels,
    /// Open connections / live flows.
    pub active: Gauge,
    /// Connections / flows set up.
    pub connections: Counter,
    /// Bytes client → backend.
    pub bytes_in: Counter,
    /// Bytes backend → client.
    pub bytes_out: Counter,
    /// Refused for lack of endpoints.
    pub no_endpoints: Counter,
    /// Backend unreachable.
    pub connect_errors: Counter,
    /// Other socket errors.
    pub io_errors: Counter,
    /// Current eligible endpoint count.
    pub endpoints: Gauge,
}

/// Keeps the active gauge right however a connection task ends (including being dropped).
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl ActiveGuard {
    /// Counts one more active connection until dropped.
    pub fn new(active: &Gauge) -> ActiveGuard {
        active.inc();
        ActiveGuard(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::table::Protocol;

    #[test]
    fn per_port_series_appear_and_go() {
        let m = Metrics::default();
        let key = FrontendKey {
            protocol: Protocol::Tcp,
            node_port: 30080,
        };
        let svc = ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: "http".into(),
        };
        let p = m.port(key, &svc);
        p.connections.inc();
        p.bytes_in.inc_by(10);
        {
            let _g = ActiveGuard::new(&p.active);
            assert_eq!(p.active.get(), 1);
        }
        assert_eq!(p.active.get(), 0);
        let text = m.encode().unwrap();
        let labels = r#"namespace="ns",service="web",port="http",protocol="tcp",node_port="30080""#;
        for line in [
            format!("cloudlb_proxy_connections_total{{{labels}}} 1"),
            format!("cloudlb_proxy_bytes_total{{{labels},direction=\"in\"}} 10"),
            format!("cloudlb_proxy_errors_total{{{labels},reason=\"no_endpoints\"}} 0"),
            format!("cloudlb_proxy_connections_active{{{labels}}} 0"),
        ] {
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        m.remove_port(&p);
        assert!(!m.encode().unwrap().contains("30080"));
    }
}
