//! LBC's Service annotations on the real rig (kube-apiserver + LocalStack), through the
//! controller as a process (issue 14 items 1, 3, 4; issue 13 item 5): what they set in AWS,
//! what is refused without touching the cloud, IPv6 ranges, and ip target groups that keep
//! their port (and identity) as pods come and go.

use cloudlb_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud};
use support::{Rig, TestNamespace, TestNode, eventually, lb_service, service_hostname as hostname};

const WAIT: Duration = Duration::from_secs(30);
const A: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// (reason, note) of the Warning Events recorded for a Service.
fn warnings(rig: &Rig, ns: &str, name: &str) -> Vec<(String, String)> {
    let out = rig.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "--field-selector",
        &format!("regarding.name={name},type=Warning"),
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\t\"}{.note}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(r, n)| (r.to_string(), n.to_string()))
        .collect()
}

async fn lb_of(cloud: &TestCloud, api: &Api<Service>, name: &str) -> (String, String) {
    let host = eventually(&format!("{name} gets a hostname"), WAIT, || {
        hostname(api, name)
    })
    .await;
    let lb_name = cloudlb::controller::service::name_from_hostname(&host).expect("lb name");
    let lb = cloud.load_balancer(&lb_name).await.expect("load balancer");
    (lb.load_balancer_arn().unwrap().to_string(), lb_name)
}

