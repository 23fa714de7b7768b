//! Tenant safety on the real rig (issue 13, cloud ownership): each attack a namespace user can
//! make with a Service or a TargetGroupBinding is tried with a tenant's own credentials, and is
//! refused with a Warning Event naming the reason, while the foreign or shared resource stays
//! byte-for-byte as it was (a full describe before and after) and the tenant's own objects keep
//! working. `cargo test --test tenants -- --nocapture` prints one `ATTACK` line per attack.

use cloudlb_testkit as support;

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Tag, TargetDescription, TargetTypeEnum};
use cloudlb::crd::{ConditionStatus, TargetGroupBinding};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud};
use support::{Rig, TestNamespace, TestNode, events, eventually, tenant_client, unique};

const WAIT: Duration = Duration::from_secs(30);

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// A target group someone else made (Terraform, another cluster), with `tags`, and `foreign`
/// targets registered in it; returns its ARN.
async fn foreign_group(
    cloud: &TestCloud,
    suffix: &str,
    tags: &[(String, String)],
    foreign: &[(&str, i32)],
) -> String {
    let mut req = cloud
        .elb
        .create_target_group()
        .name(format!("{}-{suffix}", cloud.cluster))
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .vpc_id(&cloud.vpc_id)
        .target_type(TargetTypeEnum::Instance);
    for (k, v) in tags {
        req = req.tags(tag(k, v));
    }
    let arn = req
        .send()
        .await
        .expect("create target group")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string();
    if !foreign.is_empty() {
        let targets: Vec<TargetDescription> = foreign
            .iter()
            .map(|(id, port)| TargetDescription::builder().id(*id).port(*port).build())
            .collect();
        cloud
            .elb
            .register_targets()
            .target_group_arn(&arn)
            .set_targets(Some(targets))
            .send()
            .await
            .expect("register foreign targets");
    }
    arn
}

fn binding(cloud: &TestCloud, name: &str, arn: &str, service: &str) -> TargetGroupBinding {
    serde_json::from_value(json!({
        "apiVersion": "cloudlb.io/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": name, "labels": {"cloudlb.io/test-cluster": cloud.cluster}},
        "spec": {"targetGroupARN": arn, "serviceRef": {"name": service, "port": 80}},
    }))
    .expect("binding")
}

fn node_port_service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .expect("service")
}

/// The Ready condition's (status, reason, message) once it has `reason`.
async fn ready_with(
    api: &Api<TargetGroupBinding>,
    name: &str,
    reason: &str,
) -> (ConditionStatus, String) {
    eventually(
        &format!("binding {name} Ready reason {reason}"),
        WAIT,
        || async {
            let c = api
                .get_opt(name)
                .await
                .ok()??
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.reason == reason).then_some((c.status, c.message))
        },
    )
    .await
}

/// The note of the Warning Event with `reason` on object `name` (waits for it).
async fn warning(rig: &Rig, ns: &str, name: &str, kind: &str, reason: &str) -> String {
    eventually(&format!("Warning {reason} on {name}"), WAIT, || async {
        events(rig, ns, name, Some(kind))
            .into_iter()
            .find(|(t, r, _)| t == "Warning" && r == reason)
            .map(|(_, _, note)| note)
    })
    .await
}

fn attack(tried: &str, got: &str, unchanged: &str) {
    eprintln!("ATTACK tried: {tried}\n       got: {got}\n       unchanged: {unchanged}");
}

