//! Placement: the cluster's VPC (`--vpc-id`, or the nodes' instances'), and the subnets of a
//! load balancer inside it, from the annotation or discovered by the usual role tags; cached.
//! What lies outside the cluster's VPC is refused before any write ([`AwsCloud::vet`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ec2 as ec2;

use super::client::*;
use crate::cloud::{CloudError, TagVetting};
use crate::model::{DesiredLoadBalancer, Scheme};

const OUTSIDE_VPC: &str = "OutsideClusterVpc";
/// The reason of the policy's refusals (`controller::policy`), for the tag check made here.
const NOT_ALLOWED: &str = "NotAllowed";

fn refused(message: String) -> CloudError {
    CloudError::Refused {
        reason: OUTSIDE_VPC,
        message,
    }
}

/// How long a placement is trusted, and how many are kept.
const NETWORK_TTL: Duration = Duration::from_secs(600);
const NETWORK_CACHE_ENTRIES: usize = 256;

#[derive(Clone, Debug)]
pub(super) struct Network {
    pub(super) vpc_id: String,
    pub(super) subnets: Vec<String>,
    pub(super) at: Instant,
}

impl AwsCloud {
    /// Subnets for a load balancer: the annotation's (ids, or Name tags), else discovered by the
    /// usual role tags (`kubernetes.io/role/elb` for internet-facing, `…/internal-elb` for
    /// internal), one per availability zone. Cached for ten minutes.
    pub(super) async fn network(&self, d: &DesiredLoadBalancer) -> Result<Network, CloudError> {
        let (wanted, scheme) = (d.subnets.as_deref(), d.scheme);
        let vpc = self.cluster_vpc(&d.node_instances).await?;
        let key = match wanted {
            Some(w) => {
                // The same subnets however the annotation spells and orders them.
                let mut w: Vec<&str> = w.iter().map(|s| s.trim()).collect();
                w.sort_unstable();
                w.dedup();
                w.join(",")
            }
            None => format!("discover:{}", scheme.as_aws()),
        };
        if let Some(n) = self.networks.lock().await.get(&key) {
            if n.at.elapsed() < NETWORK_TTL {
                return Ok(n.clone());
            }
        }
        let subnets = match wanted {
            Some(w) => {
                let (ids, names): (Vec<String>, Vec<String>) =
                    w.iter().cloned().partition(|s| s.starts_with("subnet-"));
                let mut found = Vec::new();
                if !ids.is_empty() {
                    let out = self
                        .call(ops::DESCRIBE_SUBNETS, || {
                            self.ec2
                                .describe_subnets()
                                .set_subnet_ids(Some(ids.clone()))
                                .send()
                        })
                        .await?;
                    found.extend(out.subnets().to_vec());
                }
                if !names.is_empty() {
                    let f = ec2::types::Filter::builder()
                        .name("tag:Name")
                        .set_values(Some(names.clone()))
                        .build();
                    let out = self
                        .call(ops::DESCRIBE_SUBNETS, || {
                            self.ec2.describe_subnets().filters(f.clone()).send()
                        })
                        .await?;
                    found.extend(out.subnets().to_vec());
                }
                found
            }
            None => {
                let role = match scheme {
                    Scheme::Internal => "kubernetes.io/role/internal-elb",
                    Scheme::InternetFacing => "kubernetes.io/role/elb",
                };
                let f = ec2::types::Filter::builder()
                    .name("tag-key")
                    .values(role)
                    .build();
                let out = self
                    .call(ops::DESCRIBE_SUBNETS, || {
                        self.ec2.describe_subnets().filters(f.clone()).send()
                    })
                    .await?;
                let cluster_tag = format!("kubernetes.io/cluster/{}", self.owner.cluster);
                // Subnets tagged for another cluster only are not ours to use.
                out.subnets()
                    .iter()
                    .filter(|s| {
                        let cluster_tags: Vec<&str> = s
                            .tags()
                            .iter()
                            .filter_map(|t| t.key())
                            .filter(|k| k.starts_with("kubernetes.io/cluster/"))
                            .collect();
                        cluster_tags.is_empty() || cluster_tags.contains(&cluster_tag.as_str())
                    })
                    .cloned()
                    .collect()
            }
        };
        let subnets = inside_vpc(subnets, wanted.is_some(), &vpc)?;
        let mut by_zone: BTreeMap<String, &ec2::types::Subnet> = BTreeMap::new();
        for s in &subnets {
            by_zone
                .entry(s.availability_zone().unwrap_or_default().to_string())
                .or_insert(s);
        }
        let chosen: Vec<&ec2::types::Subnet> = by_zone.into_values().collect();
        let Some(first) = chosen.first() else {
            return Err(CloudError::NoSubnets(match wanted {
                Some(w) => format!("none of {w:?} exist"),
                None => format!(
                    "no subnet is tagged {} (see the subnets annotation)",
                    match scheme {
                        Scheme::Internal => "kubernetes.io/role/internal-elb",
                        Scheme::InternetFacing => "kubernetes.io/role/elb",
                    }
                ),
            }));
        };
        let n = Network {
            vpc_id: first.vpc_id().unwrap_or(vpc.as_str()).to_string(),
            subnets: chosen
                .iter()
                .filter_map(|s| s.subnet_id().map(str::to_string))
                .collect(),
            at: Instant::now(),
        };
        let mut cache = self.networks.lock().await;
        // Bounded: expired entries go, and past the cap the oldest, so annotation values a
        // tenant keeps changing cannot grow it.
        cache.retain(|_, v| v.at.elapsed() < NETWORK_TTL);
        while cache.len() >= NETWORK_CACHE_ENTRIES {
            let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, v)| v.at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            cache.remove(&oldest);
        }
        cache.insert(key, n.clone());
        Ok(n)
    }
}

