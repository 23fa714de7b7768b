//! Pod readiness gates on the rig (issue 17): real pods on the kubelet node behind an ip-target
//! Service, the controller as a host process whose AWS endpoint answers DescribeTargetHealth
//! from the NLB emulator (tests/support/health_endpoint.rs), traffic through the hostname.

use cloudlb_testkit as support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::backends::{LoadReport, Outcome};
use support::cloud::{ControllerProc, TestCloud};
use support::emulator::{Emulator, EmulatorConfig, Health};
use support::health_endpoint::HealthEndpoint;
use support::{NetNs, Rig, TestNamespace, eventually, service_hostname, text, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCALE: f64 = 0.05;
/// The Service's health-check interval (s); the emulator and the controller run it scaled.
const INTERVAL_S: f64 = 10.0;
const GATE: &str = "target-health.cloudlb.io/web";

fn apply(rig: &Rig, ns: &str, obj: &Value) {
    let file = std::env::temp_dir().join(format!("{}.json", unique("obj")));
    std::fs::write(&file, obj.to_string()).expect("write manifest");
    let out = rig.kubectl_output(&["apply", "-n", ns, "-f", file.to_str().expect("utf8")]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "kubectl apply: {}", text(&out));
}

fn deployment(gated: bool) -> Value {
    deployment_with(if gated { &[GATE] } else { &[] }, 2)
}

fn deployment_with(gates: &[&str], replicas: u32) -> Value {
    let gates: Vec<Value> = gates.iter().map(|g| json!({"conditionType": g})).collect();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
          "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
          "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
            "automountServiceAccountToken": false,
            "readinessGates": gates,
            "terminationGracePeriodSeconds": 10,
            "containers": [{"name": "web", "image": "localhost/rig/hello:1", "imagePullPolicy": "Never",
              "ports": [{"containerPort": 8080}],
              // preStop: the NLB stops sending (deregistration seen by the emulator's poll)
              // before the pod stops serving; see the README's "Pod removal waits for the NLB".
              "lifecycle": {"preStop": {"sleep": {"seconds": 2}}},
              "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]}}}
    })
}

fn service(class: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "annotations": {
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": format!("{}", INTERVAL_S as i32),
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "2",
            "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes":
                "deregistration_delay.timeout_seconds=20"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": "web"},
          "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

/// One HTTP request on a new connection.
async fn http_request(addr: SocketAddr) -> Outcome {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), go).await {
        Ok(Ok(body)) => match body.lines().last() {
            Some(l) if body.starts_with("HTTP/1.") && l.starts_with("hello from ") => {
                Outcome::Answered(l.split(' ').nth(2).unwrap_or("?").to_string())
            }
            _ => Outcome::Failed(format!("bad answer {body:?}")),
        },
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused => {
                Outcome::Reset
            }
            _ => Outcome::Failed(e.to_string()),
        },
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

/// A request every 10 ms until `stop`, at most 6000 (bounded in count and time).
fn traffic(
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let mut r = LoadReport::default();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..6000 {
            tick.tick().await;
            if stop.is_cancelled() {
                break;
            }
            let t0 = Instant::now();
            let o = http_request(addr).await;
            r.record(o, t0.elapsed());
        }
        r
    })
}

/// Per pod: first seen, gate first seen False with reason `initial`, gate first seen True.
#[derive(Clone, Debug, Default)]
struct PodTimes {
    ip: Option<String>,
    created: Option<Instant>,
    gate_initial: Option<Instant>,
    gate_true: Option<Instant>,
    /// Every (status, reason) of the gate seen, in order.
    gate_seen: Vec<(String, String)>,
    /// First seen with a deletionTimestamp; first seen gone.
    terminating: Option<Instant>,
    gone: Option<Instant>,
}

