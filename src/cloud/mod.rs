//! The cloud edge: the [`Cloud`] trait (the few verbs the controllers need), the plan that
//! decides what to change, the errors, and [`aws`], the one implementation that calls AWS.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;

pub mod aws;
#[cfg(test)]
pub mod fake;
pub mod plan;
pub mod ratelimit;

use crate::model::{DesiredLoadBalancer, Target};
use plan::{Change, ObservedStack};

/// A failed cloud call, classified by what the controller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Throttling, 5xx, timeouts, resets: retried with backoff, then the reconcile requeues.
    #[error("{operation}: transient AWS error (retried): {message}")]
    Transient {
        operation: &'static str,
        message: String,
    },
    /// Access denied, validation errors and the like: AWS's message goes into a Warning Event.
    #[error("{operation}: AWS rejected the request: {code}: {message}")]
    Rejected {
        operation: &'static str,
        code: String,
        message: String,
    },
    /// A resource with our deterministic name exists but is not tagged as ours: never touched.
    #[error(
        "{kind} {name:?} exists but is not owned by this cluster's cloudlb for this Service; it is left alone"
    )]
    NotOwned { kind: &'static str, name: String },
    /// This replica lost the leader lease: it writes nothing more.
    #[error("{operation}: not sent: this replica no longer holds the leader lease")]
    Fenced { operation: &'static str },
    /// No subnets to place the load balancer in.
    #[error("no subnets: {0}")]
    NoSubnets(String),
    /// What the Service asks for is outside what this cluster may use (another VPC): reported
    /// like bad input, never retried until the Service or the cloud changes.
    #[error("{message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
    /// A step of the plan referred to something that should exist by then.
    #[error("internal: {0}")]
    Internal(String),
}

impl CloudError {
    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, CloudError::Transient { .. })
    }
}

/// What to look for when observing one Service's stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackQuery {
    /// `namespace/name`.
    pub service: String,
    /// Load balancer names to try: the desired one and the one behind the status hostname.
    pub load_balancer_names: Vec<String>,
    /// Desired target group names (found even when no listener points at them yet).
    pub target_group_names: Vec<String>,
    /// Teardown: a same-named resource that is not ours is simply not part of the stack
    /// (instead of an error that would block the Service's deletion).
    pub skip_foreign: bool,
    /// Teardown: also every target group tagged for this Service whose name starts with this
    /// prefix (the readable part of cloudlb's names), found by listing. A group whose delete
    /// failed after its load balancer went is attached to nothing and may not be a name the
    /// Service still models (a ClusterIP Service has no nodePorts), so only its tags find it.
    /// Listed only when no load balancer is found: while one exists its listeners name its
    /// groups, and a delete's reads stay per Service (groups left beside a live load balancer
    /// are the orphan sweep's).
    pub target_groups_by_tag: Option<String>,
    /// Teardown: read only what names each resource (ARNs, ids, ownership) and the load
    /// balancer's attributes (deletion protection), not listeners, targets or target group
    /// attributes, which a deletion does not need.
    pub identities_only: bool,
}

/// A plan ready to deploy: the changes, with the observed stack they start from and the
/// desired state that supplies the placement of new resources (`None`: teardown).
#[derive(Clone, Debug)]
pub struct Plan {
    pub desired: Option<DesiredLoadBalancer>,
    pub observed: ObservedStack,
    pub changes: Vec<Change>,
}

impl Plan {
    /// Plans the changes that take `observed` to `desired`.
    pub fn new(desired: Option<DesiredLoadBalancer>, observed: ObservedStack) -> Plan {
        let changes = plan::plan(desired.as_ref(), &observed);
        Plan {
            desired,
            observed,
            changes,
        }
    }
}

/// What a deploy leaves behind that the controller reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deployed {
    /// The load balancer's DNS name, when one exists after the plan.
    pub dns_name: Option<String>,
    /// Target group name → ARN of every group the stack holds after the plan: the handles a
    /// later node change registers and deregisters through, without observing again.
    pub target_group_arns: BTreeMap<String, String>,
}

/// One target's health as ELBv2 reports it (`DescribeTargetHealth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetHealth {
    pub target: Target,
    /// `initial`, `healthy`, `unhealthy`, `unhealthy.draining`, `unused`, `draining` or
    /// `unavailable`, as ELBv2 spells it.
    pub state: String,
    /// ELBv2's reason code (`Elb.InitialHealthChecking`, `Target.FailedHealthChecks`, …).
    pub reason: Option<String>,
}

/// A target group bound by a TargetGroupBinding, as read from the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundTargetGroup {
    pub name: String,
    /// The VPC the group is in.
    pub vpc_id: String,
    /// `instance`, `ip`, `lambda` or `alb`, as ELBv2 spells it.
    pub target_type: String,
    pub tags: BTreeMap<String, String>,
}

