//! Planning a teardown: everything a Service owns goes, load balancer first (its listeners go
//! with it). Deletion protection is honoured unless the Service itself turns it off.

use super::{Change, LoadBalancerRef, ObservedLoadBalancer, ObservedStack};

/// The changes that delete everything in `observed`.
pub(super) fn plan_teardown(observed: &ObservedStack) -> Vec<Change> {
    let mut out = Vec::new();
    if let Some(lb) = &observed.load_balancer {
        // The controller lets a teardown of a protected load balancer get here only when the
        // Service itself turned protection off (see [`deletion_protection`]).
        if is_protected(lb) {
            out.push(Change::ModifyLoadBalancerAttributes {
                load_balancer: LoadBalancerRef::Arn(lb.arn.clone()),
                attributes: [(DELETION_PROTECTION.to_string(), "false".to_string())].into(),
            });
        }
        // Deleting the load balancer deletes its listeners with it.
        out.push(Change::DeleteLoadBalancer {
            arn: lb.arn.clone(),
            name: lb.name.clone(),
        });
    }
    out.extend(delete_duplicates(observed));
    for tg in &observed.target_groups {
        out.push(Change::DeleteTargetGroup {
            arn: tg.arn.clone(),
            name: tg.name.clone(),
        });
    }
    if let Some(sg) = &observed.security_group {
        out.push(Change::DeleteSecurityGroup {
            id: sg.id.clone(),
            name: sg.name.clone(),
        });
    }
    out
}

/// The load balancer attribute that makes AWS refuse `DeleteLoadBalancer`.
pub const DELETION_PROTECTION: &str = "deletion_protection.enabled";

fn is_protected(lb: &ObservedLoadBalancer) -> bool {
    lb.attributes.get(DELETION_PROTECTION).map(String::as_str) == Some("true")
}

/// Whether a teardown may delete the observed load balancer. cloudlb never turns deletion
/// protection off on its own (someone may have set it in AWS on purpose); it does when the
/// Service's own attributes annotation says `deletion_protection.enabled=false` (LBC's rule:
/// editing it to false lets the deletion through).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeletionProtection {
    /// Nothing protected: delete.
    Off,
    /// Protected, and the Service asks for it off: the teardown turns it off, then deletes.
    TurnOff,
    /// Protected: no cloud change; the named load balancer stays until someone turns it off.
    Blocked(String),
}

pub fn deletion_protection(observed: &ObservedStack, service_says_off: bool) -> DeletionProtection {
    match &observed.load_balancer {
        Some(lb) if is_protected(lb) => {
            if service_says_off {
                DeletionProtection::TurnOff
            } else {
                DeletionProtection::Blocked(lb.name.clone())
            }
        }
        _ => DeletionProtection::Off,
    }
}

/// Deletes the further load balancers under the Service's name (see
/// [`ObservedStack::duplicate_load_balancers`]), on apply and teardown alike.
pub(super) fn delete_duplicates(observed: &ObservedStack) -> impl Iterator<Item = Change> + '_ {
    observed
        .duplicate_load_balancers
        .iter()
        .map(|(arn, name)| Change::DeleteLoadBalancer {
            arn: arn.clone(),
            name: name.clone(),
        })
}
