//! Builds the desired stack of one Service, one small function per piece: port groups, TLS
//! ports, target group, listener, managed security group, and the load balancer around them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::health::{HealthCheckInputs, HealthCheckOverrides, HealthCheckSpec, health_check};
use super::names::{aws_name, load_balancer_name, short_hash};
use super::nodes::endpoint_targets;
use super::vocabulary::{
    Attributes, HealthCheckPort, IpAddressType, PortRef, Protocol, TargetType,
};
use super::{
    ClusterContext, DesiredLoadBalancer, IngressRule, ListenerSpec, ModelError, NodeTarget,
    SecurityGroupSpec, Target, TargetGroupSpec, tags,
};
use crate::annotations::LoadBalancerOptions;

/// Tags as a key → value map.
type Tags = BTreeMap<String, String>;

/// The Service's identity, as every tag and name needs it.
struct Identity<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// Service ports that share a port number: TCP + UDP on one number become one TCP_UDP
/// listener and target group.
pub struct PortGroup<'a> {
    pub number: i32,
    pub protocols: BTreeSet<Protocol>,
    pub node_ports: BTreeSet<i32>,
    /// The first Service port with this number (its name finds the endpoints' port).
    pub first: &'a ServicePort,
}

impl PortGroup<'_> {
    /// The target group's protocol: TCP_UDP for both (unless `enable-tcp-udp-listener` is
    /// `false`), else the one protocol.
    fn protocol(&self, tcp_udp_listener: Option<bool>) -> Result<Protocol, ModelError> {
        if self.protocols.len() == 2 {
            if tcp_udp_listener == Some(false) {
                return Err(ModelError::TcpUdpDisabled(self.number));
            }
            if self.node_ports.len() != 1 {
                return Err(ModelError::MixedNodePorts(self.number));
            }
            Ok(Protocol::TcpUdp)
        } else if self.protocols.contains(&Protocol::Udp) {
            Ok(Protocol::Udp)
        } else {
            Ok(Protocol::Tcp)
        }
    }
}

