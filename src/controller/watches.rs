//! The controller's watches: Nodes, EndpointSlices and Services into their caches, each
//! change handed on to the binding controller, and node and EndpointSlice bursts turned into
//! Service wake-ups; with the small helpers they share (backoff, first-list marks, node trim).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
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

/// The writers of [`Stores`], fed by the watch streams.
pub(super) struct Writers {
    pub nodes: Writer<Node>,
    pub slices: Writer<EndpointSlice>,
    pub services: Writer<Service>,
}

/// Empty caches and their writers.
pub(super) fn caches() -> (Stores, Writers) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (services, service_writer) = reflector::store::<Service>();
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

/// Where the Service controller's watches hand each change on: the binding controller gets a
/// copy of every change once the stores hold it, and a full pass after each (re)list.
pub(super) struct Fanout {
    pub services: UnboundedSender<Service>,
    pub nodes: UnboundedSender<Node>,
    pub slices: UnboundedSender<EndpointSlice>,
    pub relists: UnboundedSender<()>,
}

/// Changes that may move a binding's targets, fanned out from the Service controller's streams.
pub(super) struct BindingTriggers {
    pub services: UnboundedReceiver<Service>,
    pub nodes: UnboundedReceiver<Node>,
    pub slices: UnboundedReceiver<EndpointSlice>,
    pub relists: UnboundedReceiver<()>,
}

/// The two ends of the fan-out.
pub(super) fn fanout() -> (Fanout, BindingTriggers) {
    let (node_tx, node_rx) = unbounded::<Node>();
    let (slice_tx, slice_rx) = unbounded::<EndpointSlice>();
    let (svc_tx, svc_rx) = unbounded::<Service>();
    let (relist_tx, relist_rx) = unbounded::<()>();
    (
        Fanout {
            services: svc_tx,
            nodes: node_tx,
            slices: slice_tx,
            relists: relist_tx,
        },
        BindingTriggers {
            services: svc_rx,
            nodes: node_rx,
            slices: slice_rx,
            relists: relist_rx,
        },
    )
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

/// The three watches, into `writers`, each change handed on through `fanout`, each first list
/// marked in `first_lists`.
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
            fanout.nodes,
            relists.clone(),
            first_lists.nodes.clone(),
        )
        .boxed(),
        slices: slices(
            client,
            writers.slices,
            fanout.slices,
            relists,
            first_lists.slices.clone(),
        )
        .boxed(),
        services: services(
            client,
            writers.services,
            fanout.services,
            fanout.relists,
            first_lists.services.clone(),
            ctx.clone(),
        )
        .boxed(),
    }
}

/// Nodes into their cache; only changes that can move targets come out (not status
/// heartbeats), each also sent to `changed`.
fn nodes(
    client: &Client,
    writer: Writer<Node>,
    changed: UnboundedSender<Node>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
) -> impl Stream<Item = Changes<Node>> + Send + 'static {
    let mut node_hashes: HashMap<String, u64> = HashMap::new();
    reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .modify(trim_node)
            .backoff(watch_backoff()),
    )
    .inspect(move |ev| relisted(ev, &relists))
    .inspect(mark_synced(first_list))
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
            let _ = changed.unbounded_send(n.clone());
        }
    })
}

/// EndpointSlices into their cache; every touched slice comes out, also sent to `changed`.
fn slices(
    client: &Client,
    writer: Writer<EndpointSlice>,
    changed: UnboundedSender<EndpointSlice>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
) -> impl Stream<Item = Changes<EndpointSlice>> + Send + 'static {
    reflector::reflector(
        writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s: &mut EndpointSlice| s.managed_fields_mut().clear())
        .backoff(watch_backoff()),
    )
    .inspect(move |ev| relisted(ev, &relists))
    .inspect(mark_synced(first_list))
    .touched_objects()
    .inspect(move |s| {
        if let Ok(s) = s {
            let _ = changed.unbounded_send(s.clone());
        }
    })
}

/// Services into their cache; applied Services come out (the Service controller's own
/// stream). Applied and deleted ones are sent to `changed`; a deleted Service's memory is
/// forgotten, and after a relist every Service the store no longer holds.
fn services(
    client: &Client,
    writer: Writer<Service>,
    changed: UnboundedSender<Service>,
    relists: UnboundedSender<()>,
    first_list: CancellationToken,
    ctx: Arc<Context>,
) -> impl Stream<Item = Changes<Service>> + Send + 'static {
    reflector::reflector(
        writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s: &mut Service| s.managed_fields_mut().clear())
        .backoff(watch_backoff()),
    )
    .inspect(mark_synced(first_list))
    .inspect(move |ev| {
        relisted(ev, &relists);
        match ev {
            // Per-Service memory goes with the Service, also after a force-delete.
            Ok(watcher::Event::Delete(s)) => ctx.forget_service(&ObjectRef::from_obj(s)),
            Ok(watcher::Event::InitDone) => ctx.prune_services(),
            _ => {}
        }
        if let Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) = ev {
            let _ = changed.unbounded_send(s.clone());
        }
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
    n.managed_fields_mut().clear();
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
