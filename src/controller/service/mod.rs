//! Reconcile of one Service: [`decide`] what to do from the Service and the caches (pure), then
//! do it: finalizer, observe, plan, `cloud.deploy(plan)`, status and Events. Teardown when it
//! stops being ours. `cloudlb plan` runs the same [`dry_run`] without the writes.

pub mod decide;
mod report;
mod teardown;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{Instrument, info, info_span, warn};

use super::events::Note;
use super::memory::{Failures, NameSets, PerObject, backoff};
use super::writes::normal;
use super::{Context, policy, status};
use crate::cloud::plan::{self, Change, DeletionProtection};
use crate::cloud::{Cloud, CloudError, Plan, StackQuery};
use crate::model::DesiredLoadBalancer;
pub use decide::{
    Applied, Next, RegisteredGroup, TargetChange, View, decide, is_ours, name_from_hostname,
    node_selector, uses_ip_targets,
};
use report::*;
use teardown::*;

/// Why a reconcile failed; all are retried with backoff, and reported as Events.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Teardown found the load balancer deletion-protected and the Service does not turn
    /// protection off: nothing deleted, retried with backoff.
    #[error("load balancer {0} has deletion protection on")]
    DeletionProtected(String),
}

/// The Service controller's per-Service memory.
#[derive(Default)]
pub struct Memory {
    /// The hash of the last desired state fully applied, and when.
    pub applied: PerObject<ObjectRef<Service>, Applied>,
    /// Consecutive failures (for the 5 s → 300 s backoff).
    pub failures: Failures<ObjectRef<Service>>,
    /// Target groups a plan created that a later reconcile might not find by the desired
    /// names or the load balancer (the plan failed before their listener was made and the
    /// Service changed meanwhile). Observed until a plan completes.
    pub pending_target_groups: NameSets<ObjectRef<Service>>,
    /// Listener moves waiting for their new target group's health checks: group name → when
    /// the wait began (see `cloud::plan::hold_listener_moves`).
    pub move_waits: PerObject<ObjectRef<Service>, BTreeMap<String, Instant>>,
}

impl Memory {
    /// Services with a load balancer in status, for the managed-load-balancers gauge.
    pub fn managed(&self) -> i64 {
        self.applied.count(|a| a.hostname.is_some()) as i64
    }

    /// Forgets a Service entirely (deleted, or force-deleted without a teardown).
    pub fn forget(&self, key: &ObjectRef<Service>) {
        self.applied.remove(key);
        self.failures.clear(key);
        self.pending_target_groups.remove(key);
        self.move_waits.remove(key);
    }

    /// Forgets every Service `live` rejects (after a relist: deletes missed while the watch
    /// was down never come as events).
    pub fn retain(&self, live: impl Fn(&ObjectRef<Service>) -> bool) {
        self.applied.retain(&live);
        self.failures.retain(&live);
        self.pending_target_groups.retain(&live);
        self.move_waits.retain(&live);
    }
}

/// The entry point kube-runtime calls per Service key.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    let span = info_span!("reconcile", service = %key);
    let mut timer = ctx.metrics.services.start();
    let res = reconcile_inner(&svc, &ctx).instrument(span).await;
    if res.is_ok() {
        timer.ok();
    }
    drop(timer);
    if res.is_ok() {
        ctx.services_memory
            .failures
            .clear(&ObjectRef::from_obj(&*svc));
    }
    res
}

