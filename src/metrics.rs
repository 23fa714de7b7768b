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

/// One controller's reconciles: a count by result and the time each took.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    runs: Family<ResultLabels, Counter>,
    seconds: Histogram,
}

impl ReconcileMetrics {
    fn register(
        r: &mut Registry,
        runs_name: &str,
        runs_help: &str,
        seconds_name: &str,
        seconds_help: &str,
    ) -> ReconcileMetrics {
        let m = ReconcileMetrics {
            runs: Family::default(),
            seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        };
        r.register(runs_name, runs_help, m.runs.clone());
        r.register(seconds_name, seconds_help, m.seconds.clone());
        m
    }

    /// Starts timing one reconcile; it is recorded when the timer drops, as `error` unless
    /// [`ReconcileTimer::ok`] was called (so an early return or a panic is never lost).
    pub fn start(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            started: std::time::Instant::now(),
            result: "error",
        }
    }

    /// Reconciles recorded with `result` so far.
    pub fn count(&self, result: &'static str) -> u64 {
        self.runs.get_or_create(&ResultLabels { result }).get()
    }
}

/// Records one reconcile's duration and result on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a ReconcileMetrics,
    started: std::time::Instant,
    result: &'static str,
}

impl ReconcileTimer<'_> {
    /// The reconcile succeeded.
    pub fn ok(&mut self) {
        self.result = "ok";
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .seconds
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .runs
            .get_or_create(&ResultLabels {
                result: self.result,
            })
            .inc();
    }
}

/// Every metric the controller exports; cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct ControllerMetrics {
    pub aws_calls: Family<AwsCallLabels, Counter>,
    /// The Service controller's reconciles.
    pub services: ReconcileMetrics,
    /// The TargetGroupBinding controller's reconciles.
    pub bindings: ReconcileMetrics,
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
        let services = ReconcileMetrics::register(
            &mut r,
            "reconciles",
            "Service reconciles by result",
            "reconcile_duration_seconds",
            "Time per Service reconcile",
        );
        let bindings = ReconcileMetrics::register(
            &mut r,
            "target_group_binding_reconciles",
            "TargetGroupBinding reconciles by result",
            "target_group_binding_reconcile_duration_seconds",
            "Time per TargetGroupBinding reconcile",
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
            services,
            bindings,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_counts_as_error_unless_it_says_ok_and_is_always_timed() {
        let m = ControllerMetrics::new();
        {
            let mut t = m.services.start();
            t.ok();
        }
        {
            // An early return (or a panic) without `ok`.
            let _t = m.services.start();
        }
        drop(m.bindings.start());
        assert_eq!(m.services.count("ok"), 1);
        assert_eq!(m.services.count("error"), 1);
        assert_eq!(m.bindings.count("error"), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry()).unwrap();
        for line in [
            "cloudlb_reconciles_total{result=\"ok\"} 1",
            "cloudlb_reconcile_duration_seconds_count 2",
            "cloudlb_target_group_binding_reconciles_total{result=\"error\"} 1",
            "cloudlb_target_group_binding_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
