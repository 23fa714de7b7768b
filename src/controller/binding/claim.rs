//! Who may put targets into a bound target group, and which of its targets a binding may take
//! out again. Pure: the reconcile in `binding.rs` supplies the group's tags, the bindings in the
//! cache and the targets it observed.
//!
//! - A group is bindable only when whoever owns it says so for this cluster: the tag
//!   `cloudlb.io/cluster=<cluster>` (a group made for this cluster; cloudlb's own groups, which
//!   also carry `cloudlb.io/service`, stay refused), or `cloudlb.io/allow-binding/<cluster>=true`
//!   (one such tag per cluster that may register into a shared group). The chart's IAM policy
//!   grants (De)RegisterTargets under exactly these two conditions.
//! - One binding per ARN in this cluster: the binding that already holds targets there wins, else
//!   the oldest (then namespace/name); the others report `Conflict` and touch nothing.
//! - A binding deregisters only targets it registered itself, remembered in its status
//!   (`status.targets`), so a group shared with other clusters or registrations keeps them.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Target, tags};

/// Why a target group may not be bound by this cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The group is one of cloudlb's own (it carries the Service tag).
    ManagedByCloudlb { service: String, cluster: String },
    /// No tag lets this cluster register into it.
    NotAllowed,
}

/// The tag whose value `true` lets cluster `cluster` bind a target group it does not own.
pub fn allow_tag(cluster: &str) -> String {
    format!("{}{cluster}", tags::ALLOW_BINDING_PREFIX)
}

/// Whether cluster `cluster` may register targets into a group tagged `t`.
pub fn access(t: &BTreeMap<String, String>, cluster: &str) -> Result<(), Refusal> {
    if let Some(service) = t.get(tags::SERVICE) {
        return Err(Refusal::ManagedByCloudlb {
            service: service.clone(),
            cluster: t.get(tags::CLUSTER).cloned().unwrap_or_default(),
        });
    }
    let tagged_for_us = t.get(tags::CLUSTER).map(String::as_str) == Some(cluster);
    let allowed = t.get(&allow_tag(cluster)).map(String::as_str) == Some("true");
    if tagged_for_us || allowed {
        Ok(())
    } else {
        Err(Refusal::NotAllowed)
    }
}

/// One binding's claim on an ARN, as the cache shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name`.
    pub key: String,
    /// `metadata.creationTimestamp` as RFC 3339 (sorts by time for the apiserver's format).
    pub created: String,
    /// Whether the binding has registered targets it still remembers.
    pub holds_targets: bool,
}

/// The binding that may manage the ARN: the one holding targets, else the oldest, then by key.
pub fn winner(claims: &[Claim]) -> Option<&Claim> {
    claims.iter().min_by(|a, b| {
        (!a.holds_targets, &a.created, &a.key).cmp(&(!b.holds_targets, &b.created, &b.key))
    })
}

/// What one sync writes, given what the binding wants, what the group has and what the binding
/// registered before (`owned`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Desired targets the group lacks.
    pub register: Vec<Target>,
    /// Targets this binding registered that it no longer wants and that are still active.
    pub deregister: Vec<Target>,
    /// What to remember before registering (so a crash after RegisterTargets never forgets).
    pub intent: BTreeSet<Target>,
    /// What the binding owns once the sync is done.
    pub owned_after: BTreeSet<Target>,
}

impl Ledger {
    /// Desired targets already in the group that this binding did not register (another
    /// cluster's, or registered by hand) are used but never claimed, so never deregistered.
    pub fn between(
        desired: &BTreeSet<Target>,
        active: &BTreeSet<Target>,
        owned: &BTreeSet<Target>,
    ) -> Ledger {
        let register: Vec<Target> = desired.difference(active).cloned().collect();
        let deregister: Vec<Target> = owned
            .intersection(active)
            .filter(|t| !desired.contains(t))
            .cloned()
            .collect();
        let intent: BTreeSet<Target> = owned.iter().chain(&register).cloned().collect();
        let owned_after: BTreeSet<Target> = intent.intersection(desired).cloned().collect();
        Ledger {
            register,
            deregister,
            intent,
            owned_after,
        }
    }

    /// Whether the group needs any write.
    pub fn is_empty(&self) -> bool {
        self.register.is_empty() && self.deregister.is_empty()
    }
}

