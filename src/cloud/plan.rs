//! Observed vs desired → the ordered list of cloud changes. Pure: no I/O, fully unit-tested.
//!
//! Order matters for zero-downtime updates: target groups are created and new targets registered
//! before any listener moves to them, and old targets are deregistered, stale listeners removed
//! and stale target groups deleted only after that. Deletion runs in reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::cloud::ResourceKind;
use crate::model::{
    Attributes, DesiredLoadBalancer, HealthCheckSpec, IngressRule, IpAddressType, ListenerSpec,
    Protocol, Scheme, SecurityGroupSpec, Target, TargetGroupSpec,
};

/// A load balancer as read from the cloud (only ones we own get this far).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedLoadBalancer {
    pub arn: String,
    pub name: String,
    pub dns_name: String,
    /// `None`: a spelling cloudlb does not know (then it differs from any desired one).
    pub scheme: Option<Scheme>,
    pub ip_address_type: Option<IpAddressType>,
    pub attributes: Attributes,
    pub tags: BTreeMap<String, String>,
    pub listeners: Vec<ObservedListener>,
    pub security_groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedListener {
    pub arn: String,
    pub port: i32,
    /// `None`: a protocol an NLB of ours never uses.
    pub protocol: Option<Protocol>,
    pub target_group_arn: Option<String>,
    pub certificates: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedTargetGroup {
    pub arn: String,
    pub name: String,
    pub protocol: Option<Protocol>,
    pub port: i32,
    pub health_check: HealthCheckSpec,
    pub attributes: Attributes,
    pub tags: BTreeMap<String, String>,
    pub targets: BTreeSet<Target>,
    /// How many of `targets` DescribeTargetHealth reports `healthy` (a listener moves to a new
    /// group only once it has some; see `moves`).
    pub healthy: usize,
}

/// Everything one Service owns in the cloud right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedStack {
    pub load_balancer: Option<ObservedLoadBalancer>,
    pub target_groups: Vec<ObservedTargetGroup>,
    pub security_group: Option<ObservedSecurityGroup>,
    /// (arn, name) of further load balancers of ours under the same name. AWS never has
    /// them (a retried CreateLoadBalancer is idempotent); LocalStack makes one for each retry
    /// of a create whose response was lost. Always deleted.
    pub duplicate_load_balancers: Vec<(String, String)>,
}

/// The managed security group as read from EC2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedSecurityGroup {
    pub id: String,
    pub name: String,
    pub ingress: BTreeSet<IngressRule>,
    pub tags: BTreeMap<String, String>,
}

/// A security group that exists (id) or is created earlier in the same plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecurityGroupRef {
    Id(String),
    Planned,
}

/// A target group named by its ARN (exists) or by its name (created earlier in the same plan).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetGroupRef {
    Arn(String),
    Planned(String),
}

/// A load balancer that exists (ARN) or is created earlier in the same plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancerRef {
    Arn(String),
    Planned,
}

/// One cloud write. Applied strictly in order; a failure stops the plan (the next reconcile
/// observes again and plans what is left).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    CreateTargetGroup(TargetGroupSpec),
    ModifyTargetGroupHealthCheck {
        target_group: TargetGroupRef,
        health_check: HealthCheckSpec,
    },
    ModifyTargetGroupAttributes {
        target_group: TargetGroupRef,
        attributes: BTreeMap<String, String>,
    },
    RegisterTargets {
        target_group: TargetGroupRef,
        targets: Vec<Target>,
    },
    CreateLoadBalancer(Box<DesiredLoadBalancer>),
    SetIpAddressType {
        load_balancer: String,
        ip_address_type: IpAddressType,
    },
    ModifyLoadBalancerAttributes {
        load_balancer: LoadBalancerRef,
        attributes: BTreeMap<String, String>,
    },
    AddTags {
        arn: String,
        tags: BTreeMap<String, String>,
    },
    /// Tags cloudlb no longer wants (e.g. dropped from `additional-resource-tags`).
    RemoveTags {
        arn: String,
        keys: Vec<String>,
    },
    CreateListener {
        load_balancer: LoadBalancerRef,
        listener: ListenerSpec,
    },
    ModifyListener {
        arn: String,
        listener: ListenerSpec,
    },
    DeregisterTargets {
        target_group: String,
        targets: Vec<Target>,
    },
    DeleteListener {
        arn: String,
        port: i32,
    },
    DeleteLoadBalancer {
        arn: String,
        name: String,
    },
    DeleteTargetGroup {
        arn: String,
        name: String,
    },
    CreateSecurityGroup(SecurityGroupSpec),
    AuthorizeIngress {
        group: SecurityGroupRef,
        rules: Vec<IngressRule>,
    },
    RevokeIngress {
        group: String,
        rules: Vec<IngressRule>,
    },
    /// Replace the load balancer's security groups: the annotation's, or the managed one.
    SetSecurityGroups {
        load_balancer: String,
        explicit: Option<Vec<String>>,
    },
    DeleteSecurityGroup {
        id: String,
        name: String,
    },
}

