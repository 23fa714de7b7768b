//! The orphan sweep: resources tagged with our cluster whose Service no longer exists (its
//! finalizer was removed by hand, or it was force-deleted) are deleted after a grace period.
//! Resources of other clusters or without our tag are never touched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::service::is_ours;
use crate::model::tags;

/// Runs [`sweep_once`] every `interval` until shutdown.
pub async fn sweep_loop(
    ctx: Arc<Context>,
    services: Store<Service>,
    interval: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let _ = services.wait_until_ready().await;
    loop {
        match sweep_once(&ctx, &services, grace, &mut first_seen).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "orphan sweep deleted resources"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One sweep; returns how many resources it deleted. Load balancers go before target groups.
pub async fn sweep_once(
    ctx: &Context,
    services: &Store<Service>,
    grace: Duration,
    first_seen: &mut HashMap<String, Instant>,
) -> Result<usize, crate::cloud::CloudError> {
    let live: HashMap<String, String> = services
        .state()
        .iter()
        .filter(|s| is_ours(s, &ctx.cluster))
        .map(|s| {
            (
                format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                s.uid().unwrap_or_default(),
            )
        })
        .collect();
    let mut inventory = ctx.cloud.inventory().await?;
    // Load balancers first: a target group cannot go while a listener uses it.
    inventory.sort_by_key(|(arn, _, _)| arn.contains(":targetgroup/"));
    let mut deleted = 0;
    let mut still_orphaned = Vec::new();
    for (arn, name, t) in inventory {
        let service = t.get(tags::SERVICE).cloned().unwrap_or_default();
        let uid = t.get(tags::SERVICE_UID).cloned().unwrap_or_default();
        let alive = live
            .get(&service)
            .is_some_and(|live_uid| live_uid == &uid || uid.is_empty());
        if alive {
            continue;
        }
        still_orphaned.push(arn.clone());
        let since = *first_seen.entry(arn.clone()).or_insert_with(Instant::now);
        if since.elapsed() < grace {
            continue;
        }
        tracing::info!(%arn, %name, %service, "deleting orphaned resource");
        ctx.cloud.delete_by_arn(&arn, &name).await?;
        ctx.metrics.orphans_deleted.inc();
        deleted += 1;
    }
    first_seen.retain(|arn, _| still_orphaned.contains(arn));
    Ok(deleted)
}
