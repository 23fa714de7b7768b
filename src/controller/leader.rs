//! Leader election on a coordination.k8s.io Lease, as client-go does it: acquire when free or
//! expired — judged on this replica's own clock, from when it last saw the record change, never
//! from the holder's timestamps — renew every lease/3, each renewal bounded by what is left of
//! the renew deadline (two thirds of the lease), and give up (writes are fenced, the process
//! exits) once that deadline passes, so a hung renewal cannot leave two leaders.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as LeaseObject, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// One replica's handle on the lease.
#[derive(Clone)]
pub struct Lease {
    api: Api<LeaseObject>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease record as last seen (holder, renew time, resourceVersion) and when, on the
    /// local monotonic clock.
    observed: Arc<Mutex<Option<(String, tokio::time::Instant)>>>,
}

impl Lease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Lease {
        Lease {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Arc::default(),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "lease acquire attempt failed"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    fn retry_period(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(500))
    }

    /// Renews until shutdown; cancels `lost` if renewal fails for longer than the deadline.
    pub async fn keep(self, lost: CancellationToken, shutdown: CancellationToken) {
        let deadline = self.duration * 2 / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.duration / 3) => {}
            }
            // A renewal that hangs must not outlive the deadline.
            let left = deadline.saturating_sub(last_ok.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("another replica holds the lease");
                    lost.cancel();
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!(timeout = ?left, "lease renewal timed out"),
            }
            if last_ok.elapsed() >= deadline {
                tracing::error!(deadline = ?deadline, "could not renew the lease in time; stepping down");
                lost.cancel();
                return;
            }
        }
    }

    /// Gives the lease up on a clean shutdown so the standby takes over at once.
    pub async fn release(&self) {
        if let Ok(mut lease) = self.api.get(&self.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    /// How long the lease record has looked like `record`, on the local clock (zero when it
    /// just changed): expiry never depends on the holder's clock agreeing with ours.
    fn unchanged_for(&self, record: String) -> Duration {
        let now = tokio::time::Instant::now();
        let mut seen = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.as_ref() {
            Some((r, at)) if *r == record => now.duration_since(*at),
            _ => {
                *seen = Some((record, now));
                Duration::ZERO
            }
        }
    }

    /// One round: take or renew the lease if we may. Updates are optimistic (resourceVersion).
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let lease = LeaseObject {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(&self.identity);
        let record = format!(
            "{:?}/{:?}/{:?}",
            spec.holder_identity, spec.renew_time, lease.metadata.resource_version
        );
        let duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .map(Duration::from_secs);
        let expired = match duration {
            Some(d) => self.unchanged_for(record) > d,
            None => true,
        };
        if !mine && holder.is_some() && !expired {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
