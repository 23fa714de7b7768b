//! Deploying a plan: each change as its ELBv2/EC2 calls, with the ARNs learned on the way kept
//! here (the controller never sees them).

use std::collections::BTreeMap;

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{
    IpAddressType as AwsIpType, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher,
    ProtocolEnum, TargetGroupAttribute, TargetTypeEnum,
};

use super::client::*;
use super::convert::*;
use crate::cloud::plan::{
    Change, LoadBalancerRef, ObservedStack, SecurityGroupRef, TargetGroupRef,
};
use crate::cloud::{CloudError, Deployed, Plan, plan};
use crate::model::{DesiredLoadBalancer, HealthCheckSpec, IngressRule, TargetGroupSpec, tags};

/// Arns learned while applying a plan (existing ones from observation, new ones on create).
/// Private to the AWS edge: the controller sees plans and their outcome ([`Deployed`]).
#[derive(Clone, Debug, Default)]
pub(super) struct ApplyState {
    pub(super) load_balancer_arn: Option<String>,
    pub(super) dns_name: Option<String>,
    pub(super) target_group_arns: BTreeMap<String, String>,
    pub(super) security_group_id: Option<String>,
}

impl ApplyState {
    pub(super) fn from_observed(o: &ObservedStack) -> ApplyState {
        ApplyState {
            load_balancer_arn: o.load_balancer.as_ref().map(|l| l.arn.clone()),
            dns_name: o.load_balancer.as_ref().map(|l| l.dns_name.clone()),
            target_group_arns: o
                .target_groups
                .iter()
                .map(|t| (t.name.clone(), t.arn.clone()))
                .collect(),
            security_group_id: o.security_group.as_ref().map(|g| g.id.clone()),
        }
    }

    pub(super) fn security_group(&self) -> Result<String, CloudError> {
        self.security_group_id
            .clone()
            .ok_or_else(|| CloudError::Internal("security group not created".into()))
    }

    /// The groups a load balancer gets: the annotation's, or the managed one.
    pub(super) fn groups_for(
        &self,
        explicit: &Option<Vec<String>>,
    ) -> Result<Vec<String>, CloudError> {
        match explicit {
            Some(ids) => Ok(ids.clone()),
            None => Ok(vec![self.security_group()?]),
        }
    }

    pub(super) fn tg(&self, r: &TargetGroupRef) -> Result<String, CloudError> {
        match r {
            TargetGroupRef::Arn(a) => Ok(a.clone()),
            TargetGroupRef::Planned(n) => self.tg_by_name(n),
        }
    }

    pub(super) fn tg_by_name(&self, n: &str) -> Result<String, CloudError> {
        self.target_group_arns
            .get(n)
            .cloned()
            .ok_or_else(|| CloudError::Internal(format!("target group {n} not created")))
    }

    pub(super) fn lb(&self, r: &LoadBalancerRef) -> Result<String, CloudError> {
        match r {
            LoadBalancerRef::Arn(a) => Ok(a.clone()),
            LoadBalancerRef::Planned => self
                .load_balancer_arn
                .clone()
                .ok_or_else(|| CloudError::Internal("load balancer not created".into())),
        }
    }
}

impl AwsCloud {
    /// Applies a plan: its target-group lane and its load-balancer lane side by side (see
    /// [`plan::lanes`]), each in order and stopping at its first failure, then the rest in
    /// order, stopping at the first failure.
    pub async fn deploy(&self, plan: &Plan) -> Result<Deployed, CloudError> {
        let start = ApplyState::from_observed(&plan.observed);
        let (groups, balancer, rest) = plan::lanes(&plan.changes);
        let (mut groups_state, mut st) = (start.clone(), start);
        let desired = plan.desired.as_ref();
        let (groups_done, balancer_done) = tokio::join!(
            self.apply_in_order(groups.into_iter(), desired, &mut groups_state),
            self.apply_in_order(balancer.into_iter(), desired, &mut st),
        );
        groups_done?;
        balancer_done?;
        // The target-group lane owns the group ARNs; the other lane owns the rest.
        st.target_group_arns = groups_state.target_group_arns;
        self.apply_in_order(rest.iter(), desired, &mut st).await?;
        Ok(Deployed {
            dns_name: st.dns_name,
            target_group_arns: st.target_group_arns,
        })
    }

