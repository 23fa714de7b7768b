//! Pod readiness gates, the pure part: which gates a pod declares, whether it waits on nothing
//! but them, the gate condition from its target's health in each target group, and which
//! not-ready endpoints still become targets (a gated pod is never Ready before it is a target).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::cloud::TargetHealth;
use crate::model::Target;

/// cloudlb's gate: `target-health.cloudlb.io/<service name>`, the Service in the pod's namespace.
pub const GATE_PREFIX: &str = "target-health.cloudlb.io/";
/// LBC's gate: `target-health.elbv2.k8s.aws/<TargetGroupBinding name>` (pkg/targetgroupbinding).
pub const LBC_GATE_PREFIX: &str = "target-health.elbv2.k8s.aws/";

/// Whose targets a gate waits for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GateOwner {
    /// A LoadBalancer Service of the pod's namespace (cloudlb's gate).
    Service(String),
    /// A TargetGroupBinding of the pod's namespace (LBC's gate, for users moving from LBC).
    Binding(String),
}

/// The pod's target-health gates: (condition type, owner).
pub fn gates(pod: &Pod) -> Vec<(String, GateOwner)> {
    pod.spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .filter_map(|g| {
            let t = &g.condition_type;
            let owner = if let Some(n) = t.strip_prefix(GATE_PREFIX) {
                GateOwner::Service(n.to_string())
            } else {
                GateOwner::Binding(t.strip_prefix(LBC_GATE_PREFIX)?.to_string())
            };
            Some((t.clone(), owner))
        })
        .collect()
}

/// A pod's status condition `type_`: its status (`True`/`False`/`Unknown`) and reason.
pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<(&'a str, Option<&'a str>)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_deref()))
}

/// Whether the pod waits only on readiness gates: its containers are ready and it is not
/// terminating. Such a pod is registered although its endpoint is not ready (LBC's rule), or
/// its gate could never pass.
pub fn ready_but_for_gates(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !gates(pod).is_empty()
        && condition(pod, "ContainersReady").map(|c| c.0) == Some("True")
}

/// What the gate condition should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateStatus {
    pub ready: bool,
    /// The target's state (`healthy`, `initial`, `unhealthy`, `draining`, …) in the first group
    /// where it is not healthy, `NotRegistered`, or `NoTargetGroup`.
    pub reason: String,
    pub message: String,
}

impl GateStatus {
    /// `True` or `False`, as the condition's status.
    pub fn status(&self) -> &'static str {
        if self.ready { "True" } else { "False" }
    }

    /// Whether `pod`'s condition `type_` already says this.
    pub fn is_set_on(&self, pod: &Pod, type_: &str) -> bool {
        condition(pod, type_) == Some((self.status(), Some(self.reason.as_str())))
    }
}

/// The gate from the pod's target in every target group of its owner (group name → the
/// target's health there, `None` when it is not registered): true once healthy in all.
pub fn gate_status(
    target: &Target,
    groups: &BTreeMap<String, Option<&TargetHealth>>,
) -> GateStatus {
    if groups.is_empty() {
        return GateStatus {
            ready: false,
            reason: "NoTargetGroup".into(),
            message: "no target group of this Service holds the pod yet".into(),
        };
    }
    for (name, health) in groups {
        let Some(h) = health else {
            return GateStatus {
                ready: false,
                reason: "NotRegistered".into(),
                message: format!("{}:{} is not registered in {name}", target.id, target.port),
            };
        };
        if h.state != "healthy" {
            let why = h.reason.as_deref().unwrap_or("");
            return GateStatus {
                ready: false,
                reason: h.state.clone(),
                message: format!(
                    "{}:{} is {} in {name} {why}",
                    target.id, target.port, h.state
                )
                .trim_end()
                .to_string(),
            };
        }
    }
    GateStatus {
        ready: true,
        reason: "healthy".into(),
        message: format!(
            "{}:{} is healthy in every target group",
            target.id, target.port
        ),
    }
}

/// Whether a group still moves without anyone changing it: a target is `initial` or draining.
pub fn in_transition(health: &[TargetHealth]) -> bool {
    health.iter().any(|h| {
        matches!(
            h.state.as_str(),
            "initial" | "draining" | "unhealthy.draining"
        )
    })
}

