//! PURE: Services + EndpointSlices + this node's name → what the node proxy should serve: one
//! frontend per (protocol, nodePort) with the backends new flows may use, and one entry per
//! health-check nodePort. No I/O here, so the kube-proxy rules can be table-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort};
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

/// Builds the table. Slices not labelled with a Service, Services without node ports, and ports
/// that are neither TCP nor UDP are skipped.
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
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS);
            Duration::from_secs(secs)
        });
        let svc_slices = slices_by_service
            .get(&(namespace.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut local_ready = BTreeSet::new();
        let to_pod = proxy_protocol_to_pod(svc);
        // Only read when a header goes to the pod; parse errors are the controller's to report.
        let lb_options = to_pod
            .then(|| crate::annotations::parse(svc.metadata.annotations.as_ref()?).ok())
            .flatten();
        let vip_policy = vips::Policies::of(spec);
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
            let service = ServicePortName {
                namespace: namespace.clone(),
                name: name.clone(),
                port: port.name.clone().unwrap_or_default(),
            };
            let proxy_protocol = ProxyProtocol {
                from_load_balancer: lb_options.as_ref().is_some_and(|o| {
                    crate::model::build::proxy_protocol_v2_enabled(o, port.port)
                }),
                to_pod,
            };
            let serving = sorted(
                candidates
                    .iter()
                    .filter(|c| c.serving || c.ready)
                    .map(|c| c.addr),
            );
            vips::insert(
                &mut table.vips,
                &vip_policy,
                port,
                protocol,
                Frontend {
                    service: service.clone(),
                    targets: Vec::new(),
                    serving: serving.clone(),
                    affinity,
                    proxy_protocol: ProxyProtocol {
                        from_load_balancer: false,
                        to_pod,
                    },
                },
                &candidates,
            );
            let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            if node_port == 0 {
                continue;
            }
            let frontend = Frontend {
                service,
                targets: targets(&candidates, local_only),
                serving,
                affinity,
                proxy_protocol,
            };
            table.frontends.insert(
                FrontendKey {
                    protocol,
                    node_port,
                },
                Arc::new(frontend),
            );
        }
        let hc_port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let (true, true, Some(port)) = (kind == "LoadBalancer", local_only, hc_port) {
            table.health_checks.insert(
                port,
                HealthCheck {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    local_endpoints: local_ready.len(),
                },
            );
        }
    }
    table
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
mod tests {
    use super::*;
    use serde_json::json;

    const NODE: &str = "node-a";

    /// A Service labelled for this proxy (`cloudlb`).
    fn svc(name: &str, spec: serde_json::Value) -> Arc<Service> {
        svc_labelled(name, Some("cloudlb"), spec)
    }

    fn svc_labelled(name: &str, proxy: Option<&str>, spec: serde_json::Value) -> Arc<Service> {
        let labels = match proxy {
            Some(p) => json!({SERVICE_PROXY_NAME_LABEL: p}),
            None => json!({}),
        };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": name, "labels": labels},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn lb(ports: serde_json::Value) -> serde_json::Value {
        json!({"type": "LoadBalancer", "ports": ports})
    }

