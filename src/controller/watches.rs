//! The controller's watches: Nodes, EndpointSlices and Services into their shared caches,
//! whose subscriptions feed the binding controller, and node and EndpointSlice bursts turned
//! into Service wake-ups; with the small helpers they share (backoff, first-list marks, node
//! trim, node relevance).

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store, store::Writer};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::{ClusterArgs, Context, bursts, service};
use crate::model::SERVICE_NAME_LABEL;

/// What a watch stream yields: a changed object, or the watch's error.
type Changes<K> = Result<K, watcher::Error>;

/// The caches every reconcile reads.
pub(super) struct Stores {
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub services: Store<Service>,
}

/// The writers of [`Stores`], fed by the watch streams. They are shared writers: each
/// broadcasts what it caches to its subscribers ([`Shared`]).
pub(super) struct Writers {
    pub nodes: Writer<Node>,
    pub slices: Writer<EndpointSlice>,
    pub services: Writer<Service>,
}

/// Object references a shared writer buffers for a subscriber that has not read them yet.
/// A writer whose buffer is full waits (the watch stalls) until every subscriber has read the
/// oldest: see [`Shared`] for why that wait always ends. A relist re-sends every cached key,
/// so a large cluster's relist goes through the buffer in several rounds.
const SHARED_BUFFER: usize = 1024;

/// Empty caches and their shared writers.
pub(super) fn caches() -> (Stores, Writers) {
    let (nodes, node_writer) = reflector::store_shared::<Node>(SHARED_BUFFER);
    let (slices, slice_writer) = reflector::store_shared::<EndpointSlice>(SHARED_BUFFER);
    let (services, service_writer) = reflector::store_shared::<Service>(SHARED_BUFFER);
    (
        Stores {
            nodes,
            slices,
            services,
        },
        Writers {
            nodes: node_writer,
            slices: slice_writer,
            services: service_writer,
        },
    )
}

/// Cancelled at each watch's first InitDone, which a reflector passes on only after its store
/// holds the initial list. Readiness comes from these, never from Store::wait_until_ready:
/// that keeps a single waker (a oneshot behind DelayedInit), and the Controller's applier
/// already waits on the Service store, so any second waiter — the readiness task, the orphan
/// sweep — could starve, or starve the applier.
#[derive(Clone, Default)]
pub(super) struct FirstLists {
    pub nodes: CancellationToken,
    pub slices: CancellationToken,
    pub services: CancellationToken,
}

impl FirstLists {
    /// Returns once all three stores hold their initial lists.
    pub async fn all(self) {
        tokio::join!(
            self.nodes.cancelled(),
            self.slices.cancelled(),
            self.services.cancelled()
        );
    }
}

/// An object a watch saw deleted. A shared writer broadcasts only what it caches (applied
/// objects, and every key after a relist), never a delete — by then the object is gone from
/// the store its subscribers read through — so deletes reach the binding controller here.
pub(super) enum Gone {
    /// A Service, by namespace and name.
    Service(String, String),
    /// A Node, by name.
    Node(String),
    /// An EndpointSlice, by namespace and the name of its Service (when labelled).
    Slice(String, Option<String>),
}

impl Gone {
    fn service(s: &Service) -> Self {
        Gone::Service(s.namespace().unwrap_or_default(), s.name_any())
    }

    fn slice(s: &EndpointSlice) -> Self {
        let service = s.labels().get(SERVICE_NAME_LABEL).cloned();
        Gone::Slice(s.namespace().unwrap_or_default(), service)
    }
}

/// What the watches send the binding controller besides the shared subscriptions: deletes,
/// and a signal after each (re)list (kube-runtime has no shared-stream form of either).
pub(super) struct Fanout {
    pub gone: UnboundedSender<Gone>,
    pub relists: UnboundedSender<()>,
}

/// Changes that may move a binding's targets: subscriptions to the three shared writers, the
/// deletes and relists the watches send, and Services whose gated pods wait on a binding.
pub(super) struct BindingTriggers {
    pub services: Shared<Service>,
    pub nodes: Shared<Node>,
    pub slices: Shared<EndpointSlice>,
    pub gone: UnboundedReceiver<Gone>,
    pub relists: UnboundedReceiver<()>,
}

