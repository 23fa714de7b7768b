//! Planning an apply: the changes that take a Service's observed stack to its desired one.
//!
//! They come in three phases: target groups, new targets and new security-group rules first
//! (before any traffic moves to them), then the load balancer and its listeners, then
//! deregistrations and deletions (after traffic moved).

use std::collections::{BTreeMap, BTreeSet};

use super::teardown::delete_duplicates;
use super::{
    Change, LoadBalancerRef, ObservedListener, ObservedLoadBalancer, ObservedStack,
    ObservedTargetGroup, SecurityGroupRef, TargetGroupRef,
};
use crate::model::{DesiredLoadBalancer, IngressRule, Target, TargetGroupSpec};

/// A plan in the making, by phase: deployed `early`, then `middle`, then `late`.
#[derive(Default)]
struct Phases {
    /// Target groups and registrations: before traffic moves.
    early: Vec<Change>,
    /// The load balancer and its listeners.
    middle: Vec<Change>,
    /// Deregistrations and deletions: after traffic moved.
    late: Vec<Change>,
}

impl Phases {
    fn into_changes(self) -> Vec<Change> {
        let mut out = self.early;
        out.extend(self.middle);
        out.extend(self.late);
        out
    }
}

/// Each desired target group's name → the group as later changes of the plan refer to it.
type TargetGroupRefs<'a> = BTreeMap<&'a str, TargetGroupRef>;

/// The changes that take `observed` to `d`.
pub(super) fn plan_apply(d: &DesiredLoadBalancer, observed: &ObservedStack) -> Vec<Change> {
    let mut phases = Phases::default();
    let tg_refs = plan_target_groups(d, observed, &mut phases);
    plan_security_group(d, observed, &mut phases);
    let kept = kept_load_balancer(d, observed);
    let lb_ref = match kept {
        Some(lb) => {
            plan_load_balancer_drift(d, lb, observed, &mut phases.middle);
            LoadBalancerRef::Arn(lb.arn.clone())
        }
        None => {
            plan_load_balancer_create(d, observed, &mut phases.middle);
            LoadBalancerRef::Planned
        }
    };
    plan_listeners(d, kept, &lb_ref, &tg_refs, &mut phases);
    phases.late.extend(delete_duplicates(observed));
    plan_stale_target_groups(d, observed, &mut phases.late);
    phases.into_changes()
}

/// Creates the missing target groups and repairs the observed ones.
fn plan_target_groups<'a>(
    d: &'a DesiredLoadBalancer,
    observed: &ObservedStack,
    phases: &mut Phases,
) -> TargetGroupRefs<'a> {
    let observed_tgs: BTreeMap<&str, &ObservedTargetGroup> = observed
        .target_groups
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut tg_refs = TargetGroupRefs::new();
    for tg in &d.target_groups {
        let r = match observed_tgs.get(tg.name.as_str()) {
            None => plan_new_target_group(tg, &mut phases.early),
            Some(o) => plan_target_group_drift(tg, o, phases),
        };
        tg_refs.insert(&tg.name, r);
    }
    tg_refs
}

/// A target group the cloud does not have: created, then its targets registered.
fn plan_new_target_group(tg: &TargetGroupSpec, early: &mut Vec<Change>) -> TargetGroupRef {
    let r = TargetGroupRef::Planned(tg.name.clone());
    early.push(Change::CreateTargetGroup(tg.clone()));
    if !tg.targets.is_empty() {
        early.push(Change::RegisterTargets {
            target_group: r.clone(),
            targets: tg.targets.iter().cloned().collect(),
        });
    }
    r
}

/// An observed target group brought back to its spec: health check, attributes, tags and
/// targets (new ones registered early, gone ones deregistered late).
fn plan_target_group_drift(
    tg: &TargetGroupSpec,
    o: &ObservedTargetGroup,
    phases: &mut Phases,
) -> TargetGroupRef {
    let r = TargetGroupRef::Arn(o.arn.clone());
    if o.health_check != tg.health_check {
        phases.early.push(Change::ModifyTargetGroupHealthCheck {
            target_group: r.clone(),
            health_check: tg.health_check.clone(),
        });
    }
    let attrs = changed_entries(&tg.attributes, &o.attributes);
    if !attrs.is_empty() {
        phases.early.push(Change::ModifyTargetGroupAttributes {
            target_group: r.clone(),
            attributes: attrs,
        });
    }
    phases.early.extend(tag_changes(&o.arn, &tg.tags, &o.tags));
    let add: Vec<Target> = tg.targets.difference(&o.targets).cloned().collect();
    if !add.is_empty() {
        phases.early.push(Change::RegisterTargets {
            target_group: r.clone(),
            targets: add,
        });
    }
    let remove: Vec<Target> = o.targets.difference(&tg.targets).cloned().collect();
    if !remove.is_empty() {
        phases.late.push(Change::DeregisterTargets {
            target_group: o.arn.clone(),
            targets: remove,
        });
    }
    r
}