    /// An endpoint: (ip, node, ready, serving, terminating); `None` leaves a condition unset.
    type Ep<'a> = (&'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(
        name: &str,
        service: &str,
        ports: serde_json::Value,
        endpoints: &[Ep<'_>],
    ) -> Arc<EndpointSlice> {
        let eps: Vec<_> = endpoints
            .iter()
            .map(|(ip, node, ready, serving, terminating)| {
                json!({"addresses": [ip], "nodeName": node, "conditions": {
                    "ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": name,
                             "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": eps,
            }))
            .unwrap(),
        )
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tcp(port: u16) -> FrontendKey {
        FrontendKey {
            protocol: Protocol::Tcp,
            node_port: port,
        }
    }

    fn opts() -> TableOptions {
        TableOptions {
            node_name: NODE.into(),
            service_proxy_name: "cloudlb".into(),
            load_balancer_class: "cloudlb.io/nlb".into(),
            ..TableOptions::default()
        }
    }

    const READY: (Option<bool>, Option<bool>, Option<bool>) = (Some(true), Some(true), Some(false));
    const TERMINATING: (Option<bool>, Option<bool>, Option<bool>) =
        (Some(false), Some(true), Some(true));
    const NOT_READY: (Option<bool>, Option<bool>, Option<bool>) =
        (Some(false), Some(false), Some(false));
    const UNSET: (Option<bool>, Option<bool>, Option<bool>) = (None, None, None);

    fn ep<'a>(ip: &'a str, node: &'a str, c: (Option<bool>, Option<bool>, Option<bool>)) -> Ep<'a> {
        (ip, node, c.0, c.1, c.2)
    }

    #[test]
    fn endpoint_conditions_choose_targets_like_kube_proxy() {
        struct Case {
            what: &'static str,
            local: bool,
            endpoints: Vec<Ep<'static>>,
            targets: Vec<&'static str>,
        }
        let cases = [
            Case {
                what: "ready ones only",
                local: false,
                endpoints: vec![
                    ep("10.0.0.1", NODE, READY),
                    ep("10.0.0.2", "b", NOT_READY),
                    ep("10.0.0.3", "b", TERMINATING),
                ],
                targets: vec!["10.0.0.1:8080"],
            },
            Case {
                what: "unset conditions read as ready",
                local: false,
                endpoints: vec![ep("10.0.0.1", "b", UNSET)],
                targets: vec!["10.0.0.1:8080"],
            },
            Case {
                what: "serving+terminating only when nothing is ready",
                local: false,
                endpoints: vec![
                    ep("10.0.0.2", "b", NOT_READY),
                    ep("10.0.0.3", "b", TERMINATING),
                ],
                targets: vec!["10.0.0.3:8080"],
            },
            Case {
                what: "nothing serving: no targets",
                local: false,
                endpoints: vec![ep("10.0.0.2", "b", NOT_READY)],
                targets: vec![],
            },
            Case {
                what: "Local: remote ready endpoints never used",
                local: true,
                endpoints: vec![ep("10.0.0.1", NODE, READY), ep("10.0.0.2", "b", READY)],
                targets: vec!["10.0.0.1:8080"],
            },
            Case {
                what: "Local: no local endpoint means no target, even with remote ready",
                local: true,
                endpoints: vec![ep("10.0.0.2", "b", READY)],
                targets: vec![],
            },
            Case {
                what: "Local: local terminating used when no local is ready",
                local: true,
                endpoints: vec![
                    ep("10.0.0.1", NODE, TERMINATING),
                    ep("10.0.0.2", "b", READY),
                ],
                targets: vec!["10.0.0.1:8080"],
            },
        ];
        for case in cases {
            let mut spec = lb(json!([{"port": 80, "nodePort": 30080, "targetPort": 8080}]));
            if case.local {
                spec["externalTrafficPolicy"] = "Local".into();
            }
            let services = [svc("web", spec)];
            let slices = [slice(
                "web-1",
                "web",
                json!([{"port": 8080}]),
                &case.endpoints,
            )];
            let table = build(&services, &slices, &opts());
            let fe = &table.frontends[&tcp(30080)];
            let want: Vec<_> = case.targets.iter().map(|s| a(s)).collect();
            assert_eq!(fe.targets, want, "{}", case.what);
        }
    }

    #[test]
    fn named_target_ports_resolve_per_slice_and_protocols_stay_apart() {
        let services = [svc(
            "dns",
            lb(json!([
                {"name": "dns-udp", "protocol": "UDP", "port": 53, "nodePort": 30053, "targetPort": "dns"},
                {"name": "dns-tcp", "protocol": "TCP", "port": 53, "nodePort": 30053, "targetPort": "dns"},
            ])),
        )];
        // Two slices (two pod templates) resolve the named port to different numbers.
        let slices = [
            slice(
                "dns-1",
                "dns",
                json!([{"name": "dns-udp", "protocol": "UDP", "port": 5353},
                       {"name": "dns-tcp", "protocol": "TCP", "port": 5354}]),
                &[ep("10.0.0.1", NODE, READY)],
            ),
            slice(
                "dns-2",
                "dns",
                json!([{"name": "dns-udp", "protocol": "UDP", "port": 1053},
                       {"name": "dns-tcp", "protocol": "TCP", "port": 1054}]),
                &[ep("10.0.0.2", NODE, READY)],
            ),
        ];
        let table = build(&services, &slices, &opts());
        let udp = FrontendKey {
            protocol: Protocol::Udp,
            node_port: 30053,
        };
        assert_eq!(
            table.frontends[&udp].targets,
            vec![a("10.0.0.1:5353"), a("10.0.0.2:1053")]
        );
        assert_eq!(
            table.frontends[&tcp(30053)].targets,
            vec![a("10.0.0.1:5354"), a("10.0.0.2:1054")]
        );
        assert_eq!(table.frontends[&udp].service.port, "dns-udp");
    }

    #[test]
    fn service_types_and_ports_that_get_a_frontend() {
        struct Case {
            what: &'static str,
            spec: serde_json::Value,
            ports: Vec<FrontendKey>,
        }
        let p = json!([{"port": 80, "nodePort": 30080}]);
        let cases = [
            Case {
                what: "LoadBalancer",
                spec: lb(p.clone()),
                ports: vec![tcp(30080)],
            },
            Case {
                what: "NodePort (labelled: this proxy implements the whole Service)",
                spec: json!({"type": "NodePort", "ports": p.clone()}),
                ports: vec![tcp(30080)],
            },
            Case {
                what: "ClusterIP never",
                spec: json!({"type": "ClusterIP", "ports": [{"port": 80}]}),
                ports: vec![],
            },
            Case {
                what: "no nodePort allocated (allocateLoadBalancerNodePorts false)",
                spec: lb(json!([{"port": 80}])),
                ports: vec![],
            },
            Case {
                what: "SCTP skipped",
                spec: lb(json!([{"port": 80, "nodePort": 30080, "protocol": "SCTP"},
                                {"name": "b", "port": 81, "nodePort": 30081}])),
                ports: vec![tcp(30081)],
            },
        ];
        for case in cases {
            let services = [svc("s", case.spec)];
            let table = build(&services, &[], &opts());
            let got: Vec<_> = table.frontends.keys().copied().collect();
            assert_eq!(got, case.ports, "{}", case.what);
        }
    }

    #[test]
    fn only_services_for_this_proxy_are_served() {
        struct Case {
            what: &'static str,
            label: Option<&'static str>,
            spec: serde_json::Value,
            /// serve_unlabelled, default_class, nodeport_services
            flags: (bool, bool, bool),
            served: bool,
        }
        let p = json!([{"port": 80, "nodePort": 30080}]);
        let lb_class = |class: &str| json!({"type": "LoadBalancer", "loadBalancerClass": class, "ports": p.clone()});
        let nodeport = json!({"type": "NodePort", "ports": p.clone()});
        let none = (false, false, false);
        let all = (true, true, true);
        let cases = [
            Case {
                what: "labelled for this proxy",
                label: Some("cloudlb"),
                spec: lb(p.clone()),
                flags: none,
                served: true,
            },
            Case {
                what: "labelled, any class",
                label: Some("cloudlb"),
                spec: lb_class("other.io/lb"),
                flags: none,
                served: true,
            },
            Case {
                what: "labelled for another proxy",
                label: Some("cilium"),
                spec: lb(p.clone()),
                flags: all,
                served: false,
            },
            Case {
                what: "labelled for another proxy, our class",
                label: Some("cilium"),
                spec: lb_class("cloudlb.io/nlb"),
                flags: all,
                served: false,
            },
            Case {
                what: "unlabelled: kube-proxy's by default",
                label: None,
                spec: lb_class("cloudlb.io/nlb"),
                flags: none,
                served: false,
            },
            Case {
                what: "unlabelled, our class, --serve-unlabelled",
                label: None,
                spec: lb_class("cloudlb.io/nlb"),
                flags: (true, false, false),
                served: true,
            },
            Case {
                what: "unlabelled, another class",
                label: None,
                spec: lb_class("other.io/lb"),
                flags: all,
                served: false,
            },
            Case {
                what: "unlabelled, class-less, no --default-class",
                label: None,
                spec: lb(p.clone()),
                flags: (true, false, true),
                served: false,
            },
            Case {
                what: "unlabelled, class-less, --default-class",
                label: None,
                spec: lb(p.clone()),
                flags: (true, true, false),
                served: true,
            },
            Case {
                what: "unlabelled NodePort without --nodeport-services",
                label: None,
                spec: nodeport.clone(),
                flags: (true, true, false),
                served: false,
            },
            Case {
                what: "unlabelled NodePort with --nodeport-services",
                label: None,
                spec: nodeport.clone(),
                flags: (true, false, true),
                served: true,
            },
            Case {
                what: "--nodeport-services alone does not serve unlabelled",
                label: None,
                spec: nodeport.clone(),
                flags: (false, false, true),
                served: false,
            },
        ];
        for case in cases {
            let (serve_unlabelled, default_class, nodeport_services) = case.flags;
            let o = TableOptions {
                serve_unlabelled,
                default_class,
                nodeport_services,
                ..opts()
            };
            let services = [svc_labelled("s", case.label, case.spec)];
            let table = build(&services, &[], &o);
            assert_eq!(!table.frontends.is_empty(), case.served, "{}", case.what);
        }
    }

    #[test]
    fn health_check_counts_local_ready_endpoints_of_local_services() {
        struct Case {
            what: &'static str,
            policy: &'static str,
            endpoints: Vec<Ep<'static>>,
            want: Option<usize>,
        }
        let cases = [
            Case {
                what: "two local ready, remote and terminating not counted",
                policy: "Local",
                endpoints: vec![
                    ep("10.0.0.1", NODE, READY),
                    ep("10.0.0.2", NODE, READY),
                    ep("10.0.0.3", "b", READY),
                    ep("10.0.0.4", NODE, TERMINATING),
                ],
                want: Some(2),
            },
            Case {
                what: "none local",
                policy: "Local",
                endpoints: vec![ep("10.0.0.3", "b", READY)],
                want: Some(0),
            },
            Case {
                what: "policy Cluster has no health check server",
                policy: "Cluster",
                endpoints: vec![ep("10.0.0.1", NODE, READY)],
                want: None,
            },
        ];
        for case in cases {
            let mut spec = lb(json!([{"port": 80, "nodePort": 30080, "targetPort": 8080}]));
            spec["externalTrafficPolicy"] = case.policy.into();
            spec["healthCheckNodePort"] = 32000.into();
            let services = [svc("web", spec)];
            let slices = [slice("w", "web", json!([{"port": 8080}]), &case.endpoints)];
            let table = build(&services, &slices, &opts());
            let got = table.health_checks.get(&32000).map(|h| h.local_endpoints);
            assert_eq!(got, case.want, "{}", case.what);
            if let Some(hc) = table.health_checks.get(&32000) {
                assert_eq!((hc.namespace.as_str(), hc.name.as_str()), ("ns", "web"));
            }
        }
    }

    #[test]
    fn affinity_serving_set_and_unrelated_slices() {
        let mut spec = lb(json!([{"port": 80, "nodePort": 30080}]));
        spec["sessionAffinity"] = "ClientIP".into();
        let mut spec2 = lb(json!([{"port": 80, "nodePort": 30081}]));
        spec2["sessionAffinity"] = "ClientIP".into();
        spec2["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
        let services = [svc("a", spec), svc("b", spec2)];
        let slices = [
            slice(
                "a-1",
                "a",
                json!([{"port": 8080}]),
                &[
                    ep("10.0.0.1", "b", READY),
                    ep("10.0.0.2", "b", TERMINATING),
                    ep("10.0.0.3", "b", NOT_READY),
                ],
            ),
            // A slice of another namespace with the same Service name does not leak in.
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"namespace": "other", "name": "x",
                                 "labels": {SERVICE_NAME_LABEL: "b"}},
                    "addressType": "IPv4", "ports": [{"port": 1}],
                    "endpoints": [{"addresses": ["10.9.9.9"]}],
                }))
                .unwrap(),
            ),
        ];
        let table = build(&services, &slices, &opts());
        let fa = &table.frontends[&tcp(30080)];
        assert_eq!(fa.affinity, Some(Duration::from_secs(10_800)));
        assert_eq!(fa.targets, vec![a("10.0.0.1:8080")]);
        assert_eq!(fa.serving, vec![a("10.0.0.1:8080"), a("10.0.0.2:8080")]);
        let fb = &table.frontends[&tcp(30081)];
        assert_eq!(fb.affinity, Some(Duration::from_secs(60)));
        assert!(fb.targets.is_empty());
    }
}
