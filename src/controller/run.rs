//! `cloudlb controller`: wires the pieces and runs until SIGTERM/SIGINT — kube client, admin
//! server, leader lease, AWS, the caches and their watches, and the two kube-runtime
//! Controllers sharing them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::args::label_selector;
use super::watches::{self, BindingTriggers, FirstLists, Gone, Stores, Watched, watch_backoff};
use super::{
    Context, ControllerArgs, MANAGER, binding, finalizer_for, leader, orphans, readiness, service,
    webhook, writes,
};
use crate::cloud::aws::{AwsCloud, RateLimits};
use crate::crd::{TargetGroupBinding, TargetType};
use crate::metrics::ControllerMetrics;
use crate::model::SERVICE_NAME_LABEL;
use crate::runtime::admin;
use crate::runtime::http::{self, HttpLimits, HttpThread};
use crate::runtime::signals::Signals;

/// The admin server's limits: kubelet probes and a Prometheus scraper are its only clients.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = ControllerMetrics::new();
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let signals = Signals::new().context("installing signal handlers")?;
    tokio::spawn(signals.cancel_on_first(shutdown.clone()));
    serve_admin(&args, &metrics, &ready, &shutdown)?;

    let identity = identity(&args);
    let leadership = Leadership::new(&args, &client, &identity);
    let cloud = aws_cloud(&args, &metrics, &leadership).await;
    let (stores, writers) = watches::caches();
    let ctx = context(
        &args,
        &client,
        cloud,
        &metrics,
        &identity,
        &leadership,
        stores,
    );

    // The Service controller drives the three watch streams into shared caches; the binding
    // controller reads their subscriptions, and the deletes and relists the watches send.
    let (fanout, triggers) = watches::fanout(&writers);
    let for_lead = fanout.relists.clone();
    let (for_gates, gated) = unbounded::<Service>();
    let first_lists = FirstLists::default();
    let watched = watches::start(&client, writers, fanout, &first_lists, &ctx);
    spawn_ready_when_listed(first_lists, ready, ctx.synced.clone());

    let lead = leadership.campaign(&args, &identity, &metrics, &shutdown, for_lead);
    if args.orphan_sweep {
        spawn_orphan_sweep(&args, &ctx, &shutdown);
    }
    let bindings = binding_controller(client.clone(), &ctx, &args, triggers, gated)
        .graceful_shutdown_on(leadership.stopped(&shutdown))
        .run(binding::reconcile, binding::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "binding reconcile stream error");
            }
        });
    spawn_webhook(&args, &ctx, &shutdown);
    let gates = spawn_readiness(&args, &ctx, &client, for_gates, &shutdown);
    let services = service_controller(&args, &ctx, watched, gates, lead)
        .graceful_shutdown_on(leadership.stopped(&shutdown))
        .run(service::reconcile, service::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile stream error");
            }
        });
    let controllers = async {
        tokio::join!(services, bindings);
    };
    let grace = leadership.stopped(&shutdown);
    tokio::select! {
        () = controllers => {}
        () = async { grace.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "controllers still running after the shutdown grace; exiting anyway"
            );
        }
    }

    leadership.finish(&metrics, &shutdown).await
}

/// Longest wait, once stopping, for reconciles in flight to finish (below the kubelet's default
/// 30 s termination grace). A controller whose cache never fills (the TargetGroupBinding CRD
/// not installed) would otherwise wait forever: kube-runtime's runner waits for its store
/// before it can end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// This replica's identity in the lease and in Events.
fn identity(args: &ControllerArgs) -> String {
    args.identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
}

/// Every replica watches and fills its caches, so a standby is Ready (readiness is not
/// leadership); only the leader reconciles and writes. Losing the lease ends the process.
struct Leadership {
    /// Cancelled once this replica leads (at once without leader election).
    leading: CancellationToken,
    /// With `--leader-elect`: the lease, and the token cancelled when it is lost.
    lease: Option<(leader::Lease, CancellationToken)>,
}

impl Leadership {
    fn new(args: &ControllerArgs, client: &Client, identity: &str) -> Self {
        let leading = CancellationToken::new();
        let lease = if args.leader_elect {
            let lease = leader::Lease::new(
                client.clone(),
                &args.lease_namespace,
                &args.lease_name,
                identity,
                Duration::from_secs(args.lease_duration_seconds),
            );
            Some((lease, CancellationToken::new()))
        } else {
            leading.cancel();
            None
        };
        Leadership { leading, lease }
    }

