//! Table tests of how the annotations added for LBC parity shape the desired stack.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::annotations;

fn svc(spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1"},
        "spec": spec,
    }))
    .unwrap()
}

fn cluster() -> ClusterContext {
    ClusterContext {
        cluster_name: "prod".into(),
        load_balancer_class: "cloudlb.io/nlb".into(),
        node_proxy_health_port: None,
    }
}

fn nodes() -> Vec<NodeTarget> {
    vec![NodeTarget {
        name: "a".into(),
        instance_id: "i-a".into(),
    }]
}

fn build(
    spec: serde_json::Value,
    ann: &[(&str, &str)],
    slices: &[EndpointSlice],
) -> Result<DesiredLoadBalancer, ModelError> {
    let a: BTreeMap<String, String> = ann
        .iter()
        .map(|(k, v)| {
            let full = if k.contains('/') {
                k.to_string()
            } else {
                annotations::key(k)
            };
            (full, v.to_string())
        })
        .collect();
    let opts = annotations::parse(&a).unwrap();
    desired_load_balancer(&svc(spec), &opts, &nodes(), slices, &cluster())
}

fn slice(ips: &[&str], port: i32) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "addressType": "IPv4",
        "metadata": {"name": "web-1"},
        "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn cidrs(m: &DesiredLoadBalancer) -> Vec<String> {
    let mut c: Vec<String> = m
        .managed_security_group
        .as_ref()
        .expect("managed group")
        .ingress
        .iter()
        .map(|r| r.cidr.clone())
        .collect();
    c.dedup();
    c
}

#[test]
fn ip_target_group_port_is_the_target_port_with_or_without_pods() {
    let spec = json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    let ip = [("nlb-target-type", "ip")];
    let none = build(spec.clone(), &ip, &[]).unwrap();
    let two = build(spec.clone(), &ip, &[slice(&["10.0.0.1", "10.0.0.2"], 8080)]).unwrap();
    let moved = build(spec, &ip, &[slice(&["10.0.0.1"], 9090)]).unwrap();
    assert_eq!(none.target_groups[0].port, 8080);
    assert!(none.target_groups[0].targets.is_empty());
    assert_eq!(two.target_groups[0].targets.len(), 2);
    // The same group (same name) at 0, 2 and pods on another port: never replaced.
    assert_eq!(none.target_groups[0].name, two.target_groups[0].name);
    assert_eq!(none.target_groups[0].name, moved.target_groups[0].name);
    let cases = [
        (json!({"port": 80}), 80),
        (json!({"port": 80, "targetPort": 8443}), 8443),
        (json!({"name": "http", "port": 80, "targetPort": "http"}), 1),
    ];
    for (port, want) in cases {
        let m = build(json!({"ports": [port]}), &ip, &[]).unwrap();
        assert_eq!(m.target_groups[0].port, want, "{port}");
    }
}

#[test]
fn source_ranges_spec_then_annotation_then_everywhere_and_ipv6_for_dualstack() {
    let ports = json!([{"port": 80, "nodePort": 30080}]);
    type Case<'a> = (serde_json::Value, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (json!({"ports": ports}), vec![], vec!["0.0.0.0/0"]),
        (
            json!({"ports": ports}),
            vec![("ip-address-type", "dualstack")],
            vec!["0.0.0.0/0", "::/0"],
        ),
        (
            json!({"ports": ports}),
            vec![(annotations::SOURCE_RANGES, "10.1.0.0/16,2001:DB8:0::/32")],
            vec!["10.1.0.0/16", "2001:db8::/32"],
        ),
        (
            json!({"ports": ports, "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8:1::/48"]}),
            vec![(annotations::SOURCE_RANGES, "10.1.0.0/16")],
            vec!["192.0.2.0/24", "2001:db8:1::/48"],
        ),
    ];
    for (spec, ann, want) in cases {
        let m = build(spec.clone(), &ann, &[]).unwrap();
        let mut got = cidrs(&m);
        got.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{spec} {ann:?}");
    }
}

#[test]
fn disable_nlb_sg_leaves_the_load_balancer_without_groups() {
    let m = build(
        json!({"ports": [{"port": 80, "nodePort": 30080}]}),
        &[("disable-nlb-sg", "true")],
        &[],
    )
    .unwrap();
    assert!(m.managed_security_group.is_none());
    assert!(m.security_groups.is_none());
}

