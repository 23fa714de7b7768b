//! The TargetGroupBinding controller: keeps a Service port's eligible nodes (at its nodePort) or
//! ready pod IPs registered in a target group made outside cloudlb, and takes out again exactly
//! the targets it registered when they stop being wanted or the binding goes. It only ever
//! registers and deregisters targets, only in groups tagged for this cluster, one binding per
//! group ([`claim`]): the group itself is never modified or deleted.
//!
//! Runs as a second kube-runtime Controller beside the Service controller, sharing its
//! [`Context`] (AWS client, rate limits, metrics, recorder) and node, EndpointSlice and Service
//! stores; `mod.rs` maps Service, Node and EndpointSlice changes to bindings.

pub mod claim;
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
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::{Instrument, info, info_span, warn};

use super::Context;
use super::events::{self, Note};
use super::memory::{Failures, PerObject, backoff};
use crate::cloud::{BoundTargetGroup, CloudError};
use crate::crd::{TargetGroupBinding, TargetType};
use crate::model::{Target, tags};
use claim::Refusal;
use status::Outcome;
use targets::{BindingProblem, NodePolicy};

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
    /// The binding controller's cache (set once it is built), for the one-binding-per-ARN rule.
    pub store: std::sync::OnceLock<Store<TargetGroupBinding>>,
}

impl State {
    /// Forgets a deleted binding: its cleanup cleared this already, unless its finalizer was
    /// stripped by hand (a force-delete), when no cleanup ever ran.
    pub fn forget(&self, key: &ObjectRef<TargetGroupBinding>) {
        self.applied.remove(key);
        self.failures.clear(key);
    }

