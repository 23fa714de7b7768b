//! The pure half of a Service reconcile: from what the controller sees (the Service, the node
//! and EndpointSlice caches, its memory of the last sync) to what to do next. No I/O: the
//! reconcile and `cloudlb plan` both call [`decide`], then observe and plan what it asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Resource, ResourceExt};

use super::super::status::{current_hostname, has_finalizer};
use super::super::{ClusterArgs, policy};
use crate::annotations::{self, LoadBalancerOptions};
use crate::cloud::StackQuery;
use crate::model::{self, DesiredLoadBalancer, ModelError, Target, TargetType};

/// What was last applied for a Service, so an unchanged Service costs no AWS call until the
/// periodic drift check, and a Service whose targets alone changed costs one call per
/// changed target group.
#[derive(Clone, Debug)]
pub struct Applied {
    pub desired_hash: u64,
    /// The hash of the desired state without its targets.
    pub structure_hash: u64,
    pub hostname: Option<String>,
    /// When the stack was last observed in full (the drift check runs `resync` after it).
    pub at: Instant,
    /// Every desired target group by name, with the targets it holds since the last sync.
    /// Empty when unknown: then any change observes the whole stack.
    pub target_groups: BTreeMap<String, RegisteredGroup>,
}

/// A target group as the controller last left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredGroup {
    pub arn: String,
    pub targets: BTreeSet<Target>,
    /// The group's health-check interval (the readiness tracker polls at it).
    pub health_check_interval_seconds: i32,
}

/// Targets to register in and deregister from one target group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetChange {
    /// The group's name (for logs and the bookkeeping).
    pub target_group: String,
    pub arn: String,
    pub register: Vec<Target>,
    pub deregister: Vec<Target>,
}

/// Everything a reconcile of one Service looks at before it calls anything.
pub struct View<'a> {
    pub svc: &'a Service,
    pub cluster: &'a ClusterArgs,
    /// This controller's finalizer.
    pub finalizer: &'a str,
    pub nodes: &'a [Arc<Node>],
    /// Every EndpointSlice (the Service's own are picked here).
    pub slices: &'a [Arc<EndpointSlice>],
    /// Target groups earlier, unfinished plans created for this Service.
    pub pending_target_groups: BTreeSet<String>,
    /// Pods (namespace, name) ready but for their readiness gates: registered as ip targets
    /// although their endpoints are not ready (see `readiness::gate::with_gated_ready`).
    pub gated: std::collections::HashSet<(String, String)>,
    /// The last full sync (`None` for `cloudlb plan`, which has no memory).
    pub applied: Option<Applied>,
    /// Another Service of ours, older, that wants the same load balancer name (`ns/name`).
    pub name_holder: Option<String>,
    pub resync: Duration,
    pub now: Instant,
}

/// What a reconcile does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Not ours and nothing of ours on it: nothing to do until it changes.
    Ignore,
    /// Bad input: a Warning Event and a status condition, no cloud call.
    Invalid {
        reason: &'static str,
        message: String,
    },
    /// The load balancer name is another (older) Service's: refused like bad input, and the
    /// holder is told too.
    NameTaken { name: String, holder: String },
    /// Same desired state as the last sync, within the resync period: no cloud call.
    UpToDate,
    /// Same desired state, but the Service as cached lacks the finalizer or the hostname (a
    /// stale cache right after our own writes, or someone removed them): Kubernetes writes
    /// from memory, no cloud call.
    Restore { hostname: Option<String> },
    /// Only targets changed since the last sync (a node joined or left, endpoints moved):
    /// register and deregister in the groups the controller knows, no observe.
    Retarget {
        desired: Box<DesiredLoadBalancer>,
        desired_hash: u64,
        changes: Vec<TargetChange>,
    },
    /// Observe what `query` names, plan towards `desired`, deploy.
    Sync {
        desired: Box<DesiredLoadBalancer>,
        desired_hash: u64,
        query: StackQuery,
        /// Annotation warnings (unknown keys, deprecated names): Warning Events; the sync
        /// goes on.
        warnings: Vec<String>,
    },
    /// Delete everything `query` finds, then the finalizer.
    Teardown { query: StackQuery, still_ours: bool },
}

/// Whether the Service is one this controller serves right now.
pub fn is_ours(svc: &Service, cluster: &ClusterArgs) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => c == cluster.load_balancer_class,
        None => cluster.default_class && (cluster.default_class_all || handed_to_external(svc)),
    }
}

/// Whether a class-less Service says it is not for the cloud provider's service controller:
/// `aws-load-balancer-type: external` or `nlb-ip`, the values the in-tree AWS provider skips.
fn handed_to_external(svc: &Service) -> bool {
    svc.annotations()
        .get(&annotations::key("type"))
        .is_some_and(|t| matches!(t.trim(), "external" | "nlb-ip"))
}

