//! Which nodes and pod endpoints become targets: eligibility rules for nodes, ready
//! addresses from EndpointSlices. Pure functions of the watched objects.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use super::{NodeTarget, Target};

/// Nodes that should receive traffic: Ready (unless `include_not_ready`), not excluded by label,
/// not being removed by an autoscaler, matching `selector`, and with an EC2 instance id.
pub fn eligible_nodes<N: Borrow<Node>>(
    nodes: &[N],
    selector: &BTreeMap<String, String>,
    include_not_ready: bool,
) -> Vec<NodeTarget> {
    let mut out: Vec<NodeTarget> = nodes
        .iter()
        .map(Borrow::borrow)
        .filter(|n: &&Node| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            let labels = n.metadata.labels.as_ref();
            let has = |k: &str| labels.is_some_and(|l| l.contains_key(k));
            !has("node.kubernetes.io/exclude-from-external-load-balancers")
                && selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|n| {
            let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref());
            !taints.is_some_and(|ts| {
                ts.iter().any(|t| {
                    t.key == "ToBeDeletedByClusterAutoscaler"
                        || t.key == "karpenter.sh/disrupted"
                        || t.key == "karpenter.sh/disruption"
                })
            })
        })
        .filter(|n| include_not_ready || node_ready(n))
        .filter_map(|n| {
            let provider = n.spec.as_ref()?.provider_id.as_deref()?;
            Some(NodeTarget {
                name: n.metadata.name.clone()?,
                instance_id: instance_id_from_provider_id(provider)?.to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// NotReady nodes a guard kept registered: `not_ready` of `candidates` turned NotReady, more
/// than the guard's share, which looks like a control-plane or network blip rather than that
/// many dead machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Withheld {
    pub not_ready: usize,
    pub candidates: usize,
}

/// [`eligible_nodes`] with the NotReady guard (a panic threshold, as NLBs fail open when every
/// target is unhealthy): when more than `guard_percent` % of the nodes that qualify but for
/// readiness are NotReady, all of them stay targets and the health checks decide. Nodes that
/// are gone from the cluster (or tainted for removal, excluded, deleting) are never kept.
pub fn guarded_eligible_nodes<N: Borrow<Node>>(
    nodes: &[N],
    selector: &BTreeMap<String, String>,
    include_not_ready: bool,
    guard_percent: u8,
) -> (Vec<NodeTarget>, Option<Withheld>) {
    let ready = eligible_nodes(nodes, selector, include_not_ready);
    if include_not_ready {
        return (ready, None);
    }
    let candidates = eligible_nodes(nodes, selector, true);
    let not_ready = candidates.len() - ready.len();
    if not_ready * 100 > usize::from(guard_percent) * candidates.len() {
        let withheld = Withheld {
            not_ready,
            candidates: candidates.len(),
        };
        return (candidates, Some(withheld));
    }
    (ready, None)
}

/// Whether the node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `aws:///us-east-1a/i-0abc` → `i-0abc`.
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    id.starts_with("i-").then_some(id)
}

/// Ready pod addresses and their port, per Service port name (for `ip` targets).
pub fn endpoint_targets(slices: &[EndpointSlice], port_name: &str) -> BTreeSet<Target> {
    let mut out = BTreeSet::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                for a in &e.addresses {
                    out.insert(Target {
                        id: a.clone(),
                        port,
                    });
                }
            }
        }
    }
    out
}

/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The EndpointSlices of Service `namespace/name` among `slices`.
pub fn slices_of_service<'a, S>(slices: &'a [S], namespace: &str, name: &str) -> Vec<EndpointSlice>
where
    S: std::ops::Deref<Target = EndpointSlice> + 'a,
{
    slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .map(|s| (**s).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"providerID": format!("aws:///us-east-1a/i-{name}")},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_not_ready_guard_keeps_nodes_only_past_its_share() {
        // (ready, not ready, guard %, include_not_ready) → (targets, withheld)
        let cases = [
            (4, 0, 50, false, 4, false),
            (3, 1, 50, false, 3, false),
            (2, 2, 50, false, 2, false),
            (1, 3, 50, false, 4, true),
            (0, 2, 50, false, 2, true),
            (0, 2, 100, false, 0, false),
            (3, 1, 0, false, 4, true),
            (1, 3, 50, true, 4, false),
            (0, 0, 50, false, 0, false),
        ];
        for (ready, not_ready, guard, include, want, withheld) in cases {
            let mut ns: Vec<Node> = (0..ready).map(|i| node(&format!("r{i}"), true)).collect();
            ns.extend((0..not_ready).map(|i| node(&format!("n{i}"), false)));
            let (targets, w) = guarded_eligible_nodes(&ns, &BTreeMap::new(), include, guard);
            assert_eq!(
                (targets.len(), w.is_some()),
                (want, withheld),
                "{ready} ready, {not_ready} not, guard {guard}, include {include}"
            );
        }
    }
}
