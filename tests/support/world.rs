//! One end-to-end test's world (tests/e2e.rs and the tests built like it): a namespace, a slice
//! of the cloud, the controller, the NLB emulator with target health served to the controller,
//! nodes with node proxies, and pods; plus bounded load and its report.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::backends::{self, Backend, LoadReport, Outcome, tcp_line_server, udp_server};
use super::cloud::{ControllerProc, TestCloud, http_get};
use super::emulator::{Emulator, EmulatorConfig, Health};
use super::health_endpoint::HealthEndpoint;
use super::netns::NetnsSockets;
use super::{NetNs, Proc, Rig, TestNamespace, TestNode, eventually};

pub const POD_TCP: u16 = 8080;
pub const POD_TCP_ALT: u16 = 8081;
pub const POD_UDP: u16 = 9090;
pub const ADMIN: u16 = 10266;
pub const WAIT: Duration = Duration::from_secs(60);
pub const REQ_TIMEOUT: Duration = Duration::from_secs(3);
/// Cloud durations run 20× faster: a 10 s health-check interval takes 0.5 s.
pub const TIME_SCALE: f64 = 0.05;

pub struct NodeBox {
    pub name: String,
    pub ip: String,
    pub proxy: Option<Proc>,
    pub _node: Option<TestNode>,
    pub netns: NetNs,
}

pub struct PodBox {
    pub name: String,
    /// When its Ready condition was set.
    pub ready_at: Instant,
    pub ip: String,
    pub _servers: Vec<Backend>,
    pub tcp: Arc<std::sync::atomic::AtomicU64>,
    pub proxy_headers: Arc<std::sync::Mutex<Vec<backends::ProxyHeader>>>,
    pub _netns: NetNs,
}

/// One test's cluster: namespace, cloud slice, controller, emulator, nodes.
pub struct World {
    pub rig: &'static Rig,
    pub ns: TestNamespace,
    pub cloud: TestCloud,
    pub emu: Emulator,
    pub _controller: ControllerProc,
    /// The controller's AWS endpoint: LocalStack, with target health from the emulator.
    pub _health: HealthEndpoint,
    pub _lbs: NetNs,
}

impl World {
    pub async fn new(prefix: &str) -> World {
        let rig = Rig::get();
        let ns = TestNamespace::new(rig, prefix).await;
        let cloud = TestCloud::new(rig, prefix).await;
        let lbs = NetNs::new(&format!("{prefix}-lb"));
        let mut config = EmulatorConfig::new(&lbs.name);
        config.cluster = Some(cloud.cluster.clone());
        config.time_scale = TIME_SCALE;
        config.poll_interval = Duration::from_millis(200);
        let emu = Emulator::start(&rig.aws().await, config).await;
        let health =
            HealthEndpoint::start("127.0.0.1:0", &rig.aws_endpoint, emu.health_view()).await;
        let endpoint = health.url();
        let controller =
            ControllerProc::start_with_env(rig, &cloud, &[], &[("AWS_ENDPOINT_URL", &endpoint)]);
        World {
            rig,
            ns,
            cloud,
            emu,
            _controller: controller,
            _health: health,
            _lbs: lbs,
        }
    }

    /// A node: namespace, EC2 instance at its address, Node object, node proxy.
    pub async fn node(&self, prefix: &str) -> NodeBox {
        let netns = NetNs::new(prefix);
        let instance = self.cloud.instance(Some(&netns.ip)).await;
        let node = TestNode::new(
            self.rig,
            prefix,
            &netns.ip,
            Some(&TestCloud::provider_id(&instance)),
            json!({"cloudlb.io/test-cluster": self.cloud.cluster}),
        )
        .await;
        let mut n = NodeBox {
            name: node.name.clone(),
            ip: netns.ip.clone(),
            proxy: None,
            _node: Some(node),
            netns,
        };
        self.start_proxy(&mut n).await;
        n
    }

