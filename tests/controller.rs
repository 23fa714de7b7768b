//! The Service controller on the real rig (kube-apiserver + LocalStack), as a real process (issue 3).

use cloudlb_testkit as support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cloudlb::controller::service::name_from_hostname;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud, is_write};
use support::{Rig, TestNamespace, TestNode, event_reasons, eventually, lb_service};

const WAIT: Duration = Duration::from_secs(30);

use support::service_hostname as hostname;

fn node_ports(svc: &Service) -> Vec<(i32, String, i32)> {
    let mut v: Vec<(i32, String, i32)> = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.port,
                p.protocol.clone().unwrap_or_default(),
                p.node_port.unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Notes of the Warning Events recorded for a Service, one per line.
fn warning_notes(rig: &Rig, ns: &str, name: &str) -> String {
    rig.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "--field-selector",
        &format!("regarding.name={name},type=Warning"),
        "-o",
        "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
    ])
}

#[tokio::test]
async fn full_lifecycle_create_nodes_ports_delete() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "life").await;
    let cloud = TestCloud::new(rig, "life").await;
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let i1 = cloud.instance(None).await;
    let i2 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "life-a",
        "10.213.250.1",
        Some(&TestCloud::provider_id(&i1)),
        labels.clone(),
    )
    .await;
    let _n2 = TestNode::new(
        rig,
        "life-b",
        "10.213.250.2",
        Some(&TestCloud::provider_id(&i2)),
        labels.clone(),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);

    let client = rig.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let mut svc = lb_service(
        "web",
        &cloud.class,
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]),
        json!({}),
    );
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["10.213.0.0/16".into()]);
    let created_at = Instant::now();
    api.create(&PostParams::default(), &svc).await.unwrap();

    // Hostname in status.
    let host = eventually("hostname in status", WAIT, || hostname(&api, "web")).await;
    eprintln!("service → hostname in {:?}", created_at.elapsed());
    let svc = api.get("web").await.unwrap();
    let finalizer = format!("cloudlb.io/cleanup-{}", cloud.class.replace('/', "-"));
    assert_eq!(
        svc.metadata.finalizers.clone().unwrap_or_default(),
        vec![finalizer]
    );
    let lb_name = name_from_hostname(&host).unwrap();
    let lb = cloud.load_balancer(&lb_name).await.expect("the NLB exists");
    assert_eq!(lb.dns_name(), Some(host.as_str()));
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internal"));
    let lb_arn = lb.load_balancer_arn().unwrap().to_string();

    // Listeners and target groups with the right ports; nodes registered at the nodePort.
    let ports = node_ports(&svc);
    let listeners = cloud.listeners(&lb_arn).await;
    assert_eq!(
        listeners
            .iter()
            .map(|(p, proto, _)| (*p, proto.clone()))
            .collect::<Vec<_>>(),
        vec![(53, "UDP".into()), (80, "TCP".into())]
    );
    for ((port, proto, tg_arn), (sport, sproto, node_port)) in listeners.iter().zip(&ports) {
        assert_eq!((port, proto), (sport, sproto));
        let tg = cloud.target_group(tg_arn).await;
        assert_eq!(tg.port(), Some(*node_port));
        assert_eq!(tg.protocol().map(|p| p.as_str()), Some(proto.as_str()));
        let want: BTreeSet<(String, i32)> =
            [(i1.clone(), *node_port), (i2.clone(), *node_port)].into();
        assert_eq!(cloud.targets(tg_arn).await, want);
    }
    let inv = cloud.inventory().await;
    assert_eq!(inv.len(), 3, "one NLB and two target groups: {inv:?}");
    for (_, _, t) in &inv {
        assert_eq!(t["cloudlb.io/service"], format!("{}/web", ns.name));
        assert_eq!(
            t["cloudlb.io/service-uid"],
            svc.metadata.uid.clone().unwrap()
        );
    }

    // loadBalancerSourceRanges → the managed security group, attached to the NLB.
    let sgs = cloud.security_groups().await;
    assert_eq!(sgs.len(), 1, "{sgs:?}");
    let want_rules: BTreeSet<(String, i32, String)> = [
        ("tcp".into(), 80, "10.213.0.0/16".into()),
        ("udp".into(), 53, "10.213.0.0/16".into()),
    ]
    .into();
    assert_eq!(sgs[0].1, want_rules);
    assert_eq!(lb.security_groups(), [sgs[0].0.clone()]);

    // kubectl shows it as EXTERNAL-IP.
    let table = rig.kubectl(&["get", "svc", "web", "-n", &ns.name]);
    assert!(
        table.contains("EXTERNAL-IP") && table.contains(&host),
        "{table}"
    );

    // A no-op resync makes no AWS call at all (so certainly no write).
    eventually("metrics", WAIT, || async {
        (controller.aws_calls(|_| true) > 0.0).then_some(())
    })
    .await;
    let before_all = controller.aws_calls(|_| true);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // give a (wrong) reconcile the chance to call AWS
    assert_eq!(
        controller.aws_calls(|_| true),
        before_all,
        "a no-op reconcile must not call AWS"
    );

    // A node joins → registered.
    let i3 = cloud.instance(None).await;
    let n3 = TestNode::new(
        rig,
        "life-c",
        "10.213.250.3",
        Some(&TestCloud::provider_id(&i3)),
        labels.clone(),
    )
    .await;
    let tcp_tg = listeners.iter().find(|l| l.0 == 80).unwrap().2.clone();
    eventually("new node registered", WAIT, || async {
        cloud
            .targets(&tcp_tg)
            .await
            .iter()
            .any(|(id, _)| *id == i3)
            .then_some(())
    })
    .await;

    // NotReady → deregistered.
    n3.set_ready(false, "10.213.250.3").await;
    eventually("NotReady node deregistered", WAIT, || async {
        (!cloud.targets(&tcp_tg).await.iter().any(|(id, _)| *id == i3)).then_some(())
    })
    .await;
    assert_eq!(cloud.targets(&tcp_tg).await.len(), 2);

    // Port change → listener and target group follow, the old ones go.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [
            {"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080, "nodePort": ports.iter().find(|p| p.0 == 80).unwrap().2},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": ports.iter().find(|p| p.0 == 53).unwrap().2}]}})),
    )
    .await
    .unwrap();
    let listeners = eventually("listener moved to 8080", WAIT, || async {
        let ls = cloud.listeners(&lb_arn).await;
        ls.iter()
            .any(|l| l.0 == 8080)
            .then_some(ls)
            .filter(|ls| !ls.iter().any(|l| l.0 == 80))
    })
    .await;
    let new_tg = listeners.iter().find(|l| l.0 == 8080).unwrap().2.clone();
    assert_ne!(new_tg, tcp_tg);
    assert_eq!(cloud.targets(&new_tg).await.len(), 2);
    eventually("old target group deleted", WAIT, || async {
        let inv = cloud.inventory().await;
        (inv.len() == 3 && !inv.iter().any(|(a, _, _)| *a == tcp_tg)).then_some(())
    })
    .await;

    // Events like the service controller's.
    let reasons = event_reasons(rig, &ns.name, "web", None);
    for want in [
        "EnsuringLoadBalancer",
        "EnsuredLoadBalancer",
        "UpdatedLoadBalancer",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "missing {want} in {reasons:?}"
        );
    }
    let describe = rig.kubectl(&["describe", "svc", "web", "-n", &ns.name]);
    assert!(describe.contains("EnsuredLoadBalancer"), "{describe}");

    // Delete → everything goes, then the finalizer.
    api.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("service gone", WAIT, || async {
        api.get_opt("web").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(
        cloud.inventory().await,
        vec![],
        "nothing tagged for the cluster remains"
    );
    assert!(cloud.load_balancer(&lb_name).await.is_none());
    let writes = controller.aws_calls(is_write);
    assert!(writes > 0.0);
}

#[tokio::test]
async fn class_filtering_type_change_and_invalid_annotations() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "class").await;
    let cloud = TestCloud::new(rig, "class").await;
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "class-a",
        "10.213.250.11",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    let port = json!([{"port": 80, "protocol": "TCP"}]);

    api.create(
        &PostParams::default(),
        &lb_service("mine", &cloud.class, port.clone(), json!({})),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &lb_service("theirs", "example.com/other", port.clone(), json!({})),
    )
    .await
    .unwrap();
    let mut classless = lb_service("classless", &cloud.class, port.clone(), json!({}));
    classless.spec.as_mut().unwrap().load_balancer_class = None;
    api.create(&PostParams::default(), &classless)
        .await
        .unwrap();
    let bad = lb_service(
        "bad",
        &cloud.class,
        port.clone(),
        json!({"service.beta.kubernetes.io/aws-load-balancer-scheme": "public",
               "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "1"}),
    );
    api.create(&PostParams::default(), &bad).await.unwrap();

    eventually("mine gets a hostname", WAIT, || hostname(&api, "mine")).await;

    // The invalid one: Warning Event naming the annotation, condition False, no cloud change.
    let msg = eventually("a Warning event for bad", WAIT, || async {
        let out = warning_notes(rig, &ns.name, "bad");
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(
        msg.contains("aws-load-balancer-scheme") && msg.contains("public"),
        "{msg}"
    );
    assert!(
        msg.contains("aws-load-balancer-healthcheck-interval"),
        "{msg}"
    );
    let bad_now = api.get("bad").await.unwrap();
    let cond = bad_now
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == "cloudlb.io/LoadBalancerSynced")
        })
        .cloned();
    let cond = cond.expect("condition set");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "InvalidAnnotation")
    );
    assert!(hostname(&api, "bad").await.is_none());

    // A huge multi-byte value: the condition and the Event are cut to their byte limits
    // (32 KiB and 1 KiB), so they are written at all, instead of failing every retry.
    let huge_value = "ä".repeat(20_000);
    let huge = lb_service(
        "huge",
        &cloud.class,
        port.clone(),
        json!({"service.beta.kubernetes.io/aws-load-balancer-scheme": huge_value}),
    );
    api.create(&PostParams::default(), &huge).await.unwrap();
    let cond = eventually("a condition on huge", WAIT, || async {
        let s = api.get("huge").await.ok()?;
        s.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "cloudlb.io/LoadBalancerSynced")
    })
    .await;
    assert_eq!(cond.reason, "InvalidAnnotation");
    assert!(
        cond.message.len() <= 32_768 && cond.message.contains("ää"),
        "{} bytes",
        cond.message.len()
    );
    let note = eventually("a Warning event for huge", WAIT, || async {
        let out = warning_notes(rig, &ns.name, "huge");
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(note.trim_end().len() <= 1024, "{} bytes", note.len());
    eprintln!(
        "huge annotation value: {} bytes; condition message {} bytes, Event note {} bytes",
        huge_value.len(),
        cond.message.len(),
        note.trim_end().len()
    );

    // Others are never touched: no finalizer, no status.
    for other in ["theirs", "classless"] {
        let s = api.get(other).await.unwrap();
        assert!(
            s.metadata.finalizers.unwrap_or_default().is_empty(),
            "{other} got a finalizer"
        );
        assert!(
            hostname(&api, other).await.is_none(),
            "{other} got a hostname"
        );
    }
    let inv = cloud.inventory().await;
    let services: BTreeSet<String> = inv
        .iter()
        .map(|(_, _, t)| t["cloudlb.io/service"].clone())
        .collect();
    assert_eq!(
        services,
        [format!("{}/mine", ns.name)].into(),
        "only mine has cloud resources"
    );

    // Fixing the annotation converges.
    api.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing",
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": null}}})),
    )
    .await
    .unwrap();
    eventually("bad gets a hostname once fixed", WAIT, || {
        hostname(&api, "bad")
    })
    .await;

    // Type change away from LoadBalancer → teardown, finalizer and hostname gone.
    api.patch("mine", &PatchParams::default(), &Patch::Merge(json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null,
        "externalTrafficPolicy": null, "allocateLoadBalancerNodePorts": null, "ports": [{"port": 80, "protocol": "TCP", "nodePort": null}]}})))
        .await
        .unwrap();
    eventually("mine torn down", WAIT, || async {
        let s = api.get("mine").await.ok()?;
        let gone = s.metadata.finalizers.unwrap_or_default().is_empty()
            && !cloud
                .inventory()
                .await
                .iter()
                .any(|(_, _, t)| t["cloudlb.io/service"] == format!("{}/mine", ns.name));
        gone.then_some(())
    })
    .await;
    assert!(hostname(&api, "mine").await.is_none());
    drop(controller);
}

