//! The generated CRDs: the committed YAML is exactly what `cloudlb crdgen` prints, and the real
//! apiserver accepts it and enforces its schema (issue 5).

use cloudlb_testkit as support;

use std::process::Command;

use support::{Rig, TestNamespace, repo_root};

/// The CRD files committed in the repository (the chart ships the second one).
const GENERATED: [&str; 2] = [
    "crds/targetgroupbindings.yaml",
    "charts/cloudlb/crds/targetgroupbindings.yaml",
];

const CRD_NAME: &str = "targetgroupbindings.cloudlb.io";
const ARN: &str =
    "arn:aws:elasticloadbalancing:us-east-1:000000000000:targetgroup/web-tg/0123456789abcdef";

fn crdgen() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cloudlb"))
        .arg("crdgen")
        .output()
        .expect("run cloudlb crdgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn committed_crd_yaml_is_the_crdgen_output() {
    let want = crdgen();
    assert!(want.contains(&format!("name: {CRD_NAME}")), "{want}");
    for file in GENERATED {
        let have = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            have == want,
            "{file} is stale: regenerate it with `cargo run -- crdgen > {file}`"
        );
    }
}

/// Applies the CRDs and waits until the apiserver serves them (other tests may have done so).
fn install_crds(rig: &Rig) {
    let dir = repo_root().join("crds");
    rig.kubectl(&["apply", "-f", dir.to_str().expect("utf8 path")]);
    rig.kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD_NAME}"),
        "--timeout=30s",
    ]);
}

/// `kubectl apply` of a manifest on stdin; returns (success, stderr).
fn apply(rig: &Rig, ns: &str, manifest: &serde_json::Value) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(support::tool("kubectl"))
        .args(["apply", "-n", ns, "-f", "-"])
        .env("KUBECONFIG", &rig.kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(manifest.to_string().as_bytes())
        .expect("write manifest");
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn binding(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cloudlb.io/v1beta1",
        "kind": "TargetGroupBinding",
        "metadata": {"name": name},
        "spec": spec,
    })
}

#[tokio::test]
async fn apiserver_accepts_the_crds_and_enforces_their_schema() {
    let rig = Rig::get();
    install_crds(rig);
    let ns = TestNamespace::new(rig, "crd").await;

    let good = binding(
        "web",
        serde_json::json!({"targetGroupARN": ARN, "serviceRef": {"name": "web", "port": 80}}),
    );
    let (ok, err) = apply(rig, &ns.name, &good);
    assert!(ok, "a valid binding must be accepted: {err}");
    let defaulted = rig.kubectl(&[
        "get",
        "tgb",
        "web",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.spec.targetType}",
    ]);
    assert_eq!(defaulted, "instance", "targetType defaults to instance");

    // Each of these must be refused by the apiserver, naming the field and the reason.
    let refused = [
        (
            "not an ARN",
            serde_json::json!({"targetGroupARN": "web-tg", "serviceRef": {"name": "web", "port": 80}}),
            "spec.targetGroupARN",
        ),
        (
            "a load balancer ARN",
            serde_json::json!({
                "targetGroupARN": "arn:aws:elasticloadbalancing:us-east-1:0:loadbalancer/net/a/b",
                "serviceRef": {"name": "web", "port": 80}}),
            "spec.targetGroupARN",
        ),
        (
            "unknown target type",
            serde_json::json!({"targetGroupARN": ARN, "targetType": "alb", "serviceRef": {"name": "web", "port": 80}}),
            "spec.targetType",
        ),
        (
            "port out of range",
            serde_json::json!({"targetGroupARN": ARN, "serviceRef": {"name": "web", "port": 70000}}),
            "port must be a number from 1 to 65535",
        ),
        (
            "missing serviceRef",
            serde_json::json!({"targetGroupARN": ARN}),
            "spec.serviceRef",
        ),
        (
            "nodeSelector with ip targets",
            serde_json::json!({"targetGroupARN": ARN, "targetType": "ip",
                "serviceRef": {"name": "web", "port": "http"},
                "nodeSelector": {"matchLabels": {"pool": "edge"}}}),
            "nodeSelector applies only to targetType instance",
        ),
    ];
    for (i, (what, spec, needle)) in refused.into_iter().enumerate() {
        let (ok, err) = apply(rig, &ns.name, &binding(&format!("bad-{i}"), spec));
        assert!(!ok, "{what}: must be refused");
        assert!(err.contains(needle), "{what}: expected {needle:?} in {err}");
    }

    // The bound target group cannot be swapped under a running binding.
    let moved = binding(
        "web",
        serde_json::json!({
            "targetGroupARN": ARN.replace("web-tg", "other-tg"),
            "serviceRef": {"name": "web", "port": 80}}),
    );
    let (ok, err) = apply(rig, &ns.name, &moved);
    assert!(!ok, "changing targetGroupARN must be refused");
    assert!(err.contains("targetGroupARN is immutable"), "{err}");

    // Status is a subresource: what the controller writes there shows in the columns.
    let status = serde_json::json!({"status": {
        "observedGeneration": 1, "registeredTargets": 3,
        "conditions": [{"type": "Ready", "status": "True", "reason": "TargetsRegistered",
                        "message": "3 targets", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    }});
    rig.kubectl(&[
        "patch",
        "tgb",
        "web",
        "-n",
        &ns.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let table = rig.kubectl(&["get", "targetgroupbindings", "-n", &ns.name]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "SERVICE", "PORT", "TYPE", "TARGETS", "READY", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..6],
        ["web", "web", "80", "instance", "3", "True"],
        "{table}"
    );

    let wide = rig.kubectl(&["get", "tgb", "-n", &ns.name, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap_or_default().ends_with("ARN"),
        "{wide}"
    );
    assert!(wide.contains(ARN), "{wide}");

    // Bindings of one Service are found by field selector (the controller's Service → binding map).
    let by_service = |svc: &str| {
        rig.kubectl(&[
            "get",
            "tgb",
            "-n",
            &ns.name,
            "--field-selector",
            &format!("spec.serviceRef.name={svc}"),
            "-o",
            "name",
        ])
    };
    assert_eq!(
        by_service("web").trim(),
        "targetgroupbinding.cloudlb.io/web"
    );
    assert_eq!(by_service("other").trim(), "");

    // The category lists it with everything else of ours.
    let by_category = rig.kubectl(&["get", "cloudlb", "-n", &ns.name, "-o", "name"]);
    assert!(
        by_category.contains("targetgroupbinding.cloudlb.io/web"),
        "{by_category}"
    );
}
