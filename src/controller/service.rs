//! Reconcile of one Service: decide whether it is ours, build the desired load balancer,
//! observe, plan, apply, and report (status, condition, Events). Teardown when it stops being ours.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use super::{ClusterArgs, Context, status};
use crate::annotations::{self, LoadBalancerOptions};
use crate::cloud::CloudError;
use crate::cloud::aws::{ApplyState, StackQuery};
use crate::cloud::plan::{self, Change, ObservedStack};
use crate::model::{self, DesiredLoadBalancer, ModelError, TargetType};

/// Why a reconcile failed; all are retried with backoff, and reported as Events.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What was last applied for a Service, so an unchanged Service costs no AWS call until the
/// periodic drift check.
#[derive(Clone, Debug)]
pub struct Applied {
    desired_hash: u64,
    hostname: Option<String>,
    at: Instant,
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
        None => cluster.default_class,
    }
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
    let a: BTreeMap<String, String> = svc.annotations().clone();
    annotations::parse(&a).is_ok_and(|o| o.target_type == TargetType::Ip)
}

/// The entry point kube-runtime calls per Service key.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    let span = info_span!("reconcile", service = %key);
    let started = Instant::now();
    let res = reconcile_inner(&svc, &ctx, &key).instrument(span).await;
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let result = if res.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::ResultLabels { result })
        .inc();
    if res.is_ok() {
        ctx.failures
            .lock()
            .await
            .remove(&ObjectRef::from_obj(&*svc));
    }
    res
}

/// Requeue delay after consecutive failures: 5 s doubling to 300 s (the service controller's).
pub fn error_policy(svc: Arc<Service>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(&*svc);
    let n = {
        // Never block the controller loop on this lock for long.
        match ctx.failures.try_lock() {
            Ok(mut f) => {
                let n = f.entry(key).or_insert(0);
                *n += 1;
                *n
            }
            Err(_) => 1,
        }
    };
    let delay = Duration::from_secs((5u64 << (n.min(7) - 1)).min(300));
    warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(
    svc: &Service,
    ctx: &Context,
    key: &str,
) -> Result<Action, ReconcileError> {
    if !ctx.stores_synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if foreign_class(svc, &ctx.cluster) {
        // loadBalancerClass is immutable while the type is LoadBalancer: a Service of another
        // class never was ours, whatever finalizers it carries.
        return Ok(Action::await_change());
    }
    let ours = is_ours(svc, &ctx.cluster);
    if !ours || svc.meta().deletion_timestamp.is_some() {
        if status::has_finalizer(svc, &ctx.finalizer) {
            cleanup(svc, ctx, key, ours).await?;
        }
        return Ok(Action::await_change());
    }

    // Bad input: report, change nothing in the cloud, wait for the Service to change.
    let opts = match annotations::parse(svc.annotations()) {
        Ok(o) => o,
        Err(errs) => {
            let message = errs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return invalid(svc, ctx, "InvalidAnnotation", &message).await;
        }
    };
    let desired = match desire(svc, ctx, &opts) {
        Ok(d) => d,
        Err(e) => return invalid(svc, ctx, "InvalidService", &e.to_string()).await,
    };

    let desired_hash = hash_of(&desired);
    let svc_ref = ObjectRef::from_obj(svc);
    let hostname_now = status::current_hostname(svc).map(str::to_string);
    if let Some(a) = ctx.applied.lock().await.get(&svc_ref) {
        if a.desired_hash == desired_hash
            && a.at.elapsed() < ctx.resync
            && a.hostname == hostname_now
            && status::has_finalizer(svc, &ctx.finalizer)
        {
            return Ok(Action::requeue(ctx.resync));
        }
    }

    status::add_finalizer(&ctx.client, svc, &ctx.finalizer).await?;
    let mut q = query(svc, Some(&desired), &opts, ctx);
    with_pending(&mut q, ctx, &svc_ref).await;
    let observed = ctx
        .cloud
        .observe(&q)
        .await
        .map_err(|e| report_sync_failure(svc, ctx, e))?;
    let changes = plan::plan(Some(&desired), &observed);
    let hostname = if changes.is_empty() {
        observed.load_balancer.as_ref().map(|l| l.dns_name.clone())
    } else {
        let creating = observed.load_balancer.is_none();
        if creating {
            event(
                ctx,
                svc,
                EventType::Normal,
                "EnsuringLoadBalancer",
                "Ensuring load balancer",
            )
            .await;
        }
        remember_created(&changes, ctx, &svc_ref).await;
        let st = apply_all(svc, ctx, &changes, Some(&desired), &observed).await?;
        let summary = summarize(&changes);
        if creating {
            event(
                ctx,
                svc,
                EventType::Normal,
                "EnsuredLoadBalancer",
                &format!("Ensured load balancer {}", desired.name),
            )
            .await;
        } else {
            event(
                ctx,
                svc,
                EventType::Normal,
                "UpdatedLoadBalancer",
                &format!("Updated load balancer {}: {summary}", desired.name),
            )
            .await;
        }
        info!(changes = changes.len(), %summary, "load balancer synced");
        st.dns_name
    };
    // The stack matches the plan: every target group a plan created is attached, and every
    // observed one it did not want is gone.
    ctx.pending_target_groups.lock().await.remove(&svc_ref);
    status::update(
        &ctx.client,
        svc,
        hostname.as_deref(),
        true,
        "Synced",
        "load balancer matches the Service",
    )
    .await?;
    ctx.applied.lock().await.insert(
        svc_ref,
        Applied {
            desired_hash,
            hostname,
            at: Instant::now(),
        },
    );
    Ok(Action::requeue(ctx.resync))
}

/// The desired load balancer from the Service and the controller's stores.
fn desire(
    svc: &Service,
    ctx: &Context,
    opts: &LoadBalancerOptions,
) -> Result<DesiredLoadBalancer, ModelError> {
    let nodes: Vec<_> = ctx.nodes.state().iter().map(|n| (**n).clone()).collect();
    let eligible = model::eligible_nodes(
        &nodes,
        &node_selector(&ctx.cluster, opts),
        ctx.cluster.keep_not_ready_nodes,
    );
    let slices: Vec<EndpointSlice> = if opts.target_type == TargetType::Ip {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        ctx.slices
            .state()
            .iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(ns.as_str())
                    && s.labels().get("kubernetes.io/service-name") == Some(&name)
            })
            .map(|s| (**s).clone())
            .collect()
    } else {
        Vec::new()
    };
    model::desired_load_balancer(svc, opts, &eligible, &slices, &ctx.cluster.context())
}

