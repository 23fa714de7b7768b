//! ELBv2 + EC2 through aws-sdk-rust, split by resource: [`client`] (the one `call()`),
//! [`observe`], [`apply`], [`targets`], [`network`], [`inventory`] and [`convert`]. The only
//! module that calls AWS.

mod apply;
mod client;
mod convert;
mod inventory;
mod network;
mod observe;
mod targets;

use std::collections::BTreeSet;

use futures::future::BoxFuture;

pub use client::{AwsCloud, HasStatus, Ownership, RateLimits, aws_config};

use super::plan::ObservedStack;
use super::{BoundTargetGroup, Cloud, CloudError, Deployed, Plan, StackQuery, TaggedResource};
use crate::model::{DesiredLoadBalancer, Target};

impl Cloud for AwsCloud {
    fn observe<'a>(
        &'a self,
        q: &'a StackQuery,
    ) -> BoxFuture<'a, Result<ObservedStack, CloudError>> {
        Box::pin(AwsCloud::observe(self, q))
    }

    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<Deployed, CloudError>> {
        Box::pin(AwsCloud::deploy(self, plan))
    }

    fn target_group<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BoundTargetGroup>, CloudError>> {
        Box::pin(self.describe_target_group(arn))
    }

    fn active_targets<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeSet<Target>>, CloudError>> {
        Box::pin(AwsCloud::active_targets(self, arn))
    }

    fn target_health<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<crate::cloud::TargetHealth>>, CloudError>> {
        Box::pin(AwsCloud::target_health(self, arn))
    }

    fn register_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(AwsCloud::register_targets(self, arn, targets))
    }

    fn deregister_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(AwsCloud::deregister_targets(self, arn, targets))
    }

    fn cluster_vpc<'a>(&'a self, hints: &'a [String]) -> BoxFuture<'a, Result<String, CloudError>> {
        Box::pin(AwsCloud::cluster_vpc(self, hints))
    }

    fn vet<'a>(
        &'a self,
        desired: &'a DesiredLoadBalancer,
        by_tag: &'a super::TagVetting,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(AwsCloud::vet(self, desired, by_tag))
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Vec<TaggedResource>, CloudError>> {
        Box::pin(AwsCloud::inventory(self))
    }

    fn delete_resource<'a>(
        &'a self,
        resource: &'a TaggedResource,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(AwsCloud::delete_resource(self, resource))
    }
}