    /// With a lease: waits for it in a task; once won, every Service (the returned stream) and
    /// every binding (`relists`) is reconciled for real (a standby's reconciles return at once
    /// without writing). Without one the returned stream ends at once.
    fn campaign(
        &self,
        args: &ControllerArgs,
        identity: &str,
        metrics: &ControllerMetrics,
        shutdown: &CancellationToken,
        relists: UnboundedSender<()>,
    ) -> UnboundedReceiver<()> {
        let (lead_tx, lead_rx) = unbounded::<()>();
        let Some((lease, lost)) = self.lease.clone() else {
            metrics.leader.set(0);
            return lead_rx;
        };
        let (leading, shutdown, metrics) =
            (self.leading.clone(), shutdown.clone(), metrics.clone());
        let identity = identity.to_string();
        let lease_name = args.lease_name.clone();
        tokio::spawn(async move {
            tracing::info!(%identity, lease = %lease_name, "waiting for the leader lease (standby: watching, Ready, not reconciling)");
            tokio::select! {
                r = lease.acquire() => if let Err(e) = r {
                    tracing::error!(error = %e, "cannot take the leader lease");
                    shutdown.cancel();
                    return;
                },
                _ = shutdown.cancelled() => return,
            }
            metrics.leader.set(1);
            tracing::info!(%identity, "became leader");
            leading.cancel();
            let _ = lead_tx.unbounded_send(());
            let _ = relists.unbounded_send(());
            lease.keep(lost, shutdown).await;
        });
        lead_rx
    }

    /// Completes on shutdown, or when the lease is lost.
    fn stopped(&self, shutdown: &CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let shutdown = shutdown.clone();
        let lost = self.lease.as_ref().map(|(_, l)| l.clone());
        async move {
            match lost {
                Some(lost) => {
                    tokio::select! { _ = shutdown.cancelled() => {}, _ = lost.cancelled() => {} }
                }
                None => shutdown.cancelled().await,
            }
        }
    }

    /// After the controllers stopped: releases the lease, or fails if it was lost.
    async fn finish(
        self,
        metrics: &ControllerMetrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        metrics.leader.set(0);
        if let Some((lease, lost)) = self.lease {
            if lost.is_cancelled() {
                tracing::error!("lost the leader lease; exiting so a fresh replica can take over");
                shutdown.cancel();
                anyhow::bail!("lost the leader lease");
            }
            lease.release().await;
        }
        shutdown.cancel();
        tracing::info!("controller stopped");
        Ok(())
    }
}

/// AWS, rate-limited; with a lease, fenced by it: a replica that lost the lease writes nothing
/// more, even from reconciles in flight.
async fn aws_cloud(
    args: &ControllerArgs,
    metrics: &ControllerMetrics,
    leadership: &Leadership,
) -> AwsCloud {
    let cloud = AwsCloud::from_env(
        args.cluster.region.as_deref(),
        args.cluster.ownership(),
        metrics.clone(),
        RateLimits {
            qps: args.aws_qps,
            burst: args.aws_burst,
            targets_qps: args.aws_targets_qps,
            targets_burst: args.aws_targets_burst,
        },
    )
    .await
    .with_vpc(args.cluster.policy.vpc_id.clone());
    match &leadership.lease {
        Some((_, lost)) => cloud.fenced_by(lost.clone()),
        None => cloud,
    }
}

/// The reconciles' [`Context`]. Its `synced` is cancelled once the node, EndpointSlice and
/// Service stores hold their initial lists (see [`spawn_ready_when_listed`]).
fn context(
    args: &ControllerArgs,
    client: &Client,
    cloud: AwsCloud,
    metrics: &ControllerMetrics,
    identity: &str,
    leadership: &Leadership,
    stores: Stores,
) -> Arc<Context> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.to_string()),
        },
    );
    Arc::new(Context {
        client: client.clone(),
        synced: CancellationToken::new(),
        finalizer: finalizer_for(&args.cluster.load_balancer_class),
        cloud: Arc::new(cloud),
        writes: Arc::new(writes::KubeWrites {
            client: client.clone(),
            recorder: recorder.clone(),
        }),
        recorder,
        metrics: metrics.clone(),
        cluster: args.cluster.clone(),
        nodes: stores.nodes,
        slices: stores.slices,
        services: stores.services,
        resync: Duration::from_secs(args.resync_seconds),
        leading: leadership.leading.clone(),
        services_memory: service::Memory::default(),
        bindings: binding::State::default(),
        gated: readiness::Waiting::default(),
    })
}

