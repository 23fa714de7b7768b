//! One controller's run: its own VPC, subnet, cluster name, private kube-apiserver (three Ready
//! nodes) and counting proxy; then the phases — sequential creates, a burst of creates, steady
//! state, a node joining, the node leaving, everything deleted — each bounded by the budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::Rig;
use crate::support::apiserver::{PrivateApiserver, ready_node};
use crate::support::cloud::TestCloud;
use crate::support::faultproxy::{FaultPlan, FaultProxy, Faults};

use super::controllers::{Controller, Kind, START_TIMEOUT, Settings};
use super::report::Figures;
use super::{Budget, aws, calls, calls_of, percentile, quiet, vm_hwm_kib, wait_until};

/// The shape of a run (the same for both controllers).
#[derive(Clone, Debug)]
pub struct Config {
    pub n: usize,
    /// Created one at a time, each waited for: the create → hostname latencies.
    pub first: usize,
    pub steady: Duration,
    /// Creates and deletes in flight during the bursts.
    pub in_flight: usize,
    /// No AWS call for this long = the controller finished reacting.
    pub quiet: Duration,
}

/// What the phases share.
struct Subject<'a> {
    who: &'static str,
    cloud: &'a TestCloud,
    client: kube::Client,
    api: Api<Service>,
    class: String,
    proxy: &'a FaultProxy,
    /// When each Service was first seen with a hostname in its status.
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    budget: Budget,
    cfg: &'a Config,
}

impl Subject<'_> {
    async fn quiet(&self) {
        quiet(self.who, self.proxy, self.cfg.quiet, self.budget.timeout()).await;
    }

    fn hostname_at(&self, name: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(name).copied()
    }
}

/// Runs every phase for `kind` and cleans its cloud and apiserver up; never panics on a slow
/// or failing controller (timeouts and failures become notes and missing figures).
pub async fn run(
    kind: Kind,
    rig: &'static Rig,
    cfg: &Config,
    settings: &Settings,
    budget: Budget,
) -> Figures {
    let mut f = Figures::default();
    let who = kind.name();
    let cloud = TestCloud::new(rig, &format!("{who}scale")).await;
    let apiserver = PrivateApiserver::start(rig).await;
    let client = apiserver.client().await;
    let mut instances = Vec::new();
    for k in 0..3 {
        let (name, ip) = (format!("node-{k}"), format!("10.213.253.{}", k + 1));
        instances.push(ready_node(&client, &cloud, &name, &ip).await);
    }
    let proxy = FaultProxy::start(&rig.aws_endpoint, 1, FaultPlan::uniform(Faults::none())).await;
    let endpoint = proxy.url();
    match Controller::start(
        kind,
        rig,
        &cloud,
        &apiserver.kubeconfig,
        &endpoint,
        settings,
    ) {
        Ok(mut controller) => {
            eprintln!(
                "bench: {who}: cluster {}, VPC {}, pid {}, log {}",
                cloud.cluster,
                cloud.vpc_id,
                controller.pid(),
                controller.log(&cloud.cluster).display()
            );
            let s = Subject {
                who,
                cloud: &cloud,
                api: Api::namespaced(client.clone(), "default"),
                client,
                class: Controller::class(kind, &cloud),
                proxy: &proxy,
                seen: Arc::default(),
                budget,
                cfg,
            };
            if let Some(joined) = measure(&s, &mut controller, &mut f).await {
                instances.push(joined);
            }
            if !controller.alive() {
                f.notes.push(format!(
                    "the controller exited during the run; see {}",
                    controller.log(&cloud.cluster).display()
                ));
            }
        }
        Err(e) => f.notes.push(format!("did not start: {e}")),
    }
    aws::cleanup(&cloud, &instances).await;
    drop(apiserver);
    f
}

/// The phases, in order; returns the joined node's instance (for cleanup).
async fn measure(s: &Subject<'_>, controller: &mut Controller, f: &mut Figures) -> Option<String> {
    let ready = wait_until(
        s.who,
        "the controller to serve",
        START_TIMEOUT,
        Duration::from_millis(100),
        || controller.ready(),
    )
    .await;
    if ready.is_none() {
        f.notes.push("never became ready".into());
        return None;
    }
    let watcher = watch_hostnames(s);
    let created = creates(s, f).await;
    steady(s, f).await;
    let joined = node_join(s, f, created.len()).await;
    node_leave(s, f, &joined, created.len()).await;
    delete_all(s, f, &created).await;
    f.set(
        "rss_mib",
        Some(vm_hwm_kib(controller.pid()) as f64 / 1024.0),
    );
    watcher.abort();
    Some(joined)
}

fn service(name: &str, class: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service")
}

