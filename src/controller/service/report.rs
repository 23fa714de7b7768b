//! How a reconcile reports what it could not do: withheld deregistrations, failed syncs, bad
//! input and name conflicts, as Warning Events and status conditions.

use super::*;

/// The NotReady guard kept nodes registered: a Warning and the metric.
pub(super) async fn withheld_warning(svc: &Service, ctx: &Context, w: crate::model::Withheld) {
    ctx.metrics.not_ready_withheld.inc_by(w.not_ready as u64);
    warn!(
        not_ready = w.not_ready,
        nodes = w.candidates,
        "NotReady guard: keeping nodes registered"
    );
    let note = format!(
        "{} of {} target nodes are NotReady at once (more than --not-ready-guard-percent={}%); \
         keeping all of them registered and leaving them to the health checks",
        w.not_ready, w.candidates, ctx.cluster.not_ready_guard_percent
    );
    ctx.writes
        .event(svc, Note::warning("DeregistrationWithheld", "Sync", note))
        .await;
}

/// A Warning Event with AWS's message; the error goes on to the backoff.
pub(super) async fn sync_failed(svc: &Service, ctx: &Context, e: CloudError) -> CloudError {
    let note = format!(
        "Error syncing load balancer: {e}{}",
        if e.is_transient() {
            " (will retry)"
        } else {
            ""
        }
    );
    ctx.writes
        .event(svc, Note::warning("SyncLoadBalancerFailed", "Sync", note))
        .await;
    e
}

/// Bad input: status condition, and a Warning when that condition is new. No cloud change.
pub(super) async fn invalid(
    svc: &Service,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<Action, ReconcileError> {
    if report_invalid(svc, ctx, reason, message).await? {
        warn!(%reason, %message, "service cannot be reconciled; no cloud change made");
    }
    Ok(Action::await_change())
}

/// The condition (hostname kept) and, when that condition is new, the Warning; `Ok(true)`
/// when it was new.
pub(super) async fn report_invalid(
    svc: &Service,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<bool, ReconcileError> {
    let changed = ctx
        .writes
        .update_status(
            svc,
            status::Update {
                hostname: status::current_hostname(svc),
                synced: false,
                reason,
                message,
            },
        )
        .await?;
    if changed {
        let note = Note::warning(
            "SyncLoadBalancerFailed",
            "SyncLoadBalancerFailed",
            format!("{reason}: {message}"),
        );
        ctx.writes.event(svc, note).await;
    }
    Ok(changed)
}

/// Refused because another, older Service of ours wants the same load balancer name: this
/// Service gets the condition and a Warning, and the holder a Warning too (once, when this
/// Service's condition turns), so both owners see the clash.
pub(super) async fn name_taken(
    svc: &Service,
    ctx: &Context,
    name: &str,
    holder: &str,
) -> Result<Action, ReconcileError> {
    let me = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    let message = format!(
        "load balancer name {name} is already used by Service {holder}; choose another name (annotation service.beta.kubernetes.io/aws-load-balancer-name)"
    );
    if report_invalid(svc, ctx, "NameConflict", &message).await? {
        warn!(%name, %holder, "load balancer name taken; no cloud change made");
        let holder_ref = holder
            .split_once('/')
            .map(|(ns, n)| ObjectRef::<Service>::new(n).within(ns));
        if let Some(h) = holder_ref.and_then(|r| ctx.services.get(&r)) {
            let note = Note::warning(
                "LoadBalancerNameConflict",
                "Sync",
                format!(
                    "Service {me} also asks for load balancer name {name}; it is refused while this Service holds the name"
                ),
            );
            ctx.writes.event(&h, note).await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}
