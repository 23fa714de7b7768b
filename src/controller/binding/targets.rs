//! The targets a TargetGroupBinding wants in its target group. Pure: the reconcile in `binding.rs` supplies the Service, nodes and slices.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service, ServicePort as SpecPort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::crd::{ServicePort, TargetGroupBindingSpec, TargetType};
use crate::model::{self, Target};

/// Why a binding's targets cannot be worked out. The binding turns Ready False and the target
/// group is left exactly as it is (bad input never changes the cloud).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingProblem {
    #[error("Service {0} does not exist")]
    ServiceNotFound(String),
    #[error("Service {service} has no port {port}")]
    PortNotFound { service: String, port: String },
    #[error(
        "port {port} of Service {service} has no nodePort (type {service_type}): instance targets need a NodePort or LoadBalancer Service"
    )]
    NoNodePort {
        service: String,
        port: String,
        service_type: String,
    },
}

impl BindingProblem {
    /// The Ready condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BindingProblem::ServiceNotFound(_) => "ServiceNotFound",
            BindingProblem::PortNotFound { .. } => "PortNotFound",
            BindingProblem::NoNodePort { .. } => "NoNodePort",
        }
    }
}

/// Which nodes the controller lets receive traffic at all (its `--node-selector` and its
/// NotReady policy); a binding's own nodeSelector narrows this further.
#[derive(Clone, Debug)]
pub struct NodePolicy {
    pub selector: BTreeMap<String, String>,
    pub include_not_ready: bool,
    /// `--not-ready-guard-percent` (100: no guard).
    pub not_ready_guard_percent: u8,
}

impl Default for NodePolicy {
    fn default() -> Self {
        NodePolicy {
            selector: BTreeMap::new(),
            include_not_ready: false,
            not_ready_guard_percent: 100,
        }
    }
}

fn port_text(p: &ServicePort) -> String {
    match p {
        ServicePort::Number(n) => n.to_string(),
        ServicePort::Name(n) => format!("{n:?}"),
    }
}

/// The Service port a binding names, by number or by name.
pub fn service_port<'a>(svc: &'a Service, port: &ServicePort) -> Option<&'a SpecPort> {
    svc.spec
        .as_ref()?
        .ports
        .as_ref()?
        .iter()
        .find(|p| match port {
            ServicePort::Number(n) => p.port == *n,
            ServicePort::Name(n) => p.name.as_deref() == Some(n.as_str()),
        })
}

/// The targets the binding wants: for `instance`, every eligible node (the controller's policy
/// plus the binding's nodeSelector) at the port's nodePort; for `ip`, the ready endpoints of the
/// Service's EndpointSlices (`slices`, already limited to this Service) at their port.
pub fn desired_targets(
    spec: &TargetGroupBindingSpec,
    namespace: &str,
    svc: Option<&Service>,
    nodes: &[impl Borrow<Node>],
    slices: &[EndpointSlice],
    policy: &NodePolicy,
) -> Result<BTreeSet<Target>, BindingProblem> {
    let service = format!("{namespace}/{}", spec.service_ref.name);
    let svc = svc.ok_or_else(|| BindingProblem::ServiceNotFound(service.clone()))?;
    let port =
        service_port(svc, &spec.service_ref.port).ok_or_else(|| BindingProblem::PortNotFound {
            service: service.clone(),
            port: port_text(&spec.service_ref.port),
        })?;
    match spec.target_type {
        TargetType::Instance => {
            let node_port = port.node_port.ok_or_else(|| BindingProblem::NoNodePort {
                service: service.clone(),
                port: port_text(&spec.service_ref.port),
                service_type: svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.type_.clone())
                    .unwrap_or_else(|| "ClusterIP".into()),
            })?;
            let selected: Vec<&Node> = nodes
                .iter()
                .map(Borrow::borrow)
                .filter(|n: &&Node| {
                    spec.node_selector.as_ref().is_none_or(|sel| {
                        sel.matches(n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
                    })
                })
                .collect();
            Ok(model::guarded_eligible_nodes(
                &selected,
                &policy.selector,
                policy.include_not_ready,
                policy.not_ready_guard_percent,
            )
            .0
            .into_iter()
            .map(|n| Target {
                id: n.instance_id,
                port: node_port,
            })
            .collect())
        }
        TargetType::Ip => Ok(model::endpoint_targets(
            slices,
            port.name.as_deref().unwrap_or(""),
        )),
    }
}