/// A load balancer, target group or managed security group found by [`Cloud::inventory`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaggedResource {
    pub arn: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    /// For a target group: the load balancers whose listeners use it.
    pub load_balancer_arns: Vec<String>,
}

impl TaggedResource {
    /// The kind of resource, from its ARN (or `sg-…` id).
    pub fn kind(&self) -> ResourceKind {
        ResourceKind::of(&self.arn)
    }

    pub fn is_target_group(&self) -> bool {
        self.kind() == ResourceKind::TargetGroup
    }

    /// Managed security groups are listed by their id (`sg-…`) in place of an ARN.
    pub fn is_security_group(&self) -> bool {
        self.kind() == ResourceKind::SecurityGroup
    }

    pub fn is_load_balancer(&self) -> bool {
        self.kind() == ResourceKind::LoadBalancer
    }

    /// Deletion order: load balancers, then target groups, then security groups.
    pub fn deletion_rank(&self) -> u8 {
        match self.kind() {
            ResourceKind::LoadBalancer => 0,
            ResourceKind::TargetGroup => 1,
            ResourceKind::SecurityGroup => 2,
        }
    }
}

/// The kinds of resource cloudlb creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    LoadBalancer,
    TargetGroup,
    SecurityGroup,
}

impl ResourceKind {
    /// The kind an ELBv2 ARN or EC2 security group id names (decided here, once).
    pub fn of(arn_or_id: &str) -> ResourceKind {
        if arn_or_id.starts_with("sg-") {
            ResourceKind::SecurityGroup
        } else if arn_or_id.contains(":targetgroup/") {
            ResourceKind::TargetGroup
        } else {
            ResourceKind::LoadBalancer
        }
    }
}

/// A tag the admin allows security groups by (`--allowed-security-group-tags`): `KEY=VALUE`,
/// or `KEY` alone for any value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRule {
    pub key: String,
    pub value: Option<String>,
}

impl TagRule {
    /// Whether a resource with `tags` carries this tag.
    pub fn carried_by<'t>(&self, mut tags: impl Iterator<Item = (&'t str, &'t str)>) -> bool {
        tags.any(|(k, v)| k == self.key && self.value.as_deref().is_none_or(|want| want == v))
    }
}

impl std::fmt::Display for TagRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.key),
            None => write!(f, "{}", self.key),
        }
    }
}

/// The annotation's security groups that are not allowlisted by id, and the tags (any one of
/// them) each must carry to be attached anyway. Empty `groups`: nothing to check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagVetting {
    pub groups: Vec<String>,
    pub rules: Vec<TagRule>,
}

/// The few verbs the controllers need from a cloud. [`aws::AwsCloud`] is the real one; unit
/// tests use an in-memory fake. Futures are boxed so the controllers hold an `Arc<dyn Cloud>`.
pub trait Cloud: Send + Sync {
    /// Reads everything one Service owns, by its deterministic names (ownership by tags).
    fn observe<'a>(&'a self, q: &'a StackQuery)
    -> BoxFuture<'a, Result<ObservedStack, CloudError>>;

    /// Applies a plan's changes in order; stops at the first failure.
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<Deployed, CloudError>>;

    /// A target group made by anyone, by ARN (for TargetGroupBindings); `None` when gone.
    fn target_group<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BoundTargetGroup>, CloudError>>;

    /// The group's targets that are not draining; `None` when the group is gone.
    fn active_targets<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeSet<Target>>, CloudError>>;

    /// Every registered target's health (draining ones included); `None` when the group is
    /// gone. For pod readiness gates (see `controller::readiness`).
    fn target_health<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<TargetHealth>>, CloudError>>;

    /// Registers targets in a target group.
    fn register_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>>;

    /// Deregisters targets; targets or a group already gone count as done.
    fn deregister_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>>;

    /// The cluster's VPC: `--vpc-id`, else the one VPC of the nodes' EC2 instances (`hints`:
    /// some of their ids), found once and remembered.
    fn cluster_vpc<'a>(&'a self, hints: &'a [String]) -> BoxFuture<'a, Result<String, CloudError>>;

    /// Checks, before any write, that what `desired` asks for is inside the cluster's VPC: its
    /// subnets (annotation or discovery) and the security groups the annotation names.
    /// `by_tag` names the annotation's groups the admin allows only by tag: each must carry
    /// one of its tags.
    fn vet<'a>(
        &'a self,
        desired: &'a DesiredLoadBalancer,
        by_tag: &'a TagVetting,
    ) -> BoxFuture<'a, Result<(), CloudError>>;

    /// Everything in the account tagged for this cluster (for the orphan sweep).
    fn inventory(&self) -> BoxFuture<'_, Result<Vec<TaggedResource>, CloudError>>;

    /// Deletes one resource the inventory found.
    fn delete_resource<'a>(
        &'a self,
        resource: &'a TaggedResource,
    ) -> BoxFuture<'a, Result<(), CloudError>>;
}
