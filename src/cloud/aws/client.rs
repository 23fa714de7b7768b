//! The AWS clients and the one way to call them: [`AwsCloud::call`] with a client-side token
//! bucket, a Prometheus counter per operation and outcome, error classes, and jittered retries
//! for throttling, 5xx and network errors (the SDK's own retries are off so that each attempt is
//! counted and limited). How each operation is called is typed ([`Op`]), never matched by name.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::Mutex;

use super::network::Network;
use crate::cloud::CloudError;
use crate::cloud::ratelimit::TokenBucket;
use crate::metrics::{AwsCallLabels, ControllerMetrics};
use crate::model::tags;

/// Which token bucket an operation draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Everything but target (de)registration.
    General,
    /// RegisterTargets / DeregisterTargets, which AWS limits separately.
    Targets,
}

/// How one AWS operation is called.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// The operation's name, for metrics, logs and errors.
    pub name: &'static str,
    pub bucket: Bucket,
    /// A create: after a network error it may have taken effect, so it is never retried
    /// blindly (the next reconcile observes what exists by name instead).
    pub creates: bool,
    /// Changes nothing: allowed after the leader lease is lost (see [`AwsCloud::fenced_by`]).
    pub reads: bool,
}

impl Op {
    const fn general(name: &'static str) -> Op {
        Op {
            name,
            bucket: Bucket::General,
            creates: false,
            reads: false,
        }
    }

    const fn read(name: &'static str) -> Op {
        Op {
            reads: true,
            ..Op::general(name)
        }
    }

    const fn create(name: &'static str) -> Op {
        Op {
            creates: true,
            ..Op::general(name)
        }
    }

    const fn targets(name: &'static str) -> Op {
        Op {
            bucket: Bucket::Targets,
            ..Op::general(name)
        }
    }
}

/// Every operation cloudlb calls.
pub mod ops {
    use super::Op;

    pub const ADD_TAGS: Op = Op::general("AddTags");
    pub const REMOVE_TAGS: Op = Op::general("RemoveTags");
    pub const AUTHORIZE_SECURITY_GROUP_INGRESS: Op = Op::general("AuthorizeSecurityGroupIngress");
    pub const CREATE_LISTENER: Op = Op::create("CreateListener");
    pub const CREATE_LOAD_BALANCER: Op = Op::create("CreateLoadBalancer");
    pub const CREATE_SECURITY_GROUP: Op = Op::general("CreateSecurityGroup");
    pub const CREATE_TARGET_GROUP: Op = Op::create("CreateTargetGroup");
    pub const DELETE_LISTENER: Op = Op::general("DeleteListener");
    pub const DELETE_LOAD_BALANCER: Op = Op::general("DeleteLoadBalancer");
    pub const DELETE_SECURITY_GROUP: Op = Op::general("DeleteSecurityGroup");
    pub const DELETE_TARGET_GROUP: Op = Op::general("DeleteTargetGroup");
    pub const DEREGISTER_TARGETS: Op = Op::targets("DeregisterTargets");
    pub const DESCRIBE_LISTENERS: Op = Op::read("DescribeListeners");
    pub const DESCRIBE_LOAD_BALANCER_ATTRIBUTES: Op = Op::read("DescribeLoadBalancerAttributes");
    pub const DESCRIBE_LOAD_BALANCERS: Op = Op::read("DescribeLoadBalancers");
    pub const DESCRIBE_SECURITY_GROUPS: Op = Op::read("DescribeSecurityGroups");
    pub const DESCRIBE_SUBNETS: Op = Op::read("DescribeSubnets");
    pub const DESCRIBE_INSTANCES: Op = Op::read("DescribeInstances");
    pub const DESCRIBE_TAGS: Op = Op::read("DescribeTags");
    pub const DESCRIBE_TARGET_GROUP_ATTRIBUTES: Op = Op::read("DescribeTargetGroupAttributes");
    pub const DESCRIBE_TARGET_GROUPS: Op = Op::read("DescribeTargetGroups");
    pub const DESCRIBE_TARGET_HEALTH: Op = Op::read("DescribeTargetHealth");
    pub const MODIFY_LISTENER: Op = Op::general("ModifyListener");
    pub const MODIFY_LOAD_BALANCER_ATTRIBUTES: Op = Op::general("ModifyLoadBalancerAttributes");
    pub const MODIFY_TARGET_GROUP: Op = Op::general("ModifyTargetGroup");
    pub const MODIFY_TARGET_GROUP_ATTRIBUTES: Op = Op::general("ModifyTargetGroupAttributes");
    pub const REGISTER_TARGETS: Op = Op::targets("RegisterTargets");
    pub const REVOKE_SECURITY_GROUP_INGRESS: Op = Op::general("RevokeSecurityGroupIngress");
    pub const SET_IP_ADDRESS_TYPE: Op = Op::general("SetIpAddressType");
    pub const SET_SECURITY_GROUPS: Op = Op::general("SetSecurityGroups");
}

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

