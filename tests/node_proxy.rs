//! The node proxy on the rig (issue 4): real processes in network namespaces. Node namespaces
//! run `cloudlb node-proxy` against the real apiserver; pod namespaces run a small TCP line echo
//! and UDP echo server that prefix replies with the pod name; Pods get their status through the
//! status subresource so the real kube-controller-manager writes the EndpointSlices; a client
//! namespace connects to nodeIP:nodePort.

use cloudlb_testkit as support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::{NetNs, Proc, Rig, TestNamespace, TestNode, eventually};

/// Port of the pod servers' TCP line echo (named `web` in the Pod) and UDP echo.
const POD_TCP: u16 = 8080;
const POD_UDP: u16 = 9090;
/// The node proxy's `--health-addr` port (`/healthz`, `/readyz`) in the tests.
const ADMIN: u16 = 10266;
/// Its `--metrics-addr` port, moved off loopback so the client namespace can scrape it.
const METRICS: u16 = 10267;
/// The label that hands a Service to the node proxy (`--service-proxy-name`, default cloudlb).
const PROXY_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// How long EndpointSlices and the proxy may take to follow a change.
const SETTLE: Duration = Duration::from_secs(30);

/// The pod server: `NAME TCP_PORT UDP_PORT`; answers each line / datagram with `NAME <it>`.
const POD_SERVER: &str = r#"
import asyncio, sys
name, tcp_port, udp_port = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
async def handle(r, w):
    try:
        while True:
            line = await r.readline()
            if not line:
                break
            w.write(name + b" " + line)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
class Udp(asyncio.DatagramProtocol):
    def connection_made(self, t):
        self.t = t
    def datagram_received(self, data, addr):
        self.t.sendto(name + b" " + data, addr)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Udp, local_addr=("0.0.0.0", udp_port))
    srv = await asyncio.start_server(handle, "0.0.0.0", tcp_port, backlog=1024)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

// ---------------------------------------------------------------------------------------------
// The world of one test: a Kubernetes namespace, a client network namespace, nodes, pods.

struct World {
    rig: &'static Rig,
    ns: TestNamespace,
    client: NetNs,
}

/// A node: its network namespace, its Node object and (once started) its node proxy.
struct NodeBox {
    proxy: Option<NodeProxy>,
    node: TestNode,
    netns: NetNs,
}

struct NodeProxy {
    proc: Proc,
    log: PathBuf,
}

/// A pod: its network namespace running the pod server.
struct PodBox {
    name: String,
    netns: NetNs,
}

impl World {
    async fn new(prefix: &str) -> World {
        let rig = Rig::get();
        World {
            ns: TestNamespace::new(rig, prefix).await,
            client: NetNs::new(&format!("{prefix}-c")),
            rig,
        }
    }

    async fn kube(&self) -> kube::Client {
        self.rig.client().await
    }

    /// A node namespace and its Node object (Ready, InternalIP = the namespace's address).
    async fn node(&self, prefix: &str) -> NodeBox {
        let netns = NetNs::new(prefix);
        let node = TestNode::new(self.rig, prefix, &netns.ip, None, json!({})).await;
        NodeBox {
            proxy: None,
            node,
            netns,
        }
    }

    /// Creates a Service labelled for the node proxy (namespace of the test) and returns it as
    /// stored (with node ports).
    async fn service(&self, name: &str, spec: Value) -> Service {
        self.service_labelled(name, json!({PROXY_LABEL: "cloudlb"}), spec)
            .await
    }

