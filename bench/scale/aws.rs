//! AWS queries of one run, straight to LocalStack (not through the counting proxy, so they are
//! not counted against the controller): everything is scoped to the run's own VPC, which only
//! that run's controller uses, so it never touches another engineer's resources.

use aws_sdk_ec2::types::Filter;
use aws_sdk_elasticloadbalancingv2::types::TargetHealthStateEnum;
use futures::StreamExt;

use crate::support::cloud::TestCloud;

/// ARNs of the target groups in the run's VPC.
pub async fn target_groups(cloud: &TestCloud) -> Vec<String> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let Ok(page) = cloud
            .elb
            .describe_target_groups()
            .set_marker(marker.take())
            .send()
            .await
        else {
            break;
        };
        out.extend(
            page.target_groups()
                .iter()
                .filter(|t| t.vpc_id() == Some(cloud.vpc_id.as_str()))
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
        marker = page.next_marker().map(str::to_string);
        if marker.is_none() {
            break;
        }
    }
    out
}

/// ARNs of the load balancers in the run's VPC.
pub async fn load_balancers(cloud: &TestCloud) -> Vec<String> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let Ok(page) = cloud
            .elb
            .describe_load_balancers()
            .set_marker(marker.take())
            .send()
            .await
        else {
            break;
        };
        out.extend(
            page.load_balancers()
                .iter()
                .filter(|l| l.vpc_id() == Some(cloud.vpc_id.as_str()))
                .filter_map(|l| l.load_balancer_arn().map(str::to_string)),
        );
        marker = page.next_marker().map(str::to_string);
        if marker.is_none() {
            break;
        }
    }
    out
}

/// How many of `groups` disagree with "`instance` is a target" == `present` (a draining target
/// counts as gone; a failed describe counts as disagreeing). Eight describes in flight.
pub async fn disagreeing(
    cloud: &TestCloud,
    groups: &[String],
    instance: &str,
    present: bool,
) -> usize {
    futures::stream::iter(groups)
        .map(|tg| async move {
            let Ok(health) = cloud
                .elb
                .describe_target_health()
                .target_group_arn(tg)
                .send()
                .await
            else {
                return true;
            };
            let has = health.target_health_descriptions().iter().any(|d| {
                d.target().and_then(|t| t.id()) == Some(instance)
                    && d.target_health().and_then(|h| h.state())
                        != Some(&TargetHealthStateEnum::Draining)
            });
            has != present
        })
        .buffer_unordered(8)
        .filter(|wrong| std::future::ready(*wrong))
        .count()
        .await
}

/// Removes whatever is left in the run's VPC (load balancers, target groups, security groups and
/// their rules), the run's instances, its subnet and the VPC. Best effort: errors are ignored,
/// because this runs after the figures and a leftover is reported by the delete phase already.
pub async fn cleanup(cloud: &TestCloud, instances: &[String]) {
    for lb in load_balancers(cloud).await {
        let _ = cloud
            .elb
            .delete_load_balancer()
            .load_balancer_arn(lb)
            .send()
            .await;
    }
    for tg in target_groups(cloud).await {
        let _ = cloud
            .elb
            .delete_target_group()
            .target_group_arn(tg)
            .send()
            .await;
    }
    let vpc = Filter::builder()
        .name("vpc-id")
        .values(&cloud.vpc_id)
        .build();
    let groups = cloud
        .ec2
        .describe_security_groups()
        .filters(vpc)
        .send()
        .await
        .map(|r| r.security_groups().to_vec())
        .unwrap_or_default();
    // Rules first: LBC's backend group is referenced from the nodes' group.
    for g in groups.iter().filter(|g| !g.ip_permissions().is_empty()) {
        let _ = cloud
            .ec2
            .revoke_security_group_ingress()
            .set_group_id(g.group_id().map(str::to_string))
            .set_ip_permissions(Some(g.ip_permissions().to_vec()))
            .send()
            .await;
    }
    for g in groups.iter().filter(|g| g.group_name() != Some("default")) {
        let _ = cloud
            .ec2
            .delete_security_group()
            .set_group_id(g.group_id().map(str::to_string))
            .send()
            .await;
    }
    let _ = cloud
        .ec2
        .terminate_instances()
        .set_instance_ids(Some(instances.to_vec()))
        .send()
        .await;
    let _ = cloud
        .ec2
        .delete_subnet()
        .subnet_id(&cloud.subnet_id)
        .send()
        .await;
    let _ = cloud.ec2.delete_vpc().vpc_id(&cloud.vpc_id).send().await;
}