/// Records when each Service is first seen with a hostname.
fn watch_hostnames(s: &Subject<'_>) -> tokio::task::JoinHandle<()> {
    let seen = s.seen.clone();
    let stream = watcher(s.api.clone(), watcher::Config::default()).applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let Ok(svc) = ev else { continue };
            let has_host = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .is_some_and(|i| i.iter().any(|i| i.hostname.is_some()));
            if has_host {
                seen.lock()
                    .unwrap()
                    .entry(svc.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    })
}

async fn create(s: &Subject<'_>, name: &str) -> bool {
    match s
        .api
        .create(&PostParams::default(), &service(name, &s.class))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("bench: {}: create {name}: {e}", s.who);
            false
        }
    }
}

/// `first` Services one at a time (create → hostname each), then the rest at once; AWS calls
/// per create counted until the controller is quiet. Returns the names created.
async fn creates(s: &Subject<'_>, f: &mut Figures) -> Vec<String> {
    let (n, first) = (s.cfg.n, s.cfg.first);
    let c0 = calls(s.proxy);
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i:04}")).collect();
    let mut created = Vec::new();
    let mut latencies = Vec::new();
    for name in &names[..first] {
        let t0 = Instant::now();
        let mut latency = f64::INFINITY;
        if create(s, name).await {
            created.push(name.clone());
            let timeout = s.budget.timeout().min(Duration::from_secs(60));
            let what = format!("{name}'s hostname");
            let every = Duration::from_millis(2);
            if wait_until(s.who, &what, timeout, every, || {
                s.hostname_at(name).is_some()
            })
            .await
            .is_some()
            {
                latency = s
                    .hostname_at(name)
                    .map_or(latency, |at| (at - t0).as_secs_f64());
            }
        }
        latencies.push(latency);
    }
    latencies.sort_by(f64::total_cmp);
    f.set("hostname_p50_s", percentile(&latencies, 50.0));
    f.set("hostname_p95_s", percentile(&latencies, 95.0));
    f.set("hostname_max_s", percentile(&latencies, 100.0));
    eprintln!(
        "bench: {}: {first} sequential creates: {latencies:.3?} s",
        s.who
    );

    let bulk_start = Instant::now();
    let bulk: Vec<String> = futures::stream::iter(&names[first..])
        .map(|name| async move { create(s, name).await.then(|| name.clone()) })
        .buffer_unordered(s.cfg.in_flight)
        .filter_map(std::future::ready)
        .collect()
        .await;
    created.extend(bulk.iter().cloned());
    if created.len() < n {
        f.notes
            .push(format!("{} of {n} creates failed", n - created.len()));
    }
    let what = format!("all {} hostnames", created.len());
    let every = Duration::from_millis(50);
    let all = wait_until(s.who, &what, s.budget.timeout(), every, || {
        created.iter().all(|name| s.hostname_at(name).is_some())
    })
    .await;
    if all.is_some() && !bulk.is_empty() {
        let last = bulk.iter().filter_map(|name| s.hostname_at(name)).max();
        f.set(
            "all_hostnames_s",
            last.map(|at| (at - bulk_start).as_secs_f64()),
        );
    } else if all.is_none() {
        let done = s.seen.lock().unwrap().len();
        f.notes.push(format!(
            "only {done} of {} Services got a hostname",
            created.len()
        ));
    }
    s.quiet().await;
    let per = (calls(s.proxy) - c0) as f64 / created.len().max(1) as f64;
    f.set("calls_per_create", Some(per));
    eprintln!(
        "bench: {}: creates done, {per:.1} AWS calls per create",
        s.who
    );
    created
}

/// AWS calls per minute while nothing changes.
async fn steady(s: &Subject<'_>, f: &mut Figures) {
    let window = s
        .cfg
        .steady
        .min(s.budget.deadline.saturating_duration_since(Instant::now()));
    if window < s.cfg.steady {
        f.notes.push(format!(
            "steady state measured for {window:?} only (run deadline)"
        ));
    }
    if window.is_zero() {
        return;
    }
    let c0 = calls(s.proxy);
    tokio::time::sleep(window).await;
    let per_minute = (calls(s.proxy) - c0) as f64 * 60.0 / window.as_secs_f64();
    f.set("steady_calls_per_min", Some(per_minute));
}

/// A node joins: time until every target group has it, AWS calls per Service.
async fn node_join(s: &Subject<'_>, f: &mut Figures, services: usize) -> String {
    let groups = aws::target_groups(s.cloud).await;
    if groups.len() != services {
        f.notes.push(format!(
            "{} target groups for {services} Services",
            groups.len()
        ));
    }
    let (r0, c0) = (calls_of(s.proxy, "RegisterTargets"), calls(s.proxy));
    let t0 = Instant::now();
    let joined = ready_node(&s.client, s.cloud, "node-joined", "10.213.253.9").await;
    let t = settle(s, f, &groups, &joined, true, r0, t0).await;
    f.set("node_join_s", t);
    s.quiet().await;
    let per = (calls(s.proxy) - c0) as f64 / services.max(1) as f64;
    f.set("node_join_calls_per_service", Some(per));
    eprintln!(
        "bench: {}: node join: {t:?} s, {per:.2} calls per Service",
        s.who
    );
    joined
}