    /// Creates a Service with these labels and returns it as stored.
    async fn service_labelled(&self, name: &str, labels: Value, spec: Value) -> Service {
        let svcs: Api<Service> = Api::namespaced(self.kube().await, &self.ns.name);
        let svc: Service = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": labels}, "spec": spec}),
        )
        .unwrap();
        svcs.create(&PostParams::default(), &svc).await.unwrap()
    }

    async fn delete_service(&self, name: &str) {
        let svcs: Api<Service> = Api::namespaced(self.kube().await, &self.ns.name);
        svcs.delete(name, &DeleteParams::default()).await.unwrap();
    }

    /// A pod namespace running the pod server, and a Pod on `node` labelled `app`, Ready.
    async fn pod(&self, name: &str, app: &str, node: &NodeBox) -> PodBox {
        let mut netns = NetNs::new(&format!("{}-{name}", self.ns.name));
        let mut cmd = netns.command("/usr/bin/python3");
        cmd.args([
            "-c",
            POD_SERVER,
            name,
            &POD_TCP.to_string(),
            &POD_UDP.to_string(),
        ]);
        netns.spawn(cmd);
        let addr: SocketAddr = format!("{}:{POD_TCP}", netns.ip).parse().unwrap();
        eventually(
            "the pod server listens",
            Duration::from_secs(10),
            || async {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;

        let pods: Api<Pod> = Api::namespaced(self.kube().await, &self.ns.name);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node.node.name, "containers": [{"name": "c", "image": "none",
                "ports": [{"name": "web", "containerPort": POD_TCP, "protocol": "TCP"},
                          {"name": "echo", "containerPort": POD_UDP, "protocol": "UDP"}]}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let pod = PodBox {
            name: name.to_string(),
            netns,
        };
        self.set_ready(&pod, true).await;
        pod
    }

    /// Sets the pod's Ready condition through the status subresource.
    async fn set_ready(&self, pod: &PodBox, ready: bool) {
        let pods: Api<Pod> = Api::namespaced(self.kube().await, &self.ns.name);
        let ip = &pod.netns.ip;
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]
        }});
        pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    /// Runs `f` on a thread inside the client namespace (sockets it opens live there).
    async fn as_client<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let handle = in_netns(&self.client, f);
        tokio::task::spawn_blocking(move || handle.join().expect("client thread panicked"))
            .await
            .unwrap()
    }
}

impl NodeBox {
    fn ip(&self) -> &str {
        &self.netns.ip
    }

    fn addr(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip()).parse().unwrap()
    }

    /// Starts the node proxy in this node's namespace (extra flags appended) and waits until
    /// /readyz answers 200.
    async fn start_proxy(&mut self, world: &World, extra: &[&str]) {
        let log = std::env::temp_dir().join(format!("cloudlb-node-proxy-{}.log", self.node.name));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = self.netns.command(env!("CARGO_BIN_EXE_cloudlb"));
        cmd.args([
            "node-proxy",
            "--node-name",
            &self.node.name,
            "--bind-address",
            &self.netns.ip,
            "--health-addr",
            &format!("{}:{ADMIN}", self.netns.ip),
            "--metrics-addr",
            &format!("{}:{METRICS}", self.netns.ip),
        ])
        .args(extra)
        .env("KUBECONFIG", &world.rig.bridge_kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        let proc = Proc(cmd.spawn().expect("start node proxy"));
        eprintln!("node proxy on {} logs to {}", self.node.name, log.display());
        self.proxy = Some(NodeProxy { proc, log });
        let admin = self.addr(ADMIN);
        eventually("the node proxy is ready", SETTLE, || async {
            let r = world
                .as_client(move || http_get(admin, "/readyz"))
                .await
                .ok()?;
            (r.status == 200).then_some(())
        })
        .await;
    }

    fn proxy_pid(&self) -> u32 {
        self.proxy.as_ref().unwrap().proc.0.id()
    }

    fn proxy_log(&self) -> String {
        std::fs::read_to_string(&self.proxy.as_ref().unwrap().log).unwrap_or_default()
    }

    /// The proxy's /metrics text.
    async fn metrics(&self, world: &World) -> String {
        let admin = self.addr(METRICS);
        world
            .as_client(move || http_get(admin, "/metrics"))
            .await
            .unwrap()
            .body
    }
}

fn node_port(svc: &Service, protocol: &str) -> u16 {
    let port = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == protocol)
        .unwrap();
    port.node_port.unwrap() as u16
}

fn health_check_port(svc: &Service) -> u16 {
    svc.spec.as_ref().unwrap().health_check_node_port.unwrap() as u16
}