    /// After a relist of the bindings: forgets every binding the cache no longer holds (deletes
    /// missed while the watch was down).
    pub fn prune(&self) {
        let Some(store) = self.store.get() else {
            return;
        };
        let live: std::collections::HashSet<ObjectRef<TargetGroupBinding>> = store
            .state()
            .iter()
            .map(|b| ObjectRef::from_obj(&**b))
            .collect();
        self.applied.retain(|k| live.contains(k));
        self.failures.retain(|k| live.contains(k));
    }
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
    let mut timer = ctx.metrics.bindings.start();
    let res = reconcile_inner(binding, &ctx)
        .instrument(info_span!("reconcile_binding", binding = %key))
        .await;
    if res.is_ok() {
        timer.ok();
    }
    drop(timer);
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
        // Pods waiting only on their readiness gates are registered (else a gate never passes).
        TargetType::Ip => super::readiness::gate::with_gated_ready(
            crate::model::slices_of_service(&ctx.slices.state(), &ns, name),
            &ctx.gated.snapshot(),
        ),
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
fn unusable(b: &TargetGroupBinding, tg: &BoundTargetGroup, cluster: &str) -> Option<Outcome> {
    match claim::access(&tg.tags, cluster) {
        Ok(()) => {}
        Err(Refusal::ManagedByCloudlb { service, cluster }) => {
            return Some(failure(
                "TargetGroupManagedByCloudlb",
                format!(
                    "target group {} belongs to cloudlb's load balancer for Service {service} (cluster {cluster}), which manages its targets itself; bind a target group made outside cloudlb",
                    tg.name
                ),
            ));
        }
        Err(Refusal::NotAllowed) => {
            return Some(failure(
                "TargetGroupNotAllowed",
                format!(
                    "target group {} is not tagged for this cluster: its owner must tag it {}={cluster} or {}=true before cluster {cluster} may register targets in it; nothing was changed",
                    tg.name,
                    tags::CLUSTER,
                    claim::allow_tag(cluster)
                ),
            ));
        }
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

/// `Conflict` when another binding of this controller holds the same ARN (see
/// [`claim::winner`]); read from the cache, no cloud call.
fn conflict(b: &TargetGroupBinding, ctx: &Context) -> Option<Outcome> {
    let store = ctx.bindings.store.get()?;
    let me = binding_key(b);
    let claim_of = |o: &TargetGroupBinding| claim::Claim {
        key: binding_key(o),
        created: o
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        holds_targets: o
            .status
            .as_ref()
            .and_then(|s| s.targets.as_ref())
            .is_some_and(|t| !t.is_empty()),
    };
    let mut claims: Vec<claim::Claim> = store
        .state()
        .iter()
        .filter(|o| o.spec.target_group_arn == b.spec.target_group_arn && binding_key(o) != me)
        .map(|o| claim_of(o))
        .collect();
    if claims.is_empty() {
        return None;
    }
    claims.push(claim_of(b));
    let winner = claim::winner(&claims)?;
    (winner.key != me).then(|| {
        failure(
            "Conflict",
            format!(
                "target group {} is already bound by TargetGroupBinding {} (one binding per target group); this binding registers and deregisters nothing while that one exists",
                b.spec.target_group_arn, winner.key
            ),
        )
    })
}

/// A few of the eligible nodes' instances, for learning the cluster's VPC.
fn node_instances(ctx: &Context) -> Vec<String> {
    crate::model::eligible_nodes(&ctx.nodes.state(), &ctx.cluster.node_selector, true)
        .into_iter()
        .take(5)
        .map(|n| n.instance_id)
        .collect()
}

fn binding_key(b: &TargetGroupBinding) -> String {
    format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any())
}

fn failure(reason: &str, message: String) -> Outcome {
    Outcome {
        ready: false,
        reason: reason.into(),
        message,
        registered: None,
        owned: None,
    }
}

/// How soon a binding in conflict looks again (from the cache only: no cloud call).
const CONFLICT_RECHECK: Duration = Duration::from_secs(5);

async fn apply(b: &TargetGroupBinding, ctx: &Context) -> Result<Action, BindingError> {
    let arn = &b.spec.target_group_arn;
    if let Some(o) = conflict(b, ctx) {
        report(b, ctx, &o).await?;
        return Ok(Action::requeue(CONFLICT_RECHECK));
    }
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

    let tg = match usable_group(b, ctx).await? {
        Ok(tg) => tg,
        Err(refusal) => {
            report(b, ctx, &refusal).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };
    let active = match ctx.cloud.active_targets(arn).await {
        Ok(Some(a)) => a,
        Ok(None) => BTreeSet::new(),
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    let owned = status::owned_targets(b.status.as_ref(), || desired.clone());
    let ledger = claim::Ledger::between(&desired, &active, &owned);
    write_targets(b, ctx, &tg, &owned, &ledger).await?;
    let count = i32::try_from(desired.len()).unwrap_or(i32::MAX);
    let outcome = Outcome {
        ready: true,
        reason: "TargetsRegistered".into(),
        message: format!(
            "{count} target(s) of Service {} registered in target group {}",
            b.spec.service_ref.name, tg.name
        ),
        registered: Some(count),
        owned: Some(ledger.owned_after),
    };
    report(b, ctx, &outcome).await?;
    ctx.bindings
        .applied
        .insert(reference, (hash, Instant::now()));
    Ok(Action::requeue(ctx.resync))
}

/// The bound group, if this binding may use it: it exists, carries a tag for this cluster,
/// takes the binding's target type and is in the cluster's VPC. `Ok(Err(outcome))`: refused,
/// nothing written.
async fn usable_group(
    b: &TargetGroupBinding,
    ctx: &Context,
) -> Result<Result<BoundTargetGroup, Outcome>, BindingError> {
    let arn = &b.spec.target_group_arn;
    let tg = match ctx.cloud.target_group(arn).await {
        Ok(Some(tg)) => tg,
        Ok(None) => {
            return Ok(Err(failure(
                "TargetGroupNotFound",
                format!("target group {arn} does not exist"),
            )));
        }
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    if let Some(o) = unusable(b, &tg, &ctx.cluster.cluster_name) {
        return Ok(Err(o));
    }
    match ctx.cloud.cluster_vpc(&node_instances(ctx)).await {
        Ok(vpc) if vpc == tg.vpc_id => Ok(Ok(tg)),
        Ok(vpc) => Ok(Err(failure(
            "OutsideClusterVpc",
            format!(
                "target group {} is in VPC {}, not the cluster's VPC {vpc}; nothing was changed",
                tg.name, tg.vpc_id
            ),
        ))),
        Err(CloudError::Refused { reason, message }) => Ok(Err(failure(reason, message))),
        Err(e) => Err(sync_failed(b, ctx, e).await),
    }
}

/// Registers what the ledger adds (remembering it first) and deregisters what it takes out.
async fn write_targets(
    b: &TargetGroupBinding,
    ctx: &Context,
    tg: &BoundTargetGroup,
    owned: &BTreeSet<Target>,
    ledger: &claim::Ledger,
) -> Result<(), BindingError> {
    let arn = &b.spec.target_group_arn;
    if !ledger.register.is_empty() {
        // Remembered before registering: a crash in between never leaves a target of ours
        // the binding would not take out again.
        if ledger.intent != *owned {
            status::remember_targets(&ctx.client, b, &ledger.intent).await?;
        }
        if let Err(e) = ctx.cloud.register_targets(arn, &ledger.register).await {
            return Err(sync_failed(b, ctx, e).await);
        }
        let text = targets::targets_text(&ledger.register, 10);
        info!(targets = %text, "registered targets");
        event(
            ctx,
            b,
            EventType::Normal,
            "RegisteredTargets",
            &format!(
                "Registered {} target(s) in {}: {text}",
                ledger.register.len(),
                tg.name
            ),
        )
        .await;
    }
    if !ledger.deregister.is_empty() {
        if let Err(e) = ctx.cloud.deregister_targets(arn, &ledger.deregister).await {
            return Err(sync_failed(b, ctx, e).await);
        }
        let text = targets::targets_text(&ledger.deregister, 10);
        info!(targets = %text, "deregistered targets");
        event(
            ctx,
            b,
            EventType::Normal,
            "DeregisteredTargets",
            &format!(
                "Deregistered {} target(s) from {}: {text}",
                ledger.deregister.len(),
                tg.name
            ),
        )
        .await;
    }
    Ok(())
}

/// Deregisters what the binding registered itself (its status remembers it), so the finalizer
/// can go; targets others put into the group stay. A binding that never registered anything
/// (in conflict, refused, never synced) makes no cloud call. A group that is gone, or that no
/// longer lets this cluster in, is left alone.
async fn cleanup(b: &TargetGroupBinding, ctx: &Context) -> Result<Action, BindingError> {
    let arn = &b.spec.target_group_arn;
    ctx.bindings.applied.remove(&ObjectRef::from_obj(b));
    let owned = status::owned_targets(b.status.as_ref(), || desire(b, ctx).unwrap_or_default());
    if owned.is_empty() {
        return Ok(Action::await_change());
    }
    let tg = match ctx.cloud.target_group(arn).await {
        Ok(Some(tg)) => tg,
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(sync_failed(b, ctx, e).await),
    };
    if let Some(o) = unusable(b, &tg, &ctx.cluster.cluster_name) {
        warn!(reason = %o.reason, "binding deleted; its targets are left in a group it may no longer use");
        return Ok(Action::await_change());
    }
    let Some(active) = ctx.cloud.active_targets(arn).await? else {
        return Ok(Action::await_change());
    };
    let ours = claim::release(&active, &owned);
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn binding(name: &str) -> TargetGroupBinding {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cloudlb.io/v1beta1",
            "kind": "TargetGroupBinding",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"targetGroupARN": "arn:aws:elasticloadbalancing:us-east-1:000000000000:targetgroup/x/1",
                     "serviceRef": {"name": "web", "port": 80}}
        }))
        .unwrap()
    }

    fn remember(state: &State, b: &TargetGroupBinding) {
        let key = ObjectRef::from_obj(b);
        state.applied.insert(key.clone(), (1, Instant::now()));
        state.failures.record(key);
    }

    #[test]
    fn a_deleted_binding_is_forgotten_and_a_relist_prunes_the_missed_ones() {
        let (store, mut writer) = reflector::store::<TargetGroupBinding>();
        let (kept, gone) = (binding("kept"), binding("gone"));
        writer.apply_watcher_event(&watcher::Event::Apply(kept.clone()));
        let state = State::default();
        let _ = state.store.set(store);
        remember(&state, &kept);
        remember(&state, &gone);
        // `gone` was force-deleted (finalizer stripped) while the watch was down: no cleanup
        // ran, and the relist's cache no longer holds it.
        state.prune();
        assert_eq!((state.applied.len(), state.failures.len()), (1, 1));
        assert!(state.applied.get(&ObjectRef::from_obj(&kept)).is_some());
        // `kept` is force-deleted while watched: its Delete event forgets it.
        state.forget(&ObjectRef::from_obj(&kept));
        assert_eq!((state.applied.len(), state.failures.len()), (0, 0));
    }
}
