//! The TargetGroupBinding controller: keeps the targets of a target group made outside cloudlb
//! equal to a Service port's eligible nodes (at its nodePort) or ready pod IPs, and deregisters
//! them when the binding goes. It only ever registers and deregisters targets: the group itself
//! is never modified or deleted, and it needs no cloudlb tag.
//!
//! Runs as a second kube-runtime Controller beside the Service controller, sharing its
//! [`Context`] (AWS client, rate limits, metrics, recorder) and node, EndpointSlice and Service
//! stores; `mod.rs` maps Service, Node and EndpointSlice changes to bindings.

pub mod status;
pub mod targets;

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use tracing::{Instrument, info, info_span, warn};

use super::Context;
use super::events::{self, Note};
use super::memory::{Failures, PerObject, backoff};
use crate::cloud::{BoundTargetGroup, CloudError};
use crate::crd::{TargetGroupBinding, TargetType};
use crate::model::{Target, tags};
use status::Outcome;
use targets::{BindingProblem, NodePolicy, TargetChanges};

/// Holds a binding until every target it registered is deregistered.
pub const FINALIZER: &str = "cloudlb.io/targetgroupbinding-cleanup";

/// A failed binding reconcile; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("the controller's caches are not synced")]
    NotSynced,
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<BindingError>>),
}

/// Per-binding memory of the controller (not persisted; a restart simply observes again).
#[derive(Default)]
pub struct State {
    /// The hash of the last desired target set fully applied, and when.
    applied: PerObject<ObjectRef<TargetGroupBinding>, (u64, Instant)>,
    /// Consecutive failures, for the 5 s → 300 s backoff.
    failures: Failures<ObjectRef<TargetGroupBinding>>,
}

/// Whether a binding is affected by a change of the Service `namespace/name`.
pub fn refers_to(b: &TargetGroupBinding, namespace: &str, name: &str) -> bool {
    b.namespace().as_deref() == Some(namespace) && b.spec.service_ref.name == name
}

/// The entry point kube-runtime calls per binding key.
pub async fn reconcile(
    binding: Arc<TargetGroupBinding>,
    ctx: Arc<Context>,
) -> Result<Action, BindingError> {
    let key = format!(
        "{}/{}",
        binding.namespace().unwrap_or_default(),
        binding.name_any()
    );
    let reference = ObjectRef::from_obj(&*binding);
    let started = Instant::now();
    let res = reconcile_inner(binding, &ctx)
        .instrument(info_span!("reconcile_binding", binding = %key))
        .await;
    ctx.metrics
        .binding_reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let result = if res.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .binding_reconciles
        .get_or_create(&crate::metrics::ResultLabels { result })
        .inc();
    if res.is_ok() {
        ctx.bindings.failures.clear(&reference);
    }
    res
}

