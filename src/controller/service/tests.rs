//! The reconcile's rules on the in-memory cloud: finalizer first, no call when nothing
//! changed, failures warned and backed off, teardown before the finalizer goes, plan = deploy,
//! and the managed-load-balancers gauge.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::*;
use crate::controller::testing::{World, deleting, lb_service};

async fn run(w: &World, svc: &Service) -> Result<Action, ReconcileError> {
    reconcile(Arc::new(svc.clone()), w.ctx.clone()).await
}

#[tokio::test]
async fn the_finalizer_is_added_before_the_first_cloud_call() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    run(&w, &svc).await.unwrap();
    let log = w.journal.entries();
    let finalizer = log.iter().position(|e| e == "kube:add-finalizer");
    let first_cloud = log.iter().position(|e| e.starts_with("cloud:"));
    assert!(
        finalizer.is_some() && finalizer < first_cloud,
        "finalizer first: {log:#?}"
    );
    assert_eq!(w.cloud.resources_of("shop/web"), 3, "{log:#?}");
    assert!(
        log.iter()
            .any(|e| e.starts_with("kube:status Synced k8s-shop-web-")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn an_unchanged_service_makes_no_cloud_call() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    run(&w, &svc).await.unwrap();
    let now = w.writes.current(&svc);
    w.journal.clear();
    assert_eq!(run(&w, &now).await.unwrap(), Action::requeue(w.ctx.resync));
    assert_eq!(w.journal.entries(), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_deploy_warns_and_requeues_with_growing_backoff() {
    let w = World::new(1);
    let svc = Arc::new(lb_service("shop", "web", 30080));
    w.cloud.fail_next_deploys(3);
    let mut delays = Vec::new();
    for _ in 0..3 {
        let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
        delays.push(error_policy(svc.clone(), &err, w.ctx.clone()));
    }
    let warnings = w
        .journal
        .with_prefix("kube:event Warning SyncLoadBalancerFailed");
    assert_eq!(warnings.len(), 3, "{:#?}", w.journal.entries());
    assert!(warnings[0].contains("injected failure 1"), "{warnings:?}");
    assert_eq!(
        delays,
        [5, 10, 20].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    let err = reconcile(svc.clone(), w.ctx.clone()).await;
    assert!(err.is_ok(), "the fourth deploy succeeds");
    assert_eq!(w.cloud.resources_of("shop/web"), 3);
    assert!(w.ctx.services_memory.failures.is_empty(), "success clears");
}

#[tokio::test]
async fn teardown_removes_the_finalizer_only_after_the_cloud_holds_nothing() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    run(&w, &svc).await.unwrap();
    let gone = deleting(&w.writes.current(&svc));
    w.cloud.fail_next_deploys(1);
    w.journal.clear();
    assert!(run(&w, &gone).await.is_err());
    assert!(w.journal.with_prefix("kube:remove-finalizer").is_empty());
    assert_eq!(w.cloud.resources_of("shop/web"), 3);

    w.journal.clear();
    run(&w, &gone).await.unwrap();
    assert_eq!(w.cloud.resources_of("shop/web"), 0);
    let log = w.journal.entries();
    let last_deploy = log.iter().rposition(|e| e.starts_with("cloud:deploy"));
    let removed = log.iter().position(|e| e == "kube:remove-finalizer");
    assert!(removed.is_some() && last_deploy < removed, "{log:#?}");
}

#[tokio::test]
async fn plan_output_equals_the_changes_reconcile_applies() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    let planned = |svc: Service| {
        let w = &w;
        async move {
            let nodes = w.ctx.nodes.state();
            let view = View {
                svc: &svc,
                cluster: &w.ctx.cluster,
                finalizer: &w.ctx.finalizer,
                nodes: &nodes,
                slices: &[],
                pending_target_groups: Default::default(),
                gated: Default::default(),
                applied: None,
                name_holder: None,
                resync: w.ctx.resync,
                now: Instant::now(),
            };
            match dry_run(&view, w.cloud.as_ref()).await.unwrap() {
                DryRun::Plan(p) => p
                    .changes
                    .iter()
                    .map(|c| format!("cloud:deploy {c}"))
                    .collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            }
        }
    };
    // Create; change the nodePort (the new group is made and warmed up behind a spare
    // listener: the move waits for its health checks); then the move itself, once the fake's
    // targets have passed.
    let moved = lb_service("shop", "web", 30081);
    for step in [svc.clone(), moved.clone(), moved] {
        let current = w.writes.current(&step);
        let plan = planned(current.clone()).await;
        assert!(!plan.is_empty());
        w.journal.clear();
        run(&w, &current).await.unwrap();
        assert_eq!(w.journal.with_prefix("cloud:deploy"), plan);
    }
    // Once applied, the plan of the current Service is empty.
    let last = lb_service("shop", "web", 30081);
    assert!(planned(w.writes.current(&last)).await.is_empty());
}

#[tokio::test]
async fn the_managed_load_balancers_gauge_follows_syncs_and_deletes() {
    let w = World::new(1);
    let a = lb_service("shop", "a", 30080);
    let b = lb_service("shop", "b", 30081);
    run(&w, &a).await.unwrap();
    assert_eq!(w.ctx.metrics.managed_load_balancers.get(), 1);
    run(&w, &b).await.unwrap();
    assert_eq!(w.ctx.metrics.managed_load_balancers.get(), 2);
    run(&w, &deleting(&w.writes.current(&a))).await.unwrap();
    assert_eq!(w.ctx.metrics.managed_load_balancers.get(), 1);
    // A force-deleted Service (no teardown) is forgotten when its delete is seen.
    w.ctx.forget_service(&ObjectRef::from_obj(&b));
    assert_eq!(w.ctx.metrics.managed_load_balancers.get(), 0);
    assert!(w.ctx.services_memory.applied.is_empty());
}

#[tokio::test]
async fn a_standby_replica_neither_calls_the_cloud_nor_writes() {
    let w = World::standby(2);
    let svc = lb_service("shop", "web", 30080);
    assert_eq!(run(&w, &svc).await.unwrap(), Action::await_change());
    assert_eq!(
        run(&w, &deleting(&svc)).await.unwrap(),
        Action::await_change()
    );
    assert_eq!(w.journal.entries(), Vec::<String>::new());
}

#[tokio::test]
async fn a_teardown_finds_target_groups_left_behind_by_their_tags() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    run(&w, &svc).await.unwrap();
    // The Service became ClusterIP (no nodePorts: its target group names cannot be modelled)
    // after a teardown deleted the load balancer but not its target group.
    w.cloud.leave_only_target_groups_of("shop/web");
    assert_eq!(w.cloud.resources_of("shop/web"), 1);
    let mut cluster_ip = w.writes.current(&svc);
    let spec = cluster_ip.spec.as_mut().unwrap();
    spec.type_ = Some("ClusterIP".into());
    spec.load_balancer_class = None;
    spec.ports.as_mut().unwrap()[0].node_port = None;
    run(&w, &cluster_ip).await.unwrap();
    assert_eq!(
        w.cloud.resources_of("shop/web"),
        0,
        "{:#?}",
        w.journal.entries()
    );
    assert!(
        w.journal
            .entries()
            .iter()
            .any(|e| e == "kube:remove-finalizer"),
        "{:#?}",
        w.journal.entries()
    );
}

#[tokio::test]
async fn a_taken_or_refused_load_balancer_name_changes_nothing_and_both_services_hear_of_it() {
    let mut cluster = crate::controller::testing::cluster();
    cluster.policy.custom_name_namespaces = vec!["team-*".into()];
    let mut w = World::with_cluster(1, cluster);
    let named = |ns: &str, created: &str| {
        let mut s = lb_service(ns, "web", 30080);
        s.metadata.annotations =
            Some([(crate::annotations::key("name"), "shared-name".to_string())].into());
        s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            created.parse().unwrap(),
        ));
        s
    };
    let (holder, late) = (
        named("team-a", "2026-01-01T00:00:00Z"),
        named("team-b", "2026-01-02T00:00:00Z"),
    );
    w.add_service(&holder);
    w.add_service(&late);
    run(&w, &holder).await.unwrap();
    assert_eq!(w.cloud.resources_of("team-a/web"), 3);
    w.journal.clear();
    run(&w, &late).await.unwrap();
    let log = w.journal.entries();
    assert!(log.iter().all(|e| !e.starts_with("cloud:")), "{log:#?}");
    assert!(
        log.iter()
            .any(|e| e.starts_with("kube:status NameConflict")),
        "{log:#?}"
    );
    let warnings: Vec<&String> = log
        .iter()
        .filter(|e| e.starts_with("kube:event Warning"))
        .collect();
    assert_eq!(warnings.len(), 2, "one on each Service: {log:#?}");
    assert!(
        warnings
            .iter()
            .any(|e| e.contains("already used by Service team-a/web"))
    );
    assert!(
        warnings
            .iter()
            .any(|e| e.contains("Service team-b/web also asks"))
    );

    // A namespace the admin did not allow: refused before any cloud call.
    let outsider = named("shop", "2026-01-03T00:00:00Z");
    w.journal.clear();
    run(&w, &outsider).await.unwrap();
    let log = w.journal.entries();
    assert!(log.iter().all(|e| !e.starts_with("cloud:")), "{log:#?}");
    assert!(
        log.iter().any(|e| e.starts_with("kube:status NotAllowed")),
        "{log:#?}"
    );
}

