//! The NLB data-plane emulator (tests/support/emulator.rs) against LocalStack, with plain servers
//! in node namespaces standing in for nodes: health checks, spreading, draining, fail-over,
//! UDP and proxy protocol v2.

use cloudlb_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum,
    Tag, TargetDescription, TargetGroupAttribute, TargetTypeEnum,
};
use support::backends::{
    self, LineConn, Outcome, http_status_server, tcp_line_server, tcp_request, udp_request,
    udp_server,
};
use support::cloud::TestCloud;
use support::emulator::{Emulator, EmulatorConfig, Health};
use support::netns::NetnsSockets;
use support::{NetNs, Rig, unique};

const T: Duration = Duration::from_secs(2);

/// A node: a network namespace and an EC2 instance with its address.
struct Node {
    ns: NetNs,
    sockets: NetnsSockets,
    instance: String,
}

impl Node {
    async fn new(cloud: &TestCloud) -> Node {
        let ns = NetNs::new("emu-node");
        let sockets = NetnsSockets::enter(&format!("clb-{}", ns.name)).unwrap();
        let instance = cloud.instance(Some(&ns.ip)).await;
        Node {
            ns,
            sockets,
            instance,
        }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ns.ip.parse::<IpAddr>().unwrap(), port)
    }
}

/// Health-check settings for `target_group`.
struct Hc {
    protocol: &'static str,
    port: Option<u16>,
    path: Option<&'static str>,
    codes: Option<&'static str>,
}

const TCP_HC: Hc = Hc {
    protocol: "TCP",
    port: None,
    path: None,
    codes: None,
};

async fn target_group(
    cloud: &TestCloud,
    protocol: &str,
    port: u16,
    hc: Hc,
    attributes: &[(&str, &str)],
) -> String {
    let mut req = cloud
        .elb
        .create_target_group()
        .name(unique("emu"))
        .protocol(ProtocolEnum::from(protocol))
        .port(port as i32)
        .vpc_id(&cloud.vpc_id)
        .target_type(TargetTypeEnum::Instance)
        .health_check_protocol(ProtocolEnum::from(hc.protocol))
        .health_check_port(
            hc.port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "traffic-port".into()),
        )
        .health_check_interval_seconds(10)
        .health_check_timeout_seconds(6)
        .healthy_threshold_count(2)
        .unhealthy_threshold_count(2)
        .tags(
            Tag::builder()
                .key("cloudlb.io/cluster")
                .value(&cloud.cluster)
                .build(),
        );
    if let Some(p) = hc.path {
        req = req.health_check_path(p);
    }
    if let Some(c) = hc.codes {
        req = req.matcher(Matcher::builder().http_code(c).build());
    }
    let out = req.send().await.expect("create target group");
    let arn = out.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    if !attributes.is_empty() {
        set_attributes(cloud, &arn, attributes).await;
    }
    arn
}

async fn set_attributes(cloud: &TestCloud, arn: &str, attributes: &[(&str, &str)]) {
    let mut req = cloud
        .elb
        .modify_target_group_attributes()
        .target_group_arn(arn);
    for (k, v) in attributes {
        req = req.attributes(TargetGroupAttribute::builder().key(*k).value(*v).build());
    }
    req.send().await.expect("modify attributes");
}

/// An NLB tagged for this test's cluster with one listener per (port, protocol, target group).
async fn load_balancer(cloud: &TestCloud, listeners: &[(u16, &str, &str)]) -> String {
    let out = cloud
        .elb
        .create_load_balancer()
        .name(unique("emu"))
        .r#type(LoadBalancerTypeEnum::Network)
        .scheme(LoadBalancerSchemeEnum::Internal)
        .subnets(&cloud.subnet_id)
        .tags(
            Tag::builder()
                .key("cloudlb.io/cluster")
                .value(&cloud.cluster)
                .build(),
        )
        .send()
        .await
        .expect("create load balancer");
    let lb = &out.load_balancers()[0];
    let arn = lb.load_balancer_arn().unwrap().to_string();
    for (port, protocol, tg) in listeners {
        cloud
            .elb
            .create_listener()
            .load_balancer_arn(&arn)
            .port(*port as i32)
            .protocol(ProtocolEnum::from(*protocol))
            .default_actions(
                Action::builder()
                    .r#type(ActionTypeEnum::Forward)
                    .target_group_arn(*tg)
                    .build(),
            )
            .send()
            .await
            .expect("create listener");
    }
    lb.dns_name().unwrap().to_string()
}