/// What a reconcile of `svc` would look at: load balancer names and target group names
/// (besides the target groups of that load balancer). `None` when the Service cannot be
/// modelled (bad annotations): then nothing of it can be judged unreachable.
pub fn reachable_names(svc: &Service, ctx: &Context) -> Option<(Vec<String>, Vec<String>)> {
    let opts = annotations::parse(svc.annotations()).ok()?;
    let desired = desire(svc, ctx, &opts).ok()?;
    let q = query(svc, Some(&desired), &opts, ctx);
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
    ctx: &Context,
) -> StackQuery {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let mut lb_names = Vec::new();
    match desired {
        Some(d) => lb_names.push(d.name.clone()),
        None => {
            lb_names.push(opts.name.clone().unwrap_or_else(|| {
                model::load_balancer_name(&ctx.cluster.cluster_name, &ns, &name)
            }))
        }
    }
    if let Some(from_host) = status::current_hostname(svc).and_then(name_from_hostname) {
        lb_names.push(from_host);
    }
    if desired.is_none() {
        // Teardown after annotations went bad: the default name is still worth a look.
        lb_names.push(model::load_balancer_name(
            &ctx.cluster.cluster_name,
            &ns,
            &name,
        ));
    }
    StackQuery {
        service: format!("{ns}/{name}"),
        load_balancer_names: lb_names,
        target_group_names: desired
            .map(|d| d.target_groups.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default(),
        skip_foreign: desired.is_none(),
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

async fn apply_all(
    svc: &Service,
    ctx: &Context,
    changes: &[Change],
    desired: Option<&DesiredLoadBalancer>,
    observed: &ObservedStack,
) -> Result<ApplyState, ReconcileError> {
    let mut st = ApplyState::from_observed(observed);
    for c in changes {
        info!(change = %c, "applying");
        if let Err(e) = ctx.cloud.apply(c, desired, &mut st).await {
            return Err(report_sync_failure(svc, ctx, e).into());
        }
    }
    Ok(st)
}

/// Turns a cloud error into a Warning Event (with AWS's message) and passes it on.
fn report_sync_failure(svc: &Service, ctx: &Context, e: CloudError) -> CloudError {
    let message = e.to_string();
    let reference = svc.object_ref(&());
    let recorder = ctx.recorder.clone();
    let transient = e.is_transient();
    tokio::spawn(async move {
        let ev = Event {
            type_: EventType::Warning,
            reason: "SyncLoadBalancerFailed".into(),
            note: Some(format!(
                "Error syncing load balancer: {message}{}",
                if transient { " (will retry)" } else { "" }
            )),
            action: "Sync".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&ev, &reference).await {
            warn!(error = %err, "cannot record event");
        }
    });
    e
}

async fn invalid(
    svc: &Service,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<Action, ReconcileError> {
    let changed = status::update(
        &ctx.client,
        svc,
        status::current_hostname(svc),
        false,
        reason,
        message,
    )
    .await?;
    if changed {
        warn!(%reason, %message, "service cannot be reconciled; no cloud change made");
        event(
            ctx,
            svc,
            EventType::Warning,
            "SyncLoadBalancerFailed",
            &format!("{reason}: {message}"),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Deletes everything the Service owns, then its status and finalizer.
async fn cleanup(
    svc: &Service,
    ctx: &Context,
    key: &str,
    still_ours: bool,
) -> Result<(), ReconcileError> {
    let opts = annotations::parse(svc.annotations()).unwrap_or_default();
    let desired = desire(svc, ctx, &opts).ok();
    let mut q = query(svc, None, &opts, ctx);
    if let Some(d) = &desired {
        q.target_group_names = d.target_groups.iter().map(|t| t.name.clone()).collect();
    }
    let svc_ref = ObjectRef::from_obj(svc);
    with_pending(&mut q, ctx, &svc_ref).await;
    let observed = ctx
        .cloud
        .observe(&q)
        .await
        .map_err(|e| report_sync_failure(svc, ctx, e))?;
    let changes = plan::plan(None, &observed);
    if !changes.is_empty() {
        event(
            ctx,
            svc,
            EventType::Normal,
            "DeletingLoadBalancer",
            "Deleting load balancer",
        )
        .await;
        apply_all(svc, ctx, &changes, None, &observed).await?;
        event(
            ctx,
            svc,
            EventType::Normal,
            "DeletedLoadBalancer",
            "Deleted load balancer",
        )
        .await;
        info!(%key, changes = changes.len(), "load balancer deleted");
    }
    if svc.meta().deletion_timestamp.is_none() && !still_ours {
        status::clear(&ctx.client, svc).await?;
    }
    ctx.pending_target_groups.lock().await.remove(&svc_ref);
    status::remove_finalizer(&ctx.client, svc, &ctx.finalizer).await?;
    let mut applied = ctx.applied.lock().await;
    applied.remove(&svc_ref);
    ctx.metrics
        .managed_load_balancers
        .set(applied.values().filter(|a| a.hostname.is_some()).count() as i64);
    Ok(())
}

/// Adds the target groups earlier, unfinished plans created to what `q` looks for.
async fn with_pending(q: &mut StackQuery, ctx: &Context, svc_ref: &ObjectRef<Service>) {
    if let Some(pending) = ctx.pending_target_groups.lock().await.get(svc_ref) {
        for name in pending {
            if !q.target_group_names.contains(name) {
                q.target_group_names.push(name.clone());
            }
        }
    }
}

/// Notes, before applying, the target groups `changes` will create: if the plan stops half
/// way and the Service then changes, the next reconcile still finds (and deletes) them.
async fn remember_created(changes: &[Change], ctx: &Context, svc_ref: &ObjectRef<Service>) {
    let created: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::CreateTargetGroup(tg) => Some(tg.name.clone()),
            _ => None,
        })
        .collect();
    if !created.is_empty() {
        ctx.pending_target_groups
            .lock()
            .await
            .entry(svc_ref.clone())
            .or_default()
            .extend(created);
    }
}

async fn event(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &svc.object_ref(&())).await {
        warn!(error = %e, "cannot record event");
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

fn hash_of(d: &DesiredLoadBalancer) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{d:?}").hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(default_class: bool) -> ClusterArgs {
        ClusterArgs {
            cluster_name: "c".into(),
            load_balancer_class: "cloudlb.io/nlb".into(),
            default_class,
            region: None,
            keep_not_ready_nodes: false,
            node_proxy_health_port: None,
            node_selector: BTreeMap::new(),
        }
    }

    fn svc(type_: &str, class: Option<&str>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n"},
            "spec": {"type": type_, "loadBalancerClass": class}
        }))
        .unwrap()
    }

    #[test]
    fn ownership_by_type_and_class() {
        let cases = [
            ("LoadBalancer", Some("cloudlb.io/nlb"), false, true),
            ("LoadBalancer", Some("other.io/lb"), true, false),
            ("LoadBalancer", None, false, false),
            ("LoadBalancer", None, true, true),
            ("NodePort", Some("cloudlb.io/nlb"), true, false),
            ("ClusterIP", None, true, false),
        ];
        for (t, class, default, want) in cases {
            assert_eq!(
                is_ours(&svc(t, class), &cluster(default)),
                want,
                "{t} {class:?} default={default}"
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
