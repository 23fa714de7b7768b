//! The controller: Services of type LoadBalancer → NLBs, targets, status and Events; and
//! TargetGroupBindings → targets in target groups made outside cloudlb.
//!
//! `run` wires the pieces: kube client, AWS client, admin server, leader lease, the reflectors
//! (Services, Nodes, EndpointSlices) and two kube-runtime Controllers sharing them: one calls
//! [`service::reconcile`] per Service key, the other [`binding::reconcile`] per binding key.

pub mod binding;
pub mod bursts;
pub mod events;
pub mod leader;
pub mod memory;
pub mod orphans;
pub mod plan_cmd;
pub mod policy;
pub mod readiness;
pub mod service;
pub mod status;
#[cfg(test)]
pub mod testing;
pub mod text;
pub mod webhook;
pub mod writes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::cloud::Cloud;
use crate::cloud::aws::{AwsCloud, Ownership, RateLimits};
use crate::crd::{TargetGroupBinding, TargetType};
use crate::metrics::ControllerMetrics;
use crate::model::SERVICE_NAME_LABEL;
use crate::runtime::admin;
use crate::runtime::http::{self, HttpLimits, HttpThread};
use crate::runtime::signals::Signals;

/// The admin server's limits: kubelet probes and a Prometheus scraper are its only clients.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Settings shared by `controller` and `plan`: which cluster and which Services are ours.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Name of this cluster; tagged on every AWS resource, which is how ownership is decided.
    #[arg(long, env = "CLOUDLB_CLUSTER_NAME")]
    pub cluster_name: String,
    /// spec.loadBalancerClass this controller serves.
    #[arg(
        long,
        env = "CLOUDLB_LOAD_BALANCER_CLASS",
        default_value = "cloudlb.io/nlb"
    )]
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services without a loadBalancerClass (this controller is the
    /// cluster's default load balancer implementation).
    #[arg(long, env = "CLOUDLB_DEFAULT_CLASS")]
    pub default_class: bool,
    /// With `--default-class`: serve every class-less LoadBalancer Service, for clusters with no
    /// cloud-controller-manager service controller. Without it only class-less Services
    /// annotated `aws-load-balancer-type: external` or `nlb-ip` are served — the ones the
    /// cloud provider leaves alone (LBC's rule), so two controllers never serve one Service.
    #[arg(long, env = "CLOUDLB_DEFAULT_CLASS_ALL", requires = "default_class")]
    pub default_class_all: bool,
    /// AWS region (else the standard AWS config chain: AWS_REGION, profile, IMDS).
    #[arg(long, env = "CLOUDLB_REGION")]
    pub region: Option<String>,
    /// Keep NotReady nodes registered and leave failing nodes to the health checks, as the
    /// Kubernetes service controller does since 1.30. Default: NotReady nodes are deregistered.
    #[arg(long, env = "CLOUDLB_KEEP_NOT_READY_NODES")]
    pub keep_not_ready_nodes: bool,
    /// When more than this percentage of a Service's nodes is NotReady at once, none of them is
    /// deregistered (a Warning and `cloudlb_not_ready_targets_withheld_total` say so): a
    /// cluster-wide NotReady blip must not empty every target group. Deleted nodes always go.
    /// 100 turns the guard off.
    #[arg(long, env = "CLOUDLB_NOT_READY_GUARD_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub not_ready_guard_percent: u8,
    /// cloudlb's node proxy serves the NodePorts and its admin server listens on this port:
    /// externalTrafficPolicy Cluster target groups then health-check `HTTP /readyz` there,
    /// which fails as soon as the proxy starts draining (instead of TCP on the traffic port).
    #[arg(long, env = "CLOUDLB_NODE_PROXY_HEALTH_PORT")]
    pub node_proxy_health_port: Option<u16>,
    /// Only nodes with all of these labels (`key=value,…`) are ever targets, for every Service
    /// (the target-node-labels annotation narrows it further per Service).
    #[arg(long, env = "CLOUDLB_NODE_SELECTOR", value_parser = parse_labels, default_value = "")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// What tenants' annotations may ask for (see [`policy`]).
    #[command(flatten)]
    pub policy: policy::PolicyArgs,
}

impl ClusterArgs {
    /// Who this installation is in the account: cluster and class tags decide ownership.
    pub fn ownership(&self) -> Ownership {
        Ownership {
            cluster: self.cluster_name.clone(),
            class: self.load_balancer_class.clone(),
        }
    }

