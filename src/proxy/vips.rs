//! PURE: the ClusterIP leg of the Services the proxy takes (kube-proxy skips them): for each
//! Service port, the virtual addresses (`clusterIPs`, `externalIPs`) and the frontend their
//! connections reach, with the same endpoint rules as the NodePort path. clusterIPs follow
//! `internalTrafficPolicy`; externalIPs are external traffic and follow
//! `externalTrafficPolicy`, as in kube-proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

use super::table::{Candidate, Frontend, Protocol, ServicePortName, targets};

/// Which virtual addresses a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// `spec.clusterIPs` (internalTrafficPolicy).
    ClusterIp,
    /// `spec.externalIPs` (externalTrafficPolicy).
    ExternalIp,
}

impl Leg {
    /// Name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::ClusterIp => "cluster-ip",
            Leg::ExternalIp => "external-ip",
        }
    }
}

/// One ClusterIP-leg frontend: a Service port, its protocol and leg.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The Service port.
    pub service: ServicePortName,
    /// ClusterIPs or externalIPs.
    pub leg: Leg,
}

/// The virtual addresses of one frontend and where their connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipFrontend {
    /// Every `address:port` redirected to this frontend, sorted.
    pub vips: Vec<SocketAddr>,
    /// Targets and rules, as for a node port.
    pub frontend: Arc<Frontend>,
}

/// A Service's virtual addresses and traffic policies.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    internal_local: bool,
    external_local: bool,
}

impl Policies {
    /// Reads them from the spec; a headless Service (`clusterIP: None`) has no clusterIPs.
    pub fn of(spec: &ServiceSpec) -> Policies {
        let parse = |ips: &[String]| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips.iter().filter_map(|s| s.trim().parse().ok()).collect();
            v.sort();
            v.dedup();
            v
        };
        let cluster = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => parse(ips),
            _ => parse(spec.cluster_ip.as_slice()),
        };
        Policies {
            cluster_ips: cluster,
            external_ips: parse(spec.external_ips.as_deref().unwrap_or_default()),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        }
    }
}