/// Whether the Service names a load balancer class other than ours.
fn foreign_class(svc: &Service, cluster: &ClusterArgs) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
        .is_some_and(|c| c != cluster.load_balancer_class)
}

/// Whether the Service asks for ip targets (then its EndpointSlices matter).
pub fn uses_ip_targets(svc: &Service) -> bool {
    annotations::parse(svc.annotations()).is_ok_and(|o| o.target_type == TargetType::Ip)
}

/// The decision; see [`Next`].
pub fn decide(v: &View) -> Next {
    let svc = v.svc;
    if foreign_class(svc, v.cluster) {
        // loadBalancerClass is immutable while the type is LoadBalancer: a Service of another
        // class never was ours, whatever finalizers it carries.
        return Next::Ignore;
    }
    let ours = is_ours(svc, v.cluster);
    if !ours || svc.meta().deletion_timestamp.is_some() {
        if !has_finalizer(svc, v.finalizer) {
            return Next::Ignore;
        }
        return Next::Teardown {
            query: teardown_query(v),
            still_ours: ours,
        };
    }
    let opts = match annotations::parse(svc.annotations()) {
        Ok(o) => o,
        Err(errs) => {
            let message = errs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return Next::Invalid {
                reason: "InvalidAnnotation",
                message,
            };
        }
    };
    let refused = policy::refusals(
        &opts,
        &svc.namespace().unwrap_or_default(),
        &v.cluster.policy,
    );
    if !refused.is_empty() {
        let message = refused
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Next::Invalid {
            reason: "NotAllowed",
            message,
        };
    }
    let desired = match desire(v, &opts) {
        Ok(d) => d,
        Err(e) => {
            return Next::Invalid {
                reason: "InvalidService",
                message: e.to_string(),
            };
        }
    };
    if let Some(holder) = &v.name_holder {
        return Next::NameTaken {
            name: desired.name,
            holder: holder.clone(),
        };
    }
    // Warnings are part of what was last synced, so a new typo is reported at once.
    let desired_hash = hash_of(&(&desired, &opts.warnings));
    if let Some(a) = &v.applied {
        if v.now.saturating_duration_since(a.at) < v.resync {
            if a.desired_hash == desired_hash {
                if a.hostname.as_deref() == current_hostname(svc) && has_finalizer(svc, v.finalizer)
                {
                    return Next::UpToDate;
                }
                return Next::Restore {
                    hostname: a.hostname.clone(),
                };
            }
            if a.structure_hash == structure_hash(&desired)
                && a.hostname.as_deref() == current_hostname(svc)
                && has_finalizer(svc, v.finalizer)
            {
                if let Some(changes) = target_changes(&desired, &a.target_groups) {
                    return Next::Retarget {
                        desired: Box::new(desired),
                        desired_hash,
                        changes,
                    };
                }
            }
        }
    }
    let mut query = query(svc, Some(&desired), &opts, &v.cluster.cluster_name);
    with_pending(&mut query, &v.pending_target_groups);
    Next::Sync {
        desired: Box::new(desired),
        desired_hash,
        query,
        warnings: opts.warnings,
    }
}

/// The desired load balancer from the Service and the caches.
pub fn desire(v: &View, opts: &LoadBalancerOptions) -> Result<DesiredLoadBalancer, ModelError> {
    let (eligible, _) = target_nodes(v, opts);
    let slices = if opts.target_type == TargetType::Ip {
        crate::controller::readiness::gate::with_gated_ready(
            model::slices_of_service(
                v.slices,
                &v.svc.namespace().unwrap_or_default(),
                &v.svc.name_any(),
            ),
            &v.gated,
        )
    } else {
        Vec::new()
    };
    model::desired_load_balancer(v.svc, opts, &eligible, &slices, &v.cluster.context())
}

/// The Service's target nodes, and what the NotReady guard kept (see
/// [`model::guarded_eligible_nodes`]).
fn target_nodes(
    v: &View,
    opts: &LoadBalancerOptions,
) -> (Vec<model::NodeTarget>, Option<model::Withheld>) {
    model::guarded_eligible_nodes(
        v.nodes,
        &node_selector(v.cluster, opts),
        v.cluster.keep_not_ready_nodes,
        v.cluster.not_ready_guard_percent,
    )
}

/// NotReady nodes the guard keeps as targets of this instance-target Service right now.
pub fn withheld(v: &View) -> Option<model::Withheld> {
    let opts = annotations::parse(v.svc.annotations()).ok()?;
    if opts.target_type != TargetType::Instance {
        return None;
    }
    target_nodes(v, &opts).1
}

