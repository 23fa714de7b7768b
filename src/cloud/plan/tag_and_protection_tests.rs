//! Plan tests for tag removal and deletion protection.

use super::tests::{desired, observed_from};
use super::*;

#[test]
fn a_tag_dropped_from_the_annotation_is_removed_and_aws_and_cloudlb_keys_are_kept() {
    let d = desired(30080, &["a"]);
    let mut o = observed_from(&d);
    assert_eq!(plan(Some(&d), &o), vec![], "no-op: no write");
    let lb = o.load_balancer.as_mut().unwrap();
    lb.tags.insert("team".into(), "web".into());
    lb.tags
        .insert("aws:cloudformation:stack-name".into(), "x".into());
    lb.tags.insert("cloudlb.io/legacy".into(), "x".into());
    o.target_groups[0].tags.insert("team".into(), "web".into());
    let changes = plan(Some(&d), &o);
    let removed: Vec<(&str, &Vec<String>)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::RemoveTags { arn, keys } => Some((arn.as_str(), keys)),
            _ => None,
        })
        .collect();
    let tg_arn = o.target_groups[0].arn.clone();
    assert_eq!(
        removed,
        vec![
            (tg_arn.as_str(), &vec!["team".to_string()]),
            ("arn:lb", &vec!["team".to_string()])
        ]
    );
    assert_eq!(changes.len(), 2, "{changes:?}");
}

#[test]
fn deletion_protection_blocks_teardown_unless_the_service_turns_it_off() {
    let d = desired(30080, &["a"]);
    let mut o = observed_from(&d);
    assert_eq!(deletion_protection(&o, false), DeletionProtection::Off);
    let first = plan(None, &o);
    assert!(matches!(first[0], Change::DeleteLoadBalancer { .. }));
    o.load_balancer
        .as_mut()
        .unwrap()
        .attributes
        .insert(DELETION_PROTECTION.into(), "true".into());
    assert_eq!(
        deletion_protection(&o, false),
        DeletionProtection::Blocked(d.name.clone())
    );
    assert_eq!(deletion_protection(&o, true), DeletionProtection::TurnOff);
    let teardown = plan(None, &o);
    assert_eq!(
        teardown[0],
        Change::ModifyLoadBalancerAttributes {
            load_balancer: LoadBalancerRef::Arn("arn:lb".into()),
            attributes: [(DELETION_PROTECTION.to_string(), "false".to_string())].into(),
        }
    );
    assert!(matches!(teardown[1], Change::DeleteLoadBalancer { .. }));
}
