//! ELBv2 + EC2 through aws-sdk-rust: observe one Service's stack by its deterministic names
//! (ownership confirmed by tags), and apply plan changes. The only module that calls AWS.
//!
//! Every call goes through [`AwsCloud::call`]: a client-side token bucket, a Prometheus counter
//! per operation and outcome, and jittered exponential retries for throttling, 5xx and network
//! errors (the SDK's own retries are off so that each attempt is counted and limited).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use backon::{ExponentialBuilder, Retryable};
use elbv2::types::{
    Action, ActionTypeEnum, Certificate, IpAddressType as AwsIpType, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, Matcher, ProtocolEnum, Tag, TargetDescription, TargetGroupAttribute,
    TargetTypeEnum,
};
use tokio::sync::Mutex;

use futures::future::BoxFuture;

use super::plan::{
    Change, LoadBalancerRef, ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup,
    ObservedStack, ObservedTargetGroup, SecurityGroupRef, TargetGroupRef,
};
use super::ratelimit::TokenBucket;
use super::{
    BoundTargetGroup, Cloud, CloudError, Deployed, Plan, ResourceKind, StackQuery, TaggedResource,
};
use crate::metrics::{AwsCallLabels, ControllerMetrics};
use crate::model::{
    DesiredLoadBalancer, HealthCheckProtocol, HealthCheckSpec, IngressRule, IpAddressType,
    ListenerSpec, Protocol, Scheme, Target, TargetGroupSpec, tags,
};

/// Client-side limits, per call family.
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    pub qps: f64,
    pub burst: u32,
    pub targets_qps: f64,
    pub targets_burst: u32,
}

impl Default for RateLimits {
    /// The controller's flag defaults.
    fn default() -> Self {
        RateLimits {
            qps: 10.0,
            burst: 40,
            targets_qps: 4.0,
            targets_burst: 20,
        }
    }
}

/// Loads the AWS configuration from the standard chain (env, profile, web identity, IMDS);
/// `AWS_ENDPOINT_URL` points it at LocalStack.
pub async fn aws_config(region: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_string()));
    }
    loader.load().await
}

/// Who we are in the account: resources are ours only with this cluster's tag.
#[derive(Clone, Debug)]
pub struct Ownership {
    pub cluster: String,
}

impl Ownership {
    /// Whether `t` marks a resource of this cluster for Service `ns/name`.
    pub fn owns(&self, t: &BTreeMap<String, String>, service: &str) -> bool {
        t.get(tags::CLUSTER) == Some(&self.cluster)
            && t.get(tags::SERVICE).map(String::as_str) == Some(service)
    }
}

#[derive(Clone, Debug)]
struct Network {
    vpc_id: String,
    subnets: Vec<String>,
    at: Instant,
}

/// The AWS side of the controller.
pub struct AwsCloud {
    elb: elbv2::Client,
    ec2: ec2::Client,
    owner: Ownership,
    metrics: ControllerMetrics,
    general: TokenBucket,
    targets: TokenBucket,
    networks: Mutex<BTreeMap<String, Network>>,
}

/// Arns learned while applying a plan (existing ones from observation, new ones on create).
/// Private to the AWS edge: the controller sees plans and their outcome, never ARNs.
#[derive(Clone, Debug, Default)]
struct ApplyState {
    load_balancer_arn: Option<String>,
    dns_name: Option<String>,
    target_group_arns: BTreeMap<String, String>,
    security_group_id: Option<String>,
}