/// A Service synced on `w`, and its Service as written back (finalizer and hostname set).
async fn synced(w: &World, svc: &Service) -> Service {
    run(w, svc).await.unwrap();
    w.writes.current(svc)
}

#[tokio::test]
async fn a_node_join_registers_once_per_group_without_observing() {
    let mut w = World::new(2);
    let svc = synced(&w, &lb_service("shop", "web", 30080)).await;
    w.add_node("n2", "i-2");
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    let log = w.journal.entries();
    let cloud: Vec<&String> = log.iter().filter(|e| e.starts_with("cloud:")).collect();
    assert_eq!(cloud.len(), 1, "{log:#?}");
    assert!(cloud[0].starts_with("cloud:register "), "{log:#?}");
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-0", "i-1", "i-2"]);
    assert!(
        log.iter()
            .any(|e| e.contains("Normal UpdatedLoadBalancer") && e.contains("targets +1 -0")),
        "{log:#?}"
    );

    // The next node change starts from what the join left.
    w.remove_node("n0");
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    let cloud: Vec<String> = w.journal.with_prefix("cloud:");
    assert_eq!(cloud.len(), 1, "{cloud:#?}");
    assert!(cloud[0].starts_with("cloud:deregister "), "{cloud:#?}");
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-1", "i-2"]);

    // Nothing changed since: no call at all.
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    assert_eq!(w.journal.with_prefix("cloud:"), Vec::<String>::new());
}