#[tokio::test]
async fn bindings_only_touch_groups_tagged_for_the_cluster_and_only_their_own_targets() {
    let rig = Rig::get();
    rig.install_crds();
    let ns = TestNamespace::new(rig, "tnb").await;
    let other_ns = TestNamespace::new(rig, "tnb2").await;
    let cloud = TestCloud::new(rig, "tnb").await;
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let (i1, i2, foreign_node) = (
        cloud.instance(None).await,
        cloud.instance(None).await,
        cloud.instance(None).await,
    );
    let n1 = TestNode::new(
        rig,
        "tnb-a",
        "10.213.254.1",
        Some(&TestCloud::provider_id(&i1)),
        labels.clone(),
    )
    .await;
    let n2 = TestNode::new(
        rig,
        "tnb-b",
        "10.213.254.2",
        Some(&TestCloud::provider_id(&i2)),
        labels.clone(),
    )
    .await;
    let mut controller = ControllerProc::start(rig, &cloud, &[]);

    // The tenants, with their own credentials: Services and bindings in their namespace only.
    let tenant = tenant_client(rig, &ns.name).await;
    let other_tenant = tenant_client(rig, &other_ns.name).await;
    let svcs: Api<Service> = Api::namespaced(tenant.clone(), &ns.name);
    let svc = svcs
        .create(&PostParams::default(), &node_port_service("web"))
        .await
        .expect("tenant creates a Service");
    let np = svc.spec.unwrap().ports.unwrap()[0]
        .node_port
        .expect("nodePort");
    Api::<Service>::namespaced(other_tenant.clone(), &other_ns.name)
        .create(&PostParams::default(), &node_port_service("web"))
        .await
        .expect("the other tenant creates a Service");
    let bindings: Api<TargetGroupBinding> = Api::namespaced(tenant.clone(), &ns.name);
    let other_bindings: Api<TargetGroupBinding> = Api::namespaced(other_tenant, &other_ns.name);

    let other_cluster = unique("elsewhere");
    let allow = |c: &str| (format!("cloudlb.io/allow-binding/{c}"), "true".to_string());
    let untagged = foreign_group(&cloud, "untagged", &[], &[(&foreign_node, 30999)]).await;
    let theirs = foreign_group(
        &cloud,
        "theirs",
        &[("cloudlb.io/cluster".into(), other_cluster.clone())],
        &[(&foreign_node, 30999)],
    )
    .await;
    // Shared with another cluster (LBC's multi-cluster mode): its node is registered already.
    let shared = foreign_group(
        &cloud,
        "shared",
        &[allow(&cloud.cluster), allow(&other_cluster)],
        &[(&foreign_node, 30999)],
    )
    .await;
    let shared_as_left = cloud.snapshot_target_group(&shared).await;

    // 1, 2: bind a group nobody tagged for this cluster, or one tagged for another cluster.
    for (name, arn, what) in [
        ("grab-untagged", &untagged, "an untagged target group"),
        ("grab-theirs", &theirs, "another cluster's target group"),
    ] {
        let before = cloud.snapshot_target_group(arn).await;
        bindings
            .create(&PostParams::default(), &binding(&cloud, name, arn, "web"))
            .await
            .expect("tenant creates a binding");
        let (st, _) = ready_with(&bindings, name, "TargetGroupNotAllowed").await;
        assert_eq!(st, ConditionStatus::False);
        let note = warning(
            rig,
            &ns.name,
            name,
            "TargetGroupBinding",
            "TargetGroupNotAllowed",
        )
        .await;
        assert!(note.contains("is not tagged for this cluster"), "{note}");
        assert_eq!(
            cloud.snapshot_target_group(arn).await,
            before,
            "{what} changed"
        );
        bindings
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
        eventually("refused binding gone", WAIT, || async {
            bindings.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
        assert_eq!(
            cloud.snapshot_target_group(arn).await,
            before,
            "{what} changed on delete"
        );
        attack(
            &format!("a TargetGroupBinding on {what} (which has a foreign target)"),
            &format!("Ready=False TargetGroupNotAllowed, Warning: {note}"),
            "that group's describe (attributes, tags, health check, target health), also after the binding was deleted",
        );
    }

    // The legitimate use: the shared group gets this cluster's nodes, the other cluster's stays.
    bindings
        .create(
            &PostParams::default(),
            &binding(&cloud, "web", &shared, "web"),
        )
        .await
        .expect("tenant binds the shared group");
    let want = |ids: &[&str]| -> std::collections::BTreeSet<(String, i32)> {
        ids.iter()
            .map(|id| (id.to_string(), np))
            .chain([(foreign_node.clone(), 30999)])
            .collect()
    };
    eventually(
        "this cluster's nodes registered beside the other's",
        WAIT,
        || async { (cloud.targets(&shared).await == want(&[&i1, &i2])).then_some(()) },
    )
    .await;

    // 3: a second binding on the same ARN, from another tenant.
    let before = cloud.snapshot_target_group(&shared).await;
    other_bindings
        .create(
            &PostParams::default(),
            &binding(&cloud, "steal", &shared, "web"),
        )
        .await
        .expect("other tenant creates a binding");
    let (st, message) = ready_with(&other_bindings, "steal", "Conflict").await;
    assert_eq!(st, ConditionStatus::False);
    assert!(message.contains(&format!("{}/web", ns.name)), "{message}");
    let note = warning(
        rig,
        &other_ns.name,
        "steal",
        "TargetGroupBinding",
        "Conflict",
    )
    .await;
    assert_eq!(cloud.snapshot_target_group(&shared).await, before);
    other_bindings
        .delete("steal", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("conflicting binding gone", WAIT, || async {
        other_bindings
            .get_opt("steal")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(cloud.snapshot_target_group(&shared).await, before);
    attack(
        "a second TargetGroupBinding (another namespace) on a target group already bound, then deleting it",
        &format!("Ready=False Conflict, Warning: {note}"),
        "the shared group's describe, while it existed and after its deletion",
    );

    // The binding remembers what it registered across a controller restart: a node that goes
    // is taken out, the other cluster's target is not.
    controller.kill();
    let controller = ControllerProc::start(rig, &cloud, &[]);
    rig.kubectl(&["delete", "node", &n2.name]);
    eventually(
        "the deleted node's target deregistered, the other cluster's kept",
        WAIT,
        || async { (cloud.targets(&shared).await == want(&[&i1])).then_some(()) },
    )
    .await;

    // Deleting the binding takes out only its own targets: the group is back as its owner left it.
    bindings
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("binding gone", WAIT, || async {
        bindings.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(cloud.snapshot_target_group(&shared).await, shared_as_left);
    attack(
        "(shared use) bind a group shared with another cluster, restart the controller, remove a node, delete the binding",
        "this cluster's targets registered and deregistered; the other cluster's target never touched",
        "the shared group's describe after the binding's deletion equals the one before it was created",
    );

    drop((controller, n1));
    for arn in [&untagged, &theirs, &shared] {
        cloud
            .elb
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
            .expect("delete tg");
    }
}

/// A LoadBalancer Service of class `class` in `ns`.
fn load_balancer_service(name: &str, class: &str, annotations: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .expect("service")
}

async fn hostname(api: &Api<Service>, name: &str) -> String {
    eventually(&format!("{name} has a hostname"), WAIT, || {
        support::service_hostname(api, name)
    })
    .await
}

/// A target group tagged as cloudlb tags one, for Service `service` (gone), of `class` (none:
/// made before class tags); returns its ARN.
async fn orphan_group(
    cloud: &TestCloud,
    suffix: &str,
    service: &str,
    class: Option<&str>,
) -> String {
    let mut tags = vec![
        ("cloudlb.io/cluster".to_string(), cloud.cluster.clone()),
        ("cloudlb.io/service".to_string(), service.to_string()),
        ("cloudlb.io/resource".to_string(), "targetgroup".to_string()),
    ];
    if let Some(c) = class {
        tags.push(("cloudlb.io/load-balancer-class".to_string(), c.to_string()));
    }
    foreign_group(cloud, suffix, &tags, &[]).await
}

/// Everything of the cluster in the account: each load balancer and target group with its
/// tags, each target group's full describe, each managed security group with its rules.
async fn cluster_snapshot(cloud: &TestCloud, skip: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (arn, name, tags) in cloud.inventory().await {
        if skip.contains(&arn.as_str()) {
            continue;
        }
        out.push(format!("{arn} {name} {tags:?}"));
        if arn.contains(":targetgroup/") {
            out.push(cloud.snapshot_target_group(&arn).await);
        }
    }
    for (id, rules) in cloud.security_groups().await {
        out.push(format!("{id} {rules:?}"));
    }
    out.sort();
    out
}

#[tokio::test]
async fn two_installations_of_one_cluster_never_sweep_each_others_resources() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "tsw").await;
    let cloud = TestCloud::new(rig, "tsw").await;
    let (class_a, class_b) = (cloud.class.clone(), format!("{}-b", cloud.class));
    let instance = cloud.instance(None).await;
    let _node = TestNode::new(
        rig,
        "tsw-a",
        "10.213.254.11",
        Some(&TestCloud::provider_id(&instance)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let sweep = [
        "--orphan-sweep",
        "--orphan-sweep-interval-seconds",
        "1",
        "--orphan-grace-seconds",
        "2",
    ];
    let a = ControllerProc::start_class(rig, &cloud, &class_a, &sweep, &[]);
    let b = ControllerProc::start_class(rig, &cloud, &class_b, &sweep, &[]);
    let svcs: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    for (name, class) in [("web-a", &class_a), ("web-b", &class_b)] {
        svcs.create(
            &PostParams::default(),
            &load_balancer_service(name, class, json!({})),
        )
        .await
        .expect("create Service");
    }
    hostname(&svcs, "web-a").await;
    hostname(&svcs, "web-b").await;
    for (class, name) in [(&class_a, "web-a"), (&class_b, "web-b")] {
        let tagged = cloud.inventory().await.into_iter().filter(|(_, _, t)| {
            t.get("cloudlb.io/service") == Some(&format!("{}/{name}", ns.name))
        });
        for (arn, _, t) in tagged {
            assert_eq!(
                t.get("cloudlb.io/load-balancer-class"),
                Some(class),
                "{arn}"
            );
        }
    }
    // A resource made before class tags, for a Service that is gone: nobody may judge it.
    let legacy = orphan_group(&cloud, "legacy", &format!("{}/gone", ns.name), None).await;
    let before = cluster_snapshot(&cloud, &[]).await;

    // One real orphan per class, so each sweep provably ran past its grace period.
    let gone_a = orphan_group(
        &cloud,
        "gone-a",
        &format!("{}/gone-a", ns.name),
        Some(&class_a),
    )
    .await;
    let gone_b = orphan_group(
        &cloud,
        "gone-b",
        &format!("{}/gone-b", ns.name),
        Some(&class_b),
    )
    .await;
    eventually("each installation swept its own orphan", WAIT, || async {
        let arns: Vec<String> = cloud
            .inventory()
            .await
            .into_iter()
            .map(|(a, _, _)| a)
            .collect();
        (!arns.contains(&gone_a) && !arns.contains(&gone_b)).then_some(())
    })
    .await;
    let after = cluster_snapshot(&cloud, &[]).await;
    assert_eq!(
        after, before,
        "a sweep deleted or changed something that was not its own orphan"
    );
    assert_eq!(
        (
            a.metric("cloudlb_orphans_deleted_total"),
            b.metric("cloudlb_orphans_deleted_total")
        ),
        (1.0, 1.0),
        "each sweep deleted exactly its own orphan"
    );
    attack(
        "(two installations) classes A and B with one --cluster-name, each with a live Service, sweeps every 1 s with a 2 s grace",
        "each sweep deleted only the orphan of its own class (cloudlb_orphans_deleted_total 1 and 1)",
        &format!(
            "both Services' NLBs, target groups (full describe) and security groups, and a target group without a class tag: {} items",
            before.len()
        ),
    );

    for name in ["web-a", "web-b"] {
        svcs.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    eventually("both Services torn down", WAIT, || async {
        (cloud.inventory().await.iter().all(|(a, _, _)| *a == legacy)
            && cloud.security_groups().await.is_empty())
        .then_some(())
    })
    .await;
    cloud
        .elb
        .delete_target_group()
        .target_group_arn(&legacy)
        .send()
        .await
        .expect("delete legacy");
    drop((a, b));
}

/// (reason, message) of the Service's `cloudlb.io/LoadBalancerSynced` condition once its reason
/// is `reason`.
async fn synced_condition(api: &Api<Service>, name: &str, reason: &str) -> String {
    eventually(
        &format!("{name}: LoadBalancerSynced reason {reason}"),
        WAIT,
        || async {
            let c = api
                .get(name)
                .await
                .ok()?
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "cloudlb.io/LoadBalancerSynced")?;
            (c.reason == reason && c.status == "False").then_some(c.message)
        },
    )
    .await
}

/// A security group in `vpc` made by someone else; returns its id.
async fn foreign_security_group(cloud: &TestCloud, vpc: &str, suffix: &str) -> String {
    cloud
        .ec2
        .create_security_group()
        .group_name(format!("{}-{suffix}", cloud.cluster))
        .description("not cloudlb's")
        .vpc_id(vpc)
        .send()
        .await
        .expect("create security group")
        .group_id()
        .expect("id")
        .to_string()
}

#[tokio::test]
async fn service_annotations_cannot_reach_outside_what_the_admin_allows() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "tns").await;
    let team_a = TestNamespace::new(rig, "tnsteam").await;
    let team_b = TestNamespace::new(rig, "tnsteam").await;
    let cloud = TestCloud::new(rig, "tns").await;
    let instance = cloud.instance(None).await;
    let _node = TestNode::new(
        rig,
        "tns-a",
        "10.213.254.21",
        Some(&TestCloud::provider_id(&instance)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    // Another VPC in the account (another team's), with an internet-facing subnet and a group.
    let other_vpc = cloud
        .ec2
        .create_vpc()
        .cidr_block("10.213.0.0/16")
        .send()
        .await
        .expect("vpc")
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("vpc id")
        .to_string();
    let other_subnet = cloud
        .ec2
        .create_subnet()
        .vpc_id(&other_vpc)
        .cidr_block("10.213.0.0/16")
        .availability_zone("us-east-1a")
        .send()
        .await
        .expect("subnet")
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet id")
        .to_string();
    let victim_sg = foreign_security_group(&cloud, &cloud.vpc_id, "victim").await;
    let allowed_sg = foreign_security_group(&cloud, &cloud.vpc_id, "allowed").await;
    let misplaced_sg = foreign_security_group(&cloud, &other_vpc, "misplaced").await;
    let allowed_sgs = format!("{allowed_sg},{misplaced_sg}");
    // Groups allowed by tag instead of id: one carries the tag the admin allows, one another
    // team's value of it.
    let share_tag = "cloudlb-test-share";
    let shared_sg = foreign_security_group(&cloud, &cloud.vpc_id, "bytag").await;
    let wrong_tag_sg = foreign_security_group(&cloud, &cloud.vpc_id, "wrongtag").await;
    for (sg, value) in [
        (&shared_sg, cloud.cluster.as_str()),
        (&wrong_tag_sg, "someone-else"),
    ] {
        cloud
            .ec2
            .create_tags()
            .resources(sg)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(share_tag)
                    .value(value)
                    .build(),
            )
            .send()
            .await
            .expect("tag security group");
    }
    let allowed_tags = format!("{share_tag}={}", cloud.cluster);
    let _controller = ControllerProc::start(
        rig,
        &cloud,
        &[
            "--allowed-security-groups",
            &allowed_sgs,
            "--allowed-security-group-tags",
            &allowed_tags,
            "--allowed-certificates",
            "arn:aws:acm:us-east-1:000000000000:certificate/team-*",
            "--custom-name-namespaces",
            &format!("{},{}", team_a.name, team_b.name),
        ],
    );
    let tenant = tenant_client(rig, &ns.name).await;
    let svcs: Api<Service> = Api::namespaced(tenant.clone(), &ns.name);
    let ann = |k: &str, v: &str| json!({ format!("service.beta.kubernetes.io/aws-load-balancer-{k}"): v });

    struct Attack {
        service: &'static str,
        annotations: serde_json::Value,
        reason: &'static str,
        says: String,
        tried: String,
        resource: String,
    }
    let attacks = [
        Attack {
            service: "grab-sg",
            annotations: ann("security-groups", &victim_sg),
            reason: "NotAllowed",
            says: "not in the controller's allowed security groups".into(),
            tried: format!(
                "attach someone else's security group {victim_sg} (same VPC, not allowlisted)"
            ),
            resource: victim_sg.clone(),
        },
        Attack {
            service: "wrong-tag-sg",
            annotations: ann("security-groups", &wrong_tag_sg),
            reason: "NotAllowed",
            says: format!(
                "carry none of its allowed tags (--allowed-security-group-tags {allowed_tags})"
            ),
            tried: format!(
                "attach security group {wrong_tag_sg}, tagged {share_tag}=someone-else, not the allowed {allowed_tags}"
            ),
            resource: wrong_tag_sg.clone(),
        },
        Attack {
            service: "far-sg",
            annotations: ann("security-groups", &misplaced_sg),
            reason: "OutsideClusterVpc",
            says: format!("outside the cluster's VPC {}", cloud.vpc_id),
            tried: format!(
                "attach allowlisted security group {misplaced_sg}, which is in another VPC"
            ),
            resource: misplaced_sg.clone(),
        },
        Attack {
            service: "far-subnet",
            annotations: json!({
                "service.beta.kubernetes.io/aws-load-balancer-subnets": other_subnet,
                "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing",
            }),
            reason: "OutsideClusterVpc",
            says: format!("outside the cluster's VPC {}", cloud.vpc_id),
            tried: format!("place an internet-facing NLB in another VPC's subnet {other_subnet}"),
            resource: other_subnet.clone(),
        },
        Attack {
            service: "grab-cert",
            annotations: ann(
                "ssl-cert",
                "arn:aws:acm:us-east-1:000000000000:certificate/payments-prod",
            ),
            reason: "NotAllowed",
            says: "is not an allowed certificate".into(),
            tried: "terminate TLS with another team's ACM certificate".into(),
            resource: String::new(),
        },
        Attack {
            service: "squat",
            annotations: ann("name", "payments-prod"),
            reason: "NotAllowed",
            says: format!("Services in namespace {} may not choose", ns.name),
            tried: "choose a load balancer name (payments-prod) from a namespace not allowed to"
                .into(),
            resource: String::new(),
        },
    ];
    let mut before = Vec::new();
    for a in &attacks {
        before.push(match a.resource.as_str() {
            r if r.starts_with("sg-") => cloud.snapshot_security_group(r).await,
            r if r.starts_with("subnet-") => cloud.snapshot_subnet(r).await,
            _ => String::new(),
        });
    }
    let inventory_before = cluster_snapshot(&cloud, &[]).await;
    for a in &attacks {
        let svc = load_balancer_service(a.service, &cloud.class, a.annotations.clone());
        svcs.create(&PostParams::default(), &svc)
            .await
            .expect("tenant creates a Service");
    }
    // The tenant's own plain Service works meanwhile.
    svcs.create(
        &PostParams::default(),
        &load_balancer_service("own", &cloud.class, json!({})),
    )
    .await
    .expect("tenant creates a Service");
    for (a, before) in attacks.iter().zip(&before) {
        let message = synced_condition(&svcs, a.service, a.reason).await;
        assert!(message.contains(&a.says), "{}: {message}", a.service);
        let note = warning(
            rig,
            &ns.name,
            a.service,
            "Service",
            "SyncLoadBalancerFailed",
        )
        .await;
        assert!(
            note.starts_with(a.reason) && note.contains(&a.says),
            "{}: {note}",
            a.service
        );
        let after = match a.resource.as_str() {
            r if r.starts_with("sg-") => cloud.snapshot_security_group(r).await,
            r if r.starts_with("subnet-") => cloud.snapshot_subnet(r).await,
            _ => String::new(),
        };
        assert_eq!(&after, before, "{}: {} changed", a.service, a.resource);
        let unchanged = if a.resource.is_empty() {
            "no AWS resource created for it (inventory)".to_string()
        } else {
            format!(
                "{} (full describe), no AWS resource created for it",
                a.resource
            )
        };
        attack(
            &a.tried,
            &format!("Warning SyncLoadBalancerFailed: {note}"),
            &unchanged,
        );
    }
    hostname(&svcs, "own").await;
    // A group the admin allows by tag is attached.
    svcs.create(
        &PostParams::default(),
        &load_balancer_service(
            "tagged-sg",
            &cloud.class,
            ann("security-groups", &shared_sg),
        ),
    )
    .await
    .expect("tenant creates a Service");
    let tagged_host = hostname(&svcs, "tagged-sg").await;
    let tagged_lb = cloud
        .load_balancer(
            &cloudlb::controller::service::name_from_hostname(&tagged_host).expect("lb name"),
        )
        .await
        .expect("the tagged-sg Service's NLB");
    assert_eq!(
        tagged_lb.security_groups(),
        std::slice::from_ref(&shared_sg)
    );
    println!(
        "allowed by tag: security group {shared_sg} ({share_tag}={}) attached",
        cloud.cluster
    );
    let own = format!("{}/own", ns.name);
    let tagged = format!("{}/tagged-sg", ns.name);
    let created: Vec<String> = cluster_snapshot(&cloud, &[])
        .await
        .into_iter()
        .filter(|l| !inventory_before.contains(l) && !l.contains(&own) && !l.contains(&tagged))
        .filter(|l| l.contains("cloudlb.io/service"))
        .collect();
    assert!(
        created.is_empty(),
        "only the tenant's own Services (own, tagged-sg) got resources: {created:?}"
    );

    // A name taken by an older Service of another (allowed) namespace.
    let holder_api: Api<Service> =
        Api::namespaced(tenant_client(rig, &team_a.name).await, &team_a.name);
    let late_api: Api<Service> =
        Api::namespaced(tenant_client(rig, &team_b.name).await, &team_b.name);
    let name = format!("{}-shared", cloud.cluster);
    holder_api
        .create(
            &PostParams::default(),
            &load_balancer_service("web", &cloud.class, ann("name", &name)),
        )
        .await
        .expect("create");
    hostname(&holder_api, "web").await;
    let lb = cloud.load_balancer(&name).await.expect("holder's NLB");
    let lb_arn = lb.load_balancer_arn().expect("arn").to_string();
    let lb_before = cloud.snapshot_load_balancer(&lb_arn).await;
    late_api
        .create(
            &PostParams::default(),
            &load_balancer_service("web", &cloud.class, ann("name", &name)),
        )
        .await
        .expect("create");
    let message = synced_condition(&late_api, "web", "NameConflict").await;
    assert!(
        message.contains(&format!("already used by Service {}/web", team_a.name)),
        "{message}"
    );
    let late_note = warning(
        rig,
        &team_b.name,
        "web",
        "Service",
        "SyncLoadBalancerFailed",
    )
    .await;
    let holder_note = warning(
        rig,
        &team_a.name,
        "web",
        "Service",
        "LoadBalancerNameConflict",
    )
    .await;
    assert!(
        holder_note.contains(&format!("Service {}/web also asks", team_b.name)),
        "{holder_note}"
    );
    assert_eq!(cloud.snapshot_load_balancer(&lb_arn).await, lb_before);
    attack(
        &format!(
            "take load balancer name {name}, which an older Service of another namespace holds"
        ),
        &format!(
            "Warning SyncLoadBalancerFailed: {late_note} — and on the holder, Warning LoadBalancerNameConflict: {holder_note}"
        ),
        "the holder's NLB (describe, attributes, tags, listeners)",
    );

    for (api, names) in [
        (
            &svcs,
            vec![
                "grab-sg",
                "wrong-tag-sg",
                "far-sg",
                "far-subnet",
                "grab-cert",
                "squat",
                "own",
                "tagged-sg",
            ],
        ),
        (&late_api, vec!["web"]),
        (&holder_api, vec!["web"]),
    ] {
        for n in names {
            api.delete(n, &DeleteParams::default())
                .await
                .expect("delete");
        }
    }
    eventually("every Service torn down", WAIT, || async {
        (cloud.inventory().await.is_empty() && cloud.security_groups().await.is_empty())
            .then_some(())
    })
    .await;
    for sg in [
        &victim_sg,
        &allowed_sg,
        &misplaced_sg,
        &shared_sg,
        &wrong_tag_sg,
    ] {
        cloud
            .ec2
            .delete_security_group()
            .group_id(sg)
            .send()
            .await
            .expect("delete sg");
    }
}