async fn lb_attributes(cloud: &TestCloud, arn: &str) -> BTreeMap<String, String> {
    let out = cloud
        .elb
        .describe_load_balancer_attributes()
        .load_balancer_arn(arn)
        .send()
        .await
        .expect("lb attributes");
    out.attributes()
        .iter()
        .map(|a| {
            (
                a.key().unwrap_or_default().to_string(),
                a.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn tg_attributes(cloud: &TestCloud, arn: &str) -> BTreeMap<String, String> {
    let out = cloud
        .elb
        .describe_target_group_attributes()
        .target_group_arn(arn)
        .send()
        .await
        .expect("tg attributes");
    out.attributes()
        .iter()
        .map(|a| {
            (
                a.key().unwrap_or_default().to_string(),
                a.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn tags(cloud: &TestCloud, arn: &str) -> BTreeMap<String, String> {
    let out = cloud
        .elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .expect("tags");
    out.tag_descriptions()
        .iter()
        .flat_map(|d| d.tags())
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The target group of a listener port.
async fn target_group_of(cloud: &TestCloud, lb_arn: &str, port: i32) -> String {
    cloud
        .listeners(lb_arn)
        .await
        .into_iter()
        .find(|(p, _, _)| *p == port)
        .map(|(_, _, tg)| tg)
        .expect("listener")
}

/// (port, IPv4 CIDRs, IPv6 CIDRs) of the managed group of this test's cluster for `service`.
async fn managed_group_ranges(
    cloud: &TestCloud,
    service: &str,
) -> Vec<(i32, BTreeSet<String>, BTreeSet<String>)> {
    let f = [
        Filter::builder()
            .name("tag:cloudlb.io/cluster")
            .values(&cloud.cluster)
            .build(),
        Filter::builder()
            .name("tag:cloudlb.io/service")
            .values(service)
            .build(),
    ];
    let out = cloud
        .ec2
        .describe_security_groups()
        .set_filters(Some(f.to_vec()))
        .send()
        .await
        .expect("security groups");
    let Some(g) = out.security_groups().first() else {
        return Vec::new();
    };
    let mut v: Vec<_> = g
        .ip_permissions()
        .iter()
        .map(|p| {
            (
                p.from_port().unwrap_or_default(),
                p.ip_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ip().map(str::to_string))
                    .collect(),
                p.ipv6_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ipv6().map(str::to_string))
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn condition(svc: &Service) -> Option<(String, String, String)> {
    let c = svc
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "cloudlb.io/LoadBalancerSynced")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn lbc_annotations_reach_aws_refused_ones_touch_nothing_and_protection_holds_teardown() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "ann").await;
    let cloud = TestCloud::new(rig, "ann").await;
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "ann-a",
        "10.213.252.41",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let api: Api<Service> = Api::namespaced(rig.client().await, &ns.name);
    let ports = json!([{"name": "http", "port": 80, "protocol": "TCP"},
                       {"name": "https", "port": 443, "protocol": "TCP"}]);
    let ann = json!({
        format!("{A}attributes"): "load_balancing.cross_zone.enabled=true,deletion_protection.enabled=true",
        format!("{A}access-log-enabled"): "false",
        format!("{A}target-group-attributes"): "deregistration_delay.timeout_seconds=30",
        format!("{A}target-group-attributes.443"): "deregistration_delay.timeout_seconds=5",
        format!("{A}proxy-protocol-per-target-group"): "443",
        format!("{A}additional-resource-tags"): "team=web,env=dev",
        format!("{A}internal"): "true",
        format!("{A}healthcheck-port"): "http",
        format!("{A}schema"): "internet-facing",
        "service.beta.kubernetes.io/load-balancer-source-ranges": "10.213.0.0/16,2001:DB8::/32",
    });
    api.create(
        &PostParams::default(),
        &lb_service("rich", &cloud.class, ports.clone(), ann),
    )
    .await
    .unwrap();
    let refused = lb_service(
        "refused",
        &cloud.class,
        ports.clone(),
        json!({format!("{A}minimum-load-balancer-capacity"): "CapacityUnits=3000"}),
    );
    api.create(&PostParams::default(), &refused).await.unwrap();

    let (lb_arn, _) = lb_of(&cloud, &api, "rich").await;
    let attrs = lb_attributes(&cloud, &lb_arn).await;
    assert_eq!(
        attrs["load_balancing.cross_zone.enabled"], "true",
        "{attrs:?}"
    );
    assert_eq!(attrs["deletion_protection.enabled"], "true", "{attrs:?}");
    assert_eq!(attrs["access_logs.s3.enabled"], "false", "{attrs:?}");
    let tg80 = target_group_of(&cloud, &lb_arn, 80).await;
    let tg443 = target_group_of(&cloud, &lb_arn, 443).await;
    let a80 = tg_attributes(&cloud, &tg80).await;
    let a443 = tg_attributes(&cloud, &tg443).await;
    assert_eq!(a80["deregistration_delay.timeout_seconds"], "30", "{a80:?}");
    assert_eq!(
        a443["deregistration_delay.timeout_seconds"], "5",
        "{a443:?}"
    );
    assert_eq!(a80["proxy_protocol_v2.enabled"], "false", "{a80:?}");
    assert_eq!(a443["proxy_protocol_v2.enabled"], "true", "{a443:?}");
    let tg = cloud.target_group(&tg80).await;
    let svc = api.get("rich").await.unwrap();
    let http_node_port = svc.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    assert_eq!(
        tg.health_check_port(),
        Some(http_node_port.to_string().as_str()),
        "named healthcheck-port → the http port's nodePort (instance targets)"
    );
    let lb_tags = tags(&cloud, &lb_arn).await;
    assert_eq!(
        (lb_tags.get("team"), lb_tags.get("env")),
        (Some(&"web".to_string()), Some(&"dev".to_string()))
    );
    assert_eq!(
        tags(&cloud, &tg80).await.get("team").map(String::as_str),
        Some("web")
    );
    let lb = cloud
        .load_balancer(
            &cloudlb::controller::service::name_from_hostname(
                &hostname(&api, "rich").await.unwrap(),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        lb.scheme().map(|s| s.as_str()),
        Some("internal"),
        "internal=true"
    );
    // Source ranges from the annotation: IPv4 as IpRanges, IPv6 (canonical) as Ipv6Ranges.
    let ranges = managed_group_ranges(&cloud, &format!("{}/rich", ns.name)).await;
    let v4: BTreeSet<String> = ["10.213.0.0/16".to_string()].into();
    let v6: BTreeSet<String> = ["2001:db8::/32".to_string()].into();
    assert_eq!(ranges, vec![(80, v4.clone(), v6.clone()), (443, v4, v6)]);

    // The typo and the deprecated name: Warning Events, and the Service synced anyway.
    let (_, w) = eventually("the annotation warning for rich", WAIT, || async {
        let w = warnings(rig, &ns.name, "rich");
        w.into_iter().find(|(r, _)| r == "AnnotationWarning")
    })
    .await;
    assert!(
        w.contains(&format!("annotation {A}schema is not one")) && w.contains("a typo?"),
        "{w}"
    );
    assert!(
        w.contains(&format!("annotation {A}internal is deprecated")),
        "{w}"
    );
    assert!(
        w.contains(&format!("annotation {A}access-log-enabled is deprecated")),
        "{w}"
    );

    // The refused annotation: Warning, condition False naming it, nothing in the cloud.
    let cond = eventually("refused gets its condition", WAIT, || async {
        condition(&api.get("refused").await.ok()?).filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(cond.1, "InvalidAnnotation");
    assert!(
        cond.2
            .contains(&format!("{A}minimum-load-balancer-capacity"))
            && cond.2.contains("is not supported"),
        "{cond:?}"
    );
    let w = warnings(rig, &ns.name, "refused");
    assert!(
        w.iter()
            .any(|(_, n)| n.contains("minimum-load-balancer-capacity")
                && n.contains("is not supported")),
        "{w:?}"
    );
    assert!(hostname(&api, "refused").await.is_none());
    let services: BTreeSet<String> = cloud
        .inventory()
        .await
        .iter()
        .map(|(_, _, t)| t["cloudlb.io/service"].clone())
        .collect();
    assert_eq!(
        services,
        [format!("{}/rich", ns.name)].into(),
        "refused touched nothing"
    );

    // A tag dropped from the annotation goes from AWS on the next sync.
    api.patch(
        "rich",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
            format!("{A}additional-resource-tags"): "team=web"}}})),
    )
    .await
    .unwrap();
    eventually(
        "env tag removed from the load balancer and target groups",
        WAIT,
        || async {
            let gone = !tags(&cloud, &lb_arn).await.contains_key("env")
                && !tags(&cloud, &tg80).await.contains_key("env");
            gone.then_some(())
        },
    )
    .await;
    assert_eq!(
        tags(&cloud, &lb_arn).await.get("team").map(String::as_str),
        Some("web")
    );

    // Deletion protection holds the teardown with a Warning; turning it off lets it through.
    api.delete("rich", &DeleteParams::default()).await.unwrap();
    let w = eventually("a DeletionProtected warning", WAIT, || async {
        let w = warnings(rig, &ns.name, "rich");
        w.into_iter().find(|(r, _)| r == "DeletionProtected")
    })
    .await;
    assert!(w.1.contains("deletion_protection.enabled=true"), "{w:?}");
    assert!(
        cloud
            .load_balancer(lb.load_balancer_name().unwrap())
            .await
            .is_some(),
        "the protected load balancer is still there"
    );
    assert!(
        api.get_opt("rich").await.unwrap().is_some(),
        "the finalizer holds"
    );
    api.patch(
        "rich",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
            format!("{A}attributes"): "deletion_protection.enabled=false"}}})),
    )
    .await
    .unwrap();
    eventually("rich torn down once protection is off", WAIT, || async {
        let gone = api.get_opt("rich").await.ok()?.is_none()
            && !cloud
                .inventory()
                .await
                .iter()
                .any(|(_, _, t)| t["cloudlb.io/service"] == format!("{}/rich", ns.name));
        gone.then_some(())
    })
    .await;
    drop(controller);
}

fn endpoint_slice(svc: &str, ips: &[&str], port: i32) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{svc}-test"), "labels": {
            "kubernetes.io/service-name": svc,
            "endpointslice.kubernetes.io/managed-by": "cloudlb-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

#[tokio::test]
async fn dualstack_opens_ipv6_and_ip_target_groups_keep_the_target_port_through_scaling() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "ann6").await;
    let cloud = TestCloud::new(rig, "ann6").await;
    // A node with an instance: the cluster's VPC is learned from it.
    let i1 = cloud.instance(None).await;
    let _n1 = TestNode::new(
        rig,
        "ann6-a",
        "10.213.252.42",
        Some(&TestCloud::provider_id(&i1)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let controller = ControllerProc::start(rig, &cloud, &[]);
    let client = rig.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let slices: Api<EndpointSlice> = Api::namespaced(client, &ns.name);

    // Dualstack, no source ranges: 0.0.0.0/0 as IpRanges and ::/0 as Ipv6Ranges.
    let dual = lb_service(
        "dual",
        &cloud.class,
        json!([{"port": 80, "protocol": "TCP"}]),
        json!({format!("{A}ip-address-type"): "dualstack"}),
    );
    api.create(&PostParams::default(), &dual).await.unwrap();
    lb_of(&cloud, &api, "dual").await;
    let ranges = managed_group_ranges(&cloud, &format!("{}/dual", ns.name)).await;
    assert_eq!(
        ranges,
        vec![(
            80,
            ["0.0.0.0/0".to_string()].into(),
            ["::/0".to_string()].into()
        )]
    );

    // An ip Service without a selector: its EndpointSlice stands for its pods.
    let ip = lb_service(
        "ipsvc",
        &cloud.class,
        json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]),
        json!({format!("{A}nlb-target-type"): "ip"}),
    );
    api.create(&PostParams::default(), &ip).await.unwrap();
    let (lb_arn, _) = lb_of(&cloud, &api, "ipsvc").await;
    let tg_arn = target_group_of(&cloud, &lb_arn, 80).await;
    assert_eq!(
        cloud.target_group(&tg_arn).await.port(),
        Some(8080),
        "no pods: port = targetPort"
    );
    assert!(cloud.targets(&tg_arn).await.is_empty());

    // 0 → 2 → 0 → 2 pods: the same target group throughout, targets follow.
    let two = ["10.213.253.1", "10.213.253.2"];
    slices
        .create(&PostParams::default(), &endpoint_slice("ipsvc", &two, 8080))
        .await
        .unwrap();
    let want_two: BTreeSet<(String, i32)> = two.iter().map(|a| (a.to_string(), 8080)).collect();
    eventually("2 targets", WAIT, || async {
        (cloud.targets(&tg_arn).await == want_two).then_some(())
    })
    .await;
    for (step, ips) in [("0 pods", &[][..]), ("2 pods again", &two[..])] {
        slices
            .replace("ipsvc-test", &PostParams::default(), &{
                let mut s = endpoint_slice("ipsvc", ips, 8080);
                s.metadata.resource_version = slices
                    .get("ipsvc-test")
                    .await
                    .unwrap()
                    .metadata
                    .resource_version;
                s
            })
            .await
            .unwrap();
        let want: BTreeSet<(String, i32)> = ips.iter().map(|a| (a.to_string(), 8080)).collect();
        eventually(step, WAIT, || async {
            (cloud.targets(&tg_arn).await == want).then_some(())
        })
        .await;
        assert_eq!(
            target_group_of(&cloud, &lb_arn, 80).await,
            tg_arn,
            "{step}: the target group was replaced"
        );
        assert_eq!(
            cloud.target_group(&tg_arn).await.port(),
            Some(8080),
            "{step}"
        );
    }
    let ipsvc_groups = cloud
        .inventory()
        .await
        .iter()
        .filter(|(arn, _, t)| {
            arn.contains(":targetgroup/") && t["cloudlb.io/service"] == format!("{}/ipsvc", ns.name)
        })
        .count();
    assert_eq!(ipsvc_groups, 1, "one target group ever");
    drop(controller);
}