    async fn apply_in_order(
        &self,
        changes: impl Iterator<Item = &Change>,
        desired: Option<&DesiredLoadBalancer>,
        st: &mut ApplyState,
    ) -> Result<(), CloudError> {
        for c in changes {
            tracing::info!(change = %c, "applying");
            self.apply(c, desired, st).await?;
        }
        Ok(())
    }

    /// Applies one change; `desired` supplies the placement of new resources.
    pub(super) async fn apply(
        &self,
        change: &Change,
        desired: Option<&DesiredLoadBalancer>,
        st: &mut ApplyState,
    ) -> Result<(), CloudError> {
        match change {
            Change::CreateTargetGroup(tg) => {
                let d = desired
                    .ok_or_else(|| CloudError::Internal("create without desired state".into()))?;
                let net = self.network(d.subnets.as_deref(), d.scheme).await?;
                let arn = self.create_target_group(tg, &net.vpc_id).await?;
                st.target_group_arns.insert(tg.name.clone(), arn);
            }
            Change::ModifyTargetGroupHealthCheck {
                target_group,
                health_check: h,
            } => {
                let arn = st.tg(target_group)?;
                self.call(ops::MODIFY_TARGET_GROUP, || {
                    let r = self.elb.modify_target_group().target_group_arn(&arn);
                    with_health_check!(r, h).send()
                })
                .await?;
            }
            Change::ModifyTargetGroupAttributes {
                target_group,
                attributes,
            } => {
                let arn = st.tg(target_group)?;
                self.modify_target_group_attributes(&arn, attributes)
                    .await?;
            }
            Change::RegisterTargets {
                target_group,
                targets,
            } => {
                let arn = st.tg(target_group)?;
                self.register_targets(&arn, targets).await?;
            }
            Change::DeregisterTargets {
                target_group,
                targets,
            } => self.deregister_targets(target_group, targets).await?,
            Change::CreateLoadBalancer(d) => {
                let net = self.network(d.subnets.as_deref(), d.scheme).await?;
                let groups = st.groups_for(&d.security_groups)?;
                let out = self
                    .call(ops::CREATE_LOAD_BALANCER, || {
                        self.elb
                            .create_load_balancer()
                            .name(&d.name)
                            .r#type(LoadBalancerTypeEnum::Network)
                            .scheme(LoadBalancerSchemeEnum::from(d.scheme.as_aws()))
                            .ip_address_type(AwsIpType::from(d.ip_address_type.as_aws()))
                            .set_subnets(Some(net.subnets.clone()))
                            .set_security_groups(Some(groups.clone()))
                            .set_tags(Some(aws_tags(&d.tags)))
                            .send()
                    })
                    .await?;
                let lb = out.load_balancers().first().ok_or_else(|| {
                    CloudError::Internal("CreateLoadBalancer returned nothing".into())
                })?;
                st.load_balancer_arn = lb.load_balancer_arn().map(str::to_string);
                st.dns_name = lb.dns_name().map(str::to_string);
            }
            Change::SetIpAddressType {
                load_balancer,
                ip_address_type,
            } => {
                self.call(ops::SET_IP_ADDRESS_TYPE, || {
                    self.elb
                        .set_ip_address_type()
                        .load_balancer_arn(load_balancer)
                        .ip_address_type(AwsIpType::from(ip_address_type.as_aws()))
                        .send()
                })
                .await?;
            }
            Change::ModifyLoadBalancerAttributes {
                load_balancer,
                attributes,
            } => {
                let arn = st.lb(load_balancer)?;
                let attrs: Vec<elbv2::types::LoadBalancerAttribute> = attributes
                    .iter()
                    .map(|(k, v)| {
                        elbv2::types::LoadBalancerAttribute::builder()
                            .key(k)
                            .value(v)
                            .build()
                    })
                    .collect();
                self.call(ops::MODIFY_LOAD_BALANCER_ATTRIBUTES, || {
                    self.elb
                        .modify_load_balancer_attributes()
                        .load_balancer_arn(&arn)
                        .set_attributes(Some(attrs.clone()))
                        .send()
                })
                .await?;
            }
            Change::AddTags { arn, tags } => {
                let t = aws_tags(tags);
                self.call(ops::ADD_TAGS, || {
                    self.elb
                        .add_tags()
                        .resource_arns(arn)
                        .set_tags(Some(t.clone()))
                        .send()
                })
                .await?;
            }
            Change::CreateListener {
                load_balancer,
                listener,
            } => {
                let lb = st.lb(load_balancer)?;
                let tg = st.tg_by_name(&listener.target_group)?;
                self.call(ops::CREATE_LISTENER, || {
                    self.elb
                        .create_listener()
                        .load_balancer_arn(&lb)
                        .port(listener.port)
                        .protocol(aws_protocol(listener.protocol))
                        .set_certificates(certificates(listener))
                        .default_actions(forward(&tg))
                        .set_tags(Some(aws_tags(&listener.tags)))
                        .send()
                })
                .await?;
            }
            Change::ModifyListener { arn, listener } => {
                let tg = st.tg_by_name(&listener.target_group)?;
                self.call(ops::MODIFY_LISTENER, || {
                    self.elb
                        .modify_listener()
                        .listener_arn(arn)
                        .port(listener.port)
                        .protocol(aws_protocol(listener.protocol))
                        .set_certificates(certificates(listener))
                        .default_actions(forward(&tg))
                        .send()
                })
                .await?;
            }
            Change::DeleteListener { arn, .. } => {
                let res = self
                    .call(ops::DELETE_LISTENER, || {
                        self.elb.delete_listener().listener_arn(arn).send()
                    })
                    .await;
                settled(res, &["ListenerNotFound"], &[], ops::DELETE_LISTENER.name)?;
            }
            Change::DeleteLoadBalancer { arn, .. } => {
                let res = self
                    .call(ops::DELETE_LOAD_BALANCER, || {
                        self.elb
                            .delete_load_balancer()
                            .load_balancer_arn(arn)
                            .send()
                    })
                    .await;
                settled(
                    res,
                    &["LoadBalancerNotFound"],
                    &[],
                    ops::DELETE_LOAD_BALANCER.name,
                )?;
                if st.load_balancer_arn.as_deref() == Some(arn) {
                    st.load_balancer_arn = None;
                    st.dns_name = None;
                }
            }
            Change::CreateSecurityGroup(sg) => {
                let d = desired
                    .ok_or_else(|| CloudError::Internal("create without desired state".into()))?;
                let net = self.network(d.subnets.as_deref(), d.scheme).await?;
                let ec2_tags = ec2_tags(&sg.tags);
                let out = self
                    .call(ops::CREATE_SECURITY_GROUP, || {
                        self.ec2
                            .create_security_group()
                            .group_name(&sg.name)
                            .description(format!(
                                "cloudlb frontend for {}",
                                sg.tags.get(tags::SERVICE).cloned().unwrap_or_default()
                            ))
                            .vpc_id(&net.vpc_id)
                            .tag_specifications(
                                ec2::types::TagSpecification::builder()
                                    .resource_type(ec2::types::ResourceType::SecurityGroup)
                                    .set_tags(Some(ec2_tags.clone()))
                                    .build(),
                            )
                            .send()
                    })
                    .await?;
                let id = out
                    .group_id()
                    .ok_or_else(|| {
                        CloudError::Internal("CreateSecurityGroup returned no id".into())
                    })?
                    .to_string();
                st.security_group_id = Some(id.clone());
                let rules: Vec<IngressRule> = sg.ingress.iter().cloned().collect();
                self.authorize(&id, &rules).await?;
            }
            Change::AuthorizeIngress { group, rules } => {
                let id = match group {
                    SecurityGroupRef::Id(id) => id.clone(),
                    SecurityGroupRef::Planned => st.security_group()?,
                };
                self.authorize(&id, rules).await?;
            }
            Change::RevokeIngress { group, rules } => {
                let perms = permissions(rules);
                self.call(ops::REVOKE_SECURITY_GROUP_INGRESS, || {
                    self.ec2
                        .revoke_security_group_ingress()
                        .group_id(group)
                        .set_ip_permissions(Some(perms.clone()))
                        .send()
                })
                .await?;
            }
            Change::SetSecurityGroups {
                load_balancer,
                explicit,
            } => {
                let groups = st.groups_for(explicit)?;
                self.call(ops::SET_SECURITY_GROUPS, || {
                    self.elb
                        .set_security_groups()
                        .load_balancer_arn(load_balancer)
                        .set_security_groups(Some(groups.clone()))
                        .send()
                })
                .await?;
            }
            Change::DeleteSecurityGroup { id, .. } => {
                // The load balancer's network interfaces let go of the group a little after
                // it is deleted: DependencyViolation is transient here.
                let res = self
                    .call(ops::DELETE_SECURITY_GROUP, || {
                        self.ec2.delete_security_group().group_id(id).send()
                    })
                    .await;
                settled(
                    res,
                    &["InvalidGroup.NotFound"],
                    &["DependencyViolation"],
                    ops::DELETE_SECURITY_GROUP.name,
                )?;
                if st.security_group_id.as_deref() == Some(id) {
                    st.security_group_id = None;
                }
            }
            Change::DeleteTargetGroup { arn, .. } => {
                // Right after its listener or load balancer goes, AWS may still call the
                // group in use for a moment: that is transient here.
                let res = self
                    .call(ops::DELETE_TARGET_GROUP, || {
                        self.elb.delete_target_group().target_group_arn(arn).send()
                    })
                    .await;
                settled(
                    res,
                    &["TargetGroupNotFound"],
                    &["ResourceInUse"],
                    ops::DELETE_TARGET_GROUP.name,
                )?;
            }
        }
        Ok(())
    }

