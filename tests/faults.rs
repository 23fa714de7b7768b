//! The controller on its worst day (issue 6): AWS throttling and 5xx, SIGKILLs mid-reconcile,
//! apiserver restarts, force-deleted Services, two replicas racing for the lease. Every test
//! ends with an exact inventory of LocalStack: for every live Service exactly its NLB, one
//! listener and one target group per port with the right targets; after deletes nothing
//! tagged with the test's cluster.
//!
//! Tests run one at a time (they share LocalStack and two cores). Fault draws are seeded:
//! `CLOUDLB_FAULT_SEED` overrides the default seed. Figures go to stderr (`--nocapture`).

use cloudlb_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cloudlb::controller::service::name_from_hostname;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::apiserver::{PrivateApiserver, ready_node};
use support::cloud::{ControllerProc, TestCloud, is_write};
use support::faultproxy::{FaultCounts, FaultPlan, FaultProxy, Faults};
use support::{Rig, eventually, lb_service, unique};

/// One fault test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(240);

fn seed(test: u64) -> u64 {
    let base = std::env::var("CLOUDLB_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c10d);
    base ^ test.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// SplitMix64 for the tests' own random choices (kill points, which Service to change).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Service `i`'s initial ports: TCP 80, and every fifth also UDP 53.
fn initial_ports(i: usize) -> serde_json::Value {
    if i % 5 == 0 {
        json!([{"name": "http", "port": 80, "protocol": "TCP"},
               {"name": "dns", "port": 53, "protocol": "UDP"}])
    } else {
        json!([{"name": "http", "port": 80, "protocol": "TCP"}])
    }
}

/// A port change: a new listener port and a new nodePort (so a new target group).
fn changed_ports(round: usize) -> serde_json::Value {
    json!([{"name": "http", "port": 8080 + round as i32, "protocol": "TCP"}])
}

fn controller_flags() -> Vec<String> {
    [
        "--aws-qps",
        "0",
        "--resync-seconds",
        "10",
        "--concurrency",
        "8",
    ]
    .map(String::from)
    .to_vec()
}

/// One test's world: a private apiserver (so no other engineer's controller on the shared rig
/// touches these Services, and restarts disturb nobody), its own slice of LocalStack, nodes
/// backed by EC2 instances, and the fault proxy in front of LocalStack.
struct Bed {
    rig: &'static Rig,
    apiserver: PrivateApiserver,
    client: Client,
    cloud: TestCloud,
    instances: BTreeSet<String>,
    proxy: FaultProxy,
}

impl Bed {
    async fn new(prefix: &str, nodes: usize, seed: u64, faults: Faults) -> Bed {
        let rig = Rig::get();
        let cloud = TestCloud::new(rig, prefix).await;
        let apiserver = PrivateApiserver::start(rig).await;
        let client = apiserver.client().await;
        let proxy = FaultProxy::start(&rig.aws_endpoint, seed, FaultPlan::uniform(faults)).await;
        eprintln!("{prefix}: cluster {}, fault seed {seed:#x}", cloud.cluster);
        let mut bed = Bed {
            rig,
            apiserver,
            client,
            cloud,
            instances: BTreeSet::new(),
            proxy,
        };
        for k in 0..nodes {
            bed.add_node(&format!("node-{k}")).await;
        }
        bed
    }

    /// A Node (Ready, InternalIP, providerID) linked to a new EC2 instance.
    async fn add_node(&mut self, name: &str) {
        let ip = format!("10.213.252.{}", self.instances.len() + 1);
        let id = ready_node(&self.client, &self.cloud, name, &ip).await;
        self.instances.insert(id);
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// `cloudlb controller` on the private apiserver, calling AWS through the fault proxy.
    fn controller(&self, extra: &[&str]) -> ControllerProc {
        let mut flags = controller_flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let url = self.proxy.url();
        let kubeconfig = self.apiserver.kubeconfig.display().to_string();
        ControllerProc::start_with_env(
            self.rig,
            &self.cloud,
            &flags,
            &[("AWS_ENDPOINT_URL", &url), ("KUBECONFIG", &kubeconfig)],
        )
    }

    async fn converge(&self, what: &str) -> Inventory {
        converge(what, &self.cloud, &self.services(), &self.instances).await
    }

    async fn delete_all_and_check_empty(&self, what: &str) {
        delete_all_and_check_empty(what, &self.cloud, &self.services(), &self.instances).await
    }
}

async fn create_many(api: &Api<Service>, class: &str, names: &[(usize, String)]) {
    futures::stream::iter(names.iter().cloned())
        .map(|(i, name)| {
            let api = api.clone();
            let svc = lb_service(&name, class, initial_ports(i), json!({}));
            async move {
                api.create(&PostParams::default(), &svc)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
}

async fn change_ports(api: &Api<Service>, name: &str, round: usize) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": changed_ports(round)}})),
    )
    .await
    .unwrap_or_else(|e| panic!("patch {name}: {e}"));
}

async fn delete(api: &Api<Service>, name: &str) {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => panic!("delete {name}: {e}"),
    }
}

fn hostname_of(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .hostname
        .clone()
}

/// The Services of the test's class (not e.g. `default/kubernetes`).
async fn ours(api: &Api<Service>, cloud: &TestCloud) -> Result<Vec<Service>, kube::Error> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.load_balancer_class.as_deref())
                == Some(cloud.class.as_str())
        })
        .collect())
}

