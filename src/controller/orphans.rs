//! The orphan sweep: resources tagged with our cluster that no reconcile will ever look at
//! again are deleted after a grace period. That is everything of a Service that no longer
//! exists (its finalizer was removed by hand, it was force-deleted, it stopped being ours), and
//! what a live Service left behind where its reconcile no longer looks (a target group created
//! by a plan that a crash cut short before the Service changed; a load balancer under an old
//! name). Resources of other clusters or without our tag are never touched, nor those of another
//! load balancer class (another installation with the same cluster name), nor those without a
//! class tag (made before cloudlb tagged classes: whose they are cannot be told; a live Service's
//! sync adopts its own by adding the tag).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::service::{is_ours, reachable_names};
use crate::cloud::TaggedResource;
use crate::model::tags;

/// What a live Service's reconcile looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Reach {
    /// The Service cannot be modelled right now: none of its resources is judged.
    #[default]
    Unknown,
    Names {
        load_balancers: BTreeSet<String>,
        target_groups: BTreeSet<String>,
    },
}

/// Why a resource is an orphan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanReason {
    /// No Service of ours with that namespace/name exists.
    ServiceGone,
    /// The Service exists, but its reconcile no longer looks at this resource.
    Unreachable,
}

impl OrphanReason {
    fn as_str(self) -> &'static str {
        match self {
            OrphanReason::ServiceGone => "service gone",
            OrphanReason::Unreachable => "left behind by its live service",
        }
    }
}

/// Whether the sweep of class `class` may judge `r` at all: only what carries exactly its class.
pub fn judged_by(r: &TaggedResource, class: &str) -> bool {
    r.tags.get(tags::CLASS).map(String::as_str) == Some(class)
}

/// PURE: which of `inventory` (already only our cluster's) are orphans for the sweep of class
/// `class`, given its live Services (`namespace/name` → what their reconcile reaches). Only
/// resources tagged with `class` are judged. Load balancers come first in the result: a target
/// group cannot go while a listener uses it.
pub fn orphans<'a>(
    inventory: &'a [TaggedResource],
    live: &BTreeMap<String, Reach>,
    class: &str,
) -> Vec<(&'a TaggedResource, OrphanReason)> {
    let inventory: Vec<&TaggedResource> =
        inventory.iter().filter(|r| judged_by(r, class)).collect();
    let mut reachable_lbs: BTreeSet<&str> = BTreeSet::new();
    for r in inventory.iter().filter(|r| r.is_load_balancer()) {
        let service = r.tags.get(tags::SERVICE).map(String::as_str).unwrap_or("");
        match live.get(service) {
            Some(Reach::Unknown) => {
                reachable_lbs.insert(&r.arn);
            }
            Some(Reach::Names { load_balancers, .. }) if load_balancers.contains(&r.name) => {
                reachable_lbs.insert(&r.arn);
            }
            _ => {}
        }
    }
    let mut out: Vec<(&TaggedResource, OrphanReason)> = inventory
        .into_iter()
        .filter_map(|r| {
            // Only what we made carries the Service tag; anything else is left alone.
            let service = r.tags.get(tags::SERVICE)?;
            let reason = match live.get(service) {
                None => OrphanReason::ServiceGone,
                Some(Reach::Unknown) => return None,
                Some(Reach::Names {
                    target_groups,
                    load_balancers,
                }) => {
                    let reached = if r.is_security_group() {
                        // named like the load balancer it fronts
                        load_balancers.contains(&r.name)
                    } else if r.is_target_group() {
                        target_groups.contains(&r.name)
                            || r.load_balancer_arns
                                .iter()
                                .any(|a| reachable_lbs.contains(a.as_str()))
                    } else {
                        reachable_lbs.contains(r.arn.as_str())
                    };
                    if reached {
                        return None;
                    }
                    OrphanReason::Unreachable
                }
            };
            Some((r, reason))
        })
        .collect();
    out.sort_by_key(|(r, _)| r.deletion_rank());
    out
}