/// Requeue delay after consecutive failures: 5 s doubling to 300 s (the service controller's).
pub fn error_policy(svc: Arc<Service>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let n = ctx
        .services_memory
        .failures
        .record(ObjectRef::from_obj(&*svc));
    let delay = backoff(n);
    warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The view of `svc` from the controller's caches and memory.
fn with_view<T>(svc: &Service, ctx: &Context, f: impl FnOnce(&View) -> T) -> T {
    let key = ObjectRef::from_obj(svc);
    let nodes = ctx.nodes.state();
    let slices = ctx.slices.state();
    let view = View {
        svc,
        cluster: &ctx.cluster,
        finalizer: &ctx.finalizer,
        nodes: &nodes,
        slices: &slices,
        pending_target_groups: ctx
            .services_memory
            .pending_target_groups
            .get(&key)
            .unwrap_or_default(),
        applied: ctx.services_memory.applied.get(&key),
        gated: ctx.gated.snapshot(),
        name_holder: name_holder(svc, ctx),
        resync: ctx.resync,
        now: Instant::now(),
    };
    f(&view)
}

/// The older Service of ours (`ns/name`) that wants `svc`'s load balancer name, if any: the
/// oldest (then by key) of those wanting one name keeps it.
fn name_holder(svc: &Service, ctx: &Context) -> Option<String> {
    let name_of = |s: &Service| -> Option<String> {
        let opts = crate::annotations::parse(s.annotations()).ok()?;
        Some(opts.name.unwrap_or_else(|| {
            crate::model::load_balancer_name(
                &ctx.cluster.cluster_name,
                &s.namespace().unwrap_or_default(),
                &s.name_any(),
            )
        }))
    };
    let mine = name_of(svc)?;
    let rank = |s: &Service| {
        (
            s.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
        )
    };
    let me = rank(svc);
    ctx.services
        .state()
        .iter()
        .filter(|s| is_ours(s, &ctx.cluster) && s.metadata.deletion_timestamp.is_none())
        .filter(|s| rank(s) != me && rank(s) < me)
        .filter(|s| name_of(s).as_deref() == Some(mine.as_str()))
        .map(|s| rank(s).1)
        .min()
}

/// What a reconcile of `svc` would look at (for the orphan sweep); see
/// [`decide::reachable_names`].
pub fn reachable_names(svc: &Service, ctx: &Context) -> Option<(Vec<String>, Vec<String>)> {
    with_view(svc, ctx, decide::reachable_names)
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<Action, ReconcileError> {
    if !ctx.is_leader() {
        // A standby: the lease's winner reconciles everything when it takes over.
        return Ok(Action::await_change());
    }
    if !ctx.stores_synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // One view (caches copied, name holders scanned once) for the decision and the guard.
    let (next, withheld) = with_view(svc, ctx, |v| (decide(v), decide::withheld(v)));
    if matches!(
        next,
        Next::Sync { .. } | Next::Retarget { .. } | Next::UpToDate
    ) {
        if let Some(w) = withheld {
            withheld_warning(svc, ctx, w).await;
        }
    }
    match next {
        Next::Ignore => Ok(Action::await_change()),
        Next::Invalid { reason, message } => invalid(svc, ctx, reason, &message).await,
        Next::NameTaken { name, holder } => name_taken(svc, ctx, &name, &holder).await,
        Next::UpToDate => Ok(Action::requeue(ctx.resync)),
        Next::Restore { hostname } => restore(svc, ctx, hostname.as_deref()).await,
        Next::Retarget {
            desired,
            desired_hash,
            changes,
        } => retarget(svc, ctx, &desired, desired_hash, &changes).await,
        Next::Sync {
            desired,
            desired_hash,
            query,
            warnings,
        } => {
            if !warnings.is_empty() {
                // One Event: the recorder folds Events of one reason into a series.
                let note = Note::warning("AnnotationWarning", "Sync", warnings.join("; "));
                ctx.writes.event(svc, note).await;
            }
            sync(svc, ctx, *desired, desired_hash, &query).await
        }
        Next::Teardown { query, still_ours } => {
            cleanup(svc, ctx, &query, still_ours).await?;
            Ok(Action::await_change())
        }
    }
}

/// Brings the cloud to `desired`: finalizer first, then observe, plan, deploy, status.
async fn sync(
    svc: &Service,
    ctx: &Context,
    desired: DesiredLoadBalancer,
    desired_hash: u64,
    query: &StackQuery,
) -> Result<Action, ReconcileError> {
    let key = ObjectRef::from_obj(svc);
    ctx.writes.add_finalizer(svc, &ctx.finalizer).await?;
    let observed = match ctx.cloud.observe(query).await {
        Ok(o) => o,
        Err(e) => return Err(sync_failed(svc, ctx, e).await.into()),
    };
    let name = desired.name.clone();
    let mut plan = Plan::new(Some(desired), observed);
    let held = hold_moves(&mut plan, ctx, &key);
    let (hostname, arns, note) = if plan.changes.is_empty() {
        let arns = plan
            .observed
            .target_groups
            .iter()
            .map(|t| (t.name.clone(), t.arn.clone()))
            .collect();
        let hostname = plan
            .observed
            .load_balancer
            .as_ref()
            .map(|l| l.dns_name.clone());
        (hostname, arns, None)
    } else {
        // Outside the cluster's VPC: refused like bad input, before any write.
        if let Some(d) = &plan.desired {
            let by_tag = policy::tag_vetting(d.security_groups.as_deref(), &ctx.cluster.policy);
            match ctx.cloud.vet(d, &by_tag).await {
                Ok(()) => {}
                Err(CloudError::Refused { reason, message }) => {
                    return invalid(svc, ctx, reason, &message).await;
                }
                Err(e) => return Err(sync_failed(svc, ctx, e).await.into()),
            }
        }
        let creating = plan.observed.load_balancer.is_none();
        remember_created(&plan.changes, ctx, &key);
        // The Event is not on the way to the hostname: it is written while AWS works.
        let deployed = if creating {
            let note = normal("EnsuringLoadBalancer", "Ensuring load balancer");
            tokio::join!(ctx.writes.event(svc, note), ctx.cloud.deploy(&plan)).1
        } else {
            ctx.cloud.deploy(&plan).await
        };
        let deployed = match deployed {
            Ok(d) => d,
            Err(e) => return Err(sync_failed(svc, ctx, e).await.into()),
        };
        let summary = summarize(&plan.changes);
        let note = if creating {
            normal(
                "EnsuredLoadBalancer",
                format!("Ensured load balancer {name}"),
            )
        } else {
            normal(
                "UpdatedLoadBalancer",
                format!("Updated load balancer {name}: {summary}"),
            )
        };
        info!(changes = plan.changes.len(), %summary, "load balancer synced");
        (deployed.dns_name, deployed.target_group_arns, Some(note))
    };
    let desired = plan.desired.as_ref().ok_or_else(|| {
        ReconcileError::Cloud(CloudError::Internal("sync without desired state".into()))
    })?;
    if !held.is_empty() {
        return waiting_for_targets(svc, ctx, hostname.as_deref(), &held, note).await;
    }
    ctx.services_memory.move_waits.remove(&key);
    // The stack matches the plan: every target group a plan created is attached, and every
    // observed one it did not want is gone.
    ctx.services_memory.pending_target_groups.remove(&key);
    ctx.writes
        .update_status(
            svc,
            status::Update {
                hostname: hostname.as_deref(),
                synced: true,
                reason: "Synced",
                message: "load balancer matches the Service",
            },
        )
        .await?;
    // After the status: the hostname does not wait for the Event.
    if let Some(note) = note {
        ctx.writes.event(svc, note).await;
    }
    ctx.services_memory.applied.insert(
        key,
        Applied {
            desired_hash,
            structure_hash: decide::structure_hash(desired),
            hostname,
            at: Instant::now(),
            target_groups: decide::registered_groups(desired, &arns),
        },
    );
    ctx.metrics
        .managed_load_balancers
        .set(ctx.services_memory.managed());
    Ok(Action::requeue(ctx.resync))
}

/// How often a held listener move looks again at its new group's health (a full observe: the
/// move is rare and its wait bounded).
const MOVE_RECHECK: Duration = Duration::from_secs(2);

/// Holds back the listener moves of `plan` whose new group is not ready yet (within each
/// move's bounded wait, remembered per Service), logging what waits.
fn hold_moves(plan: &mut Plan, ctx: &Context, key: &ObjectRef<Service>) -> Vec<plan::HeldMove> {
    let Some(desired) = &plan.desired else {
        return Vec::new();
    };
    let now = Instant::now();
    let mut waits = ctx.services_memory.move_waits.get(key).unwrap_or_default();
    let held = plan::hold_listener_moves(&mut plan.changes, desired, &plan.observed, |tg| {
        let since = waits.get(tg).copied().unwrap_or(now);
        let bound = desired
            .target_groups
            .iter()
            .find(|t| t.name == tg)
            .map_or(Duration::ZERO, plan::wait_bound);
        now.duration_since(since) >= bound
    });
    waits.retain(|tg, _| held.iter().any(|h| h.to == *tg));
    for h in &held {
        waits.entry(h.to.clone()).or_insert(now);
        info!(port = h.port, from = %h.from, to = %h.to, warm_up_port = h.warm_up_port,
              healthy = h.healthy, needed = h.needed, "listener move waits for target health");
    }
    if waits.is_empty() {
        ctx.services_memory.move_waits.remove(key);
    } else {
        ctx.services_memory.move_waits.insert(key.clone(), waits);
    }
    held
}

/// A deploy held a listener move back: the hostname is written, the condition says what is
/// waiting, and the Service is looked at again shortly (no sync is remembered as complete).
async fn waiting_for_targets(
    svc: &Service,
    ctx: &Context,
    hostname: Option<&str>,
    held: &[plan::HeldMove],
    note: Option<Note>,
) -> Result<Action, ReconcileError> {
    let message = held
        .iter()
        .map(|h| {
            format!(
                "listener {} moves from target group {} to {} once {} of its targets pass their health checks ({} healthy so far; warm-up listener on port {})",
                h.port, h.from, h.to, h.needed, h.healthy, h.warm_up_port
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    ctx.writes
        .update_status(
            svc,
            status::Update {
                hostname,
                synced: false,
                reason: "WaitingForTargetHealth",
                message: &message,
            },
        )
        .await?;
    if let Some(note) = note {
        ctx.writes.event(svc, note).await;
    }
    ctx.services_memory
        .applied
        .remove(&ObjectRef::from_obj(svc));
    Ok(Action::requeue(MOVE_RECHECK))
}

/// The cached Service lacks what the last sync wrote (finalizer, hostname): write it again
/// from memory, without asking the cloud.
async fn restore(
    svc: &Service,
    ctx: &Context,
    hostname: Option<&str>,
) -> Result<Action, ReconcileError> {
    ctx.writes.add_finalizer(svc, &ctx.finalizer).await?;
    ctx.writes
        .update_status(
            svc,
            status::Update {
                hostname,
                synced: true,
                reason: "Synced",
                message: "load balancer matches the Service",
            },
        )
        .await?;
    Ok(Action::requeue(ctx.resync))
}

/// Only targets changed: one RegisterTargets and/or DeregisterTargets per changed group,
/// new targets before old ones go, all groups at once; no observe. Anything unexpected
/// (a group gone) fails the reconcile and forgets the memory, so the retry observes in full.
async fn retarget(
    svc: &Service,
    ctx: &Context,
    desired: &DesiredLoadBalancer,
    desired_hash: u64,
    changes: &[TargetChange],
) -> Result<Action, ReconcileError> {
    let key = ObjectRef::from_obj(svc);
    let cloud = ctx.cloud.as_ref();
    let registered = futures::future::try_join_all(
        changes
            .iter()
            .filter(|c| !c.register.is_empty())
            .map(|c| cloud.register_targets(&c.arn, &c.register)),
    )
    .await;
    let deregistered = match registered {
        Ok(_) => {
            futures::future::try_join_all(
                changes
                    .iter()
                    .filter(|c| !c.deregister.is_empty())
                    .map(|c| cloud.deregister_targets(&c.arn, &c.deregister)),
            )
            .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = deregistered {
        ctx.services_memory.applied.remove(&key);
        return Err(sync_failed(svc, ctx, e).await.into());
    }
    let (added, removed) = changes.iter().fold((0, 0), |(a, r), c| {
        (a + c.register.len(), r + c.deregister.len())
    });
    info!(groups = changes.len(), added, removed, "targets updated");
    let note = normal(
        "UpdatedLoadBalancer",
        format!(
            "Updated load balancer {}: targets +{added} -{removed} in {} target group(s)",
            desired.name,
            changes.len()
        ),
    );
    ctx.writes.event(svc, note).await;
    if let Some(mut a) = ctx.services_memory.applied.get(&key) {
        let arns = a
            .target_groups
            .iter()
            .map(|(n, g)| (n.clone(), g.arn.clone()))
            .collect();
        a.desired_hash = desired_hash;
        a.target_groups = decide::registered_groups(desired, &arns);
        ctx.services_memory.applied.insert(key, a);
    }
    Ok(Action::requeue(ctx.resync))
}

/// Notes, before applying, the target groups `changes` will create: if the plan stops half
/// way and the Service then changes, the next reconcile still finds (and deletes) them.
fn remember_created(changes: &[Change], ctx: &Context, key: &ObjectRef<Service>) {
    let created: BTreeSet<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::CreateTargetGroup(tg) => Some(tg.name.clone()),
            _ => None,
        })
        .collect();
    if !created.is_empty() {
        ctx.services_memory
            .pending_target_groups
            .update(key.clone(), |p| p.extend(created));
    }
}

fn summarize(changes: &[Change]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in changes {
        *counts.entry(c.kind()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k}×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `cloudlb plan` reports for one Service.
#[derive(Debug)]
pub enum DryRun {
    /// Not ours and nothing to tear down.
    Ignore,
    /// Bad input: the reason and message a reconcile would report.
    Invalid(String),
    /// Nothing changed since the last sync (never for `cloudlb plan`, which has no memory).
    UpToDate,
    /// The plan a reconcile would deploy.
    Plan(Box<Plan>),
}

/// The same decision and plan as a reconcile, without any write.
pub async fn dry_run(view: &View<'_>, cloud: &dyn Cloud) -> Result<DryRun, CloudError> {
    let (desired, query) = match decide(view) {
        Next::Ignore => return Ok(DryRun::Ignore),
        Next::Invalid { reason, message } => {
            return Ok(DryRun::Invalid(format!("{reason}: {message}")));
        }
        Next::NameTaken { name, holder } => {
            return Ok(DryRun::Invalid(format!(
                "NameConflict: load balancer name {name} is Service {holder}'s"
            )));
        }
        // Both need the memory of a sync, which `cloudlb plan` does not have.
        Next::UpToDate | Next::Restore { .. } | Next::Retarget { .. } => {
            return Ok(DryRun::UpToDate);
        }
        Next::Sync { desired, query, .. } => (Some(*desired), query),
        Next::Teardown { query, .. } => (None, query),
    };
    let observed = cloud.observe(&query).await?;
    let mut plan = Plan::new(desired, observed);
    // As a reconcile would now: a move's wait begins.
    if let Some(d) = &plan.desired {
        plan::hold_listener_moves(&mut plan.changes, d, &plan.observed, |_| false);
    }
    Ok(DryRun::Plan(Box::new(plan)))
}
