//! Observing one Service's stack by its deterministic names: load balancer (with attributes
//! and listeners), target groups (with health checks, attributes, targets), managed security
//! group. Ownership is confirmed by tags; a same-named resource that is not ours is reported,
//! never adopted.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2 as ec2;

use super::client::*;
use super::convert::*;
use crate::cloud::plan::{
    ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup, ObservedStack,
    ObservedTargetGroup,
};
use crate::cloud::{CloudError, StackQuery};
use crate::model::{IngressRule, IpAddressType, Protocol, Scheme, Target, tags};

impl AwsCloud {
    /// Reads everything the Service owns. Reads scale with the Service (its names), never with
    /// the account. A same-named resource that is not ours is reported, never adopted.
    pub async fn observe(&self, q: &StackQuery) -> Result<ObservedStack, CloudError> {
        // The security group is found by its own name: looked up while the rest is read.
        let (mut stack, security_group) = tokio::try_join!(
            self.observe_load_balancer_and_groups(q),
            self.find_security_group(&q.load_balancer_names, &q.service)
        )?;
        stack.security_group = security_group;
        Ok(stack)
    }

    /// The load balancer (with its listeners) and the target groups of a stack.
    async fn observe_load_balancer_and_groups(
        &self,
        q: &StackQuery,
    ) -> Result<ObservedStack, CloudError> {
        let mut stack = ObservedStack::default();
        let mut seen = BTreeSet::new();
        for name in &q.load_balancer_names {
            if !seen.insert(name.clone()) {
                continue;
            }
            let lb = match self
                .find_load_balancer(name, &q.service, q.identities_only)
                .await
            {
                Ok(Some((lb, duplicates))) => {
                    stack.duplicate_load_balancers.extend(duplicates);
                    lb
                }
                Ok(None) => continue,
                Err(CloudError::NotOwned { .. }) if q.skip_foreign => continue,
                Err(e) => return Err(e),
            };
            if stack.load_balancer.is_none() {
                stack.load_balancer = Some(lb);
            }
        }
        // The groups behind the load balancer's listeners: one call, full descriptions.
        let mut found = Vec::new();
        if let Some(lb) = &stack.load_balancer {
            let arn = lb.arn.clone();
            let res = self
                .call(ops::DESCRIBE_TARGET_GROUPS, || {
                    self.elb
                        .describe_target_groups()
                        .load_balancer_arn(&arn)
                        .send()
                })
                .await;
            match res {
                Ok(out) => found.extend(out.target_groups().to_vec()),
                // A load balancer without listeners (a crash right after CreateLoadBalancer):
                // LocalStack answers TargetGroupNotFound where AWS answers an empty list.
                Err(e) if not_found(&e, &["TargetGroupNotFound"]) => {}
                Err(e) => return Err(e),
            }
        }
        // Desired groups no listener points at yet, looked up by name, all at once (one name
        // per call: a batch of names fails whole when one of them does not exist).
        let missing: Vec<&String> = q
            .target_group_names
            .iter()
            .filter(|n| {
                !found
                    .iter()
                    .any(|t| t.target_group_name() == Some(n.as_str()))
            })
            .collect();
        let by_name = futures::future::try_join_all(missing.into_iter().map(|name| async move {
            let res = self
                .call(ops::DESCRIBE_TARGET_GROUPS, || {
                    self.elb.describe_target_groups().names(name).send()
                })
                .await;
            match res {
                Ok(out) => Ok(out.target_groups().to_vec()),
                Err(e) if not_found(&e, &["TargetGroupNotFound"]) => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        }))
        .await?;
        found.extend(by_name.into_iter().flatten());
        // The account is listed only when the load balancer is already gone (a teardown retried
        // after its groups' deletes failed): while it exists, its listeners name its groups, and
        // a teardown's reads stay per Service (a listing per delete made deleting N Services
        // O(N²) in AWS's answers).
        let listing = q
            .target_groups_by_tag
            .as_ref()
            .filter(|_| stack.load_balancer.is_none());
        if let Some(prefix) = listing {
            for tg in self.target_groups_named_like(prefix).await? {
                if !found
                    .iter()
                    .any(|t| t.target_group_arn() == tg.target_group_arn())
                {
                    found.push(tg);
                }
            }
        }
        let arns: Vec<String> = found
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string))
            .collect();
        // A listing may be stale (a group deleted meanwhile): then the vanished are skipped.
        let tag_map = match listing {
            Some(_) => self.tags_of_existing(&arns).await?,
            None => self.tags_of(&arns).await?,
        };
        let mut ours = Vec::new();
        for tg in found {
            let Some(arn) = tg.target_group_arn().map(str::to_string) else {
                continue;
            };
            let name = tg.target_group_name().unwrap_or_default().to_string();
            let t = tag_map.get(&arn).cloned().unwrap_or_default();
            if !self.owner.owns(&t, &q.service) {
                if q.target_group_names.contains(&name) && !q.skip_foreign {
                    return Err(CloudError::NotOwned {
                        kind: "target group",
                        name,
                    });
                }
                continue; // attached to our LB but not ours: never touched
            }
            ours.push((tg, arn, name, t));
        }
        // Attributes and targets of every group at once.
        stack.target_groups =
            futures::future::try_join_all(ours.into_iter().map(|(tg, arn, name, t)| async move {
                let (attributes, (targets, healthy)) = if q.identities_only {
                    Default::default()
                } else {
                    tokio::try_join!(self.target_group_attributes(&arn), self.targets_of(&arn))?
                };
                Ok::<_, CloudError>(ObservedTargetGroup {
                    health_check: observed_health_check(&tg),
                    protocol: tg.protocol().and_then(|p| Protocol::from_aws(p.as_str())),
                    port: tg.port().unwrap_or_default(),
                    attributes,
                    targets,
                    healthy,
                    tags: t,
                    name,
                    arn,
                })
            }))
            .await?;
        Ok(stack)
    }

    /// Every target group whose name starts with `prefix`, listing the account (teardown only:
    /// see [`StackQuery::target_groups_by_tag`]); ownership is checked by the caller.
    async fn target_groups_named_like(
        &self,
        prefix: &str,
    ) -> Result<Vec<aws_sdk_elasticloadbalancingv2::types::TargetGroup>, CloudError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let m = marker.clone();
            let page = self
                .call(ops::DESCRIBE_TARGET_GROUPS, || {
                    self.elb
                        .describe_target_groups()
                        .set_marker(m.clone())
                        .send()
                })
                .await?;
            out.extend(
                page.target_groups()
                    .iter()
                    .filter(|t| t.target_group_name().is_some_and(|n| n.starts_with(prefix)))
                    .cloned(),
            );
            marker = page.next_marker().map(str::to_string);
            if marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// The managed security group: named like the load balancer, tagged for this Service.
    pub(super) async fn find_security_group(
        &self,
        names: &[String],
        service: &str,
    ) -> Result<Option<ObservedSecurityGroup>, CloudError> {
        if names.is_empty() {
            return Ok(None);
        }
        let filters = vec![
            ec2::types::Filter::builder()
                .name("group-name")
                .set_values(Some(names.to_vec()))
                .build(),
            ec2::types::Filter::builder()
                .name(format!("tag:{}", tags::CLUSTER))
                .values(&self.owner.cluster)
                .build(),
            ec2::types::Filter::builder()
                .name(format!("tag:{}", tags::SERVICE))
                .values(service)
                .build(),
        ];
        let out = self
            .call(ops::DESCRIBE_SECURITY_GROUPS, || {
                self.ec2
                    .describe_security_groups()
                    .set_filters(Some(filters.clone()))
                    .send()
            })
            .await?;
        let Some(g) = out.security_groups().first() else {
            return Ok(None);
        };
        let mut ingress = BTreeSet::new();
        for p in g.ip_permissions() {
            let protocol = p.ip_protocol().unwrap_or_default().to_string();
            let port = p.from_port().unwrap_or_default();
            let v4 = p.ip_ranges().iter().filter_map(|r| r.cidr_ip());
            let v6 = p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6());
            for c in v4.chain(v6) {
                ingress.insert(IngressRule {
                    protocol: protocol.clone(),
                    port,
                    cidr: c.to_string(),
                });
            }
        }
        Ok(Some(ObservedSecurityGroup {
            id: g.group_id().unwrap_or_default().to_string(),
            name: g.group_name().unwrap_or_default().to_string(),
            ingress,
            tags: g
                .tags()
                .iter()
                .map(|t| (t.key(), t.value()))
                .collect::<KeyValues>()
                .0,
        }))
    }

    pub(super) async fn find_load_balancer(
        &self,
        name: &str,
        service: &str,
        identities_only: bool,
    ) -> Result<Option<(ObservedLoadBalancer, Vec<(String, String)>)>, CloudError> {
        let res = self
            .call(ops::DESCRIBE_LOAD_BALANCERS, || {
                self.elb.describe_load_balancers().names(name).send()
            })
            .await;
        let out = match res {
            Ok(o) => o,
            Err(e) if not_found(&e, &["LoadBalancerNotFound"]) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(lb) = out.load_balancers().first() else {
            return Ok(None);
        };
        let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        let all_arns: Vec<String> = out
            .load_balancers()
            .iter()
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
        let mut tag_map = self.tags_of(&all_arns).await?;
        let t = tag_map.remove(&arn).unwrap_or_default();
        // More than one under one name happens only on LocalStack (see ObservedStack).
        let duplicates: Vec<(String, String)> = all_arns
            .iter()
            .filter(|a| **a != arn)
            .filter(|a| tag_map.get(*a).is_some_and(|t| self.owner.owns(t, service)))
            .map(|a| (a.clone(), name.to_string()))
            .collect();
        if !self.owner.owns(&t, service) {
            return Err(CloudError::NotOwned {
                kind: "load balancer",
                name: name.to_string(),
            });
        }
        let (attrs, listeners) = if identities_only {
            // Teardown still reads the attributes: deletion protection decides whether the
            // load balancer may be deleted (LocalStack does not enforce it; AWS does).
            use aws_sdk_elasticloadbalancingv2::operation as elb_op;
            let attrs = self
                .call(ops::DESCRIBE_LOAD_BALANCER_ATTRIBUTES, || {
                    self.elb
                        .describe_load_balancer_attributes()
                        .load_balancer_arn(&arn)
                        .send()
                })
                .await?;
            (
                attrs,
                elb_op::describe_listeners::DescribeListenersOutput::builder().build(),
            )
        } else {
            tokio::try_join!(
                self.call(ops::DESCRIBE_LOAD_BALANCER_ATTRIBUTES, || {
                    self.elb
                        .describe_load_balancer_attributes()
                        .load_balancer_arn(&arn)
                        .send()
                }),
                self.call(ops::DESCRIBE_LISTENERS, || {
                    self.elb.describe_listeners().load_balancer_arn(&arn).send()
                })
            )?
        };
        let observed = ObservedLoadBalancer {
            name: lb.load_balancer_name().unwrap_or_default().to_string(),
            dns_name: lb.dns_name().unwrap_or_default().to_string(),
            scheme: lb.scheme().and_then(|s| Scheme::from_aws(s.as_str())),
            ip_address_type: match lb.ip_address_type() {
                Some(t) => IpAddressType::from_aws(t.as_str()),
                None => Some(IpAddressType::Ipv4),
            },
            attributes: attrs
                .attributes()
                .iter()
                .map(|a| (a.key(), a.value()))
                .collect::<KeyValues>()
                .0,
            tags: t,
            security_groups: lb.security_groups().to_vec(),
            listeners: listeners
                .listeners()
                .iter()
                .map(|l| ObservedListener {
                    arn: l.listener_arn().unwrap_or_default().to_string(),
                    port: l.port().unwrap_or_default(),
                    protocol: l.protocol().and_then(|p| Protocol::from_aws(p.as_str())),
                    target_group_arn: l
                        .default_actions()
                        .iter()
                        .find_map(|a| a.target_group_arn().map(str::to_string)),
                    certificates: l
                        .certificates()
                        .iter()
                        .filter_map(|c| c.certificate_arn().map(str::to_string))
                        .collect(),
                })
                .collect(),
            arn,
        };
        Ok(Some((observed, duplicates)))
    }

    /// Tags of up to any number of ELBv2 resources (DescribeTags takes 20 at a time).
    pub async fn tags_of(
        &self,
        arns: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, CloudError> {
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(20) {
            let chunk = chunk.to_vec();
            let res = self
                .call(ops::DESCRIBE_TAGS, || {
                    self.elb
                        .describe_tags()
                        .set_resource_arns(Some(chunk.clone()))
                        .send()
                })
                .await?;
            for d in res.tag_descriptions() {
                let t = d
                    .tags()
                    .iter()
                    .map(|t| (t.key(), t.value()))
                    .collect::<KeyValues>()
                    .0;
                out.insert(d.resource_arn().unwrap_or_default().to_string(), t);
            }
        }
        Ok(out)
    }

    pub(super) async fn target_group_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, CloudError> {
        let out = self
            .call(ops::DESCRIBE_TARGET_GROUP_ATTRIBUTES, || {
                self.elb
                    .describe_target_group_attributes()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .attributes()
            .iter()
            .map(|a| (a.key(), a.value()))
            .collect::<KeyValues>()
            .0)
    }

    /// The registered targets of a group (draining ones excluded), and how many are healthy.
    pub(super) async fn targets_of(
        &self,
        arn: &str,
    ) -> Result<(BTreeSet<Target>, usize), CloudError> {
        let out = self
            .call(ops::DESCRIBE_TARGET_HEALTH, || {
                self.elb
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        let mut healthy = 0;
        let targets = out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                let state = d
                    .target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str());
                match state {
                    // Deregistered already; AWS lists it until its deregistration delay ends.
                    Some("draining") => return None,
                    Some("healthy") => healthy += 1,
                    _ => {}
                }
                Some(Target {
                    id: t.id()?.to_string(),
                    port: t.port().unwrap_or_default(),
                })
            })
            .collect();
        Ok((targets, healthy))
    }
}
