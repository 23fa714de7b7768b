//! The node proxy as the service proxy of the Services labelled for it (issue 16): the
//! ClusterIP leg (clusterIPs and externalIPs through its own nftables table, from the node
//! namespace, from other hosts and from a real pod), the table's life (SIGKILL, restart,
//! Service deletion, clean shutdown), PROXY protocol v2 to the pod with the client's address,
//! and kube-proxy beside it on the rig's kubelet node, each serving only its own Services.
//!
//! Node namespaces run `cloudlb node-proxy` (with a proxy name and nft table of their own, so
//! tests never see each other's Services); pods are in-process line servers in namespaces of
//! their own; clients are sockets made inside the node or a client namespace.

use cloudlb_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::backends::{self, Backend, LoadReport, Outcome, tcp_line_server, udp_server};
use support::cloud::{ControllerProc, TestCloud, free_port, http_get};
use support::emulator::{Emulator, EmulatorConfig, Health};
use support::netns::NetnsSockets;
use support::{NetNs, Proc, Rig, TestNamespace, TestNode, eventually, text, unique};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const POD_TCP: u16 = 8080;
const POD_UDP: u16 = 9090;
const WAIT: Duration = Duration::from_secs(60);
const REQ_TIMEOUT: Duration = Duration::from_secs(3);
const PROXY_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A proxy name that is also a valid nft table name (no hyphens).
fn proxy_name(prefix: &str) -> String {
    unique(prefix).replace('-', "_")
}

// ---------------------------------------------------------------------------------------------
// Requests made from inside a namespace.

