//! Unit tests of the plan: ordering, drift repair, replacement, teardown and lanes.

use std::collections::BTreeMap;

use super::*;
use crate::annotations;
use crate::model::{self, ClusterContext, NodeTarget};
use crate::model::{DesiredLoadBalancer, Scheme, Target, TargetType};
use serde_json::json;

pub(super) fn desired(node_port: i32, nodes: &[&str]) -> DesiredLoadBalancer {
    let svc = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
        "spec": {"ports": [{"port": 80, "nodePort": node_port}]}
    }))
    .unwrap();
    let nodes: Vec<NodeTarget> = nodes
        .iter()
        .map(|n| NodeTarget {
            name: n.to_string(),
            instance_id: format!("i-{n}"),
        })
        .collect();
    model::desired_load_balancer(
        &svc,
        &annotations::parse(&BTreeMap::new()).unwrap(),
        &nodes,
        &[],
        &ClusterContext {
            cluster_name: "c".into(),
            load_balancer_class: "cloudlb.io/nlb".into(),
            node_proxy_health_port: None,
        },
    )
    .unwrap()
}

/// What the cloud would hold after `d` was fully applied.
pub(super) fn observed_from(d: &DesiredLoadBalancer) -> ObservedStack {
    let tgs: Vec<ObservedTargetGroup> = d
        .target_groups
        .iter()
        .map(|t| ObservedTargetGroup {
            arn: format!("arn:tg/{}", t.name),
            name: t.name.clone(),
            protocol: Some(t.protocol),
            port: t.port,
            health_check: t.health_check.clone(),
            attributes: [(
                "deregistration_delay.timeout_seconds".to_string(),
                "300".to_string(),
            )]
            .into_iter()
            .chain(t.attributes.clone())
            .collect(),
            tags: t.tags.clone(),
            targets: t.targets.clone(),
            healthy: t.targets.len(),
        })
        .collect();
    ObservedStack {
        load_balancer: Some(ObservedLoadBalancer {
            arn: "arn:lb".into(),
            name: d.name.clone(),
            dns_name: format!("{}-1.elb", d.name),
            scheme: Some(d.scheme),
            ip_address_type: Some(d.ip_address_type),
            attributes: d.attributes.clone(),
            tags: d.tags.clone(),
            security_groups: vec!["sg-managed".into()],
            listeners: d
                .listeners
                .iter()
                .enumerate()
                .map(|(i, l)| ObservedListener {
                    arn: format!("arn:l/{i}"),
                    port: l.port,
                    protocol: Some(l.protocol),
                    target_group_arn: Some(format!("arn:tg/{}", l.target_group)),
                    certificates: l.certificates.clone(),
                })
                .collect(),
        }),
        target_groups: tgs,
        security_group: d
            .managed_security_group
            .as_ref()
            .map(|g| ObservedSecurityGroup {
                id: "sg-managed".into(),
                name: g.name.clone(),
                ingress: g.ingress.clone(),
                tags: g.tags.clone(),
            }),
        duplicate_load_balancers: Vec::new(),
    }
}

fn kinds(cs: &[Change]) -> Vec<&'static str> {
    cs.iter().map(Change::kind).collect()
}

#[test]
fn create_from_nothing_orders_target_groups_first() {
    let d = desired(30080, &["a", "b"]);
    let cs = plan(Some(&d), &ObservedStack::default());
    assert_eq!(
        kinds(&cs),
        vec![
            "CreateTargetGroup",
            "RegisterTargets",
            "CreateSecurityGroup",
            "CreateLoadBalancer",
            "CreateListener"
        ]
    );
}