impl Change {
    /// Short operation name, for logs, metrics and `cloudlb plan`.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::CreateTargetGroup(_) => "CreateTargetGroup",
            Change::ModifyTargetGroupHealthCheck { .. } => "ModifyTargetGroup",
            Change::ModifyTargetGroupAttributes { .. } => "ModifyTargetGroupAttributes",
            Change::RegisterTargets { .. } => "RegisterTargets",
            Change::CreateLoadBalancer(_) => "CreateLoadBalancer",
            Change::SetIpAddressType { .. } => "SetIpAddressType",
            Change::ModifyLoadBalancerAttributes { .. } => "ModifyLoadBalancerAttributes",
            Change::AddTags { .. } => "AddTags",
            Change::RemoveTags { .. } => "RemoveTags",
            Change::CreateListener { .. } => "CreateListener",
            Change::ModifyListener { .. } => "ModifyListener",
            Change::DeregisterTargets { .. } => "DeregisterTargets",
            Change::DeleteListener { .. } => "DeleteListener",
            Change::DeleteLoadBalancer { .. } => "DeleteLoadBalancer",
            Change::DeleteTargetGroup { .. } => "DeleteTargetGroup",
            Change::CreateSecurityGroup(_) => "CreateSecurityGroup",
            Change::AuthorizeIngress { .. } => "AuthorizeSecurityGroupIngress",
            Change::RevokeIngress { .. } => "RevokeSecurityGroupIngress",
            Change::SetSecurityGroups { .. } => "SetSecurityGroups",
            Change::DeleteSecurityGroup { .. } => "DeleteSecurityGroup",
        }
    }
}

/// Where a change may run when a plan is deployed: changes in the plan's leading run of
/// target-group and load-balancer work run in two lanes side by side; everything from the
/// first change of another kind on runs after both, in plan order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Target groups, their settings and new targets.
    TargetGroups,
    /// The managed security group and the load balancer itself.
    LoadBalancer,
    /// Listeners, deregistrations, deletions and anything new: after both lanes, in order.
    Sequential,
}

impl Change {
    /// This change's [`Lane`].
    pub fn lane(&self) -> Lane {
        match self {
            Change::CreateTargetGroup(_)
            | Change::ModifyTargetGroupHealthCheck { .. }
            | Change::ModifyTargetGroupAttributes { .. }
            | Change::RegisterTargets { .. } => Lane::TargetGroups,
            Change::AddTags { arn, .. } if ResourceKind::of(arn) == ResourceKind::TargetGroup => {
                Lane::TargetGroups
            }
            Change::AddTags { .. }
            | Change::CreateSecurityGroup(_)
            | Change::AuthorizeIngress { .. }
            | Change::CreateLoadBalancer(_)
            | Change::SetIpAddressType { .. }
            | Change::ModifyLoadBalancerAttributes { .. }
            | Change::SetSecurityGroups { .. } => Lane::LoadBalancer,
            _ => Lane::Sequential,
        }
    }
}

