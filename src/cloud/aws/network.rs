//! Placement: the subnets (and so the VPC) of a load balancer, from the annotation or
//! discovered by the usual role tags; cached.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ec2 as ec2;

use super::client::*;
use crate::cloud::CloudError;
use crate::model::Scheme;

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
    pub(super) async fn network(
        &self,
        wanted: Option<&[String]>,
        scheme: Scheme,
    ) -> Result<Network, CloudError> {
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
            vpc_id: first.vpc_id().unwrap_or_default().to_string(),
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
