//! PURE: Services + EndpointSlices + this node's name → what the node proxy should serve: one
//! frontend per (protocol, nodePort) with the backends new flows may use, and one entry per
//! health-check nodePort. No I/O here, so the kube-proxy rules can be table-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::vips::{self, VipFrontend, VipKey};

/// The label an EndpointSlice carries to name its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that hands a Service to an alternative proxy (kube-proxy skips it); the
/// EndpointSlice controller copies it onto the Service's slices.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const DEFAULT_AFFINITY_SECONDS: u64 = 10_800;

/// Transport protocol of a frontend; SCTP is not proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// A TCP listener.
    Tcp,
    /// A UDP socket with a flow table.
    Udp,
}

impl Protocol {
    /// Kubernetes' spelling, as in `ServicePort.protocol` (`None` means TCP there).
    fn from_k8s(protocol: Option<&str>) -> Option<Protocol> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Lower-case name used in flags, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a frontend is keyed by: at most one socket per protocol and node port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port bound on the node (`ServicePort.nodePort`).
    pub node_port: u16,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol, self.node_port)
    }
}

/// The Service port a frontend serves: names for logs and metric labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// `ServicePort.name` (empty for a single unnamed port).
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One frontend's desired state. Listeners keep an `Arc` of the current one; an update swaps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Which Service port this is.
    pub service: ServicePortName,
    /// Backends new connections and flows may go to, sorted.
    pub targets: Vec<SocketAddr>,
    /// Every endpoint still serving (ready or terminating), sorted: UDP flows to anything else
    /// are forgotten, as kube-proxy clears conntrack entries of removed endpoints.
    pub serving: Vec<SocketAddr>,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub affinity: Option<Duration>,
    /// PROXY protocol on this frontend's connections (TCP only).
    pub proxy_protocol: ProxyProtocol,
}

/// PROXY protocol v2 around the node proxy: what arrives from the load balancer, what goes to
/// the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// The load balancer starts each connection with a v2 header (the target group has
    /// `proxy_protocol_v2.enabled`). Read only when `to_pod` is set; otherwise it passes
    /// through to the pod untouched, as with kube-proxy.
    pub from_load_balancer: bool,
    /// `cloudlb.io/proxy-protocol-to-pod: v2`: write a v2 header with the client's address to
    /// the pod before the payload.
    pub to_pod: bool,
}

/// A health-check nodePort (externalTrafficPolicy Local) and what it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Ready endpoints on this node (distinct address:port over the Service's ports).
    pub local_endpoints: usize,
}

/// Everything the node proxy serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Frontends by protocol and node port.
    pub frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    /// Health-check servers by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// The ClusterIP leg: frontends reached through the Services' clusterIPs and externalIPs.
    pub vips: BTreeMap<VipKey, VipFrontend>,
}

/// Settings that change what the table contains.
#[derive(Clone, Debug, Default)]
pub struct TableOptions {
    /// This node's name, compared with `Endpoint.nodeName` for externalTrafficPolicy Local.
    pub node_name: String,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are served
    /// (LoadBalancer and NodePort ones, whatever their class).
    pub service_proxy_name: String,
    /// Also serve Services without that label, as selected by the next three settings.
    pub serve_unlabelled: bool,
    /// Unlabelled LoadBalancer Services of this `spec.loadBalancerClass` are served.
    pub load_balancer_class: String,
    /// Unlabelled LoadBalancer Services without a class are served too.
    pub default_class: bool,
    /// Unlabelled Services of type NodePort are served too.
    pub nodeport_services: bool,
}

impl TableOptions {
    /// Whether `svc` (of type `kind`) is this proxy's to serve: labelled with its name, or,
    /// with `serve_unlabelled`, an unlabelled one of its class (or a NodePort one when allowed).
    /// A Service labelled for another proxy is never served.
    fn serves(&self, svc: &Service, kind: &str) -> bool {
        let label = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
        if let Some(name) = label {
            return *name == self.service_proxy_name && kind != "ExternalName";
        }
        if !self.serve_unlabelled {
            return false;
        }
        match kind {
            "LoadBalancer" => {
                let class = svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.load_balancer_class.as_deref());
                match class {
                    Some(class) => class == self.load_balancer_class,
                    None => self.default_class,
                }
            }
            "NodePort" => self.nodeport_services,
            _ => false,
        }
    }
}

/// One endpoint of one Service port, with its conditions read the way kube-proxy reads them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    pub(super) addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// Builds the table. Slices not labelled with a Service and ports that are neither TCP nor UDP
/// are skipped; node-port frontends need a nodePort, the ClusterIP leg a clusterIP or externalIP.
pub fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    opts: &TableOptions,
) -> Table {
    let slices_by_service = index_slices(slices);
    let mut table = Table::default();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !opts.serves(svc, kind) {
            continue;
        }
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let svc_slices = slices_by_service
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let local_ready = add_service(&mut table, svc, spec, svc_slices, opts);
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let hc_port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let (true, true, Some(port)) = (kind == "LoadBalancer", local_only, hc_port) {
            table.health_checks.insert(
                port,
                HealthCheck {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    local_endpoints: local_ready,
                },
            );
        }
    }
    table
}

