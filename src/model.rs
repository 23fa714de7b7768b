//! The desired load balancer of one Service: a pure function of the Service, the eligible nodes
//! (or ready pod endpoints), the parsed annotations and the cluster. No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

use crate::annotations::{
    HealthCheckPort, HealthCheckProtocol, IpAddressType, LoadBalancerOptions, PortRef, Scheme,
    TargetType,
};

/// Tag keys on every AWS resource cloudlb makes; discovery and ownership go by these.
pub mod tags {
    /// The cluster that owns the resource. Nothing without our value here is ever changed.
    pub const CLUSTER: &str = "cloudlb.io/cluster";
    /// `namespace/name` of the owning Service.
    pub const SERVICE: &str = "cloudlb.io/service";
    /// The owning Service's UID (tells a re-created Service of the same name apart).
    pub const SERVICE_UID: &str = "cloudlb.io/service-uid";
    /// The Service port a target group or listener serves (e.g. `tcp-80`).
    pub const PORT: &str = "cloudlb.io/port";
    /// `loadbalancer`, `targetgroup` or `listener`.
    pub const RESOURCE: &str = "cloudlb.io/resource";
}

/// Listener and target-group protocols an NLB offers for Service ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
    Tls,
}

impl Protocol {
    pub fn as_aws(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::TcpUdp => "TCP_UDP",
            Protocol::Tls => "TLS",
        }
    }

    pub fn from_aws(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "TCP_UDP" => Protocol::TcpUdp,
            "TLS" => Protocol::Tls,
            _ => return None,
        })
    }
}

/// One registered target: an instance id or an IP, at a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub id: String,
    pub port: i32,
}

/// Target-group health check, fully resolved (no defaults left to AWS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub protocol: HealthCheckProtocol,
    /// `traffic-port` or a port number, as ELBv2 spells it.
    pub port: String,
    pub path: Option<String>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    /// HTTP success codes (HTTP/HTTPS checks only).
    pub success_codes: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetGroupSpec {
    /// The Service port this group serves, e.g. `tcp-80`; stable across renames.
    pub port_key: String,
    /// Deterministic name; it changes exactly when an immutable property changes.
    pub name: String,
    pub protocol: Protocol,
    pub port: i32,
    pub target_type: TargetType,
    pub health_check: HealthCheckSpec,
    pub attributes: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub targets: BTreeSet<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    pub port: i32,
    pub protocol: Protocol,
    /// Name of the target group (in the same desired model) it forwards to.
    pub target_group: String,
    pub certificates: Vec<String>,
    pub tags: BTreeMap<String, String>,
}

/// One ingress rule of the managed security group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IngressRule {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: i32,
    pub cidr: String,
}

/// The security group cloudlb manages for a load balancer (unless the security-groups
/// annotation names the groups to use): ingress on every listener port from
/// `spec.loadBalancerSourceRanges` (everywhere when empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroupSpec {
    pub name: String,
    pub ingress: BTreeSet<IngressRule>,
    pub tags: BTreeMap<String, String>,
}

/// Everything one Service should have in the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredLoadBalancer {
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    /// Subnet ids or Name tags from the annotation; `None` means discover by tags.
    pub subnets: Option<Vec<String>>,
    /// Security groups named by the annotation (then no managed group).
    pub security_groups: Option<Vec<String>>,
    /// The managed security group, when the annotation names none.
    pub managed_security_group: Option<SecurityGroupSpec>,
    pub attributes: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub listeners: Vec<ListenerSpec>,
    pub target_groups: Vec<TargetGroupSpec>,
}

/// A node that may receive traffic, with the EC2 instance behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTarget {
    pub name: String,
    pub instance_id: String,
}

