//! Node changes cost one call per affected target group (issue 15), on the real rig: the
//! controller registers and deregisters from what it knows of its last sync, without reading
//! the stacks again; the drift check (here: a restarted controller's first full sync) reads
//! only and finds nothing to change.

use cloudlb_testkit as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud, is_write};
use support::{Rig, TestNamespace, TestNode, eventually};

const WAIT: Duration = Duration::from_secs(60);
const SERVICES: usize = 5;

fn one_port_service(name: &str, class: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap()
}

use support::service_hostname as hostname;

/// The ARNs of every target group tagged for the test cluster.
async fn target_groups(cloud: &TestCloud) -> Vec<String> {
    cloud
        .inventory()
        .await
        .into_iter()
        .filter(|(arn, _, _)| arn.contains(":targetgroup/"))
        .map(|(arn, _, _)| arn)
        .collect()
}

/// Waits until every target group holds exactly the instances `want`.
async fn every_group_holds(cloud: &TestCloud, groups: &[String], want: &BTreeSet<String>) {
    eventually(
        "every target group holds the expected instances",
        WAIT,
        || async {
            for tg in groups {
                let ids: BTreeSet<String> =
                    cloud.targets(tg).await.into_iter().map(|t| t.0).collect();
                if &ids != want {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// The controller's AWS call counts per operation once they stop moving (a late, wrong
/// Describe would show up within the settle time).
async fn settled_calls(controller: &ControllerProc) -> std::collections::BTreeMap<String, f64> {
    let settle = Duration::from_millis(1500);
    let deadline = Instant::now() + WAIT;
    let mut last = calls(controller);
    loop {
        tokio::time::sleep(settle).await;
        let now = calls(controller);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn calls(controller: &ControllerProc) -> std::collections::BTreeMap<String, f64> {
    let metrics = controller.metrics();
    let mut by_op = std::collections::BTreeMap::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("cloudlb_aws_api_calls_total{"))
    {
        let Some(op) = l
            .split("operation=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let v: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_op.entry(op.to_string()).or_insert(0.0) += v;
    }
    by_op
}

fn delta(
    after: &std::collections::BTreeMap<String, f64>,
    before: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(op, v)| (op.clone(), v - before.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Creates `web-0` … `web-{n-1}` one after the other, each once the previous one has its
/// hostname; returns each one's create → hostname time.
async fn create_services(api: &Api<Service>, class: &str, n: usize) -> Vec<Duration> {
    let mut took = Vec::new();
    for k in 0..n {
        let name = format!("web-{k}");
        let created = Instant::now();
        api.create(&PostParams::default(), &one_port_service(&name, class))
            .await
            .unwrap();
        eventually("hostname", WAIT, || hostname(api, &name)).await;
        took.push(created.elapsed());
    }
    took
}

/// Ready nodes at 10.213.251.`k` for each `k`, backed by new EC2 instances (returned too).
async fn test_nodes(
    rig: &'static Rig,
    cloud: &TestCloud,
    prefix: &str,
    hosts: impl Iterator<Item = u8>,
) -> (Vec<(TestNode, String)>, BTreeSet<String>) {
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let mut instances = BTreeSet::new();
    let mut nodes = Vec::new();
    for k in hosts {
        let i = cloud.instance(None).await;
        let ip = format!("10.213.251.{k}");
        let provider = TestCloud::provider_id(&i);
        nodes.push((
            TestNode::new(rig, prefix, &ip, Some(&provider), labels.clone()).await,
            ip,
        ));
        instances.insert(i);
    }
    (nodes, instances)
}

#[tokio::test]
async fn node_joins_and_leaves_cost_one_call_per_target_group() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "nodes").await;
    let cloud = TestCloud::new(rig, "nodes").await;
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let (nodes, mut instances) = test_nodes(rig, &cloud, "nodes", 1..=2).await;
    let mut nodes: Vec<TestNode> = nodes.into_iter().map(|(n, _)| n).collect();
    let args: [&str; 0] = [];
    let mut controller = ControllerProc::start(rig, &cloud, &args);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);

    let mut to_hostname = create_services(&api, &cloud.class, SERVICES).await;
    to_hostname.sort();
    eprintln!(
        "FIGURE service_to_hostname_p50_s {:.3} (max {:.3}, {SERVICES} sequential creates)",
        to_hostname[SERVICES / 2].as_secs_f64(),
        to_hostname[SERVICES - 1].as_secs_f64()
    );
    let groups = target_groups(&cloud).await;
    assert_eq!(groups.len(), SERVICES, "one target group per Service");
    every_group_holds(&cloud, &groups, &instances).await;

    // One node joins: one RegisterTargets per group, no read.
    let before = settled_calls(&controller).await;
    let joined_at = Instant::now();
    let i = cloud.instance(None).await;
    nodes.push(
        TestNode::new(
            rig,
            "nodes",
            "10.213.251.10",
            Some(&TestCloud::provider_id(&i)),
            labels.clone(),
        )
        .await,
    );
    instances.insert(i);
    every_group_holds(&cloud, &groups, &instances).await;
    let join_took = joined_at.elapsed();
    let join = delta(&settled_calls(&controller).await, &before);
    eprintln!("node join: {join:?}, every group has the node after {join_took:?}");
    assert_eq!(
        join,
        [("RegisterTargets".to_string(), SERVICES as f64)].into(),
        "exactly one RegisterTargets per target group and nothing else"
    );

    // That node leaves: one DeregisterTargets per group, no read.
    let before = settled_calls(&controller).await;
    let gone = nodes.pop().unwrap();
    let gone_instance = {
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(rig.client().await);
        let n = api.get(&gone.name).await.unwrap();
        n.spec
            .unwrap()
            .provider_id
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    };
    drop(gone);
    instances.remove(&gone_instance);
    every_group_holds(&cloud, &groups, &instances).await;
    let leave = delta(&settled_calls(&controller).await, &before);
    eprintln!("node leave: {leave:?}");
    assert_eq!(
        leave,
        [("DeregisterTargets".to_string(), SERVICES as f64)].into(),
        "exactly one DeregisterTargets per target group and nothing else"
    );

    // A burst: five nodes within 200 ms still cost one call per group.
    let mut burst_instances = Vec::new();
    for _ in 0..5 {
        burst_instances.push(cloud.instance(None).await);
    }
    let before = settled_calls(&controller).await;
    let client = rig.client().await;
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let burst_started = Instant::now();
    let mut names = Vec::new();
    for (k, i) in burst_instances.iter().enumerate() {
        let name = support::unique("burst");
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"providerID": TestCloud::provider_id(i)},
        }))
        .unwrap();
        node_api
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": format!("10.213.251.{}", 20 + k)}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Rig"}]
        }});
        node_api
            .patch_status(
                &name,
                &Default::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await
            .unwrap();
        names.push(name);
    }
    let burst_span = burst_started.elapsed();
    instances.extend(burst_instances.iter().cloned());
    every_group_holds(&cloud, &groups, &instances).await;
    let burst = delta(&settled_calls(&controller).await, &before);
    eprintln!("burst of 5 joins within {burst_span:?}: {burst:?}");
    if burst_span <= Duration::from_millis(200) {
        assert_eq!(
            burst,
            [("RegisterTargets".to_string(), SERVICES as f64)].into(),
            "a burst is one RegisterTargets per group"
        );
    } else {
        // The API server was too slow to make it a burst; still no reads.
        assert!(burst.keys().all(|op| op == "RegisterTargets"), "{burst:?}");
    }

    // The drift check: a restarted controller reads every stack in full and writes nothing.
    controller.kill();
    let controller = ControllerProc::start(rig, &cloud, &args);
    let reads = eventually("a full read of every stack", WAIT, || async {
        let c = calls(&controller);
        (c.get("DescribeTargetHealth").copied().unwrap_or(0.0) >= SERVICES as f64).then_some(c)
    })
    .await;
    let after = settled_calls(&controller).await;
    let writes: Vec<(&String, &f64)> = after.iter().filter(|(op, _)| is_write(op)).collect();
    eprintln!("drift check: {reads:?}");
    assert!(
        writes.is_empty(),
        "the drift check changes nothing: {writes:?}"
    );

    for n in names {
        let _ = rig.kubectl_output(&["delete", "node", &n, "--wait=false"]);
    }
    drop(nodes);
    let before = settled_calls(&controller).await;
    let deleting = Instant::now();
    for k in 0..SERVICES {
        let _ = api.delete(&format!("web-{k}"), &Default::default()).await;
    }
    eventually("Services gone (finalizers removed)", WAIT, || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let deleted_in = deleting.elapsed();
    let deletes = delta(&settled_calls(&controller).await, &before);
    eprintln!(
        "FIGURE delete_{SERVICES}_services_s {:.3} ({} calls: {deletes:?})",
        deleted_in.as_secs_f64(),
        deletes.values().sum::<f64>()
    );
    assert!(cloud.inventory().await.is_empty(), "nothing left behind");
}