/// Requeue after consecutive failures: 5 s doubling to 300 s, like the Service controller.
pub fn error_policy(
    binding: Arc<TargetGroupBinding>,
    err: &BindingError,
    ctx: Arc<Context>,
) -> Action {
    let n = ctx.bindings.failures.record(ObjectRef::from_obj(&*binding));
    let delay = match err {
        BindingError::NotSynced => Duration::from_secs(1),
        _ => backoff(n),
    };
    warn!(binding = %format!("{}/{}", binding.namespace().unwrap_or_default(), binding.name_any()),
          error = %err, retry_in = ?delay, "binding reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(
    binding: Arc<TargetGroupBinding>,
    ctx: &Context,
) -> Result<Action, BindingError> {
    if !ctx.is_leader() {
        // A standby: the lease's winner reconciles every binding when it takes over.
        return Ok(Action::await_change());
    }
    // An empty store would mean "no nodes, no Service": never act on it.
    if !ctx.stores_synced() {
        return Err(BindingError::NotSynced);
    }
    let api: Api<TargetGroupBinding> =
        Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, binding, |event| async move {
        match event {
            finalizer::Event::Apply(b) => apply(&b, ctx).await,
            finalizer::Event::Cleanup(b) => cleanup(&b, ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => BindingError::Finalizer(Box::new(other)),
    })
}

/// The targets the binding wants now, from the shared stores.
fn desire(b: &TargetGroupBinding, ctx: &Context) -> Result<BTreeSet<Target>, BindingProblem> {
    let ns = b.namespace().unwrap_or_default();
    let name = &b.spec.service_ref.name;
    let svc: Option<Arc<Service>> = ctx.services.get(&ObjectRef::new(name).within(&ns));
    // The cache's Arcs, never deep copies of every Node.
    let nodes: Vec<Arc<Node>> = match b.spec.target_type {
        TargetType::Instance => ctx.nodes.state(),
        TargetType::Ip => Vec::new(),
    };
    let slices: Vec<EndpointSlice> = match b.spec.target_type {
        TargetType::Ip => crate::model::slices_of_service(&ctx.slices.state(), &ns, name),
        TargetType::Instance => Vec::new(),
    };
    let policy = NodePolicy {
        selector: ctx.cluster.node_selector.clone(),
        include_not_ready: ctx.cluster.keep_not_ready_nodes,
        not_ready_guard_percent: ctx.cluster.not_ready_guard_percent,
    };
    targets::desired_targets(&b.spec, &ns, svc.as_deref(), &nodes, &slices, &policy)
}

fn hash_of(b: &TargetGroupBinding, desired: &BTreeSet<Target>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.spec.target_group_arn.hash(&mut h);
    b.metadata.generation.hash(&mut h);
    desired.hash(&mut h);
    h.finish()
}

/// Why a target group cannot take this binding's targets, if it cannot.
fn unusable(b: &TargetGroupBinding, tg: &BoundTargetGroup) -> Option<Outcome> {
    if let Some(cluster) = tg.tags.get(tags::CLUSTER) {
        let service = tg
            .tags
            .get(tags::SERVICE)
            .map(String::as_str)
            .unwrap_or("?");
        return Some(failure(
            "TargetGroupManagedByCloudlb",
            format!(
                "target group {} belongs to cloudlb's load balancer for Service {service} (cluster {cluster}), which manages its targets itself; bind a target group made outside cloudlb",
                tg.name
            ),
        ));
    }
    let wanted = b.spec.target_type;
    if !targets::accepts(&tg.target_type, wanted) {
        return Some(failure(
            "TargetTypeMismatch",
            format!(
                "target group {} takes {} targets, but the binding registers {}",
                tg.name,
                tg.target_type,
                match wanted {
                    TargetType::Instance => "instance",
                    TargetType::Ip => "ip",
                }
            ),
        ));
    }
    None
}

fn failure(reason: &str, message: String) -> Outcome {
    Outcome {
        ready: false,
        reason: reason.into(),
        message,
        registered: None,
    }
}

async fn apply(b: &TargetGroupBinding, ctx: &Context) -> Result<Action, BindingError> {
    let arn = &b.spec.target_group_arn;
    let desired = match desire(b, ctx) {
        Ok(d) => d,
        Err(problem) => {
            let message = format!("{problem}; the target group's targets are left as they are");
            report(b, ctx, &failure(problem.reason(), message)).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };

    let reference = ObjectRef::from_obj(b);
    let hash = hash_of(b, &desired);
    let ready_now = status::ready_condition(b.status.as_ref())
        .is_some_and(|c| c.status == crate::crd::ConditionStatus::True);
    if let Some((h, at)) = ctx.bindings.applied.get(&reference) {
        if h == hash && at.elapsed() < ctx.resync && ready_now {
            return Ok(Action::requeue(ctx.resync));
        }
    }

    let tg = match ctx.cloud.target_group(arn).await {
        Ok(Some(tg)) => tg,
        Ok(None) => {
            let o = failure(
                "TargetGroupNotFound",
                format!("target group {arn} does not exist"),
            );
            report(b, ctx, &o).await?;
            return Ok(Action::requeue(ctx.resync));
        }
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    if let Some(o) = unusable(b, &tg) {
        report(b, ctx, &o).await?;
        return Ok(Action::requeue(ctx.resync));
    }
    let active = match ctx.cloud.active_targets(arn).await {
        Ok(Some(a)) => a,
        Ok(None) => BTreeSet::new(),
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    let changes = TargetChanges::between(&desired, &active);
    if !changes.register.is_empty() {
        if let Err(e) = ctx.cloud.register_targets(arn, &changes.register).await {
            return Err(sync_failed(b, ctx, e).await);
        }
        let text = targets::targets_text(&changes.register, 10);
        info!(targets = %text, "registered targets");
        event(
            ctx,
            b,
            EventType::Normal,
            "RegisteredTargets",
            &format!(
                "Registered {} target(s) in {}: {text}",
                changes.register.len(),
                tg.name
            ),
        )
        .await;
    }
    if !changes.deregister.is_empty() {
        if let Err(e) = ctx.cloud.deregister_targets(arn, &changes.deregister).await {
            return Err(sync_failed(b, ctx, e).await);
        }
        let text = targets::targets_text(&changes.deregister, 10);
        info!(targets = %text, "deregistered targets");
        event(
            ctx,
            b,
            EventType::Normal,
            "DeregisteredTargets",
            &format!(
                "Deregistered {} target(s) from {}: {text}",
                changes.deregister.len(),
                tg.name
            ),
        )
        .await;
    }
    let count = i32::try_from(desired.len()).unwrap_or(i32::MAX);
    let outcome = Outcome {
        ready: true,
        reason: "TargetsRegistered".into(),
        message: format!(
            "{count} target(s) of Service {} registered in target group {}",
            b.spec.service_ref.name, tg.name
        ),
        registered: Some(count),
    };
    report(b, ctx, &outcome).await?;
    ctx.bindings
        .applied
        .insert(reference, (hash, Instant::now()));
    Ok(Action::requeue(ctx.resync))
}

/// Deregisters what the binding registered, so the finalizer can go. Once a binding has synced,
/// the group's targets are exactly the ones it keeps there, so all of them go; a binding that
/// never synced only takes back the targets it would have registered (a first sync may have
/// registered them before a crash). A group that is gone, or that belongs to cloudlb's own
/// load balancers, is left alone.
async fn cleanup(b: &TargetGroupBinding, ctx: &Context) -> Result<Action, BindingError> {
    let arn = &b.spec.target_group_arn;
    ctx.bindings.applied.remove(&ObjectRef::from_obj(b));
    let tg = match ctx.cloud.target_group(arn).await {
        Ok(Some(tg)) => tg,
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    if unusable(b, &tg).is_some() {
        return Ok(Action::await_change());
    }
    let Some(active) = ctx.cloud.active_targets(arn).await? else {
        return Ok(Action::await_change());
    };
    let ours: Vec<Target> = if status::ever_synced(b.status.as_ref()) {
        active.into_iter().collect()
    } else {
        let desired = desire(b, ctx).unwrap_or_default();
        active.intersection(&desired).cloned().collect()
    };
    if !ours.is_empty() {
        if let Err(e) = ctx.cloud.deregister_targets(arn, &ours).await {
            return Err(sync_failed(b, ctx, e).await);
        }
        let text = targets::targets_text(&ours, 10);
        info!(targets = %text, "binding deleted; deregistered its targets");
        event(
            ctx,
            b,
            EventType::Normal,
            "DeregisteredTargets",
            &format!(
                "Binding deleted: deregistered {} target(s) from {}: {text}",
                ours.len(),
                tg.name
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Ready False from an AWS error (with AWS's message), a Warning Event on the transition; the
/// error goes back to kube-runtime for the backoff.
async fn sync_failed(b: &TargetGroupBinding, ctx: &Context, e: CloudError) -> BindingError {
    let suffix = if e.is_transient() {
        " (will retry)"
    } else {
        ""
    };
    let o = failure("SyncFailed", format!("{e}{suffix}"));
    if let Err(ke) = report(b, ctx, &o).await {
        warn!(error = %ke, "cannot update binding status");
    }
    BindingError::Cloud(e)
}

/// Writes the outcome to status; a changed Ready False also becomes a Warning Event.
async fn report(b: &TargetGroupBinding, ctx: &Context, o: &Outcome) -> Result<(), kube::Error> {
    let changed = status::update(&ctx.client, b, o).await?;
    if changed && !o.ready {
        warn!(reason = %o.reason, message = %o.message, "binding not ready");
        event(ctx, b, EventType::Warning, &o.reason, &o.message).await;
    }
    Ok(())
}

async fn event(ctx: &Context, b: &TargetGroupBinding, type_: EventType, reason: &str, note: &str) {
    let note = Note {
        type_,
        reason: reason.into(),
        action: "SyncTargets".into(),
        note: note.into(),
    };
    events::publish(&ctx.recorder, b, note).await;
}