/// Why a Service cannot be modelled (shown as a Warning Event; nothing is changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("service has no ports")]
    NoPorts,
    #[error("port {port}/{protocol} has no nodePort yet")]
    NoNodePort { port: i32, protocol: String },
    #[error("protocol {0} is not supported by a Network Load Balancer")]
    UnsupportedProtocol(String),
    #[error(
        "port {0} is used by TCP and UDP with different nodePorts; a TCP_UDP target group needs one"
    )]
    MixedNodePorts(i32),
    #[error("externalTrafficPolicy Local needs spec.healthCheckNodePort")]
    NoHealthCheckNodePort,
    #[error("ssl-ports names port {0:?}, which the service does not have")]
    UnknownSslPort(String),
    #[error("service has no metadata.{0}")]
    Incomplete(&'static str),
}

/// Settings that come from the controller, not the Service.
#[derive(Clone, Debug)]
pub struct ClusterContext {
    pub cluster_name: String,
    /// When cloudlb's node proxy serves the NodePorts: its admin port, whose `/readyz` turns
    /// 503 as soon as the proxy starts shutting down. externalTrafficPolicy Cluster target
    /// groups then health-check it (HTTP) instead of the traffic port, so a node leaves the
    /// load balancer before its proxy stops accepting.
    pub node_proxy_health_port: Option<u16>,
}

/// Nodes that should receive traffic: Ready (unless `include_not_ready`), not excluded by label,
/// not being removed by an autoscaler, matching `selector`, and with an EC2 instance id.
pub fn eligible_nodes(
    nodes: &[Node],
    selector: &BTreeMap<String, String>,
    include_not_ready: bool,
) -> Vec<NodeTarget> {
    let mut out: Vec<NodeTarget> = nodes
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            let labels = n.metadata.labels.as_ref();
            let has = |k: &str| labels.is_some_and(|l| l.contains_key(k));
            !has("node.kubernetes.io/exclude-from-external-load-balancers")
                && selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|n| {
            let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref());
            !taints.is_some_and(|ts| {
                ts.iter().any(|t| {
                    t.key == "ToBeDeletedByClusterAutoscaler"
                        || t.key == "karpenter.sh/disrupted"
                        || t.key == "karpenter.sh/disruption"
                })
            })
        })
        .filter(|n| include_not_ready || node_ready(n))
        .filter_map(|n| {
            let provider = n.spec.as_ref()?.provider_id.as_deref()?;
            Some(NodeTarget {
                name: n.metadata.name.clone()?,
                instance_id: instance_id_from_provider_id(provider)?.to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether the node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `aws:///us-east-1a/i-0abc` → `i-0abc`.
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    id.starts_with("i-").then_some(id)
}

/// Ready pod addresses and their port, per Service port name (for `ip` targets).
pub fn endpoint_targets(slices: &[EndpointSlice], port_name: &str) -> BTreeSet<Target> {
    let mut out = BTreeSet::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                for a in &e.addresses {
                    out.insert(Target {
                        id: a.clone(),
                        port,
                    });
                }
            }
        }
    }
    out
}

/// Lower-case hex SHA-256 of the parts joined by `/`, cut to `len` characters.
fn short_hash(parts: &[&str], len: usize) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"/");
        }
        h.update(p.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..len].to_string()
}

/// `k8s-<ns:8>-<name:8>-<hash:10>`: readable, unique per hash input, ≤ 32 characters.
fn aws_name(namespace: &str, name: &str, hash: &str) -> String {
    let part = |s: &str| {
        let cut: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(8)
            .collect();
        cut.trim_matches('-').to_string()
    };
    format!("k8s-{}-{}-{}", part(namespace), part(name), hash)
}

/// The load balancer name a Service gets when the name annotation does not set one.
pub fn load_balancer_name(cluster: &str, namespace: &str, name: &str) -> String {
    aws_name(
        namespace,
        name,
        &short_hash(&[cluster, namespace, name], 10),
    )
}