/// Groups the Service's ports by number; instance targets need every nodePort allocated.
pub fn port_groups(
    ports: &[ServicePort],
    target_type: TargetType,
) -> Result<BTreeMap<i32, PortGroup<'_>>, ModelError> {
    let mut groups: BTreeMap<i32, PortGroup> = BTreeMap::new();
    for p in ports {
        let proto_name = p.protocol.as_deref().unwrap_or("TCP");
        let proto = match proto_name {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => return Err(ModelError::UnsupportedProtocol(other.into())),
        };
        let node_port = match (target_type, p.node_port) {
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
    Ok(groups)
}

/// Which port numbers get TLS listeners: none without a certificate, all (`None`) when
/// `ssl-ports` is unset, else the named ones.
pub fn tls_ports(
    opts: &LoadBalancerOptions,
    ports: &[ServicePort],
) -> Result<Option<Vec<i32>>, ModelError> {
    if opts.ssl_certificates.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let Some(refs) = &opts.ssl_ports else {
        return Ok(None);
    };
    refs.iter()
        .map(|r| match r {
            PortRef::Number(n) => Ok(*n),
            PortRef::Name(pn) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(pn.as_str()))
                .map(|p| p.port)
                .ok_or_else(|| ModelError::UnknownSslPort(pn.clone())),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `tcp-80`, `udp-53`, `tcpudp-53`: the key of a Service port in tags and names.
fn port_key(protocol: Protocol, number: i32) -> String {
    format!(
        "{}-{}",
        protocol.as_aws().to_ascii_lowercase().replace('_', ""),
        number
    )
}

/// The targets of a port group and the target group's port: every eligible node at the
/// nodePort, or the ready endpoints at their port with the group's port the Service's
/// numeric targetPort (1 for a named one, as LBC), so it never depends on which pods exist.
fn targets_of(
    g: &PortGroup,
    target_type: TargetType,
    nodes: &[NodeTarget],
    endpoints: &[EndpointSlice],
) -> (i32, BTreeSet<Target>) {
    match target_type {
        TargetType::Instance => {
            let np = *g.node_ports.iter().next().unwrap_or(&0);
            let targets = nodes
                .iter()
                .map(|n| Target {
                    id: n.instance_id.clone(),
                    port: np,
                })
                .collect();
            (np, targets)
        }
        TargetType::Ip => {
            let port_name = g.first.name.as_deref().unwrap_or("");
            let targets = endpoint_targets(endpoints, port_name);
            (ip_target_group_port(g.first), targets)
        }
    }
}

/// LBC's ip target group port: the numeric targetPort (the port when unset), 1 when named.
fn ip_target_group_port(p: &ServicePort) -> i32 {
    match &p.target_port {
        None => p.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => s.parse().unwrap_or(1),
    }
}

/// A named `healthcheck-port` as a number: the nodePort of that Service port for instance
/// targets, its numeric targetPort for ip targets (LBC's rule).
fn resolve_health_check_port(
    o: &HealthCheckOverrides,
    ports: &[ServicePort],
    target_type: TargetType,
) -> Result<HealthCheckOverrides, ModelError> {
    let Some(HealthCheckPort::Name(name)) = &o.port else {
        return Ok(o.clone());
    };
    let unknown = || ModelError::UnknownHealthCheckPort(name.clone());
    let p = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(name.as_str()))
        .ok_or_else(unknown)?;
    let n = match target_type {
        TargetType::Instance => p.node_port.ok_or_else(unknown)?,
        TargetType::Ip => match &p.target_port {
            None => p.port,
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(_)) => return Err(unknown()),
        },
    };
    let port = u16::try_from(n).map_err(|_| unknown())?;
    Ok(HealthCheckOverrides {
        port: Some(HealthCheckPort::Port(port)),
        ..o.clone()
    })
}

/// Whether the target group of Service port `number` has `proxy_protocol_v2.enabled`, i.e.
/// the load balancer starts each connection to a node with a PROXY v2 header (the node proxy
/// reads it when it sends its own header to the pod).
pub fn proxy_protocol_v2_enabled(opts: &LoadBalancerOptions, number: i32) -> bool {
    target_group_attributes(opts, number)
        .get("proxy_protocol_v2.enabled")
        .is_some_and(|v| v == "true")
}

/// A target group's attributes: the global ones, the port's own over them, then the
/// proxy-protocol annotations (`*` wins over the per-port list), as LBC orders them.
fn target_group_attributes(opts: &LoadBalancerOptions, number: i32) -> Attributes {
    let mut attributes = opts.target_group_attributes.clone();
    if let Some(port) = opts.port_target_group_attributes.get(&number) {
        attributes.extend(port.clone());
    }
    if let Some(ports) = &opts.proxy_protocol_ports {
        let on = ports.contains(&number);
        attributes.insert("proxy_protocol_v2.enabled".into(), on.to_string());
    }
    if opts.proxy_protocol {
        attributes.insert("proxy_protocol_v2.enabled".into(), "true".into());
    }
    attributes
}

/// Everything a target group of this Service shares with the others.
struct TargetGroupInputs<'a> {
    id: &'a Identity<'a>,
    cluster: &'a ClusterContext,
    opts: &'a LoadBalancerOptions,
    health_check: &'a HealthCheckSpec,
    base_tags: &'a Tags,
}

/// The target group of one port group.
fn target_group(
    i: &TargetGroupInputs,
    protocol: Protocol,
    number: i32,
    (port, targets): (i32, BTreeSet<Target>),
) -> TargetGroupSpec {
    let port_key = port_key(protocol, number);
    let name = aws_name(
        i.id.namespace,
        i.id.name,
        &short_hash(
            &[
                &i.cluster.cluster_name,
                i.id.namespace,
                i.id.name,
                &port_key,
                protocol.as_aws(),
                &port.to_string(),
                i.opts.target_type.as_aws(),
            ],
            10,
        ),
    );
    let attributes = target_group_attributes(i.opts, number);
    let mut tg_tags = i.base_tags.clone();
    tg_tags.insert(tags::PORT.into(), port_key.clone());
    tg_tags.insert(tags::RESOURCE.into(), "targetgroup".into());
    TargetGroupSpec {
        port_key,
        name,
        protocol,
        port,
        target_type: i.opts.target_type,
        health_check: i.health_check.clone(),
        attributes,
        tags: tg_tags,
        targets,
    }
}

/// The listener in front of `tg`: TLS with the certificates when `tls`.
fn listener(tg: &TargetGroupSpec, number: i32, tls: bool, certificates: &[String]) -> ListenerSpec {
    let mut l_tags = tg.tags.clone();
    l_tags.insert(tags::RESOURCE.into(), "listener".into());
    ListenerSpec {
        port: number,
        protocol: if tls { Protocol::Tls } else { tg.protocol },
        target_group: tg.name.clone(),
        certificates: if tls {
            certificates.to_vec()
        } else {
            Vec::new()
        },
        tags: l_tags,
    }
}