    /// The model's view of these settings.
    pub fn context(&self) -> crate::model::ClusterContext {
        crate::model::ClusterContext {
            cluster_name: self.cluster_name.clone(),
            load_balancer_class: self.load_balancer_class.clone(),
            node_proxy_health_port: self.node_proxy_health_port,
        }
    }
}

fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{p:?} is not key=value")),
        })
        .collect()
}

/// Command-line settings of `cloudlb controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "CLOUDLB_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Services reconciled at once.
    #[arg(long, env = "CLOUDLB_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Seconds between full drift checks of a Service against AWS when nothing changed.
    #[arg(long, env = "CLOUDLB_RESYNC_SECONDS", default_value_t = 600)]
    pub resync_seconds: u64,
    /// Take a coordination.k8s.io Lease and reconcile only while holding it.
    #[arg(long, env = "CLOUDLB_LEADER_ELECT")]
    pub leader_elect: bool,
    #[arg(long, env = "CLOUDLB_LEASE_NAME", default_value = "cloudlb-controller")]
    pub lease_name: String,
    /// Namespace of the lease (default: the POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the lease (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "CLOUDLB_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Client-side AWS rate limit (calls per second) for everything but target registration.
    #[arg(long, env = "CLOUDLB_AWS_QPS", default_value_t = 10.0)]
    pub aws_qps: f64,
    #[arg(long, env = "CLOUDLB_AWS_BURST", default_value_t = 40)]
    pub aws_burst: u32,
    /// Client-side AWS rate limit for RegisterTargets / DeregisterTargets.
    #[arg(long, env = "CLOUDLB_AWS_TARGETS_QPS", default_value_t = 4.0)]
    pub aws_targets_qps: f64,
    #[arg(long, env = "CLOUDLB_AWS_TARGETS_BURST", default_value_t = 20)]
    pub aws_targets_burst: u32,
    /// Only TargetGroupBindings with all of these labels (`key=value,…`) are served (default:
    /// every binding), so that more than one controller can share a cluster.
    #[arg(
        long,
        env = "CLOUDLB_TARGET_GROUP_BINDING_SELECTOR",
        value_parser = parse_labels,
        default_value = ""
    )]
    pub target_group_binding_selector: std::collections::BTreeMap<String, String>,
    /// Delete resources tagged for this cluster and class whose Service no longer exists.
    #[arg(long, env = "CLOUDLB_ORPHAN_SWEEP")]
    pub orphan_sweep: bool,
    /// How often the orphan sweep lists the account.
    #[arg(
        long,
        env = "CLOUDLB_ORPHAN_SWEEP_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub orphan_sweep_interval_seconds: u64,
    /// How long an orphan must stay orphaned before it is deleted.
    #[arg(long, env = "CLOUDLB_ORPHAN_GRACE_SECONDS", default_value_t = 600)]
    pub orphan_grace_seconds: u64,
    /// Pod readiness gates (see [`readiness`]).
    #[command(flatten)]
    pub readiness: readiness::ReadinessArgs,
    /// The readiness-gate injection webhook (see [`webhook`]).
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
}

/// The finalizer of the default class: it guarantees teardown before a Service disappears.
pub const FINALIZER: &str = "cloudlb.io/load-balancer-cleanup";
/// The class served when `--load-balancer-class` is not given.
pub const DEFAULT_CLASS: &str = "cloudlb.io/nlb";

/// The finalizer this controller owns. Each class gets its own, so two cloudlb installations
/// with different classes never remove each other's finalizer.
pub fn finalizer_for(class: &str) -> String {
    if class == DEFAULT_CLASS {
        return FINALIZER.to_string();
    }
    let name: String = class
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(54)
        .collect();
    format!(
        "cloudlb.io/cleanup-{}",
        name.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
    )
}

/// Name of this controller in Events and field managers.
pub const MANAGER: &str = "cloudlb-controller";