async fn register(cloud: &TestCloud, tg: &str, instances: &[&str], port: u16) {
    let mut req = cloud.elb.register_targets().target_group_arn(tg);
    for i in instances {
        req = req.targets(
            TargetDescription::builder()
                .id(*i)
                .port(port as i32)
                .build(),
        );
    }
    req.send().await.expect("register");
}

async fn deregister(cloud: &TestCloud, tg: &str, instance: &str, port: u16) {
    cloud
        .elb
        .deregister_targets()
        .target_group_arn(tg)
        .targets(
            TargetDescription::builder()
                .id(instance)
                .port(port as i32)
                .build(),
        )
        .send()
        .await
        .expect("deregister");
}

/// Deletes the test's load balancers (with their listeners), then its target groups.
async fn cleanup(cloud: &TestCloud) {
    let inventory = cloud.inventory().await;
    for (arn, _, _) in inventory
        .iter()
        .filter(|(a, _, _)| a.contains(":loadbalancer/"))
    {
        let _ = cloud
            .elb
            .delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await;
    }
    for (arn, _, _) in inventory
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
}

async fn emulator(rig: &Rig, cloud: &TestCloud, lbs: &NetNs) -> Emulator {
    let mut config = EmulatorConfig::new(&lbs.name);
    config.cluster = Some(cloud.cluster.clone());
    config.poll_interval = Duration::from_millis(200);
    Emulator::start(&rig.aws().await, config).await
}