/// Watches the namespace's pods every 50 ms (bounded by `stop`).
fn pod_times(
    pods: Api<Pod>,
    stop: tokio_util::sync::CancellationToken,
) -> (
    Arc<Mutex<BTreeMap<String, PodTimes>>>,
    tokio::task::JoinHandle<()>,
) {
    let times: Arc<Mutex<BTreeMap<String, PodTimes>>> = Arc::default();
    let t = times.clone();
    let task = tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                let now = Instant::now();
                let mut m = t.lock().unwrap();
                let listed: std::collections::BTreeSet<String> = list
                    .items
                    .iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                for (name, e) in m.iter_mut() {
                    if !listed.contains(name) {
                        e.gone.get_or_insert(now);
                    }
                }
                for p in list.items {
                    let e = m
                        .entry(p.metadata.name.clone().unwrap_or_default())
                        .or_default();
                    e.created.get_or_insert(now);
                    if p.metadata.deletion_timestamp.is_some() {
                        e.terminating.get_or_insert(now);
                    }
                    let status = p.status.unwrap_or_default();
                    if e.ip.is_none() {
                        e.ip = status.pod_ip.clone();
                    }
                    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == GATE) {
                        let seen = (c.status.clone(), c.reason.clone().unwrap_or_default());
                        if e.gate_seen.last() != Some(&seen) {
                            e.gate_seen.push(seen.clone());
                        }
                        if seen == ("False".into(), "initial".into()) {
                            e.gate_initial.get_or_insert(now);
                        }
                        if seen.0 == "True" {
                            e.gate_true.get_or_insert(now);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (times, task)
}

/// `kubectl rollout restart`'s change: a new pod-template annotation; waits for the rollout.
fn rollout_restart(rig: &Rig, ns: &str) -> Duration {
    let t0 = Instant::now();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": unique("restart")}}}}});
    rig.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        ns,
        "-p",
        &patch.to_string(),
    ]);
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        ns,
        "--timeout=180s",
    ]);
    assert!(out.status.success(), "rollout: {}", text(&out));
    t0.elapsed()
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_gate_follows_target_health_and_a_gated_rollout_drops_nothing() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "rg").await;
    let lbs = NetNs::new("rg-lbs");
    let (emu, _endpoint, controller) = harness(rig, &cloud, &lbs).await;
    let ns = TestNamespace::new(rig, "rg").await;
    let client = rig.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let services = Api::namespaced(client.clone(), &ns.name);
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let (times, watch) = pod_times(pods.clone(), stop_watch.clone());

    apply(rig, &ns.name, &service(&cloud.class));
    apply(rig, &ns.name, &deployment(true));
    let hostname = eventually(
        "the Service's hostname",
        Duration::from_secs(60),
        || async { service_hostname(&services, "web").await },
    )
    .await;
    let ip = emu.resolve(&hostname, Duration::from_secs(20)).await;
    let lb = SocketAddr::new(IpAddr::V4(ip), 80);
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &ns.name,
        "--timeout=120s",
    ]);
    assert!(
        out.status.success(),
        "gated pods never Ready: {}",
        text(&out)
    );

    // Steady: no DescribeTargetHealth from the controller for a while.
    let polls = || controller.metric("cloudlb_target_health_polls_total");
    tokio::time::sleep(Duration::from_secs_f64(INTERVAL_S * SCALE * 4.0)).await; // settle
    let before = polls();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let steady = polls() - before;
    println!("FIGURE steady_describe_target_health_calls_per_6s {steady}");
    assert_eq!(
        steady, 0.0,
        "no polls while every target is healthy and every gate True"
    );

    // The gated rollout under traffic.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = traffic(lb, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = polls();
    let took = rollout_restart(rig, &ns.name);
    tokio::time::sleep(Duration::from_secs(2)).await; // old pods' drain ends
    stop.cancel();
    let gated = load.await.unwrap();
    let rollout_polls = polls() - before;
    println!("{}", gated.summary("rollout with the gate"));
    println!(
        "FIGURE gated_rollout sent {} failed {} reset {} in {took:?}; DescribeTargetHealth calls {rollout_polls} ({:.2}/s)",
        gated.sent,
        gated.failed,
        gated.resets,
        rollout_polls / took.as_secs_f64()
    );
    assert!(gated.sent > 100, "traffic ran: {gated:?}");
    assert_eq!((gated.failed, gated.resets), (0, 0), "{:?}", gated.failures);
    assert!(rollout_polls > 0.0 && rollout_polls / took.as_secs_f64() <= 5.0 + 1.0);

    // The gate: False (`initial`) while the target is initial, True within one scaled interval
    // after it passed; never True before the emulator saw it healthy.
    let transitions = emu.transitions();
    let interval = Duration::from_secs_f64(INTERVAL_S * SCALE);
    let mut to_healthy = Vec::new();
    let mut to_gate = Vec::new();
    for (name, t) in times.lock().unwrap().iter() {
        let (Some(ip), Some(created), Some(gate_true)) = (&t.ip, t.created, t.gate_true) else {
            continue;
        };
        let healthy = transitions
            .iter()
            .find(|tr| tr.target.ip().to_string() == *ip && tr.to == Health::Healthy)
            .map(|tr| tr.at);
        let Some(healthy) = healthy else { continue };
        if t.gate_initial.is_none() {
            continue; // already running when the watch started
        }
        println!("pod {name}: gate {:?}", t.gate_seen);
        assert!(
            gate_true >= healthy,
            "{name}: gate True before the target was healthy"
        );
        let reaction = gate_true - healthy;
        assert!(
            reaction <= interval + Duration::from_millis(400),
            "{name}: gate True {reaction:?} after healthy (interval {interval:?})"
        );
        to_healthy.push(healthy.saturating_duration_since(created));
        to_gate.push(reaction);
    }
    assert!(
        to_healthy.len() >= 2,
        "new pods seen through their gate: {:?}",
        times.lock().unwrap()
    );
    println!(
        "FIGURE pod_created_to_target_healthy p50 {:?} p95 {:?}; target_healthy_to_gate_true p50 {:?} p95 {:?} (n={})",
        percentile(&mut to_healthy.clone(), 0.5),
        percentile(&mut to_healthy, 0.95),
        percentile(&mut to_gate.clone(), 0.5),
        percentile(&mut to_gate, 0.95),
        to_gate.len()
    );

    // Pod removal waits for the NLB: an old pod's target is deregistered (draining in the
    // emulator) as soon as the pod is terminating, while it still exists (its preStop runs).
    let mut removals = Vec::new();
    for (name, t) in times.lock().unwrap().iter() {
        let (Some(ip), Some(terminating)) = (&t.ip, t.terminating) else {
            continue;
        };
        let gone = t.gone.unwrap_or_else(Instant::now); // still there: its preStop runs
        let draining = transitions
            .iter()
            .find(|tr| tr.target.ip().to_string() == *ip && tr.to == Health::Draining)
            .map(|tr| tr.at)
            .unwrap_or_else(|| panic!("{name}: its target never drained"));
        assert!(draining < gone, "{name}: deregistered only when gone");
        removals.push(draining.saturating_duration_since(terminating));
    }
    assert!(
        removals.len() >= 2,
        "old pods seen terminating: {removals:?}"
    );
    println!(
        "FIGURE pod_terminating_to_target_draining max {:?} (n={})",
        removals.iter().max().unwrap(),
        removals.len()
    );

    // A target turning unhealthy (its check moved to a port nothing serves) sets the gate False.
    let mut svc = service(&cloud.class);
    svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"] =
        json!("9");
    apply(rig, &ns.name, &svc);
    eventually(
        "a gate False with reason unhealthy",
        Duration::from_secs(30),
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|p| {
                    p.status
                        .iter()
                        .flat_map(|s| s.conditions.iter().flatten())
                        .any(|c| {
                            c.type_ == GATE
                                && c.status == "False"
                                && c.reason.as_deref() == Some("unhealthy")
                        })
                })
                .then_some(())
        },
    )
    .await;
    apply(rig, &ns.name, &service(&cloud.class));
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("every gate True again", Duration::from_secs(30), || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .all(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten())
                    .any(|c| c.type_ == GATE && c.status == "True")
            })
            .then_some(())
    })
    .await;

    // The contrast: the same rollout without the gate.
    apply(rig, &ns.name, &deployment(false));
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &ns.name,
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = traffic(lb, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = rollout_restart(rig, &ns.name);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let ungated = load.await.unwrap();
    println!("{}", ungated.summary("rollout without the gate"));
    println!(
        "FIGURE ungated_rollout sent {} failed {} reset {} in {took:?} (contrast; not asserted)",
        ungated.sent, ungated.failed, ungated.resets
    );
    stop_watch.cancel();
    let _ = watch.await;
    let _ = rig.kubectl_output(&[
        "delete",
        "svc",
        "web",
        "-n",
        &ns.name,
        "--wait=true",
        "--timeout=60s",
    ]);
    drop(controller);
}