    pub async fn start_proxy(&self, n: &mut NodeBox) {
        let log = std::env::temp_dir().join(format!("cloudlb-e2e-proxy-{}.log", n.name));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = n.netns.command(super::cloudlb_bin());
        cmd.args([
            "node-proxy",
            "--node-name",
            &n.name,
            "--bind-address",
            &n.ip,
            "--health-addr",
            &format!("{}:{ADMIN}", n.ip),
            // 2 failed checks × 0.5 s (scaled) + the emulator's poll, with room to spare
            "--shutdown-health-delay",
            "3s",
            "--drain-timeout",
            "10s",
        ])
        .env("KUBECONFIG", &self.rig.bridge_kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        n.proxy = Some(Proc(cmd.spawn().expect("start node proxy")));
        let admin = format!("{}:{ADMIN}", n.ip);
        eventually("node proxy ready", WAIT, || {
            let admin = admin.clone();
            async move {
                tokio::task::spawn_blocking(move || http_get(&admin, "/readyz"))
                    .await
                    .ok()?
                    .filter(|(s, _)| *s == 200)
                    .map(|_| ())
            }
        })
        .await;
    }

    /// A pod namespace with line servers (TCP 8080 and 8081) and a UDP server (9090), and a
    /// Ready Pod on `node` labelled `app`.
    pub async fn pod(&self, name: &str, app: &str, node: &NodeBox) -> PodBox {
        let netns = NetNs::new(&format!("{}-{name}", self.ns.name));
        let sockets = NetnsSockets::enter(&format!("clb-{}", netns.name)).unwrap();
        let ip: IpAddr = netns.ip.parse().unwrap();
        let tcp = tcp_line_server(&sockets, SocketAddr::new(ip, POD_TCP), name);
        let alt = tcp_line_server(&sockets, SocketAddr::new(ip, POD_TCP_ALT), name);
        let udp = udp_server(&sockets, SocketAddr::new(ip, POD_UDP), name);
        let pods: Api<Pod> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "c", "image": "none",
                "ports": [{"name": "web", "containerPort": POD_TCP, "protocol": "TCP"},
                          {"name": "web-alt", "containerPort": POD_TCP_ALT, "protocol": "TCP"},
                          {"name": "dns", "containerPort": POD_UDP, "protocol": "UDP"}]}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let mut p = PodBox {
            name: name.to_string(),
            ready_at: Instant::now(),
            ip: netns.ip.clone(),
            tcp: tcp.hits.clone(),
            proxy_headers: tcp.proxy_headers.clone(),
            _servers: vec![tcp, alt, udp],
            _netns: netns,
        };
        p.ready_at = Instant::now();
        self.set_ready(&p, true).await;
        p
    }

    pub async fn set_ready(&self, pod: &PodBox, ready: bool) {
        let pods: Api<Pod> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let status = json!({"status": {
            "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]
        }});
        pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    /// Deletes the Pod with a grace period (its endpoint turns terminating), as a drain does.
    pub async fn terminate_pod(&self, pod: &PodBox) {
        let pods: Api<Pod> = Api::namespaced(self.rig.client().await, &self.ns.name);
        pods.delete(&pod.name, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// Removes the Pod object for good (no kubelet here to finish the graceful deletion).
    pub async fn force_delete_pod(&self, pod: &PodBox) {
        let pods: Api<Pod> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let _ = pods
            .delete(
                &pod.name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
    }

    pub async fn service(&self, name: &str, spec: Value, annotations: Value) -> Service {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let mut spec = spec;
        spec["type"] = "LoadBalancer".into();
        spec["loadBalancerClass"] = self.cloud.class.clone().into();
        // Labelled for the node proxy (its default `--service-proxy-name cloudlb`).
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations,
                         "labels": {"service.kubernetes.io/service-proxy-name": "cloudlb"}},
            "spec": spec
        }))
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap()
    }