/// Sums the samples of `metric` whose labels contain every `want` pair, over the Service's
/// node-port frontends (its ClusterIP-leg listeners have series of their own, labelled
/// `node_port="cluster-ip"` / `"external-ip"`).
fn metric_sum(text: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            !l.contains("node_port=\"cluster-ip\"") && !l.contains("node_port=\"external-ip\"")
        })
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Clients (plain blocking sockets, run on a thread inside the client namespace).

/// Runs `f` on a new thread that has entered `ns`'s network namespace.
fn in_netns<T, F>(ns: &NetNs, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/clb-{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace file descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// A line-protocol connection to a node port.
struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConn {
    fn open(addr: SocketAddr) -> std::io::Result<LineConn> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(LineConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends `msg`, returns the replying pod's name (checking the echo).
    fn ask(&mut self, msg: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let (pod, echo) = line
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| std::io::Error::other(format!("bad reply {line:?}")))?;
        if echo != msg {
            return Err(std::io::Error::other(format!("echo {echo:?} != {msg:?}")));
        }
        Ok(pod.to_string())
    }
}

/// One new connection, one question: which pod answered.
fn tcp_ask(addr: SocketAddr) -> std::io::Result<String> {
    LineConn::open(addr)?.ask("hello")
}

/// One datagram from a fresh socket: which pod answered.
fn udp_ask(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send_to(msg.as_bytes(), addr)?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let (pod, echo) = text
        .split_once(' ')
        .ok_or_else(|| std::io::Error::other(text.clone()))?;
    assert_eq!(echo, msg);
    Ok(pod.to_string())
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("bad response {raw:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status in {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Connects and reads: Ok(true) when the proxy closed or reset the connection without sending
/// anything (the reset may already show in the connect's final SO_ERROR check).
fn tcp_closed_at_once(addr: SocketAddr) -> std::io::Result<bool> {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let _ = s.write_all(b"hello\n");
        let mut buf = [0u8; 64];
        Ok(s.read(&mut buf)? == 0)
    };
    match attempt() {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
        other => other,
    }
}

/// Asks `n` fresh connections in a row; returns the replying pods.
async fn tcp_asks(world: &World, addr: SocketAddr, n: usize) -> Vec<String> {
    world
        .as_client(move || {
            (0..n)
                .map(|_| tcp_ask(addr).expect("request through the node proxy"))
                .collect()
        })
        .await
}

fn count(pods: &[String], name: &str) -> usize {
    pods.iter().filter(|p| *p == name).count()
}

/// Waits until `n` fresh connections in a row are answered by exactly the pods in `want`.
async fn until_served_by(world: &World, addr: SocketAddr, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let n = want.len() * 4;
    eventually(&format!("{addr} served by {want:?}"), SETTLE, || {
        let want = want.clone();
        async move {
            let got = world
                .as_client(move || {
                    (0..n)
                        .map(|_| tcp_ask(addr))
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .await
                .ok()?;
            let mut seen = got.clone();
            seen.sort();
            seen.dedup();
            (seen == want).then_some(())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tcp_and_udp_round_trip_and_balance_across_pods() {
    let w = World::new("np-rt").await;
    let mut node = w.node("np-rt-n").await;
    let _a = w.pod("pod-a", "rt", &node).await;
    let _b = w.pod("pod-b", "rt", &node).await;
    let svc = w
        .service(
            "rt",
            json!({"type": "LoadBalancer", "selector": {"app": "rt"}, "ports": [
                {"name": "tcp", "port": 80, "targetPort": "web", "protocol": "TCP"},
                {"name": "udp", "port": 80, "targetPort": POD_UDP, "protocol": "UDP"}]}),
        )
        .await;
    node.start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let tcp = node.addr(node_port(&svc, "TCP"));
    let udp = node.addr(node_port(&svc, "UDP"));

    // A named targetPort resolves through the EndpointSlice; both pods take part.
    until_served_by(&w, tcp, &["pod-a", "pod-b"]).await;
    // Round robin: 20 connections in a row split exactly in half.
    let pods = tcp_asks(&w, tcp, 20).await;
    assert_eq!(
        (count(&pods, "pod-a"), count(&pods, "pod-b")),
        (10, 10),
        "{pods:?}"
    );

    // UDP: each client socket is a flow; replies come back; flows spread over both pods, and
    // a flow keeps its pod.
    let (spread, sticky) = w
        .as_client(move || {
            let spread: Vec<String> = (0..10)
                .map(|i| udp_ask(udp, &format!("ping{i}")).expect("udp round trip"))
                .collect();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut sticky = Vec::new();
            for i in 0..4 {
                s.send_to(format!("same{i}").as_bytes(), udp).unwrap();
                let mut buf = [0u8; 100];
                let n = s.recv(&mut buf).expect("udp reply on one flow");
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                sticky.push(text.split(' ').next().unwrap().to_string());
            }
            (spread, sticky)
        })
        .await;
    assert!(
        count(&spread, "pod-a") > 0 && count(&spread, "pod-b") > 0,
        "{spread:?}"
    );
    assert!(sticky.iter().all(|p| *p == sticky[0]), "{sticky:?}");

    let text = node.metrics(&w).await;
    let labels = [("namespace", w.ns.name.as_str()), ("service", "rt")];
    let tcp_labels = [labels[0], labels[1], ("protocol", "tcp")];
    let udp_labels = [labels[0], labels[1], ("protocol", "udp")];
    assert!(metric_sum(&text, "cloudlb_proxy_connections_total", &tcp_labels) >= 20.0);
    assert!(metric_sum(&text, "cloudlb_proxy_connections_total", &udp_labels) >= 11.0);
    assert!(metric_sum(&text, "cloudlb_proxy_bytes_total", &tcp_labels) > 0.0);
    assert_eq!(
        metric_sum(&text, "cloudlb_proxy_endpoints", &tcp_labels),
        2.0
    );
    assert_eq!(
        metric_sum(&text, "cloudlb_proxy_connections_active", &tcp_labels),
        0.0
    );
    // Logs say what changed, never one line per connection.
    let log = node.proxy_log();
    assert!(log.lines().count() < 200, "{log}");
}

#[tokio::test]
async fn external_traffic_policy_local_uses_local_pods_and_answers_health_checks() {
    let w = World::new("np-etp").await;
    let mut node_a = w.node("np-etp-a").await;
    let mut node_b = w.node("np-etp-b").await;
    let pod_a = w.pod("pod-a", "etp", &node_a).await;
    let _pod_b = w.pod("pod-b", "etp", &node_b).await;
    let svc = w
        .service(
            "etp",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "selector": {"app": "etp"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    node_a
        .start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    node_b
        .start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let port = node_port(&svc, "TCP");
    let hc = health_check_port(&svc);

    // Each node sends only to its own pod, though the other one is ready too.
    until_served_by(&w, node_a.addr(port), &["pod-a"]).await;
    until_served_by(&w, node_b.addr(port), &["pod-b"]).await;
    let via_a = tcp_asks(&w, node_a.addr(port), 10).await;
    assert_eq!(count(&via_a, "pod-a"), 10, "{via_a:?}");

    // kube-proxy's health check contract, exactly.
    let hc_a = node_a.addr(hc);
    let r = w
        .as_client(move || http_get(hc_a, "/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("1"));
    assert_eq!(
        r.body,
        format!(
            r#"{{"service":{{"namespace":"{}","name":"etp"}},"localEndpoints":1,"serviceProxyHealthy":true}}"#,
            w.ns.name
        )
    );

    // Node A's pod goes NotReady: its health check fails, and its node port has nothing to
    // send to (the remote pod is never used) — connections are reset at once, and counted.
    w.set_ready(&pod_a, false).await;
    let r = eventually("node A's health check fails", SETTLE, || async {
        let r = w.as_client(move || http_get(hc_a, "/healthz")).await.ok()?;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));
    assert_eq!(
        r.body,
        format!(
            r#"{{"service":{{"namespace":"{}","name":"etp"}},"localEndpoints":0,"serviceProxyHealthy":true}}"#,
            w.ns.name
        )
    );
    let addr_a = node_a.addr(port);
    let closed = w
        .as_client(move || {
            (0..5)
                .map(|_| tcp_closed_at_once(addr_a))
                .collect::<Vec<_>>()
        })
        .await;
    assert!(closed.iter().all(|r| matches!(r, Ok(true))), "{closed:?}");
    let text = node_a.metrics(&w).await;
    let labels = [
        ("namespace", w.ns.name.as_str()),
        ("reason", "no_endpoints"),
    ];
    assert!(metric_sum(&text, "cloudlb_proxy_errors_total", &labels) >= 5.0);

    // Node B still has its local pod.
    let hc_b = node_b.addr(hc);
    let r = w
        .as_client(move || http_get(hc_b, "/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("1"));
}

#[tokio::test]
async fn no_ready_endpoint_resets_tcp_drops_udp_and_counts_both() {
    let w = World::new("np-none").await;
    let mut node = w.node("np-none-n").await;
    let svc = w
        .service(
            "none",
            json!({"type": "LoadBalancer", "selector": {"app": "nothing-matches"}, "ports": [
                {"name": "tcp", "port": 80, "protocol": "TCP"},
                {"name": "udp", "port": 80, "protocol": "UDP"}]}),
        )
        .await;
    node.start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let tcp = node.addr(node_port(&svc, "TCP"));
    let udp = node.addr(node_port(&svc, "UDP"));
    // The proxy may bind the port a moment after /readyz on a fresh Service.
    eventually("the node port is bound", SETTLE, || async {
        w.as_client(move || TcpStream::connect_timeout(&tcp, IO_TIMEOUT).ok())
            .await
            .map(|_| ())
    })
    .await;
    let (closed, udp_replies) = w
        .as_client(move || {
            let closed: Vec<_> = (0..3).map(|_| tcp_closed_at_once(tcp)).collect();
            let udp_replies: Vec<_> = (0..3)
                .map(|i| udp_ask(udp, &format!("x{i}")).ok())
                .collect();
            (closed, udp_replies)
        })
        .await;
    assert!(closed.iter().all(|r| matches!(r, Ok(true))), "{closed:?}");
    assert!(udp_replies.iter().all(Option::is_none), "{udp_replies:?}");
    let text = node.metrics(&w).await;
    for protocol in ["tcp", "udp"] {
        let labels = [
            ("namespace", w.ns.name.as_str()),
            ("protocol", protocol),
            ("reason", "no_endpoints"),
        ];
        assert!(
            metric_sum(&text, "cloudlb_proxy_errors_total", &labels) >= 3.0,
            "{protocol}: {text}"
        );
    }
}

#[tokio::test]
async fn client_ip_affinity_keeps_a_client_on_one_pod() {
    let w = World::new("np-aff").await;
    let mut node = w.node("np-aff-n").await;
    let _a = w.pod("pod-a", "aff", &node).await;
    let _b = w.pod("pod-b", "aff", &node).await;
    let _c = w.pod("pod-c", "aff", &node).await;
    let svc = w
        .service(
            "aff",
            json!({"type": "LoadBalancer", "selector": {"app": "aff"},
                   "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    node.start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let addr = node.addr(node_port(&svc, "TCP"));
    // Wait until all three endpoints are in the table, then check stickiness.
    eventually("three endpoints", SETTLE, || async {
        let text = node.metrics(&w).await;
        let labels = [("namespace", w.ns.name.as_str()), ("service", "aff")];
        (metric_sum(&text, "cloudlb_proxy_endpoints", &labels) == 3.0).then_some(())
    })
    .await;
    let pods = tcp_asks(&w, addr, 15).await;
    assert!(pods.iter().all(|p| *p == pods[0]), "{pods:?}");
}

#[tokio::test]
async fn endpoint_changes_under_load_fail_no_request_and_cut_no_connection() {
    let w = World::new("np-load").await;
    let mut node = w.node("np-load-n").await;
    let pod_a = w.pod("pod-a", "load", &node).await;
    let _b = w.pod("pod-b", "load", &node).await;
    let svc = w
        .service(
            "load",
            json!({"type": "LoadBalancer", "selector": {"app": "load"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    node.start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let addr = node.addr(node_port(&svc, "TCP"));
    until_served_by(&w, addr, &["pod-a", "pod-b"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    const MAX_REQUESTS: usize = 20_000;
    const MAX_TIME: Duration = Duration::from_secs(60);
    // Long-lived connections, each asking every 20 ms: none may fail or be cut.
    let long_lived: Vec<_> = (0..6)
        .map(|i| {
            let stop = Arc::clone(&stop);
            in_netns(&w.client, move || {
                let started = Instant::now();
                let mut conn = LineConn::open(addr).expect("long-lived connect");
                let pod = conn.ask("first").expect("first answer");
                let mut answers = 1;
                while !stop.load(Ordering::Relaxed)
                    && answers < MAX_REQUESTS
                    && started.elapsed() < MAX_TIME
                {
                    let got = conn
                        .ask(&format!("c{i}-{answers}"))
                        .unwrap_or_else(|e| panic!("long-lived connection {i} on {pod} cut: {e}"));
                    assert_eq!(got, pod, "a connection changed pods");
                    answers += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (pod, answers)
            })
        })
        .collect();
    // Bounded load of fresh connections, one after another.
    let load = {
        let stop = Arc::clone(&stop);
        in_netns(&w.client, move || {
            let started = Instant::now();
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed)
                && ok + failed.len() < MAX_REQUESTS
                && started.elapsed() < MAX_TIME
            {
                match tcp_ask(addr) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    // pod-a turns NotReady (it still runs: its established connections carry on), pod-c comes.
    w.set_ready(&pod_a, false).await;
    let _c = w.pod("pod-c", "load", &node).await;
    until_served_by(&w, addr, &["pod-b", "pod-c"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let (ok, failed) = tokio::task::spawn_blocking(move || load.join().unwrap())
        .await
        .unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 50, "load too small to mean anything: {ok}");
    eprintln!("load: {ok} fresh connections, none failed");
    let mut on_a = 0;
    for h in long_lived {
        let (pod, answers) = tokio::task::spawn_blocking(move || h.join().unwrap())
            .await
            .unwrap();
        assert!(answers > 20, "{pod}: only {answers} answers");
        eprintln!("long-lived connection on {pod}: {answers} answers, never cut");
        on_a += usize::from(pod == "pod-a");
    }
    assert!(
        on_a > 0,
        "no long-lived connection was on the pod that went NotReady"
    );
    // The change was applied in place: the Service's listener was bound once, never again.
    let log = node.proxy_log();
    let svc_name = format!("{}/load", w.ns.name);
    // (ClusterIP-leg lines name their leg; node-port lines their frontend.)
    let lines = |what: &str, leg: bool| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&svc_name) && l.contains("leg=") == leg)
            .count()
    };
    assert!(lines("endpoints changed", false) >= 1, "{log}");
    assert_eq!(lines("listening", false), 1, "{log}");
    // and so was its ClusterIP listener
    assert_eq!(lines("listening", true), 1, "{log}");
}

#[tokio::test]
async fn deleted_service_closes_its_port_but_not_its_connections() {
    let w = World::new("np-del").await;
    let mut node = w.node("np-del-n").await;
    let _a = w.pod("pod-a", "del", &node).await;
    let svc = w
        .service(
            "del",
            json!({"type": "LoadBalancer", "selector": {"app": "del"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    node.start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    let addr = node.addr(node_port(&svc, "TCP"));
    until_served_by(&w, addr, &["pod-a"]).await;

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let established = in_netns(&w.client, move || {
        let mut conn = LineConn::open(addr).unwrap();
        conn.ask("before").unwrap();
        rx.recv().unwrap();
        conn.ask("after")
    });
    w.delete_service("del").await;
    eventually("the node port refuses connections", SETTLE, || async {
        let r = w
            .as_client(move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))
            .await;
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await;
    tx.send(()).unwrap();
    let after = tokio::task::spawn_blocking(move || established.join().unwrap())
        .await
        .unwrap();
    assert_eq!(after.unwrap(), "pod-a", "an established connection was cut");
    assert!(node.proxy_log().contains("closed"));
}

#[tokio::test]
async fn graceful_shutdown_fails_health_first_then_stops_accepting_then_drains() {
    let w = World::new("np-stop").await;
    let mut node = w.node("np-stop-n").await;
    let _a = w.pod("pod-a", "stop", &node).await;
    let svc = w
        .service(
            "stop",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "selector": {"app": "stop"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    node.start_proxy(
        &w,
        &["--shutdown-health-delay", "4s", "--drain-timeout", "30s"],
    )
    .await;
    let addr = node.addr(node_port(&svc, "TCP"));
    let hc = node.addr(health_check_port(&svc));
    let admin = node.addr(ADMIN);
    until_served_by(&w, addr, &["pod-a"]).await;
    eventually("health check 200", SETTLE, || async {
        let r = w.as_client(move || http_get(hc, "/healthz")).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let established = in_netns(&w.client, move || {
        let mut conn = LineConn::open(addr).unwrap();
        conn.ask("before").unwrap();
        rx.recv().unwrap();
        let after = conn.ask("during drain");
        drop(conn);
        after
    });
    std::thread::sleep(Duration::from_millis(200));

    let pid = node.proxy_pid();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let signalled = Instant::now();

    // 1. Health fails at once, while the node port still accepts.
    let (health, ready, served) = w
        .as_client(move || {
            std::thread::sleep(Duration::from_millis(300));
            (
                http_get(hc, "/healthz").unwrap(),
                http_get(admin, "/readyz").unwrap(),
                tcp_ask(addr),
            )
        })
        .await;
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "checks too slow to mean anything"
    );
    assert_eq!(health.status, 503);
    assert!(
        health.body.contains(r#""serviceProxyHealthy":false"#),
        "{}",
        health.body
    );
    assert!(
        health.body.contains(r#""localEndpoints":1"#),
        "{}",
        health.body
    );
    assert_eq!(ready.status, 503);
    assert_eq!(
        served.unwrap(),
        "pod-a",
        "still accepting during the health delay"
    );

    // 2. After the delay: no new connections; the established one still works.
    eventually("the node port stops accepting", SETTLE, || async {
        let r = w
            .as_client(move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))
            .await;
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(())
    })
    .await;
    assert!(
        signalled.elapsed() >= Duration::from_secs(4),
        "stopped accepting before the delay"
    );
    tx.send(()).unwrap();
    let after = tokio::task::spawn_blocking(move || established.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        after.unwrap(),
        "pod-a",
        "the established connection was cut"
    );

    // 3. Its last connection closed, the proxy exits well before the drain timeout.
    let proc = &mut node.proxy.as_mut().unwrap().proc.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proc.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let log = node.proxy_log();
    for step in [
        "failing health checks first",
        "no longer accepting",
        "drained",
    ] {
        assert!(log.contains(step), "{step:?} missing in\n{log}");
    }
}

/// A Service port moved to another nodePort: the old one keeps accepting (and follows the
/// port's endpoints) for `--node-port-linger`, then closes; its connections outlive it.
#[tokio::test]
async fn an_old_node_port_lingers_after_a_node_port_change_then_closes() {
    let w = World::new("np-ling").await;
    let mut node = w.node("np-ling-n").await;
    let _a = w.pod("pod-a", "ling", &node).await;
    let ports = |node_port: Option<u16>| {
        let mut p = json!({"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"});
        if let Some(n) = node_port {
            p["nodePort"] = json!(n);
        }
        json!([p])
    };
    let svc = w
        .service(
            "ling",
            json!({"type": "LoadBalancer", "selector": {"app": "ling"}, "ports": ports(None)}),
        )
        .await;
    node.start_proxy(
        &w,
        &["--shutdown-health-delay", "0s", "--node-port-linger", "8s"],
    )
    .await;
    let old_port = node_port(&svc, "TCP");
    let old = node.addr(old_port);
    until_served_by(&w, old, &["pod-a"]).await;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let established = in_netns(&w.client, move || {
        let mut conn = LineConn::open(old).unwrap();
        conn.ask("before").unwrap();
        rx.recv().unwrap();
        conn.ask("after")
    });

    let api: Api<Service> = Api::namespaced(w.rig.client().await, &w.ns.name);
    let new_port = support::move_node_port(&api, "ling", old_port, |n| ports(Some(n))).await;
    let moved = Instant::now();
    let new = node.addr(new_port);
    until_served_by(&w, new, &["pod-a"]).await;
    // The old port still takes new connections, to the port's current endpoints.
    let _b = w.pod("pod-b", "ling", &node).await;
    until_served_by(&w, old, &["pod-a", "pod-b"]).await;
    eventually(
        "the old node port closes after lingering",
        SETTLE,
        || async {
            let r = w
                .as_client(move || TcpStream::connect_timeout(&old, IO_TIMEOUT))
                .await;
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let closed_after = moved.elapsed();
    println!("old node port lingered {closed_after:?} after the change (linger 8 s)");
    assert!(closed_after >= Duration::from_secs(8), "{closed_after:?}");
    tx.send(()).unwrap();
    let after = tokio::task::spawn_blocking(move || established.join().unwrap())
        .await
        .unwrap();
    assert_eq!(after.unwrap(), "pod-a", "an established connection was cut");
    until_served_by(&w, new, &["pod-a", "pod-b"]).await;
    let log = node.proxy_log();
    assert!(log.contains("the old one keeps accepting"), "{log}");
    assert!(
        log.contains("old node port closed after lingering"),
        "{log}"
    );
}

/// Connects once: true when nothing listens there (the proxy did not take the port).
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, IO_TIMEOUT),
             Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn only_services_labelled_for_this_proxy_or_unlabelled_of_its_class_are_served() {
    let w = World::new("np-sel").await;
    let mut labelled_only = w.node("np-sel-a").await;
    let mut unlabelled_too = w.node("np-sel-b").await;
    let _a = w.pod("pod-a", "sel", &labelled_only).await;
    let spec = |extra: Value| {
        let mut spec = json!({"type": "LoadBalancer", "selector": {"app": "sel"},
                              "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec
    };
    let ours = json!({PROXY_LABEL: "cloudlb"});
    let theirs = json!({PROXY_LABEL: "cilium"});
    let class = json!({"loadBalancerClass": "cloudlb.io/nlb"});
    let mine = w.service("mine", spec(json!({}))).await;
    let kube = w
        .service_labelled("kube", json!({}), spec(class.clone()))
        .await;
    let other_class = w
        .service_labelled(
            "other-class",
            json!({}),
            spec(json!({"loadBalancerClass": "example.com/lb"})),
        )
        .await;
    let cilium = w.service_labelled("cilium", theirs, spec(class)).await;
    let nodeport = w
        .service_labelled(
            "np",
            json!({}),
            json!({"type": "NodePort", "selector": {"app": "sel"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    let labelled_np = w
        .service_labelled(
            "np-mine",
            ours,
            json!({"type": "NodePort", "selector": {"app": "sel"},
                   "ports": [{"port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        )
        .await;
    labelled_only
        .start_proxy(&w, &["--shutdown-health-delay", "0s"])
        .await;
    unlabelled_too
        .start_proxy(&w, &["--shutdown-health-delay", "0s", "--serve-unlabelled"])
        .await;

    // (Service, served by the default proxy, served with --serve-unlabelled)
    let cases = [
        (&mine, true, true),
        (&labelled_np, true, true),
        (&kube, false, true),
        (&other_class, false, false),
        (&cilium, false, false),
        (&nodeport, false, false),
    ];
    for (node, served_by) in [(&labelled_only, 1), (&unlabelled_too, 2)] {
        for (svc, default_serves, unlabelled_serves) in cases {
            let serves = if served_by == 1 {
                default_serves
            } else {
                unlabelled_serves
            };
            let addr = node.addr(node_port(svc, "TCP"));
            let name = svc.metadata.name.clone().unwrap();
            if serves {
                until_served_by(&w, addr, &["pod-a"]).await;
            } else {
                // Both proxies were ready (their first table applied) before this check.
                assert!(
                    w.as_client(move || refused(addr)).await,
                    "{name} must not be served by proxy {served_by}"
                );
            }
        }
    }
    let text = labelled_only.metrics(&w).await;
    assert!(text.contains(r#"service="mine""#), "{text}");
    assert!(!text.contains(r#"service="kube""#), "{text}");

    // /metrics is not on the health address (only where --metrics-addr puts it).
    let health = labelled_only.addr(ADMIN);
    let r = w
        .as_client(move || http_get(health, "/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}