impl ApplyState {
    fn from_observed(o: &ObservedStack) -> ApplyState {
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

    fn security_group(&self) -> Result<String, CloudError> {
        self.security_group_id
            .clone()
            .ok_or_else(|| CloudError::Internal("security group not created".into()))
    }

    /// The groups a load balancer gets: the annotation's, or the managed one.
    fn groups_for(&self, explicit: &Option<Vec<String>>) -> Result<Vec<String>, CloudError> {
        match explicit {
            Some(ids) => Ok(ids.clone()),
            None => Ok(vec![self.security_group()?]),
        }
    }

    fn tg(&self, r: &TargetGroupRef) -> Result<String, CloudError> {
        match r {
            TargetGroupRef::Arn(a) => Ok(a.clone()),
            TargetGroupRef::Planned(n) => self.tg_by_name(n),
        }
    }

    fn tg_by_name(&self, n: &str) -> Result<String, CloudError> {
        self.target_group_arns
            .get(n)
            .cloned()
            .ok_or_else(|| CloudError::Internal(format!("target group {n} not created")))
    }

    fn lb(&self, r: &LoadBalancerRef) -> Result<String, CloudError> {
        match r {
            LoadBalancerRef::Arn(a) => Ok(a.clone()),
            LoadBalancerRef::Planned => self
                .load_balancer_arn
                .clone()
                .ok_or_else(|| CloudError::Internal("load balancer not created".into())),
        }
    }
}

/// The error code AWS (or LocalStack) gave, if any.
fn code_of<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<String> {
    e.code().map(str::to_string)
}

fn classify<E, R>(operation: &'static str, e: SdkError<E, R>) -> (CloudError, &'static str)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let code = code_of(&e).unwrap_or_default();
    let message = e
        .message()
        .map(str::to_string)
        .unwrap_or_else(|| aws_smithy_types::error::display::DisplayErrorContext(&e).to_string());
    let status = e.raw_response().map(HasStatus::status_code);
    let throttled = matches!(
        code.as_str(),
        "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "RequestThrottled"
            | "SlowDown"
    ) || status == Some(429);
    if throttled {
        return (
            CloudError::Transient {
                operation,
                message: format!("{code}: {message}"),
            },
            "throttled",
        );
    }
    if status.is_some_and(|s| s >= 500) {
        return (
            CloudError::Transient {
                operation,
                message: format!("HTTP {}: {message}", status.unwrap_or(500)),
            },
            "server_error",
        );
    }
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => (
            CloudError::Transient { operation, message },
            "network_error",
        ),
        _ => (
            CloudError::Rejected {
                operation,
                code,
                message,
            },
            "client_error",
        ),
    }
}

/// Lets [`classify`] read the HTTP status of a raw response.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn not_found(e: &CloudError, codes: &[&str]) -> bool {
    matches!(e, CloudError::Rejected { code, .. } if codes.contains(&code.as_str()))
}

/// The result of a delete-like call: `gone` codes mean it is already done; `busy` codes mean
/// AWS has not let go of the resource yet, which is transient (retried, then requeued).
fn settled<T>(
    res: Result<T, CloudError>,
    gone: &[&str],
    busy: &[&str],
    operation: &'static str,
) -> Result<(), CloudError> {
    match res {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e, gone) => Ok(()),
        Err(CloudError::Rejected { code, message, .. }) if busy.contains(&code.as_str()) => {
            Err(CloudError::Transient { operation, message })
        }
        Err(e) => Err(e),
    }
}