/// The emulator (serving `cloud`'s load balancers in `lbs`, pods reachable), the AWS endpoint
/// with its target health, and the controller using it.
async fn harness(
    rig: &Rig,
    cloud: &TestCloud,
    lbs: &NetNs,
) -> (Emulator, HealthEndpoint, ControllerProc) {
    let route = std::process::Command::new("ip")
        .args([
            "-n",
            &format!("clb-{}", lbs.name),
            "route",
            "replace",
            "10.213.240.0/24",
            "via",
        ])
        .arg(rig.env("CLOUDLB_RIG_NODE_IP"))
        .output()
        .expect("ip route");
    assert!(route.status.success(), "route to pods: {}", text(&route));
    let mut config = EmulatorConfig::new(&lbs.name);
    config.cluster = Some(cloud.cluster.clone());
    config.time_scale = SCALE;
    config.poll_interval = Duration::from_millis(200);
    config.registration_delay = Duration::from_millis(1000);
    let emu = Emulator::start(&rig.aws().await, config).await;
    let endpoint = HealthEndpoint::start("127.0.0.1:0", &rig.aws_endpoint, emu.health_view()).await;
    let scale = SCALE.to_string();
    let controller = ControllerProc::start_with_env(
        rig,
        cloud,
        &["--target-health-interval-scale", &scale],
        &[("AWS_ENDPOINT_URL", &endpoint.url())],
    );
    (emu, endpoint, controller)
}