/// What a binding deletion deregisters: the targets it registered that are still active.
pub fn release(active: &BTreeSet<Target>, owned: &BTreeSet<Target>) -> Vec<Target> {
    owned.intersection(active).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(items: &[&str]) -> BTreeSet<Target> {
        items
            .iter()
            .map(|id| Target {
                id: id.to_string(),
                port: 30080,
            })
            .collect()
    }

    fn list(items: &[&str]) -> Vec<Target> {
        targets(items).into_iter().collect()
    }

    fn tagged(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_groups_tagged_for_this_cluster_are_bindable() {
        let allow = allow_tag("prod");
        assert_eq!(allow, "cloudlb.io/allow-binding/prod");
        let cases = [
            (tagged(&[]), Err(Refusal::NotAllowed)),
            (tagged(&[(tags::CLUSTER, "prod")]), Ok(())),
            (
                tagged(&[(tags::CLUSTER, "other")]),
                Err(Refusal::NotAllowed),
            ),
            (tagged(&[(&allow, "true")]), Ok(())),
            (tagged(&[(&allow, "false")]), Err(Refusal::NotAllowed)),
            (tagged(&[(&allow, "TRUE ")]), Err(Refusal::NotAllowed)),
            (
                tagged(&[("cloudlb.io/allow-binding/prodx", "true")]),
                Err(Refusal::NotAllowed),
            ),
            (
                tagged(&[("cloudlb.io/allow-binding/other", "true"), (&allow, "true")]),
                Ok(()),
            ),
            (
                tagged(&[(tags::CLUSTER, "prod"), (tags::SERVICE, "ns/web")]),
                Err(Refusal::ManagedByCloudlb {
                    service: "ns/web".into(),
                    cluster: "prod".into(),
                }),
            ),
            (
                tagged(&[(&allow, "true"), (tags::SERVICE, "ns/web")]),
                Err(Refusal::ManagedByCloudlb {
                    service: "ns/web".into(),
                    cluster: String::new(),
                }),
            ),
        ];
        for (t, want) in cases {
            assert_eq!(access(&t, "prod"), want, "{t:?}");
        }
    }

    #[test]
    fn the_holder_then_the_oldest_binding_wins_an_arn() {
        let c = |key: &str, created: &str, holds: bool| Claim {
            key: key.into(),
            created: created.into(),
            holds_targets: holds,
        };
        let cases = [
            (vec![c("a/x", "2026-01-02T00:00:00Z", false)], "a/x"),
            (
                vec![
                    c("b/y", "2026-01-02T00:00:00Z", false),
                    c("a/x", "2026-01-01T00:00:00Z", false),
                ],
                "a/x",
            ),
            (
                vec![
                    c("b/y", "2026-01-01T00:00:00Z", false),
                    c("a/x", "2026-01-01T00:00:00Z", false),
                ],
                "a/x",
            ),
            (
                vec![
                    c("a/x", "2026-01-01T00:00:00Z", false),
                    c("b/y", "2026-01-02T00:00:00Z", true),
                ],
                "b/y",
            ),
        ];
        for (claims, want) in cases {
            assert_eq!(winner(&claims).map(|w| w.key.as_str()), Some(want));
        }
        assert_eq!(winner(&[]), None);
    }

    #[test]
    fn a_binding_takes_out_only_what_it_put_in() {
        // (desired, active, owned) → (register, deregister, intent, owned_after)
        let cases = [
            // first sync into an empty group
            (
                &["a", "b"][..],
                &[][..],
                &[][..],
                &["a", "b"][..],
                &[][..],
                &["a", "b"][..],
                &["a", "b"][..],
            ),
            // a shared group: another cluster's z is never deregistered
            (&["a"], &["a", "z"], &["a"], &[], &[], &["a"], &["a"]),
            // our node b left: deregistered; z stays
            (
                &["a"],
                &["a", "b", "z"],
                &["a", "b"],
                &[],
                &["b"],
                &["a", "b"],
                &["a"],
            ),
            // a desired target someone else registered is used but not claimed
            (&["a", "z"], &["z"], &[], &["a"], &[], &["a"], &["a"]),
            // owned but gone from the group (deregistered by hand) and still wanted: again
            (&["a"], &[], &["a"], &["a"], &[], &["a"], &["a"]),
            // owned, not active (draining), not wanted: forgotten, not deregistered twice
            (&[], &[], &["a"], &[], &[], &["a"], &[]),
        ];
        for (i, (desired, active, owned, reg, dereg, intent, after)) in
            cases.into_iter().enumerate()
        {
            let l = Ledger::between(&targets(desired), &targets(active), &targets(owned));
            assert_eq!(l.register, list(reg), "case {i}: register");
            assert_eq!(l.deregister, list(dereg), "case {i}: deregister");
            assert_eq!(l.intent, targets(intent), "case {i}: intent");
            assert_eq!(l.owned_after, targets(after), "case {i}: owned after");
        }
    }

    #[test]
    fn deletion_releases_only_owned_active_targets() {
        assert_eq!(
            release(&targets(&["a", "b", "z"]), &targets(&["a", "b", "c"])),
            list(&["a", "b"])
        );
        assert!(release(&targets(&["z"]), &targets(&[])).is_empty());
    }
}
