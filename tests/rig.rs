//! The foundation: every part of the rig is real and answers (issue 2).

use cloudlb_testkit as support;

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{
    Action, ActionTypeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag, TargetDescription,
};
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use support::{NetNs, Rig, TestNamespace, TestNode, eventually, unique};

#[tokio::test]
async fn apiserver_answers_version() {
    let rig = Rig::get();
    let info = rig
        .client()
        .await
        .apiserver_version()
        .await
        .expect("/version");
    assert_eq!(info.major, "1");
    assert_eq!(info.minor, "36", "rig runs Kubernetes 1.36, got {info:?}");
    assert!(
        info.git_version.starts_with("v1.36."),
        "{}",
        info.git_version
    );
}

#[tokio::test]
async fn rbac_denies_a_service_account_what_it_was_not_granted() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "rbac").await;
    let sas: Api<ServiceAccount> = Api::namespaced(rig.client().await, &ns.name);
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "nobody"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let token = rig.kubectl(&["create", "token", "nobody", "-n", &ns.name]);

    let client = rig.client_with_token(token.trim()).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "expected Forbidden, got {s:?}"),
        other => panic!("listing secrets without a grant must be forbidden, got {other:?}"),
    }
    // The same token is a valid identity: the self-subject review names it.
    let who = rig.kubectl(&[
        "auth",
        "whoami",
        "--token",
        token.trim(),
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, format!("system:serviceaccount:{}:nobody", ns.name));
}

#[tokio::test]
async fn ready_pods_get_an_endpointslice_from_the_controller_manager() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "eps").await;
    let client = rig.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();

    let node = TestNode::new(rig, "eps-node", "10.213.200.1", None, serde_json::json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for (name, ip) in [("web-a", "10.213.200.11"), ("web-b", "10.213.200.12")] {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 8080}]}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    let slices: Api<EndpointSlice> = Api::namespaced(client, &ns.name);
    let mut addrs = eventually(
        "an EndpointSlice with both pod IPs",
        Duration::from_secs(20),
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let addrs: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.clone())
                .collect();
            (addrs.len() == 2).then_some(addrs)
        },
    )
    .await;
    addrs.sort();
    assert_eq!(addrs, vec!["10.213.200.11", "10.213.200.12"]);
}

#[tokio::test]
async fn aws_sdk_drives_elbv2_on_localstack() {
    let rig = Rig::get();
    let conf = rig.aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let elb = elbv2::Client::new(&conf);
    let prefix = unique("rig");

    let vpc = ec2
        .create_vpc()
        .cidr_block("10.213.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.213.0.0/20")
        .availability_zone("us-east-1a")
        .send()
        .await
        .unwrap();
    let subnet_id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .unwrap()
        .to_string();
    let run = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(2)
        .max_count(2)
        .subnet_id(&subnet_id)
        .send()
        .await
        .unwrap();
    let instances: Vec<String> = run
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    assert_eq!(instances.len(), 2);

    let tg = elb
        .create_target_group()
        .name(format!("{prefix}-tg"))
        .protocol(ProtocolEnum::Tcp)
        .port(30080)
        .vpc_id(&vpc_id)
        .tags(Tag::builder().key("cloudlb.io/test").value(&prefix).build())
        .send()
        .await
        .unwrap();
    let tg_arn = tg.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    let lb = elb
        .create_load_balancer()
        .name(format!("{prefix}-lb"))
        .r#type(LoadBalancerTypeEnum::Network)
        .subnets(&subnet_id)
        .tags(Tag::builder().key("cloudlb.io/test").value(&prefix).build())
        .send()
        .await
        .unwrap();
    let lb0 = &lb.load_balancers()[0];
    let lb_arn = lb0.load_balancer_arn().unwrap().to_string();
    assert!(lb0.dns_name().unwrap().contains(&format!("{prefix}-lb")));
    elb.create_listener()
        .load_balancer_arn(&lb_arn)
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&tg_arn)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut reg = elb.register_targets().target_group_arn(&tg_arn);
    for id in &instances {
        reg = reg.targets(TargetDescription::builder().id(id).port(30080).build());
    }
    reg.send().await.unwrap();

    let health = elb
        .describe_target_health()
        .target_group_arn(&tg_arn)
        .send()
        .await
        .unwrap();
    let mut registered: Vec<String> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target().and_then(|t| t.id()).map(str::to_string))
        .collect();
    registered.sort();
    let mut want = instances.clone();
    want.sort();
    assert_eq!(registered, want);
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(&lb_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listeners.listeners().len(), 1);
    assert_eq!(listeners.listeners()[0].port(), Some(80));

    let tags = elb
        .describe_tags()
        .resource_arns(&lb_arn)
        .resource_arns(&tg_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(tags.tag_descriptions().len(), 2);
    for d in tags.tag_descriptions() {
        assert!(
            d.tags()
                .iter()
                .any(|t| t.key() == Some("cloudlb.io/test") && t.value() == Some(prefix.as_str())),
            "{d:?}"
        );
    }

    elb.delete_load_balancer()
        .load_balancer_arn(&lb_arn)
        .send()
        .await
        .unwrap();
    elb.delete_target_group()
        .target_group_arn(&tg_arn)
        .send()
        .await
        .unwrap();
    ec2.terminate_instances()
        .set_instance_ids(Some(instances))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn tcp_crosses_from_one_network_namespace_to_another() {
    let _rig = Rig::get();
    let mut server = NetNs::new("srv");
    let client = NetNs::new("cli");
    let mut cmd = server.command("socat");
    cmd.args([
        "TCP-LISTEN:7000,reuseaddr,fork",
        "SYSTEM:echo hello-from-$(hostname -I | cut -d' ' -f1)",
    ]);
    server.spawn(cmd);

    let want = format!("hello-from-{}", server.ip);
    let got = eventually(
        "a reply across namespaces",
        Duration::from_secs(10),
        || async {
            let out = client
                .command("socat")
                .args([
                    "-T2",
                    "-",
                    &format!("TCP:{}:7000,connect-timeout=1", server.ip),
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!text.is_empty()).then_some(text)
        },
    )
    .await;
    assert_eq!(got, want);
}