async fn line_request(conn: &mut BufReader<tokio::net::TcpStream>) -> Outcome {
    let attempt = async {
        conn.get_mut().write_all(b"ping\n").await?;
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        Ok(line.trim().to_string())
    };
    match tokio::time::timeout(REQ_TIMEOUT, attempt).await {
        Ok(Ok(name)) => Outcome::Answered(name),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Outcome::Reset,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Reset,
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

async fn open(
    sockets: &NetnsSockets,
    addr: SocketAddr,
) -> std::io::Result<BufReader<tokio::net::TcpStream>> {
    let s = tokio::time::timeout(REQ_TIMEOUT, sockets.tcp_connect(None, addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// One request on a fresh connection from the namespace.
async fn tcp_request(sockets: &NetnsSockets, addr: SocketAddr) -> Outcome {
    match open(sockets, addr).await {
        Ok(mut c) => line_request(&mut c).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Reset,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Outcome::Reset,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// One datagram from a fresh socket in the namespace: the answering pod.
async fn udp_request(sockets: &NetnsSockets, addr: SocketAddr) -> Outcome {
    let attempt = async {
        let s = sockets.udp_socket("0.0.0.0:0".parse().unwrap())?;
        s.send_to(b"ping", addr).await?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    match tokio::time::timeout(Duration::from_secs(1), attempt).await {
        Ok(Ok(name)) => Outcome::Answered(name),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => Outcome::Failed("timeout".into()),
    }
}

/// Waits until fresh requests from `sockets` to `addr` have been answered by exactly `want`
/// (`udp` for datagrams), in a window of `4 × want.len()` requests.
async fn until_served_by(sockets: &NetnsSockets, addr: SocketAddr, udp: bool, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(&format!("{addr} served by {want:?}"), WAIT, || {
        let want = want.clone();
        async move {
            let mut seen = Vec::new();
            for _ in 0..want.len() * 4 {
                let o = if udp {
                    udp_request(sockets, addr).await
                } else {
                    tcp_request(sockets, addr).await
                };
                match o {
                    Outcome::Answered(n) => seen.push(n),
                    _ => return None,
                }
            }
            seen.sort();
            seen.dedup();
            (seen == want).then_some(())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A node namespace with its own node proxy, and pods around it.

struct PodBox {
    name: String,
    ip: String,
    _servers: Vec<Backend>,
    _netns: NetNs,
}

struct LegWorld {
    rig: &'static Rig,
    ns: TestNamespace,
    /// The proxy's `--service-proxy-name`, also its nft table's name.
    name: String,
    node: NetNs,
    node_obj: TestNode,
    node_sockets: NetnsSockets,
    client: NetNs,
    client_sockets: NetnsSockets,
    proxy: Option<Proc>,
    log: std::path::PathBuf,
}

impl LegWorld {
    async fn new(prefix: &str) -> LegWorld {
        let rig = Rig::get();
        let ns = TestNamespace::new(rig, prefix).await;
        let node = NetNs::new(&format!("{prefix}-n"));
        // The node reaches the Service range on its own link: without the proxy's rules a
        // packet to a clusterIP goes nowhere outside the rig bridge.
        let out = Command::new("ip")
            .args([
                "-n",
                &format!("clb-{}", node.name),
                "route",
                "add",
                "10.96.0.0/16",
                "dev",
                "eth0",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "route: {}", text(&out));
        let node_obj = TestNode::new(rig, prefix, &node.ip, None, json!({})).await;
        let node_sockets = NetnsSockets::enter(&format!("clb-{}", node.name)).unwrap();
        let client = NetNs::new(&format!("{prefix}-c"));
        let client_sockets = NetnsSockets::enter(&format!("clb-{}", client.name)).unwrap();
        let name = proxy_name(prefix);
        let log = std::env::temp_dir().join(format!("cloudlb-service-proxy-{name}.log"));
        LegWorld {
            rig,
            ns,
            name,
            node,
            node_obj,
            node_sockets,
            client,
            client_sockets,
            proxy: None,
            log,
        }
    }

    fn start_proxy(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.node.command(env!("CARGO_BIN_EXE_cloudlb"));
        cmd.args([
            "node-proxy",
            "--node-name",
            &self.node_obj.name,
            "--bind-address",
            &self.node.ip,
            "--health-addr",
            &format!("{}:10266", self.node.ip),
            "--metrics-addr",
            &format!("{}:10267", self.node.ip),
            "--service-proxy-name",
            &self.name,
            "--nft-table",
            &self.name,
            "--shutdown-health-delay",
            "0s",
            "--drain-timeout",
            "2s",
        ])
        .env("KUBECONFIG", &self.rig.bridge_kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        eprintln!("node proxy {} logs to {}", self.name, self.log.display());
        self.proxy = Some(Proc(cmd.spawn().expect("start node proxy")));
    }

    async fn ready(&self) {
        let admin = format!("{}:10266", self.node.ip);
        eventually("the node proxy is ready", WAIT, || {
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

    /// `nft list table ip NAME` in the node namespace (None when there is no such table).
    fn table(&self) -> Option<String> {
        let out = self
            .node
            .command("nft")
            .args(["list", "table", "ip", &self.name])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    async fn service(&self, name: &str, spec: Value) -> Service {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {PROXY_LABEL: self.name}},
            "spec": spec,
        }))
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap()
    }

    async fn delete_service(&self, name: &str) {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }

    /// A pod namespace with a TCP line server and a UDP server, and its Ready Pod on `node`.
    async fn pod(&self, name: &str, app: &str, node: &str) -> PodBox {
        let netns = NetNs::new(&format!("{}-{name}", self.ns.name));
        let sockets = NetnsSockets::enter(&format!("clb-{}", netns.name)).unwrap();
        let ip: IpAddr = netns.ip.parse().unwrap();
        let tcp = tcp_line_server(&sockets, SocketAddr::new(ip, POD_TCP), name);
        let udp = udp_server(&sockets, SocketAddr::new(ip, POD_UDP), name);
        create_pod(self.rig, &self.ns.name, name, app, node, &netns.ip).await;
        PodBox {
            name: name.to_string(),
            ip: netns.ip.clone(),
            _servers: vec![tcp, udp],
            _netns: netns,
        }
    }

    async fn finish(&self) {
        force_delete_pods(self.rig, &self.ns.name).await;
    }
}

async fn create_pod(rig: &Rig, ns: &str, name: &str, app: &str, node: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(rig.client().await, ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
            "ports": [{"name": "web", "containerPort": POD_TCP, "protocol": "TCP"},
                      {"name": "dns", "containerPort": POD_UDP, "protocol": "UDP"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_ready(rig, ns, name, ip, true).await;
}

async fn set_ready(rig: &Rig, ns: &str, name: &str, ip: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(rig.client().await, ns);
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// No kubelet finishes these Pods' deletion: remove them so the namespace can go.
async fn force_delete_pods(rig: &Rig, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(rig.client().await, ns);
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = pods.delete_collection(&force, &Default::default()).await;
}

fn cluster_ip(svc: &Service) -> IpAddr {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("a clusterIP")
}

/// The map elements (`addr . port : listener`) of a listed table, in order.
fn elements(table: &str, map: &str) -> Vec<String> {
    let Some(start) = table.find(&format!("map {map} {{")) else {
        return Vec::new();
    };
    let body = &table[start..];
    let body = &body[..body.find('}').unwrap_or(body.len())];
    let Some(list) = body.split("elements = {").nth(1) else {
        return Vec::new();
    };
    list.split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_and_external_ips_reach_ready_endpoints_with_the_node_port_rules() {
    let mut w = LegWorld::new("sp-cip").await;
    let other = TestNode::new(w.rig, "sp-cip-o", &w.client.ip, None, json!({})).await;
    let node = w.node_obj.name.clone();
    let _a = w.pod("pod-a", "cip", &node).await;
    let _b = w.pod("pod-b", "cip", &node).await;
    let _c = w.pod("pod-c", "cip", &other.name).await;
    let web = w
        .service(
            "web",
            json!({"selector": {"app": "cip"}, "externalIPs": [w.node.ip],
                   "ports": [{"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"},
                             {"name": "dns", "port": 53, "targetPort": POD_UDP, "protocol": "UDP"}]}),
        )
        .await;
    let local = w
        .service(
            "local",
            json!({"selector": {"app": "cip"}, "internalTrafficPolicy": "Local",
                   "ports": [{"name": "web", "port": 81, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    let sticky = w
        .service(
            "sticky",
            json!({"selector": {"app": "cip"}, "sessionAffinity": "ClientIP",
                   "ports": [{"name": "web", "port": 82, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    w.start_proxy();
    w.ready().await;
    let web_ip = cluster_ip(&web);
    let all = ["pod-a", "pod-b", "pod-c"];

    // From the node itself (nat output) and from another host to an externalIP (prerouting).
    until_served_by(&w.node_sockets, SocketAddr::new(web_ip, 80), false, &all).await;
    until_served_by(&w.node_sockets, SocketAddr::new(web_ip, 53), true, &all).await;
    let external = SocketAddr::new(w.node.ip.parse().unwrap(), 80);
    until_served_by(&w.client_sockets, external, false, &all).await;
    until_served_by(&w.node_sockets, external, false, &all).await;

    // internalTrafficPolicy Local: this node's pods only; ClientIP affinity: one pod.
    let local_addr = SocketAddr::new(cluster_ip(&local), 81);
    until_served_by(&w.node_sockets, local_addr, false, &["pod-a", "pod-b"]).await;
    let sticky_addr = SocketAddr::new(cluster_ip(&sticky), 82);
    let mut sticky_pods = Vec::new();
    for _ in 0..12 {
        sticky_pods.push(tcp_request(&w.node_sockets, sticky_addr).await);
    }
    assert!(
        sticky_pods.iter().all(|o| *o == sticky_pods[0])
            && matches!(sticky_pods[0], Outcome::Answered(_)),
        "ClientIP affinity: {sticky_pods:?}"
    );

    // Terminating fallback: with no ready endpoint left, a serving-terminating one answers.
    let _t = w.pod("pod-t", "drain", &node).await;
    let drain = w
        .service(
            "drain",
            json!({"selector": {"app": "drain"},
                   "ports": [{"name": "web", "port": 83, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    let drain_addr = SocketAddr::new(cluster_ip(&drain), 83);
    until_served_by(&w.node_sockets, drain_addr, false, &["pod-t"]).await;
    let pods: Api<Pod> = Api::namespaced(w.rig.client().await, &w.ns.name);
    pods.delete("pod-t", &DeleteParams::default())
        .await
        .unwrap();
    eventually("pod-t's endpoint terminating", WAIT, || async {
        let out = w.rig.kubectl(&[
            "get",
            "endpointslices",
            "-n",
            &w.ns.name,
            "-l",
            "kubernetes.io/service-name=drain",
            "-o",
            "jsonpath={.items[*].endpoints[*].conditions.terminating}",
        ]);
        (out.trim() == "true").then_some(())
    })
    .await;
    until_served_by(&w.node_sockets, drain_addr, false, &["pod-t"]).await;

    let table = w.table().expect("the proxy's table");
    eprintln!("nft list table ip {}:\n{table}", w.name);
    let tcp = elements(&table, "tcp_vips");
    assert_eq!(
        tcp.len(),
        5,
        "web:80 on clusterIP and externalIP, local:81, sticky:82, drain:83: {tcp:?}"
    );
    assert!(
        tcp.iter()
            .any(|e| e.starts_with(&format!("{web_ip} . 80 : "))),
        "{tcp:?}"
    );
    assert_eq!(
        elements(&table, "udp_vips").len(),
        2,
        "web:53 on clusterIP and externalIP: {table}"
    );

    // The listeners take only redirected traffic: straight to a listener port is reset.
    let listener: u16 = tcp[0].rsplit(": ").next().unwrap().parse().unwrap();
    let direct = SocketAddr::new(w.node.ip.parse().unwrap(), listener);
    assert_eq!(
        tcp_request(&w.client_sockets, direct).await,
        Outcome::Reset,
        "{direct}"
    );
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_endpoint_changes_under_load_cut_no_connection() {
    let mut w = LegWorld::new("sp-load").await;
    let node = w.node_obj.name.clone();
    let a = w.pod("pod-a", "load", &node).await;
    let _b = w.pod("pod-b", "load", &node).await;
    let svc = w
        .service(
            "load",
            json!({"selector": {"app": "load"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    w.start_proxy();
    w.ready().await;
    let addr = SocketAddr::new(cluster_ip(&svc), 80);
    until_served_by(&w.node_sockets, addr, false, &["pod-a", "pod-b"]).await;
    let rules_before = w.table().expect("table");

    const MAX_REQUESTS: u64 = 20_000;
    const MAX_TIME: Duration = Duration::from_secs(60);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // Long-lived connections asking every 20 ms, and fresh connections one after another.
    let mut long_lived = Vec::new();
    for _ in 0..4 {
        let (sockets, stop) = (w.node_sockets.clone(), stop.clone());
        long_lived.push(tokio::spawn(async move {
            let mut conn = open(&sockets, addr).await.expect("long-lived connect");
            let first = line_request(&mut conn).await;
            let mut answers = vec![first.clone()];
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < MAX_TIME
                && answers.len() < 3000
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                answers.push(line_request(&mut conn).await);
            }
            (first, answers)
        }));
    }
    let load = {
        let (sockets, stop) = (w.node_sockets.clone(), stop.clone());
        tokio::spawn(async move {
            let mut r = LoadReport::default();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < MAX_TIME
                && r.sent < MAX_REQUESTS
            {
                let t0 = Instant::now();
                r.record(tcp_request(&sockets, addr).await, t0.elapsed());
            }
            r
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_ready(w.rig, &w.ns.name, &a.name, &a.ip, false).await;
    let _c = w.pod("pod-c", "load", &node).await;
    until_served_by(&w.node_sockets, addr, false, &["pod-b", "pod-c"]).await;
    stop.store(true, Ordering::Relaxed);

    let r = load.await.unwrap();
    eprintln!(
        "{}",
        r.summary("fresh connections to the clusterIP during endpoint changes")
    );
    assert!(r.sent > 50, "load too small to mean anything: {}", r.sent);
    assert_eq!(r.answered, r.sent, "failed: {:?}", r.failures);
    let mut on_a = 0;
    for h in long_lived {
        let (first, answers) = h.await.unwrap();
        assert!(
            answers.len() > 10,
            "{first:?}: only {} answers",
            answers.len()
        );
        assert!(
            answers.iter().all(|o| *o == first),
            "a long-lived connection changed or was cut: {answers:?}"
        );
        on_a += usize::from(first == Outcome::Answered("pod-a".into()));
    }
    eprintln!("long-lived connections on pod-a (turned NotReady): {on_a} of 4, none cut");
    // Endpoint changes swap the listener's targets in place: the rules were not rewritten.
    assert_eq!(w.table().expect("table"), rules_before);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_table_is_replaced_after_sigkill_follows_deletion_and_goes_on_shutdown() {
    let mut w = LegWorld::new("sp-life").await;
    let node = w.node_obj.name.clone();
    let _a = w.pod("pod-a", "life", &node).await;
    let spec = json!({"selector": {"app": "life"},
                      "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]});
    let x = w.service("x", spec.clone()).await;
    let y = w.service("y", spec).await;
    let (x_ip, y_ip) = (cluster_ip(&x), cluster_ip(&y));
    w.start_proxy();
    w.ready().await;
    until_served_by(
        &w.node_sockets,
        SocketAddr::new(x_ip, 80),
        false,
        &["pod-a"],
    )
    .await;
    until_served_by(
        &w.node_sockets,
        SocketAddr::new(y_ip, 80),
        false,
        &["pod-a"],
    )
    .await;
    let before = w.table().expect("table");
    eprintln!("before SIGKILL:\n{before}");
    assert_eq!(elements(&before, "tcp_vips").len(), 2, "{before}");

    // SIGKILL: no chance to clean up; the table stays, pointing at ports nobody holds.
    w.proxy.as_mut().unwrap().0.kill().unwrap();
    w.proxy.as_mut().unwrap().0.wait().unwrap();
    assert_eq!(
        w.table().as_deref(),
        Some(before.as_str()),
        "the kernel keeps the table"
    );
    w.delete_service("y").await;
    w.start_proxy();
    w.ready().await;
    let after = eventually("the restarted proxy's table", WAIT, || async {
        let t = w.table()?;
        let tcp = elements(&t, "tcp_vips");
        (tcp.len() == 1 && t != before).then_some(t)
    })
    .await;
    eprintln!("after restart (y deleted meanwhile):\n{after}");
    assert!(after.contains(&format!("{x_ip} . 80 : ")), "{after}");
    assert!(
        !after.contains(&y_ip.to_string()),
        "stale rule of y: {after}"
    );
    let stale: Vec<String> = elements(&before, "tcp_vips")
        .into_iter()
        .filter(|e| after.contains(e.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "elements of the killed proxy remain: {stale:?}"
    );
    until_served_by(
        &w.node_sockets,
        SocketAddr::new(x_ip, 80),
        false,
        &["pod-a"],
    )
    .await;

    // A deleted Service's rules go.
    w.delete_service("x").await;
    let empty = eventually("x's rules gone", WAIT, || async {
        let t = w.table()?;
        elements(&t, "tcp_vips").is_empty().then_some(t)
    })
    .await;
    assert!(!empty.contains(&x_ip.to_string()), "{empty}");

    // Clean shutdown removes the table.
    let mut proc = w.proxy.take().unwrap();
    support::terminate(&mut proc.0, Duration::from_secs(10));
    assert!(w.table().is_none(), "the table outlived a clean shutdown");
    assert!(
        std::fs::read_to_string(&w.log)
            .unwrap()
            .contains("nftables table removed"),
        "no removal logged"
    );
    w.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Through the emulated NLB: a controller of the test's own cluster and the emulator.

struct LbWorld {
    rig: &'static Rig,
    ns: TestNamespace,
    cloud: TestCloud,
    emu: Emulator,
    _controller: ControllerProc,
    _lbs: NetNs,
}

impl LbWorld {
    async fn new(prefix: &str, controller: impl FnOnce(&TestCloud) -> ControllerProc) -> LbWorld {
        let rig = Rig::get();
        let ns = TestNamespace::new(rig, prefix).await;
        let cloud = TestCloud::new(rig, prefix).await;
        let controller = controller(&cloud);
        let lbs = NetNs::new(&format!("{prefix}-lb"));
        let mut config = EmulatorConfig::new(&lbs.name);
        config.cluster = Some(cloud.cluster.clone());
        config.poll_interval = Duration::from_millis(200);
        let emu = Emulator::start(&rig.aws().await, config).await;
        LbWorld {
            rig,
            ns,
            cloud,
            emu,
            _controller: controller,
            _lbs: lbs,
        }
    }

    async fn service(&self, name: &str, labels: Value, annotations: Value, spec: Value) -> Service {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let mut spec = spec;
        spec["type"] = "LoadBalancer".into();
        spec["loadBalancerClass"] = self.cloud.class.clone().into();
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }))
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap()
    }

    /// The Service's NLB address (port 80) once its targets at `node_ips` are healthy.
    async fn lb_addr(&self, name: &str, port: u16, node_ips: &[&str]) -> SocketAddr {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        let host = eventually("the Service's hostname", WAIT, || async {
            support::service_hostname(&api, name).await
        })
        .await;
        let ip = self.emu.resolve(&host, WAIT).await;
        eventually(&format!("{host} targets healthy"), WAIT, || async {
            let ts = self.emu.targets(&host, i32::from(port));
            node_ips
                .iter()
                .all(|n| {
                    ts.iter()
                        .any(|t| t.addr.ip().to_string() == *n && t.health == Health::Healthy)
                })
                .then_some(())
        })
        .await;
        SocketAddr::new(IpAddr::V4(ip), port)
    }

    async fn finish(&self) {
        let api: Api<Service> = Api::namespaced(self.rig.client().await, &self.ns.name);
        for svc in api.list(&Default::default()).await.unwrap() {
            let _ = api
                .delete(
                    &svc.metadata.name.unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await;
        }
        eventually(
            "the controller removed the cloud resources",
            WAIT,
            || async { self.cloud.inventory().await.is_empty().then_some(()) },
        )
        .await;
        force_delete_pods(self.rig, &self.ns.name).await;
    }
}

/// A node proxy in `netns` serving the Services labelled `name`; ready when this returns.
async fn node_proxy(
    rig: &Rig,
    netns: &str,
    node: &str,
    ip: &str,
    name: &str,
    ports: (u16, u16),
) -> Proc {
    let log = std::env::temp_dir().join(format!("cloudlb-service-proxy-{name}-{node}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        env!("CARGO_BIN_EXE_cloudlb"),
        "node-proxy",
    ])
    .args(["--node-name", node, "--bind-address", ip])
    .args(["--health-addr", &format!("{ip}:{}", ports.0)])
    .args(["--metrics-addr", &format!("{ip}:{}", ports.1)])
    .args(["--service-proxy-name", name, "--nft-table", name])
    .args(["--shutdown-health-delay", "0s", "--drain-timeout", "2s"])
    .env("KUBECONFIG", &rig.bridge_kubeconfig)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(out.try_clone().unwrap())
    .stderr(out);
    eprintln!("node proxy {name} on {node} logs to {}", log.display());
    let proc = Proc(cmd.spawn().expect("start node proxy"));
    let admin = format!("{ip}:{}", ports.0);
    eventually("the node proxy is ready", WAIT, || {
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
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_to_the_pod_carries_the_client_address_with_etp_cluster() {
    let w = LbWorld::new("sp-pp", |cloud| {
        ControllerProc::start(Rig::get(), cloud, &[])
    })
    .await;
    let name = proxy_name("sp-pp");
    // Two nodes, the pod on b: connections through a cross nodes (ETP Cluster).
    let mut nodes = Vec::new();
    for n in ["sp-pp-a", "sp-pp-b"] {
        let netns = NetNs::new(n);
        let instance = w.cloud.instance(Some(&netns.ip)).await;
        let node = TestNode::new(
            w.rig,
            n,
            &netns.ip,
            Some(&TestCloud::provider_id(&instance)),
            json!({"cloudlb.io/test-cluster": w.cloud.cluster}),
        )
        .await;
        let proxy = node_proxy(
            w.rig,
            &format!("clb-{}", netns.name),
            &node.name,
            &netns.ip,
            &name,
            (10266, 10267),
        )
        .await;
        nodes.push((netns, node, proxy));
    }
    let pod_netns = NetNs::new(&format!("{}-pod", w.ns.name));
    let sockets = NetnsSockets::enter(&format!("clb-{}", pod_netns.name)).unwrap();
    let server = tcp_line_server(
        &sockets,
        SocketAddr::new(pod_netns.ip.parse().unwrap(), POD_TCP),
        "pod-pp",
    );
    create_pod(
        w.rig,
        &w.ns.name,
        "pod-pp",
        "pp",
        &nodes[1].1.name,
        &pod_netns.ip,
    )
    .await;
    let spec = json!({"selector": {"app": "pp"},
                      "ports": [{"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]});
    let labels = json!({PROXY_LABEL: name});
    // The NLB sends its own header (the target group's proxy protocol) and the proxy its own.
    w.service(
        "nlb-pp",
        labels.clone(),
        json!({"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*",
               "cloudlb.io/proxy-protocol-to-pod": "v2"}),
        spec.clone(),
    )
    .await;
    // No header from the NLB: the proxy's header names the peer it saw.
    let peer_svc = w
        .service(
            "peer",
            labels,
            json!({"cloudlb.io/proxy-protocol-to-pod": "v2"}),
            spec,
        )
        .await;
    let node_ips: Vec<&str> = nodes.iter().map(|(n, _, _)| n.ip.as_str()).collect();
    let nlb_pp = w.lb_addr("nlb-pp", 80, &node_ips).await;
    let peer = w.lb_addr("peer", 80, &node_ips).await;

    // Every connection through either node: exactly one header, with the client's address.
    for i in 0..6 {
        let mut conn = backends::LineConn::open(nlb_pp).await.unwrap();
        let client = conn.local_addr();
        let hits = server.hits();
        assert_eq!(
            conn.request(REQ_TIMEOUT).await,
            Outcome::Answered("pod-pp".into()),
            "request {i}"
        );
        assert_eq!(
            conn.request(REQ_TIMEOUT).await,
            Outcome::Answered("pod-pp".into()),
            "request {i}"
        );
        assert_eq!(
            server.hits() - hits,
            2,
            "two lines, nothing else before them (one header)"
        );
        let headers = server.proxy_headers.lock().unwrap().clone();
        let h = headers
            .iter()
            .find(|h| h.source == client)
            .unwrap_or_else(|| panic!("no header with the client {client}: {headers:?}"));
        assert_eq!((h.command, h.family), (1, 0x11), "PROXY over TCP/IPv4");
        assert_eq!(h.destination, nlb_pp, "the address the client connected to");
        eprintln!("pod got {h:?} for client {client}");
    }
    assert_eq!(
        server.plain_connections.load(Ordering::Relaxed),
        0,
        "a connection without a header"
    );

    let node_ports: Vec<u16> = peer_svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.node_port)
        .map(|p| p as u16)
        .collect();
    let mut conn = backends::LineConn::open(peer).await.unwrap();
    assert_eq!(
        conn.request(REQ_TIMEOUT).await,
        Outcome::Answered("pod-pp".into())
    );
    // The emulated NLB connects to the node from its own address (no client IP preservation
    // here), so that is the peer the proxy names; the destination is the node's nodePort.
    let headers = server.proxy_headers.lock().unwrap().clone();
    let h = headers
        .iter()
        .rev()
        .find(|h| h.source.ip() == peer.ip())
        .unwrap_or_else(|| {
            panic!(
                "no header naming the NLB's address {}: {headers:?}",
                peer.ip()
            )
        });
    assert!(
        node_ips
            .iter()
            .any(|ip| h.destination == SocketAddr::new(ip.parse().unwrap(), node_ports[0])),
        "destination = the node's nodePort: {h:?}"
    );
    drop(server);
    w.finish().await;
}

// ---------------------------------------------------------------------------------------------
// The rig's kubelet node: kube-proxy (iptables mode) and cloudlb side by side.

/// Lines of `iptables-save` in the kubelet node's namespace that mention `ns/name` (kube-proxy
/// comments every rule of a Service port with it).
fn kube_proxy_rules(ns: &str, name: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", "clb-kubelet", "iptables-save"])
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables-save: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("{ns}/{name}:")) || l.contains(&format!("\"{ns}/{name}\"")))
        .count()
}

/// TCP listeners on `port` in the kubelet node's namespace.
fn listeners(port: u16) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "clb-kubelet",
            "ss",
            "-Hltn",
            &format!("sport = :{port}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `curl http://addr/` run in a network namespace (`nsenter` args); the body.
fn curl_in(netns: &[&str], url: &str) -> Option<String> {
    let out = Command::new(netns[0])
        .args(&netns[1..])
        .args(["curl", "-sS", "--max-time", "2", url])
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    body.starts_with("hello from ").then_some(body)
}

/// The PID of a process of the pod (its sandbox or container), from the node's cgroups.
fn pod_pid(uid: &str) -> Option<String> {
    let out = Command::new("find")
        .args([
            "/sys/fs/cgroup/pids/cloudlb-rig",
            "-path",
            &format!("*pod{uid}*"),
            "-name",
            "cgroup.procs",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|procs| procs.lines().map(str::to_string).collect::<Vec<_>>())
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_kube_proxy_each_serves_only_its_own_services() {
    let rig = Rig::get();
    let node = rig.env("CLOUDLB_RIG_NODE");
    let node_ip = rig.env("CLOUDLB_RIG_NODE_IP");
    let w = LbWorld::new("sp-kp", |cloud| {
        // The kubelet node is the target: its VPC, its subnet, its label.
        let port = free_port();
        let args: Vec<String> = [
            "controller",
            "--cluster-name",
            &cloud.cluster,
            "--load-balancer-class",
            &cloud.class,
            "--node-selector",
            "cloudlb.io/rig-kubelet=true",
            "--target-group-binding-selector",
            &format!("cloudlb.io/test-cluster={}", cloud.cluster),
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--vpc-id",
            &Rig::get().env("CLOUDLB_RIG_NODE_VPC"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ControllerProc::spawn(Rig::get(), &cloud.cluster, &args, &[], port)
    })
    .await;
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    w.cloud
        .ec2
        .create_tags()
        .resources(rig.env("CLOUDLB_RIG_NODE_SUBNET"))
        .tags(tag("kubernetes.io/role/internal-elb", "1"))
        .tags(tag(
            &format!("kubernetes.io/cluster/{}", w.cloud.cluster),
            "shared",
        ))
        .send()
        .await
        .expect("tag the node's subnet");
    let name = proxy_name("sp-kp");
    let (health, metrics) = (free_port(), free_port());
    let _proxy = node_proxy(
        rig,
        "clb-kubelet",
        &node,
        &node_ip,
        &name,
        (health, metrics),
    )
    .await;

    // Real pods on the kubelet node.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": w.ns.name},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
          "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
            "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "web", "image": "localhost/rig/hello:1", "imagePullPolicy": "Never",
              "ports": [{"containerPort": 8080}],
              "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]}}}
    });
    let file = std::env::temp_dir().join(format!("{}.json", unique("deploy")));
    std::fs::write(&file, deployment.to_string()).unwrap();
    rig.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &w.ns.name,
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "rollout: {}", text(&out));

    let spec = json!({"selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]});
    let mine = w
        .service("mine", json!({PROXY_LABEL: name}), json!({}), spec.clone())
        .await;
    let kube = w.service("kube", json!({}), json!({}), spec).await;
    let node_port = |svc: &Service| {
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .node_port
            .unwrap() as u16
    };

    // kube-proxy has rules for the unlabelled one only.
    let kube_rules = eventually(
        "kube-proxy's rules for the unlabelled Service",
        WAIT,
        || async {
            let n = kube_proxy_rules(&w.ns.name, "kube");
            (n > 0).then_some(n)
        },
    )
    .await;
    let mine_rules = kube_proxy_rules(&w.ns.name, "mine");
    eprintln!(
        "FIGURE kube-proxy iptables rules in the kubelet node: labelled (cloudlb) {mine_rules}, unlabelled {kube_rules}"
    );
    assert_eq!(
        mine_rules, 0,
        "kube-proxy has rules for a Service labelled for cloudlb"
    );

    // cloudlb binds the labelled Service's nodePort, not the other's.
    let metrics_addr = format!("{node_ip}:{metrics}");
    eventually("cloudlb serves the labelled Service", WAIT, || async {
        let m = http_get(&metrics_addr, "/metrics")?.1;
        (m.contains("service=\"mine\"") && !listeners(node_port(&mine)).is_empty()).then_some(())
    })
    .await;
    let m = http_get(&metrics_addr, "/metrics").unwrap().1;
    assert!(
        !m.contains("service=\"kube\""),
        "cloudlb took the unlabelled Service"
    );
    assert_eq!(
        listeners(node_port(&kube)),
        "",
        "something listens on the unlabelled nodePort"
    );

    // Traffic through the emulated NLB works for both.
    for svc in ["mine", "kube"] {
        let addr = w.lb_addr(svc, 80, &[&node_ip]).await;
        let body = eventually(&format!("{svc} through its NLB"), WAIT, || async {
            let a = addr.to_string();
            tokio::task::spawn_blocking(move || http_get(&a, "/"))
                .await
                .ok()?
                .filter(|(s, b)| *s == 200 && b.starts_with("hello from web-"))
        })
        .await;
        eprintln!("{svc} through the NLB at {addr}: {}", body.1.trim());
    }

    // The labelled Service's ClusterIP: cloudlb's table, from the node and from a pod on it.
    let ip = cluster_ip(&mine);
    let url = format!("http://{ip}/");
    let from_node = eventually("the clusterIP from the node", WAIT, || async {
        curl_in(&["ip", "netns", "exec", "clb-kubelet"], &url)
    })
    .await;
    eprintln!("clusterIP {ip} from the node: {}", from_node.trim());
    let uid = rig.kubectl(&[
        "get",
        "pods",
        "-n",
        &w.ns.name,
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[0].metadata.uid}",
    ]);
    let pid = pod_pid(uid.trim()).expect("a process of the pod");
    let from_pod = eventually("the clusterIP from a pod", WAIT, || async {
        curl_in(&["nsenter", "-t", &pid, "-n"], &url)
    })
    .await;
    eprintln!("clusterIP {ip} from pod (pid {pid}): {}", from_pod.trim());
    let table = Command::new("ip")
        .args([
            "netns",
            "exec",
            "clb-kubelet",
            "nft",
            "list",
            "table",
            "ip",
            &name,
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains(&format!("{ip} . 80 : ")), "{table}");
    w.finish().await;
}