/// Who we are in the account: resources are ours only with this cluster's tag, and, when they
/// carry a class tag, this installation's class.
#[derive(Clone, Debug)]
pub struct Ownership {
    pub cluster: String,
    pub class: String,
}

impl Ownership {
    /// Whether `t` marks a resource of this cluster and class for Service `ns/name`. A resource
    /// without a class tag (made before cloudlb tagged classes) is this Service's: a sync adopts
    /// it by adding the tag; one of another class is another installation's.
    pub fn owns(&self, t: &BTreeMap<String, String>, service: &str) -> bool {
        t.get(tags::CLUSTER) == Some(&self.cluster)
            && t.get(tags::SERVICE).map(String::as_str) == Some(service)
            && t.get(tags::CLASS).is_none_or(|c| *c == self.class)
    }
}

/// The AWS side of the controller.
pub struct AwsCloud {
    pub(super) elb: elbv2::Client,
    pub(super) ec2: ec2::Client,
    pub(super) owner: Ownership,
    pub(super) metrics: ControllerMetrics,
    pub(super) general: TokenBucket,
    pub(super) targets: TokenBucket,
    pub(super) networks: Mutex<BTreeMap<String, Network>>,
    /// `--vpc-id`, or the VPC found from the nodes' instances (once).
    pub(super) vpc: Mutex<Option<String>>,
    /// Cancelled when this replica lost the leader lease: every write fails from then on.
    pub(super) fence: Option<tokio_util::sync::CancellationToken>,
}

/// The error code AWS (or LocalStack) gave, if any.
pub(super) fn code_of<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<String> {
    e.code().map(str::to_string)
}

pub(super) fn classify<E, R>(
    operation: &'static str,
    e: SdkError<E, R>,
) -> (CloudError, &'static str)
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

pub(super) fn not_found(e: &CloudError, codes: &[&str]) -> bool {
    matches!(e, CloudError::Rejected { code, .. } if codes.contains(&code.as_str()))
}

/// The result of a delete-like call: `gone` codes mean it is already done; `busy` codes mean
/// AWS has not let go of the resource yet, which is transient (retried, then requeued).
pub(super) fn settled<T>(
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
            vpc: Mutex::new(None),
            fence: None,
        }
    }

    /// Refuses every write once `lost` is cancelled (the leader lease is gone), so a reconcile,
    /// binding sync or sweep still in flight cannot write beside the next leader.
    pub fn fenced_by(mut self, lost: tokio_util::sync::CancellationToken) -> AwsCloud {
        self.fence = Some(lost);
        self
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

    /// Pins the cluster's VPC (`--vpc-id`); without it the VPC is found from the nodes.
    pub fn with_vpc(self, vpc: Option<String>) -> AwsCloud {
        AwsCloud {
            vpc: Mutex::new(vpc),
            ..self
        }
    }

    pub fn owner(&self) -> &Ownership {
        &self.owner
    }

    /// One AWS operation: rate limited, counted, retried when transient.
    pub(super) async fn call<T, E, R, F, Fut>(&self, op: Op, f: F) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let bucket = match op.bucket {
            Bucket::Targets => &self.targets,
            Bucket::General => &self.general,
        };
        let operation = op.name;
        // A create that failed on the network may have reached AWS: retrying it blindly could
        // make it twice (LocalStack does; AWS answers idempotently). It fails the reconcile
        // instead, and the next one observes what exists by name.
        let maybe_applied = std::sync::atomic::AtomicBool::new(false);
        let creates = op.creates;
        let fenced = || !op.reads && self.fence.as_ref().is_some_and(|f| f.is_cancelled());
        let attempt = || async {
            bucket.acquire().await;
            // Checked right before sending (also on retries and after waiting for a token).
            if fenced() {
                return Err(CloudError::Fenced { operation });
            }
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
}