/// What a teardown looks at: the load balancer names a sync would (and the default one), the
/// target groups the Service would want if it can still be modelled, and pending ones.
fn teardown_query(v: &View) -> StackQuery {
    let opts = annotations::parse(v.svc.annotations()).unwrap_or_default();
    let mut q = query(v.svc, None, &opts, &v.cluster.cluster_name);
    if let Ok(d) = desire(v, &opts) {
        q.target_group_names = d.target_groups.iter().map(|t| t.name.clone()).collect();
    }
    q.target_groups_by_tag = Some(model::name_prefix(
        &v.svc.namespace().unwrap_or_default(),
        &v.svc.name_any(),
    ));
    with_pending(&mut q, &v.pending_target_groups);
    q
}

/// What a reconcile of `svc` would look at: load balancer names and target group names
/// (besides the target groups of that load balancer). `None` when the Service cannot be
/// modelled (bad annotations): then nothing of it can be judged unreachable.
pub fn reachable_names(v: &View) -> Option<(Vec<String>, Vec<String>)> {
    let opts = annotations::parse(v.svc.annotations()).ok()?;
    let ns = v.svc.namespace().unwrap_or_default();
    if !policy::refusals(&opts, &ns, &v.cluster.policy).is_empty() {
        return None;
    }
    let desired = desire(v, &opts).ok()?;
    let q = query(v.svc, Some(&desired), &opts, &v.cluster.cluster_name);
    Some((q.load_balancer_names, q.target_group_names))
}

/// The controller-wide node selector plus the Service's target-node-labels.
pub fn node_selector(
    cluster: &ClusterArgs,
    opts: &LoadBalancerOptions,
) -> BTreeMap<String, String> {
    let mut sel = cluster.node_selector.clone();
    sel.extend(opts.target_node_labels.clone());
    sel
}

/// Names to look for: the desired ones plus the load balancer behind the current hostname
/// (which differs after the name annotation changed).
fn query(
    svc: &Service,
    desired: Option<&DesiredLoadBalancer>,
    opts: &LoadBalancerOptions,
    cluster_name: &str,
) -> StackQuery {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let mut lb_names = Vec::new();
    match desired {
        Some(d) => lb_names.push(d.name.clone()),
        None => lb_names.push(
            opts.name
                .clone()
                .unwrap_or_else(|| model::load_balancer_name(cluster_name, &ns, &name)),
        ),
    }
    if let Some(from_host) = current_hostname(svc).and_then(name_from_hostname) {
        lb_names.push(from_host);
    }
    if desired.is_none() {
        // Teardown after annotations went bad: the default name is still worth a look.
        lb_names.push(model::load_balancer_name(cluster_name, &ns, &name));
    }
    StackQuery {
        service: format!("{ns}/{name}"),
        load_balancer_names: lb_names,
        target_group_names: desired
            .map(|d| d.target_groups.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default(),
        skip_foreign: desired.is_none(),
        target_groups_by_tag: None,
        identities_only: desired.is_none(),
    }
}

/// Adds the target groups earlier, unfinished plans created to what `q` looks for.
fn with_pending(q: &mut StackQuery, pending: &BTreeSet<String>) {
    for name in pending {
        if !q.target_group_names.contains(name) {
            q.target_group_names.push(name.clone());
        }
    }
}

/// `k8s-shop-web-0123456789-abcdef.elb.us-east-1.amazonaws.com` (AWS) or
/// `k8s-shop-web-0123456789-1.us-east-1.elb.amazonaws.com` (LocalStack) → the name before the
/// final `-suffix` of the first label.
pub fn name_from_hostname(host: &str) -> Option<String> {
    let first = host.split('.').next()?;
    let first = first.strip_prefix("internal-").unwrap_or(first);
    let (name, _) = first.rsplit_once('-')?;
    (!name.is_empty() && name.len() <= 32).then(|| name.to_string())
}

pub(crate) fn hash_of(d: &impl std::fmt::Debug) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{d:?}").hash(&mut h);
    h.finish()
}

/// The hash of `d` without its targets: equal hashes mean only targets differ.
pub(crate) fn structure_hash(d: &DesiredLoadBalancer) -> u64 {
    let mut bare = d.clone();
    for tg in &mut bare.target_groups {
        tg.targets.clear();
    }
    // Which nodes hint at the cluster's VPC moves with the nodes, like the targets.
    bare.node_instances.clear();
    hash_of(&bare)
}