    /// Deletes the test's Services while the controller still runs, and waits until it has
    /// removed their load balancers and target groups.
    pub async fn finish(&self) {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        for svc in api.list(&Default::default()).await.unwrap() {
            let name = svc.metadata.name.unwrap_or_default();
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
        eventually(
            "the controller removed the cloud resources",
            WAIT,
            || async { self.cloud.inventory().await.is_empty().then_some(()) },
        )
        .await;
        // No kubelet finishes graceful pod deletion here: remove the Pods so the namespace goes.
        let pods: Api<Pod> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let force = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        let _ = pods.delete_collection(&force, &Default::default()).await;
    }

    /// The hostname `kubectl get svc` shows under EXTERNAL-IP.
    pub async fn hostname(&self, name: &str) -> String {
        eventually("hostname in kubectl get svc", WAIT, || async {
            let out = self.rig.kubectl(&[
                "get",
                "svc",
                name,
                "-n",
                &self.ns.name,
                "--no-headers",
                "-o",
                "custom-columns=EXTERNAL-IP:.status.loadBalancer.ingress[0].hostname",
            ]);
            let h = out.trim().to_string();
            (h.contains(".elb.")).then_some(h)
        })
        .await
    }

    /// The hostname's address, as `curl --resolve` would be told.
    pub async fn resolve(&self, hostname: &str) -> IpAddr {
        IpAddr::V4(self.emu.resolve(hostname, WAIT).await)
    }

    /// Waits until every target behind `hostname:port` at these node IPs has `health`.
    pub async fn wait_targets(&self, hostname: &str, port: i32, want: &[(&str, Health)]) {
        eventually(&format!("targets {want:?}"), WAIT, || async {
            let ts = self.emu.targets(hostname, port);
            want.iter()
                .all(|(ip, h)| {
                    ts.iter()
                        .any(|t| t.addr.ip().to_string() == *ip && t.health == *h)
                })
                .then_some(())
        })
        .await;
    }
}

/// Bounded load: `workers` clients, each a new TCP connection per request with `pause` between,
/// until `stop` is set, `max_requests` are sent in total or `max_time` passes.
pub fn start_load(
    addr: SocketAddr,
    workers: usize,
    max_requests: u64,
    max_time: Duration,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let started = Instant::now();
        let per_worker = max_requests / workers as u64;
        let mut handles = Vec::new();
        for _ in 0..workers {
            let stop = stop.clone();
            handles.push(tokio::spawn(async move {
                let mut r = LoadReport::default();
                while r.sent < per_worker
                    && started.elapsed() < max_time
                    && !stop.load(Ordering::Relaxed)
                {
                    let t0 = Instant::now();
                    let o = backends::tcp_request(addr, REQ_TIMEOUT).await;
                    r.record(o, t0.elapsed());
                    tokio::time::sleep(pause).await;
                }
                r
            }));
        }
        let mut total = LoadReport::default();
        for h in handles {
            total.merge(h.await.unwrap());
        }
        total
    })
}

/// Health checks on the node proxy's own `/readyz` (admin port): 200 once it serves, 503 from
/// the moment it starts shutting down, whatever the Service's protocol.
pub fn node_proxy_health_check() -> Value {
    json!({
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol": "HTTP",
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port": ADMIN.to_string(),
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path": "/readyz",
    })
}

pub fn report(what: &str, r: &LoadReport) {
    eprintln!(
        "FIGURES {what}: sent {} failed {} reset {} p50 {:?} p99 {:?} by pod {:?}",
        r.sent,
        r.failed,
        r.resets,
        r.percentile(0.5),
        r.percentile(0.99),
        r.by_backend
    );
    if !r.failures.is_empty() {
        eprintln!("  failures: {:?}", &r.failures[..r.failures.len().min(10)]);
    }
}

pub async fn until_answered_by(addr: SocketAddr, names: &[&str]) {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while !names.iter().all(|n| seen.contains(*n)) {
        assert!(
            Instant::now() < deadline,
            "no answers from {names:?}, only {seen:?}"
        );
        if let Outcome::Answered(n) = backends::tcp_request(addr, REQ_TIMEOUT).await {
            seen.insert(n);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