/// The subnets inside `vpc`. The annotation's (`named`) must all be: any outside is refused;
/// discovery only ever looks inside.
fn inside_vpc(
    subnets: Vec<ec2::types::Subnet>,
    named: bool,
    vpc: &str,
) -> Result<Vec<ec2::types::Subnet>, CloudError> {
    let (inside, outside): (Vec<_>, Vec<_>) =
        subnets.into_iter().partition(|s| s.vpc_id() == Some(vpc));
    if named && !outside.is_empty() {
        let list: Vec<String> = outside
            .iter()
            .map(|s| {
                format!(
                    "{} (VPC {})",
                    s.subnet_id().unwrap_or_default(),
                    s.vpc_id().unwrap_or_default()
                )
            })
            .collect();
        return Err(refused(format!(
            "annotation service.beta.kubernetes.io/aws-load-balancer-subnets: subnet(s) {} are outside the cluster's VPC {vpc}; nothing was created",
            list.join(", ")
        )));
    }
    Ok(inside)
}

impl AwsCloud {
    /// The cluster's VPC: `--vpc-id`, else the one VPC of the nodes' instances `hints` (found
    /// once). Refused when it cannot be told: no node instance, or nodes in several VPCs.
    pub async fn cluster_vpc(&self, hints: &[String]) -> Result<String, CloudError> {
        if let Some(v) = self.vpc.lock().await.clone() {
            return Ok(v);
        }
        if hints.is_empty() {
            return Err(refused(
                "the cluster's VPC is not known: no node with an EC2 instance yet, and no --vpc-id; nothing was created".into(),
            ));
        }
        let ids = hints.to_vec();
        let out = self
            .call(ops::DESCRIBE_INSTANCES, || {
                self.ec2
                    .describe_instances()
                    .set_instance_ids(Some(ids.clone()))
                    .send()
            })
            .await?;
        let vpcs: std::collections::BTreeSet<String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.vpc_id().map(str::to_string))
            .collect();
        let mut it = vpcs.iter();
        match (it.next(), it.next()) {
            (Some(v), None) => {
                tracing::info!(vpc = %v, "cluster VPC found from the nodes' instances");
                *self.vpc.lock().await = Some(v.clone());
                Ok(v.clone())
            }
            _ => Err(refused(format!(
                "the cluster's VPC cannot be told from the nodes' instances (VPCs {vpcs:?}); set --vpc-id; nothing was created"
            ))),
        }
    }

    /// Before any write: the load balancer's subnets and the annotation's security groups must
    /// be in the cluster's VPC, and the groups in `by_tag` must carry one of its tags.
    pub async fn vet(
        &self,
        d: &DesiredLoadBalancer,
        by_tag: &TagVetting,
    ) -> Result<(), CloudError> {
        let net = self.network(d).await?;
        let Some(groups) = d.security_groups.as_ref().filter(|g| !g.is_empty()) else {
            return Ok(());
        };
        let ids = groups.clone();
        let res = self
            .call(ops::DESCRIBE_SECURITY_GROUPS, || {
                self.ec2
                    .describe_security_groups()
                    .set_group_ids(Some(ids.clone()))
                    .send()
            })
            .await;
        let out = match res {
            Ok(o) => o,
            Err(e) if not_found(&e, &["InvalidGroup.NotFound"]) => {
                return Err(refused(format!(
                    "annotation service.beta.kubernetes.io/aws-load-balancer-security-groups: {e}"
                )));
            }
            Err(e) => return Err(e),
        };
        let outside: Vec<String> = out
            .security_groups()
            .iter()
            .filter(|g| g.vpc_id() != Some(net.vpc_id.as_str()))
            .map(|g| {
                format!(
                    "{} (VPC {})",
                    g.group_id().unwrap_or_default(),
                    g.vpc_id().unwrap_or_default()
                )
            })
            .collect();
        if !outside.is_empty() {
            return Err(refused(format!(
                "annotation service.beta.kubernetes.io/aws-load-balancer-security-groups: security group(s) {} are outside the cluster's VPC {}; nothing was changed",
                outside.join(", "),
                net.vpc_id
            )));
        }
        let untagged = untagged_groups(out.security_groups(), by_tag);
        if untagged.is_empty() {
            return Ok(());
        }
        let rules: Vec<String> = by_tag.rules.iter().map(ToString::to_string).collect();
        Err(CloudError::Refused {
            reason: NOT_ALLOWED,
            message: format!(
                "annotation service.beta.kubernetes.io/aws-load-balancer-security-groups: security group(s) {} are not in the controller's allowed security groups (--allowed-security-groups) and carry none of its allowed tags (--allowed-security-group-tags {}); nothing was changed",
                untagged.join(", "),
                rules.join(",")
            ),
        })
    }
}