#[tokio::test]
async fn the_drift_check_after_target_changes_observes_and_finds_nothing_to_do() {
    let mut w = World::new(2);
    let svc = synced(&w, &lb_service("shop", "web", 30080)).await;
    w.add_node("n2", "i-2");
    run(&w, &svc).await.unwrap();
    // Memory older than the resync period: the full drift check.
    let key = ObjectRef::from_obj(&svc);
    let mut a = w.ctx.services_memory.applied.get(&key).unwrap();
    a.at -= w.ctx.resync;
    w.ctx.services_memory.applied.insert(key, a);
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    let cloud = w.journal.with_prefix("cloud:");
    assert_eq!(cloud, ["cloud:observe shop/web"], "reads only");
}

#[tokio::test]
async fn a_target_group_gone_behind_our_back_is_repaired_by_a_full_sync() {
    let mut w = World::new(2);
    let svc = synced(&w, &lb_service("shop", "web", 30080)).await;
    w.cloud.delete_target_groups();
    w.add_node("n2", "i-2");
    assert!(
        run(&w, &svc).await.is_err(),
        "register into a missing group fails"
    );
    assert!(
        !w.journal
            .with_prefix("kube:event Warning SyncLoadBalancerFailed")
            .is_empty()
    );
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    let log = w.journal.entries();
    assert!(
        log.iter().any(|e| e == "cloud:observe shop/web"),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e.starts_with("cloud:deploy") && e.contains("CreateTargetGroup")),
        "{log:#?}"
    );
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-0", "i-1", "i-2"]);
}

#[tokio::test]
async fn a_stale_cache_after_our_own_writes_costs_no_cloud_call() {
    let w = World::new(2);
    let svc = lb_service("shop", "web", 30080);
    run(&w, &svc).await.unwrap();
    // The cache still holds the Service as it was before the finalizer and status writes.
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    assert_eq!(w.journal.with_prefix("cloud:"), Vec::<String>::new());
}

#[tokio::test]
async fn most_nodes_not_ready_at_once_stay_registered_with_a_warning() {
    let mut w = World::new(4);
    let svc = synced(&w, &lb_service("shop", "web", 30080)).await;
    // One of four NotReady: below the 50 % guard, deregistered.
    w.set_node("n0", "i-0", false);
    run(&w, &svc).await.unwrap();
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-1", "i-2", "i-3"]);
    // Three of four: a blip, not three dead machines; nothing is deregistered.
    w.set_node("n1", "i-1", false);
    w.set_node("n2", "i-2", false);
    w.journal.clear();
    run(&w, &svc).await.unwrap();
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-0", "i-1", "i-2", "i-3"]);
    let warnings = w
        .journal
        .with_prefix("kube:event Warning DeregistrationWithheld");
    assert_eq!(warnings.len(), 1, "{:#?}", w.journal.entries());
    assert!(warnings[0].contains("3 of 4 target nodes"), "{warnings:?}");
    assert!(w.journal.with_prefix("cloud:deregister").is_empty());
    // A node that is really gone still goes.
    w.remove_node("n3");
    run(&w, &svc).await.unwrap();
    assert_eq!(w.cloud.targets_of("shop/web"), ["i-0", "i-1", "i-2"]);
}
