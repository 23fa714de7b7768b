//! `cloudlb plan`: what the controller would change in the cloud for the cluster as it is now,
//! without changing anything (a dry run to read before an upgrade or a config change). It
//! builds the same [`View`] a reconcile builds and runs the same decision and plan
//! ([`service::dry_run`]), only without memory of earlier syncs and without writes.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::service::{self, DryRun, View};
use super::{ClusterArgs, finalizer_for};
use crate::cloud::aws::{AwsCloud, RateLimits};
use crate::metrics::ControllerMetrics;

/// Command-line settings of `cloudlb plan`.
#[derive(Clone, Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Only this namespace (default: all).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// Prints, per Service, the changes a reconcile would make. Exit status 0 either way.
pub async fn run(args: PlanArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let cloud = AwsCloud::from_env(
        args.cluster.region.as_deref(),
        args.cluster.ownership(),
        ControllerMetrics::new(),
        RateLimits::default(),
    )
    .await
    .with_vpc(args.cluster.policy.vpc_id.clone());
    let services: Api<Service> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let nodes: Vec<Arc<Node>> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let slices: Vec<Arc<EndpointSlice>> = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let finalizer = finalizer_for(&args.cluster.load_balancer_class);
    let mut out = std::io::stdout().lock();
    let mut total = 0;
    for svc in services.list(&ListParams::default()).await?.items {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let view = View {
            svc: &svc,
            cluster: &args.cluster,
            finalizer: &finalizer,
            nodes: &nodes,
            slices: &slices,
            pending_target_groups: BTreeSet::new(),
            gated: Default::default(),
            applied: None,
            name_holder: None,
            resync: Duration::ZERO,
            now: Instant::now(),
        };
        match service::dry_run(&view, &cloud).await {
            Ok(DryRun::Ignore) => {}
            Ok(DryRun::Invalid(message)) => writeln!(out, "{key}: invalid: {message}")?,
            Ok(DryRun::UpToDate) => writeln!(out, "{key}: up to date")?,
            Ok(DryRun::Plan(plan)) => {
                if plan.changes.is_empty() {
                    writeln!(out, "{key}: up to date")?;
                }
                for c in &plan.changes {
                    writeln!(out, "{key}: {c}")?;
                }
                total += plan.changes.len();
            }
            Err(e) => writeln!(out, "{key}: cannot observe: {e}")?,
        }
    }
    writeln!(out, "{total} change(s)")?;
    Ok(())
}