/// Subscribes to the three writers, and opens the channels of the watches' deletes and
/// relists.
pub(super) fn fanout(writers: &Writers) -> (Fanout, BindingTriggers) {
    let (gone_tx, gone_rx) = unbounded::<Gone>();
    let (relist_tx, relist_rx) = unbounded::<()>();
    (
        Fanout {
            gone: gone_tx,
            relists: relist_tx,
        },
        BindingTriggers {
            services: Shared::subscribe(&writers.services),
            nodes: Shared::subscribe(&writers.nodes),
            slices: Shared::subscribe(&writers.slices),
            gone: gone_rx,
            relists: relist_rx,
        },
    )
}

/// How often a [`Shared`] subscription is polled again without a wake-up.
const NUDGE: Duration = Duration::from_millis(250);

/// A subscription to a shared writer ([`ReflectHandle`]): yields each object the writer
/// cached, as the store holds it when read.
///
/// Backpressure: a shared writer waits while any subscriber's buffer is full, and the watch
/// feeding it stalls with it — and with it the Service controller, which drives the watches.
/// So every subscription must be polled whenever the watches are:
/// - the binding controller runs on every replica, standby included (its reconciles return
///   without a write until this replica leads), and kube-runtime's runner keeps draining its
///   triggers into the scheduler while reconciles are at the concurrency limit or its store
///   is not yet listed (a missing TargetGroupBinding CRD);
/// - no trigger of the binding controller yields an error: its own watch logs and drops them
///   (see `binding_controller` in run.rs), since an error would pause all its triggers for a
///   backoff (kube-runtime's trigger backoff, up to 30 s);
/// - once graceful shutdown begins, both controllers stop polling their triggers together
///   (the same stop signal, checked before every poll): the watches are then no longer
///   driven, so a subscription no one reads blocks nothing that still runs;
/// - a [`ReflectHandle`] that reads a key whose object was deleted meanwhile returns
///   `Pending` without having registered a wake-up, and would then never be polled again in
///   a Controller's trigger set (each trigger is polled only on its own wake-up), its buffer
///   filling for good. [`NUDGE`] polls it again regardless.
pub(super) struct Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    handle: Pin<Box<ReflectHandle<K>>>,
    nudge: tokio::time::Interval,
}

impl<K> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Subscribes to `writer`, which must be shared (see [`caches`]); the subscription starts
    /// at the writer's next broadcast.
    fn subscribe(writer: &Writer<K>) -> Self {
        let handle = writer
            .subscribe()
            .expect("the caches' writers are shared (store_shared)");
        let mut nudge = tokio::time::interval(NUDGE);
        nudge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Shared {
            handle: Box::pin(handle),
            nudge,
        }
    }
}

impl<K> Stream for Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    type Item = Arc<K>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Arc<K>>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(next) = this.handle.as_mut().poll_next(cx) {
                return Poll::Ready(next);
            }
            // Pending, maybe without a wake-up registered: the next tick polls again.
            if this.nudge.poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Node changes that can move targets (see [`node_relevance`]), by node name: what a
/// consumer saw last of each node.
#[derive(Clone, Default)]
pub(super) struct Relevance(Arc<Mutex<HashMap<String, u64>>>);

impl Relevance {
    /// Whether `n` differs, in what decides its traffic, from the last version seen.
    pub fn changed(&self, n: &Node) -> bool {
        let h = node_relevance(n);
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(n.name_any(), h) != Some(h)
    }

    /// Forgets a deleted node (a node of that name is new again).
    pub fn forget(&self, name: &str) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(name);
    }
}

/// The nodes of a subscription that changed in what decides their traffic (status heartbeats
/// do not); `relevance` must also forget deleted nodes (see [`Gone`]).
pub(super) fn relevant_nodes(
    nodes: Shared<Node>,
    relevance: Relevance,
) -> impl Stream<Item = Arc<Node>> + Send + 'static {
    nodes.filter(move |n| futures::future::ready(relevance.changed(n)))
}