#[test]
fn a_second_listener_on_a_port_is_deleted_keeping_the_right_one() {
    let d = desired(30080, &["a"]);
    let mut o = observed_from(&d);
    let good = o.load_balancer.as_ref().unwrap().listeners[0].clone();
    let stray = ObservedListener {
        arn: "arn:l/stray".into(),
        target_group_arn: Some("arn:tg/old".into()),
        ..good.clone()
    };
    for listeners in [
        vec![stray.clone(), good.clone()],
        vec![good.clone(), stray.clone()],
    ] {
        o.load_balancer.as_mut().unwrap().listeners = listeners;
        assert_eq!(
            plan(Some(&d), &o),
            vec![Change::DeleteListener {
                arn: "arn:l/stray".into(),
                port: good.port
            }]
        );
    }
    // Two identical ones: one stays.
    let twin = ObservedListener {
        arn: "arn:l/twin".into(),
        ..good.clone()
    };
    o.load_balancer.as_mut().unwrap().listeners = vec![good.clone(), twin];
    assert_eq!(
        plan(Some(&d), &o),
        vec![Change::DeleteListener {
            arn: "arn:l/twin".into(),
            port: good.port
        }]
    );
}

#[test]
fn a_duplicate_load_balancer_is_deleted_on_apply_and_teardown() {
    let d = desired(30080, &["a"]);
    let mut o = observed_from(&d);
    o.duplicate_load_balancers = vec![("arn:lb2".into(), d.name.clone())];
    let del = Change::DeleteLoadBalancer {
        arn: "arn:lb2".into(),
        name: d.name.clone(),
    };
    assert_eq!(plan(Some(&d), &o), vec![del.clone()]);
    let teardown = plan(None, &o);
    assert_eq!(teardown[1], del);
    let rest: Vec<&str> = teardown[2..].iter().map(Change::kind).collect();
    assert_eq!(
        rest,
        vec!["DeleteTargetGroup", "DeleteSecurityGroup"],
        "{teardown:?}"
    );
}

#[test]
fn applied_state_plans_nothing() {
    let d = desired(30080, &["a", "b"]);
    assert_eq!(plan(Some(&d), &observed_from(&d)), vec![]);
}