/// The plan as deployed: the target-group lane and the load-balancer lane of its leading
/// run (each in plan order), and the rest.
pub fn lanes(changes: &[Change]) -> (Vec<&Change>, Vec<&Change>, &[Change]) {
    let lead = changes
        .iter()
        .position(|c| c.lane() == Lane::Sequential)
        .unwrap_or(changes.len());
    let (head, rest) = changes.split_at(lead);
    let (groups, balancer) = head.iter().partition(|c| c.lane() == Lane::TargetGroups);
    (groups, balancer, rest)
}

impl fmt::Display for TargetGroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetGroupRef::Arn(a) => write!(f, "{a}"),
            TargetGroupRef::Planned(n) => write!(f, "(new) {n}"),
        }
    }
}

fn targets_text(ts: &[Target]) -> String {
    ts.iter()
        .map(|t| format!("{}:{}", t.id, t.port))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.kind();
        match self {
            Change::CreateTargetGroup(tg) => {
                write!(
                    f,
                    "{k} {} {}:{} ({})",
                    tg.name,
                    tg.protocol.as_aws(),
                    tg.port,
                    tg.target_type.as_aws()
                )
            }
            Change::ModifyTargetGroupHealthCheck {
                target_group,
                health_check: h,
            } => write!(
                f,
                "{k} {target_group} health check {} port {} path {} every {}s",
                h.protocol.as_aws(),
                h.port,
                h.path.as_deref().unwrap_or("-"),
                h.interval_seconds
            ),
            Change::ModifyTargetGroupAttributes {
                target_group,
                attributes,
            } => {
                write!(f, "{k} {target_group} {attributes:?}")
            }
            Change::RegisterTargets {
                target_group,
                targets,
            } => {
                write!(f, "{k} {target_group} [{}]", targets_text(targets))
            }
            Change::CreateLoadBalancer(lb) => write!(f, "{k} {} ({})", lb.name, lb.scheme.as_aws()),
            Change::SetIpAddressType {
                load_balancer,
                ip_address_type,
            } => {
                write!(f, "{k} {load_balancer} {}", ip_address_type.as_aws())
            }
            Change::ModifyLoadBalancerAttributes { attributes, .. } => {
                write!(f, "{k} {attributes:?}")
            }
            Change::AddTags { arn, tags } => write!(f, "{k} {arn} {tags:?}"),
            Change::RemoveTags { arn, keys } => write!(f, "{k} {arn} {keys:?}"),
            Change::CreateListener { listener: l, .. } => {
                write!(
                    f,
                    "{k} {}:{} → {}",
                    l.protocol.as_aws(),
                    l.port,
                    l.target_group
                )
            }
            Change::ModifyListener { listener: l, .. } => {
                write!(
                    f,
                    "{k} {}:{} → {}",
                    l.protocol.as_aws(),
                    l.port,
                    l.target_group
                )
            }
            Change::DeregisterTargets {
                target_group,
                targets,
            } => {
                write!(f, "{k} {target_group} [{}]", targets_text(targets))
            }
            Change::DeleteListener { port, .. } => write!(f, "{k} port {port}"),
            Change::DeleteLoadBalancer { name, .. } => write!(f, "{k} {name}"),
            Change::DeleteTargetGroup { name, .. } => write!(f, "{k} {name}"),
            Change::CreateSecurityGroup(sg) => {
                write!(f, "{k} {} ({} rules)", sg.name, sg.ingress.len())
            }
            Change::AuthorizeIngress { rules, .. } | Change::RevokeIngress { rules, .. } => write!(
                f,
                "{k} [{}]",
                rules
                    .iter()
                    .map(|r| format!("{}/{} from {}", r.protocol, r.port, r.cidr))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Change::SetSecurityGroups { explicit, .. } => match explicit {
                Some(ids) => write!(f, "{k} {}", ids.join(",")),
                None => write!(f, "{k} (managed)"),
            },
            Change::DeleteSecurityGroup { name, .. } => write!(f, "{k} {name}"),
        }
    }
}