/// Everything a reconcile needs; built once.
pub struct Context {
    pub client: Client,
    /// Cancelled once every store holds its initial list (see [`Context::stores_synced`]).
    pub synced: CancellationToken,
    /// This controller's finalizer (see [`finalizer_for`]).
    pub finalizer: String,
    /// The cloud: AWS, or the in-memory fake in unit tests.
    pub cloud: Arc<dyn Cloud>,
    /// The Service reconcile's writes to Kubernetes (finalizer, status, Events).
    pub writes: Arc<dyn writes::ServiceWrites>,
    /// Events of the binding controller.
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
    pub cluster: ClusterArgs,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub services: Store<Service>,
    pub resync: Duration,
    /// The Service controller's memory (last sync, failures, pending target groups).
    pub services_memory: service::Memory,
    /// Cancelled while this replica leads (at once without leader election). Until then
    /// reconciles return without a cloud call or a write.
    pub leading: CancellationToken,
    /// The TargetGroupBinding controller's memory.
    pub bindings: binding::State,
    /// Pods waiting only on their readiness gates (kept by [`readiness`]).
    pub gated: readiness::Waiting,
}

impl Context {
    /// Whether the node, EndpointSlice and Service caches hold a full list. Until then a
    /// desired state would be built from partial data (e.g. no nodes → every target
    /// deregistered), so reconciles wait.
    pub fn stores_synced(&self) -> bool {
        self.synced.is_cancelled()
    }

    /// Whether this replica may reconcile and write (it holds the lease, or there is none).
    pub fn is_leader(&self) -> bool {
        self.leading.is_cancelled()
    }

    /// Forgets a Service that is gone (also one force-deleted without a teardown), and
    /// updates the managed-load-balancers gauge.
    pub fn forget_service(&self, key: &ObjectRef<Service>) {
        self.services_memory.forget(key);
        self.metrics
            .managed_load_balancers
            .set(self.services_memory.managed());
    }