#[test]
fn proxy_protocol_per_target_group_and_per_port_attributes() {
    let spec = json!({"ports": [
        {"port": 80, "nodePort": 30080}, {"port": 443, "nodePort": 30443}, {"port": 22, "nodePort": 30022}]});
    let m = build(
        spec.clone(),
        &[
            ("proxy-protocol-per-target-group", "80,443"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=120",
            ),
            (
                "target-group-attributes.22",
                "deregistration_delay.timeout_seconds=5",
            ),
        ],
        &[],
    )
    .unwrap();
    let attr = |port: i32, k: &str| {
        m.target_groups
            .iter()
            .find(|t| t.port_key == format!("tcp-{port}"))
            .and_then(|t| t.attributes.get(k).cloned())
    };
    assert_eq!(
        attr(80, "proxy_protocol_v2.enabled").as_deref(),
        Some("true")
    );
    assert_eq!(
        attr(22, "proxy_protocol_v2.enabled").as_deref(),
        Some("false")
    );
    assert_eq!(
        attr(443, "deregistration_delay.timeout_seconds").as_deref(),
        Some("120")
    );
    assert_eq!(
        attr(22, "deregistration_delay.timeout_seconds").as_deref(),
        Some("5")
    );
    // `*` wins over the per-group list.
    let all = build(
        spec,
        &[
            ("proxy-protocol-per-target-group", "80"),
            ("proxy-protocol", "*"),
        ],
        &[],
    )
    .unwrap();
    assert!(
        all.target_groups
            .iter()
            .all(|t| t.attributes["proxy_protocol_v2.enabled"] == "true")
    );
}

#[test]
fn named_health_check_port_resolves_as_lbc() {
    let spec = json!({"ports": [
        {"name": "http", "port": 80, "nodePort": 30080, "targetPort": 8080},
        {"name": "admin", "port": 9000, "nodePort": 30900, "targetPort": 9901}]});
    let instance = build(spec.clone(), &[("healthcheck-port", "admin")], &[]).unwrap();
    assert_eq!(instance.target_groups[0].health_check.port, "30900");
    let ip = build(
        spec.clone(),
        &[("healthcheck-port", "admin"), ("nlb-target-type", "ip")],
        &[],
    )
    .unwrap();
    assert_eq!(ip.target_groups[0].health_check.port, "9901");
    assert_eq!(
        build(spec, &[("healthcheck-port", "metrics")], &[]).unwrap_err(),
        ModelError::UnknownHealthCheckPort("metrics".into())
    );
    let named_target = json!({"ports": [{"name": "http", "port": 80, "targetPort": "web"}]});
    assert!(matches!(
        build(
            named_target,
            &[("healthcheck-port", "http"), ("nlb-target-type", "ip")],
            &[]
        ),
        Err(ModelError::UnknownHealthCheckPort(_))
    ));
}

#[test]
fn tcp_udp_listener_false_refuses_one_port_with_both_protocols() {
    let spec = json!({"ports": [
        {"name": "t", "port": 53, "nodePort": 30053, "protocol": "TCP"},
        {"name": "u", "port": 53, "nodePort": 30053, "protocol": "UDP"}]});
    assert_eq!(
        build(spec.clone(), &[("enable-tcp-udp-listener", "false")], &[]).unwrap_err(),
        ModelError::TcpUdpDisabled(53)
    );
    let m = build(spec, &[("enable-tcp-udp-listener", "true")], &[]).unwrap();
    assert_eq!(m.listeners[0].protocol, Protocol::TcpUdp);
}

#[test]
fn deprecated_attribute_annotations_reach_the_load_balancer() {
    let m = build(
        json!({"ports": [{"port": 80, "nodePort": 30080}]}),
        &[
            ("internal", "false"),
            ("cross-zone-load-balancing-enabled", "true"),
            ("attributes", "deletion_protection.enabled=true"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(m.scheme, Scheme::InternetFacing);
    assert_eq!(m.attributes["load_balancing.cross_zone.enabled"], "true");
    assert_eq!(m.attributes["deletion_protection.enabled"], "true");
}
