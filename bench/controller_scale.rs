//! Scale benchmark driver (run by `bench/controller-scale`; prints figures, asserts nothing
//! about time). N Services on the rig's LocalStack and a private apiserver (rig binaries and
//! PKI; private so no other engineer's controller on the shared apiserver sees these Services):
//! time until all have hostnames, AWS calls, steady-state calls per minute, peak RSS, the same
//! after a node joins, and create → hostname latency of the first 20 Services.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::Rig;
use support::apiserver::{PrivateApiserver, ready_node};
use support::cloud::{ControllerProc, TestCloud, aws_calls};

fn env_or<T: std::str::FromStr>(k: &str, default: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn service(name: &str, class: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service")
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env_or("N", 1000);
    let steady = Duration::from_secs(env_or("STEADY_SECONDS", 60));
    let timeout = Duration::from_secs(env_or("TIMEOUT_SECONDS", 3600));
    let flags_s = std::env::var("CLOUDLB_BENCH_FLAGS").unwrap_or_else(|_| "--aws-qps 0".into());
    let flags: Vec<&str> = flags_s.split_whitespace().collect();
    let first = n.min(20);

    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "scale").await;
    let apiserver = PrivateApiserver::start(rig).await;
    let client = apiserver.client().await;
    let mut instances = Vec::new();
    for k in 0..3 {
        instances.push(
            ready_node(
                &client,
                &cloud,
                &format!("node-{k}"),
                &format!("10.213.253.{}", k + 1),
            )
            .await,
        );
    }
    let kubeconfig = apiserver.kubeconfig.display().to_string();
    let controller =
        ControllerProc::start_with_env(rig, &cloud, &flags, &[("KUBECONFIG", &kubeconfig)]);
    let pid = controller.proc.0.id();
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    eprintln!(
        "bench: N={n}, cluster {}, controller pid {pid}, flags {flags_s:?}",
        cloud.cluster
    );

    // First time each Service is seen with a hostname in status.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let seen = seen.clone();
        let stream = watcher(api.clone(), watcher::Config::default()).applied_objects();
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
        });
    }
    let metrics = || controller.metrics();
    wait_for("controller metrics", Duration::from_secs(60), || {
        !metrics().is_empty()
    })
    .await;

    // The first Services one at a time: create → hostname latency.
    let mut latencies = Vec::new();
    let all_start = Instant::now();
    for i in 0..first {
        let name = format!("svc-{i:04}");
        let t0 = Instant::now();
        api.create(&PostParams::default(), &service(&name, &cloud.class))
            .await
            .expect("create");
        wait_for(&format!("{name} hostname"), timeout, || {
            seen.lock().unwrap().contains_key(&name)
        })
        .await;
        let at = seen.lock().unwrap()[&name];
        latencies.push(at.duration_since(t0));
    }
    latencies.sort();

    // The rest at once.
    let bulk_start = Instant::now();
    futures::stream::iter(first..n)
        .map(|i| {
            let api = api.clone();
            let svc = service(&format!("svc-{i:04}"), &cloud.class);
            async move {
                api.create(&PostParams::default(), &svc)
                    .await
                    .expect("create");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let created_in = bulk_start.elapsed();
    wait_for("all hostnames", timeout, || seen.lock().unwrap().len() >= n).await;
    let all_hostnames = all_start.elapsed();
    let bulk_hostnames = bulk_start.elapsed();
    let calls_create = aws_calls(&metrics(), |_| true);
    let rss_create = vm_hwm_kib(pid);

    // Steady state: nothing changes.
    let c0 = aws_calls(&metrics(), |_| true);
    tokio::time::sleep(steady).await;
    let steady_calls = aws_calls(&metrics(), |_| true) - c0;
    let per_minute = steady_calls * 60.0 / steady.as_secs_f64();

    // A node joins: every Service's target group gains a target.
    let registered = |m: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("cloudlb_aws_api_calls_total{")
                    && l.contains("operation=\"RegisterTargets\"")
                    && l.contains("outcome=\"ok\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (r0, j0) = (registered(&metrics()), aws_calls(&metrics(), |_| true));
    let join_start = Instant::now();
    let joined = ready_node(&client, &cloud, "node-joined", "10.213.253.9").await;
    wait_for("the new node in every target group", timeout, || {
        registered(&metrics()) - r0 >= n as f64
    })
    .await;
    let join_time = join_start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await; // let stragglers land in the count
    let join_calls = aws_calls(&metrics(), |_| true) - j0;
    let rss_join = vm_hwm_kib(pid);
    // Spot check on the cloud: the new instance is a target of sampled target groups.
    let tagged = cloud.inventory().await;
    let tgs: Vec<&String> = tagged
        .iter()
        .filter(|(a, _, _)| a.contains(":targetgroup/"))
        .map(|(a, _, _)| a)
        .collect();
    let step = (tgs.len() / 20).max(1);
    let mut sampled = 0;
    for tg in tgs.iter().step_by(step) {
        let t = cloud.targets(tg).await;
        assert!(
            t.iter().any(|(id, _)| *id == joined),
            "{tg} lacks the new node"
        );
        sampled += 1;
    }

    // Delete everything; the controller tears the cloud down.
    let del_start = Instant::now();
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.load_balancer_class.as_deref())
                == Some(cloud.class.as_str())
        })
        .map(|s| s.name_any())
        .collect();
    futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut left = usize::MAX;
    while left > 0 && del_start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(500)).await;
        left = api
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|s| {
                        s.spec
                            .as_ref()
                            .and_then(|s| s.load_balancer_class.as_deref())
                            == Some(cloud.class.as_str())
                    })
                    .count()
            })
            .unwrap_or(usize::MAX);
    }
    let delete_time = del_start.elapsed();
    let leftovers = cloud.inventory().await;
    drop(controller);
    // Whatever the controller did not remove (it should be nothing), and the test network.
    for (arn, _, _) in leftovers
        .iter()
        .filter(|(a, _, _)| !a.contains(":targetgroup/"))
    {
        let _ = cloud
            .elb
            .delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await;
    }
    for (arn, _, _) in leftovers
        .iter()
        .filter(|(a, _, _)| a.contains(":targetgroup/"))
    {
        let _ = cloud
            .elb
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await;
    }
    instances.push(joined);
    let _ = cloud
        .ec2
        .terminate_instances()
        .set_instance_ids(Some(instances.clone()))
        .send()
        .await;
    let _ = cloud
        .ec2
        .delete_subnet()
        .subnet_id(&cloud.subnet_id)
        .send()
        .await;
    let _ = cloud.ec2.delete_vpc().vpc_id(&cloud.vpc_id).send().await;
    drop(apiserver);

    let per = |c: f64| c / n as f64;
    println!();
    println!(
        "cloudlb controller scale — N={n} Services (1 TCP port each), 3 nodes; LocalStack {}, private kube-apiserver; controller flags: {flags_s}",
        rig.aws_endpoint
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| create → hostname, first {first} (one at a time) | p50 {}, p95 {} (min {}, max {}) |",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(latencies.first().copied().unwrap_or_default()),
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!(
        "| all {n} Services have hostnames | {} after the first create; the last {} created in {} and done {} after their first create ({:.1} Services/s) |",
        secs(all_hostnames),
        n - first,
        secs(created_in),
        secs(bulk_hostnames),
        (n - first) as f64 / bulk_hostnames.as_secs_f64().max(0.001)
    );
    println!(
        "| AWS calls to get there | {calls_create:.0} ({:.1} per Service) |",
        per(calls_create)
    );
    println!(
        "| steady state, nothing changing ({} s) | {per_minute:.1} calls/min ({steady_calls:.0} calls) |",
        steady.as_secs()
    );
    println!(
        "| controller peak RSS (VmHWM) after create | {:.1} MiB |",
        rss_create as f64 / 1024.0
    );
    println!(
        "| a node joins → in all {n} target groups | {} ({sampled} target groups spot-checked on LocalStack) |",
        secs(join_time)
    );
    println!(
        "| AWS calls for the node join | {join_calls:.0} ({:.1} per Service) |",
        per(join_calls)
    );
    println!(
        "| controller peak RSS (VmHWM) after the join | {:.1} MiB |",
        rss_join as f64 / 1024.0
    );
    println!(
        "| delete all → Services gone | {} ({} cloud resources left tagged with the cluster) |",
        secs(delete_time),
        leftovers.len()
    );
}