    /// After a relist: forgets every Service the store no longer holds.
    pub fn prune_services(&self) {
        let live: std::collections::HashSet<ObjectRef<Service>> = self
            .services
            .state()
            .iter()
            .map(|s| ObjectRef::from_obj(&**s))
            .collect();
        self.services_memory.retain(|k| live.contains(k));
        self.metrics
            .managed_load_balancers
            .set(self.services_memory.managed());
    }
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = ControllerMetrics::new();
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let signals = Signals::new().context("installing signal handlers")?;
    tokio::spawn(signals.cancel_on_first(shutdown.clone()));
    serve_admin(&args, &metrics, &ready, &shutdown)?;

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    // Every replica watches and fills its caches, so a standby is Ready (readiness is not
    // leadership); only the leader reconciles and writes. `leading` is cancelled once this
    // replica leads; losing the lease ends the process.
    let leading = CancellationToken::new();
    let lease = if args.leader_elect {
        let lease = leader::Lease::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_duration_seconds),
        );
        Some((lease, CancellationToken::new()))
    } else {
        leading.cancel();
        None
    };

    let mut cloud = AwsCloud::from_env(
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
    if let Some((_, lost)) = &lease {
        // A replica that lost the lease writes nothing more, even from reconciles in flight.
        cloud = cloud.fenced_by(lost.clone());
    }

    let (nodes, node_writer) = reflector::store::<Node>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (services, service_writer) = reflector::store::<Service>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    // Cancelled once the node, EndpointSlice and Service stores hold their initial lists.
    let synced = CancellationToken::new();
    let ctx = Arc::new(Context {
        client: client.clone(),
        synced: synced.clone(),
        finalizer: finalizer_for(&args.cluster.load_balancer_class),
        cloud: Arc::new(cloud),
        writes: Arc::new(writes::KubeWrites {
            client: client.clone(),
            recorder: recorder.clone(),
        }),
        recorder,
        metrics: metrics.clone(),
        cluster: args.cluster.clone(),
        nodes: nodes.clone(),
        slices: slices.clone(),
        services: services.clone(),
        resync: Duration::from_secs(args.resync_seconds),
        leading: leading.clone(),
        services_memory: service::Memory::default(),
        bindings: binding::State::default(),
        gated: readiness::Waiting::default(),
    });

    // The Service controller drives the three watch streams; the binding controller gets a copy
    // of every change once the stores hold it, and a full pass after each (re)list.
    let (node_tx, node_rx) = futures::channel::mpsc::unbounded::<Node>();
    let (slice_tx, slice_rx) = futures::channel::mpsc::unbounded::<EndpointSlice>();
    let (svc_tx, svc_rx) = futures::channel::mpsc::unbounded::<Service>();
    let svc_tx_for_gates = svc_tx.clone();
    let (relist_tx, relist_rx) = futures::channel::mpsc::unbounded::<()>();
    let relist_tx_for_lead = relist_tx.clone();
    // Readiness comes from the watch streams themselves (the first InitDone, which a reflector
    // passes on only after its store holds the initial list), never from
    // Store::wait_until_ready: that keeps a single waker (a oneshot behind DelayedInit), and
    // the Controller's applier already waits on the Service store, so any second waiter — the
    // readiness task, the orphan sweep — could starve, or starve the applier.
    let (nodes_synced, slices_synced, services_synced) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );

    // Nodes: only changes that can move targets wake Services (not status heartbeats).
    let mut node_hashes: HashMap<String, u64> = HashMap::new();
    let relist_nodes = relist_tx.clone();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .modify(trim_node)
            .backoff(watch_backoff()),
    )
    .inspect(move |ev| relisted(ev, &relist_nodes))
    .inspect(mark_synced(nodes_synced.clone()))
    .filter_map(move |ev| {
        let out = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                let h = node_relevance(&n);
                (node_hashes.insert(n.name_any(), h) != Some(h)).then_some(Ok(n))
            }
            Ok(watcher::Event::Delete(n)) => {
                node_hashes.remove(&n.name_any());
                Some(Ok(n))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    })
    .inspect(move |n| {
        if let Ok(n) = n {
            let _ = node_tx.unbounded_send(n.clone());
        }
    });
    let relist_slices = relist_tx.clone();
    let slice_stream = reflector::reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s: &mut EndpointSlice| s.managed_fields_mut().clear())
        .backoff(watch_backoff()),
    )
    .inspect(move |ev| relisted(ev, &relist_slices))
    .inspect(mark_synced(slices_synced.clone()))
    .touched_objects()
    .inspect(move |s| {
        if let Ok(s) = s {
            let _ = slice_tx.unbounded_send(s.clone());
        }
    });
    let service_stream = reflector::reflector(
        service_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s: &mut Service| s.managed_fields_mut().clear())
        .backoff(watch_backoff()),
    )
    .inspect(mark_synced(services_synced.clone()))
    .inspect({
        let ctx = ctx.clone();
        move |ev| {
            relisted(ev, &relist_tx);
            match ev {
                // Per-Service memory goes with the Service, also after a force-delete.
                Ok(watcher::Event::Delete(s)) => ctx.forget_service(&ObjectRef::from_obj(s)),
                Ok(watcher::Event::InitDone) => ctx.prune_services(),
                _ => {}
            }
            if let Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) = ev {
                let _ = svc_tx.unbounded_send(s.clone());
            }
        }
    })
    .applied_objects();

    // No debounce: a Service's own change is reconciled at once. Node and EndpointSlice
    // changes come in bursts and are coalesced below.
    let controller = Controller::for_stream(service_stream, services.clone())
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .trigger_backoff(watch_backoff());
    let service_store = controller.store();
    let svc_store_for_nodes = service_store.clone();
    let svc_store_for_slices = service_store.clone();
    let cluster_for_nodes = args.cluster.clone();
    let cluster_for_slices = args.cluster.clone();

    {
        let ready = ready.clone();
        let synced = synced.clone();
        let (n, s, sv) = (nodes_synced, slices_synced, services_synced);
        tokio::spawn(async move {
            tokio::join!(n.cancelled(), s.cancelled(), sv.cancelled());
            ready.store(true, Ordering::Relaxed);
            synced.cancel();
            tracing::info!("caches synced; ready");
        });
    }

    // Leadership: once won, every Service and binding is reconciled for real (a standby's
    // reconciles return at once without writing).
    let (lead_tx, lead_rx) = futures::channel::mpsc::unbounded::<()>();
    let binding_lead = relist_tx_for_lead.clone();
    if let Some((lease, lost)) = lease.clone() {
        let (leading, shutdown, metrics) = (leading.clone(), shutdown.clone(), metrics.clone());
        let identity = identity.clone();
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
            let _ = binding_lead.unbounded_send(());
            lease.keep(lost, shutdown).await;
        });
    } else {
        metrics.leader.set(0);
        drop(lead_tx);
    }

    if args.orphan_sweep {
        tokio::spawn(orphans::sweep_loop(
            ctx.clone(),
            service_store.clone(),
            synced.clone(),
            Duration::from_secs(args.orphan_sweep_interval_seconds),
            Duration::from_secs(args.orphan_grace_seconds),
            shutdown.clone(),
        ));
    }

    let stop = || {
        let shutdown = shutdown.clone();
        let lost = lease.as_ref().map(|(_, l)| l.clone());
        async move {
            match lost {
                Some(lost) => {
                    tokio::select! { _ = shutdown.cancelled() => {}, _ = lost.cancelled() => {} }
                }
                None => shutdown.cancelled().await,
            }
        }
    };

    let bindings = binding_controller(
        client.clone(),
        &ctx,
        &args,
        BindingTriggers {
            services: svc_rx,
            nodes: node_rx,
            slices: slice_rx,
            relists: relist_rx,
        },
    )
    .graceful_shutdown_on(stop())
    .run(binding::reconcile, binding::error_policy, ctx.clone())
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "binding reconcile stream error");
        }
    });

    // A burst of relevant node changes wakes every instance-target Service we serve once.
    let node_wakes = bursts::bursts(
        node_stream.map(|_| ()).boxed(),
        bursts::QUIET,
        bursts::LONGEST,
    )
    .flat_map(move |_| {
        let ours: Vec<ObjectRef<Service>> = svc_store_for_nodes
            .state()
            .into_iter()
            .filter(|s| service::is_ours(s, &cluster_for_nodes))
            .map(|s| ObjectRef::from_obj(&*s))
            .collect();
        futures::stream::iter(ours)
    });
    // Endpoint changes matter only to ip-target Services; a burst wakes each once.
    let slice_wakes = bursts::bursts(slice_stream.boxed(), bursts::QUIET, bursts::LONGEST)
        .flat_map(move |batch| {
            let keys: std::collections::BTreeSet<(String, String)> = batch
                .into_iter()
                .filter_map(Result::ok)
                .filter_map(|slice| {
                    let ns = slice.namespace().unwrap_or_default();
                    let name = slice.labels().get(SERVICE_NAME_LABEL).cloned()?;
                    Some((ns, name))
                })
                .collect();
            let wake: Vec<ObjectRef<Service>> = keys
                .into_iter()
                .filter_map(|(ns, n)| svc_store_for_slices.get(&ObjectRef::new(&n).within(&ns)))
                .filter(|s| service::is_ours(s, &cluster_for_slices) && service::uses_ip_targets(s))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect();
            futures::stream::iter(wake)
        });
    {
        let (ctx, args, shutdown) = (ctx.clone(), args.webhook.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = webhook::serve(ctx, args, shutdown.clone()).await {
                tracing::error!(error = %e, "the readiness-gate webhook cannot start; exiting");
                shutdown.cancel();
            }
        });
    }
    // Pods that wait only on their readiness gates become targets: their Service is woken.
    let (gate_tx, gate_rx) = futures::channel::mpsc::unbounded::<ObjectRef<Service>>();
    tokio::spawn(readiness::run(
        ctx.clone(),
        client.clone(),
        args.readiness.clone(),
        readiness::Wakes {
            services: gate_tx,
            bindings: svc_tx_for_gates,
        },
        shutdown.clone(),
    ));
    let services = controller
        .reconcile_on(node_wakes)
        .reconcile_on(gate_rx)
        .reconcile_on(slice_wakes)
        .reconcile_all_on(lead_rx)
        .graceful_shutdown_on(stop())
        .run(service::reconcile, service::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile stream error");
            }
        });
    tokio::join!(services, bindings);

    metrics.leader.set(0);
    if let Some((lease, lost)) = lease {
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

/// Changes that may move a binding's targets, fanned out from the Service controller's streams.
struct BindingTriggers {
    services: futures::channel::mpsc::UnboundedReceiver<Service>,
    nodes: futures::channel::mpsc::UnboundedReceiver<Node>,
    slices: futures::channel::mpsc::UnboundedReceiver<EndpointSlice>,
    relists: futures::channel::mpsc::UnboundedReceiver<()>,
}

/// The TargetGroupBinding Controller: its own watch on bindings, woken by the Service it names,
/// by node changes (instance targets) and by its Service's EndpointSlices (ip targets).
fn binding_controller(
    client: Client,
    ctx: &Context,
    args: &ControllerArgs,
    triggers: BindingTriggers,
) -> Controller<TargetGroupBinding> {
    let mut config = watcher::Config::default();
    if !args.target_group_binding_selector.is_empty() {
        config = config.labels(&label_selector(&args.target_group_binding_selector));
    }
    let controller = Controller::new(Api::<TargetGroupBinding>::all(client), config).with_config(
        ControllerConfig::default()
            .concurrency(args.concurrency)
            .debounce(Duration::from_millis(200)),
    );
    let store = controller.store();
    let _ = ctx.bindings.store.set(store.clone());
    let (for_services, for_nodes, for_slices) = (store.clone(), store.clone(), store);
    controller
        .watches_stream(triggers.services.map(Ok), move |svc: Service| {
            let ns = svc.namespace().unwrap_or_default();
            let name = svc.name_any();
            refs(&for_services, |b| binding::refers_to(b, &ns, &name))
        })
        .watches_stream(triggers.nodes.map(Ok), move |_: Node| {
            refs(&for_nodes, |b| b.spec.target_type == TargetType::Instance)
        })
        .watches_stream(triggers.slices.map(Ok), move |slice: EndpointSlice| {
            let ns = slice.namespace().unwrap_or_default();
            match slice.labels().get(SERVICE_NAME_LABEL) {
                Some(name) => refs(&for_slices, |b| {
                    b.spec.target_type == TargetType::Ip && binding::refers_to(b, &ns, name)
                }),
                None => Vec::new(),
            }
        })
        .reconcile_all_on(triggers.relists)
}

/// `{a: 1, b: 2}` → `a=1,b=2`, a Kubernetes label selector.
fn label_selector(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
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

/// After a (re)list the stores swap in new contents at once: tell the binding controller.
fn relisted<K>(
    ev: &Result<watcher::Event<K>, watcher::Error>,
    tx: &futures::channel::mpsc::UnboundedSender<()>,
) {
    if let Ok(watcher::Event::InitDone) = ev {
        let _ = tx.unbounded_send(());
    }
}

/// A stream inspector that cancels `synced` at the first InitDone (the initial list is in the
/// store).
fn mark_synced<K>(
    synced: CancellationToken,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    move |ev| {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            synced.cancel();
        }
    }
}

/// Backoff of the watches after an error (apiserver restart, 410 Expired → relist): 250 ms
/// doubling to at most 2 s (plus jitter), reset after 10 s without errors. kube-runtime's
/// default (client-go's: 0.8 s → 30 s, reset only after 120 s quiet) kept a controller blind to
/// Service deletes for up to a minute after two apiserver restarts in a row; three watches
/// retrying every few seconds cost an apiserver nothing.
fn watch_backoff() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
    ResetTimerBackoff::new(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(2))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .into(),
        Duration::from_secs(10),
    )
}