/// Whether a target group of ELBv2 type `aws_type` takes the binding's targets.
pub fn accepts(aws_type: &str, wanted: TargetType) -> bool {
    matches!(
        (aws_type, wanted),
        ("instance", TargetType::Instance) | ("ip", TargetType::Ip)
    )
}

/// `i-1:30080, i-2:30080` (at most `max` listed, then `and N more`).
pub fn targets_text(ts: &[Target], max: usize) -> String {
    let mut out: Vec<String> = ts
        .iter()
        .take(max)
        .map(|t| format!("{}:{}", t.id, t.port))
        .collect();
    if ts.len() > max {
        out.push(format!("and {} more", ts.len() - max));
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NodeSelector, ServiceReference};
    use serde_json::json;

    fn spec(
        target_type: TargetType,
        port: ServicePort,
        sel: &[(&str, &str)],
    ) -> TargetGroupBindingSpec {
        TargetGroupBindingSpec {
            target_group_arn: "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/a/b".into(),
            target_type,
            service_ref: ServiceReference {
                name: "web".into(),
                port,
            },
            node_selector: (!sel.is_empty()).then(|| NodeSelector {
                match_labels: sel
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
        }
    }

    fn service(type_: &str, node_port: Option<i32>) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": type_, "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "nodePort": node_port},
                {"name": "admin", "port": 9000, "protocol": "TCP", "nodePort": node_port.map(|p| p + 1)},
            ]}
        }))
        .unwrap()
    }

    fn node(name: &str, instance: &str, ready: bool, labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    fn slice(port_name: &str, port: i32, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": endpoints.iter().map(|(ip, ready)| json!({
                "addresses": [ip], "conditions": {"ready": ready}
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn targets(items: &[(&str, i32)]) -> BTreeSet<Target> {
        items
            .iter()
            .map(|(id, port)| Target {
                id: id.to_string(),
                port: *port,
            })
            .collect()
    }

    #[test]
    fn instance_targets_are_eligible_selected_nodes_at_the_node_port() {
        let nodes = [
            node("a", "i-a", true, json!({"pool": "edge", "c": "1"})),
            node("b", "i-b", true, json!({"pool": "core", "c": "1"})),
            node("c", "i-c", false, json!({"pool": "edge", "c": "1"})),
            node("d", "i-d", true, json!({"pool": "edge"})),
        ];
        let cluster = NodePolicy {
            selector: [("c".to_string(), "1".to_string())].into(),
            ..NodePolicy::default()
        };
        let svc = service("NodePort", Some(30080));
        let cases: [(TargetGroupBindingSpec, &NodePolicy, BTreeSet<Target>); 5] = [
            (
                spec(TargetType::Instance, ServicePort::Number(80), &[]),
                &cluster,
                targets(&[("i-a", 30080), ("i-b", 30080)]),
            ),
            (
                spec(TargetType::Instance, ServicePort::Name("admin".into()), &[]),
                &cluster,
                targets(&[("i-a", 30081), ("i-b", 30081)]),
            ),
            (
                spec(
                    TargetType::Instance,
                    ServicePort::Number(80),
                    &[("pool", "edge")],
                ),
                &cluster,
                targets(&[("i-a", 30080)]),
            ),
            (
                // The binding cannot widen the controller's selector with a conflicting label.
                spec(TargetType::Instance, ServicePort::Number(80), &[("c", "2")]),
                &cluster,
                targets(&[]),
            ),
            (
                spec(
                    TargetType::Instance,
                    ServicePort::Number(80),
                    &[("pool", "edge")],
                ),
                &NodePolicy {
                    include_not_ready: true,
                    ..NodePolicy::default()
                },
                targets(&[("i-a", 30080), ("i-c", 30080), ("i-d", 30080)]),
            ),
        ];
        for (i, (spec, policy, want)) in cases.into_iter().enumerate() {
            let got = desired_targets(&spec, "shop", Some(&svc), &nodes, &[], policy);
            assert_eq!(got, Ok(want), "case {i}");
        }
    }

    #[test]
    fn ip_targets_are_ready_endpoints_of_the_named_port() {
        let svc = service("ClusterIP", None);
        let slices = [
            slice(
                "http",
                8080,
                &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(false))],
            ),
            slice("admin", 9090, &[("10.0.0.3", Some(true))]),
        ];
        let got = desired_targets(
            &spec(TargetType::Ip, ServicePort::Number(80), &[]),
            "shop",
            Some(&svc),
            &[] as &[Node],
            &slices,
            &NodePolicy::default(),
        );
        assert_eq!(got, Ok(targets(&[("10.0.0.1", 8080)])));
        let got = desired_targets(
            &spec(TargetType::Ip, ServicePort::Name("admin".into()), &[]),
            "shop",
            Some(&svc),
            &[] as &[Node],
            &slices,
            &NodePolicy::default(),
        );
        assert_eq!(got, Ok(targets(&[("10.0.0.3", 9090)])));
    }

    #[test]
    fn missing_service_port_or_node_port_is_a_problem_with_a_reason() {
        let nodes = [node("a", "i-a", true, json!({}))];
        let cases = [
            (
                None,
                spec(TargetType::Instance, ServicePort::Number(80), &[]),
                "ServiceNotFound",
                "Service shop/web does not exist",
            ),
            (
                Some(service("NodePort", Some(30080))),
                spec(TargetType::Instance, ServicePort::Number(443), &[]),
                "PortNotFound",
                "Service shop/web has no port 443",
            ),
            (
                Some(service("NodePort", Some(30080))),
                spec(TargetType::Ip, ServicePort::Name("https".into()), &[]),
                "PortNotFound",
                "Service shop/web has no port \"https\"",
            ),
            (
                Some(service("ClusterIP", None)),
                spec(TargetType::Instance, ServicePort::Number(80), &[]),
                "NoNodePort",
                "port 80 of Service shop/web has no nodePort (type ClusterIP): instance targets need a NodePort or LoadBalancer Service",
            ),
        ];
        for (svc, spec, reason, message) in cases {
            let err = desired_targets(
                &spec,
                "shop",
                svc.as_ref(),
                &nodes,
                &[],
                &NodePolicy::default(),
            )
            .unwrap_err();
            assert_eq!((err.reason(), err.to_string().as_str()), (reason, message));
        }
    }

    #[test]
    fn target_types_must_match_the_group() {
        let cases = [
            ("instance", TargetType::Instance, true),
            ("ip", TargetType::Ip, true),
            ("instance", TargetType::Ip, false),
            ("ip", TargetType::Instance, false),
            ("lambda", TargetType::Instance, false),
            ("alb", TargetType::Ip, false),
        ];
        for (aws, wanted, want) in cases {
            assert_eq!(accepts(aws, wanted), want, "{aws} {wanted:?}");
        }
    }

    #[test]
    fn targets_text_lists_a_few() {
        let ts: Vec<Target> = targets(&[("a", 1), ("b", 1), ("c", 1)])
            .into_iter()
            .collect();
        assert_eq!(targets_text(&ts, 5), "a:1, b:1, c:1");
        assert_eq!(targets_text(&ts, 2), "a:1, b:1, and 1 more");
    }
}