/// The managed security group: created or widened before the load balancer that uses it,
/// narrowed or deleted after.
fn plan_security_group(d: &DesiredLoadBalancer, observed: &ObservedStack, phases: &mut Phases) {
    match (&d.managed_security_group, &observed.security_group) {
        (Some(want), None) => phases.early.push(Change::CreateSecurityGroup(want.clone())),
        (Some(want), Some(have)) => {
            let add: Vec<IngressRule> = want.ingress.difference(&have.ingress).cloned().collect();
            if !add.is_empty() {
                phases.early.push(Change::AuthorizeIngress {
                    group: SecurityGroupRef::Id(have.id.clone()),
                    rules: add,
                });
            }
            let remove: Vec<IngressRule> =
                have.ingress.difference(&want.ingress).cloned().collect();
            if !remove.is_empty() {
                phases.late.push(Change::RevokeIngress {
                    group: have.id.clone(),
                    rules: remove,
                });
            }
        }
        (None, Some(have)) => phases.late.push(Change::DeleteSecurityGroup {
            id: have.id.clone(),
            name: have.name.clone(),
        }),
        (None, None) => {}
    }
}

/// The observed load balancer, if the plan keeps it: scheme is immutable, so a scheme change
/// replaces it.
fn kept_load_balancer<'a>(
    d: &DesiredLoadBalancer,
    observed: &'a ObservedStack,
) -> Option<&'a ObservedLoadBalancer> {
    observed
        .load_balancer
        .as_ref()
        .filter(|lb| lb.scheme == Some(d.scheme))
}

/// A kept load balancer brought back to the spec: address type, attributes, tags and
/// security groups.
fn plan_load_balancer_drift(
    d: &DesiredLoadBalancer,
    lb: &ObservedLoadBalancer,
    observed: &ObservedStack,
    middle: &mut Vec<Change>,
) {
    if lb.ip_address_type != Some(d.ip_address_type) {
        middle.push(Change::SetIpAddressType {
            load_balancer: lb.arn.clone(),
            ip_address_type: d.ip_address_type,
        });
    }
    let attrs = changed_entries(&d.attributes, &lb.attributes);
    if !attrs.is_empty() {
        middle.push(Change::ModifyLoadBalancerAttributes {
            load_balancer: LoadBalancerRef::Arn(lb.arn.clone()),
            attributes: attrs,
        });
    }
    middle.extend(tag_changes(&lb.arn, &d.tags, &lb.tags));
    middle.extend(security_groups_swap(d, lb, observed));
}

/// Swaps the load balancer's security groups when they are not the wanted ones: the
/// annotation's, or the managed group. Groups can be swapped only on a load balancer created
/// with some.
fn security_groups_swap(
    d: &DesiredLoadBalancer,
    lb: &ObservedLoadBalancer,
    observed: &ObservedStack,
) -> Option<Change> {
    let want_groups: Option<Vec<String>> = match (&d.security_groups, &observed.security_group) {
        (Some(explicit), _) => Some(explicit.clone()),
        (None, Some(have)) => Some(vec![have.id.clone()]),
        (None, None) => None, // created in this plan
    };
    let differs = match &want_groups {
        Some(w) => {
            let mut a = w.clone();
            a.sort();
            let mut b = lb.security_groups.clone();
            b.sort();
            a != b
        }
        None => true,
    };
    (!lb.security_groups.is_empty() && differs).then(|| Change::SetSecurityGroups {
        load_balancer: lb.arn.clone(),
        explicit: d.security_groups.clone(),
    })
}

/// A new load balancer (replacing one of another scheme), with its attributes.
fn plan_load_balancer_create(
    d: &DesiredLoadBalancer,
    observed: &ObservedStack,
    middle: &mut Vec<Change>,
) {
    if let Some(old) = &observed.load_balancer {
        middle.push(Change::DeleteLoadBalancer {
            arn: old.arn.clone(),
            name: old.name.clone(),
        });
    }
    middle.push(Change::CreateLoadBalancer(Box::new(d.clone())));
    if !d.attributes.is_empty() {
        middle.push(Change::ModifyLoadBalancerAttributes {
            load_balancer: LoadBalancerRef::Planned,
            attributes: d.attributes.clone(),
        });
    }
}

/// The ARN of a desired target group that exists already.
fn existing_arn(tg_refs: &TargetGroupRefs<'_>, name: &str) -> Option<String> {
    match tg_refs.get(name) {
        Some(TargetGroupRef::Arn(a)) => Some(a.clone()),
        _ => None,
    }
}

