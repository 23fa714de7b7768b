//! The account-wide inventory of this cluster's resources, for the orphan sweep, and deleting
//! one of them.

use std::collections::BTreeMap;

use aws_sdk_ec2 as ec2;

use super::apply::*;
use super::client::*;
use super::convert::*;
use crate::cloud::plan::Change;
use crate::cloud::{CloudError, ResourceKind, TaggedResource};
use crate::model::tags;

impl AwsCloud {
    /// Every load balancer and target group in the account tagged with our cluster, with tags.
    /// Lists the whole account: for the periodic orphan sweep and tests only.
    pub async fn inventory(&self) -> Result<Vec<TaggedResource>, CloudError> {
        let mut arns: Vec<(String, String)> = Vec::new();
        let mut attached: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut marker: Option<String> = None;
        loop {
            let m = marker.clone();
            let out = self
                .call(ops::DESCRIBE_LOAD_BALANCERS, || {
                    self.elb
                        .describe_load_balancers()
                        .set_marker(m.clone())
                        .send()
                })
                .await?;
            arns.extend(out.load_balancers().iter().filter_map(|l| {
                Some((
                    l.load_balancer_arn()?.to_string(),
                    l.load_balancer_name()?.to_string(),
                ))
            }));
            marker = out.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        loop {
            let m = marker.clone();
            let out = self
                .call(ops::DESCRIBE_TARGET_GROUPS, || {
                    self.elb
                        .describe_target_groups()
                        .set_marker(m.clone())
                        .send()
                })
                .await?;
            for t in out.target_groups() {
                let (Some(arn), Some(name)) = (t.target_group_arn(), t.target_group_name()) else {
                    continue;
                };
                arns.push((arn.to_string(), name.to_string()));
                attached.insert(arn.to_string(), t.load_balancer_arns().to_vec());
            }
            marker = out.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        let only_arns: Vec<String> = arns.iter().map(|(a, _)| a.clone()).collect();
        let mut tags = self.tags_of_existing(&only_arns).await?;
        let mut found: Vec<TaggedResource> = arns
            .into_iter()
            .filter_map(|(arn, name)| {
                let t = tags.remove(&arn)?;
                (t.get(tags::CLUSTER) == Some(&self.owner.cluster)).then(|| TaggedResource {
                    load_balancer_arns: attached.remove(&arn).unwrap_or_default(),
                    arn,
                    name,
                    tags: t,
                })
            })
            .collect();
        // Managed security groups: EC2 filters by tag on the server side.
        let filter = ec2::types::Filter::builder()
            .name(format!("tag:{}", tags::CLUSTER))
            .values(&self.owner.cluster)
            .build();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let out = self
                .call(ops::DESCRIBE_SECURITY_GROUPS, || {
                    self.ec2
                        .describe_security_groups()
                        .filters(filter.clone())
                        .set_next_token(t.clone())
                        .send()
                })
                .await?;
            found.extend(out.security_groups().iter().filter_map(|g| {
                Some(TaggedResource {
                    arn: g.group_id()?.to_string(),
                    name: g.group_name().unwrap_or_default().to_string(),
                    tags: g
                        .tags()
                        .iter()
                        .map(|t| (t.key(), t.value()))
                        .collect::<KeyValues>()
                        .0,
                    load_balancer_arns: Vec::new(),
                })
            }));
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(found)
    }

    /// Like [`tags_of`](Self::tags_of) for a listing that may be stale: resources deleted
    /// since (by a reconcile running meanwhile) are left out instead of failing the batch.
    pub(super) async fn tags_of_existing(
        &self,
        arns: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, CloudError> {
        let gone = ["LoadBalancerNotFound", "TargetGroupNotFound"];
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(20) {
            match self.tags_of(chunk).await {
                Ok(t) => out.extend(t),
                Err(e) if not_found(&e, &gone) => {
                    for arn in chunk {
                        match self.tags_of(std::slice::from_ref(arn)).await {
                            Ok(t) => out.extend(t),
                            Err(e) if not_found(&e, &gone) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Deletes one resource found by [`inventory`](Self::inventory).
    pub async fn delete_resource(&self, r: &TaggedResource) -> Result<(), CloudError> {
        let (arn, name) = (r.arn.clone(), r.name.clone());
        let change = match r.kind() {
            ResourceKind::SecurityGroup => Change::DeleteSecurityGroup { id: arn, name },
            ResourceKind::TargetGroup => Change::DeleteTargetGroup { arn, name },
            ResourceKind::LoadBalancer => Change::DeleteLoadBalancer { arn, name },
        };
        self.apply(&change, None, &mut ApplyState::default()).await
    }
}
