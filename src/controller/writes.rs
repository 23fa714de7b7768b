//! The Kubernetes writes of a Service reconcile (finalizer, status, Events) behind a narrow
//! trait, so that their order relative to cloud calls is unit-tested against a fake.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::runtime::events::{EventType, Recorder};

use super::{events, status};

/// What a reconcile writes to its Service.
pub trait ServiceWrites: Send + Sync {
    /// Adds `finalizer` (no-op when present).
    fn add_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>>;

    /// Removes `finalizer` (no-op when absent or the Service is gone).
    fn remove_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>>;

    /// Sets the hostname and our condition; `Ok(true)` when something changed.
    fn update_status<'a>(
        &'a self,
        svc: &'a Service,
        update: status::Update<'a>,
    ) -> BoxFuture<'a, Result<bool, kube::Error>>;

    /// Removes our hostname and condition.
    fn clear_status<'a>(&'a self, svc: &'a Service) -> BoxFuture<'a, Result<(), kube::Error>>;

    /// Records an Event on the Service (failures are logged, never returned).
    fn event<'a>(&'a self, svc: &'a Service, event: events::Note) -> BoxFuture<'a, ()>;
}

/// The real writes, through the API server.
pub struct KubeWrites {
    pub client: Client,
    pub recorder: Recorder,
}

impl ServiceWrites for KubeWrites {
    fn add_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(status::add_finalizer(&self.client, svc, finalizer))
    }

    fn remove_finalizer<'a>(
        &'a self,
        svc: &'a Service,
        finalizer: &'a str,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(status::remove_finalizer(&self.client, svc, finalizer))
    }

    fn update_status<'a>(
        &'a self,
        svc: &'a Service,
        u: status::Update<'a>,
    ) -> BoxFuture<'a, Result<bool, kube::Error>> {
        Box::pin(status::update(
            &self.client,
            svc,
            u.hostname,
            u.synced,
            u.reason,
            u.message,
        ))
    }

    fn clear_status<'a>(&'a self, svc: &'a Service) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(status::clear(&self.client, svc))
    }

    fn event<'a>(&'a self, svc: &'a Service, note: events::Note) -> BoxFuture<'a, ()> {
        Box::pin(events::publish(&self.recorder, svc, note))
    }
}

/// Shorthand for a Normal Event note whose action is its reason.
pub fn normal(reason: &str, note: impl Into<String>) -> events::Note {
    events::Note {
        type_: EventType::Normal,
        reason: reason.into(),
        action: reason.into(),
        note: note.into(),
    }
}