/// Builds the desired load balancer for `svc`. `nodes` are the eligible nodes (instance
/// targets); `endpoints` the Service's EndpointSlices (ip targets).
pub fn desired_load_balancer(
    svc: &Service,
    opts: &LoadBalancerOptions,
    nodes: &[NodeTarget],
    endpoints: &[EndpointSlice],
    cluster: &ClusterContext,
) -> Result<DesiredLoadBalancer, ModelError> {
    let namespace = svc
        .metadata
        .namespace
        .as_deref()
        .ok_or(ModelError::Incomplete("namespace"))?;
    let name = svc
        .metadata
        .name
        .as_deref()
        .ok_or(ModelError::Incomplete("name"))?;
    let uid = svc
        .metadata
        .uid
        .as_deref()
        .ok_or(ModelError::Incomplete("uid"))?;
    let spec = svc.spec.as_ref().ok_or(ModelError::NoPorts)?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(ModelError::NoPorts);
    }
    let local = spec.external_traffic_policy.as_deref() == Some("Local");

    let mut base_tags = opts.additional_tags.clone();
    base_tags.insert(tags::CLUSTER.into(), cluster.cluster_name.clone());
    base_tags.insert(tags::SERVICE.into(), format!("{namespace}/{name}"));
    base_tags.insert(tags::SERVICE_UID.into(), uid.into());

    // Group Service ports by port number: TCP + UDP on one number become one TCP_UDP listener.
    struct PortGroup<'a> {
        number: i32,
        protocols: BTreeSet<Protocol>,
        node_ports: BTreeSet<i32>,
        first: &'a k8s_openapi::api::core::v1::ServicePort,
    }
    let mut groups: BTreeMap<i32, PortGroup> = BTreeMap::new();
    for p in ports {
        let proto_name = p.protocol.as_deref().unwrap_or("TCP");
        let proto = match proto_name {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => return Err(ModelError::UnsupportedProtocol(other.into())),
        };
        let node_port = match (opts.target_type, p.node_port) {
            (TargetType::Instance, None) => {
                return Err(ModelError::NoNodePort {
                    port: p.port,
                    protocol: proto_name.into(),
                });
            }
            (_, np) => np.unwrap_or(0),
        };
        let g = groups.entry(p.port).or_insert_with(|| PortGroup {
            number: p.port,
            protocols: BTreeSet::new(),
            node_ports: BTreeSet::new(),
            first: p,
        });
        g.protocols.insert(proto);
        g.node_ports.insert(node_port);
    }

    let tls_ports: Option<Vec<i32>> = if opts.ssl_certificates.is_empty() {
        Some(Vec::new())
    } else {
        match &opts.ssl_ports {
            None => None, // all ports
            Some(refs) => {
                let mut out = Vec::new();
                for r in refs {
                    match r {
                        PortRef::Number(n) => out.push(*n),
                        PortRef::Name(pn) => {
                            let p = ports
                                .iter()
                                .find(|p| p.name.as_deref() == Some(pn.as_str()))
                                .ok_or_else(|| ModelError::UnknownSslPort(pn.clone()))?;
                            out.push(p.port);
                        }
                    }
                }
                Some(out)
            }
        }
    };

    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    for g in groups.values() {
        let tg_protocol = if g.protocols.len() == 2 {
            if g.node_ports.len() != 1 {
                return Err(ModelError::MixedNodePorts(g.number));
            }
            Protocol::TcpUdp
        } else if g.protocols.contains(&Protocol::Udp) {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let tls = tg_protocol == Protocol::Tcp
            && tls_ports.as_ref().is_none_or(|ps| ps.contains(&g.number));
        let listener_protocol = if tls { Protocol::Tls } else { tg_protocol };
        let port_key = format!(
            "{}-{}",
            tg_protocol.as_aws().to_ascii_lowercase().replace('_', ""),
            g.number
        );
        let (target_port, targets) = match opts.target_type {
            TargetType::Instance => {
                let np = *g.node_ports.iter().next().unwrap_or(&0);
                (
                    np,
                    nodes
                        .iter()
                        .map(|n| Target {
                            id: n.instance_id.clone(),
                            port: np,
                        })
                        .collect(),
                )
            }
            TargetType::Ip => {
                let port_name = g.first.name.as_deref().unwrap_or("");
                let targets = endpoint_targets(endpoints, port_name);
                let tp = targets.iter().next().map(|t| t.port).unwrap_or(g.number);
                (tp, targets)
            }
        };
        let health_check = health_check(
            opts,
            local,
            spec.health_check_node_port,
            cluster.node_proxy_health_port,
        )?;
        let tg_name = aws_name(
            namespace,
            name,
            &short_hash(
                &[
                    &cluster.cluster_name,
                    namespace,
                    name,
                    &port_key,
                    tg_protocol.as_aws(),
                    &target_port.to_string(),
                    opts.target_type.as_aws(),
                ],
                10,
            ),
        );
        let mut attributes = opts.target_group_attributes.clone();
        if opts.proxy_protocol {
            attributes.insert("proxy_protocol_v2.enabled".into(), "true".into());
        }
        let mut tg_tags = base_tags.clone();
        tg_tags.insert(tags::PORT.into(), port_key.clone());
        tg_tags.insert(tags::RESOURCE.into(), "targetgroup".into());
        let mut l_tags = tg_tags.clone();
        l_tags.insert(tags::RESOURCE.into(), "listener".into());
        listeners.push(ListenerSpec {
            port: g.number,
            protocol: listener_protocol,
            target_group: tg_name.clone(),
            certificates: if tls {
                opts.ssl_certificates.clone()
            } else {
                Vec::new()
            },
            tags: l_tags,
        });
        target_groups.push(TargetGroupSpec {
            port_key,
            name: tg_name,
            protocol: tg_protocol,
            port: target_port,
            target_type: opts.target_type,
            health_check,
            attributes,
            tags: tg_tags,
            targets,
        });
    }

    let lb_name = opts
        .name
        .clone()
        .unwrap_or_else(|| load_balancer_name(&cluster.cluster_name, namespace, name));
    let managed_security_group = match &opts.security_groups {
        Some(_) => None,
        None => {
            let ranges: Vec<String> = match spec.load_balancer_source_ranges.as_deref() {
                Some(r) if !r.is_empty() => r.iter().map(|c| c.trim().to_string()).collect(),
                _ => vec!["0.0.0.0/0".to_string()],
            };
            let mut ingress = BTreeSet::new();
            for l in &listeners {
                let protocols: &[&str] = match l.protocol {
                    Protocol::Tcp | Protocol::Tls => &["tcp"],
                    Protocol::Udp => &["udp"],
                    Protocol::TcpUdp => &["tcp", "udp"],
                };
                for p in protocols {
                    for cidr in &ranges {
                        ingress.insert(IngressRule {
                            protocol: p.to_string(),
                            port: l.port,
                            cidr: cidr.clone(),
                        });
                    }
                }
            }
            let mut sg_tags = base_tags.clone();
            sg_tags.insert(tags::RESOURCE.into(), "securitygroup".into());
            Some(SecurityGroupSpec {
                name: lb_name.clone(),
                ingress,
                tags: sg_tags,
            })
        }
    };
    let mut lb_tags = base_tags;
    lb_tags.insert(tags::RESOURCE.into(), "loadbalancer".into());
    Ok(DesiredLoadBalancer {
        name: lb_name,
        managed_security_group,
        scheme: opts.scheme,
        ip_address_type: opts.ip_address_type,
        subnets: opts.subnets.clone(),
        security_groups: opts.security_groups.clone(),
        attributes: opts.load_balancer_attributes.clone(),
        tags: lb_tags,
        listeners,
        target_groups,
    })
}