/// Users moving from LBC: a pod carrying LBC's gate `target-health.elbv2.k8s.aws/<binding>` for
/// an ip TargetGroupBinding gets Ready once its target is healthy in the bound group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lbc_gate_of_an_ip_binding_turns_true_once_the_target_is_healthy() {
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
        TargetTypeEnum,
    };
    let rig = Rig::get();
    rig.install_crds();
    let cloud = TestCloud::new(rig, "rgb").await;
    let lbs = NetNs::new("rgb-lbs");
    let (emu, _endpoint, controller) = harness(rig, &cloud, &lbs).await;
    let tag = Tag::builder()
        .key("cloudlb.io/cluster")
        .value(&cloud.cluster)
        .build();
    let tg = cloud
        .elb
        .create_target_group()
        .name(unique("rgb"))
        .protocol(ProtocolEnum::Tcp)
        .port(8080)
        .vpc_id(&cloud.vpc_id)
        .target_type(TargetTypeEnum::Ip)
        .health_check_interval_seconds(10)
        .tags(tag.clone())
        .send()
        .await
        .expect("target group");
    let tg = tg.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    let lb = cloud
        .elb
        .create_load_balancer()
        .name(unique("rgb"))
        .r#type(LoadBalancerTypeEnum::Network)
        .scheme(LoadBalancerSchemeEnum::Internal)
        .subnets(&cloud.subnet_id)
        .tags(tag)
        .send()
        .await
        .expect("load balancer");
    let lb_arn = lb.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    cloud
        .elb
        .create_listener()
        .load_balancer_arn(&lb_arn)
        .port(80)
        .protocol(ProtocolEnum::Tcp)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&tg)
                .build(),
        )
        .send()
        .await
        .expect("listener");

    let ns = TestNamespace::new(rig, "rgb").await;
    apply(
        rig,
        &ns.name,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
    );
    apply(
        rig,
        &ns.name,
        &json!({"apiVersion": "cloudlb.io/v1beta1", "kind": "TargetGroupBinding",
        "metadata": {"name": "web-tgb", "labels": {"cloudlb.io/test-cluster": cloud.cluster}},
        "spec": {"targetGroupARN": tg, "targetType": "ip", "serviceRef": {"name": "web", "port": 80}}}),
    );
    let lbc_gate = "target-health.elbv2.k8s.aws/web-tgb";
    apply(rig, &ns.name, &deployment_with(&[lbc_gate], 1));
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &ns.name,
        "--timeout=90s",
    ]);
    assert!(
        out.status.success(),
        "the LBC-gated pod never Ready: {}",
        text(&out)
    );
    let pods: Api<Pod> = Api::namespaced(rig.client().await, &ns.name);
    let list = pods.list(&ListParams::default()).await.expect("pods");
    let pod = list
        .items
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .expect("a pod");
    let status = pod.status.clone().unwrap_or_default();
    let gate = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == lbc_gate)
        .expect("the gate");
    assert_eq!(
        (gate.status.as_str(), gate.reason.as_deref()),
        ("True", Some("healthy"))
    );
    let ip = status.pod_ip.expect("pod IP");
    assert!(
        emu.transitions()
            .iter()
            .any(|t| t.target.ip().to_string() == ip && t.to == Health::Healthy),
        "the gate passed only after the emulator saw {ip} healthy"
    );
    let _ = rig.kubectl_output(&[
        "delete",
        "targetgroupbinding",
        "web-tgb",
        "-n",
        &ns.name,
        "--timeout=60s",
    ]);
    drop(controller);
    let _ = cloud
        .elb
        .delete_load_balancer()
        .load_balancer_arn(&lb_arn)
        .send()
        .await;
    let _ = cloud
        .elb
        .delete_target_group()
        .target_group_arn(&tg)
        .send()
        .await;
}