/// Who may connect: `spec.loadBalancerSourceRanges`, else the `load-balancer-source-ranges`
/// annotation, else everywhere (`0.0.0.0/0`, and `::/0` too for dualstack), as LBC.
fn source_ranges(opts: &LoadBalancerOptions, spec: &ServiceSpec) -> Vec<String> {
    if let Some(r) = spec.load_balancer_source_ranges.as_deref() {
        if !r.is_empty() {
            return r.iter().map(|c| canonical_cidr(c.trim())).collect();
        }
    }
    if let Some(r) = &opts.source_ranges {
        return r.iter().map(|c| canonical_cidr(c)).collect();
    }
    match opts.ip_address_type {
        IpAddressType::Ipv4 => vec!["0.0.0.0/0".to_string()],
        IpAddressType::Dualstack => vec!["0.0.0.0/0".to_string(), "::/0".to_string()],
    }
}

/// IPv6 CIDRs as EC2 prints them (`2001:DB8:0::/32` → `2001:db8::/32`), so observed and
/// desired rules compare equal; anything else unchanged.
fn canonical_cidr(c: &str) -> String {
    if let Some((addr, len)) = c.split_once('/') {
        if let Ok(ip) = addr.parse::<std::net::Ipv6Addr>() {
            return format!("{ip}/{len}");
        }
    }
    c.to_string()
}

/// The managed security group: every listener port open to the source ranges. `None` when
/// the annotation names the groups or disables them.
fn managed_security_group(
    opts: &LoadBalancerOptions,
    spec: &ServiceSpec,
    listeners: &[ListenerSpec],
    lb_name: &str,
    base_tags: &Tags,
) -> Option<SecurityGroupSpec> {
    if opts.security_groups.is_some() || opts.disable_security_group {
        return None;
    }
    let ranges = source_ranges(opts, spec);
    let mut ingress = BTreeSet::new();
    for l in listeners {
        for p in l.protocol.ip_protocols() {
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
        name: lb_name.to_string(),
        ingress,
        tags: sg_tags,
    })
}

/// Tags every resource of the Service carries: the user's plus cluster, class, Service and UID.
fn base_tags(
    opts: &LoadBalancerOptions,
    cluster: &ClusterContext,
    id: &Identity,
    uid: &str,
) -> Tags {
    let mut t = opts.additional_tags.clone();
    t.insert(tags::CLUSTER.into(), cluster.cluster_name.clone());
    t.insert(tags::CLASS.into(), cluster.load_balancer_class.clone());
    t.insert(
        tags::SERVICE.into(),
        format!("{}/{}", id.namespace, id.name),
    );
    t.insert(tags::SERVICE_UID.into(), uid.into());
    t
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
    let meta = &svc.metadata;
    let id = Identity {
        namespace: meta
            .namespace
            .as_deref()
            .ok_or(ModelError::Incomplete("namespace"))?,
        name: meta.name.as_deref().ok_or(ModelError::Incomplete("name"))?,
    };
    let uid = meta.uid.as_deref().ok_or(ModelError::Incomplete("uid"))?;
    let spec = svc.spec.as_ref().ok_or(ModelError::NoPorts)?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(ModelError::NoPorts);
    }
    let base_tags = base_tags(opts, cluster, &id, uid);
    let groups = port_groups(ports, opts.target_type)?;
    let tls_ports = tls_ports(opts, ports)?;
    let health_check = health_check(
        &HealthCheckInputs {
            target_type: opts.target_type,
            local: spec.external_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec.health_check_node_port,
            node_proxy_port: cluster.node_proxy_health_port,
        },
        &resolve_health_check_port(&opts.health_check, ports, opts.target_type)?,
    );
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    for g in groups.values() {
        let protocol = g.protocol(opts.tcp_udp_listener)?;
        // The same check for every group; its error comes after the group's own.
        let hc = health_check.as_ref().map_err(Clone::clone)?;
        let tls =
            protocol == Protocol::Tcp && tls_ports.as_ref().is_none_or(|ps| ps.contains(&g.number));
        let inputs = TargetGroupInputs {
            id: &id,
            cluster,
            opts,
            health_check: hc,
            base_tags: &base_tags,
        };
        let tg = target_group(
            &inputs,
            protocol,
            g.number,
            targets_of(g, opts.target_type, nodes, endpoints),
        );
        listeners.push(listener(&tg, g.number, tls, &opts.ssl_certificates));
        target_groups.push(tg);
    }
    let lb_name = opts
        .name
        .clone()
        .unwrap_or_else(|| load_balancer_name(&cluster.cluster_name, id.namespace, id.name));
    let managed_security_group =
        managed_security_group(opts, spec, &listeners, &lb_name, &base_tags);
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
        node_instances: nodes
            .iter()
            .take(5)
            .map(|n| n.instance_id.clone())
            .collect(),
    })
}
