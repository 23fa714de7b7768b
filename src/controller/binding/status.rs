//! A TargetGroupBinding's status: the next status from what the reconcile found (pure), and the
//! patch of the status subresource, made only when something other than a timestamp changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use std::collections::BTreeSet;

use crate::controller::MANAGER;
use crate::crd::{
    Condition, ConditionStatus, RegisteredTarget, TargetGroupBinding, TargetGroupBindingStatus,
};
use crate::model::Target;

/// The one condition a binding carries.
pub const READY: &str = "Ready";

/// What a reconcile concluded, in condition terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub ready: bool,
    pub reason: String,
    pub message: String,
    /// Targets now registered; `None` keeps the last known count (nothing was observed).
    pub registered: Option<i32>,
    /// The targets this binding registered itself; `None` keeps what status says.
    pub owned: Option<BTreeSet<Target>>,
}

/// The Ready condition, if set.
pub fn ready_condition(status: Option<&TargetGroupBindingStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

/// The targets the binding registered itself, as its status remembers them. A binding synced
/// by a cloudlb that did not keep this list (`registeredTargets` set, no `targets`) is taken to
/// own the targets it wants (`wanted`), the ones it would have registered; one never synced
/// owns nothing.
pub fn owned_targets(
    status: Option<&TargetGroupBindingStatus>,
    wanted: impl FnOnce() -> BTreeSet<Target>,
) -> BTreeSet<Target> {
    match status {
        Some(TargetGroupBindingStatus {
            targets: Some(list),
            ..
        }) => list
            .iter()
            .map(|t| Target {
                id: t.id.clone(),
                port: t.port,
            })
            .collect(),
        Some(s) if s.registered_targets.is_some() => wanted(),
        _ => BTreeSet::new(),
    }
}

fn as_status_list(owned: &BTreeSet<Target>) -> Vec<RegisteredTarget> {
    owned
        .iter()
        .map(|t| RegisteredTarget {
            id: t.id.clone(),
            port: t.port,
        })
        .collect()
}

/// The status after `outcome`, or `None` when the current one already says it (the transition
/// time moves only when the condition's status flips).
pub fn next(
    current: Option<&TargetGroupBindingStatus>,
    generation: Option<i64>,
    outcome: &Outcome,
    now: Time,
) -> Option<TargetGroupBindingStatus> {
    let status = if outcome.ready {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let old = ready_condition(current);
    let registered = outcome
        .registered
        .or_else(|| current.and_then(|s| s.registered_targets));
    let targets = match &outcome.owned {
        Some(o) => Some(as_status_list(o)),
        None => current.and_then(|s| s.targets.clone()),
    };
    let unchanged = current.is_some_and(|c| {
        c.observed_generation == generation
            && c.registered_targets == registered
            && c.targets == targets
    }) && old.is_some_and(|c| {
        c.status == status
            && c.reason == outcome.reason
            && c.message == outcome.message
            && c.observed_generation == generation
    });
    if unchanged {
        return None;
    }
    let last_transition_time = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Some(now),
    };
    let mut conditions: Vec<Condition> = current
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != READY)
        .collect();
    conditions.push(Condition {
        type_: READY.into(),
        status,
        reason: outcome.reason.clone(),
        message: crate::controller::text::truncate_bytes(
            &outcome.message,
            crate::controller::text::CONDITION_MESSAGE_BYTES,
        ),
        last_transition_time,
        observed_generation: generation,
    });
    Some(TargetGroupBindingStatus {
        observed_generation: generation,
        registered_targets: registered,
        targets,
        conditions,
    })
}

