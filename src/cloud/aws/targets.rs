//! Target groups made by anyone (TargetGroupBindings): describe, active targets, register and
//! deregister in batches.

use std::collections::BTreeSet;

use super::client::*;
use super::convert::*;
use crate::cloud::{BoundTargetGroup, CloudError};
use crate::model::Target;

impl AwsCloud {
    /// A target group by ARN, made by anyone (TargetGroupBindings bind groups cloudlb did not
    /// create): its type and tags, or `None` when it does not exist.
    pub async fn describe_target_group(
        &self,
        arn: &str,
    ) -> Result<Option<BoundTargetGroup>, CloudError> {
        let res = self
            .call(ops::DESCRIBE_TARGET_GROUPS, || {
                self.elb
                    .describe_target_groups()
                    .target_group_arns(arn)
                    .send()
            })
            .await;
        let out = match res {
            Ok(o) => o,
            Err(e) if not_found(&e, &["TargetGroupNotFound"]) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(tg) = out.target_groups().first() else {
            return Ok(None);
        };
        let tags = self
            .tags_of(&[arn.to_string()])
            .await?
            .remove(arn)
            .unwrap_or_default();
        Ok(Some(BoundTargetGroup {
            name: tg.target_group_name().unwrap_or_default().to_string(),
            vpc_id: tg.vpc_id().unwrap_or_default().to_string(),
            target_type: tg
                .target_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_else(|| "instance".into()),
            tags,
        }))
    }

    /// The targets that receive (or are about to receive) traffic: every registered target but
    /// those draining after a deregistration, which must not be deregistered again. `None` when
    /// the group does not exist.
    pub async fn active_targets(&self, arn: &str) -> Result<Option<BTreeSet<Target>>, CloudError> {
        Ok(self.target_health(arn).await?.map(|all| {
            all.into_iter()
                .filter(|h| h.state != "draining")
                .map(|h| h.target)
                .collect()
        }))
    }

    /// Every registered target's state and reason (for pod readiness gates); `None` when the
    /// group does not exist.
    pub async fn target_health(
        &self,
        arn: &str,
    ) -> Result<Option<Vec<crate::cloud::TargetHealth>>, CloudError> {
        let res = self
            .call(ops::DESCRIBE_TARGET_HEALTH, || {
                self.elb
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
            })
            .await;
        let out = match res {
            Ok(o) => o,
            Err(e) if not_found(&e, &["TargetGroupNotFound"]) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(
            out.target_health_descriptions()
                .iter()
                .filter_map(|d| {
                    let t = d.target()?;
                    let h = d.target_health();
                    Some(crate::cloud::TargetHealth {
                        target: Target {
                            id: t.id()?.to_string(),
                            port: t.port().unwrap_or_default(),
                        },
                        state: h
                            .and_then(|h| h.state())
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                        reason: h.and_then(|h| h.reason()).map(|r| r.as_str().to_string()),
                    })
                })
                .collect(),
        ))
    }

    /// RegisterTargets in batches of 200 (rate limited as a target call).
    pub async fn register_targets(&self, arn: &str, targets: &[Target]) -> Result<(), CloudError> {
        for chunk in targets.chunks(200) {
            let ts = descriptions(chunk);
            self.call(ops::REGISTER_TARGETS, || {
                self.elb
                    .register_targets()
                    .target_group_arn(arn)
                    .set_targets(Some(ts.clone()))
                    .send()
            })
            .await?;
        }
        Ok(())
    }

    /// DeregisterTargets in batches of 200; targets (or a group) already gone count as done.
    pub async fn deregister_targets(
        &self,
        arn: &str,
        targets: &[Target],
    ) -> Result<(), CloudError> {
        for chunk in targets.chunks(200) {
            let ts = descriptions(chunk);
            let res = self
                .call(ops::DEREGISTER_TARGETS, || {
                    self.elb
                        .deregister_targets()
                        .target_group_arn(arn)
                        .set_targets(Some(ts.clone()))
                        .send()
                })
                .await;
            match res {
                Ok(_) => {}
                Err(e) if not_found(&e, &["InvalidTarget", "TargetGroupNotFound"]) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