/// The Service's EndpointSlices with the endpoints of `waiting` pods (namespace, name) — ready
/// but for their gates — counted as ready, unless terminating.
pub fn with_gated_ready(
    slices: Vec<EndpointSlice>,
    waiting: &HashSet<(String, String)>,
) -> Vec<EndpointSlice> {
    if waiting.is_empty() {
        return slices;
    }
    slices
        .into_iter()
        .map(|mut s| {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            for e in s.endpoints.iter_mut().flatten() {
                let Some(pod) = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                else {
                    continue;
                };
                let key = (
                    pod.namespace.clone().unwrap_or_else(|| ns.clone()),
                    pod.name.clone().unwrap_or_default(),
                );
                let c = e.conditions.get_or_insert_with(Default::default);
                if c.ready != Some(true) && c.terminating != Some(true) && waiting.contains(&key) {
                    c.ready = Some(true);
                }
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(gates: &[&str], containers_ready: bool, deleting: bool) -> Pod {
        let gates: Vec<_> = gates.iter().map(|g| json!({"conditionType": g})).collect();
        let mut meta = json!({"name": "p", "namespace": "ns"});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"containers": [], "readinessGates": gates},
            "status": {"conditions": [{"type": "ContainersReady",
                "status": if containers_ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    fn health(state: &str, reason: Option<&str>) -> TargetHealth {
        TargetHealth {
            target: Target {
                id: "10.0.0.1".into(),
                port: 80,
            },
            state: state.into(),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn gates_name_their_service_or_binding() {
        let p = pod(
            &[
                "target-health.cloudlb.io/web",
                "target-health.elbv2.k8s.aws/k8s-ns-web-1234",
                "example.com/other",
            ],
            true,
            false,
        );
        assert_eq!(
            gates(&p),
            vec![
                (
                    "target-health.cloudlb.io/web".to_string(),
                    GateOwner::Service("web".into())
                ),
                (
                    "target-health.elbv2.k8s.aws/k8s-ns-web-1234".to_string(),
                    GateOwner::Binding("k8s-ns-web-1234".into())
                ),
            ]
        );
    }

    #[test]
    fn waiting_only_on_gates_needs_ready_containers_and_no_deletion() {
        let g = ["target-health.cloudlb.io/web"];
        let cases = [
            (pod(&g, true, false), true),
            (pod(&g, false, false), false),
            (pod(&g, true, true), false),
            (pod(&[], true, false), false),
        ];
        for (p, want) in cases {
            assert_eq!(ready_but_for_gates(&p), want, "{p:?}");
        }
    }

    #[test]
    fn gate_is_true_only_when_healthy_in_every_group() {
        let t = Target {
            id: "10.0.0.1".into(),
            port: 80,
        };
        let healthy = health("healthy", None);
        let initial = health("initial", Some("Elb.InitialHealthChecking"));
        let unhealthy = health("unhealthy", Some("Target.FailedHealthChecks"));
        type Groups<'a> = Vec<(&'a str, Option<&'a TargetHealth>)>;
        let table: Vec<(Groups, bool, &str)> = vec![
            (vec![], false, "NoTargetGroup"),
            (vec![("a", Some(&healthy))], true, "healthy"),
            (vec![("a", Some(&initial))], false, "initial"),
            (
                vec![("a", Some(&healthy)), ("b", Some(&initial))],
                false,
                "initial",
            ),
            (
                vec![("a", Some(&healthy)), ("b", None)],
                false,
                "NotRegistered",
            ),
            (vec![("a", Some(&unhealthy))], false, "unhealthy"),
            (
                vec![("a", Some(&healthy)), ("b", Some(&healthy))],
                true,
                "healthy",
            ),
        ];
        for (groups, ready, reason) in table {
            let groups: BTreeMap<String, Option<&TargetHealth>> = groups
                .into_iter()
                .map(|(n, h)| (n.to_string(), h))
                .collect();
            let got = gate_status(&t, &groups);
            assert_eq!(
                (got.ready, got.reason.as_str()),
                (ready, reason),
                "{groups:?}"
            );
        }
        let s = gate_status(
            &t,
            &[("a".to_string(), Some(&unhealthy))].into_iter().collect(),
        );
        assert_eq!(
            s.message,
            "10.0.0.1:80 is unhealthy in a Target.FailedHealthChecks"
        );
    }

    #[test]
    fn only_initial_and_draining_targets_are_in_transition() {
        let cases = [
            (vec![health("healthy", None)], false),
            (vec![health("unhealthy", None)], false),
            (vec![health("healthy", None), health("initial", None)], true),
            (vec![health("draining", None)], true),
            (vec![health("unhealthy.draining", None)], true),
            (vec![], false),
        ];
        for (h, want) in cases {
            assert_eq!(in_transition(&h), want, "{h:?}");
        }
    }

    #[test]
    fn gated_endpoints_count_as_ready_unless_terminating() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "gated"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true},
                 "targetRef": {"kind": "Pod", "name": "gated-going"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "unready"}}
            ]
        }))
        .unwrap();
        let waiting: HashSet<(String, String)> = [
            ("ns".to_string(), "gated".to_string()),
            ("ns".to_string(), "gated-going".to_string()),
        ]
        .into();
        let out = with_gated_ready(vec![slice], &waiting);
        let ready: Vec<Option<bool>> = out[0]
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.conditions.as_ref().and_then(|c| c.ready))
            .collect();
        assert_eq!(ready, vec![Some(true), Some(false), Some(false)]);
    }
}