    pub(super) async fn authorize(
        &self,
        group: &str,
        rules: &[IngressRule],
    ) -> Result<(), CloudError> {
        if rules.is_empty() {
            return Ok(());
        }
        let perms = permissions(rules);
        let res = self
            .call(ops::AUTHORIZE_SECURITY_GROUP_INGRESS, || {
                self.ec2
                    .authorize_security_group_ingress()
                    .group_id(group)
                    .set_ip_permissions(Some(perms.clone()))
                    .send()
            })
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e, &["InvalidPermission.Duplicate"]) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn create_target_group(
        &self,
        tg: &TargetGroupSpec,
        vpc_id: &str,
    ) -> Result<String, CloudError> {
        let h = &tg.health_check;
        let out = self
            .call(ops::CREATE_TARGET_GROUP, || {
                let r = self
                    .elb
                    .create_target_group()
                    .name(&tg.name)
                    .protocol(aws_protocol(tg.protocol))
                    .port(tg.port)
                    .vpc_id(vpc_id)
                    .target_type(TargetTypeEnum::from(tg.target_type.as_aws()))
                    .health_check_enabled(true)
                    .set_tags(Some(aws_tags(&tg.tags)));
                with_health_check!(r, h).send()
            })
            .await?;
        let arn = out
            .target_groups()
            .first()
            .and_then(|t| t.target_group_arn())
            .ok_or_else(|| CloudError::Internal("CreateTargetGroup returned nothing".into()))?
            .to_string();
        if !tg.attributes.is_empty() {
            self.modify_target_group_attributes(&arn, &tg.attributes)
                .await?;
        }
        Ok(arn)
    }

    pub(super) async fn modify_target_group_attributes(
        &self,
        arn: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        let attrs: Vec<TargetGroupAttribute> = attributes
            .iter()
            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
            .collect();
        self.call(ops::MODIFY_TARGET_GROUP_ATTRIBUTES, || {
            self.elb
                .modify_target_group_attributes()
                .target_group_arn(arn)
                .set_attributes(Some(attrs.clone()))
                .send()
        })
        .await?;
        Ok(())
    }
}

/// Ingress rules as EC2 permissions, one per (protocol, port) with all its CIDRs.
pub(super) fn permissions(rules: &[IngressRule]) -> Vec<ec2::types::IpPermission> {
    let mut by_port: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    for r in rules {
        by_port
            .entry((r.protocol.clone(), r.port))
            .or_default()
            .push(r.cidr.clone());
    }
    by_port
        .into_iter()
        .map(|((protocol, port), cidrs)| {
            ec2::types::IpPermission::builder()
                .ip_protocol(protocol)
                .from_port(port)
                .to_port(port)
                .set_ip_ranges(Some(
                    cidrs
                        .iter()
                        .map(|c| ec2::types::IpRange::builder().cidr_ip(c).build())
                        .collect(),
                ))
                .build()
        })
        .collect()
}