/// The three watch streams, as the Service controller consumes them.
pub(super) struct Watched {
    /// Node changes that can move targets.
    pub nodes: BoxStream<'static, Changes<Node>>,
    /// Touched EndpointSlices.
    pub slices: BoxStream<'static, Changes<EndpointSlice>>,
    /// Applied Services.
    pub services: BoxStream<'static, Changes<Service>>,
}

/// The three watches, into `writers` (which hand each cached change on to their
/// subscribers), each delete and relist sent through `fanout`, each first list marked in
/// `first_lists`.
pub(super) fn start(
    client: &Client,
    writers: Writers,
    fanout: Fanout,
    first_lists: &FirstLists,
    ctx: &Arc<Context>,
) -> Watched {
    let relists = fanout.relists.clone();
    Watched {
        nodes: nodes(
            client,
            writers.nodes,
            fanout.gone.clone(),
            relists.clone(),
            first_lists.nodes.clone(),
        )
        .boxed(),
        slices: slices(
            client,
            writers.slices,
            fanout.gone.clone(),
            relists,
            first_lists.slices.clone(),
        )
        .boxed(),
        services: services(
            client,
            writers.services,
            fanout.gone,
            fanout.relists,
            first_lists.services.clone(),
            ctx.clone(),
        )
        .boxed(),
    }
}

/// Nodes into their cache; only changes that can move targets come out (not status
/// heartbeats), deletes also sent to `gone`.
fn nodes(
    client: &Client,
    writer: Writer<Node>,
    gone: UnboundedSender<Gone>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
) -> impl Stream<Item = Changes<Node>> + Send + 'static {
    let relevance = Relevance::default();
    cached(client, writer, trim_node, relists, first_list).filter_map(move |ev| {
        let out = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                relevance.changed(&n).then_some(Ok(n))
            }
            Ok(watcher::Event::Delete(n)) => {
                relevance.forget(&n.name_any());
                let _ = gone.unbounded_send(Gone::Node(n.name_any()));
                Some(Ok(n))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    })
}

/// EndpointSlices into their cache; every touched slice comes out, deletes also sent to
/// `gone`.
fn slices(
    client: &Client,
    writer: Writer<EndpointSlice>,
    gone: UnboundedSender<Gone>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
) -> impl Stream<Item = Changes<EndpointSlice>> + Send + 'static {
    cached(client, writer, drop_managed_fields, relists, first_list)
        .inspect(move |ev| {
            if let Ok(watcher::Event::Delete(s)) = ev {
                let _ = gone.unbounded_send(Gone::slice(s));
            }
        })
        .touched_objects()
}

/// Services into their cache; applied Services come out (the Service controller's own
/// stream). Deleted ones are sent to `gone`; a deleted Service's memory is forgotten, and
/// after a relist every Service the store no longer holds.
fn services(
    client: &Client,
    writer: Writer<Service>,
    gone: UnboundedSender<Gone>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
    ctx: Arc<Context>,
) -> impl Stream<Item = Changes<Service>> + Send + 'static {
    cached(client, writer, drop_managed_fields, relists, first_list)
        .inspect(move |ev| match ev {
            // Per-Service memory goes with the Service, also after a force-delete.
            Ok(watcher::Event::Delete(s)) => {
                ctx.forget_service(&ObjectRef::from_obj(s));
                let _ = gone.unbounded_send(Gone::service(s));
            }
            Ok(watcher::Event::InitDone) => ctx.prune_services(),
            _ => {}
        })
        .applied_objects()
}

/// A burst of relevant node changes wakes every instance-target Service we serve once.
pub(super) fn node_wakes(
    nodes: BoxStream<'static, Changes<Node>>,
    services: Store<Service>,
    cluster: ClusterArgs,
) -> impl Stream<Item = ObjectRef<Service>> {
    bursts::bursts(nodes.map(|_| ()).boxed(), bursts::QUIET, bursts::LONGEST).flat_map(move |_| {
        let ours: Vec<ObjectRef<Service>> = services
            .state()
            .into_iter()
            .filter(|s| service::is_ours(s, &cluster))
            .map(|s| ObjectRef::from_obj(&*s))
            .collect();
        futures::stream::iter(ours)
    })
}

