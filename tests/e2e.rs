//! End to end on the rig (issue 8): a request to the hostname in `kubectl get svc` goes through
//! the NLB emulator (LocalStack's NLB, served for real), the node proxy in a node namespace and
//! reaches a pod namespace. The controller and the node proxies are real processes; pods are
//! in-process servers in their own namespaces; the client is this test process.
//!
//! Figures are printed (`--nocapture`): requests sent, failed, reset, p99 latency per disruption,
//! and the time from a new pod turning Ready (or a node joining) to its first request.

use cloudlb_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::backends::{self, LoadReport, Outcome};
use support::emulator::Health;
use support::eventually;
use support::world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_requests_to_the_hostname_reach_pods() {
    let w = World::new("e2e-rt").await;
    let a = w.node("e2e-rt-a").await;
    let b = w.node("e2e-rt-b").await;
    let _p1 = w.pod("pod-1", "web", &a).await;
    let _p2 = w.pod("pod-2", "web", &b).await;
    let created = Instant::now();
    w.service(
        "web",
        json!({"selector": {"app": "web"}, "ports": [
            {"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": POD_UDP, "protocol": "UDP"}]}),
        // A UDP node port has no TCP listener, so the default TCP traffic-port check can never
        // pass for the UDP target group: check the node proxy's /readyz instead.
        node_proxy_health_check(),
    )
    .await;
    let host = w.hostname("web").await;
    let hostname_after = created.elapsed();
    let ip = w.resolve(&host).await;
    eprintln!("curl --resolve {host}:80:{ip} ...");
    let tcp = SocketAddr::new(ip, 80);
    until_answered_by(tcp, &["pod-1", "pod-2"]).await;
    let first_answer = created.elapsed();
    eprintln!(
        "FIGURES service created → hostname {hostname_after:?}, → both pods answering through it {first_answer:?}"
    );

    let mut r = LoadReport::default();
    for _ in 0..50 {
        let t0 = Instant::now();
        r.record(backends::tcp_request(tcp, REQ_TIMEOUT).await, t0.elapsed());
    }
    report("tcp round trips", &r);
    assert_eq!(r.answered, 50, "{:?}", r.failures);
    assert!(r.by_backend.contains_key("pod-1") && r.by_backend.contains_key("pod-2"));

    let udp = SocketAddr::new(ip, 53);
    w.wait_targets(
        &host,
        53,
        &[(&a.ip, Health::Healthy), (&b.ip, Health::Healthy)],
    )
    .await;
    let mut r = LoadReport::default();
    for _ in 0..50 {
        let t0 = Instant::now();
        r.record(backends::udp_request(udp, REQ_TIMEOUT).await, t0.elapsed());
    }
    report("udp round trips", &r);
    assert_eq!(r.answered, 50, "{:?}", r.failures);
    assert!(r.by_backend.contains_key("pod-1") && r.by_backend.contains_key("pod-2"));
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_policy_local_sends_only_to_nodes_with_a_local_ready_pod() {
    let w = World::new("e2e-local").await;
    let a = w.node("e2e-lo-a").await;
    let b = w.node("e2e-lo-b").await;
    let c = w.node("e2e-lo-c").await;
    let _pa = w.pod("pod-a", "local", &a).await;
    let pb = w.pod("pod-b", "local", &b).await;
    w.set_ready(&pb, false).await; // on b, but not ready
    w.service(
        "local",
        json!({"selector": {"app": "local"}, "externalTrafficPolicy": "Local", "ports": [
            {"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        json!({}),
    )
    .await;
    let host = w.hostname("local").await;
    let addr = SocketAddr::new(w.resolve(&host).await, 80);
    // The node proxy's /healthz on the healthCheckNodePort drives the emulator's HTTP checks.
    w.wait_targets(
        &host,
        80,
        &[
            (&a.ip, Health::Healthy),
            (&b.ip, Health::Unhealthy),
            (&c.ip, Health::Unhealthy),
        ],
    )
    .await;
    let mut r = LoadReport::default();
    for _ in 0..60 {
        let t0 = Instant::now();
        r.record(backends::tcp_request(addr, REQ_TIMEOUT).await, t0.elapsed());
    }
    report("ETP Local, one node with a ready pod", &r);
    assert_eq!(r.by_backend.get("pod-a"), Some(&60), "{r:?}");
    let ts = w.emu.targets(&host, 80);
    for t in &ts {
        if t.addr.ip().to_string() != a.ip {
            assert_eq!(t.flows, 0, "traffic reached {t:?}");
        }
    }

    // pod-b turns Ready: node b passes its checks and takes traffic; c never does.
    let ready_at = Instant::now();
    w.set_ready(&pb, true).await;
    w.wait_targets(&host, 80, &[(&b.ip, Health::Healthy)]).await;
    let healthy_after = ready_at.elapsed();
    until_answered_by(addr, &["pod-b"]).await;
    eprintln!(
        "FIGURES ETP Local: pod Ready → its node healthy in the NLB {healthy_after:?}, → first request {:?}",
        ready_at.elapsed()
    );
    let c_flows: u64 = w
        .emu
        .targets(&host, 80)
        .iter()
        .filter(|t| t.addr.ip().to_string() == c.ip)
        .map(|t| t.flows)
        .sum();
    assert_eq!(c_flows, 0, "node c has no local pod and got traffic");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_gives_the_pod_the_client_address() {
    let w = World::new("e2e-pp").await;
    let a = w.node("e2e-pp-a").await;
    let p = w.pod("pod-pp", "pp", &a).await;
    w.service(
        "pp",
        json!({"selector": {"app": "pp"}, "ports": [
            {"name": "web", "port": 80, "targetPort": POD_TCP, "protocol": "TCP"}]}),
        json!({"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"}),
    )
    .await;
    let host = w.hostname("pp").await;
    let addr = SocketAddr::new(w.resolve(&host).await, 80);
    w.wait_targets(&host, 80, &[(&a.ip, Health::Healthy)]).await;
    let mut conn = eventually("a connection through the hostname", WAIT, || async {
        let mut c = backends::LineConn::open(addr).await.ok()?;
        (c.request(REQ_TIMEOUT).await == Outcome::Answered("pod-pp".into())).then_some(c)
    })
    .await;
    let client = conn.local_addr();
    assert_eq!(
        conn.request(REQ_TIMEOUT).await,
        Outcome::Answered("pod-pp".into())
    );
    let headers = p.proxy_headers.lock().unwrap().clone();
    let h = headers
        .iter()
        .find(|h| h.source == client)
        .unwrap_or_else(|| panic!("no PPv2 header from {client}: {headers:?}"));
    assert_eq!((h.command, h.family), (1, 0x11), "PROXY over TCP/IPv4");
    assert_eq!(h.destination, addr);
    eprintln!("pod got PPv2 {h:?} for client {client}");
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_under_load_fail_no_request_and_reset_no_connection() {
    let w = World::new("e2e-roll").await;
    let a = w.node("e2e-ro-a").await;
    let mut b = w.node("e2e-ro-b").await;
    let p1 = w.pod("pod-1", "roll", &a).await;
    let p2 = w.pod("pod-2", "roll", &b).await;
    // Health checks on the node proxy's own /readyz, which fails as soon as it shuts down
    // (the traffic port keeps accepting then); unhealthy targets drain instead of being reset.
    let mut annotations = node_proxy_health_check();
    annotations["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"] =
        "target_health_state.unhealthy.connection_termination.enabled=false,target_health_state.unhealthy.draining_interval_seconds=200".into();
    w.service(
        "roll",
        json!({"selector": {"app": "roll"}, "ports": [
            {"name": "web", "port": 80, "targetPort": "web", "protocol": "TCP"}]}),
        annotations,
    )
    .await;
    let host = w.hostname("roll").await;
    let addr = SocketAddr::new(w.resolve(&host).await, 80);
    w.wait_targets(
        &host,
        80,
        &[(&a.ip, Health::Healthy), (&b.ip, Health::Healthy)],
    )
    .await;
    until_answered_by(addr, &["pod-1", "pod-2"]).await;
    let load = |max: u64| {
        let stop = Arc::new(AtomicBool::new(false));
        let h = start_load(
            addr,
            3,
            max,
            Duration::from_secs(90),
            Duration::from_millis(5),
            stop.clone(),
        );
        (h, stop)
    };
    let mut total = LoadReport::default();

    // 1. Pods replaced one by one: the new one Ready first, then the old one terminating
    //    (NotReady), then gone.
    let (h, stop) = load(30_000);
    let mut new_pods = Vec::new();
    for (old, name, node) in [(&p1, "pod-3", &a), (&p2, "pod-4", &b)] {
        let p = w.pod(name, "roll", node).await;
        eventually("the new pod answers", WAIT, || async {
            (p.tcp.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await;
        w.set_ready(old, false).await;
        w.terminate_pod(old).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        w.force_delete_pod(old).await;
        new_pods.push(p);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report("pods replaced one by one", &r);
    let ready_to_first: Vec<(&str, Option<Duration>)> = new_pods
        .iter()
        .map(|p| {
            let first = r.first_answer.get(&p.name);
            (p.name.as_str(), first.map(|f| f.duration_since(p.ready_at)))
        })
        .collect();
    eprintln!("FIGURES new pod Ready → its first request through the hostname: {ready_to_first:?}");
    total.merge(r);
    drop(p1);
    drop(p2);

    // 2. A node added: registered, checked, and taking traffic.
    let (h, stop) = load(30_000);
    let joined = Instant::now();
    let c = w.node("e2e-ro-c").await;
    w.wait_targets(&host, 80, &[(&c.ip, Health::Healthy)]).await;
    eventually("traffic through the new node", WAIT, || async {
        w.emu
            .targets(&host, 80)
            .iter()
            .any(|t| t.addr.ip().to_string() == c.ip && t.flows > 0)
            .then_some(())
    })
    .await;
    let c_first = joined.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report("node added", &r);
    eprintln!("FIGURES new node (Node object + proxy) → first request through it: {c_first:?}");
    total.merge(r);

    // 3. A node removed: cordon, drain (its pod moves to c), node proxy SIGTERM (health fails
    //    first, then it stops accepting and drains), Node deleted (deregistered).
    let (h, stop) = load(30_000);
    w.rig.kubectl(&["cordon", &b.name]);
    let p5 = w.pod("pod-5", "roll", &c).await;
    eventually("the replacement answers", WAIT, || async {
        (p5.tcp.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let on_b = &new_pods[1];
    w.set_ready(on_b, false).await;
    w.terminate_pod(on_b).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.force_delete_pod(on_b).await;
    let term_at = Instant::now();
    let pid = b.proxy.as_ref().unwrap().0.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    w.wait_targets(&host, 80, &[(&b.ip, Health::UnhealthyDraining)])
        .await;
    let unhealthy_after = term_at.elapsed();
    let proc = &mut b.proxy.as_mut().unwrap().0;
    let exited = eventually("the node proxy drains and exits", WAIT, || {
        let done = proc.try_wait().unwrap();
        async move { done }
    })
    .await;
    assert!(exited.success(), "{exited:?}");
    let exited_after = term_at.elapsed();
    b._node = None; // the Node object goes: deregistered
    w.wait_targets(&host, 80, &[(&b.ip, Health::Draining)])
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report("node removed", &r);
    eprintln!(
        "FIGURES node proxy SIGTERM → NLB marks the node unhealthy {unhealthy_after:?}; → proxy drained and exited {exited_after:?}"
    );
    total.merge(r);

    // 4. The Service's ports change: targetPort moves to 8081 and a second port appears.
    let (h, stop) = load(30_000);
    let api: Api<Service> = Api::namespaced(w.rig.client().await, &w.ns.name);
    let svc = api.get("roll").await.unwrap();
    let node_port = svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .unwrap();
    api.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [
            {"name": "web", "port": 80, "targetPort": "web-alt", "protocol": "TCP", "nodePort": node_port},
            {"name": "web2", "port": 8080, "targetPort": "web", "protocol": "TCP"}]}})),
    )
    .await
    .unwrap();
    eventually("the second listener", WAIT, || async {
        let ip = w.emu.address(&host)?;
        matches!(
            backends::tcp_request(SocketAddr::new(IpAddr::V4(ip), 8080), REQ_TIMEOUT).await,
            Outcome::Answered(_)
        )
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report("service ports changed", &r);
    total.merge(r);

    report("all disruptions", &total);
    let c = w.emu.counters();
    eprintln!(
        "emulator: {} connections, {} with no target, {} target connect failures, {} terminated",
        c.tcp_connections.load(Ordering::Relaxed),
        c.no_target.load(Ordering::Relaxed),
        c.target_connect_failures.load(Ordering::Relaxed),
        c.terminated.load(Ordering::Relaxed)
    );
    assert_eq!(
        (total.failed, total.resets),
        (0, 0),
        "failures: {:?}",
        total.failures
    );
    assert!(total.sent > 100);
    w.finish().await;
}

/// The same node removal with the AWS Load Balancer Controller's default health check for
/// externalTrafficPolicy Cluster (TCP on the traffic port): the node port keeps accepting while
/// the proxy drains, so the NLB learns only when it stops accepting, and connections in between
/// are refused. This is the contrast to the test above; it asserts that drops happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_removal_with_traffic_port_tcp_checks_drops_connections() {
    let w = World::new("e2e-tcphc").await;
    let a = w.node("e2e-th-a").await;
    let mut b = w.node("e2e-th-b").await;
    let _p1 = w.pod("pod-1", "th", &a).await;
    w.service(
        "th",
        json!({"selector": {"app": "th"}, "ports": [
            {"name": "web", "port": 80, "targetPort": "web", "protocol": "TCP"}]}),
        json!({}),
    )
    .await;
    let host = w.hostname("th").await;
    let addr = SocketAddr::new(w.resolve(&host).await, 80);
    w.wait_targets(
        &host,
        80,
        &[(&a.ip, Health::Healthy), (&b.ip, Health::Healthy)],
    )
    .await;
    until_answered_by(addr, &["pod-1"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let h = start_load(
        addr,
        3,
        30_000,
        Duration::from_secs(60),
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.rig.kubectl(&["cordon", &b.name]);
    let pid = b.proxy.as_ref().unwrap().0.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    w.wait_targets(&host, 80, &[(&b.ip, Health::Unhealthy)])
        .await;
    let proc = &mut b.proxy.as_mut().unwrap().0;
    eventually("the node proxy exits", WAIT, || {
        let done = proc.try_wait().unwrap();
        async move { done }
    })
    .await;
    b._node = None;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report(
        "node removed, TCP traffic-port health checks (AWS LBC default)",
        &r,
    );
    assert!(
        r.failed + r.resets > 0,
        "expected refused connections while the NLB had not noticed: {:?}",
        r.by_backend
    );
    w.finish().await;
}

/// A Service port's nodePort changes: a new target group is created and registered, the
/// listener moves to it, the old one is deregistered and deleted.
///
/// Nothing may fail: the node proxies keep the old node port accepting (`--node-port-linger`)
/// while the NLB still sends there, and the controller moves the listener only once the new
/// group's targets passed their checks behind a warm-up listener (the controller reads target
/// health from the emulator through the rig's health endpoint, as it would from AWS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_port_change_moves_the_listener_to_a_new_target_group() {
    let w = World::new("e2e-np").await;
    let a = w.node("e2e-np-a").await;
    let _p1 = w.pod("pod-1", "np", &a).await;
    let svc = w
        .service(
            "np",
            json!({"selector": {"app": "np"}, "ports": [
                {"name": "web", "port": 80, "targetPort": "web", "protocol": "TCP"}]}),
            node_proxy_health_check(),
        )
        .await;
    let host = w.hostname("np").await;
    let addr = SocketAddr::new(w.resolve(&host).await, 80);
    w.wait_targets(&host, 80, &[(&a.ip, Health::Healthy)]).await;
    until_answered_by(addr, &["pod-1"]).await;
    let old_port = svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let h = start_load(
        addr,
        3,
        30_000,
        Duration::from_secs(60),
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api: Api<Service> = Api::namespaced(w.rig.client().await, &w.ns.name);
    let new_port = support::move_node_port(&api, "np", old_port as u16, |n| {
        json!([{"name": "web", "port": 80, "targetPort": "web", "protocol": "TCP", "nodePort": n}])
    })
    .await;
    let moved = Instant::now();
    eventually("the listener on the new target group", WAIT, || async {
        w.emu
            .targets(&host, 80)
            .iter()
            .any(|t| t.addr.port() == new_port as u16 && t.flows > 0)
            .then_some(())
    })
    .await;
    eprintln!(
        "FIGURES nodePort change → first flow on the new target group {:?}",
        moved.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let r = h.await.unwrap();
    report("nodePort changed (new target group)", &r);
    let c = w.emu.counters();
    eprintln!(
        "emulator: {} with no healthy target (new group still initial), {} refused by the target (old node port closed)",
        c.no_target.load(Ordering::Relaxed),
        c.target_connect_failures.load(Ordering::Relaxed)
    );
    assert_eq!(
        (r.failed, r.resets),
        (0, 0),
        "{:?}",
        &r.failures[..r.failures.len().min(5)]
    );
    w.finish().await;
}
