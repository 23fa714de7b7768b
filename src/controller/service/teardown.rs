//! Teardown of a Service that stops being ours (deleted, type or class changed): everything it
//! owns in the cloud first, then its status and finalizer.

use super::*;

/// Deletes everything the Service owns, then its status and finalizer.
pub(super) async fn cleanup(
    svc: &Service,
    ctx: &Context,
    query: &StackQuery,
    still_ours: bool,
) -> Result<(), ReconcileError> {
    let key = ObjectRef::from_obj(svc);
    let observed = match ctx.cloud.observe(query).await {
        Ok(o) => o,
        Err(e) => return Err(sync_failed(svc, ctx, e).await.into()),
    };
    if let DeletionProtection::Blocked(name) =
        plan::deletion_protection(&observed, says_protection_off(svc))
    {
        let note = Note::warning(
            "DeletionProtected",
            "Delete",
            format!(
                "load balancer {name} has deletion_protection.enabled=true, so nothing was deleted and the finalizer stays; set the annotation {}: deletion_protection.enabled=false (cloudlb then turns it off and deletes) or turn it off in AWS",
                crate::annotations::key("attributes")
            ),
        );
        ctx.writes.event(svc, note).await;
        return Err(ReconcileError::DeletionProtected(name));
    }
    let plan = Plan::new(None, observed);
    if !plan.changes.is_empty() {
        let note = normal("DeletingLoadBalancer", "Deleting load balancer");
        ctx.writes.event(svc, note).await;
        if let Err(e) = ctx.cloud.deploy(&plan).await {
            return Err(sync_failed(svc, ctx, e).await.into());
        }
        let note = normal("DeletedLoadBalancer", "Deleted load balancer");
        ctx.writes.event(svc, note).await;
        info!(service = %query.service, changes = plan.changes.len(), "load balancer deleted");
    }
    if svc.metadata.deletion_timestamp.is_none() && !still_ours {
        ctx.writes.clear_status(svc).await?;
    }
    ctx.services_memory.pending_target_groups.remove(&key);
    ctx.writes.remove_finalizer(svc, &ctx.finalizer).await?;
    ctx.services_memory.forget(&key);
    ctx.metrics
        .managed_load_balancers
        .set(ctx.services_memory.managed());
    Ok(())
}

/// Whether the Service's own annotations say `deletion_protection.enabled=false`.
pub(super) fn says_protection_off(svc: &Service) -> bool {
    crate::annotations::parse(svc.annotations()).is_ok_and(|o| {
        o.load_balancer_attributes
            .get(plan::DELETION_PROTECTION)
            .is_some_and(|v| v == "false")
    })
}