/// The groups of `by_tag` that carry none of its tags (all of them when a group was not found).
fn untagged_groups(found: &[ec2::types::SecurityGroup], by_tag: &TagVetting) -> Vec<String> {
    by_tag
        .groups
        .iter()
        .filter(|id| {
            let group = found.iter().find(|g| g.group_id() == Some(id.as_str()));
            !group.is_some_and(|g| {
                by_tag.rules.iter().any(|rule| {
                    rule.carried_by(
                        g.tags()
                            .iter()
                            .map(|t| (t.key().unwrap_or_default(), t.value().unwrap_or_default())),
                    )
                })
            })
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::TagRule;

    #[test]
    fn groups_without_an_allowed_tag_are_named() {
        let group = |id: &str, tags: &[(&str, &str)]| {
            let mut b = ec2::types::SecurityGroup::builder().group_id(id);
            for (k, v) in tags {
                b = b.tags(ec2::types::Tag::builder().key(*k).value(*v).build());
            }
            b.build()
        };
        let found = [
            group("sg-tagged", &[("team", "payments")]),
            group("sg-other", &[("team", "search")]),
            group("sg-bare", &[]),
        ];
        let vetting = |groups: &[&str]| TagVetting {
            groups: groups.iter().map(|g| g.to_string()).collect(),
            rules: vec![
                TagRule {
                    key: "team".into(),
                    value: Some("payments".into()),
                },
                TagRule {
                    key: "shared".into(),
                    value: None,
                },
            ],
        };
        assert!(untagged_groups(&found, &vetting(&["sg-tagged"])).is_empty());
        assert_eq!(
            untagged_groups(
                &found,
                &vetting(&["sg-tagged", "sg-other", "sg-bare", "sg-gone"])
            ),
            vec!["sg-other", "sg-bare", "sg-gone"]
        );
        assert!(untagged_groups(&found, &TagVetting::default()).is_empty());
    }
}