/// Health check defaults of the AWS Load Balancer Controller, overridden by annotations:
/// TCP on the traffic port (10 s / 10 s, 3/3), or with externalTrafficPolicy Local HTTP
/// `/healthz` on the healthCheckNodePort (10 s / 6 s, 2/2), which the node proxy answers.
fn health_check(
    opts: &LoadBalancerOptions,
    local: bool,
    hc_node_port: Option<i32>,
    node_proxy_port: Option<u16>,
) -> Result<HealthCheckSpec, ModelError> {
    let o = &opts.health_check;
    let local_instance = local && opts.target_type == TargetType::Instance;
    let mut hc = if local_instance {
        let port = hc_node_port.ok_or(ModelError::NoHealthCheckNodePort)?;
        HealthCheckSpec {
            protocol: HealthCheckProtocol::Http,
            port: port.to_string(),
            path: Some("/healthz".into()),
            interval_seconds: 10,
            timeout_seconds: 6,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            success_codes: Some("200-399".into()),
        }
    } else if let (Some(port), TargetType::Instance) = (node_proxy_port, opts.target_type) {
        HealthCheckSpec {
            protocol: HealthCheckProtocol::Http,
            port: port.to_string(),
            path: Some("/readyz".into()),
            interval_seconds: 10,
            timeout_seconds: 6,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            success_codes: Some("200-399".into()),
        }
    } else {
        HealthCheckSpec {
            protocol: HealthCheckProtocol::Tcp,
            port: "traffic-port".into(),
            path: None,
            interval_seconds: 10,
            timeout_seconds: 10,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            success_codes: None,
        }
    };
    if let Some(p) = o.protocol {
        hc.protocol = p;
        if p == HealthCheckProtocol::Tcp {
            hc.path = None;
            hc.success_codes = None;
        } else {
            hc.path.get_or_insert_with(|| "/".into());
            hc.success_codes.get_or_insert_with(|| "200-399".into());
        }
    }
    match o.port {
        Some(HealthCheckPort::TrafficPort) => hc.port = "traffic-port".into(),
        Some(HealthCheckPort::Port(n)) => hc.port = n.to_string(),
        None => {}
    }
    if let Some(p) = &o.path {
        hc.path = Some(p.clone());
    }
    if let Some(v) = o.interval_seconds {
        hc.interval_seconds = v;
    }
    if let Some(v) = o.timeout_seconds {
        hc.timeout_seconds = v;
    }
    if let Some(v) = o.healthy_threshold {
        hc.healthy_threshold = v;
    }
    if let Some(v) = o.unhealthy_threshold {
        hc.unhealthy_threshold = v;
    }
    if let Some(c) = &o.success_codes {
        hc.success_codes = Some(c.clone());
    }
    Ok(hc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use serde_json::json;

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn nodes() -> Vec<NodeTarget> {
        vec![
            NodeTarget {
                name: "a".into(),
                instance_id: "i-a".into(),
            },
            NodeTarget {
                name: "b".into(),
                instance_id: "i-b".into(),
            },
        ]
    }

    fn cluster() -> ClusterContext {
        ClusterContext {
            cluster_name: "prod".into(),
            node_proxy_health_port: None,
        }
    }

    fn model(
        spec: serde_json::Value,
        ann: &[(&str, &str)],
    ) -> Result<DesiredLoadBalancer, ModelError> {
        let a: BTreeMap<String, String> = ann
            .iter()
            .map(|(k, v)| (annotations::key(k), v.to_string()))
            .collect();
        let opts = annotations::parse(&a).unwrap();
        desired_load_balancer(&svc(spec), &opts, &nodes(), &[], &cluster())
    }

    #[test]
    fn one_listener_and_target_group_per_port_with_node_targets() {
        let m = model(
            json!({"type": "LoadBalancer", "ports": [
                {"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}),
            &[],
        )
        .unwrap();
        assert_eq!(m.listeners.len(), 2);
        assert_eq!(m.target_groups.len(), 2);
        let tcp = m
            .target_groups
            .iter()
            .find(|t| t.port_key == "tcp-80")
            .unwrap();
        assert_eq!(tcp.protocol, Protocol::Tcp);
        assert_eq!(tcp.port, 30080);
        let ids: Vec<_> = tcp
            .targets
            .iter()
            .map(|t| (t.id.as_str(), t.port))
            .collect();
        assert_eq!(ids, vec![("i-a", 30080), ("i-b", 30080)]);
        let udp = m
            .target_groups
            .iter()
            .find(|t| t.port_key == "udp-53")
            .unwrap();
        assert_eq!(udp.protocol, Protocol::Udp);
        assert_eq!(m.scheme, Scheme::Internal);
        assert_eq!(m.tags[tags::CLUSTER], "prod");
        assert_eq!(m.tags[tags::SERVICE], "shop/web");
        assert_eq!(m.tags[tags::SERVICE_UID], "uid-1");
        assert_eq!(tcp.tags[tags::PORT], "tcp-80");
        let l = m.listeners.iter().find(|l| l.port == 53).unwrap();
        assert_eq!(
            (l.protocol, l.target_group.as_str()),
            (Protocol::Udp, udp.name.as_str())
        );
    }

    #[test]
    fn same_port_tcp_and_udp_become_tcp_udp() {
        let m = model(
            json!({"ports": [
                {"name": "dns-t", "port": 53, "nodePort": 30053, "protocol": "TCP"},
                {"name": "dns-u", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}),
            &[],
        )
        .unwrap();
        assert_eq!(m.listeners.len(), 1);
        assert_eq!(m.listeners[0].protocol, Protocol::TcpUdp);
        assert_eq!(m.target_groups[0].protocol, Protocol::TcpUdp);
        assert_eq!(m.target_groups[0].port_key, "tcpudp-53");
        let err = model(
            json!({"ports": [
                {"port": 53, "nodePort": 30053, "protocol": "TCP"},
                {"port": 53, "nodePort": 30054, "protocol": "UDP"}]}),
            &[],
        )
        .unwrap_err();
        assert_eq!(err, ModelError::MixedNodePorts(53));
    }

    #[test]
    fn names_are_deterministic_short_and_change_with_immutable_properties() {
        let a = model(json!({"ports": [{"port": 80, "nodePort": 30080}]}), &[]).unwrap();
        let b = model(json!({"ports": [{"port": 80, "nodePort": 30080}]}), &[]).unwrap();
        assert_eq!(a.name, b.name);
        assert_eq!(a.target_groups[0].name, b.target_groups[0].name);
        assert!(
            a.name.len() <= 32 && a.name.starts_with("k8s-shop-web-"),
            "{}",
            a.name
        );
        assert!(a.target_groups[0].name.len() <= 32);
        let moved = model(json!({"ports": [{"port": 80, "nodePort": 30081}]}), &[]).unwrap();
        assert_eq!(moved.name, a.name, "the load balancer keeps its name");
        assert_ne!(
            moved.target_groups[0].name, a.target_groups[0].name,
            "a new nodePort is a new target group"
        );
        let long = load_balancer_name(
            "c",
            "a-very-long-namespace-name",
            "an-even-longer-service-name",
        );
        assert!(long.len() <= 32, "{long}");
        assert!(!long.contains("--"), "{long}");
        let named = model(
            json!({"ports": [{"port": 80, "nodePort": 30080}]}),
            &[("name", "custom")],
        )
        .unwrap();
        assert_eq!(named.name, "custom");
    }

    #[test]
    fn health_checks_follow_traffic_policy_and_annotations() {
        let cluster = model(json!({"ports": [{"port": 80, "nodePort": 30080}]}), &[]).unwrap();
        let hc = &cluster.target_groups[0].health_check;
        assert_eq!(
            (
                hc.protocol,
                hc.port.as_str(),
                hc.interval_seconds,
                hc.timeout_seconds
            ),
            (HealthCheckProtocol::Tcp, "traffic-port", 10, 10)
        );
        assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (3, 3));

        let local = model(
            json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000, "ports": [{"port": 80, "nodePort": 30080}]}),
            &[],
        )
        .unwrap();
        let hc = &local.target_groups[0].health_check;
        assert_eq!(
            (hc.protocol, hc.port.as_str(), hc.path.as_deref()),
            (HealthCheckProtocol::Http, "32000", Some("/healthz"))
        );
        assert_eq!(
            (
                hc.interval_seconds,
                hc.timeout_seconds,
                hc.healthy_threshold,
                hc.unhealthy_threshold
            ),
            (10, 6, 2, 2)
        );

        let no_hc_port = model(
            json!({"externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]}),
            &[],
        );
        assert_eq!(no_hc_port.unwrap_err(), ModelError::NoHealthCheckNodePort);

        let custom = model(
            json!({"ports": [{"port": 80, "nodePort": 30080}]}),
            &[
                ("healthcheck-protocol", "HTTP"),
                ("healthcheck-path", "/ok"),
                ("healthcheck-interval", "30"),
                ("healthcheck-port", "8080"),
            ],
        )
        .unwrap();
        let hc = &custom.target_groups[0].health_check;
        assert_eq!(
            (
                hc.protocol,
                hc.port.as_str(),
                hc.path.as_deref(),
                hc.interval_seconds
            ),
            (HealthCheckProtocol::Http, "8080", Some("/ok"), 30)
        );
        assert_eq!(hc.success_codes.as_deref(), Some("200-399"));
    }

    #[test]
    fn node_proxy_readyz_is_the_cluster_policy_health_check_when_configured() {
        let with_proxy = ClusterContext {
            cluster_name: "prod".into(),
            node_proxy_health_port: Some(10266),
        };
        let opts = annotations::parse(&BTreeMap::new()).unwrap();
        let m = desired_load_balancer(
            &svc(json!({"ports": [{"port": 80, "nodePort": 30080}]})),
            &opts,
            &nodes(),
            &[],
            &with_proxy,
        )
        .unwrap();
        let hc = &m.target_groups[0].health_check;
        assert_eq!(
            (hc.protocol, hc.port.as_str(), hc.path.as_deref()),
            (HealthCheckProtocol::Http, "10266", Some("/readyz"))
        );
        // Local still checks the Service's own healthCheckNodePort.
        let local = desired_load_balancer(
            &svc(json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000, "ports": [{"port": 80, "nodePort": 30080}]})),
            &opts,
            &nodes(),
            &[],
            &with_proxy,
        )
        .unwrap();
        assert_eq!(local.target_groups[0].health_check.port, "32000");
    }

    #[test]
    fn tls_listeners_on_ssl_ports_and_attributes() {
        let m = model(
            json!({"ports": [{"name": "https", "port": 443, "nodePort": 30443}, {"name": "http", "port": 80, "nodePort": 30080}]}),
            &[("ssl-cert", "arn:cert"), ("ssl-ports", "https"), ("proxy-protocol", "*"), ("additional-resource-tags", "team=a")],
        )
        .unwrap();
        let l443 = m.listeners.iter().find(|l| l.port == 443).unwrap();
        assert_eq!(
            (l443.protocol, l443.certificates.clone()),
            (Protocol::Tls, vec!["arn:cert".to_string()])
        );
        let l80 = m.listeners.iter().find(|l| l.port == 80).unwrap();
        assert_eq!((l80.protocol, l80.certificates.len()), (Protocol::Tcp, 0));
        assert!(
            m.target_groups
                .iter()
                .all(|t| t.attributes["proxy_protocol_v2.enabled"] == "true"
                    && t.protocol == Protocol::Tcp)
        );
        assert!(m.target_groups.iter().all(|t| t.tags["team"] == "a"));
        assert_eq!(m.tags["team"], "a");
    }

    #[test]
    fn managed_security_group_opens_listener_ports_to_source_ranges() {
        let m = model(
            json!({"loadBalancerSourceRanges": ["10.213.0.0/24", "192.0.2.0/24"], "ports": [
                {"port": 53, "nodePort": 30053, "protocol": "TCP"},
                {"port": 53, "nodePort": 30053, "protocol": "UDP"},
                {"port": 80, "nodePort": 30080}]}),
            &[],
        )
        .unwrap();
        let sg = m.managed_security_group.expect("managed group");
        assert_eq!(sg.name, m.name);
        let rules: Vec<(String, i32, String)> = sg
            .ingress
            .iter()
            .map(|r| (r.protocol.clone(), r.port, r.cidr.clone()))
            .collect();
        assert_eq!(rules.len(), 6, "{rules:?}");
        assert!(rules.contains(&("udp".into(), 53, "192.0.2.0/24".into())));
        assert!(rules.contains(&("tcp".into(), 80, "10.213.0.0/24".into())));
        let open = model(json!({"ports": [{"port": 80, "nodePort": 30080}]}), &[]).unwrap();
        let rules: Vec<_> = open
            .managed_security_group
            .unwrap()
            .ingress
            .into_iter()
            .map(|r| r.cidr)
            .collect();
        assert_eq!(rules, vec!["0.0.0.0/0".to_string()]);
        let explicit = model(
            json!({"ports": [{"port": 80, "nodePort": 30080}]}),
            &[("security-groups", "sg-1")],
        )
        .unwrap();
        assert!(explicit.managed_security_group.is_none());
        assert_eq!(explicit.security_groups, Some(vec!["sg-1".to_string()]));
    }

    #[test]
    fn missing_node_port_and_bad_protocol_are_errors() {
        assert!(matches!(
            model(json!({"ports": [{"port": 80}]}), &[]),
            Err(ModelError::NoNodePort { .. })
        ));
        assert!(matches!(
            model(
                json!({"ports": [{"port": 80, "nodePort": 1, "protocol": "SCTP"}]}),
                &[]
            ),
            Err(ModelError::UnsupportedProtocol(_))
        ));
        assert_eq!(
            model(json!({"ports": []}), &[]).unwrap_err(),
            ModelError::NoPorts
        );
    }

    #[test]
    fn ip_targets_come_from_ready_endpoints() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "addressType": "IPv4",
            "metadata": {"name": "web-1"},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.213.9.1"], "conditions": {"ready": true}},
                {"addresses": ["10.213.9.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        }))
        .unwrap();
        let a: BTreeMap<String, String> =
            [(annotations::key("nlb-target-type"), "ip".to_string())].into();
        let opts = annotations::parse(&a).unwrap();
        let m = desired_load_balancer(
            &svc(json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]})),
            &opts,
            &[],
            &[slice],
            &cluster(),
        )
        .unwrap();
        let tg = &m.target_groups[0];
        assert_eq!(tg.target_type, TargetType::Ip);
        assert_eq!(tg.port, 8080);
        assert_eq!(
            tg.targets.iter().cloned().collect::<Vec<_>>(),
            vec![Target {
                id: "10.213.9.1".into(),
                port: 8080
            }]
        );
    }

    fn node(name: &str, ready: bool, labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"providerID": format!("aws:///us-east-1a/i-{name}"), "taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn eligible_nodes_skip_not_ready_excluded_unlabelled_and_doomed() {
        let ns = vec![
            node("ok", true, json!({"pool": "edge"}), json!([])),
            node("notready", false, json!({"pool": "edge"}), json!([])),
            node(
                "excluded",
                true,
                json!({"pool": "edge", "node.kubernetes.io/exclude-from-external-load-balancers": ""}),
                json!([]),
            ),
            node("otherpool", true, json!({"pool": "core"}), json!([])),
            node(
                "doomed",
                true,
                json!({"pool": "edge"}),
                json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]),
            ),
        ];
        let sel: BTreeMap<String, String> = [("pool".to_string(), "edge".to_string())].into();
        let names: Vec<String> = eligible_nodes(&ns, &sel, false)
            .into_iter()
            .map(|n| n.instance_id)
            .collect();
        assert_eq!(names, vec!["i-ok"]);
        let all: Vec<String> = eligible_nodes(&ns, &BTreeMap::new(), true)
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(all, vec!["notready", "ok", "otherpool"]);
        assert_eq!(
            instance_id_from_provider_id("aws:///us-east-1a/i-123"),
            Some("i-123")
        );
        assert_eq!(instance_id_from_provider_id("gce://p/z/n"), None);
    }
}