/// What an exact inventory found.
#[derive(Debug, Default)]
struct Inventory {
    services: usize,
    /// Load balancers, listeners, target groups and targets compared.
    resources: usize,
}

/// The exact inventory: every live Service has exactly its NLB (tags, DNS name in status), one
/// listener per port and one target group per listener (nodePort, protocol, tags, targets =
/// every node's instance); nothing else in the account carries the test cluster's tag.
async fn check_inventory(
    cloud: &TestCloud,
    api: &Api<Service>,
    instances: &BTreeSet<String>,
) -> Result<Inventory, String> {
    let services = ours(api, cloud)
        .await
        .map_err(|e| format!("list services: {e}"))?;
    let tagged = cloud.inventory().await;
    let by_arn: BTreeMap<&str, &BTreeMap<String, String>> =
        tagged.iter().map(|(a, _, t)| (a.as_str(), t)).collect();
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut inv = Inventory::default();
    for svc in &services {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        if svc.metadata.deletion_timestamp.is_some() {
            return Err(format!("{key} is still being deleted"));
        }
        let uid = svc.uid().unwrap_or_default();
        let owned = |t: &BTreeMap<String, String>| {
            t.get("cloudlb.io/service") == Some(&key)
                && t.get("cloudlb.io/service-uid") == Some(&uid)
        };
        let host = hostname_of(svc).ok_or_else(|| format!("{key} has no hostname"))?;
        let lb_name = name_from_hostname(&host).ok_or_else(|| format!("odd hostname {host}"))?;
        let lb = cloud
            .load_balancer(&lb_name)
            .await
            .ok_or_else(|| format!("{key}: NLB {lb_name} missing"))?;
        let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        if lb.dns_name() != Some(host.as_str()) {
            return Err(format!(
                "{key}: NLB DNS {:?} ≠ status {host}",
                lb.dns_name()
            ));
        }
        if !by_arn.get(lb_arn.as_str()).is_some_and(|t| owned(t)) {
            return Err(format!("{key}: NLB {lb_name} not tagged for it"));
        }
        expected.insert(lb_arn.clone());
        inv.resources += 1;

        let mut want: Vec<(i32, String, i32)> = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    p.port,
                    p.protocol.clone().unwrap_or_default(),
                    p.node_port.unwrap_or_default(),
                )
            })
            .collect();
        want.sort();
        let listeners = cloud
            .elb
            .describe_listeners()
            .load_balancer_arn(&lb_arn)
            .send()
            .await
            .map_err(|e| format!("{key}: listeners: {e}"))?;
        let mut got: Vec<(i32, String, String)> = listeners
            .listeners()
            .iter()
            .map(|l| {
                (
                    l.port().unwrap_or_default(),
                    l.protocol()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    l.default_actions()
                        .first()
                        .and_then(|a| a.target_group_arn())
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        got.sort();
        let got_ports: Vec<(i32, String)> = got.iter().map(|(p, pr, _)| (*p, pr.clone())).collect();
        let want_ports: Vec<(i32, String)> =
            want.iter().map(|(p, pr, _)| (*p, pr.clone())).collect();
        if got_ports != want_ports {
            return Err(format!(
                "{key}: listeners {got_ports:?}, want {want_ports:?}"
            ));
        }
        for ((_, proto, tg_arn), (_, _, node_port)) in got.iter().zip(&want) {
            inv.resources += 1; // the listener
            if !by_arn.get(tg_arn.as_str()).is_some_and(|t| owned(t)) {
                return Err(format!("{key}: target group {tg_arn} not tagged for it"));
            }
            let tg = cloud
                .elb
                .describe_target_groups()
                .target_group_arns(tg_arn)
                .send()
                .await
                .map_err(|e| format!("{key}: target group: {e}"))?;
            let tg = tg
                .target_groups()
                .first()
                .ok_or_else(|| format!("{key}: target group {tg_arn} missing"))?;
            if tg.port() != Some(*node_port) || tg.protocol().map(|p| p.as_str()) != Some(proto) {
                return Err(format!(
                    "{key}: target group {:?}/{:?}, want {node_port}/{proto}",
                    tg.port(),
                    tg.protocol()
                ));
            }
            let health = cloud
                .elb
                .describe_target_health()
                .target_group_arn(tg_arn)
                .send()
                .await
                .map_err(|e| format!("{key}: targets: {e}"))?;
            let targets: BTreeSet<(String, i32)> = health
                .target_health_descriptions()
                .iter()
                .filter_map(|d| d.target())
                .map(|t| {
                    (
                        t.id().unwrap_or_default().to_string(),
                        t.port().unwrap_or_default(),
                    )
                })
                .collect();
            let want_targets: BTreeSet<(String, i32)> =
                instances.iter().map(|i| (i.clone(), *node_port)).collect();
            if targets != want_targets {
                return Err(format!("{key}: targets {targets:?}, want {want_targets:?}"));
            }
            expected.insert(tg_arn.clone());
            inv.resources += 1 + targets.len();
        }
        inv.services += 1;
    }
    let actual: BTreeSet<String> = tagged.iter().map(|(a, _, _)| a.clone()).collect();
    let extra: Vec<&String> = actual.difference(&expected).collect();
    let missing: Vec<&String> = expected.difference(&actual).collect();
    if !extra.is_empty() || !missing.is_empty() {
        return Err(format!(
            "inventory differs: extra (leaked) {extra:?}, missing {missing:?}"
        ));
    }
    Ok(inv)
}

/// Polls [`check_inventory`] once a second until it holds; panics with the last mismatch.
async fn converge(
    what: &str,
    cloud: &TestCloud,
    api: &Api<Service>,
    instances: &BTreeSet<String>,
) -> Inventory {
    let start = Instant::now();
    loop {
        match check_inventory(cloud, api, instances).await {
            Ok(inv) => {
                eprintln!(
                    "{what}: converged in {:.1?}: {} services, {} resources checked, 0 leaks",
                    start.elapsed(),
                    inv.services,
                    inv.resources
                );
                return inv;
            }
            Err(e) if start.elapsed() > CONVERGE => {
                panic!("{what}: no convergence after {CONVERGE:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Deletes every Service in the namespace and waits for them and their cloud resources to go.
async fn delete_all_and_check_empty(
    what: &str,
    cloud: &TestCloud,
    api: &Api<Service>,
    instances: &BTreeSet<String>,
) {
    let names: Vec<String> = ours(api, cloud)
        .await
        .unwrap()
        .iter()
        .map(|s| s.name_any())
        .collect();
    for n in &names {
        delete(api, n).await;
    }
    let inv = converge(what, cloud, api, instances).await;
    assert_eq!(inv.services, 0);
    assert!(
        cloud.inventory().await.is_empty(),
        "{what}: something tagged with {} remains",
        cloud.cluster
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn aws_outcome(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("cloudlb_aws_api_calls_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_while_50_services_churn() {
    let _serial = SERIAL.lock().await;
    let faults = Faults {
        throttle: 0.30,
        server_error: 0.05,
        ..Faults::none()
    };
    let mut bed = Bed::new("fthr", 2, seed(1), faults).await;
    let controller = bed.controller(&[]);
    // A bystander: another cluster's controller (another class) on the same apiserver. It must
    // leave these Services alone — no finalizer or status fight, no AWS call.
    let other = TestCloud::new(bed.rig, "fthrx").await;
    let kubeconfig = bed.apiserver.kubeconfig.display().to_string();
    let bystander = ControllerProc::start_with_env(
        bed.rig,
        &other,
        &["--aws-qps", "0"],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let api = bed.services();

    let names: Vec<(usize, String)> = (0..50).map(|i| (i, format!("s{i:02}"))).collect();
    create_many(&api, &bed.cloud.class, &names).await;
    // Churn while the first creates are still in flight: port changes and deletes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, name) in &names {
        if i % 3 == 0 {
            change_ports(&api, name, 0).await;
        }
    }
    for (i, name) in &names {
        if i % 4 == 3 {
            delete(&api, name).await;
        }
    }
    // A node joins mid-run: every remaining Service gains a target.
    bed.add_node("node-joined").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, name) in &names {
        if i % 3 == 1 && i % 4 != 3 {
            change_ports(&api, name, 1).await;
        }
    }
    let inv = bed.converge("throttling: after churn").await;
    assert_eq!(inv.services, 50 - 12);
    bed.delete_all_and_check_empty("throttling: after deleting all")
        .await;

    let counts = bed.proxy.counts();
    let m = controller.metrics();
    eprintln!(
        "FIGURES throttling: proxy {counts}; controller counted {} throttled, {} 5xx; {} AWS writes; bystander made {} AWS calls",
        aws_outcome(&m, "throttled"),
        aws_outcome(&m, "server_error"),
        controller.aws_calls(is_write) as u64,
        bystander.aws_calls(|_| true) as u64
    );
    assert!(counts.throttled > 0 && counts.server_errors > 0);
    // Every injected fault reached the controller classified as what it was (and so retried).
    assert_eq!(aws_outcome(&m, "throttled"), counts.throttled);
    assert_eq!(aws_outcome(&m, "server_error"), counts.server_errors);
    assert_eq!(
        bystander.aws_calls(|_| true),
        0.0,
        "the bystander touched AWS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkilled_20_times_mid_run() {
    let _serial = SERIAL.lock().await;
    // Latency on every call widens the windows between a plan's steps (e.g. between
    // CreateTargetGroup and CreateListener), so kills land inside them. Lost responses make
    // creates that took effect look failed.
    let faults = Faults {
        throttle: 0.10,
        server_error: 0.02,
        lost_response: 0.02,
        latency_rate: 1.0,
        latency: (Duration::from_millis(5), Duration::from_millis(40)),
        ..Faults::none()
    };
    let bed = Bed::new("fkill", 2, seed(2), faults).await;
    // A kill between CreateTargetGroup and CreateListener, then a port change before the next
    // controller starts, leaves a target group no reconcile looks for: the orphan sweep's to
    // collect (after its grace period, counted from when this process first saw it).
    let sweep = [
        "--orphan-sweep",
        "--orphan-sweep-interval-seconds",
        "2",
        "--orphan-grace-seconds",
        "5",
    ];
    let api = bed.services();
    let mut rng = Rng(seed(2));
    let mut live: Vec<String> = Vec::new();
    let mut next = 0usize;
    let mut kills = 0;
    for round in 0..20 {
        let mut controller = bed.controller(&sweep);
        // This round's churn: three new Services, a port change, and now and then a delete.
        let new: Vec<(usize, String)> = (next..next + 3).map(|i| (i, format!("k{i:02}"))).collect();
        next += 3;
        create_many(&api, &bed.cloud.class, &new).await;
        live.extend(new.into_iter().map(|(_, n)| n));
        let pick = live[rng.below(live.len() as u64) as usize].clone();
        change_ports(&api, &pick, round).await;
        if round % 3 == 2 {
            let victim = live.remove(rng.below(live.len() as u64) as usize);
            delete(&api, &victim).await;
        }
        let wait = Duration::from_millis(300 + rng.below(2700));
        tokio::time::sleep(wait).await;
        controller.kill();
        kills += 1;
    }
    let controller = bed.controller(&sweep);
    let inv = bed.converge("kills: after 20 SIGKILLs").await;
    assert_eq!(inv.services, live.len());
    bed.delete_all_and_check_empty("kills: after deleting all")
        .await;
    eprintln!(
        "FIGURES kills: {kills} SIGKILLs, {next} services created, {} resources checked at the end, 0 leaks; {} crash leftovers collected by the orphan sweep; proxy {}",
        inv.resources,
        metric(&controller.metrics(), "cloudlb_orphans_deleted_total"),
        bed.proxy.counts()
    );
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deleted_service_is_collected_as_orphan_and_nothing_else_is() {
    let _serial = SERIAL.lock().await;
    let faults = Faults {
        throttle: 0.2,
        ..Faults::none()
    };
    let bed = Bed::new("forph", 2, seed(3), faults).await;
    let sweep = [
        "--orphan-sweep",
        "--orphan-sweep-interval-seconds",
        "1",
        "--orphan-grace-seconds",
        "4",
    ];
    let mut controller = bed.controller(&sweep);
    let api = bed.services();
    let names: Vec<(usize, String)> = (1..4).map(|i| (i, format!("o{i}"))).collect();
    create_many(&api, &bed.cloud.class, &names).await;
    bed.converge("orphans: created").await;
    let cloud = &bed.cloud;

    // Resources the sweep must never touch: another cluster's and untagged ones, even when
    // they name a Service of ours that is gone.
    let other_cluster = unique("other");
    let tag = |k: &str, v: &str| {
        aws_sdk_elasticloadbalancingv2::types::Tag::builder()
            .key(k)
            .value(v)
            .build()
    };
    let mut foreign = Vec::new();
    for (suffix, tagged) in [("f1", true), ("f2", false)] {
        let mut req = cloud
            .elb
            .create_target_group()
            .name(format!("{}-{suffix}", cloud.cluster))
            .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Tcp)
            .port(30001)
            .vpc_id(&cloud.vpc_id);
        if tagged {
            req = req
                .tags(tag("cloudlb.io/cluster", &other_cluster))
                .tags(tag("cloudlb.io/service", "default/o1"));
        }
        let out = req.send().await.unwrap();
        foreign.push(
            out.target_groups()[0]
                .target_group_arn()
                .unwrap()
                .to_string(),
        );
    }
    // What a crash can leave for a live Service: a target group for a port it no longer has
    // (tagged for o2, attached to nothing, not a name o2's reconcile looks for).
    let o2 = api.get("o2").await.unwrap();
    let stale = cloud
        .elb
        .create_target_group()
        .name(format!("{}-stale", cloud.cluster))
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Tcp)
        .port(30002)
        .vpc_id(&cloud.vpc_id)
        .tags(tag("cloudlb.io/cluster", &cloud.cluster))
        .tags(tag("cloudlb.io/load-balancer-class", &cloud.class))
        .tags(tag("cloudlb.io/service", "default/o2"))
        .tags(tag("cloudlb.io/service-uid", &o2.uid().unwrap()))
        .send()
        .await
        .unwrap();
    let stale = stale.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();

    // Force-delete o1 while no controller runs: its finalizer is stripped by hand.
    controller.kill();
    let o1_before: Vec<String> = cloud
        .inventory()
        .await
        .into_iter()
        .filter(|(_, _, t)| t["cloudlb.io/service"] == "default/o1")
        .map(|(a, _, _)| a)
        .collect();
    assert_eq!(o1_before.len(), 2, "o1 has an NLB and a target group");
    delete(&api, "o1").await;
    api.patch(
        "o1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("o1").await.unwrap().is_none());

    let controller = bed.controller(&sweep);
    let started = Instant::now();
    // The grace period holds: nothing goes in the first two seconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = cloud.inventory().await;
    if started.elapsed() < Duration::from_secs(4) {
        assert!(
            o1_before
                .iter()
                .chain([&stale])
                .all(|a| left.iter().any(|(b, _, _)| a == b)),
            "orphans deleted before the grace period"
        );
    }
    // Converged = o1's NLB, target group and security group and o2's stale group gone, the rest exact.
    let inv = bed
        .converge("orphans: o1 and the stale group collected")
        .await;
    assert_eq!(inv.services, 2);
    let m = controller.metrics();
    let deleted = metric(&m, "cloudlb_orphans_deleted_total");
    assert_eq!(
        deleted, 4.0,
        "o1's NLB, target group and managed security group, o2's stale group"
    );
    assert_eq!(
        cloud.security_groups().await.len(),
        inv.services,
        "one managed security group per live Service, o1's collected"
    );
    let log = std::fs::read_to_string(std::env::temp_dir().join(format!(
        "cloudlb-controller-{}-{}.log",
        cloud.cluster, controller.metrics_port
    )))
    .unwrap_or_default();
    assert!(
        log.contains("deleting orphaned resource"),
        "announced in the log"
    );

    // Foreign resources untouched.
    for arn in &foreign {
        let out = cloud
            .elb
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
            .expect("foreign target group survives");
        assert_eq!(out.target_groups().len(), 1);
    }
    bed.delete_all_and_check_empty("orphans: after deleting all")
        .await;
    for arn in &foreign {
        cloud
            .elb
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
            .unwrap();
    }
    eprintln!(
        "FIGURES orphans: {deleted} orphans collected (force-deleted Service's NLB + TG, a live Service's stale TG), 2 foreign resources untouched; proxy {}",
        bed.proxy.counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_no_duplicates_and_failover() {
    let _serial = SERIAL.lock().await;
    let faults = Faults {
        throttle: 0.1,
        ..Faults::none()
    };
    let bed = Bed::new("flead", 2, seed(4), faults).await;
    let lease = unique("lease");
    let flags = |id: &str| {
        vec![
            "--leader-elect".to_string(),
            "--lease-name".into(),
            lease.clone(),
            "--lease-namespace".into(),
            "default".into(),
            "--lease-duration-seconds".into(),
            "6".into(),
            "--identity".into(),
            id.into(),
        ]
    };
    let fa = flags("replica-a");
    let fb = flags("replica-b");
    let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
    let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
    // Both start at once and race for the lease.
    let mut a = bed.controller(&fa);
    let mut b = bed.controller(&fb);
    let api = bed.services();
    let names: Vec<(usize, String)> = (0..10).map(|i| (i, format!("l{i}"))).collect();
    create_many(&api, &bed.cloud.class, &names).await;
    bed.converge("leader: created").await;

    let leader_of = |c: &ControllerProc| metric(&c.metrics(), "cloudlb_leader ") as u64;
    let (la, lb) = (leader_of(&a), leader_of(&b));
    assert_eq!(la + lb, 1, "exactly one leader (a={la}, b={lb})");
    let (leader, standby) = if la == 1 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(
        standby.aws_calls(|_| true),
        0.0,
        "the standby never calls AWS"
    );

    // SIGKILL the leader: the standby takes over within the lease duration (plus a retry).
    leader.kill();
    let killed = Instant::now();
    let failover = loop {
        if leader_of(standby) == 1 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no failover within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The new leader converges changes made after the failover.
    let more: Vec<(usize, String)> = (10..13).map(|i| (i, format!("l{i}"))).collect();
    create_many(&api, &bed.cloud.class, &more).await;
    delete(&api, "l0").await;
    change_ports(&api, "l1", 0).await;
    let inv = bed.converge("leader: after failover").await;
    assert_eq!(inv.services, 12);
    bed.delete_all_and_check_empty("leader: after deleting all")
        .await;
    eprintln!(
        "FIGURES leader: one leader of two, failover after SIGKILL in {failover:.1?} (lease 6 s), no duplicate NLBs; proxy {}",
        bed.proxy.counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_hangs_stops_writing_before_its_lease_expires() {
    let _serial = SERIAL.lock().await;
    // Every AWS call takes 1.2–1.6 s, so deploys (which need no apiserver) are still under
    // way when the apiserver hangs and the renew deadline (4 s) passes.
    let faults = Faults {
        latency_rate: 1.0,
        latency: (Duration::from_millis(1200), Duration::from_millis(1600)),
        ..Faults::none()
    };
    let bed = Bed::new("fhang", 2, seed(6), faults).await;
    let lease = unique("lease");
    let lease_seconds = 6u64;
    let lease_flag = lease_seconds.to_string();
    let flags = [
        "--leader-elect",
        "--lease-name",
        &lease,
        "--lease-namespace",
        "default",
        "--lease-duration-seconds",
        &lease_flag,
        "--identity",
        "hung-leader",
    ];
    let mut leader = bed.controller(&flags);
    let api = bed.services();
    eventually("leadership", Duration::from_secs(30), || async {
        (metric(&leader.metrics(), "cloudlb_leader ") == 1.0).then_some(())
    })
    .await;
    let names: Vec<(usize, String)> = (0..20).map(|i| (i, format!("h{i}"))).collect();
    create_many(&api, &bed.cloud.class, &names).await;
    let writes = |c: &FaultCounts| -> u64 {
        c.by_operation
            .iter()
            .filter(|(op, _)| is_write(op))
            .map(|(_, n)| n)
            .sum()
    };
    // The deploys are under way when the apiserver freezes (renewals now hang).
    eventually("writes in flight", Duration::from_secs(60), || async {
        (writes(&bed.proxy.counts()) > 0).then_some(())
    })
    .await;
    bed.apiserver.pause();
    let paused = Instant::now();
    // Two thirds of the lease is the renew deadline; by the lease's end the leader must have
    // stepped down and stopped writing.
    tokio::time::sleep(Duration::from_secs(lease_seconds)).await;
    let at_expiry = writes(&bed.proxy.counts());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = writes(&bed.proxy.counts());
    let log = std::fs::read_to_string(std::env::temp_dir().join(format!(
        "cloudlb-controller-{}-{}.log",
        bed.cloud.cluster, leader.metrics_port
    )))
    .unwrap_or_default();
    bed.apiserver.resume();
    let stepped_down = log
        .lines()
        .position(|l| l.contains("stepping down"))
        .unwrap_or_else(|| {
            panic!(
                "the leader says why it stopped: {}",
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            )
        });
    // Changes the deploys in flight went on to, which the fence kept from AWS.
    let refused = log
        .lines()
        .skip(stepped_down)
        .filter(|l| l.contains("applying change="))
        .count();
    eprintln!(
        "FIGURES hung renewal: apiserver paused {:?}; AWS writes {at_expiry} at lease expiry, {later} three seconds later; {refused} changes refused after stepping down",
        paused.elapsed()
    );
    assert_eq!(
        at_expiry, later,
        "no AWS write after the lease expired (the leader stepped down at its renew deadline)"
    );
    assert!(
        refused > 0,
        "deploys were still under way when the renewal hung, so the fence had something to stop"
    );
    // A fresh replica finishes the job, without duplicates.
    bed.proxy.set_plan(FaultPlan::uniform(Faults::none()));
    leader.kill();
    let _next = bed.controller(&flags);
    bed.converge("hung renewal: after a new leader").await;
    bed.delete_all_and_check_empty("hung renewal: deleted")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restarts_watches_resume_no_missed_deletes() {
    let _serial = SERIAL.lock().await;
    let faults = Faults {
        throttle: 0.1,
        server_error: 0.02,
        ..Faults::none()
    };
    let mut bed = Bed::new("fapi", 2, seed(5), faults).await;
    let controller = bed.controller(&[]);
    let api = bed.services();
    let names: Vec<(usize, String)> = (0..10).map(|i| (i, format!("a{i}"))).collect();
    create_many(&api, &bed.cloud.class, &names).await;
    bed.converge("apiserver: created").await;

    // Restart 1: short. Right after it comes back, delete, create and change Services; the
    // controller's watches must resume and see every one of these.
    bed.apiserver.restart(Duration::from_secs(1)).await;
    bed.client = bed.apiserver.client().await;
    let api = bed.services();
    for n in ["a0", "a1", "a2"] {
        delete(&api, n).await;
    }
    create_many(
        &api,
        &bed.cloud.class,
        &[(10, "a10".into()), (11, "a11".into())],
    )
    .await;
    change_ports(&api, "a3", 0).await;
    let inv = bed.converge("apiserver: after restart 1").await;
    assert_eq!(inv.services, 9);

    // Restart 2: down long enough that the watches back off; changes right after.
    bed.apiserver.restart(Duration::from_secs(6)).await;
    bed.client = bed.apiserver.client().await;
    let api = bed.services();
    for n in ["a4", "a5"] {
        delete(&api, n).await;
    }
    change_ports(&api, "a6", 1).await;
    let inv = bed.converge("apiserver: after restart 2").await;
    assert_eq!(inv.services, 7);
    bed.delete_all_and_check_empty("apiserver: after deleting all")
        .await;
    eprintln!(
        "FIGURES apiserver: {} restarts of a private apiserver, no missed deletes; proxy {}",
        bed.apiserver.restarts,
        bed.proxy.counts()
    );
    drop(controller);
}
