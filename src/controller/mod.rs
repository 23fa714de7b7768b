//! The controller: Services of type LoadBalancer → NLBs, targets, status and Events; and
//! TargetGroupBindings → targets in target groups made outside cloudlb.
//!
//! [`run`] wires the pieces: kube client, AWS client, admin server, leader lease, the reflectors
//! (Services, Nodes, EndpointSlices; their streams in `watches`) and two kube-runtime
//! Controllers sharing them: one calls [`service::reconcile`] per Service key, the other
//! [`binding::reconcile`] per binding key. The command line is in `args`; this module keeps
//! what every reconcile shares: [`Context`], the finalizer and the manager name.

mod args;
pub mod binding;
pub mod bursts;
pub mod events;
pub mod leader;
pub mod memory;
pub mod orphans;
pub mod plan_cmd;
pub mod policy;
pub mod readiness;
mod run;
pub mod service;
pub mod status;
#[cfg(test)]
pub mod testing;
pub mod text;
mod watches;
pub mod webhook;
pub mod writes;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

pub use args::{ClusterArgs, ControllerArgs};
pub use run::run;

use crate::cloud::Cloud;
use crate::metrics::ControllerMetrics;

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