/// Marks the process Ready, and lets reconciles run, once every store holds its initial list.
fn spawn_ready_when_listed(
    first_lists: FirstLists,
    ready: Arc<AtomicBool>,
    synced: CancellationToken,
) {
    tokio::spawn(async move {
        first_lists.all().await;
        ready.store(true, Ordering::Relaxed);
        synced.cancel();
        tracing::info!("caches synced; ready");
    });
}

/// The Service Controller on the Service watch, woken by node and EndpointSlice bursts, by
/// pods waiting on their readiness gates (`gates`), and for every Service once this replica
/// leads (`lead`). No debounce: a Service's own change is reconciled at once; node and
/// EndpointSlice changes come in bursts and are coalesced (see [`watches::node_wakes`]).
fn service_controller(
    args: &ControllerArgs,
    ctx: &Context,
    watched: Watched,
    gates: UnboundedReceiver<ObjectRef<Service>>,
    lead: UnboundedReceiver<()>,
) -> Controller<Service> {
    let store = ctx.services.clone();
    let cluster = &args.cluster;
    Controller::for_stream(watched.services, store.clone())
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .trigger_backoff(watch_backoff())
        .reconcile_on(watches::node_wakes(
            watched.nodes,
            store.clone(),
            cluster.clone(),
        ))
        .reconcile_on(gates)
        .reconcile_on(watches::slice_wakes(watched.slices, store, cluster.clone()))
        .reconcile_all_on(lead)
}

fn spawn_orphan_sweep(args: &ControllerArgs, ctx: &Arc<Context>, shutdown: &CancellationToken) {
    tokio::spawn(orphans::sweep_loop(
        ctx.clone(),
        ctx.services.clone(),
        ctx.synced.clone(),
        Duration::from_secs(args.orphan_sweep_interval_seconds),
        Duration::from_secs(args.orphan_grace_seconds),
        shutdown.clone(),
    ));
}

/// The readiness-gate webhook; a webhook that cannot start ends the process.
fn spawn_webhook(args: &ControllerArgs, ctx: &Arc<Context>, shutdown: &CancellationToken) {
    let (ctx, args, shutdown) = (ctx.clone(), args.webhook.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = webhook::serve(ctx, args, shutdown.clone()).await {
            tracing::error!(error = %e, "the readiness-gate webhook cannot start; exiting");
            shutdown.cancel();
        }
    });
}

/// Pods that wait only on their readiness gates become targets: the returned stream wakes
/// their Service (and `bindings` their bindings).
fn spawn_readiness(
    args: &ControllerArgs,
    ctx: &Arc<Context>,
    client: &Client,
    bindings: UnboundedSender<Service>,
    shutdown: &CancellationToken,
) -> UnboundedReceiver<ObjectRef<Service>> {
    let (gate_tx, gate_rx) = unbounded::<ObjectRef<Service>>();
    tokio::spawn(readiness::run(
        ctx.clone(),
        client.clone(),
        args.readiness.clone(),
        readiness::Wakes {
            services: gate_tx,
            bindings,
        },
        shutdown.clone(),
    ));
    gate_rx
}

