//! The pod mutator, pure: an AdmissionReview of a Pod create in, the AdmissionReview answer out,
//! adding the `target-health.cloudlb.io/<service>` readiness gate for every ip-target
//! LoadBalancer Service of ours whose selector matches the pod. Always allowed: injection never
//! blocks a pod (LBC's pod_mutator, with cloudlb's names).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use serde_json::{Value, json};

use super::super::ClusterArgs;
use super::super::readiness::gate::GATE_PREFIX;
use super::super::service::{is_ours, uses_ip_targets};

/// The gate condition types `pod` should carry: one per ip-target Service of ours in `ns`
/// (among `services`) whose non-empty selector matches the pod's labels.
pub fn gates_for<'a>(
    pod_labels: &BTreeMap<String, String>,
    ns: &str,
    services: impl IntoIterator<Item = &'a Service>,
    cluster: &ClusterArgs,
) -> Vec<String> {
    let mut out: Vec<String> = services
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(ns))
        .filter(|s| is_ours(s, cluster) && uses_ip_targets(s))
        .filter(|s| {
            let sel = s.spec.as_ref().and_then(|sp| sp.selector.as_ref());
            sel.is_some_and(|sel| {
                !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
            })
        })
        .map(|s| format!("{GATE_PREFIX}{}", s.name_any()))
        .collect();
    out.sort();
    out
}

/// The JSON patch adding the gates `pod` lacks (`None` when it has them all).
pub fn patch(pod: &Pod, gates: &[String]) -> Option<Value> {
    let existing: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .map(|g| g.condition_type.as_str())
        .collect();
    let missing: Vec<Value> = gates
        .iter()
        .filter(|g| !existing.contains(&g.as_str()))
        .map(|g| json!({"conditionType": g}))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let has_list = pod
        .spec
        .as_ref()
        .is_some_and(|s| s.readiness_gates.is_some());
    Some(if has_list {
        Value::Array(
            missing
                .into_iter()
                .map(|g| json!({"op": "add", "path": "/spec/readinessGates/-", "value": g}))
                .collect(),
        )
    } else {
        json!([{"op": "add", "path": "/spec/readinessGates", "value": missing}])
    })
}

/// Answers one AdmissionReview (`admission.k8s.io/v1`); `gates(namespace, pod)` names the
/// gates. Anything unreadable is allowed unchanged.
pub fn review(body: &Value, gates: impl Fn(&str, &Pod) -> Vec<String>) -> Value {
    let req = &body["request"];
    let uid = req["uid"].clone();
    let ns = req["namespace"].as_str().unwrap_or_default();
    let mut response = json!({"uid": uid, "allowed": true});
    if let Ok(pod) = serde_json::from_value::<Pod>(req["object"].clone()) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or(ns);
        if let Some(p) = patch(&pod, &gates(ns, &pod)) {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64(p.to_string().as_bytes()));
        }
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Standard base64 with padding (the admission patch's encoding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(A[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct A {
            #[command(flatten)]
            c: ClusterArgs,
        }
        A::parse_from(["x", "--cluster-name", "c"]).c
    }

    fn svc(name: &str, ns: &str, class: &str, ip: bool, selector: Value) -> Service {
        let mut ann = serde_json::Map::new();
        if ip {
            ann.insert(
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type".into(),
                json!("ip"),
            );
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "annotations": ann},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": selector,
                     "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn gates_for_ip_services_of_ours_selecting_the_pod() {
        let c = cluster();
        let ours = "cloudlb.io/nlb";
        let services = [
            svc("web", "ns", ours, true, json!({"app": "web"})),
            svc("inst", "ns", ours, false, json!({"app": "web"})),
            svc(
                "other-class",
                "ns",
                "example.com/lb",
                true,
                json!({"app": "web"}),
            ),
            svc("other-ns", "ns2", ours, true, json!({"app": "web"})),
            svc("no-selector", "ns", ours, true, json!({})),
            svc("db", "ns", ours, true, json!({"app": "db"})),
            svc(
                "web-all",
                "ns",
                ours,
                true,
                json!({"app": "web", "tier": "front"}),
            ),
        ];
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "front".to_string()),
        ]
        .into();
        assert_eq!(
            gates_for(&labels, "ns", &services, &c),
            vec![
                "target-health.cloudlb.io/web".to_string(),
                "target-health.cloudlb.io/web-all".to_string()
            ]
        );
    }

    #[test]
    fn patch_adds_only_missing_gates() {
        let g = vec!["target-health.cloudlb.io/web".to_string()];
        let bare: Pod = serde_json::from_value(json!({"spec": {"containers": []}})).unwrap();
        assert_eq!(
            patch(&bare, &g),
            Some(json!([{"op": "add", "path": "/spec/readinessGates",
                         "value": [{"conditionType": "target-health.cloudlb.io/web"}]}]))
        );
        let other: Pod = serde_json::from_value(json!({"spec": {"containers": [],
            "readinessGates": [{"conditionType": "x/y"}]}}))
        .unwrap();
        assert_eq!(
            patch(&other, &g),
            Some(json!([{"op": "add", "path": "/spec/readinessGates/-",
                         "value": {"conditionType": "target-health.cloudlb.io/web"}}]))
        );
        let has: Pod = serde_json::from_value(json!({"spec": {"containers": [],
            "readinessGates": [{"conditionType": "target-health.cloudlb.io/web"}]}}))
        .unwrap();
        assert_eq!(patch(&has, &g), None);
        assert_eq!(patch(&bare, &[]), None);
    }

    #[test]
    fn review_allows_always_and_patches_when_needed() {
        let body = json!({"request": {"uid": "u1", "namespace": "ns",
            "object": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}});
        let out = review(&body, |ns, _| {
            assert_eq!(ns, "ns");
            vec!["target-health.cloudlb.io/web".into()]
        });
        assert_eq!(out["response"]["uid"], "u1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let garbage = review(&json!({"request": {"uid": "u2", "object": 7}}), |_, _| {
            vec!["g".into()]
        });
        assert_eq!(garbage["response"], json!({"uid": "u2", "allowed": true}));
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ];
        for (plain, enc) in cases {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }
}