/// Adds the frontends of one Service port (`template` carries its names and rules; the
/// targets are chosen here per leg).
pub fn insert(
    vips: &mut BTreeMap<VipKey, VipFrontend>,
    policies: &Policies,
    port: &ServicePort,
    protocol: Protocol,
    template: Frontend,
    candidates: &[Candidate],
) {
    let Ok(number) = u16::try_from(port.port) else {
        return;
    };
    let legs = [
        (
            Leg::ClusterIp,
            &policies.cluster_ips,
            policies.internal_local,
        ),
        (
            Leg::ExternalIp,
            &policies.external_ips,
            policies.external_local,
        ),
    ];
    for (leg, ips, local_only) in legs {
        if ips.is_empty() || number == 0 {
            continue;
        }
        let frontend = Frontend {
            targets: targets(candidates, local_only),
            ..template.clone()
        };
        vips.insert(
            VipKey {
                protocol,
                service: template.service.clone(),
                leg,
            },
            VipFrontend {
                vips: ips.iter().map(|ip| SocketAddr::new(*ip, number)).collect(),
                frontend: Arc::new(frontend),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::table::{self, TableOptions};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::{Value, json};

    const NODE: &str = "node-a";

    fn service(labels: Value, annotations: Value, spec: Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": "web", "labels": labels,
                             "annotations": annotations},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    /// Endpoints (ip, node, ready, serving, terminating) of Service `web` on port `http` 8080.
    fn slice(eps: &[(&str, &str, bool, bool, bool)]) -> Arc<EndpointSlice> {
        let eps: Vec<Value> = eps
            .iter()
            .map(|(ip, node, r, s, t)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": r, "serving": s, "terminating": t}})
            })
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": "web-1",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps,
            }))
            .unwrap(),
        )
    }

    fn opts() -> TableOptions {
        TableOptions {
            node_name: NODE.into(),
            service_proxy_name: "cloudlb".into(),
            load_balancer_class: "cloudlb.io/nlb".into(),
            ..TableOptions::default()
        }
    }

    /// (ip, node) and (ready, serving, terminating) of one endpoint.
    type Where = (&'static str, &'static str);
    type Conditions = (bool, bool, bool);

    #[test]
    fn cluster_leg_frontends() {
        let ours = json!({"service.kubernetes.io/service-proxy-name": "cloudlb"});
        let port = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
        let spec = |extra: Value| {
            let mut s =
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": port});
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            s
        };
        const READY: (bool, bool, bool) = (true, true, false);
        const TERMINATING: (bool, bool, bool) = (false, true, true);
        let local = ("10.0.0.1", NODE);
        let remote = ("10.0.0.2", "node-b");
        struct Case {
            what: &'static str,
            labels: Value,
            spec: Value,
            endpoints: Vec<(Where, Conditions)>,
            /// (leg, vips, targets)
            want: Vec<(Leg, Vec<&'static str>, Vec<&'static str>)>,
        }
        let cases = [
            Case {
                what: "a labelled ClusterIP Service: every ready endpoint",
                labels: ours.clone(),
                spec: spec(json!({})),
                endpoints: vec![(local, READY), (remote, READY)],
                want: vec![(
                    Leg::ClusterIp,
                    vec!["10.96.0.10:80"],
                    vec!["10.0.0.1:8080", "10.0.0.2:8080"],
                )],
            },
            Case {
                what: "internalTrafficPolicy Local: this node's only",
                labels: ours.clone(),
                spec: spec(json!({"internalTrafficPolicy": "Local"})),
                endpoints: vec![(local, READY), (remote, READY)],
                want: vec![(Leg::ClusterIp, vec!["10.96.0.10:80"], vec!["10.0.0.1:8080"])],
            },
            Case {
                what: "externalIPs follow externalTrafficPolicy, clusterIPs internalTrafficPolicy",
                labels: ours.clone(),
                spec: spec(
                    json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                  "externalIPs": ["192.0.2.9", "192.0.2.8"]}),
                ),
                endpoints: vec![(local, READY), (remote, READY)],
                want: vec![
                    (
                        Leg::ClusterIp,
                        vec!["10.96.0.10:80"],
                        vec!["10.0.0.1:8080", "10.0.0.2:8080"],
                    ),
                    (
                        Leg::ExternalIp,
                        vec!["192.0.2.8:80", "192.0.2.9:80"],
                        vec!["10.0.0.1:8080"],
                    ),
                ],
            },
            Case {
                what: "dual-stack clusterIPs: both addresses",
                labels: ours.clone(),
                spec: spec(json!({"clusterIPs": ["10.96.0.10", "fd00::a"]})),
                endpoints: vec![(local, READY)],
                want: vec![(
                    Leg::ClusterIp,
                    vec!["10.96.0.10:80", "[fd00::a]:80"],
                    vec!["10.0.0.1:8080"],
                )],
            },
            Case {
                what: "no ready endpoint: serving-terminating ones",
                labels: ours.clone(),
                spec: spec(json!({})),
                endpoints: vec![(local, TERMINATING), (remote, (false, false, false))],
                want: vec![(Leg::ClusterIp, vec!["10.96.0.10:80"], vec!["10.0.0.1:8080"])],
            },
            Case {
                what: "headless: nothing to redirect",
                labels: ours.clone(),
                spec: spec(json!({"clusterIP": "None", "clusterIPs": ["None"]})),
                endpoints: vec![(local, READY)],
                want: vec![],
            },
            Case {
                what: "unlabelled: kube-proxy's",
                labels: json!({}),
                spec: spec(json!({})),
                endpoints: vec![(local, READY)],
                want: vec![],
            },
            Case {
                what: "labelled for another proxy",
                labels: json!({"service.kubernetes.io/service-proxy-name": "cilium"}),
                spec: spec(json!({})),
                endpoints: vec![(local, READY)],
                want: vec![],
            },
        ];
        for case in cases {
            let eps: Vec<_> = case
                .endpoints
                .iter()
                .map(|((ip, node), (r, s, t))| (*ip, *node, *r, *s, *t))
                .collect();
            let t = table::build(
                &[service(case.labels, json!({}), case.spec)],
                &[slice(&eps)],
                &opts(),
            );
            let got: Vec<(Leg, Vec<String>, Vec<String>)> = t
                .vips
                .iter()
                .map(|(k, v)| {
                    (
                        k.leg,
                        v.vips.iter().map(|a| a.to_string()).collect(),
                        v.frontend.targets.iter().map(|a| a.to_string()).collect(),
                    )
                })
                .collect();
            let want: Vec<(Leg, Vec<String>, Vec<String>)> = case
                .want
                .iter()
                .map(|(l, v, t)| {
                    (
                        *l,
                        v.iter().map(|s| s.to_string()).collect(),
                        t.iter().map(|s| s.to_string()).collect(),
                    )
                })
                .collect();
            assert_eq!(got, want, "{}", case.what);
        }
    }

    #[test]
    fn proxy_protocol_per_leg_and_port() {
        let ours = json!({"service.kubernetes.io/service-proxy-name": "cloudlb"});
        let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                          "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]});
        // (annotations, node port (from LB, to pod), cluster leg to pod)
        let cases = [
            (json!({}), (false, false), false),
            (
                json!({"cloudlb.io/proxy-protocol-to-pod": "v2"}),
                (false, true),
                true,
            ),
            (
                json!({"cloudlb.io/proxy-protocol-to-pod": "v2",
                       "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"}),
                (true, true),
                true,
            ),
            (
                json!({"cloudlb.io/proxy-protocol-to-pod": "v2",
                       "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol-per-target-group": "443"}),
                (false, true),
                true,
            ),
            // The NLB's header alone passes through untouched (not read).
            (
                json!({"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"}),
                (false, false),
                false,
            ),
            // Any other value: refused by the controller, no header here.
            (
                json!({"cloudlb.io/proxy-protocol-to-pod": "v1"}),
                (false, false),
                false,
            ),
        ];
        for (annotations, (from_lb, to_pod), cluster_to_pod) in cases {
            let what = annotations.to_string();
            let t = table::build(
                &[service(ours.clone(), annotations, spec.clone())],
                &[],
                &opts(),
            );
            let node_port = t
                .frontends
                .values()
                .next()
                .expect("a node port")
                .proxy_protocol;
            assert_eq!(
                (node_port.from_load_balancer, node_port.to_pod),
                (from_lb, to_pod),
                "{what}"
            );
            let cluster = t
                .vips
                .values()
                .next()
                .expect("a clusterIP")
                .frontend
                .proxy_protocol;
            assert!(!cluster.from_load_balancer, "{what}");
            assert_eq!(cluster.to_pod, cluster_to_pod, "{what}");
        }
    }
}