/// The part of a Node that decides whether (and where) it receives traffic.
/// Drops what the controller never reads from a cached Node: managedFields and the image
/// list (often the largest part of a real node's status), so a large cluster's cache stays
/// small.
fn trim_node(n: &mut Node) {
    n.managed_fields_mut().clear();
    if let Some(status) = n.status.as_mut() {
        status.images = None;
    }
}

fn node_relevance(n: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.metadata.labels.hash(&mut h);
    n.metadata.deletion_timestamp.is_some().hash(&mut h);
    n.spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .hash(&mut h);
    if let Some(ts) = n.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        for t in ts {
            t.key.hash(&mut h);
            t.effect.hash(&mut h);
        }
    }
    crate::model::node_ready(n).hash(&mut h);
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_flags_parse_and_become_selectors() {
        let cases = [
            ("", Ok("")),
            ("a=1", Ok("a=1")),
            (" b=2 , a=1,", Ok("a=1,b=2")),
            ("a=", Ok("a=")),
            ("a", Err(())),
            ("=1", Err(())),
        ];
        for (flag, want) in cases {
            let got = parse_labels(flag)
                .map(|l| label_selector(&l))
                .map_err(|_| ());
            assert_eq!(got.as_deref().map_err(|_| ()), want, "{flag:?}");
        }
    }

    #[test]
    fn watch_backoff_stays_short() {
        let delays: Vec<Duration> = watch_backoff().take(12).collect();
        assert_eq!(delays.len(), 12, "never gives up");
        // jitter adds up to one more delay on top
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(delays[0] <= Duration::from_millis(500), "{delays:?}");
    }
}
