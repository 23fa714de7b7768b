//! Keeps the table current from the cluster: reflectors over Services and EndpointSlices; after
//! each burst of events the table is rebuilt and published only when it changed. Unless
//! unlabelled Services are served too, both watches select
//! `service.kubernetes.io/service-proxy-name=<name>` on the server (the EndpointSlice controller
//! copies a Service's labels onto its slices), as kube-proxy selects the label's absence.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::table::{self, SERVICE_PROXY_NAME_LABEL, Table, TableOptions};

/// Runs until the client fails for good (the watchers retry with backoff meanwhile). The first
/// table is published once both caches have listed; later ones when anything changed.
pub async fn run(client: Client, opts: TableOptions, tx: watch::Sender<Arc<Table>>) {
    let changed = Arc::new(Notify::new());
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let config = watch_config(&opts);
    let services_feed = feed(
        Api::<Service>::all(client.clone()),
        config.clone(),
        services_writer,
        Arc::clone(&changed),
    );
    let slices_feed = feed(
        Api::<EndpointSlice>::all(client),
        config,
        slices_writer,
        Arc::clone(&changed),
    );
    let publish = publish(services, slices, opts, tx, Arc::clone(&changed));
    tokio::join!(services_feed, slices_feed, publish);
}

/// The watches' selector: only this proxy's label, unless unlabelled Services count too (then
/// everything, filtered by `table::build`).
fn watch_config(opts: &TableOptions) -> watcher::Config {
    let config = watcher::Config::default();
    if opts.serve_unlabelled {
        config
    } else {
        config.labels(&format!(
            "{SERVICE_PROXY_NAME_LABEL}={}",
            opts.service_proxy_name
        ))
    }
}

/// Drives one reflector, waking the publisher on every event.
async fn feed<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
        }
        changed.notify_one();
    }
}

async fn publish(
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    opts: TableOptions,
    tx: watch::Sender<Arc<Table>>,
    changed: Arc<Notify>,
) {
    if services.wait_until_ready().await.is_err() || slices.wait_until_ready().await.is_err() {
        return;
    }
    let first = table::build(&services.state(), &slices.state(), &opts);
    tx.send_replace(Arc::new(first));
    loop {
        changed.notified().await;
        let next = table::build(&services.state(), &slices.state(), &opts);
        tx.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }
}
