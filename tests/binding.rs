//! TargetGroupBindings on the real rig (issue 5): a target group made outside cloudlb follows a
//! Service port's nodes (instance) or ready pods (ip), and is left without our targets, but
//! otherwise untouched, when the binding goes.

use cloudlb_testkit as support;

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Tag, TargetTypeEnum};
use cloudlb::crd::{ConditionStatus, TargetGroupBinding};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud, is_write};
use support::{Rig, TestNamespace, TestNode, event_reasons, eventually};

const WAIT: Duration = Duration::from_secs(30);
const FINALIZER: &str = "cloudlb.io/targetgroupbinding-cleanup";

/// A target group made directly in LocalStack, as Terraform would, tagged to let the test's
/// cluster bind it (`cloudlb.io/allow-binding/<cluster>=true`); returns its ARN.
async fn target_group(cloud: &TestCloud, suffix: &str, kind: TargetTypeEnum, port: i32) -> String {
    let out = cloud
        .elb
        .create_target_group()
        .name(format!("{}-{suffix}", cloud.cluster))
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .vpc_id(&cloud.vpc_id)
        .target_type(kind)
        .tags(
            Tag::builder()
                .key(format!("cloudlb.io/allow-binding/{}", cloud.cluster))
                .value("true")
                .build(),
        )
        .send()
        .await
        .expect("create target group");
    out.target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string()
}

fn binding(cloud: &TestCloud, name: &str, spec: serde_json::Value) -> TargetGroupBinding {
    serde_json::from_value(json!({
        "apiVersion": "cloudlb.io/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": name, "labels": {"cloudlb.io/test-cluster": cloud.cluster}},
        "spec": spec,
    }))
    .expect("binding")
}

fn service(name: &str, type_: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": type_, "selector": {"app": name}, "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .expect("service")
}

fn node_port(svc: &Service) -> i32 {
    svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .expect("nodePort allocated")
}

fn set(items: &[(&str, i32)]) -> BTreeSet<(String, i32)> {
    items.iter().map(|(id, p)| (id.to_string(), *p)).collect()
}