/// Waits until the listener's targets at `addr`s have the wanted health.
async fn wait_health(emu: &Emulator, dns: &str, port: i32, want: &[(SocketAddr, Health)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let targets = emu.targets(dns, port);
        if want
            .iter()
            .all(|(a, h)| targets.iter().any(|t| t.addr == *a && t.health == *h))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "targets never reached {want:?}: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn requests(addr: SocketAddr, n: usize) -> backends::LoadReport {
    let mut report = backends::LoadReport::default();
    for _ in 0..n {
        let t0 = Instant::now();
        let o = tcp_request(addr, T).await;
        report.record(o, t0.elapsed());
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_spreads_over_healthy_targets_and_fails_over() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-tcp").await;
    let lbs = NetNs::new("emu-lbs");
    let (a, b) = (Node::new(&cloud).await, Node::new(&cloud).await);
    let _sa = tcp_line_server(&a.sockets, a.addr(30080), "a");
    let sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    let tg = target_group(&cloud, "TCP", 30080, TCP_HC, &[]).await;
    let dns = load_balancer(&cloud, &[(80, "TCP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance, &b.instance], 30080).await;

    let emu = emulator(rig, &cloud, &lbs).await;
    let ip = emu.resolve(&dns, Duration::from_secs(10)).await;
    let lb = SocketAddr::new(ip.into(), 80);
    wait_health(
        &emu,
        &dns,
        80,
        &[
            (a.addr(30080), Health::Healthy),
            (b.addr(30080), Health::Healthy),
        ],
    )
    .await;

    let r = requests(lb, 40).await;
    eprintln!("{}", r.summary("both healthy"));
    assert_eq!(r.answered, 40, "{:?}", r.failures);
    assert!(r.by_backend.get("a") > Some(&0) && r.by_backend.get("b") > Some(&0));

    // b stops listening: unhealthy after 2 failed checks; then everything goes to a.
    drop(sb);
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Unhealthy)]).await;
    let r = requests(lb, 20).await;
    eprintln!("{}", r.summary("b unhealthy"));
    assert_eq!(r.by_backend.get("a"), Some(&20), "{r:?}");

    // b back: healthy after 2 passing checks, and serving again.
    let _sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Healthy)]).await;
    let r = requests(lb, 40).await;
    assert_eq!(r.answered, 40);
    assert!(r.by_backend.get("b") > Some(&0));
    let seen: Vec<(Health, Health)> = emu
        .transitions()
        .iter()
        .filter(|t| t.target == b.addr(30080))
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Health::Initial, Health::Healthy),
            (Health::Healthy, Health::Unhealthy),
            (Health::Unhealthy, Health::Healthy)
        ]
    );
    cleanup(&cloud).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_use_port_path_and_success_codes() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-http").await;
    let lbs = NetNs::new("emu-lbs");
    let (a, b) = (Node::new(&cloud).await, Node::new(&cloud).await);
    let _sa = tcp_line_server(&a.sockets, a.addr(30080), "a");
    let _sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    let ha = http_status_server(&a.sockets, a.addr(31000), "a-health");
    let hb = http_status_server(&b.sockets, b.addr(31000), "b-health");
    hb.status.store(503, std::sync::atomic::Ordering::Relaxed);
    let hc = Hc {
        protocol: "HTTP",
        port: Some(31000),
        path: Some("/healthz"),
        codes: Some("200"),
    };
    let tg = target_group(&cloud, "TCP", 30080, hc, &[]).await;
    let dns = load_balancer(&cloud, &[(80, "TCP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance, &b.instance], 30080).await;
    let emu = emulator(rig, &cloud, &lbs).await;
    let lb = SocketAddr::new(emu.resolve(&dns, Duration::from_secs(10)).await.into(), 80);
    wait_health(
        &emu,
        &dns,
        80,
        &[
            (a.addr(30080), Health::Healthy),
            (b.addr(30080), Health::Unhealthy),
        ],
    )
    .await;
    assert!(ha.hits() > 0 && hb.hits() > 0);
    let r = requests(lb, 20).await;
    assert_eq!(r.by_backend.get("a"), Some(&20), "{r:?}");

    // 204 is not in "200": a turns unhealthy; b answers 200 and turns healthy.
    ha.status.store(204, std::sync::atomic::Ordering::Relaxed);
    hb.status.store(200, std::sync::atomic::Ordering::Relaxed);
    wait_health(
        &emu,
        &dns,
        80,
        &[
            (a.addr(30080), Health::Unhealthy),
            (b.addr(30080), Health::Healthy),
        ],
    )
    .await;
    let r = requests(lb, 20).await;
    assert_eq!(r.by_backend.get("b"), Some(&20), "{r:?}");

    // Nobody healthy: fail open to every registered target.
    hb.status.store(500, std::sync::atomic::Ordering::Relaxed);
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Unhealthy)]).await;
    let r = requests(lb, 30).await;
    assert_eq!(r.answered, 30, "fail open: {r:?}");
    cleanup(&cloud).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_target_drains_established_flows() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-drain").await;
    let lbs = NetNs::new("emu-lbs");
    let (a, b) = (Node::new(&cloud).await, Node::new(&cloud).await);
    let _sa = tcp_line_server(&a.sockets, a.addr(30080), "a");
    let _sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    // 40 s × 0.05 = 2 s of draining, then established connections are closed.
    let tg = target_group(
        &cloud,
        "TCP",
        30080,
        TCP_HC,
        &[
            ("deregistration_delay.timeout_seconds", "40"),
            (
                "deregistration_delay.connection_termination.enabled",
                "true",
            ),
        ],
    )
    .await;
    let dns = load_balancer(&cloud, &[(80, "TCP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance, &b.instance], 30080).await;
    let emu = emulator(rig, &cloud, &lbs).await;
    let lb = SocketAddr::new(emu.resolve(&dns, Duration::from_secs(10)).await.into(), 80);
    wait_health(
        &emu,
        &dns,
        80,
        &[
            (a.addr(30080), Health::Healthy),
            (b.addr(30080), Health::Healthy),
        ],
    )
    .await;

    // A long-lived connection to b.
    let mut to_b = None;
    for _ in 0..50 {
        let mut c = LineConn::open(lb).await.unwrap();
        if c.request(T).await == Outcome::Answered("b".into()) {
            to_b = Some(c);
            break;
        }
    }
    let mut to_b = to_b.expect("a connection that lands on b");

    let t0 = Instant::now();
    deregister(&cloud, &tg, &b.instance, 30080).await;
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Draining)]).await;
    // New connections avoid b; the established one is still served by b.
    let r = requests(lb, 20).await;
    assert_eq!(r.by_backend.get("a"), Some(&20), "{r:?}");
    assert_eq!(to_b.request(T).await, Outcome::Answered("b".into()));
    // After the (scaled) delay the connection is closed, as connection_termination asks.
    let mut closed_after = None;
    while t0.elapsed() < Duration::from_secs(8) {
        match to_b.request(T).await {
            Outcome::Answered(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                closed_after = Some(t0.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("connection closed after the deregistration delay");
    eprintln!("draining connection closed {closed_after:?} after DeregisterTargets (delay 2 s)");
    assert!(
        closed_after >= Duration::from_millis(1800),
        "{closed_after:?}"
    );
    assert!(
        emu.targets(&dns, 80)
            .iter()
            .all(|t| t.addr != b.addr(30080))
    );
    cleanup(&cloud).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_target_connections_reset_unless_told_to_drain() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-unh").await;
    let lbs = NetNs::new("emu-lbs");
    let a = Node::new(&cloud).await;
    let b = Node::new(&cloud).await;
    let _sa = tcp_line_server(&a.sockets, a.addr(30080), "a");
    let sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    let tg = target_group(&cloud, "TCP", 30080, TCP_HC, &[]).await;
    let dns = load_balancer(&cloud, &[(80, "TCP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance, &b.instance], 30080).await;
    let emu = emulator(rig, &cloud, &lbs).await;
    let lb = SocketAddr::new(emu.resolve(&dns, Duration::from_secs(10)).await.into(), 80);
    wait_health(
        &emu,
        &dns,
        80,
        &[
            (a.addr(30080), Health::Healthy),
            (b.addr(30080), Health::Healthy),
        ],
    )
    .await;

    async fn conn_to(lb: SocketAddr, name: &str) -> LineConn {
        for _ in 0..50 {
            let mut c = LineConn::open(lb).await.unwrap();
            if c.request(T).await == Outcome::Answered(name.into()) {
                return c;
            }
        }
        panic!("no connection landed on {name}");
    }

    // AWS's default: a target that fails its checks has its connections reset.
    let mut to_b = conn_to(lb, "b").await;
    drop(sb); // stops accepting (checks fail); the established connection is still served
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Unhealthy)]).await;
    assert_eq!(to_b.request(T).await, Outcome::Reset);

    // With connection termination off and a draining interval, they continue for that long.
    set_attributes(
        &cloud,
        &tg,
        &[
            (
                "target_health_state.unhealthy.connection_termination.enabled",
                "false",
            ),
            (
                "target_health_state.unhealthy.draining_interval_seconds",
                "60",
            ),
        ],
    )
    .await;
    let sb = tcp_line_server(&b.sockets, b.addr(30080), "b");
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Healthy)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the attribute is read by then
    let mut to_b = conn_to(lb, "b").await;
    drop(sb);
    wait_health(
        &emu,
        &dns,
        80,
        &[(b.addr(30080), Health::UnhealthyDraining)],
    )
    .await;
    let t0 = Instant::now();
    assert_eq!(to_b.request(T).await, Outcome::Answered("b".into()));
    let r = requests(lb, 10).await;
    assert_eq!(r.by_backend.get("a"), Some(&10), "{r:?}");
    wait_health(&emu, &dns, 80, &[(b.addr(30080), Health::Unhealthy)]).await;
    eprintln!("unhealthy.draining lasted {:?} (60 s × 0.05)", t0.elapsed());
    assert_eq!(to_b.request(T).await, Outcome::Reset);
    cleanup(&cloud).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_spread_and_answer() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-udp").await;
    let lbs = NetNs::new("emu-lbs");
    let (a, b) = (Node::new(&cloud).await, Node::new(&cloud).await);
    // UDP target groups are health-checked over TCP (here a line server on 30080).
    let _ha = tcp_line_server(&a.sockets, a.addr(30080), "a-hc");
    let _hb = tcp_line_server(&b.sockets, b.addr(30080), "b-hc");
    let ua = udp_server(&a.sockets, a.addr(30053), "a");
    let ub = udp_server(&b.sockets, b.addr(30053), "b");
    let hc = Hc {
        protocol: "TCP",
        port: Some(30080),
        path: None,
        codes: None,
    };
    let tg = target_group(&cloud, "UDP", 30053, hc, &[]).await;
    let dns = load_balancer(&cloud, &[(53, "UDP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance, &b.instance], 30053).await;
    let emu = emulator(rig, &cloud, &lbs).await;
    let lb = SocketAddr::new(emu.resolve(&dns, Duration::from_secs(10)).await.into(), 53);
    wait_health(
        &emu,
        &dns,
        53,
        &[
            (a.addr(30053), Health::Healthy),
            (b.addr(30053), Health::Healthy),
        ],
    )
    .await;
    let mut report = backends::LoadReport::default();
    for _ in 0..40 {
        let t0 = Instant::now();
        let o = udp_request(lb, T).await;
        report.record(o, t0.elapsed());
    }
    eprintln!("{}", report.summary("udp"));
    assert_eq!(report.answered, 40, "{:?}", report.failures);
    assert!(ua.hits() > 0 && ub.hits() > 0);
    cleanup(&cloud).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_carries_the_client_address() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "emu-pp").await;
    let lbs = NetNs::new("emu-lbs");
    let a = Node::new(&cloud).await;
    let sa = tcp_line_server(&a.sockets, a.addr(30080), "a");
    let tg = target_group(
        &cloud,
        "TCP",
        30080,
        TCP_HC,
        &[("proxy_protocol_v2.enabled", "true")],
    )
    .await;
    let dns = load_balancer(&cloud, &[(80, "TCP", &tg)]).await;
    register(&cloud, &tg, &[&a.instance], 30080).await;
    let emu = emulator(rig, &cloud, &lbs).await;
    let lb = SocketAddr::new(emu.resolve(&dns, Duration::from_secs(10)).await.into(), 80);
    wait_health(&emu, &dns, 80, &[(a.addr(30080), Health::Healthy)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the attribute is read by then

    let mut c = LineConn::open(lb).await.unwrap();
    let client = c.local_addr();
    assert_eq!(c.request(T).await, Outcome::Answered("a".into()));
    let headers = sa.proxy_headers.lock().unwrap().clone();
    let h = headers.last().expect("a PPv2 header");
    assert_eq!(h.command, 1, "PROXY command");
    assert_eq!(h.family, 0x11, "TCP over IPv4");
    assert_eq!(h.source, client);
    assert_eq!(h.destination, lb);
    cleanup(&cloud).await;
}

#[test]
fn success_codes_and_proxy_header_encoding() {
    use support::emulator::{proxy_protocol_v2_header, success_code_matches};
    for (spec, code, want) in [
        ("200", 200, true),
        ("200", 204, false),
        ("200-399", 302, true),
        ("200-399", 404, false),
        ("200,202", 202, true),
        ("200,202", 201, false),
        ("200-299,404", 404, true),
    ] {
        assert_eq!(success_code_matches(spec, code), want, "{spec} {code}");
    }
    let c: SocketAddr = "10.213.0.1:40000".parse().unwrap();
    let l: SocketAddr = "10.213.1.2:80".parse().unwrap();
    let h = proxy_protocol_v2_header(c, l, false);
    assert_eq!(h.len(), 28);
    let (parsed, used) = backends::parse_proxy_v2(&h).unwrap();
    assert_eq!(used, 28);
    assert_eq!((parsed.source, parsed.destination), (c, l));
    assert_eq!((parsed.command, parsed.family), (1, 0x11));
}
