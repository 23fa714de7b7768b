//! What cloudlb reads back from the cloud: one Service's stack as observed, and the references
//! a plan uses for resources that exist (ARN, id) or that it creates itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::{
    Attributes, HealthCheckSpec, IngressRule, IpAddressType, Protocol, Scheme, Target,
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

impl fmt::Display for TargetGroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetGroupRef::Arn(a) => write!(f, "{a}"),
            TargetGroupRef::Planned(n) => write!(f, "(new) {n}"),
        }
    }
}