/// The TargetGroupBinding Controller: its own watch on bindings, woken by the Service it names,
/// by node changes (instance targets) and by its Service's EndpointSlices (ip targets) — read
/// from the subscriptions to the Service controller's shared caches, deletes and relists from
/// the watches' channels — and by pods waiting on their readiness gates (`gated`).
///
/// Its own watch yields no errors to the Controller (they are logged here, and the watch
/// backs off on its own): a trigger error would pause every trigger of this Controller,
/// subscriptions included, for kube-runtime's trigger backoff, and a subscription not polled
/// stalls the shared writers and the Service controller with them (see [`watches::Shared`]).
/// The Service controller keeps consuming the watch streams themselves (`for_stream`, not
/// `for_shared_stream`): it drives them, and its node and EndpointSlice wake-ups need the
/// deletes, which a shared writer does not broadcast.
fn binding_controller(
    client: Client,
    ctx: &Arc<Context>,
    args: &ControllerArgs,
    triggers: BindingTriggers,
    gated: UnboundedReceiver<Service>,
) -> Controller<TargetGroupBinding> {
    let mut config = watcher::Config::default();
    if !args.target_group_binding_selector.is_empty() {
        config = config.labels(&label_selector(&args.target_group_binding_selector));
    }
    let (store, writer) = reflector::store::<TargetGroupBinding>();
    let _ = ctx.bindings.store.set(store.clone());
    let memory = Arc::clone(ctx);
    let own = reflector::reflector(
        writer,
        watcher(Api::<TargetGroupBinding>::all(client), config).default_backoff(),
    )
    // A binding's memory goes with it, also after a force-delete (no cleanup ran).
    .inspect(move |ev| match ev {
        Ok(watcher::Event::Delete(b)) => memory.bindings.forget(&ObjectRef::from_obj(b)),
        Ok(watcher::Event::InitDone) => memory.bindings.prune(),
        _ => {}
    })
    .applied_objects()
    .filter_map(|b| {
        futures::future::ready(match b {
            Ok(b) => Some(Ok(b)),
            Err(e) => {
                tracing::debug!(error = %e, "TargetGroupBinding watch error");
                None
            }
        })
    });
    let (for_services, for_gated, for_nodes, for_slices, for_gone) = (
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
    );
    let relevance = watches::Relevance::default();
    let seen = relevance.clone();
    Controller::for_stream(own, store)
        .with_config(
            ControllerConfig::default()
                .concurrency(args.concurrency)
                .debounce(Duration::from_millis(200)),
        )
        .watches_shared_stream(triggers.services, move |svc: Arc<Service>| {
            naming_service(
                &for_services,
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            )
        })
        .watches_stream(gated.map(Ok), move |svc: Service| {
            naming_service(
                &for_gated,
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            )
        })
        .watches_shared_stream(
            watches::relevant_nodes(triggers.nodes, relevance),
            move |_: Arc<Node>| instance_bindings(&for_nodes),
        )
        .watches_shared_stream(triggers.slices, move |slice: Arc<EndpointSlice>| {
            let ns = slice.namespace().unwrap_or_default();
            let service = slice.labels().get(SERVICE_NAME_LABEL);
            of_service_slices(&for_slices, &ns, service.map(String::as_str))
        })
        .reconcile_on(triggers.gone.flat_map(move |gone| {
            let wake = match gone {
                Gone::Service(ns, name) => naming_service(&for_gone, &ns, &name),
                Gone::Node(name) => {
                    seen.forget(&name);
                    instance_bindings(&for_gone)
                }
                Gone::Slice(ns, service) => of_service_slices(&for_gone, &ns, service.as_deref()),
            };
            futures::stream::iter(wake)
        }))
        .reconcile_all_on(triggers.relists)
}

/// The bindings that name the Service `ns`/`name`.
fn naming_service(
    store: &Store<TargetGroupBinding>,
    ns: &str,
    name: &str,
) -> Vec<ObjectRef<TargetGroupBinding>> {
    refs(store, |b| binding::refers_to(b, ns, name))
}

/// The bindings of instance targets (any node change may move them).
fn instance_bindings(store: &Store<TargetGroupBinding>) -> Vec<ObjectRef<TargetGroupBinding>> {
    refs(store, |b| b.spec.target_type == TargetType::Instance)
}

/// The ip-target bindings of the Service `ns`/`service` an EndpointSlice belongs to (none
/// for a slice without the Service label).
fn of_service_slices(
    store: &Store<TargetGroupBinding>,
    ns: &str,
    service: Option<&str>,
) -> Vec<ObjectRef<TargetGroupBinding>> {
    match service {
        Some(name) => refs(store, |b| {
            b.spec.target_type == TargetType::Ip && binding::refers_to(b, ns, name)
        }),
        None => Vec::new(),
    }
}

fn refs(
    store: &Store<TargetGroupBinding>,
    pred: impl Fn(&TargetGroupBinding) -> bool,
) -> Vec<ObjectRef<TargetGroupBinding>> {
    store
        .state()
        .iter()
        .filter(|b| pred(b))
        .map(|b| ObjectRef::from_obj(&**b))
        .collect()
}

/// `/metrics`, `/healthz` and `/readyz` on `--metrics-addr`, on the hardened HTTP server's own
/// thread (so probes answer while reconciles keep the runtime busy), until `shutdown`.
fn serve_admin(
    args: &ControllerArgs,
    metrics: &ControllerMetrics,
    ready: &Arc<AtomicBool>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let addr = args.metrics_addr;
    let listener = http::bind(addr).with_context(|| format!("binding --metrics-addr {addr}"))?;
    let limits = HttpLimits {
        header_timeout: ADMIN_HEADER_TIMEOUT,
        max_connections: ADMIN_MAX_CONNECTIONS,
        evicted: Default::default(),
        timed_out: Default::default(),
    };
    HttpThread::start()
        .context("starting the admin HTTP thread")?
        .serve(
            listener,
            admin::app(ready.clone(), Some(metrics.registry())),
            Arc::new(limits),
            shutdown.clone(),
        );
    tracing::info!(%addr, "admin server listening");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "cloudlb".into())
}