/// The joined node leaves (its Node object is deleted): time until no target group has it.
async fn node_leave(s: &Subject<'_>, f: &mut Figures, instance: &str, services: usize) {
    let groups = aws::target_groups(s.cloud).await;
    let (d0, c0) = (calls_of(s.proxy, "DeregisterTargets"), calls(s.proxy));
    let t0 = Instant::now();
    let nodes: Api<Node> = Api::all(s.client.clone());
    if let Err(e) = nodes.delete("node-joined", &DeleteParams::default()).await {
        f.notes
            .push(format!("could not delete the joined node: {e}"));
        return;
    }
    let t = settle(s, f, &groups, instance, false, d0, t0).await;
    f.set("node_leave_s", t);
    s.quiet().await;
    let per = (calls(s.proxy) - c0) as f64 / services.max(1) as f64;
    f.set("node_leave_calls_per_service", Some(per));
    eprintln!(
        "bench: {}: node leave: {t:?} s, {per:.2} calls per Service",
        s.who
    );
}

/// Seconds from `t0` until every group agrees with "`instance` is a target" == `present`: the
/// moment the controller has made one Register/Deregister call per group (`r0` = that
/// operation's count at `t0`), when LocalStack then confirms every group; otherwise the moment
/// a later check confirms them (an upper bound). `None` when the budget runs out first.
async fn settle(
    s: &Subject<'_>,
    f: &mut Figures,
    groups: &[String],
    instance: &str,
    present: bool,
    r0: u64,
    t0: Instant,
) -> Option<f64> {
    let op = if present {
        "RegisterTargets"
    } else {
        "DeregisterTargets"
    };
    let want = groups.len() as u64;
    let what = format!("{op} calls for all {want} target groups");
    let every = Duration::from_millis(10);
    let counted = wait_until(s.who, &what, s.budget.timeout(), every, || {
        calls_of(s.proxy, op) - r0 >= want
    })
    .await;
    let at_count = t0.elapsed();
    let deadline = Instant::now() + s.budget.timeout();
    let mut first_check = true;
    loop {
        let wrong = aws::disagreeing(s.cloud, groups, instance, present).await;
        if wrong == 0 {
            let at = if first_check && counted.is_some() {
                at_count
            } else {
                t0.elapsed()
            };
            return Some(at.as_secs_f64());
        }
        eprintln!(
            "bench: {}: {wrong} target groups do not agree yet ({op})",
            s.who
        );
        first_check = false;
        if Instant::now() >= deadline {
            f.notes.push(format!(
                "{op}: {wrong} of {want} target groups still wrong at the timeout"
            ));
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Services of the class under test still in the apiserver (not the `kubernetes` one).
async fn services_left(api: &Api<Service>, class: &str) -> usize {
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|s| {
                    s.spec
                        .as_ref()
                        .and_then(|s| s.load_balancer_class.as_deref())
                        == Some(class)
                })
                .count()
        })
        .unwrap_or(usize::MAX)
}

/// Deletes every Service at once; time until all are gone (the controller removed its
/// finalizer after tearing the cloud side down), calls per delete, what is left in the VPC.
async fn delete_all(s: &Subject<'_>, f: &mut Figures, names: &[String]) {
    let c0 = calls(s.proxy);
    let t0 = Instant::now();
    futures::stream::iter(names)
        .map(|name| async move {
            if let Err(e) = s.api.delete(name, &DeleteParams::default()).await {
                eprintln!("bench: {}: delete {name}: {e}", s.who);
            }
        })
        .buffer_unordered(s.cfg.in_flight)
        .collect::<Vec<_>>()
        .await;
    let every = Duration::from_millis(250);
    let gone = super::wait_until_async(
        s.who,
        "every Service gone",
        s.budget.timeout(),
        every,
        async || services_left(&s.api, &s.class).await == 0,
    )
    .await;
    if gone.is_some() {
        f.set("delete_all_s", Some(t0.elapsed().as_secs_f64()));
    } else {
        let left = services_left(&s.api, &s.class).await;
        f.notes
            .push(format!("{left} Services still there at the delete timeout"));
    }
    s.quiet().await;
    let per = (calls(s.proxy) - c0) as f64 / names.len().max(1) as f64;
    f.set("delete_calls_per_service", Some(per));
    let left = aws::load_balancers(s.cloud).await.len() + aws::target_groups(s.cloud).await.len();
    f.set("leftovers", Some(left as f64));
    eprintln!(
        "bench: {}: delete all: {gone:?}, {per:.1} calls per delete, {left} left",
        s.who
    );
}