#[tokio::test]
async fn a_cluster_wide_not_ready_blip_keeps_every_target() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "blip").await;
    let cloud = TestCloud::new(rig, "blip").await;
    let (nodes, instances) = test_nodes(rig, &cloud, "blip", 40..=42).await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    create_services(&api, &cloud.class, 2).await;
    let groups = target_groups(&cloud).await;
    every_group_holds(&cloud, &groups, &instances).await;

    // Every node NotReady at once (as when the apiserver stops hearing from all kubelets).
    let before = settled_calls(&controller).await;
    for (n, ip) in &nodes {
        n.set_ready(false, ip).await;
    }
    eventually(
        "a DeregistrationWithheld Warning on each Service",
        WAIT,
        || async {
            let all = (0..2).all(|k| {
                support::event_reasons(rig, &ns.name, &format!("web-{k}"), Some("Service"))
                    .iter()
                    .any(|r| r == "DeregistrationWithheld")
            });
            all.then_some(())
        },
    )
    .await;
    let after = settled_calls(&controller).await;
    let calls = delta(&after, &before);
    for tg in &groups {
        let ids: BTreeSet<String> = cloud.targets(tg).await.into_iter().map(|t| t.0).collect();
        assert_eq!(ids, instances, "every target stays registered");
    }
    assert!(
        !calls.contains_key("DeregisterTargets"),
        "no deregistration: {calls:?}"
    );
    let withheld = controller
        .metrics()
        .lines()
        .find(|l| l.starts_with("cloudlb_not_ready_targets_withheld_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    eprintln!("NotReady blip: 3 of 3 nodes NotReady, calls {calls:?}, withheld metric {withheld}");
    assert!(
        withheld >= 6.0,
        "3 nodes withheld for each of 2 Services: {withheld}"
    );

    // Back to Ready: nothing to change.
    for (n, ip) in &nodes {
        n.set_ready(true, ip).await;
    }
    for k in 0..2 {
        let _ = api.delete(&format!("web-{k}"), &Default::default()).await;
    }
    eventually("stacks deleted", WAIT, || async {
        cloud.inventory().await.is_empty().then_some(())
    })
    .await;
}