/// The changes that take `observed` to `desired` (`None`: delete everything observed).
pub fn plan(desired: Option<&DesiredLoadBalancer>, observed: &ObservedStack) -> Vec<Change> {
    match desired {
        None => plan_teardown(observed),
        Some(d) => plan_apply(d, observed),
    }
}

fn plan_teardown(observed: &ObservedStack) -> Vec<Change> {
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

fn delete_duplicates(observed: &ObservedStack) -> impl Iterator<Item = Change> + '_ {
    observed
        .duplicate_load_balancers
        .iter()
        .map(|(arn, name)| Change::DeleteLoadBalancer {
            arn: arn.clone(),
            name: name.clone(),
        })
}

fn plan_apply(d: &DesiredLoadBalancer, observed: &ObservedStack) -> Vec<Change> {
    let mut early = Vec::new(); // target groups and registrations: before traffic moves
    let mut middle = Vec::new(); // load balancer and listeners
    let mut late = Vec::new(); // deregistrations and deletions: after traffic moved

    let observed_tgs: BTreeMap<&str, &ObservedTargetGroup> = observed
        .target_groups
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut tg_refs: BTreeMap<&str, TargetGroupRef> = BTreeMap::new();

    for tg in &d.target_groups {
        match observed_tgs.get(tg.name.as_str()) {
            None => {
                let r = TargetGroupRef::Planned(tg.name.clone());
                early.push(Change::CreateTargetGroup(tg.clone()));
                if !tg.targets.is_empty() {
                    early.push(Change::RegisterTargets {
                        target_group: r.clone(),
                        targets: tg.targets.iter().cloned().collect(),
                    });
                }
                tg_refs.insert(&tg.name, r);
            }
            Some(o) => {
                let r = TargetGroupRef::Arn(o.arn.clone());
                if o.health_check != tg.health_check {
                    early.push(Change::ModifyTargetGroupHealthCheck {
                        target_group: r.clone(),
                        health_check: tg.health_check.clone(),
                    });
                }
                let attrs = changed_entries(&tg.attributes, &o.attributes);
                if !attrs.is_empty() {
                    early.push(Change::ModifyTargetGroupAttributes {
                        target_group: r.clone(),
                        attributes: attrs,
                    });
                }
                let tags = changed_entries(&tg.tags, &o.tags);
                if !tags.is_empty() {
                    early.push(Change::AddTags {
                        arn: o.arn.clone(),
                        tags,
                    });
                }
                let gone = removed_tags(&tg.tags, &o.tags);
                if !gone.is_empty() {
                    early.push(Change::RemoveTags {
                        arn: o.arn.clone(),
                        keys: gone,
                    });
                }
                let add: Vec<Target> = tg.targets.difference(&o.targets).cloned().collect();
                if !add.is_empty() {
                    early.push(Change::RegisterTargets {
                        target_group: r.clone(),
                        targets: add,
                    });
                }
                let remove: Vec<Target> = o.targets.difference(&tg.targets).cloned().collect();
                if !remove.is_empty() {
                    late.push(Change::DeregisterTargets {
                        target_group: o.arn.clone(),
                        targets: remove,
                    });
                }
                tg_refs.insert(&tg.name, r);
            }
        }
    }

    // The managed security group: before the load balancer that uses it.
    match (&d.managed_security_group, &observed.security_group) {
        (Some(want), None) => early.push(Change::CreateSecurityGroup(want.clone())),
        (Some(want), Some(have)) => {
            let add: Vec<IngressRule> = want.ingress.difference(&have.ingress).cloned().collect();
            if !add.is_empty() {
                early.push(Change::AuthorizeIngress {
                    group: SecurityGroupRef::Id(have.id.clone()),
                    rules: add,
                });
            }
            let remove: Vec<IngressRule> =
                have.ingress.difference(&want.ingress).cloned().collect();
            if !remove.is_empty() {
                late.push(Change::RevokeIngress {
                    group: have.id.clone(),
                    rules: remove,
                });
            }
        }
        (None, Some(have)) => late.push(Change::DeleteSecurityGroup {
            id: have.id.clone(),
            name: have.name.clone(),
        }),
        (None, None) => {}
    }

    // The load balancer: scheme is immutable, so a scheme change replaces it.
    let existing = observed
        .load_balancer
        .as_ref()
        .filter(|lb| lb.scheme == Some(d.scheme));
    let lb_ref = match (existing, &observed.load_balancer) {
        (Some(lb), _) => {
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
            let tags = changed_entries(&d.tags, &lb.tags);
            if !tags.is_empty() {
                middle.push(Change::AddTags {
                    arn: lb.arn.clone(),
                    tags,
                });
            }
            let gone = removed_tags(&d.tags, &lb.tags);
            if !gone.is_empty() {
                middle.push(Change::RemoveTags {
                    arn: lb.arn.clone(),
                    keys: gone,
                });
            }
            // Groups can be swapped only on a load balancer created with some.
            let want_groups: Option<Vec<String>> =
                match (&d.security_groups, &observed.security_group) {
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
            if !lb.security_groups.is_empty() && differs {
                middle.push(Change::SetSecurityGroups {
                    load_balancer: lb.arn.clone(),
                    explicit: d.security_groups.clone(),
                });
            }
            LoadBalancerRef::Arn(lb.arn.clone())
        }
        (None, replaced) => {
            if let Some(old) = replaced {
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
            LoadBalancerRef::Planned
        }
    };

    let arn_of = |name: &str| match tg_refs.get(name) {
        Some(TargetGroupRef::Arn(a)) => Some(a.clone()),
        _ => None,
    };
    // One listener per port. A second one on a port (LocalStack makes one when a retried
    // CreateListener had taken effect; AWS refuses) is deleted: the one already forwarding to
    // the desired target group is kept, else the first.
    let mut observed_listeners: BTreeMap<i32, &ObservedListener> = BTreeMap::new();
    let mut duplicate_listeners: Vec<&ObservedListener> = Vec::new();
    if let (LoadBalancerRef::Arn(_), Some(lb)) = (&lb_ref, existing) {
        for l in &lb.listeners {
            let wanted = d
                .listeners
                .iter()
                .find(|w| w.port == l.port)
                .and_then(|w| arn_of(&w.target_group));
            match observed_listeners.get(&l.port) {
                None => {
                    observed_listeners.insert(l.port, l);
                }
                Some(kept)
                    if wanted.is_some()
                        && kept.target_group_arn != wanted
                        && l.target_group_arn == wanted =>
                {
                    duplicate_listeners.push(kept);
                    observed_listeners.insert(l.port, l);
                }
                Some(_) => duplicate_listeners.push(l),
            }
        }
    }
    for l in &d.listeners {
        match observed_listeners.get(&l.port) {
            None => middle.push(Change::CreateListener {
                load_balancer: lb_ref.clone(),
                listener: l.clone(),
            }),
            Some(o) => {
                let same_tg =
                    o.target_group_arn.is_some() && o.target_group_arn == arn_of(&l.target_group);
                if !same_tg || o.protocol != Some(l.protocol) || o.certificates != l.certificates {
                    middle.push(Change::ModifyListener {
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
            late.push(Change::DeleteListener {
                arn: o.arn.clone(),
                port: *port,
            });
        }
    }
    for o in duplicate_listeners {
        late.push(Change::DeleteListener {
            arn: o.arn.clone(),
            port: o.port,
        });
    }
    late.extend(delete_duplicates(observed));
    let desired_names: BTreeSet<&str> = d.target_groups.iter().map(|t| t.name.as_str()).collect();
    for o in &observed.target_groups {
        if !desired_names.contains(o.name.as_str()) {
            late.push(Change::DeleteTargetGroup {
                arn: o.arn.clone(),
                name: o.name.clone(),
            });
        }
    }

    early.extend(middle);
    early.extend(late);
    early
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

mod moves;
pub use moves::{HeldMove, hold_listener_moves, wait_bound, warm_up_port};

#[cfg(test)]
mod tag_and_protection_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use crate::model::TargetType;
    use crate::model::{self, ClusterContext, NodeTarget};
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
}
