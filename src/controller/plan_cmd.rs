//! `cloudlb plan`: what the controller would change in the cloud for the cluster as it is now,
//! without changing anything (a dry run to read before an upgrade or a config change).

use std::io::Write;

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::ClusterArgs;
use super::service::{is_ours, name_from_hostname, node_selector};
use super::status::current_hostname;
use crate::annotations;
use crate::cloud::aws::{AwsCloud, Ownership, RateLimits, StackQuery};
use crate::cloud::plan;
use crate::metrics::ControllerMetrics;
use crate::model;

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
    let sdk = super::aws_config(args.cluster.region.as_deref()).await;
    let cloud = AwsCloud::new(
        &sdk,
        Ownership {
            cluster: args.cluster.cluster_name.clone(),
        },
        ControllerMetrics::new(),
        RateLimits {
            qps: 10.0,
            burst: 40,
            targets_qps: 4.0,
            targets_burst: 20,
        },
    );
    let services: Api<Service> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let nodes: Vec<Node> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let slices = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let cluster = args.cluster.context();
    let mut out = std::io::stdout().lock();
    let mut total = 0;
    for svc in services.list(&ListParams::default()).await?.items {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let ours = is_ours(&svc, &args.cluster) && svc.metadata.deletion_timestamp.is_none();
        let has_finalizer = svc
            .finalizers()
            .iter()
            .any(|f| *f == super::finalizer_for(&args.cluster.load_balancer_class));
        if !ours && !has_finalizer {
            continue;
        }
        let desired = if ours {
            let opts = match annotations::parse(svc.annotations()) {
                Ok(o) => o,
                Err(errs) => {
                    for e in errs {
                        writeln!(out, "{key}: invalid: {e}")?;
                    }
                    continue;
                }
            };
            let eligible = model::eligible_nodes(
                &nodes,
                &node_selector(&args.cluster, &opts),
                args.cluster.keep_not_ready_nodes,
            );
            let own_slices: Vec<_> = slices
                .iter()
                .filter(|s| {
                    s.namespace() == svc.namespace()
                        && s.labels().get("kubernetes.io/service-name") == Some(&svc.name_any())
                })
                .cloned()
                .collect();
            match model::desired_load_balancer(&svc, &opts, &eligible, &own_slices, &cluster) {
                Ok(d) => Some(d),
                Err(e) => {
                    writeln!(out, "{key}: invalid: {e}")?;
                    continue;
                }
            }
        } else {
            None
        };
        let mut lb_names: Vec<String> = desired.iter().map(|d| d.name.clone()).collect();
        lb_names.extend(current_hostname(&svc).and_then(name_from_hostname));
        lb_names.push(model::load_balancer_name(
            &args.cluster.cluster_name,
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
        ));
        let q = StackQuery {
            service: key.clone(),
            load_balancer_names: lb_names,
            target_group_names: desired
                .iter()
                .flat_map(|d| d.target_groups.iter().map(|t| t.name.clone()))
                .collect(),
            skip_foreign: desired.is_none(),
        };
        let observed = match cloud.observe(&q).await {
            Ok(o) => o,
            Err(e) => {
                writeln!(out, "{key}: cannot observe: {e}")?;
                continue;
            }
        };
        let changes = plan::plan(desired.as_ref(), &observed);
        if changes.is_empty() {
            writeln!(out, "{key}: up to date")?;
        }
        for c in &changes {
            writeln!(out, "{key}: {c}")?;
        }
        total += changes.len();
    }
    writeln!(out, "{total} change(s)")?;
    Ok(())
}