#[test]
fn node_changes_register_before_deregister() {
    let before = desired(30080, &["a", "b"]);
    let after = desired(30080, &["b", "c"]);
    let cs = plan(Some(&after), &observed_from(&before));
    assert_eq!(kinds(&cs), vec!["RegisterTargets", "DeregisterTargets"]);
    match (&cs[0], &cs[1]) {
        (
            Change::RegisterTargets { targets: add, .. },
            Change::DeregisterTargets { targets: rm, .. },
        ) => {
            assert_eq!(
                add,
                &vec![Target {
                    id: "i-c".into(),
                    port: 30080
                }]
            );
            assert_eq!(
                rm,
                &vec![Target {
                    id: "i-a".into(),
                    port: 30080
                }]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn node_port_change_moves_the_listener_to_a_new_target_group() {
    let before = desired(30080, &["a"]);
    let after = desired(30090, &["a"]);
    let cs = plan(Some(&after), &observed_from(&before));
    assert_eq!(
        kinds(&cs),
        vec![
            "CreateTargetGroup",
            "RegisterTargets",
            "ModifyListener",
            "DeleteTargetGroup"
        ]
    );
}

#[test]
fn removed_port_deletes_listener_then_target_group() {
    let mut before = desired(30080, &["a"]);
    let extra = desired(30081, &["a"]);
    let mut l = extra.listeners[0].clone();
    l.port = 81;
    before.listeners.push(l);
    before.target_groups.push(extra.target_groups[0].clone());
    let after = desired(30080, &["a"]);
    let cs = plan(Some(&after), &observed_from(&before));
    assert_eq!(kinds(&cs), vec!["DeleteListener", "DeleteTargetGroup"]);
}

#[test]
fn health_check_attribute_and_tag_drift_is_repaired_in_place() {
    let d = desired(30080, &["a"]);
    let mut o = observed_from(&d);
    o.target_groups[0].health_check.interval_seconds = 30;
    o.target_groups[0].tags.remove(model::tags::SERVICE_UID);
    let mut d2 = d.clone();
    d2.target_groups[0]
        .attributes
        .insert("proxy_protocol_v2.enabled".into(), "true".into());
    d2.attributes
        .insert("load_balancing.cross_zone.enabled".into(), "true".into());
    let cs = plan(Some(&d2), &o);
    assert_eq!(
        kinds(&cs),
        vec![
            "ModifyTargetGroup",
            "ModifyTargetGroupAttributes",
            "AddTags",
            "ModifyLoadBalancerAttributes"
        ]
    );
}

#[test]
fn scheme_change_replaces_the_load_balancer() {
    let d = desired(30080, &["a"]);
    let o = observed_from(&d);
    let mut d2 = d.clone();
    d2.scheme = Scheme::InternetFacing;
    let cs = plan(Some(&d2), &o);
    assert_eq!(
        kinds(&cs),
        vec!["DeleteLoadBalancer", "CreateLoadBalancer", "CreateListener"]
    );
}

#[test]
fn source_range_changes_authorize_before_and_revoke_after() {
    let d = desired(30080, &["a"]);
    let o = observed_from(&d);
    let mut d2 = d.clone();
    let sg = d2.managed_security_group.as_mut().unwrap();
    sg.ingress = [model::IngressRule {
        protocol: "tcp".into(),
        port: 80,
        cidr: "10.213.0.0/24".into(),
    }]
    .into();
    let cs = plan(Some(&d2), &o);
    assert_eq!(
        kinds(&cs),
        vec![
            "AuthorizeSecurityGroupIngress",
            "RevokeSecurityGroupIngress"
        ]
    );
    // Switching to groups named by the annotation swaps them, then drops the managed one.
    let mut d3 = d.clone();
    d3.managed_security_group = None;
    d3.security_groups = Some(vec!["sg-user".into()]);
    let cs = plan(Some(&d3), &o);
    assert_eq!(kinds(&cs), vec!["SetSecurityGroups", "DeleteSecurityGroup"]);
}

#[test]
fn teardown_deletes_load_balancer_then_target_groups() {
    let d = desired(30080, &["a"]);
    let cs = plan(None, &observed_from(&d));
    assert_eq!(
        kinds(&cs),
        vec![
            "DeleteLoadBalancer",
            "DeleteTargetGroup",
            "DeleteSecurityGroup"
        ]
    );
    assert_eq!(plan(None, &ObservedStack::default()), vec![]);
}

#[test]
fn target_type_is_part_of_the_plan_text() {
    let d = desired(30080, &["a"]);
    let cs = plan(Some(&d), &ObservedStack::default());
    assert!(
        cs[0]
            .to_string()
            .contains(&format!("TCP:30080 ({})", TargetType::Instance.as_aws())),
        "{}",
        cs[0]
    );
}

#[test]
fn a_create_runs_target_groups_beside_the_load_balancer_and_listeners_after_both() {
    let d = desired(30080, &["a"]);
    let cs = plan(Some(&d), &ObservedStack::default());
    let (groups, balancer, rest) = lanes(&cs);
    let names = |v: &[&Change]| v.iter().map(|c| c.kind()).collect::<Vec<_>>();
    assert_eq!(names(&groups), ["CreateTargetGroup", "RegisterTargets"]);
    assert_eq!(
        names(&balancer),
        ["CreateSecurityGroup", "CreateLoadBalancer"]
    );
    assert_eq!(kinds(rest), ["CreateListener"]);
    // Every change is deployed exactly once.
    assert_eq!(groups.len() + balancer.len() + rest.len(), cs.len());
}

#[test]
fn nothing_after_the_first_sequential_change_joins_a_lane() {
    let d = desired(30080, &["a"]);
    let mut cs = plan(Some(&d), &ObservedStack::default());
    cs.insert(
        1,
        Change::DeleteTargetGroup {
            arn: "arn:x:targetgroup/old/1".into(),
            name: "old".into(),
        },
    );
    let (groups, balancer, rest) = lanes(&cs);
    assert_eq!(groups.len(), 1);
    assert!(balancer.is_empty());
    assert_eq!(rest.len(), cs.len() - 1);
}