fn aws_tags(t: &BTreeMap<String, String>) -> Vec<Tag> {
    t.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn aws_protocol(p: Protocol) -> ProtocolEnum {
    ProtocolEnum::from(p.as_aws())
}

impl AwsCloud {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        owner: Ownership,
        metrics: ControllerMetrics,
        limits: RateLimits,
    ) -> AwsCloud {
        // Our retries (counted and rate limited) replace the SDK's.
        let elb_conf = elbv2::config::Builder::from(sdk)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .build();
        let ec2_conf = ec2::config::Builder::from(sdk)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .build();
        AwsCloud {
            elb: elbv2::Client::from_conf(elb_conf),
            ec2: ec2::Client::from_conf(ec2_conf),
            owner,
            metrics,
            general: TokenBucket::new(limits.qps, limits.burst),
            targets: TokenBucket::new(limits.targets_qps, limits.targets_burst),
            networks: Mutex::new(BTreeMap::new()),
        }
    }

    /// An AwsCloud on the standard AWS configuration chain (see [`aws_config`]).
    pub async fn from_env(
        region: Option<&str>,
        owner: Ownership,
        metrics: ControllerMetrics,
        limits: RateLimits,
    ) -> AwsCloud {
        AwsCloud::new(&aws_config(region).await, owner, metrics, limits)
    }

    pub fn owner(&self) -> &Ownership {
        &self.owner
    }

    /// One AWS operation: rate limited, counted, retried when transient.
    async fn call<T, E, R, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let bucket = if matches!(operation, "RegisterTargets" | "DeregisterTargets") {
            &self.targets
        } else {
            &self.general
        };
        // A create that failed on the network may have reached AWS: retrying it blindly could
        // make it twice (LocalStack does; AWS answers idempotently). It fails the reconcile
        // instead, and the next one observes what exists by name.
        let maybe_applied = std::sync::atomic::AtomicBool::new(false);
        let creates = matches!(
            operation,
            "CreateLoadBalancer" | "CreateTargetGroup" | "CreateListener"
        );
        let attempt = || async {
            bucket.acquire().await;
            let res = f().await;
            let outcome = match res {
                Ok(v) => {
                    self.metrics
                        .aws_calls
                        .get_or_create(&AwsCallLabels {
                            operation,
                            outcome: "ok",
                        })
                        .inc();
                    return Ok(v);
                }
                Err(e) => classify(operation, e),
            };
            maybe_applied.store(
                outcome.1 == "network_error",
                std::sync::atomic::Ordering::Relaxed,
            );
            self.metrics
                .aws_calls
                .get_or_create(&AwsCallLabels {
                    operation,
                    outcome: outcome.1,
                })
                .inc();
            Err(outcome.0)
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(4)
                    .with_jitter(),
            )
            .when(|e| {
                e.is_transient()
                    && !(creates && maybe_applied.load(std::sync::atomic::Ordering::Relaxed))
            })
            .notify(|e, d| tracing::debug!(error = %e, delay = ?d, "retrying AWS call"))
            .await
    }

    // ---------------------------------------------------------------- observe

    /// Reads everything the Service owns. Reads scale with the Service (its names), never with
    /// the account. A same-named resource that is not ours is reported, never adopted.
    pub async fn observe(&self, q: &StackQuery) -> Result<ObservedStack, CloudError> {
        let mut stack = ObservedStack::default();
        let mut seen = BTreeSet::new();
        for name in &q.load_balancer_names {
            if !seen.insert(name.clone()) {
                continue;
            }
            let lb = match self.find_load_balancer(name, &q.service).await {
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
        let mut tg_arns: Vec<String> = Vec::new();
        if let Some(lb) = &stack.load_balancer {
            let arn = lb.arn.clone();
            let res = self
                .call("DescribeTargetGroups", || {
                    self.elb
                        .describe_target_groups()
                        .load_balancer_arn(&arn)
                        .send()
                })
                .await;
            match res {
                Ok(out) => tg_arns.extend(
                    out.target_groups()
                        .iter()
                        .filter_map(|t| t.target_group_arn().map(str::to_string)),
                ),
                // A load balancer without listeners (a crash right after CreateLoadBalancer):
                // LocalStack answers TargetGroupNotFound where AWS answers an empty list.
                Err(e) if not_found(&e, &["TargetGroupNotFound"]) => {}
                Err(e) => return Err(e),
            }
        }
        let mut found = Vec::new();
        if !tg_arns.is_empty() {
            let arns = tg_arns.clone();
            let out = self
                .call("DescribeTargetGroups", || {
                    self.elb
                        .describe_target_groups()
                        .set_target_group_arns(Some(arns.clone()))
                        .send()
                })
                .await?;
            found.extend(out.target_groups().to_vec());
        }
        for name in &q.target_group_names {
            if found
                .iter()
                .any(|t| t.target_group_name() == Some(name.as_str()))
            {
                continue;
            }
            let res = self
                .call("DescribeTargetGroups", || {
                    self.elb.describe_target_groups().names(name).send()
                })
                .await;
            match res {
                Ok(out) => found.extend(out.target_groups().to_vec()),
                Err(e) if not_found(&e, &["TargetGroupNotFound"]) => {}
                Err(e) => return Err(e),
            }
        }
        let arns: Vec<String> = found
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string))
            .collect();
        let tag_map = self.tags_of(&arns).await?;
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
            stack.target_groups.push(ObservedTargetGroup {
                health_check: observed_health_check(&tg),
                protocol: tg.protocol().and_then(|p| Protocol::from_aws(p.as_str())),
                port: tg.port().unwrap_or_default(),
                attributes: self.target_group_attributes(&arn).await?,
                targets: self.targets_of(&arn).await?,
                tags: t,
                name,
                arn,
            });
        }
        stack.security_group = self
            .find_security_group(&q.load_balancer_names, &q.service)
            .await?;
        Ok(stack)
    }

    /// The managed security group: named like the load balancer, tagged for this Service.
    async fn find_security_group(
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
            .call("DescribeSecurityGroups", || {
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
            for r in p.ip_ranges() {
                if let Some(c) = r.cidr_ip() {
                    ingress.insert(IngressRule {
                        protocol: protocol.clone(),
                        port,
                        cidr: c.to_string(),
                    });
                }
            }
        }
        Ok(Some(ObservedSecurityGroup {
            id: g.group_id().unwrap_or_default().to_string(),
            name: g.group_name().unwrap_or_default().to_string(),
            ingress,
            tags: g
                .tags()
                .iter()
                .filter_map(|t| {
                    Some((
                        t.key()?.to_string(),
                        t.value().unwrap_or_default().to_string(),
                    ))
                })
                .collect(),
        }))
    }

    async fn find_load_balancer(
        &self,
        name: &str,
        service: &str,
    ) -> Result<Option<(ObservedLoadBalancer, Vec<(String, String)>)>, CloudError> {
        let res = self
            .call("DescribeLoadBalancers", || {
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
        let attrs = self
            .call("DescribeLoadBalancerAttributes", || {
                self.elb
                    .describe_load_balancer_attributes()
                    .load_balancer_arn(&arn)
                    .send()
            })
            .await?;
        let listeners = self
            .call("DescribeListeners", || {
                self.elb.describe_listeners().load_balancer_arn(&arn).send()
            })
            .await?;
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
                .filter_map(|a| {
                    Some((
                        a.key()?.to_string(),
                        a.value().unwrap_or_default().to_string(),
                    ))
                })
                .collect(),
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
                .call("DescribeTags", || {
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
                    .filter_map(|t| {
                        Some((
                            t.key()?.to_string(),
                            t.value().unwrap_or_default().to_string(),
                        ))
                    })
                    .collect();
                out.insert(d.resource_arn().unwrap_or_default().to_string(), t);
            }
        }
        Ok(out)
    }

    async fn target_group_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, CloudError> {
        let out = self
            .call("DescribeTargetGroupAttributes", || {
                self.elb
                    .describe_target_group_attributes()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .attributes()
            .iter()
            .filter_map(|a| {
                Some((
                    a.key()?.to_string(),
                    a.value().unwrap_or_default().to_string(),
                ))
            })
            .collect())
    }

    async fn targets_of(&self, arn: &str) -> Result<BTreeSet<Target>, CloudError> {
        let out = self
            .call("DescribeTargetHealth", || {
                self.elb
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some(Target {
                    id: t.id()?.to_string(),
                    port: t.port().unwrap_or_default(),
                })
            })
            .collect())
    }

    // ---------------------------------------------------------------- bound target groups

    /// A target group by ARN, made by anyone (TargetGroupBindings bind groups cloudlb did not
    /// create): its type and tags, or `None` when it does not exist.
    pub async fn describe_target_group(
        &self,
        arn: &str,
    ) -> Result<Option<BoundTargetGroup>, CloudError> {
        let res = self
            .call("DescribeTargetGroups", || {
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
        let res = self
            .call("DescribeTargetHealth", || {
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
                .filter(|d| {
                    d.target_health().and_then(|h| h.state())
                        != Some(&elbv2::types::TargetHealthStateEnum::Draining)
                })
                .filter_map(|d| {
                    let t = d.target()?;
                    Some(Target {
                        id: t.id()?.to_string(),
                        port: t.port().unwrap_or_default(),
                    })
                })
                .collect(),
        ))
    }

    /// RegisterTargets in batches of 200 (rate limited as a target call).
    pub async fn register_targets(&self, arn: &str, targets: &[Target]) -> Result<(), CloudError> {
        for chunk in targets.chunks(200) {
            let ts = descriptions(chunk);
            self.call("RegisterTargets", || {
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
                .call("DeregisterTargets", || {
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

    // ---------------------------------------------------------------- network

    /// Subnets for a load balancer: the annotation's (ids, or Name tags), else discovered by the
    /// usual role tags (`kubernetes.io/role/elb` for internet-facing, `…/internal-elb` for
    /// internal), one per availability zone. Cached for ten minutes.
    async fn network(
        &self,
        wanted: Option<&[String]>,
        scheme: Scheme,
    ) -> Result<Network, CloudError> {
        let key = match wanted {
            Some(w) => w.join(","),
            None => format!("discover:{}", scheme.as_aws()),
        };
        if let Some(n) = self.networks.lock().await.get(&key) {
            if n.at.elapsed() < Duration::from_secs(600) {
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
                        .call("DescribeSubnets", || {
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
                        .call("DescribeSubnets", || {
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
                    .call("DescribeSubnets", || {
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
        self.networks.lock().await.insert(key, n.clone());
        Ok(n)
    }

    // ---------------------------------------------------------------- apply

    /// Applies a plan's changes in order, stopping at the first failure.
    pub async fn deploy(&self, plan: &Plan) -> Result<Deployed, CloudError> {
        let mut st = ApplyState::from_observed(&plan.observed);
        for c in &plan.changes {
            tracing::info!(change = %c, "applying");
            self.apply(c, plan.desired.as_ref(), &mut st).await?;
        }
        Ok(Deployed {
            dns_name: st.dns_name,
        })
    }

    /// Applies one change; `desired` supplies the placement of new resources.
    async fn apply(
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
                self.call("ModifyTargetGroup", || {
                    let mut r = self
                        .elb
                        .modify_target_group()
                        .target_group_arn(&arn)
                        .health_check_protocol(ProtocolEnum::from(h.protocol.as_aws()))
                        .health_check_port(&h.port)
                        .health_check_interval_seconds(h.interval_seconds)
                        .health_check_timeout_seconds(h.timeout_seconds)
                        .healthy_threshold_count(h.healthy_threshold)
                        .unhealthy_threshold_count(h.unhealthy_threshold);
                    if h.protocol != HealthCheckProtocol::Tcp {
                        r = r.set_health_check_path(h.path.clone());
                        if let Some(c) = &h.success_codes {
                            r = r.matcher(Matcher::builder().http_code(c).build());
                        }
                    }
                    r.send()
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
                    .call("CreateLoadBalancer", || {
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
                self.call("SetIpAddressType", || {
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
                self.call("ModifyLoadBalancerAttributes", || {
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
                self.call("AddTags", || {
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
                self.call("CreateListener", || {
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
                self.call("ModifyListener", || {
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
                    .call("DeleteListener", || {
                        self.elb.delete_listener().listener_arn(arn).send()
                    })
                    .await;
                settled(res, &["ListenerNotFound"], &[], "DeleteListener")?;
            }
            Change::DeleteLoadBalancer { arn, .. } => {
                let res = self
                    .call("DeleteLoadBalancer", || {
                        self.elb
                            .delete_load_balancer()
                            .load_balancer_arn(arn)
                            .send()
                    })
                    .await;
                settled(res, &["LoadBalancerNotFound"], &[], "DeleteLoadBalancer")?;
                if st.load_balancer_arn.as_deref() == Some(arn) {
                    st.load_balancer_arn = None;
                    st.dns_name = None;
                }
            }
            Change::CreateSecurityGroup(sg) => {
                let d = desired
                    .ok_or_else(|| CloudError::Internal("create without desired state".into()))?;
                let net = self.network(d.subnets.as_deref(), d.scheme).await?;
                let ec2_tags: Vec<ec2::types::Tag> = sg
                    .tags
                    .iter()
                    .map(|(k, v)| ec2::types::Tag::builder().key(k).value(v).build())
                    .collect();
                let out = self
                    .call("CreateSecurityGroup", || {
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
                self.call("RevokeSecurityGroupIngress", || {
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
                self.call("SetSecurityGroups", || {
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
                    .call("DeleteSecurityGroup", || {
                        self.ec2.delete_security_group().group_id(id).send()
                    })
                    .await;
                settled(
                    res,
                    &["InvalidGroup.NotFound"],
                    &["DependencyViolation"],
                    "DeleteSecurityGroup",
                )?;
                if st.security_group_id.as_deref() == Some(id) {
                    st.security_group_id = None;
                }
            }
            Change::DeleteTargetGroup { arn, .. } => {
                // Right after its listener or load balancer goes, AWS may still call the
                // group in use for a moment: that is transient here.
                let res = self
                    .call("DeleteTargetGroup", || {
                        self.elb.delete_target_group().target_group_arn(arn).send()
                    })
                    .await;
                settled(
                    res,
                    &["TargetGroupNotFound"],
                    &["ResourceInUse"],
                    "DeleteTargetGroup",
                )?;
            }
        }
        Ok(())
    }

    async fn authorize(&self, group: &str, rules: &[IngressRule]) -> Result<(), CloudError> {
        if rules.is_empty() {
            return Ok(());
        }
        let perms = permissions(rules);
        let res = self
            .call("AuthorizeSecurityGroupIngress", || {
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

    async fn create_target_group(
        &self,
        tg: &TargetGroupSpec,
        vpc_id: &str,
    ) -> Result<String, CloudError> {
        let h = &tg.health_check;
        let out = self
            .call("CreateTargetGroup", || {
                let mut r = self
                    .elb
                    .create_target_group()
                    .name(&tg.name)
                    .protocol(aws_protocol(tg.protocol))
                    .port(tg.port)
                    .vpc_id(vpc_id)
                    .target_type(TargetTypeEnum::from(tg.target_type.as_aws()))
                    .health_check_enabled(true)
                    .health_check_protocol(ProtocolEnum::from(h.protocol.as_aws()))
                    .health_check_port(&h.port)
                    .health_check_interval_seconds(h.interval_seconds)
                    .health_check_timeout_seconds(h.timeout_seconds)
                    .healthy_threshold_count(h.healthy_threshold)
                    .unhealthy_threshold_count(h.unhealthy_threshold)
                    .set_tags(Some(aws_tags(&tg.tags)));
                if h.protocol != HealthCheckProtocol::Tcp {
                    r = r.set_health_check_path(h.path.clone());
                    if let Some(c) = &h.success_codes {
                        r = r.matcher(Matcher::builder().http_code(c).build());
                    }
                }
                r.send()
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

    async fn modify_target_group_attributes(
        &self,
        arn: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        let attrs: Vec<TargetGroupAttribute> = attributes
            .iter()
            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
            .collect();
        self.call("ModifyTargetGroupAttributes", || {
            self.elb
                .modify_target_group_attributes()
                .target_group_arn(arn)
                .set_attributes(Some(attrs.clone()))
                .send()
        })
        .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- inventory (orphan sweep)

    /// Every load balancer and target group in the account tagged with our cluster, with tags.
    /// Lists the whole account: for the periodic orphan sweep and tests only.
    pub async fn inventory(&self) -> Result<Vec<TaggedResource>, CloudError> {
        let mut arns: Vec<(String, String)> = Vec::new();
        let mut attached: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut marker: Option<String> = None;
        loop {
            let m = marker.clone();
            let out = self
                .call("DescribeLoadBalancers", || {
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
                .call("DescribeTargetGroups", || {
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
                .call("DescribeSecurityGroups", || {
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
                        .filter_map(|t| {
                            Some((
                                t.key()?.to_string(),
                                t.value().unwrap_or_default().to_string(),
                            ))
                        })
                        .collect(),
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
    async fn tags_of_existing(
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

/// Ingress rules as EC2 permissions, one per (protocol, port) with all its CIDRs.
fn permissions(rules: &[IngressRule]) -> Vec<ec2::types::IpPermission> {
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

fn descriptions(ts: &[Target]) -> Vec<TargetDescription> {
    ts.iter()
        .map(|t| TargetDescription::builder().id(&t.id).port(t.port).build())
        .collect()
}

fn forward(tg_arn: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

fn certificates(l: &ListenerSpec) -> Option<Vec<Certificate>> {
    (l.protocol == Protocol::Tls).then(|| {
        l.certificates
            .iter()
            .map(|c| Certificate::builder().certificate_arn(c).build())
            .collect()
    })
}

/// The observed health check in the model's terms; fields AWS reports but that do not apply to
/// the protocol (a path on a TCP check) are dropped so they never look like drift.
fn observed_health_check(tg: &elbv2::types::TargetGroup) -> HealthCheckSpec {
    let protocol = HealthCheckProtocol::from_aws(
        tg.health_check_protocol()
            .map(|p| p.as_str())
            .unwrap_or_default(),
    );
    let http = protocol.is_http();
    HealthCheckSpec {
        protocol,
        port: tg.health_check_port().unwrap_or("traffic-port").to_string(),
        path: if http {
            tg.health_check_path().map(str::to_string)
        } else {
            None
        },
        interval_seconds: tg.health_check_interval_seconds().unwrap_or_default(),
        timeout_seconds: tg.health_check_timeout_seconds().unwrap_or_default(),
        healthy_threshold: tg.healthy_threshold_count().unwrap_or_default(),
        unhealthy_threshold: tg.unhealthy_threshold_count().unwrap_or_default(),
        success_codes: if http {
            tg.matcher().and_then(|m| m.http_code()).map(str::to_string)
        } else {
            None
        },
    }
}

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