/// Runs [`sweep_once`] every `interval` until shutdown, once `synced` (the caches are full).
pub async fn sweep_loop(
    ctx: Arc<Context>,
    services: Store<Service>,
    synced: CancellationToken,
    interval: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    // Never judge against a store that is still filling: everything would look orphaned.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = async { tokio::join!(synced.cancelled(), ctx.leading.cancelled()) } => {}
    }
    tracing::info!(
        interval_seconds = interval.as_secs(),
        grace_seconds = grace.as_secs(),
        "orphan sweep on"
    );
    loop {
        match sweep_once(&ctx, &services, grace, &mut first_seen).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "orphan sweep deleted resources"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// What every live Service of ours reaches, from the store and the controller's state.
async fn live_services(ctx: &Context, services: &Store<Service>) -> BTreeMap<String, Reach> {
    let pending = ctx.services_memory.pending_target_groups.snapshot();
    services
        .state()
        .iter()
        .filter(|s| is_ours(s, &ctx.cluster))
        .map(|s| {
            let key = format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
            let reach = match reachable_names(s, ctx) {
                Some((lbs, tgs)) => {
                    let mut target_groups: BTreeSet<String> = tgs.into_iter().collect();
                    if let Some(p) = pending.get(&ObjectRef::from_obj(&**s)) {
                        target_groups.extend(p.iter().cloned());
                    }
                    Reach::Names {
                        load_balancers: lbs.into_iter().collect(),
                        target_groups,
                    }
                }
                None => Reach::Unknown,
            };
            (key, reach)
        })
        .collect()
}

/// One sweep; returns how many resources it deleted. An orphan is deleted once it has been
/// one for `grace` without interruption; a failed delete is retried at the next sweep.
pub async fn sweep_once(
    ctx: &Context,
    services: &Store<Service>,
    grace: Duration,
    first_seen: &mut HashMap<String, Instant>,
) -> Result<usize, crate::cloud::CloudError> {
    let inventory = ctx.cloud.inventory().await?;
    // Read the Services after the cloud: a resource created meanwhile belongs to a Service
    // that is already in the store.
    let live = live_services(ctx, services).await;
    let class = &ctx.cluster.load_balancer_class;
    for r in inventory
        .iter()
        .filter(|r| !r.tags.contains_key(tags::CLASS))
    {
        tracing::debug!(arn = %r.arn, name = %r.name, "no class tag: never judged by the sweep");
    }
    let found = orphans(&inventory, &live, class);
    let mut deleted = 0;
    let mut still_orphaned = BTreeSet::new();
    for (r, reason) in found {
        still_orphaned.insert(r.arn.clone());
        let service = r.tags.get(tags::SERVICE).cloned().unwrap_or_default();
        let since = *first_seen.entry(r.arn.clone()).or_insert_with(|| {
            tracing::info!(arn = %r.arn, name = %r.name, %service, reason = reason.as_str(),
                grace_seconds = grace.as_secs(), "orphaned resource found; deleting after the grace period");
            Instant::now()
        });
        if since.elapsed() < grace {
            continue;
        }
        tracing::info!(arn = %r.arn, name = %r.name, %service, reason = reason.as_str(), "deleting orphaned resource");
        match ctx.cloud.delete_resource(r).await {
            Ok(()) => {
                ctx.metrics.orphans_deleted.inc();
                deleted += 1;
            }
            Err(e) => {
                tracing::warn!(arn = %r.arn, error = %e, "cannot delete orphaned resource; retrying at the next sweep")
            }
        }
    }
    first_seen.retain(|arn, _| still_orphaned.contains(arn));
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASS: &str = "example.com/a";

    fn res(kind: &str, name: &str, service: Option<&str>, attached: &[&str]) -> TaggedResource {
        let mut t = BTreeMap::new();
        t.insert(tags::CLUSTER.to_string(), "c".to_string());
        t.insert(tags::CLASS.to_string(), CLASS.to_string());
        if let Some(s) = service {
            t.insert(tags::SERVICE.to_string(), s.to_string());
        }
        TaggedResource {
            arn: format!("arn:aws:elasticloadbalancing:us-east-1:1:{kind}/{name}/x"),
            name: name.into(),
            tags: t,
            load_balancer_arns: attached.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn lb_arn(name: &str) -> String {
        format!("arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/{name}/x")
    }

    fn names(lbs: &[&str], tgs: &[&str]) -> Reach {
        Reach::Names {
            load_balancers: lbs.iter().map(|s| s.to_string()).collect(),
            target_groups: tgs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn sg(id: &str, name: &str, service: &str) -> TaggedResource {
        let mut r = res("loadbalancer", name, Some(service), &[]);
        r.arn = id.to_string();
        r
    }

    #[test]
    fn managed_security_groups_follow_their_load_balancer_and_go_last() {
        let inventory = vec![
            sg("sg-live", "lb-a", "ns/a"),
            sg("sg-stale", "lb-a-old", "ns/a"),
            sg("sg-gone", "lb-b", "ns/b"),
            res("loadbalancer", "lb-b", Some("ns/b"), &[]),
        ];
        let live: BTreeMap<String, Reach> = [("ns/a".to_string(), names(&["lb-a"], &[]))].into();
        let got: Vec<(&str, OrphanReason)> = orphans(&inventory, &live, CLASS)
            .into_iter()
            .map(|(r, why)| (r.arn.as_str(), why))
            .collect();
        assert_eq!(
            got,
            vec![
                (lb_arn("lb-b").as_str(), OrphanReason::ServiceGone),
                ("sg-stale", OrphanReason::Unreachable),
                ("sg-gone", OrphanReason::ServiceGone),
            ]
        );
    }

    #[test]
    fn which_resources_are_orphans() {
        let a_lb = lb_arn("lb-a");
        let old_lb = lb_arn("lb-a-old");
        let inventory = vec![
            // ns/a lives: its load balancer, an attached and a desired target group stay
            res("targetgroup", "tg-a-attached", Some("ns/a"), &[&a_lb]),
            res("loadbalancer", "lb-a", Some("ns/a"), &[]),
            res("targetgroup", "tg-a-desired", Some("ns/a"), &[]),
            // ...a target group a cut-short plan left unattached, for a port it no longer has
            res("targetgroup", "tg-a-stale", Some("ns/a"), &[]),
            // ...a load balancer under an old name, with its target group
            res("loadbalancer", "lb-a-old", Some("ns/a"), &[]),
            res("targetgroup", "tg-a-old", Some("ns/a"), &[&old_lb]),
            // ns/gone was force-deleted
            res("targetgroup", "tg-gone", Some("ns/gone"), &[]),
            res("loadbalancer", "lb-gone", Some("ns/gone"), &[]),
            // ns/bad cannot be modelled: left alone
            res("targetgroup", "tg-bad", Some("ns/bad"), &[]),
            // our cluster tag but no Service tag: not ours to judge
            res("targetgroup", "tg-untagged", None, &[]),
        ];
        let live: BTreeMap<String, Reach> = [
            ("ns/a".to_string(), names(&["lb-a"], &["tg-a-desired"])),
            ("ns/bad".to_string(), Reach::Unknown),
        ]
        .into();
        let got: Vec<(&str, OrphanReason)> = orphans(&inventory, &live, CLASS)
            .into_iter()
            .map(|(r, why)| (r.name.as_str(), why))
            .collect();
        assert_eq!(
            got,
            vec![
                ("lb-a-old", OrphanReason::Unreachable),
                ("lb-gone", OrphanReason::ServiceGone),
                ("tg-a-stale", OrphanReason::Unreachable),
                ("tg-a-old", OrphanReason::Unreachable),
                ("tg-gone", OrphanReason::ServiceGone),
            ]
        );
    }

    #[test]
    fn nothing_is_an_orphan_while_every_service_lives_and_reaches_its_stack() {
        let lb = lb_arn("lb");
        let inventory = vec![
            res("loadbalancer", "lb", Some("ns/s"), &[]),
            res("targetgroup", "tg", Some("ns/s"), &[&lb]),
        ];
        let live: BTreeMap<String, Reach> = [("ns/s".to_string(), names(&["lb"], &["tg"]))].into();
        assert!(orphans(&inventory, &live, CLASS).is_empty());
    }

    #[test]
    fn only_resources_of_the_sweeps_own_class_are_judged() {
        let with_class = |name: &str, class: Option<&str>| {
            let mut r = res("loadbalancer", name, Some("ns/gone"), &[]);
            match class {
                Some(c) => r.tags.insert(tags::CLASS.into(), c.into()),
                None => r.tags.remove(tags::CLASS),
            };
            r
        };
        let inventory = vec![
            with_class("ours", Some(CLASS)),
            // another installation's (same cluster name, class B): its live Service is not in
            // our store, but that is not ours to judge
            with_class("theirs", Some("example.com/b")),
            // made before class tags: whose it is cannot be told, so it stays
            with_class("legacy", None),
            // a class that differs only in case is another class
            with_class("shouty", Some("EXAMPLE.com/a")),
        ];
        let got: Vec<&str> = orphans(&inventory, &BTreeMap::new(), CLASS)
            .into_iter()
            .map(|(r, _)| r.name.as_str())
            .collect();
        assert_eq!(got, vec!["ours"]);
    }
}