/// Per target group, the targets to add and remove to go from `known` to `desired`; `None`
/// when a desired group is not known (then only a full sync can tell). Groups with nothing
/// to change are left out.
pub fn target_changes(
    desired: &DesiredLoadBalancer,
    known: &BTreeMap<String, RegisteredGroup>,
) -> Option<Vec<TargetChange>> {
    let mut changes = Vec::new();
    for tg in &desired.target_groups {
        let have = known.get(&tg.name)?;
        let register: Vec<Target> = tg.targets.difference(&have.targets).cloned().collect();
        let deregister: Vec<Target> = have.targets.difference(&tg.targets).cloned().collect();
        if !register.is_empty() || !deregister.is_empty() {
            changes.push(TargetChange {
                target_group: tg.name.clone(),
                arn: have.arn.clone(),
                register,
                deregister,
            });
        }
    }
    Some(changes)
}

/// What the controller knows of the stack after a full sync of `desired`: each desired
/// group's ARN (from `arns`, name → ARN) and its targets. Empty when an ARN is missing.
pub fn registered_groups(
    desired: &DesiredLoadBalancer,
    arns: &BTreeMap<String, String>,
) -> BTreeMap<String, RegisteredGroup> {
    let known: Option<BTreeMap<String, RegisteredGroup>> = desired
        .target_groups
        .iter()
        .map(|tg| {
            let arn = arns.get(&tg.name)?.clone();
            Some((
                tg.name.clone(),
                RegisteredGroup {
                    arn,
                    targets: tg.targets.clone(),
                    health_check_interval_seconds: tg.health_check.interval_seconds,
                },
            ))
        })
        .collect();
    known.unwrap_or_default()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(default_class: bool) -> ClusterArgs {
        ClusterArgs {
            policy: Default::default(),
            cluster_name: "c".into(),
            load_balancer_class: "cloudlb.io/nlb".into(),
            default_class,
            default_class_all: false,
            region: None,
            keep_not_ready_nodes: false,
            not_ready_guard_percent: 50,
            node_proxy_health_port: None,
            node_selector: BTreeMap::new(),
        }
    }

    fn svc_typed(type_: &str, class: Option<&str>, lb_type: Option<&str>) -> Service {
        let ann: BTreeMap<String, String> = lb_type
            .map(|t| (annotations::key("type"), t.to_string()))
            .into_iter()
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n", "annotations": ann},
            "spec": {"type": type_, "loadBalancerClass": class}
        }))
        .unwrap()
    }

    #[test]
    fn ownership_by_type_class_and_default_class_flags() {
        // (type, class, type annotation, --default-class, --default-class-all, ours)
        let cases = [
            (
                "LoadBalancer",
                Some("cloudlb.io/nlb"),
                None,
                false,
                false,
                true,
            ),
            (
                "LoadBalancer",
                Some("other.io/lb"),
                Some("external"),
                true,
                true,
                false,
            ),
            ("LoadBalancer", None, Some("external"), false, false, false),
            ("LoadBalancer", None, None, true, false, false),
            ("LoadBalancer", None, Some("nlb"), true, false, false),
            ("LoadBalancer", None, Some("external"), true, false, true),
            ("LoadBalancer", None, Some("nlb-ip"), true, false, true),
            ("LoadBalancer", None, None, true, true, true),
            ("NodePort", Some("cloudlb.io/nlb"), None, true, true, false),
            ("ClusterIP", None, Some("external"), true, true, false),
        ];
        for (t, class, lb_type, default, all, want) in cases {
            let mut c = cluster(default);
            c.default_class_all = all;
            assert_eq!(
                is_ours(&svc_typed(t, class, lb_type), &c),
                want,
                "{t} {class:?} {lb_type:?} default={default} all={all}"
            );
        }
    }

    #[test]
    fn finalizer_per_class() {
        use crate::controller::finalizer_for;
        assert_eq!(
            finalizer_for("cloudlb.io/nlb"),
            "cloudlb.io/load-balancer-cleanup"
        );
        assert_eq!(
            finalizer_for("cloudlb.io/internal"),
            "cloudlb.io/cleanup-cloudlb.io-internal"
        );
        let long = finalizer_for(&format!("example.com/{}", "x".repeat(100)));
        assert!(long.len() - "cloudlb.io/".len() <= 63, "{long}");
    }

    #[test]
    fn load_balancer_name_from_hostname() {
        let cases = [
            (
                "k8s-shop-web-0123456789-1.us-east-1.elb.amazonaws.com",
                Some("k8s-shop-web-0123456789"),
            ),
            (
                "k8s-shop-web-0123456789-abcdef0123.elb.us-east-1.amazonaws.com",
                Some("k8s-shop-web-0123456789"),
            ),
            (
                "internal-custom-1.us-east-1.elb.amazonaws.com",
                Some("custom"),
            ),
            ("nodash.example.com", None),
        ];
        for (host, want) in cases {
            assert_eq!(name_from_hostname(host).as_deref(), want, "{host}");
        }
    }
}
