//! Table-driven tests of `table::build`: kube-proxy's endpoint rules, selection, health checks.

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