/// Writes `outcome` to the status subresource when it changes anything; returns whether the
/// Ready condition's status, reason or message changed (worth an Event).
pub async fn update(
    client: &Client,
    binding: &TargetGroupBinding,
    outcome: &Outcome,
) -> Result<bool, kube::Error> {
    let current = binding.status.as_ref();
    let Some(status) = next(
        current,
        binding.metadata.generation,
        outcome,
        Time(k8s_openapi::jiff::Timestamp::now()),
    ) else {
        return Ok(false);
    };
    let old = ready_condition(current);
    let transition = old.is_none_or(|c| {
        c.status != ready_condition(Some(&status)).map_or(ConditionStatus::Unknown, |n| n.status)
            || c.reason != outcome.reason
            || c.message != outcome.message
    });
    let api: Api<TargetGroupBinding> =
        Api::namespaced(client.clone(), &binding.namespace().unwrap_or_default());
    api.patch_status(
        &binding.name_any(),
        &PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(transition)
}

/// Remembers `owned` in `status.targets` alone (before registering them), leaving the
/// condition as it is.
pub async fn remember_targets(
    client: &Client,
    binding: &TargetGroupBinding,
    owned: &BTreeSet<Target>,
) -> Result<(), kube::Error> {
    let api: Api<TargetGroupBinding> =
        Api::namespaced(client.clone(), &binding.namespace().unwrap_or_default());
    api.patch_status(
        &binding.name_any(),
        &PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&json!({ "status": { "targets": as_status_list(owned) } })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn outcome(ready: bool, reason: &str, registered: Option<i32>) -> Outcome {
        Outcome {
            ready,
            reason: reason.into(),
            message: format!("{reason} message"),
            registered,
            owned: None,
        }
    }

    #[test]
    fn next_status_only_when_something_changed() {
        let t0 = time("2026-01-01T00:00:00Z");
        let t1 = time("2026-01-01T00:01:00Z");
        let first = next(
            None,
            Some(1),
            &outcome(true, "TargetsRegistered", Some(2)),
            t0.clone(),
        )
        .expect("a first status");
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.registered_targets, Some(2));
        let c = ready_condition(Some(&first)).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str(), c.last_transition_time.clone()),
            (ConditionStatus::True, "TargetsRegistered", Some(t0.clone()))
        );

        // Same outcome: nothing to write.
        let same = outcome(true, "TargetsRegistered", Some(2));
        assert_eq!(next(Some(&first), Some(1), &same, t1.clone()), None);

        // A new count or generation is written, but the condition keeps its transition time.
        let more = next(
            Some(&first),
            Some(1),
            &outcome(true, "TargetsRegistered", Some(3)),
            t1.clone(),
        )
        .expect("count changed");
        assert_eq!(more.registered_targets, Some(3));
        assert_eq!(
            ready_condition(Some(&more)).unwrap().last_transition_time,
            Some(t0.clone())
        );
        let newer = next(Some(&first), Some(2), &same, t1.clone()).expect("generation changed");
        assert_eq!(newer.observed_generation, Some(2));

        // Turning False moves the transition time and keeps the last known count.
        let failed = next(
            Some(&first),
            Some(1),
            &outcome(false, "ServiceNotFound", None),
            t1.clone(),
        )
        .expect("flipped");
        let c = ready_condition(Some(&failed)).unwrap();
        assert_eq!(
            (c.status, c.last_transition_time.clone()),
            (ConditionStatus::False, Some(t1.clone()))
        );
        assert_eq!(failed.registered_targets, Some(2));
        assert_eq!(failed.conditions.len(), 1);
    }

    #[test]
    fn owned_targets_come_from_status_and_survive_other_outcomes() {
        let t = |id: &str| Target {
            id: id.into(),
            port: 30080,
        };
        let wanted = || BTreeSet::from([t("w")]);
        let t0 = time("2026-01-01T00:00:00Z");
        let failed = next(
            None,
            Some(1),
            &outcome(false, "TargetGroupNotFound", None),
            t0.clone(),
        )
        .unwrap();
        // never synced: owns nothing, whatever it wants
        assert!(owned_targets(Some(&failed), wanted).is_empty());
        assert!(owned_targets(None, wanted).is_empty());
        let mut synced = outcome(true, "TargetsRegistered", Some(2));
        synced.owned = Some(BTreeSet::from([t("a"), t("b")]));
        let ok = next(Some(&failed), Some(1), &synced, t0.clone()).unwrap();
        assert_eq!(
            owned_targets(Some(&ok), wanted),
            BTreeSet::from([t("a"), t("b")])
        );
        // an outcome that observed nothing keeps the list
        let later = next(
            Some(&ok),
            Some(1),
            &outcome(false, "Conflict", None),
            t0.clone(),
        )
        .unwrap();
        assert_eq!(owned_targets(Some(&later), wanted).len(), 2);
        // a changed list alone is worth a write
        let mut fewer = synced.clone();
        fewer.owned = Some(BTreeSet::from([t("a")]));
        assert!(next(Some(&ok), Some(1), &fewer, t0.clone()).is_some());
        assert!(next(Some(&ok), Some(1), &synced, t0).is_none());
        // synced by a cloudlb without the list: it owns what it wants
        let legacy = TargetGroupBindingStatus {
            registered_targets: Some(1),
            ..Default::default()
        };
        assert_eq!(owned_targets(Some(&legacy), wanted), wanted());
    }
}