/// (status, reason, message) of the Ready condition.
async fn ready(
    api: &Api<TargetGroupBinding>,
    name: &str,
) -> Option<(ConditionStatus, String, String)> {
    let b = api.get_opt(name).await.ok()??;
    let c = b
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

async fn target_group_exists(cloud: &TestCloud, arn: &str) -> bool {
    cloud
        .elb
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
        .is_ok_and(|o| o.target_groups().len() == 1)
}

#[tokio::test]
async fn instance_binding_follows_nodes_and_cleans_up_on_delete() {
    let rig = Rig::get();
    rig.install_crds();
    let ns = TestNamespace::new(rig, "tgb").await;
    let cloud = TestCloud::new(rig, "tgb").await;
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let (i1, i2, i3) = (
        cloud.instance(None).await,
        cloud.instance(None).await,
        cloud.instance(None).await,
    );
    let n1 = TestNode::new(
        rig,
        "tgb-a",
        "10.213.251.1",
        Some(&TestCloud::provider_id(&i1)),
        labels.clone(),
    )
    .await;
    let n2 = TestNode::new(
        rig,
        "tgb-b",
        "10.213.251.2",
        Some(&TestCloud::provider_id(&i2)),
        labels.clone(),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let client = rig.client().await;

    // A NodePort Service and a target group cloudlb did not make.
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc = svcs
        .create(&PostParams::default(), &service("web", "NodePort"))
        .await
        .unwrap();
    let np = node_port(&svc);
    let tg = target_group(&cloud, "tg", TargetTypeEnum::Instance, 80).await;

    let api: Api<TargetGroupBinding> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &binding(
            &cloud,
            "web",
            json!({"targetGroupARN": tg, "serviceRef": {"name": "web", "port": 80}}),
        ),
    )
    .await
    .unwrap();

    // Both nodes registered at the nodePort; finalizer, status, Ready True.
    eventually("both nodes registered at the nodePort", WAIT, || async {
        (cloud.targets(&tg).await == set(&[(&i1, np), (&i2, np)])).then_some(())
    })
    .await;
    let b = eventually("status with two targets", WAIT, || async {
        let b = api.get("web").await.ok()?;
        (b.status.as_ref()?.registered_targets == Some(2)).then_some(b)
    })
    .await;
    assert!(
        b.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&FINALIZER.to_string())
    );
    let status = b.status.unwrap();
    assert_eq!(status.observed_generation, b.metadata.generation);
    let (st, reason, _) = ready(&api, "web").await.expect("Ready condition");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "TargetsRegistered")
    );

    // kubectl prints the columns with the count and Ready.
    let table = rig.kubectl(&["get", "targetgroupbindings", "-n", &ns.name]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SERVICE", "PORT", "TYPE", "TARGETS", "READY", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["web", "web", "80", "instance", "2", "True"],
        "{table}"
    );

    // Nothing changed → no AWS write, and not even a target read. (Other AWS reads may happen:
    // every controller on the shared rig also looks at Services carrying the cleanup finalizer.)
    let target_reads = |c: &ControllerProc| c.aws_calls(|op| op == "DescribeTargetHealth");
    let (writes, reads) = (controller.aws_calls(is_write), target_reads(&controller));
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touched": "1"}}})),
    )
    .await
    .unwrap();
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touched": "1"}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (controller.aws_calls(is_write), target_reads(&controller)),
        (writes, reads),
        "a no-op reconcile must neither write nor read targets"
    );

    // A node joins → registered.
    let n3 = TestNode::new(
        rig,
        "tgb-c",
        "10.213.251.3",
        Some(&TestCloud::provider_id(&i3)),
        labels.clone(),
    )
    .await;
    eventually("joined node registered", WAIT, || async {
        (cloud.targets(&tg).await == set(&[(&i1, np), (&i2, np), (&i3, np)])).then_some(())
    })
    .await;

    // NotReady → deregistered; a node that leaves → deregistered.
    n3.set_ready(false, "10.213.251.3").await;
    eventually("NotReady node deregistered", WAIT, || async {
        (cloud.targets(&tg).await == set(&[(&i1, np), (&i2, np)])).then_some(())
    })
    .await;
    rig.kubectl(&["delete", "node", &n2.name]);
    eventually("deleted node deregistered", WAIT, || async {
        (cloud.targets(&tg).await == set(&[(&i1, np)])).then_some(())
    })
    .await;
    eventually("status follows", WAIT, || async {
        let b = api.get("web").await.ok()?;
        (b.status?.registered_targets == Some(1)).then_some(())
    })
    .await;
    let reasons = event_reasons(rig, &ns.name, "web", Some("TargetGroupBinding"));
    for want in ["RegisteredTargets", "DeregisteredTargets"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "missing {want} in {reasons:?}"
        );
    }
    let describe = rig.kubectl(&["describe", "targetgroupbinding", "web", "-n", &ns.name]);
    assert!(describe.contains("RegisteredTargets"), "{describe}");

    // Binding deleted → its targets deregistered, finalizer gone, the group itself untouched.
    api.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("binding gone", WAIT, || async {
        api.get_opt("web").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(cloud.targets(&tg).await, set(&[]));
    assert!(
        target_group_exists(&cloud, &tg).await,
        "the target group itself stays"
    );
    let tags = cloud
        .elb
        .describe_tags()
        .resource_arns(&tg)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = tags.tag_descriptions()[0]
        .tags()
        .iter()
        .filter_map(|t| t.key())
        .collect();
    assert_eq!(
        keys,
        [format!("cloudlb.io/allow-binding/{}", cloud.cluster)],
        "cloudlb never tags a bound group"
    );
    assert_eq!(cloud.inventory().await, vec![], "cloudlb created nothing");
    let writes = controller.aws_calls(is_write);
    let per_op = |op: &str| controller.aws_calls(|o| o == op);
    assert_eq!(
        writes,
        per_op("RegisterTargets") + per_op("DeregisterTargets"),
        "only target registrations are written"
    );
    drop((n1, n3));
    cloud
        .elb
        .delete_target_group()
        .target_group_arn(&tg)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn ip_binding_registers_ready_pod_ips() {
    let rig = Rig::get();
    rig.install_crds();
    let ns = TestNamespace::new(rig, "tgbip").await;
    let cloud = TestCloud::new(rig, "tgbip").await;
    // The pods' node: no providerID, so it is never an instance target; not labelled either.
    let node = TestNode::new(rig, "tgbip-n", "10.213.252.1", None, json!({})).await;
    let _controller = ControllerProc::start(rig, &cloud, &[]);
    let client = rig.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    svcs.create(&PostParams::default(), &service("api", "ClusterIP"))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let set_pod_ready = |name: &'static str, ip: &'static str, ready: bool| {
        let pods = pods.clone();
        async move {
            let status = json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]
            }});
            pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    };
    for (name, ip) in [("api-a", "10.213.252.11"), ("api-b", "10.213.252.12")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "api"}},
            "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 8080}]}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        set_pod_ready(name, ip, true).await;
    }
    let tg = target_group(&cloud, "ip", TargetTypeEnum::Ip, 8080).await;
    let api: Api<TargetGroupBinding> = Api::namespaced(client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &binding(
            &cloud,
            "api",
            json!({"targetGroupARN": tg, "targetType": "ip", "serviceRef": {"name": "api", "port": "http"}}),
        ),
    )
    .await
    .unwrap();

    eventually(
        "ready pod IPs registered at the target port",
        WAIT,
        || async {
            (cloud.targets(&tg).await == set(&[("10.213.252.11", 8080), ("10.213.252.12", 8080)]))
                .then_some(())
        },
    )
    .await;
    set_pod_ready("api-b", "10.213.252.12", false).await;
    eventually(
        "the pod that is no longer ready is deregistered",
        WAIT,
        || async { (cloud.targets(&tg).await == set(&[("10.213.252.11", 8080)])).then_some(()) },
    )
    .await;
    let table = rig.kubectl(&["get", "tgb", "api", "-n", &ns.name, "--no-headers"]);
    let row: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["api", "api", "http", "ip", "1", "True"],
        "{table}"
    );

    api.delete("api", &DeleteParams::default()).await.unwrap();
    eventually("binding gone", WAIT, || async {
        api.get_opt("api").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(cloud.targets(&tg).await, set(&[]));
    assert!(target_group_exists(&cloud, &tg).await);
    cloud
        .elb
        .delete_target_group()
        .target_group_arn(&tg)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn binding_reports_what_is_wrong_and_changes_nothing() {
    let rig = Rig::get();
    rig.install_crds();
    let ns = TestNamespace::new(rig, "tgbbad").await;
    let cloud = TestCloud::new(rig, "tgbbad").await;
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "tgbbad-a",
        "10.213.253.1",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let client = rig.client().await;
    let api: Api<TargetGroupBinding> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let instance_tg = target_group(&cloud, "inst", TargetTypeEnum::Instance, 80).await;
    // One binding per target group: each case gets its own.
    let other_instance_tg = target_group(&cloud, "inst2", TargetTypeEnum::Instance, 80).await;
    let ip_tg = target_group(&cloud, "ip", TargetTypeEnum::Ip, 80).await;
    let missing_tg = format!(
        "arn:aws:elasticloadbalancing:us-east-1:000000000000:targetgroup/{}-none/0123456789abcdef",
        cloud.cluster
    );

    let cases = [
        (
            "no-svc",
            json!({"targetGroupARN": instance_tg, "serviceRef": {"name": "later", "port": 80}}),
            "ServiceNotFound",
            "does not exist",
        ),
        (
            "no-port",
            json!({"targetGroupARN": other_instance_tg, "serviceRef": {"name": "web", "port": 443}}),
            "PortNotFound",
            "has no port 443",
        ),
        (
            "no-tg",
            json!({"targetGroupARN": missing_tg, "serviceRef": {"name": "web", "port": 80}}),
            "TargetGroupNotFound",
            "does not exist",
        ),
        (
            "wrong-type",
            json!({"targetGroupARN": ip_tg, "serviceRef": {"name": "web", "port": 80}}),
            "TargetTypeMismatch",
            "takes ip targets",
        ),
    ];
    svcs.create(&PostParams::default(), &service("web", "NodePort"))
        .await
        .unwrap();
    for (name, spec, _, _) in &cases {
        api.create(&PostParams::default(), &binding(&cloud, name, spec.clone()))
            .await
            .unwrap();
    }
    for (name, _, reason, message) in &cases {
        let (st, r, m) = eventually(&format!("{name} Ready False"), WAIT, || async {
            ready(&api, name)
                .await
                .filter(|c| c.0 == ConditionStatus::False)
        })
        .await;
        assert_eq!(
            (st, r.as_str()),
            (ConditionStatus::False, *reason),
            "{name}: {m}"
        );
        assert!(m.contains(message), "{name}: {m}");
        let reasons = event_reasons(rig, &ns.name, name, Some("TargetGroupBinding"));
        assert!(
            reasons.iter().any(|r| r == reason),
            "{name}: a Warning Event, got {reasons:?}"
        );
    }
    assert!(cloud.targets(&instance_tg).await.is_empty());
    assert!(cloud.targets(&other_instance_tg).await.is_empty());
    assert!(cloud.targets(&ip_tg).await.is_empty());
    assert_eq!(
        controller.aws_calls(is_write),
        0.0,
        "nothing written while inputs are wrong"
    );

    // The missing Service appears → Ready True, targets registered.
    let later = svcs
        .create(&PostParams::default(), &service("later", "NodePort"))
        .await
        .unwrap();
    let np = node_port(&later);
    eventually("no-svc recovers", WAIT, || async {
        ready(&api, "no-svc")
            .await
            .filter(|c| c.0 == ConditionStatus::True)
    })
    .await;
    assert_eq!(cloud.targets(&instance_tg).await, set(&[(&i1, np)]));

    // Bindings that never synced leave the group alone when deleted, and all go quickly.
    for (name, _, _, _) in &cases {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("every binding gone", WAIT, || async {
        let mut all_gone = true;
        for (name, _, _, _) in &cases {
            all_gone &= api.get_opt(name).await.unwrap().is_none();
        }
        all_gone.then_some(())
    })
    .await;
    assert!(cloud.targets(&instance_tg).await.is_empty());
    for tg in [&instance_tg, &other_instance_tg, &ip_tg] {
        cloud
            .elb
            .delete_target_group()
            .target_group_arn(tg)
            .send()
            .await
            .unwrap();
    }
}