/// Listeners: created or modified in the middle phase; those on ports no longer desired, and
/// second listeners on a port, deleted late.
fn plan_listeners(
    d: &DesiredLoadBalancer,
    kept: Option<&ObservedLoadBalancer>,
    lb_ref: &LoadBalancerRef,
    tg_refs: &TargetGroupRefs<'_>,
    phases: &mut Phases,
) {
    let (observed_listeners, duplicate_listeners) = match kept {
        Some(lb) => one_listener_per_port(d, lb, tg_refs),
        None => Default::default(),
    };
    for l in &d.listeners {
        match observed_listeners.get(&l.port) {
            None => phases.middle.push(Change::CreateListener {
                load_balancer: lb_ref.clone(),
                listener: l.clone(),
            }),
            Some(o) => {
                let same_tg = o.target_group_arn.is_some()
                    && o.target_group_arn == existing_arn(tg_refs, &l.target_group);
                if !same_tg || o.protocol != Some(l.protocol) || o.certificates != l.certificates {
                    phases.middle.push(Change::ModifyListener {
                        arn: o.arn.clone(),
                        listener: l.clone(),
                    });
                }
            }
        }
    }
    let desired_ports: BTreeSet<i32> = d.listeners.iter().map(|l| l.port).collect();
    for (port, o) in &observed_listeners {
        if !desired_ports.contains(port) {
            phases.late.push(Change::DeleteListener {
                arn: o.arn.clone(),
                port: *port,
            });
        }
    }
    for o in duplicate_listeners {
        phases.late.push(Change::DeleteListener {
            arn: o.arn.clone(),
            port: o.port,
        });
    }
}

/// The observed listeners by port, and the further ones on a port. A second listener on a
/// port (LocalStack makes one when a retried CreateListener had taken effect; AWS refuses) is
/// deleted: the one already forwarding to the desired target group is kept, else the first.
fn one_listener_per_port<'a>(
    d: &DesiredLoadBalancer,
    lb: &'a ObservedLoadBalancer,
    tg_refs: &TargetGroupRefs<'_>,
) -> (
    BTreeMap<i32, &'a ObservedListener>,
    Vec<&'a ObservedListener>,
) {
    let mut by_port: BTreeMap<i32, &ObservedListener> = BTreeMap::new();
    let mut duplicates: Vec<&ObservedListener> = Vec::new();
    for l in &lb.listeners {
        let wanted = d
            .listeners
            .iter()
            .find(|w| w.port == l.port)
            .and_then(|w| existing_arn(tg_refs, &w.target_group));
        match by_port.get(&l.port) {
            None => {
                by_port.insert(l.port, l);
            }
            Some(kept)
                if wanted.is_some()
                    && kept.target_group_arn != wanted
                    && l.target_group_arn == wanted =>
            {
                duplicates.push(kept);
                by_port.insert(l.port, l);
            }
            Some(_) => duplicates.push(l),
        }
    }
    (by_port, duplicates)
}

/// Observed target groups the Service no longer wants: deleted last.
fn plan_stale_target_groups(
    d: &DesiredLoadBalancer,
    observed: &ObservedStack,
    late: &mut Vec<Change>,
) {
    let desired_names: BTreeSet<&str> = d.target_groups.iter().map(|t| t.name.as_str()).collect();
    for o in &observed.target_groups {
        if !desired_names.contains(o.name.as_str()) {
            late.push(Change::DeleteTargetGroup {
                arn: o.arn.clone(),
                name: o.name.clone(),
            });
        }
    }
}

/// Tags to add (new or changed values), then tag keys to remove, on the resource `arn`.
fn tag_changes(
    arn: &str,
    desired: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let tags = changed_entries(desired, observed);
    if !tags.is_empty() {
        out.push(Change::AddTags {
            arn: arn.to_string(),
            tags,
        });
    }
    let gone = removed_tags(desired, observed);
    if !gone.is_empty() {
        out.push(Change::RemoveTags {
            arn: arn.to_string(),
            keys: gone,
        });
    }
    out
}

/// Entries of `desired` whose value differs from (or is missing in) `observed`.
fn changed_entries(
    desired: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| observed.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Observed tag keys the desired resource no longer has (LBC's rule: tags dropped from the
/// annotation go). `aws:` keys belong to AWS (it refuses to remove them) and `cloudlb.io/`
/// keys are cloudlb's own ownership tags, which the IAM policy never lets it remove.
fn removed_tags(
    desired: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> Vec<String> {
    observed
        .keys()
        .filter(|k| {
            let lower = k.to_ascii_lowercase();
            !desired.contains_key(*k)
                && !lower.starts_with("aws:")
                && !lower.starts_with("cloudlb.io/")
        })
        .cloned()
        .collect()
}
