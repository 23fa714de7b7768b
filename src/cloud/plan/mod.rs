//! Observed vs desired → the ordered list of cloud changes. Pure: no I/O, fully unit-tested.
//!
//! Order matters for zero-downtime updates: target groups are created and new targets registered
//! before any listener moves to them, and old targets are deregistered, stale listeners removed
//! and stale target groups deleted only after that. Deletion runs in reverse.
//!
//! `observed`: the stack as read from the cloud; `change`: one write and the deploy lanes;
//! `apply` and `teardown`: the two plans; `moves`: holding listener moves until the new group
//! is healthy.

use crate::model::DesiredLoadBalancer;

mod apply;
mod change;
mod moves;
mod observed;
mod teardown;

pub use change::{Change, Lane, lanes};
pub use moves::{HeldMove, hold_listener_moves, wait_bound, warm_up_port};
pub use observed::{
    LoadBalancerRef, ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup, ObservedStack,
    ObservedTargetGroup, SecurityGroupRef, TargetGroupRef,
};
pub use teardown::{DELETION_PROTECTION, DeletionProtection, deletion_protection};

/// The changes that take `observed` to `desired` (`None`: delete everything observed).
pub fn plan(desired: Option<&DesiredLoadBalancer>, observed: &ObservedStack) -> Vec<Change> {
    match desired {
        None => teardown::plan_teardown(observed),
        Some(d) => apply::plan_apply(d, observed),
    }
}

#[cfg(test)]
mod tag_and_protection_tests;

#[cfg(test)]
mod tests;
