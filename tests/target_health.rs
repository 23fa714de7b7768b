//! Real target health on the rig (issue 17 item 1): through the rig's health endpoint
//! (tests/support/health_endpoint.rs), `DescribeTargetHealth` — called with the real aws-sdk
//! client, as the controller calls it — answers from the NLB emulator's view, not LocalStack's
//! "always healthy".

use cloudlb_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
    TargetDescription, TargetGroupAttribute, TargetTypeEnum,
};
use support::backends::tcp_line_server;
use support::cloud::TestCloud;
use support::emulator::{Emulator, EmulatorConfig};
use support::health_endpoint::HealthEndpoint;
use support::netns::NetnsSockets;
use support::{NetNs, Rig, unique};

fn tag(cloud: &TestCloud) -> Tag {
    Tag::builder()
        .key("cloudlb.io/cluster")
        .value(&cloud.cluster)
        .build()
}

/// An ip target group (TCP checks every 10 s, scaled) behind a new NLB's listener on 80:
/// (group ARN, the NLB's DNS name).
async fn ip_group_behind_nlb(cloud: &TestCloud, port: i32) -> (String, String) {
    let tg = cloud
        .elb
        .create_target_group()
        .name(unique("th"))
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .vpc_id(&cloud.vpc_id)
        .target_type(TargetTypeEnum::Ip)
        .health_check_protocol(ProtocolEnum::Tcp)
        .health_check_interval_seconds(10)
        .healthy_threshold_count(2)
        .unhealthy_threshold_count(2)
        .tags(tag(cloud))
        .send()
        .await
        .expect("create target group");
    let tg = tg.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    cloud
        .elb
        .modify_target_group_attributes()
        .target_group_arn(&tg)
        .attributes(
            TargetGroupAttribute::builder()
                .key("deregistration_delay.timeout_seconds")
                .value("20")
                .build(),
        )
        .send()
        .await
        .expect("deregistration delay");
    let lb = cloud
        .elb
        .create_load_balancer()
        .name(unique("th"))
        .r#type(LoadBalancerTypeEnum::Network)
        .scheme(LoadBalancerSchemeEnum::Internal)
        .subnets(&cloud.subnet_id)
        .tags(tag(cloud))
        .send()
        .await
        .expect("create load balancer");
    let lb_arn = lb.load_balancers()[0].load_balancer_arn().unwrap();
    cloud
        .elb
        .create_listener()
        .load_balancer_arn(lb_arn)
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
        .expect("create listener");
    let dns = lb.load_balancers()[0].dns_name().unwrap().to_string();
    (tg, dns)
}