/// Endpoint changes matter only to ip-target Services; a burst wakes each once.
pub(super) fn slice_wakes(
    slices: BoxStream<'static, Changes<EndpointSlice>>,
    services: Store<Service>,
    cluster: ClusterArgs,
) -> impl Stream<Item = ObjectRef<Service>> {
    bursts::bursts(slices, bursts::QUIET, bursts::LONGEST).flat_map(move |batch| {
        let keys: BTreeSet<(String, String)> = batch
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
            .filter_map(|(ns, n)| services.get(&ObjectRef::new(&n).within(&ns)))
            .filter(|s| service::is_ours(s, &cluster) && service::uses_ip_targets(s))
            .map(|s| ObjectRef::from_obj(&*s))
            .collect();
        futures::stream::iter(wake)
    })
}

/// Every `K` into `writer`'s cache, trimmed by `trim` first, with the watches' short backoff;
/// after each (re)list a signal on `relists`, and `first_list` cancelled at the first.
fn cached<K>(
    client: &Client,
    writer: Writer<K>,
    trim: fn(&mut K),
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .modify(trim)
            .backoff(watch_backoff()),
    )
    .inspect(move |ev| relisted(ev, &relists))
    .inspect(mark_synced(first_list))
}

/// Drops what no reconcile reads from a cached object: its managedFields.
fn drop_managed_fields<K: Resource>(o: &mut K) {
    o.managed_fields_mut().clear();
}

/// After a (re)list the stores swap in new contents at once: tell the binding controller.
fn relisted<K>(ev: &Result<watcher::Event<K>, watcher::Error>, tx: &UnboundedSender<()>) {
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
pub(super) fn watch_backoff() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
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

/// Drops what the controller never reads from a cached Node: managedFields and the image
/// list (often the largest part of a real node's status), so a large cluster's cache stays
/// small.
fn trim_node(n: &mut Node) {
    drop_managed_fields(n);
    if let Some(status) = n.status.as_mut() {
        status.images = None;
    }
}

/// The part of a Node that decides whether (and where) it receives traffic, as a hash.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)], heartbeat: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.metadata.resource_version = Some(heartbeat.into());
        n
    }

    /// A subscriber that reads a key whose object was deleted meanwhile still yields what
    /// follows (kube-runtime's handle alone waits for a wake-up that never comes), and only
    /// node changes that can move targets come out.
    #[tokio::test(start_paused = true)]
    async fn shared_nodes_survive_deletes_and_skip_heartbeats() {
        let (_store, writer) = reflector::store_shared::<Node>(4);
        let mut out = std::pin::pin!(relevant_nodes(
            Shared::subscribe(&writer),
            Relevance::default()
        ));
        let (events, watch) = unbounded::<watcher::Event<Node>>();
        tokio::spawn(reflector::reflector(writer, watch.map(Ok)).for_each(|_| async {}));
        for ev in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("a", &[], "1")),
            watcher::Event::InitDone,
            watcher::Event::Apply(node("b", &[], "2")),
            watcher::Event::Delete(node("b", &[], "3")),
        ] {
            events.unbounded_send(ev).unwrap();
        }
        let listed = out.next().await.unwrap();
        assert_eq!(listed.metadata.resource_version.as_deref(), Some("1"));
        // A heartbeat, then a change that can move targets; then the watch ends.
        events
            .unbounded_send(watcher::Event::Apply(node("a", &[], "4")))
            .unwrap();
        events
            .unbounded_send(watcher::Event::Apply(node("a", &[("zone", "x")], "5")))
            .unwrap();
        drop(events);
        let start = tokio::time::Instant::now();
        let seen: Vec<_> = tokio::time::timeout(Duration::from_secs(5), async {
            let mut seen = Vec::new();
            while let Some(n) = out.next().await {
                seen.push(n.metadata.resource_version.clone().unwrap_or_default());
            }
            seen
        })
        .await
        .expect("the subscription reads past the deleted node, and ends after the watch");
        // "b" was gone before it was read; "a"'s heartbeat is skipped.
        assert_eq!(seen, ["5"]);
        // Polled again by the nudge, not only by the timeout's own wake-up.
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
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
