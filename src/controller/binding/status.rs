//! A TargetGroupBinding's status: the next status from what the reconcile found (pure), and the
//! patch of the status subresource, made only when something other than a timestamp changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::controller::MANAGER;
use crate::crd::{Condition, ConditionStatus, TargetGroupBinding, TargetGroupBindingStatus};

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
}

/// The Ready condition, if set.
pub fn ready_condition(status: Option<&TargetGroupBindingStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

/// Whether the binding was ever synced: only then has the controller registered targets.
pub fn ever_synced(status: Option<&TargetGroupBindingStatus>) -> bool {
    status.is_some_and(|s| s.registered_targets.is_some())
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
    let unchanged = current
        .is_some_and(|c| c.observed_generation == generation && c.registered_targets == registered)
        && old.is_some_and(|c| {
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
    fn never_synced_bindings_have_no_registered_count() {
        let failed = next(
            None,
            Some(1),
            &outcome(false, "TargetGroupNotFound", None),
            time("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        assert!(!ever_synced(Some(&failed)));
        assert!(!ever_synced(None));
        let ok = next(
            Some(&failed),
            Some(1),
            &outcome(true, "TargetsRegistered", Some(0)),
            time("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        assert!(ever_synced(Some(&ok)));
    }
}