/// Adds one served Service's frontends (node ports and the ClusterIP leg); returns its ready
/// endpoints on this node (distinct address:port over its ports), for its health check.
fn add_service(
    table: &mut Table,
    svc: &Service,
    spec: &ServiceSpec,
    svc_slices: &[&EndpointSlice],
    opts: &TableOptions,
) -> usize {
    let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = affinity(spec);
    let to_pod = proxy_protocol_to_pod(svc);
    // Only read when a header goes to the pod; parse errors are the controller's to report.
    let lb_options = to_pod
        .then(|| crate::annotations::parse(svc.metadata.annotations.as_ref()?).ok())
        .flatten();
    let vip_policy = vips::Policies::of(spec);
    let mut local_ready = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let candidates = candidates(port, svc_slices, &opts.node_name);
        local_ready.extend(
            candidates
                .iter()
                .filter(|c| c.local && c.ready)
                .map(|c| c.addr),
        );
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            continue;
        };
        let cluster_leg = Frontend {
            service: ServicePortName {
                namespace: svc.metadata.namespace.clone().unwrap_or_default(),
                name: svc.metadata.name.clone().unwrap_or_default(),
                port: port.name.clone().unwrap_or_default(),
            },
            targets: Vec::new(),
            serving: sorted(
                candidates
                    .iter()
                    .filter(|c| c.serving || c.ready)
                    .map(|c| c.addr),
            ),
            affinity,
            proxy_protocol: ProxyProtocol {
                from_load_balancer: false,
                to_pod,
            },
        };
        let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) else {
            vips::insert(
                &mut table.vips,
                &vip_policy,
                port,
                protocol,
                cluster_leg,
                &candidates,
            );
            continue;
        };
        let frontend = Frontend {
            targets: targets(&candidates, local_only),
            proxy_protocol: ProxyProtocol {
                from_load_balancer: lb_options
                    .as_ref()
                    .is_some_and(|o| crate::model::build::proxy_protocol_v2_enabled(o, port.port)),
                to_pod,
            },
            ..cluster_leg.clone()
        };
        vips::insert(
            &mut table.vips,
            &vip_policy,
            port,
            protocol,
            cluster_leg,
            &candidates,
        );
        if node_port != 0 {
            table.frontends.insert(
                FrontendKey {
                    protocol,
                    node_port,
                },
                Arc::new(frontend),
            );
        }
    }
    local_ready.len()
}

/// `sessionAffinity: ClientIP` with its timeout (Kubernetes' default when unset).
fn affinity(spec: &ServiceSpec) -> Option<Duration> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let secs = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(DEFAULT_AFFINITY_SECONDS);
        Duration::from_secs(secs)
    })
}

/// Whether the Service asks for a PROXY v2 header to its pods (any other value is refused by
/// the controller, and sends none).
fn proxy_protocol_to_pod(svc: &Service) -> bool {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::annotations::PROXY_PROTOCOL_TO_POD))
        .is_some_and(|v| v.trim() == "v2")
}

/// Slices grouped by (namespace, Service name), in name order so duplicates resolve the same
/// way every time.
fn index_slices(slices: &[Arc<EndpointSlice>]) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        by_service
            .entry((ns, svc.as_str()))
            .or_default()
            .push(slice);
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    by_service
}

/// Endpoints of one Service port: the slice port with the same name and protocol gives the
/// target port (so named targetPorts resolve per pod); the first address of an endpoint counts,
/// as in kube-proxy; duplicates across slices keep the first.
fn candidates(port: &ServicePort, slices: &[&EndpointSlice], node_name: &str) -> Vec<Candidate> {
    let want_name = port.name.as_deref().unwrap_or_default();
    let want_protocol = port.protocol.as_deref().unwrap_or("TCP");
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(target_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == want_name
                    && p.protocol.as_deref().unwrap_or("TCP") == want_protocol
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let addr = SocketAddr::new(ip, target_port);
            if !seen.insert(addr) {
                continue;
            }
            let cond = ep.conditions.as_ref();
            out.push(Candidate {
                addr,
                // The API says an unset ready or serving reads as true, unset terminating false.
                ready: cond.and_then(|c| c.ready).unwrap_or(true),
                serving: cond.and_then(|c| c.serving).unwrap_or(true),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                local: ep.node_name.as_deref() == Some(node_name),
            });
        }
    }
    out
}

/// kube-proxy's choice: ready endpoints (on this node only, for policy Local); when there are
/// none, serving-and-terminating ones, so a rollout's last pods still get traffic.
pub(super) fn targets(candidates: &[Candidate], local_only: bool) -> Vec<SocketAddr> {
    let pool = || candidates.iter().filter(|c| !local_only || c.local);
    let ready = sorted(pool().filter(|c| c.ready).map(|c| c.addr));
    if !ready.is_empty() {
        return ready;
    }
    sorted(
        pool()
            .filter(|c| c.serving && c.terminating)
            .map(|c| c.addr),
    )
}

fn sorted(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = addrs.collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
