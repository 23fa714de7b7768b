//! Controller metrics (served on `/metrics` by `runtime::admin`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsCallLabels {
    pub operation: &'static str,
    /// `ok`, `throttled`, `server_error`, `client_error` or `network_error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Every metric the controller exports; cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct ControllerMetrics {
    pub aws_calls: Family<AwsCallLabels, Counter>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_seconds: Histogram,
    pub binding_reconciles: Family<ResultLabels, Counter>,
    pub binding_reconcile_seconds: Histogram,
    pub managed_load_balancers: Gauge,
    pub orphans_deleted: Counter,
    pub not_ready_withheld: Counter,
    pub leader: Gauge,
    /// DescribeTargetHealth calls of the readiness-gate tracker (also in `aws_calls`).
    pub target_health_polls: Counter,
    /// Pod readiness-gate conditions written (pods/status patches).
    pub readiness_gate_updates: Counter,
    registry: Arc<Registry>,
}

impl ControllerMetrics {
    pub fn new() -> ControllerMetrics {
        let mut r = Registry::with_prefix("cloudlb");
        let aws_calls = Family::<AwsCallLabels, Counter>::default();
        r.register(
            "aws_api_calls",
            "AWS API calls by operation and outcome",
            aws_calls.clone(),
        );
        let reconciles = Family::<ResultLabels, Counter>::default();
        r.register(
            "reconciles",
            "Service reconciles by result",
            reconciles.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        r.register(
            "reconcile_duration_seconds",
            "Time per Service reconcile",
            reconcile_seconds.clone(),
        );
        let binding_reconciles = Family::<ResultLabels, Counter>::default();
        r.register(
            "target_group_binding_reconciles",
            "TargetGroupBinding reconciles by result",
            binding_reconciles.clone(),
        );
        let binding_reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        r.register(
            "target_group_binding_reconcile_duration_seconds",
            "Time per TargetGroupBinding reconcile",
            binding_reconcile_seconds.clone(),
        );
        let managed_load_balancers = Gauge::default();
        r.register(
            "managed_load_balancers",
            "Services with a load balancer in status",
            managed_load_balancers.clone(),
        );
        let orphans_deleted = Counter::default();
        r.register(
            "orphans_deleted",
            "Cloud resources deleted by the orphan sweep",
            orphans_deleted.clone(),
        );
        let not_ready_withheld = Counter::default();
        r.register(
            "not_ready_targets_withheld",
            "NotReady nodes kept registered by the NotReady guard, counted per Service reconcile",
            not_ready_withheld.clone(),
        );
        let leader = Gauge::default();
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let target_health_polls = Counter::default();
        r.register(
            "target_health_polls",
            "DescribeTargetHealth calls made to follow targets in transition for pod readiness gates",
            target_health_polls.clone(),
        );
        let readiness_gate_updates = Counter::default();
        r.register(
            "readiness_gate_updates",
            "Pod readiness-gate conditions written",
            readiness_gate_updates.clone(),
        );
        ControllerMetrics {
            target_health_polls,
            readiness_gate_updates,
            aws_calls,
            reconciles,
            reconcile_seconds,
            binding_reconciles,
            binding_reconcile_seconds,
            managed_load_balancers,
            orphans_deleted,
            not_ready_withheld,
            leader,
            registry: Arc::new(r),
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