/// (state, reason) of the target `ip:port` as `DescribeTargetHealth` reports it.
async fn health_of(elb: &elbv2::Client, tg: &str, ip: &str, port: i32) -> Option<(String, String)> {
    let out = elb
        .describe_target_health()
        .target_group_arn(tg)
        .send()
        .await
        .expect("DescribeTargetHealth");
    out.target_health_descriptions().iter().find_map(|d| {
        let t = d.target()?;
        (t.id() == Some(ip) && t.port() == Some(port)).then(|| {
            let h = d.target_health();
            (
                h.and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                h.and_then(|h| h.reason())
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
    })
}

/// Polls until the target's state is `want`; every state seen on the way, in order.
async fn until_state(
    elb: &elbv2::Client,
    tg: &str,
    ip: &str,
    port: i32,
    want: &str,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let state = health_of(elb, tg, ip, port)
            .await
            .map(|(s, r)| format!("{s}/{r}"))
            .unwrap_or_else(|| "absent".into());
        if seen.last() != Some(&state) {
            eprintln!("{ip}:{port}: {state}");
            seen.push(state.clone());
        }
        if state.starts_with(&format!("{want}/")) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{ip}:{port} never {want}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_target_health_reports_initial_healthy_unhealthy_and_draining_from_the_emulator() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "th").await;
    let lbs = NetNs::new("th-lbs");
    let node = NetNs::new("th-node");
    let sockets = NetnsSockets::enter(&format!("clb-{}", node.name)).unwrap();
    let port = 30090;
    let (tg, dns) = ip_group_behind_nlb(&cloud, port).await;

    let mut config = EmulatorConfig::new(&lbs.name);
    config.cluster = Some(cloud.cluster.clone());
    config.time_scale = 0.1; // a 10 s interval takes 1 s: `initial` is long enough to see
    config.poll_interval = Duration::from_millis(200);
    config.registration_delay = Duration::from_millis(500);
    let emu = Emulator::start(&rig.aws().await, config).await;
    let endpoint = HealthEndpoint::start("127.0.0.1:0", &rig.aws_endpoint, emu.health_view()).await;
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint.url())
        .region(aws_config::Region::new(rig.region.clone()))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "test", "test", None, None, "rig",
        ))
        .load()
        .await;
    let elb = elbv2::Client::new(&conf);
    // Before the emulator serves the load balancer, AWS's answer for a group no load balancer
    // sends to (`unused`) would be right; wait until it does.
    emu.resolve(&dns, Duration::from_secs(10)).await;

    // LocalStack alone says healthy at once; through the endpoint a new target is `initial`
    // until the emulator's first passing check.
    let _backend = tcp_line_server(
        &sockets,
        SocketAddr::new(node.ip.parse::<IpAddr>().unwrap(), port as u16),
        "a",
    );
    elb.register_targets()
        .target_group_arn(&tg)
        .targets(TargetDescription::builder().id(&node.ip).port(port).build())
        .send()
        .await
        .expect("register");
    let direct = health_of(&cloud.elb, &tg, &node.ip, port).await;
    eprintln!("LocalStack itself: {direct:?}");
    let seen = until_state(&elb, &tg, &node.ip, port, "healthy").await;
    assert!(
        seen[0].starts_with("initial/"),
        "a new target starts initial: {seen:?}"
    );

    // The backend stops: unhealthy after the failed checks.
    drop(_backend);
    let seen = until_state(&elb, &tg, &node.ip, port, "unhealthy").await;
    assert!(
        seen.last().unwrap().ends_with("/Target.FailedHealthChecks"),
        "{seen:?}"
    );

    // Deregistered: LocalStack forgets it at once, the NLB drains it (20 s scaled to 2 s) and
    // then it is gone.
    elb.deregister_targets()
        .target_group_arn(&tg)
        .targets(TargetDescription::builder().id(&node.ip).port(port).build())
        .send()
        .await
        .expect("deregister");
    until_state(&elb, &tg, &node.ip, port, "draining").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while health_of(&elb, &tg, &node.ip, port).await.is_some() {
        assert!(Instant::now() < deadline, "still listed after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(endpoint.describe_target_health_calls() > 0);
    cleanup(&cloud).await;
}

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

/// The endpoint's pure parts, no rig: parsing LocalStack's answer and the emulator's overlay.
#[test]
fn answer_overlays_the_emulator_on_localstacks_targets() {
    use std::collections::BTreeMap;
    use support::emulator::Health;
    use support::health_endpoint::{answer, listed_targets, parse_form, response_xml};

    let xml = "<DescribeTargetHealthResult><TargetHealthDescriptions><member><Target><Id>10.0.0.1</Id><Port>80</Port></Target><TargetHealth><State>healthy</State></TargetHealth></member><member><Target><Port>81</Port><Id>10.0.0.2</Id></Target></member></TargetHealthDescriptions></DescribeTargetHealthResult>";
    let listed = listed_targets(xml);
    assert_eq!(
        listed,
        vec![("10.0.0.1".to_string(), 80), ("10.0.0.2".to_string(), 81)]
    );
    let view: BTreeMap<(String, i32), Health> = [
        (("10.0.0.1".to_string(), 80), Health::Initial),
        (("10.0.0.3".to_string(), 80), Health::Draining),
        (("10.0.0.4".to_string(), 80), Health::Unused),
    ]
    .into();
    let states: Vec<(String, i32, &str)> = answer(&listed, &[], Some(&view))
        .into_iter()
        .map(|t| (t.id, t.port, t.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("10.0.0.1".to_string(), 80, "initial"),
            ("10.0.0.2".to_string(), 81, "initial"), // not picked up by the emulator yet
            ("10.0.0.3".to_string(), 80, "draining"), // LocalStack forgot it; still draining
        ]
    );
    // Asked about one target only: no other draining target is added.
    let asked = vec![("10.0.0.1".to_string(), Some(80))];
    assert_eq!(answer(&listed[..1], &asked, Some(&view)).len(), 1);
    // A group no served load balancer sends to: unused.
    assert!(
        answer(&listed, &[], None)
            .iter()
            .all(|t| t.state == "unused")
    );
    let body = response_xml(&answer(&listed, &[], Some(&view)));
    assert_eq!(listed_targets(&body).len(), 3);
    let form = parse_form(b"Action=DescribeTargetHealth&TargetGroupArn=arn%3Aaws%3Atg%2Fx");
    assert_eq!(form["TargetGroupArn"], "arn:aws:tg/x");
}
