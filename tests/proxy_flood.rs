//! The node proxy under a bounded flood (issue 13): a real `cloudlb node-proxy` in a node
//! network namespace against the rig's apiserver; a pod namespace whose TCP and UDP echo
//! servers run in this process (sockets made inside the namespace); a client namespace with
//! established flows and a health prober; two attacker namespaces. Every load is bounded in
//! count and time, and every address is a rig namespace's.
//!
//! The flood: 50,000 UDP datagrams from 5,000 source ports (two client IPs), 5,000 idle TCP
//! connections, 200 slowloris clients on the health-check node port. The caps are set low
//! enough that each one refuses or evicts, and the test checks the counts.

use cloudlb_testkit as support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::netns::NetnsSockets;
use support::{NetNs, Proc, Rig, TestNamespace, TestNode, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const POD_TCP: u16 = 8080;
const POD_UDP: u16 = 9090;
const HEALTH: u16 = 10266;
const METRICS: u16 = 10267;
const SETTLE: Duration = Duration::from_secs(30);

// The caps the proxy runs with here (the defaults are far larger; see the README).
const TCP_MAX: usize = 4_000;
const TCP_MAX_PER_SOURCE: usize = 3_000;
const UDP_MAX: usize = 2_000;
const UDP_MAX_PER_SOURCE: usize = 1_500;
const HTTP_MAX: usize = 128;

// The flood.
const UDP_SOCKETS_PER_ATTACKER: usize = 2_500;
const UDP_ROUNDS: usize = 10;
const TCP_FROM_A: usize = 3_500;
const TCP_FROM_B: usize = 1_500;
const SLOWLORIS: usize = 200;
const ESTABLISHED_TCP: usize = 10;

/// Peak resident memory the proxy may reach during the flood.
const RSS_CAP_KIB: u64 = 96 * 1024;
/// Every health answer during the flood must come within this, less any time the whole
/// machine was stalled while it was in flight (see [`StallDetector`]).
const HEALTH_DEADLINE: Duration = Duration::from_millis(100);
/// No health answer may take longer than this, stall or not (an NLB's health-check timeout is
/// 6–10 s; this is far below it).
const HEALTH_HARD_DEADLINE: Duration = Duration::from_secs(1);
/// A gap this long in a 1 ms sleep loop at the proxy's priority is a machine stall.
const STALL_MIN: Duration = Duration::from_millis(10);

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Longest wait for the rig's kubelet node to finish tearing down earlier tests' pods.
const NODE_SETTLE: Duration = Duration::from_secs(120);

/// Waits (bounded) until no pod on the rig's real kubelet node is terminating. In the suite
/// this test runs right after the chart test, whose pods (real containers, their CNI teardown
/// and network namespaces) the kubelet is still tearing down for up to half a minute; that
/// burst of kernel and kubelet work on 2 cores is another test's load, not this flood's. If the
/// node does not settle in time the flood runs anyway, with a note, and every assertion stays.
async fn kubelet_node_settled(rig: &Rig, client: &kube::Client) {
    let node = rig.env("CLOUDLB_RIG_NODE");
    let pods: Api<Pod> = Api::all(client.clone());
    let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let start = Instant::now();
    loop {
        let terminating = match pods.list(&params).await {
            Ok(list) => list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_some())
                .count(),
            Err(_) => 0,
        };
        if terminating == 0 {
            if start.elapsed() > Duration::from_secs(1) {
                println!("  (kubelet node settled after {:.1?})", start.elapsed());
            }
            return;
        }
        if start.elapsed() > NODE_SETTLE {
            println!("  (kubelet node still tearing down {terminating} pod(s); flooding anyway)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `f` on a new thread inside `ns` (blocking sockets it opens live there).
fn in_netns<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/clb-{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace file descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// One blocking GET: (status, time taken).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Duration)> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {raw:?}")))?;
    Ok((status, start.elapsed()))
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn limited(text: &str, limit: &str, action: &str) -> u64 {
    metric(
        text,
        "cloudlb_proxy_limited_total",
        &[("limit", limit), ("action", action)],
    ) as u64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Times when the whole machine could not run a thread at the proxy's priority: a thread at
/// nice -5 (the proxy's and the prober's) that only sleeps 1 ms at a time records every gap
/// longer than [`STALL_MIN`]. This VM shares 2 cores with its hypervisor (`steal` in
/// /proc/stat grows), so a wall-clock deadline is only the proxy's to keep while the machine
/// runs: a slow health answer counts against the proxy unless such a stall, overlapping it,
/// accounts for the time it took past the deadline. A stall the proxy itself caused through its
/// own threads cannot hide here: CFS gives a waking thread of equal priority the CPU within a
/// few milliseconds, so only the hypervisor, the kernel or higher-priority work make a gap.
struct StallDetector {
    thread: std::thread::JoinHandle<Vec<(Duration, Duration)>>,
}

impl StallDetector {
    fn start(t0: Instant, stop: Arc<AtomicBool>) -> StallDetector {
        let thread = std::thread::spawn(move || {
            // SAFETY: setpriority on this thread's own id.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -5);
            }
            let mut stalls = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let before = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                let gap = before.elapsed();
                if gap > STALL_MIN {
                    stalls.push((before - t0, gap));
                }
            }
            stalls
        });
        StallDetector { thread }
    }

    fn stalls(self) -> Vec<(Duration, Duration)> {
        self.thread.join().unwrap()
    }
}

/// How much of `[start, start + took)` the machine spent stalled.
fn stalled_within(stalls: &[(Duration, Duration)], start: Duration, took: Duration) -> Duration {
    let end = start + took;
    stalls
        .iter()
        .map(|&(s, len)| {
            let (from, to) = (s.max(start), (s + len).min(end));
            to.saturating_sub(from)
        })
        .sum()
}

/// The pod's servers, in its namespace: a TCP line echo and a UDP echo.
async fn pod_servers(pod: &NetnsSockets, ip: &str) {
    let tcp = pod
        .tcp_listener(format!("{ip}:{POD_TCP}").parse().unwrap())
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = tcp.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (r, mut w) = conn.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("pod {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let udp = pod
        .udp_socket(format!("{ip}:{POD_UDP}").parse().unwrap())
        .unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        }
    });
}

struct Figures {
    udp_sent: u64,
    tcp_attempts: u64,
    tcp_open_at_peak: u64,
    slowloris_connections: u64,
}

// A CI gate. On 2 cores, where this process both floods and probes, the proxy and the prober
// run at nice -5, and the flood starts once the kubelet node has settled after earlier tests
// (`kubelet_node_settled`). The two outliers CI saw (109.5 ms and 118.5 ms, one answer in
// ~2,400 each) were single answers on a VM whose hypervisor steals time; a `StallDetector`
// now tells a machine stall from a slow proxy, and only a stall that overlaps a late answer
// and accounts for its lateness excuses it (never past 1 s, at most 1 % of answers).
// Run it alone with `cargo test --test proxy_flood -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_flood_is_capped_counted_and_health_stays_fast() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "fl").await;
    let node_ns = NetNs::new("fl-n");
    let pod_ns = NetNs::new("fl-p");
    let client_ns = NetNs::new("fl-c");
    let attacker_a = NetNs::new("fl-a");
    let attacker_b = NetNs::new("fl-b");
    let node = TestNode::new(rig, "fl-n", &node_ns.ip, None, json!({})).await;
    let client = rig.client().await;

    // The pod: servers first, then a Ready Pod object on the node.
    let pod_sockets = NetnsSockets::enter(&format!("clb-{}", pod_ns.name)).unwrap();
    pod_servers(&pod_sockets, &pod_ns.ip).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "pod-a", "labels": {"app": "flood"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none",
            "ports": [{"containerPort": POD_TCP, "protocol": "TCP"},
                      {"containerPort": POD_UDP, "protocol": "UDP"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ip = &pod_ns.ip;
    pods.patch_status(
        "pod-a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await
    .unwrap();

    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "flood",
                     "labels": {"service.kubernetes.io/service-proxy-name": "cloudlb"}},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "selector": {"app": "flood"},
                 "ports": [{"name": "tcp", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"},
                           {"name": "udp", "port": 80, "targetPort": POD_UDP, "protocol": "UDP"}]}
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let spec = svc.spec.as_ref().unwrap();
    let port_of = |proto: &str| {
        spec.ports
            .iter()
            .flatten()
            .find(|p| p.protocol.as_deref() == Some(proto))
            .and_then(|p| p.node_port)
            .unwrap() as u16
    };
    let node_ip = node_ns.ip.clone();
    let at = |port: u16| -> SocketAddr { format!("{node_ip}:{port}").parse().unwrap() };
    let tcp_addr = at(port_of("TCP"));
    let udp_addr = at(port_of("UDP"));
    let hc_addr = at(spec.health_check_node_port.unwrap() as u16);
    let health_addr = at(HEALTH);
    let metrics_addr = at(METRICS);

    // The proxy, with the caps of this test.
    let log = std::env::temp_dir().join(format!("cloudlb-flood-proxy-{}.log", node.name));
    let out = std::fs::File::create(&log).unwrap();
    // The proxy runs at a higher CPU priority than this test process, whose flood stands in
    // for clients on other machines: on 2 shared cores the flood generator would otherwise
    // compete with the proxy it attacks for the same CPU.
    let mut cmd = node_ns.command("nice");
    cmd.args(["-n", "-5"]).arg(env!("CARGO_BIN_EXE_cloudlb"));
    let caps = [
        ("--tcp-max-connections", TCP_MAX),
        ("--tcp-max-connections-per-source", TCP_MAX_PER_SOURCE),
        ("--udp-max-flows", UDP_MAX),
        ("--udp-max-flows-per-source", UDP_MAX_PER_SOURCE),
        ("--http-max-connections", HTTP_MAX),
    ];
    cmd.args([
        "node-proxy",
        "--node-name",
        &node.name,
        "--bind-address",
        &node_ns.ip,
    ])
    .args(["--health-addr", &health_addr.to_string()])
    .args(["--metrics-addr", &metrics_addr.to_string()])
    .args(["--shutdown-health-delay", "0s", "--drain-timeout", "1s"])
    .args(["--http-header-timeout", "2s", "--udp-idle-timeout", "60s"]);
    for (flag, v) in caps {
        cmd.args([flag, &v.to_string()]);
    }
    cmd.env("KUBECONFIG", &rig.bridge_kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let proxy = Proc(cmd.spawn().expect("start node proxy"));
    let pid = proxy.0.id();
    eprintln!("flood proxy logs to {}", log.display());

    let client_name = client_ns.name.clone();
    let scrape = move || {
        let name = client_name.clone();
        in_netns(&name, move || {
            let mut s = TcpStream::connect_timeout(&metrics_addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            Ok::<_, std::io::Error>(raw)
        })
        .join()
        .unwrap()
    };
    let client_sockets = NetnsSockets::enter(&format!("clb-{}", client_ns.name)).unwrap();
    // Served with endpoints and the health check green before anything else.
    let c = client_sockets.clone();
    eventually("the node proxy serves the Service", SETTLE, || {
        let c = c.clone();
        async move {
            let conn = c.tcp_connect(None, tcp_addr).await.ok()?;
            let (r, mut w) = conn.into_split();
            w.write_all(b"hi\n").await.ok()?;
            let mut line = String::new();
            tokio::time::timeout(
                Duration::from_secs(2),
                BufReader::new(r).read_line(&mut line),
            )
            .await
            .ok()?
            .ok()?;
            (line == "pod hi\n").then_some(())
        }
    })
    .await;
    let client_name = client_ns.name.clone();
    eventually("the health check answers 200", SETTLE, || {
        let name = client_name.clone();
        async move {
            let r = tokio::task::spawn_blocking(move || {
                in_netns(&name, move || http_get(hc_addr, "/healthz"))
                    .join()
                    .unwrap()
            })
            .await
            .ok()?;
            matches!(r, Ok((200, _))).then_some(())
        }
    })
    .await;
    kubelet_node_settled(rig, &client).await;
    let rss_before = proc_status_kib(pid, "VmRSS:");

    // Established flows from the client namespace: 10 TCP connections and one UDP flow, each
    // used every 50 ms through the whole flood; any failure is counted.
    let stop = Arc::new(AtomicBool::new(false));
    let established_ok = Arc::new(AtomicU64::new(0));
    let established_failed = Arc::new(AtomicU64::new(0));
    let udp_ok = Arc::new(AtomicU64::new(0));
    let udp_lost = Arc::new(AtomicU64::new(0));
    let mut users = Vec::new();
    for i in 0..ESTABLISHED_TCP {
        let conn = client_sockets.tcp_connect(None, tcp_addr).await.unwrap();
        let (stop, ok, failed) = (
            stop.clone(),
            established_ok.clone(),
            established_failed.clone(),
        );
        users.push(tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut r = BufReader::new(r);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let msg = format!("c{i}-{n}\n");
                let mut line = String::new();
                let round = async {
                    w.write_all(msg.as_bytes()).await?;
                    r.read_line(&mut line).await
                };
                match tokio::time::timeout(Duration::from_secs(2), round).await {
                    Ok(Ok(_)) if line == format!("pod {msg}") => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    {
        let udp = client_sockets
            .udp_socket("0.0.0.0:0".parse().unwrap())
            .unwrap();
        udp.connect(udp_addr).await.unwrap();
        let (stop, ok, failed) = (stop.clone(), udp_ok.clone(), udp_lost.clone());
        users.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let msg = format!("u{n}");
                let _ = udp.send(msg.as_bytes()).await;
                match tokio::time::timeout(Duration::from_secs(1), udp.recv(&mut buf)).await {
                    Ok(Ok(len)) if buf[..len] == *msg.as_bytes() => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // The prober: on its own thread (blocking sockets, away from the flood's runtime), /healthz
    // on the health-check node port and on --health-addr every 20 ms.
    let t0 = Instant::now();
    let detector = StallDetector::start(t0, stop.clone());
    let prober_stop = stop.clone();
    let prober = in_netns(&client_ns.name, move || {
        // The prober stands in for the NLB's health checker: it too gets the CPU before the
        // flood (threads inherit nothing here; this thread only).
        // SAFETY: setpriority on this thread's own id.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -5);
        }
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        let mut slow = Vec::new();
        while !prober_stop.load(Ordering::Relaxed) {
            for addr in [hc_addr, health_addr] {
                let at = t0.elapsed();
                match http_get(addr, "/healthz") {
                    Ok((200, took)) => {
                        latencies.push(took);
                        if took > HEALTH_DEADLINE {
                            slow.push((addr, at, took));
                        }
                    }
                    other => failures.push(format!("{addr} at {at:.1?}: {other:?}")),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (latencies, failures, slow)
    });

    // Peak RSS, sampled while the flood runs (VmHWM is the kernel's own peak as well).
    let sampler_stop = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !sampler_stop.load(Ordering::Relaxed) {
            peak = peak.max(proc_status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });

    let flood_start = Instant::now();
    let sockets_a = NetnsSockets::enter(&format!("clb-{}", attacker_a.name)).unwrap();
    let sockets_b = NetnsSockets::enter(&format!("clb-{}", attacker_b.name)).unwrap();

    // Slowloris on the health-check node port: half a header, then a header byte every
    // 500 ms, reconnecting whenever the proxy cuts it, until the flood ends.
    let slowloris_connections = Arc::new(AtomicU64::new(0));
    let mut lorises = Vec::new();
    for _ in 0..SLOWLORIS {
        let (sockets, stop, count) = (
            sockets_a.clone(),
            stop.clone(),
            slowloris_connections.clone(),
        );
        lorises.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A short pause before each (re)connect keeps this process's own CPU use sane.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(mut conn) = sockets.tcp_connect(None, hc_addr).await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                if conn
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .await
                    .is_err()
                {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if conn.write_all(b"X").await.is_err() {
                        break;
                    }
                }
            }
        }));
    }

    // UDP: 2,500 sockets from A, 10 rounds of one datagram each, then the same from B (so A
    // meets its per-source cap alone, and B the global one), paced at about 2,500 a second (each is
    // a new flow for the proxy: a socket, a task and an eviction).
    let udp_sent = Arc::new(AtomicU64::new(0));
    let sent = udp_sent.clone();
    let (ua, ub) = (sockets_a.clone(), sockets_b.clone());
    let udp_flood = tokio::spawn(async move {
        let mut all = Vec::new();
        for sockets in [ua, ub] {
            let mut socks = Vec::new();
            for _ in 0..UDP_SOCKETS_PER_ATTACKER {
                socks.push(sockets.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap());
            }
            for round in 0..UDP_ROUNDS {
                for (i, s) in socks.iter().enumerate() {
                    if s.send_to(format!("r{round}s{i}").as_bytes(), udp_addr)
                        .await
                        .is_ok()
                    {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if i % 25 == 24 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            all.push(socks);
        }
        all
    });

    // TCP: 3,500 idle connections from attacker A (its per-source cap is 3,000), then, once the
    // proxy has answered all of them, 1,500 from B (the global cap of 4,000 is then reached).
    /// Opens `n` connections, 50 at a time with a 20 ms pause between batches (at most about
    /// 2,500 a second); those the proxy resets at once may already fail the connect, and are
    /// dropped here.
    async fn open_idle(
        sockets: &NetnsSockets,
        to: SocketAddr,
        n: usize,
    ) -> Vec<tokio::net::TcpStream> {
        let mut conns = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(50) {
            let batch = (n - chunk * 50).min(50);
            let opened =
                futures::future::join_all((0..batch).map(|_| sockets.tcp_connect(None, to))).await;
            conns.extend(opened.into_iter().filter_map(Result::ok));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        conns
    }
    let tcp_a = open_idle(&sockets_a, tcp_addr, TCP_FROM_A).await;
    println!(
        "  (A's TCP connections opened at {:.1?})",
        flood_start.elapsed()
    );
    let scrape2 = scrape.clone();
    eventually("the proxy has answered A's connections", SETTLE, || {
        let scrape = scrape2.clone();
        async move {
            let text = tokio::task::spawn_blocking(scrape).await.ok()?.ok()?;
            let refused = limited(&text, "tcp_connections_per_source", "refused");
            let active = metric(
                &text,
                "cloudlb_proxy_connections_active",
                &[("service", "flood"), ("protocol", "tcp")],
            ) as u64;
            (refused + active >= (TCP_FROM_A + ESTABLISHED_TCP) as u64).then_some(())
        }
    })
    .await;
    let tcp_b = open_idle(&sockets_b, tcp_addr, TCP_FROM_B).await;
    println!(
        "  (B's TCP connections opened at {:.1?})",
        flood_start.elapsed()
    );
    let udp_socks = udp_flood.await.unwrap();
    println!("  (UDP flood sent at {:.1?})", flood_start.elapsed());

    // Hold everything for a while (the slowloris clients keep coming back).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = tokio::task::spawn_blocking(scrape.clone())
        .await
        .unwrap()
        .unwrap();
    let tcp_open_at_peak = metric(
        &text,
        "cloudlb_proxy_connections_active",
        &[("service", "flood"), ("protocol", "tcp")],
    ) as u64;
    let udp_live_at_peak = metric(
        &text,
        "cloudlb_proxy_connections_active",
        &[("service", "flood"), ("protocol", "udp")],
    ) as u64;
    stop.store(true, Ordering::Relaxed);
    let flood_took = flood_start.elapsed();
    let (mut latencies, failures, slow) =
        tokio::task::spawn_blocking(move || prober.join().unwrap())
            .await
            .unwrap();
    let stalls = tokio::task::spawn_blocking(move || detector.stalls())
        .await
        .unwrap();
    // A slow answer is the proxy's unless a machine stall while it was in flight accounts for
    // the time past the deadline; none may pass the hard deadline either way.
    let (excused, late): (Vec<_>, Vec<_>) = slow.iter().partition(|&&(_, at, took)| {
        took <= HEALTH_HARD_DEADLINE
            && took.saturating_sub(stalled_within(&stalls, at, took)) <= HEALTH_DEADLINE
    });
    let describe = |list: &[&(SocketAddr, Duration, Duration)]| -> Vec<String> {
        list.iter()
            .map(|(addr, at, took)| {
                format!(
                    "{addr} at {at:.1?}: {took:.1?} (machine stalled {:.1?} of it)",
                    stalled_within(&stalls, *at, *took)
                )
            })
            .collect()
    };
    let rss_peak_sampled = tokio::task::spawn_blocking(move || sampler.join().unwrap())
        .await
        .unwrap();
    let rss_hwm = proc_status_kib(pid, "VmHWM:");
    for t in users.into_iter().chain(lorises) {
        t.await.unwrap();
    }
    let figures = Figures {
        udp_sent: udp_sent.load(Ordering::Relaxed),
        tcp_attempts: (TCP_FROM_A + TCP_FROM_B) as u64,
        tcp_open_at_peak,
        slowloris_connections: slowloris_connections.load(Ordering::Relaxed),
    };

    // Release the flood; the proxy gives the memory back to its own pools.
    drop((tcp_a, tcp_b, udp_socks));
    let scrape3 = scrape.clone();
    eventually("the flood's TCP connections are gone", SETTLE, || {
        let scrape = scrape3.clone();
        async move {
            let text = tokio::task::spawn_blocking(scrape).await.ok()?.ok()?;
            let active = metric(
                &text,
                "cloudlb_proxy_connections_active",
                &[("service", "flood"), ("protocol", "tcp")],
            );
            (active == 0.0).then_some(())
        }
    })
    .await;
    let rss_after = proc_status_kib(pid, "VmRSS:");
    let end = tokio::task::spawn_blocking(scrape).await.unwrap().unwrap();

    latencies.sort();
    let refused_tcp_source = limited(&end, "tcp_connections_per_source", "refused");
    let refused_tcp = limited(&end, "tcp_connections", "refused");
    let udp_evicted = limited(&end, "udp_flows", "evicted");
    let udp_refused = limited(&end, "udp_flows", "refused");
    let udp_source_evicted = limited(&end, "udp_flows_per_source", "evicted");
    let http_evicted = limited(&end, "http_connections", "evicted");
    let http_timeouts = limited(&end, "http_header_timeout", "closed");
    let udp_flows = metric(
        &end,
        "cloudlb_proxy_connections_total",
        &[("service", "flood"), ("protocol", "udp")],
    ) as u64;
    println!("FLOOD FIGURES ({flood_took:.1?} of flood)");
    println!(
        "  udp: {} datagrams sent from {} source ports (2 IPs); {udp_flows} flows set up; \
              evicted {udp_evicted} (global cap {UDP_MAX}) + {udp_source_evicted} (per-source cap \
              {UDP_MAX_PER_SOURCE}); refused {udp_refused}; live at peak {udp_live_at_peak}",
        figures.udp_sent,
        2 * UDP_SOCKETS_PER_ATTACKER
    );
    println!(
        "  tcp: {} idle connections opened (+{ESTABLISHED_TCP} established); refused \
              {refused_tcp_source} (per-source cap {TCP_MAX_PER_SOURCE}) + {refused_tcp} (global \
              cap {TCP_MAX}); open at peak {}",
        figures.tcp_attempts, figures.tcp_open_at_peak
    );
    println!(
        "  slowloris: {SLOWLORIS} clients, {} connections; evicted {http_evicted} (cap \
              {HTTP_MAX}), cut by the header timeout {http_timeouts}",
        figures.slowloris_connections
    );
    println!(
        "  established flows: TCP {} round trips ok, {} failed; UDP {} ok, {} lost",
        established_ok.load(Ordering::Relaxed),
        established_failed.load(Ordering::Relaxed),
        udp_ok.load(Ordering::Relaxed),
        udp_lost.load(Ordering::Relaxed)
    );
    println!(
        "  rss: before {rss_before} KiB, peak {} KiB (sampled {rss_peak_sampled} KiB), \
              after {rss_after} KiB; cap {RSS_CAP_KIB} KiB",
        rss_hwm
    );
    println!(
        "  health: {} answers, p50 {:?}, p99 {:?}, max {:?}; {} failures",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        failures.len()
    );

    let longest_stall = stalls.iter().map(|s| s.1).max().unwrap_or_default();
    println!(
        "  machine stalls over {STALL_MIN:?} (a nice -5 thread's 1 ms sleeps): {}, longest {:?}; \
              health answers over {HEALTH_DEADLINE:?}: {} excused by a stall, {} not",
        stalls.len(),
        longest_stall,
        excused.len(),
        late.len()
    );
    for line in describe(&excused) {
        println!("    excused: {line}");
    }

    assert!(failures.is_empty(), "health probes failed: {failures:?}");
    assert!(
        late.is_empty(),
        "health answers over {HEALTH_DEADLINE:?} (beyond machine stalls) or over \
         {HEALTH_HARD_DEADLINE:?}: {:?}",
        describe(&late)
    );
    // Stalls excuse single answers, not a pattern: at most 1 % of them.
    assert!(
        excused.len() * 100 <= latencies.len(),
        "{} of {} health answers came late during machine stalls",
        excused.len(),
        latencies.len()
    );
    assert!(
        latencies.len() > 100,
        "too few health probes: {}",
        latencies.len()
    );
    assert_eq!(
        established_failed.load(Ordering::Relaxed),
        0,
        "an established TCP connection failed"
    );
    // UDP is lossy by nature (the node port's socket is shared with the flood): the flow must
    // keep answering, with at most 2 % of its datagrams lost.
    let (u_ok, u_lost) = (
        udp_ok.load(Ordering::Relaxed),
        udp_lost.load(Ordering::Relaxed),
    );
    assert!(
        u_ok > 100 && u_lost * 50 <= u_ok + u_lost,
        "UDP flow: {u_ok} ok, {u_lost} lost"
    );
    assert!(
        rss_hwm < RSS_CAP_KIB,
        "peak RSS {rss_hwm} KiB over {RSS_CAP_KIB} KiB"
    );
    // TCP: exact counts. A's connections past its 3,000; B's past the global 4,000 (counting
    // the 10 established and A's 3,000).
    assert_eq!(refused_tcp_source, (TCP_FROM_A - TCP_MAX_PER_SOURCE) as u64);
    let admitted_before_b = ESTABLISHED_TCP + TCP_MAX_PER_SOURCE;
    assert_eq!(
        refused_tcp,
        (TCP_FROM_B - (TCP_MAX - admitted_before_b)) as u64
    );
    assert_eq!(figures.tcp_open_at_peak, TCP_MAX as u64);
    // UDP: both caps made room by evicting; the live flows never passed the budget.
    assert!(
        udp_evicted > 0 && udp_source_evicted > 0,
        "udp caps never evicted"
    );
    assert!(
        udp_live_at_peak <= UDP_MAX as u64,
        "{udp_live_at_peak} live flows"
    );
    // HTTP: the slowloris clients outnumbered the cap and were cut by the header timeout.
    assert!(http_evicted > 0, "the HTTP cap never evicted");
    assert!(http_timeouts > 0, "the header timeout never fired");
    drop(proxy);
}
