//! The domain model: the vocabulary of load balancers (scheme, target type, protocols, health
//! checks, attributes) and the desired stack of one Service, a pure function of the Service, the
//! eligible nodes (or ready pod endpoints), the parsed annotations and the cluster. No I/O here.
//!
//! - [`vocabulary`]: the enums every other module speaks, with their ELBv2 spellings;
//! - [`health`]: health-check defaults and overrides;
//! - [`nodes`]: which nodes and endpoints become targets;
//! - [`names`]: deterministic AWS names;
//! - [`build`]: the desired stack, one function per piece.

use std::collections::{BTreeMap, BTreeSet};

pub mod build;
pub mod health;
pub mod names;
pub mod nodes;
pub mod vocabulary;

pub use build::desired_load_balancer;
pub use health::{HealthCheckOverrides, HealthCheckSpec};
pub use names::load_balancer_name;
pub use nodes::{
    SERVICE_NAME_LABEL, Withheld, eligible_nodes, endpoint_targets, guarded_eligible_nodes,
    instance_id_from_provider_id, node_ready, slices_of_service,
};
pub use vocabulary::{
    Attributes, HealthCheckPort, HealthCheckProtocol, IpAddressType, PortRef, Protocol, Scheme,
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

/// One registered target: an instance id or an IP, at a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub id: String,
    pub port: i32,
}

/// One target group of the desired stack.
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
    pub attributes: Attributes,
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
    pub attributes: Attributes,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
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
