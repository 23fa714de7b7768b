//! Writes to the Service object: the finalizer, `status.loadBalancer` and our status condition.
//! Each write happens only when it changes something.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::MANAGER;

/// Our condition on the Service: whether the load balancer matches the Service.
pub const CONDITION: &str = "cloudlb.io/LoadBalancerSynced";

fn api(client: &Client, svc: &Service) -> Api<Service> {
    Api::namespaced(client.clone(), &svc.namespace().unwrap_or_default())
}

pub fn has_finalizer(svc: &Service, finalizer: &str) -> bool {
    svc.finalizers().iter().any(|f| f == finalizer)
}

/// Adds the finalizer (before any cloud call). The patch carries the resourceVersion, so it
/// fails with a conflict (and the reconcile retries) if the Service changed meanwhile.
pub async fn add_finalizer(
    client: &Client,
    svc: &Service,
    finalizer: &str,
) -> Result<(), kube::Error> {
    if has_finalizer(svc, finalizer) {
        return Ok(());
    }
    let mut finalizers = svc.finalizers().to_vec();
    finalizers.push(finalizer.to_string());
    set_finalizers(client, svc, finalizers).await
}

/// Removes the finalizer once every owned resource is gone.
pub async fn remove_finalizer(
    client: &Client,
    svc: &Service,
    finalizer: &str,
) -> Result<(), kube::Error> {
    if !has_finalizer(svc, finalizer) {
        return Ok(());
    }
    let finalizers: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    match set_finalizers(client, svc, finalizers).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

async fn set_finalizers(
    client: &Client,
    svc: &Service,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    let patch =
        json!({"metadata": {"resourceVersion": svc.resource_version(), "finalizers": finalizers}});
    api(client, svc)
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// The hostname currently in status, if any.
pub fn current_hostname(svc: &Service) -> Option<&str> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.hostname.as_deref())
}

fn current_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION))
}

/// One status write of a Service reconcile: the hostname (or none) and our condition.
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    pub hostname: Option<&'a str>,
    pub synced: bool,
    pub reason: &'a str,
    pub message: &'a str,
}

/// Desired status: the hostname (or none) and our condition. Patches only what differs.
pub async fn update(
    client: &Client,
    svc: &Service,
    hostname: Option<&str>,
    synced: bool,
    reason: &str,
    message: &str,
) -> Result<bool, kube::Error> {
    let same_host = current_hostname(svc) == hostname;
    let cond = current_condition(svc);
    let want_status = if synced { "True" } else { "False" };
    let same_cond =
        cond.is_some_and(|c| c.status == want_status && c.reason == reason && c.message == message);
    if same_host && same_cond {
        return Ok(false);
    }
    let mut conditions: Vec<Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != CONDITION)
        .collect();
    let transition = match cond {
        Some(c) if c.status == want_status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    conditions.push(Condition {
        type_: CONDITION.into(),
        status: want_status.into(),
        reason: reason.into(),
        message: super::text::truncate_bytes(message, super::text::CONDITION_MESSAGE_BYTES),
        last_transition_time: transition,
        observed_generation: svc.metadata.generation,
    });
    let ingress = match hostname {
        Some(h) => json!([{"hostname": h}]),
        None => json!([]),
    };
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions}});
    api(client, svc)
        .patch_status(
            &svc.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(true)
}

/// Removes our hostname and condition (after teardown of a Service that still exists).
pub async fn clear(client: &Client, svc: &Service) -> Result<(), kube::Error> {
    if current_hostname(svc).is_none() && current_condition(svc).is_none() {
        return Ok(());
    }
    let conditions: Vec<Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != CONDITION)
        .collect();
    let patch = json!({"status": {"loadBalancer": {"ingress": null}, "conditions": conditions}});
    match api(client, svc)
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