#[tokio::test]
async fn external_traffic_policy_local_health_check_and_foreign_name_collision() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "etp").await;
    let cloud = TestCloud::new(rig, "etp").await;
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "etp-a",
        "10.213.250.21",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;

    // A foreign NLB (no tags of ours) already holds the name the "clash" Service asks for.
    let foreign = cloud
        .elb
        .create_load_balancer()
        .name(format!("{}-x", &cloud.cluster))
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .subnets(&cloud.subnet_id)
        .send()
        .await
        .unwrap();
    let foreign_arn = foreign.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();

    // The clash needs a chosen name, which only allowed namespaces may set.
    let _controller = ControllerProc::start(rig, &cloud, &["--custom-name-namespaces", &ns.name]);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    let mut local = lb_service(
        "local",
        &cloud.class,
        json!([{"port": 80, "protocol": "TCP"}]),
        json!({}),
    );
    local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    api.create(&PostParams::default(), &local).await.unwrap();
    let clash = lb_service(
        "clash",
        &cloud.class,
        json!([{"port": 80, "protocol": "TCP"}]),
        json!({"service.beta.kubernetes.io/aws-load-balancer-name": format!("{}-x", &cloud.cluster)}),
    );
    api.create(&PostParams::default(), &clash).await.unwrap();

    eventually("local gets a hostname", WAIT, || hostname(&api, "local")).await;
    let svc = api.get("local").await.unwrap();
    let hc_port = svc
        .spec
        .as_ref()
        .unwrap()
        .health_check_node_port
        .expect("healthCheckNodePort allocated");
    let inv = cloud.inventory().await;
    let tg_arn = inv
        .iter()
        .find(|(a, _, t)| {
            a.contains(":targetgroup/") && t["cloudlb.io/service"].ends_with("/local")
        })
        .unwrap()
        .0
        .clone();
    let tg = cloud.target_group(&tg_arn).await;
    assert_eq!(tg.health_check_protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(tg.health_check_port(), Some(hc_port.to_string().as_str()));
    assert_eq!(tg.health_check_path(), Some("/healthz"));
    assert_eq!(
        (
            tg.health_check_interval_seconds(),
            tg.health_check_timeout_seconds()
        ),
        (Some(10), Some(6))
    );
    assert_eq!(
        (tg.healthy_threshold_count(), tg.unhealthy_threshold_count()),
        (Some(2), Some(2))
    );

    // The clash: a Warning naming the foreign resource; the foreign NLB untouched.
    let msg = eventually("a Warning event for clash", WAIT, || async {
        let out = warning_notes(rig, &ns.name, "clash");
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(msg.contains("not owned"), "{msg}");
    let still = cloud
        .elb
        .describe_load_balancers()
        .load_balancer_arns(&foreign_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(still.load_balancers().len(), 1);
    let tags = cloud
        .elb
        .describe_tags()
        .resource_arns(&foreign_arn)
        .send()
        .await
        .unwrap();
    assert!(
        tags.tag_descriptions()[0].tags().is_empty(),
        "foreign NLB was tagged"
    );
    assert!(
        cloud.listeners(&foreign_arn).await.is_empty(),
        "foreign NLB got listeners"
    );

    // Deleting the clashing Service must not delete the foreign NLB either.
    api.delete("clash", &DeleteParams::default()).await.unwrap();
    eventually("clash gone", WAIT, || async {
        api.get_opt("clash").await.unwrap().is_none().then_some(())
    })
    .await;
    let still = cloud
        .elb
        .describe_load_balancers()
        .load_balancer_arns(&foreign_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(still.load_balancers().len(), 1, "the foreign NLB survives");
    cloud
        .elb
        .delete_load_balancer()
        .load_balancer_arn(&foreign_arn)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn plan_prints_the_changes_and_changes_nothing() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "plan").await;
    let cloud = TestCloud::new(rig, "plan").await;
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "plan-a",
        "10.213.250.31",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    api.create(
        &PostParams::default(),
        &lb_service(
            "web",
            &cloud.class,
            json!([{"port": 80, "protocol": "TCP"}]),
            json!({}),
        ),
    )
    .await
    .unwrap();
    let plan = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlb"))
            .args([
                "plan",
                "--cluster-name",
                &cloud.cluster,
                "--load-balancer-class",
                &cloud.class,
                "-n",
                &ns.name,
            ])
            .args([
                "--node-selector",
                &format!("cloudlb.io/test-cluster={}", cloud.cluster),
            ])
            .envs(rig.process_env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = plan();
    let key = format!("{}/web", ns.name);
    for want in [
        "CreateTargetGroup",
        "RegisterTargets",
        "CreateSecurityGroup",
        "CreateLoadBalancer",
        "CreateListener",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&key) && l.contains(want)),
            "{want} missing in:\n{text}"
        );
    }
    assert!(
        text.contains(&i1),
        "the node's instance is in the plan:\n{text}"
    );
    assert!(text.trim_end().ends_with("5 change(s)"), "{text}");
    assert_eq!(
        cloud.inventory().await,
        vec![],
        "plan must not create anything"
    );
    assert!(
        api.get("web").await.unwrap().metadata.finalizers.is_none(),
        "plan must not touch the Service"
    );

    // After the controller applied it, the plan is empty.
    let _controller = ControllerProc::start(rig, &cloud, &[]);
    eventually("hostname", WAIT, || hostname(&api, "web")).await;
    let text = plan();
    assert!(
        text.contains(&format!("{key}: up to date")) && text.trim_end().ends_with("0 change(s)"),
        "{text}"
    );
}

/// What a teardown leaves when `DeleteTargetGroup` stays `ResourceInUse` past its retries after
/// the load balancer went: a target group tagged for the Service, attached to nothing, of a
/// Service that is ClusterIP by now (so it models no target group names). The next teardown
/// attempt finds it by its tags, deletes it, and only then lets the finalizer go.
#[tokio::test]
async fn teardown_finds_a_left_target_group_by_its_tags() {
    use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Tag};
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "tdtag").await;
    let cloud = TestCloud::new(rig, "tdtag").await;
    let finalizer = cloudlb::controller::finalizer_for(&cloud.class);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "finalizers": [finalizer]},
        "spec": {"type": "ClusterIP", "selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))
    .unwrap();
    let svc = api.create(&PostParams::default(), &svc).await.unwrap();
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let left = cloud
        .elb
        .create_target_group()
        .name(format!(
            "{}left",
            cloudlb::model::name_prefix(&ns.name, "web")
        ))
        .protocol(ProtocolEnum::Tcp)
        .port(30080)
        .vpc_id(&cloud.vpc_id)
        .tags(tag("cloudlb.io/cluster", &cloud.cluster))
        .tags(tag("cloudlb.io/load-balancer-class", &cloud.class))
        .tags(tag("cloudlb.io/service", &format!("{}/web", ns.name)))
        .tags(tag(
            "cloudlb.io/service-uid",
            svc.metadata.uid.as_deref().unwrap(),
        ))
        .tags(tag("cloudlb.io/resource", "targetgroup"))
        .send()
        .await
        .expect("target group")
        .target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    assert_eq!(cloud.inventory().await.len(), 1);

    let _controller = ControllerProc::start(rig, &cloud, &[]);
    eventually("the finalizer goes", WAIT, || async {
        let s = api.get("web").await.ok()?;
        s.metadata
            .finalizers
            .unwrap_or_default()
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(
        cloud.inventory().await,
        vec![],
        "the left group {left} is deleted"
    );
}
