//! One cloud write of a plan (`Change`), its text for logs and `cloudlb plan`, and the lanes a
//! deploy runs its leading changes in.

use std::collections::BTreeMap;
use std::fmt;

use super::{LoadBalancerRef, SecurityGroupRef, TargetGroupRef};
use crate::cloud::ResourceKind;
use crate::model::{
    DesiredLoadBalancer, HealthCheckSpec, IngressRule, IpAddressType, ListenerSpec,
    SecurityGroupSpec, Target, TargetGroupSpec,
};

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
            Change::CreateListener { listener: l, .. }
            | Change::ModifyListener { listener: l, .. } => {
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
