//! The Helm chart (issue 5): it lints, renders what the values say, refuses bad values, installs
//! on the real apiserver, and its ServiceAccounts can do exactly what the components need.

use cloudlb_testkit as support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use serde::Deserialize;
use serde_json::{Value, json};
use support::{Rig, TestNamespace, helm, repo_root, text, unique};

fn chart_dir() -> PathBuf {
    repo_root().join("charts/cloudlb")
}

/// `helm template` with `--set` values; panics when it fails.
fn render(sets: &[&str]) -> Vec<Value> {
    let out = template(sets);
    assert!(out.status.success(), "helm template: {}", text(&out));
    let yaml = String::from_utf8(out.stdout).expect("utf8");
    serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn template(sets: &[&str]) -> Output {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "rel",
        chart.to_str().expect("utf8 path"),
        "--namespace",
        "lb-system",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn one<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "want exactly one {kind} {name}");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

/// (apiGroup, resource, verb) triples a rendered (Cluster)Role grants; resourceNames marked.
fn grants(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names = strings(&rule["resourceNames"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let scope = if names.is_empty() {
                        String::new()
                    } else {
                        format!(" names={}", names.join(","))
                    };
                    out.insert(format!("{group}/{resource} {verb}{scope}"));
                }
            }
        }
    }
    out
}

fn set_of(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn helm_lint_passes_with_default_and_custom_values() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf8 path");
    let out = helm(&["lint", "--strict", chart, "--set", "clusterName=lint"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = helm(&[
        "lint",
        "--strict",
        chart,
        "--set",
        "clusterName=lint,region=eu-west-1,awsEndpoint=http://127.0.0.1:4566,defaultClass=true",
        "--set",
        "nodeProxy.enabled=true,nodeProxy.bindPrivilegedPorts=true,controller.replicas=3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn schema_refuses_missing_and_malformed_values() {
    let cases: [(&[&str], &str); 7] = [
        (&[], "clusterName"),
        (&["clusterName="], "clusterName"),
        (&["clusterName=a b"], "clusterName"),
        (&["clusterName=x", "controller.replicas=two"], "replicas"),
        (&["clusterName=x", "clustername=typo"], "clustername"),
        (
            &["clusterName=x", "loadBalancerClass=nlb"],
            "loadBalancerClass",
        ),
        (
            &["clusterName=x", "awsEndpoint=localhost:4566"],
            "awsEndpoint",
        ),
    ];
    for (sets, field) in cases {
        let out = template(sets);
        let msg = text(&out);
        assert!(!out.status.success(), "{sets:?} must be refused");
        assert!(
            msg.contains("schema") && msg.contains(field),
            "{sets:?}: expected a schema error naming {field}: {msg}"
        );
    }
}

#[test]
fn default_values_render_a_locked_down_two_replica_controller_and_no_node_proxy() {
    let docs = render(&["clusterName=prod"]);
    assert_eq!(
        kinds(&docs),
        set_of(&[
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ]),
        "no DaemonSet unless nodeProxy.enabled"
    );
    // The readiness-gate webhook: never blocking, only for namespaces that opt in.
    let hooks = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("webhook configuration");
    let selectors: Vec<&Value> = hooks["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .inspect(|w| {
            assert_eq!(w["failurePolicy"], "Ignore");
            assert_eq!(w["sideEffects"], "None");
            assert_eq!(w["clientConfig"]["service"]["path"], "/mutate-pod");
        })
        .map(|w| &w["namespaceSelector"]["matchLabels"])
        .collect();
    assert_eq!(
        selectors,
        vec![
            &json!({"cloudlb.io/pod-readiness-gate-inject": "enabled"}),
            &json!({"elbv2.k8s.aws/pod-readiness-gate-inject": "enabled"})
        ]
    );
    let deploy = one(&docs, "Deployment", "rel-cloudlb-controller");
    assert_eq!(deploy["metadata"]["namespace"], "lb-system");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "rel-cloudlb-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "cloudlb:0.1.0");
    assert_eq!(
        strings(&c["args"]),
        [
            "controller",
            "--cluster-name=prod",
            "--load-balancer-class=cloudlb.io/nlb",
            "--metrics-addr=0.0.0.0:8080",
            "--leader-elect",
            "--lease-namespace=lb-system",
            "--lease-name=rel-cloudlb-controller",
            "--webhook-addr=0.0.0.0:9443",
            "--webhook-cert-dir=/webhook-certs",
        ]
    );
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "rel-cloudlb-controller-webhook-tls"
    );
    assert_eq!(c["volumeMounts"][0]["readOnly"], true);
    assert!(env_value(c, "AWS_ENDPOINT_URL").is_none());
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert!(pod["affinity"]["podAntiAffinity"].is_object());

    let pdb = one(&docs, "PodDisruptionBudget", "rel-cloudlb-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    let metrics = one(&docs, "Service", "rel-cloudlb-controller-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 8080);
    assert_eq!(
        metrics["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    let sa = one(&docs, "ServiceAccount", "rel-cloudlb-controller");
    assert!(sa["metadata"]["annotations"].is_null());
}

#[test]
fn custom_values_reach_flags_env_and_the_node_proxy() {
    let docs = render(&[
        "clusterName=staging",
        "region=eu-west-1",
        "awsEndpoint=http://127.0.0.1:4566",
        "loadBalancerClass=example.com/lb",
        "defaultClass=true",
        "controller.replicas=3",
        "controller.extraArgs[0]=--concurrency=8",
        "controller.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::111122223333:role/cloudlb",
        "image.tag=dev",
        "nodeProxy.enabled=true",
        "nodeProxy.healthPort=10299",
        "nodeProxy.metricsPort=10298",
    ]);
    assert!(kinds(&docs).contains("DaemonSet"));
    let deploy = one(&docs, "Deployment", "rel-cloudlb-controller");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "cloudlb:dev");
    let args = strings(&c["args"]);
    for want in [
        "--cluster-name=staging",
        "--load-balancer-class=example.com/lb",
        "--default-class",
        "--region=eu-west-1",
        "--node-proxy-health-port=10299",
    ] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    assert_eq!(args.last().map(String::as_str), Some("--concurrency=8"));
    assert_eq!(
        env_value(c, "AWS_ENDPOINT_URL").map(|e| &e["value"]),
        Some(&json!("http://127.0.0.1:4566"))
    );
    let sa = one(&docs, "ServiceAccount", "rel-cloudlb-controller");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::111122223333:role/cloudlb"
    );

    let ds = one(&docs, "DaemonSet", "rel-cloudlb-node-proxy");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "rel-cloudlb-node-proxy");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let c = &pod["containers"][0];
    assert_eq!(
        strings(&c["args"]),
        [
            "node-proxy",
            "--node-name=$(NODE_NAME)",
            "--health-addr=0.0.0.0:10299",
            "--metrics-addr=127.0.0.1:10298",
            "--bind-address=0.0.0.0",
            "--service-proxy-name=cloudlb",
            "--cluster-ips=false",
        ]
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "health");
    assert_eq!(c["ports"][0]["containerPort"], 10299);
    let unlabelled = render(&[
        "clusterName=x",
        "loadBalancerClass=example.com/lb",
        "defaultClass=true",
        "nodeProxy.enabled=true",
        "nodeProxy.serviceProxyName=edge",
        "nodeProxy.serveUnlabelled=true",
    ]);
    let ds = one(&unlabelled, "DaemonSet", "rel-cloudlb-node-proxy");
    let args = strings(&ds["spec"]["template"]["spec"]["containers"][0]["args"]);
    for want in [
        "--service-proxy-name=edge",
        "--serve-unlabelled",
        "--load-balancer-class=example.com/lb",
        "--default-class",
    ] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    assert_eq!(
        env_value(c, "NODE_NAME").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("spec.nodeName"))
    );
    assert!(
        env_value(c, "AWS_ENDPOINT_URL").is_none(),
        "the node proxy never calls AWS"
    );
    assert_eq!(
        c["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]})
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");

    let privileged = render(&[
        "clusterName=x",
        "nodeProxy.enabled=true",
        "nodeProxy.bindPrivilegedPorts=true",
    ]);
    let ds = one(&privileged, "DaemonSet", "rel-cloudlb-node-proxy");
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})
    );
    // The ClusterIP leg runs nft: root with NET_ADMIN, nothing else added.
    let cluster_ips = render(&[
        "clusterName=x",
        "nodeProxy.enabled=true",
        "nodeProxy.clusterIPs=true",
    ]);
    let ds = one(&cluster_ips, "DaemonSet", "rel-cloudlb-node-proxy");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(strings(&c["args"]).contains(&"--cluster-ips=true".to_string()));
    assert_eq!(c["securityContext"]["runAsUser"], 0);
    assert_eq!(
        c["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN"]})
    );

    let single = render(&[
        "clusterName=x",
        "controller.replicas=1",
        "controller.leaderElection.enabled=false",
    ]);
    assert!(
        !kinds(&single).contains("Role"),
        "no Lease grant without leader election"
    );
    let args = strings(
        &one(&single, "Deployment", "rel-cloudlb-controller")["spec"]["template"]["spec"]["containers"]
            [0]["args"],
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--lease") || a == "--leader-elect")
    );
}

#[test]
fn rbac_grants_exactly_what_each_component_needs() {
    let docs = render(&["clusterName=x", "nodeProxy.enabled=true"]);
    assert_eq!(
        grants(one(&docs, "ClusterRole", "rel-cloudlb-controller")),
        set_of(&[
            "/services get",
            "/services list",
            "/services watch",
            "/services patch",
            "/services update",
            "/services/status patch",
            "/services/status update",
            "/nodes get",
            "/nodes list",
            "/nodes watch",
            "/pods get",
            "/pods list",
            "/pods watch",
            "/pods/status patch",
            "discovery.k8s.io/endpointslices get",
            "discovery.k8s.io/endpointslices list",
            "discovery.k8s.io/endpointslices watch",
            "events.k8s.io/events create",
            "events.k8s.io/events patch",
            "cloudlb.io/targetgroupbindings get",
            "cloudlb.io/targetgroupbindings list",
            "cloudlb.io/targetgroupbindings watch",
            "cloudlb.io/targetgroupbindings patch",
            "cloudlb.io/targetgroupbindings update",
            "cloudlb.io/targetgroupbindings/status get",
            "cloudlb.io/targetgroupbindings/status patch",
            "cloudlb.io/targetgroupbindings/status update",
            "cloudlb.io/targetgroupbindings/finalizers get",
            "cloudlb.io/targetgroupbindings/finalizers patch",
            "cloudlb.io/targetgroupbindings/finalizers update",
        ])
    );
    let role = one(&docs, "Role", "rel-cloudlb-controller-leader-election");
    assert_eq!(role["metadata"]["namespace"], "lb-system");
    assert_eq!(
        grants(role),
        set_of(&[
            "coordination.k8s.io/leases create",
            "coordination.k8s.io/leases get names=rel-cloudlb-controller",
            "coordination.k8s.io/leases update names=rel-cloudlb-controller",
        ])
    );
    assert_eq!(
        grants(one(&docs, "ClusterRole", "rel-cloudlb-node-proxy")),
        set_of(&[
            "/services get",
            "/services list",
            "/services watch",
            "/nodes get",
            "/nodes list",
            "/nodes watch",
            "discovery.k8s.io/endpointslices get",
            "discovery.k8s.io/endpointslices list",
            "discovery.k8s.io/endpointslices watch",
        ])
    );
    for (binding, sa) in [
        ("rel-cloudlb-controller", "rel-cloudlb-controller"),
        ("rel-cloudlb-node-proxy", "rel-cloudlb-node-proxy"),
    ] {
        let b = one(&docs, "ClusterRoleBinding", binding);
        assert_eq!(b["roleRef"]["name"], binding);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": "lb-system"}])
        );
    }
}

#[test]
fn iam_policy_grants_the_controller_actions_and_guards_writes_with_the_cluster_tag() {
    // The policy as the chart renders it for clusterName=prod (iam-policy.json is a template).
    let docs = render(&["clusterName=prod"]);
    let cm = one(&docs, "ConfigMap", "rel-cloudlb-controller-iam-policy");
    let text = cm["data"]["policy.json"].as_str().expect("policy.json");
    let policy: Value = serde_json::from_str(text).expect("policy is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let statements = policy["Statement"].as_array().expect("statements");
    let actions_of = |s: &Value| -> Vec<String> {
        match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            other => strings(other),
        }
    };
    let granted: BTreeSet<String> = statements.iter().flat_map(actions_of).collect();
    // Exactly the operations src/cloud/aws/ calls (every call goes through
    // `call(ops::OP, …)`, and `ops` in client.rs names each one), plus tagging on create (ELBv2
    // AddTags, EC2 CreateTags), which AWS authorizes separately.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cloud/aws");
    let code: String = std::fs::read_dir(dir)
        .expect("src/cloud/aws")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
        .collect();
    let ec2_ops = [
        "DescribeSubnets",
        "DescribeInstances",
        "DescribeSecurityGroups",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "RevokeSecurityGroupIngress",
        "DeleteSecurityGroup",
    ];
    // `pub const DESCRIBE_TAGS: Op = Op::general("DescribeTags");` → DESCRIBE_TAGS → DescribeTags
    let op_names: std::collections::BTreeMap<String, String> = code
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let (name, rest) = rest.split_once(": Op = Op::")?;
            let op = rest.split('"').nth(1)?;
            Some((name.to_string(), op.to_string()))
        })
        .collect();
    let called: BTreeSet<String> = code
        .split(".call(")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.trim_start().strip_prefix("ops::")?;
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            op_names.get(&name).cloned()
        })
        .collect();
    assert!(
        called.len() > 15,
        "found too few AWS operations in src/cloud/aws: {called:?}"
    );
    let want: BTreeSet<String> = called
        .iter()
        .map(|op| {
            if ec2_ops.contains(&op.as_str()) {
                format!("ec2:{op}")
            } else {
                format!("elasticloadbalancing:{op}")
            }
        })
        .chain([
            "elasticloadbalancing:AddTags".to_string(),
            "ec2:CreateTags".to_string(),
        ])
        .collect();
    assert_eq!(
        granted, want,
        "the IAM policy must grant exactly what the code calls"
    );

    for s in statements {
        assert_eq!(s["Effect"], "Allow");
        for action in actions_of(s) {
            let name = action.split(':').nth(1).unwrap_or_default();
            // Guarded by this cluster's own name, never just by the tag's presence (`Null`
            // would let any cluster's tag pass).
            let equals = s["Condition"]["StringEquals"].to_string();
            if name.starts_with("Create") || name == "AddTags" {
                assert!(
                    equals.contains(r#""aws:RequestTag/cloudlb.io/cluster":"prod""#)
                        || equals.contains(r#""aws:ResourceTag/cloudlb.io/cluster":"prod""#),
                    "{action} must require this cluster's tag: {s}"
                );
            }
            if let Some(null) = s["Condition"]["Null"].as_object() {
                assert!(
                    null.values().all(|v| v == "true"),
                    "a Null condition may only forbid a tag, never stand in for the cluster's name: {s}"
                );
            }
            if name == "RegisterTargets" || name == "DeregisterTargets" {
                let equals = s["Condition"]["StringEquals"].to_string();
                assert!(
                    equals.contains(r#""aws:ResourceTag/cloudlb.io/cluster":"prod""#)
                        || equals
                            .contains(r#""aws:ResourceTag/cloudlb.io/allow-binding/prod":"true""#),
                    "{action} only in groups tagged for this cluster: {s}"
                );
            }
            let guarded_by_resource_tag = !(name.starts_with("Describe")
                || name.starts_with("Create")
                || name == "AddTags"
                || name == "RegisterTargets"
                || name == "DeregisterTargets");
            if guarded_by_resource_tag {
                assert!(
                    equals.contains(r#""aws:ResourceTag/cloudlb.io/cluster":"prod""#),
                    "{action} must be limited to resources with the cluster tag: {s}"
                );
            }
        }
    }
}

/// Dotted paths of values.yaml's settings; free-form maps (resources, labels, ...) count as one.
fn value_paths(prefix: &str, v: &Value, out: &mut Vec<String>) {
    const FREE_FORM: [&str; 7] = [
        "resources",
        "annotations",
        "podAnnotations",
        "podLabels",
        "nodeSelector",
        "affinity",
        "updateStrategy",
    ];
    match v.as_object() {
        Some(map) if !FREE_FORM.iter().any(|f| prefix.ends_with(f)) => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                value_paths(&path, child, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn readme_documents_every_value() {
    let yaml = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    let values: Value = serde_yaml_ng::from_str(&yaml).expect("values.yaml parses");
    let mut paths = Vec::new();
    value_paths("", &values, &mut paths);
    assert!(paths.len() > 40, "{paths:?}");
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("| `{p}` |")))
        .collect();
    assert!(missing.is_empty(), "README's Helm table lacks {missing:?}");
}

/// A Helm release in its own namespace; uninstalled (cluster-scoped RBAC included) when dropped.
struct Release {
    name: String,
    ns: TestNamespace,
}

impl Release {
    async fn install(rig: &'static Rig, sets: &[&str]) -> Release {
        let ns = TestNamespace::new(rig, "chart").await;
        let name = unique("clb");
        let chart = chart_dir();
        let kubeconfig = rig.kubeconfig.display().to_string();
        let mut args = vec![
            "install",
            &name,
            chart.to_str().expect("utf8 path"),
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns.name,
            "--timeout",
            "60s",
            // These tests run the binary as a host process with the chart's credentials; keep the
            // chart's own pods off the rig's kubelet node (tests/pods.rs runs them for real).
            "--set",
            "image.pullPolicy=Never",
            "--set-string",
            r"controller.nodeSelector.cloudlb\.io/host-process-test=true",
            "--set-string",
            r"nodeProxy.nodeSelector.cloudlb\.io/host-process-test=true",
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = helm(&args);
        let release = Release { name, ns };
        assert!(out.status.success(), "helm install: {}", text(&out));
        assert!(
            text(&out).contains("kubectl get service web --watch"),
            "NOTES.txt is shown: {}",
            text(&out)
        );
        release
    }

    fn component(&self, component: &str) -> String {
        // The release name never contains "cloudlb", so the chart name is appended.
        format!("{}-cloudlb-{component}", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let rig = Rig::get();
        let kubeconfig = rig.kubeconfig.display().to_string();
        let out = helm(&[
            "uninstall",
            &self.name,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &self.ns.name,
        ]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("helm uninstall: {}", text(&out));
        }
    }
}

/// `kubectl auth can-i` as the holder of `token`.
fn can_i(rig: &Rig, token: &str, ns: &str, verb: &str, resource: &str) -> bool {
    let (resource, sub) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--token", token];
    if let Some(s) = sub {
        args.extend(["--subresource", s]);
    }
    if ns.is_empty() {
        args.push("--all-namespaces");
    } else {
        args.extend(["-n", ns]);
    }
    let out = rig.kubectl_output(&args);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

fn token(rig: &Rig, sa: &str, ns: &str) -> String {
    rig.kubectl(&["create", "token", sa, "-n", ns])
        .trim()
        .to_string()
}

fn assert_forbidden<T>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: expected 403, got {s:?}"),
        Err(e) => panic!("{what}: expected 403, got {e}"),
        Ok(_) => panic!("{what}: must be forbidden, but it was allowed"),
    }
}

#[tokio::test]
async fn installed_chart_gives_the_controller_exactly_its_permissions() {
    let rig = Rig::get();
    let release = Release::install(rig, &["clusterName=rig"]).await;
    let ns = release.ns.name.clone();
    let sa = release.component("controller");
    let lease_name = release.component("controller");
    let admin = rig.client().await;
    let other = TestNamespace::new(rig, "chart-other").await;

    let deploy = rig.kubectl(&[
        "get",
        "deployment",
        &sa,
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.replicas} {.spec.template.spec.serviceAccountName}",
    ]);
    assert_eq!(deploy, format!("2 {sa}"));

    let token = token(rig, &sa, &ns);
    let client = rig.client_with_token(&token).await;

    // What the controller does, done for real with its token.
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &other.name);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "cloudlb.io/nlb",
                 "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    svcs.create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let as_controller: Api<Service> = Api::all(client.clone());
    let listed = as_controller
        .list(&ListParams::default())
        .await
        .expect("controller lists services in every namespace");
    assert!(
        listed
            .items
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("web"))
    );
    let mine: Api<Service> = Api::namespaced(client.clone(), &other.name);
    let status =
        json!({"status": {"loadBalancer": {"ingress": [{"hostname": "web-1.elb.example"}]}}});
    mine.patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("controller patches services/status");
    let finalizer = json!({"metadata": {"finalizers": ["cloudlb.io/load-balancer"]}});
    mine.patch("web", &PatchParams::default(), &Patch::Merge(&finalizer))
        .await
        .expect("controller patches services (finalizer)");
    let no_finalizer = json!({"metadata": {"finalizers": null}});
    mine.patch("web", &PatchParams::default(), &Patch::Merge(&no_finalizer))
        .await
        .expect("controller removes its finalizer");
    assert_forbidden(
        "delete services",
        mine.delete("web", &DeleteParams::default()).await,
    );

    let events: Api<Event> = Api::namespaced(client.clone(), &other.name);
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "web.cloudlb-test"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "cloudlb.io/controller",
        "reportingInstance": "cloudlb-test",
        "action": "Ensuring", "reason": "EnsuringLoadBalancer", "type": "Normal",
        "note": "chart RBAC test",
        "regarding": {"apiVersion": "v1", "kind": "Service", "namespace": other.name, "name": "web"}
    }))
    .expect("event");
    events
        .create(&PostParams::default(), &event)
        .await
        .expect("controller creates events.k8s.io Events");
    events
        .patch(
            "web.cloudlb-test",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}}),
            ),
        )
        .await
        .expect("controller patches Events (series)");

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": lease_name},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15}
    }))
    .expect("lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("controller creates its Lease");
    let mut held = leases
        .get(&lease_name)
        .await
        .expect("controller gets its Lease");
    if let Some(spec) = held.spec.as_mut() {
        spec.holder_identity = Some("pod-b".into());
    }
    leases
        .replace(&lease_name, &PostParams::default(), &held)
        .await
        .expect("controller updates its Lease");
    assert_forbidden("get another Lease", leases.get("someone-else").await);
    let elsewhere: Api<Lease> = Api::namespaced(client.clone(), &other.name);
    assert_forbidden(
        "create a Lease outside the release namespace",
        elsewhere.create(&PostParams::default(), &lease).await,
    );

    // What it must never do.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &other.name);
    assert_forbidden(
        "delete pods",
        pods.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await,
    );
    let secrets: Api<Secret> = Api::all(client.clone());
    assert_forbidden("list secrets", secrets.list(&ListParams::default()).await);
    let own_secrets: Api<Secret> = Api::namespaced(client, &ns);
    assert_forbidden(
        "list secrets in its own namespace",
        own_secrets.list(&ListParams::default()).await,
    );

    // The whole matrix, as the authoriser answers it.
    let matrix = [
        ("", "watch", "services", true),
        ("", "update", "services/status", true),
        ("", "watch", "nodes", true),
        ("", "watch", "endpointslices.discovery.k8s.io", true),
        ("", "create", "events.events.k8s.io", true),
        ("", "watch", "targetgroupbindings.cloudlb.io", true),
        ("", "patch", "targetgroupbindings.cloudlb.io/status", true),
        (
            "",
            "update",
            "targetgroupbindings.cloudlb.io/finalizers",
            true,
        ),
        ("", "create", "services", false),
        ("", "delete", "services", false),
        ("", "patch", "nodes", false),
        ("", "create", "targetgroupbindings.cloudlb.io", false),
        ("", "delete", "targetgroupbindings.cloudlb.io", false),
        ("", "create", "events", false),
        // Pods: read for their readiness gates, the gate condition patched; nothing else.
        ("", "list", "pods", true),
        ("", "patch", "pods/status", true),
        ("", "patch", "pods", false),
        ("", "delete", "pods", false),
        ("", "get", "secrets", false),
        ("", "list", "configmaps", false),
        ("", "create", "leases.coordination.k8s.io", false),
        ("", "create", "pods/exec", false),
    ];
    for (scope, verb, resource, want) in matrix {
        assert_eq!(
            can_i(rig, &token, scope, verb, resource),
            want,
            "controller: can-i {verb} {resource}"
        );
    }
    assert!(can_i(
        rig,
        &token,
        &ns,
        "create",
        "leases.coordination.k8s.io"
    ));
}

#[tokio::test]
async fn installed_chart_gives_the_node_proxy_read_only_access() {
    let rig = Rig::get();
    let release = Release::install(rig, &["clusterName=rig", "nodeProxy.enabled=true"]).await;
    let ns = release.ns.name.clone();
    let sa = release.component("node-proxy");
    let ds = rig.kubectl(&[
        "get",
        "daemonset",
        &sa,
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.template.spec.hostNetwork}",
    ]);
    assert_eq!(ds, "true");

    let token = token(rig, &sa, &ns);
    let client = rig.client_with_token(&token).await;
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let list = slices
        .list(&ListParams::default().limit(1))
        .await
        .expect("node proxy lists EndpointSlices");
    let version = list.metadata.resource_version.unwrap_or_default();
    let events: Vec<_> = slices
        .watch(&WatchParams::default().timeout(1), &version)
        .await
        .expect("node proxy watches EndpointSlices")
        .collect()
        .await;
    assert!(
        events.iter().all(|e| e.is_ok()),
        "node proxy watches EndpointSlices: {events:?}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .list(&ListParams::default())
        .await
        .expect("node proxy lists Services");
    assert_forbidden(
        "patch services",
        services
            .patch(
                &format!("{}-metrics", release.component("controller")),
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
    );
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    assert_forbidden("list secrets", secrets.list(&ListParams::default()).await);

    let matrix = [
        ("watch", "endpointslices.discovery.k8s.io", true),
        ("watch", "services", true),
        ("get", "nodes", true),
        ("patch", "services", false),
        ("update", "services/status", false),
        ("create", "events.events.k8s.io", false),
        ("list", "targetgroupbindings.cloudlb.io", false),
        ("create", "leases.coordination.k8s.io", false),
        ("list", "pods", false),
        ("get", "secrets", false),
    ];
    for (verb, resource, want) in matrix {
        assert_eq!(
            can_i(rig, &token, "", verb, resource),
            want,
            "node proxy: can-i {verb} {resource}"
        );
    }
}

/// A kubeconfig file for the rig's apiserver that authenticates with `token` only.
fn token_kubeconfig(rig: &Rig, token: &str) -> tempfile::NamedTempFile {
    let kc = kube::config::Kubeconfig::read_from(&rig.kubeconfig).expect("read kubeconfig");
    let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
    let server = cluster.server.as_deref().expect("server");
    let ca = cluster
        .certificate_authority_data
        .as_deref()
        .expect("CA data");
    let mut file = tempfile::NamedTempFile::new().expect("temp kubeconfig");
    std::io::Write::write_all(
        &mut file,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: rig\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: rig, user: sa}}\ncurrent-context: sa\n"
        )
        .as_bytes(),
    )
    .expect("write kubeconfig");
    file
}

/// The installed Deployment's container args, with the metrics and webhook addresses moved to
/// free loopback ports (the host process shares the host's network) and the webhook's
/// certificate read from the chart's Secret into `cert_dir` (what the pod mounts).
fn deployment_args(
    rig: &Rig,
    ns: &str,
    name: &str,
    metrics_port: u16,
    cert_dir: &std::path::Path,
) -> Vec<String> {
    for file in ["tls.crt", "tls.key"] {
        let b64 = rig.kubectl(&[
            "get",
            "secret",
            &format!("{name}-webhook-tls"),
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{.data.{}}}", file.replace('.', "\\.")),
        ]);
        let out = std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(b64.trim().as_bytes())?;
                c.wait_with_output()
            })
            .expect("base64 -d");
        assert!(!out.stdout.is_empty(), "the chart's Secret holds {file}");
        std::fs::write(cert_dir.join(file), out.stdout).expect("write cert");
    }
    let webhook_port = support::cloud::free_port();
    let out = rig.kubectl(&[
        "get",
        "deployment",
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    let args: Vec<String> = serde_json::from_str(&out).expect("args are a JSON list");
    args.into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr=127.0.0.1:{metrics_port}")
            } else if a.starts_with("--webhook-addr=") {
                format!("--webhook-addr=127.0.0.1:{webhook_port}")
            } else if a.starts_with("--webhook-cert-dir=") {
                format!("--webhook-cert-dir={}", cert_dir.display())
            } else {
                a
            }
        })
        .collect()
}

#[tokio::test]
async fn controller_with_only_the_chart_token_runs_a_service_and_a_binding_lifecycle() {
    use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, TargetTypeEnum};
    use cloudlb::crd::TargetGroupBinding;
    use std::time::Duration;
    use support::cloud::{ControllerProc, TestCloud, free_port};
    use support::{TestNode, eventually};

    const WAIT: Duration = Duration::from_secs(30);
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "ctok").await;
    let selector = format!("cloudlb.io/test-cluster={}", cloud.cluster);
    let release = Release::install(
        rig,
        &[
            &format!("clusterName={}", cloud.cluster),
            &format!("loadBalancerClass={}", cloud.class),
            "awsEndpoint=http://127.0.0.1:4566",
            &format!("controller.extraArgs[0]=--node-selector={selector}"),
            &format!("controller.extraArgs[1]=--target-group-binding-selector={selector}"),
        ],
    )
    .await;
    let ns = release.ns.name.clone();
    let sa = release.component("controller");
    let i1 = cloud.instance(None).await;
    let labels = json!({"cloudlb.io/test-cluster": cloud.cluster});
    let _n1 = TestNode::new(
        rig,
        "ctok-a",
        "10.213.254.1",
        Some(&TestCloud::provider_id(&i1)),
        labels,
    )
    .await;

    // The chart's own flags (leader election on the chart's Lease included), the chart's token.
    let metrics_port = free_port();
    let cert_dir = tempfile::tempdir().expect("tempdir");
    let args = deployment_args(rig, &ns, &sa, metrics_port, cert_dir.path());
    assert!(
        args.contains(&"--leader-elect".to_string())
            && args.contains(&format!("--lease-name={sa}"))
            && args.contains(&format!("--lease-namespace={ns}")),
        "{args:?}"
    );
    let kubeconfig = token_kubeconfig(rig, &token(rig, &sa, &ns));
    let kubeconfig_path = kubeconfig.path().display().to_string();
    let who = rig.kubectl(&[
        "auth",
        "whoami",
        "--kubeconfig",
        &kubeconfig_path,
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, format!("system:serviceaccount:{ns}:{sa}"));
    let controller = ControllerProc::spawn(
        rig,
        &cloud.cluster,
        &args,
        &[
            ("KUBECONFIG", kubeconfig_path.as_str()),
            ("POD_NAME", "chart-token-test"),
        ],
        metrics_port,
    );
    let leases: Api<Lease> = Api::namespaced(rig.client().await, &ns);
    eventually("the controller holds the chart's Lease", WAIT, || async {
        let lease = leases.get_opt(&sa).await.ok()??;
        (lease.spec?.holder_identity.as_deref() == Some("chart-token-test")).then_some(())
    })
    .await;

    // A Service's whole LoadBalancer lifecycle.
    let apps = TestNamespace::new(rig, "ctok-apps").await;
    let client = rig.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &apps.name);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": cloud.class,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    svcs.create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let host = eventually("hostname in status", WAIT, || async {
        let s = svcs.get("web").await.ok()?;
        s.status?.load_balancer?.ingress?.first()?.hostname.clone()
    })
    .await;
    let table = rig.kubectl(&["get", "svc", "web", "-n", &apps.name]);
    assert!(
        table.contains("EXTERNAL-IP") && table.contains(&host),
        "{table}"
    );
    let describe = eventually("the controller's Events in describe", WAIT, || async {
        let d = rig.kubectl(&["describe", "svc", "web", "-n", &apps.name]);
        (d.contains("EnsuringLoadBalancer") && d.contains("EnsuredLoadBalancer")).then_some(d)
    })
    .await;
    assert!(describe.contains("cloudlb-controller"), "{describe}");
    assert!(
        !cloud.inventory().await.is_empty(),
        "the NLB is tagged with the cluster"
    );

    // A TargetGroupBinding's lifecycle: targets, status, finalizer.
    let tg = cloud
        .elb
        .create_target_group()
        .name(format!("{}-tg", cloud.cluster))
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .vpc_id(&cloud.vpc_id)
        .target_type(TargetTypeEnum::Instance)
        .tags(
            aws_sdk_elasticloadbalancingv2::types::Tag::builder()
                .key(format!("cloudlb.io/allow-binding/{}", cloud.cluster))
                .value("true")
                .build(),
        )
        .send()
        .await
        .expect("target group");
    let tg_arn = tg.target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string();
    let bindings: Api<TargetGroupBinding> = Api::namespaced(client.clone(), &apps.name);
    let binding: TargetGroupBinding = serde_json::from_value(json!({
        "apiVersion": "cloudlb.io/v1beta1", "kind": "TargetGroupBinding",
        "metadata": {"name": "web", "labels": {"cloudlb.io/test-cluster": cloud.cluster}},
        "spec": {"targetGroupARN": tg_arn, "serviceRef": {"name": "web", "port": "http"}}
    }))
    .expect("binding");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    eventually("binding Ready with one target", WAIT, || async {
        let b = bindings.get("web").await.ok()?;
        let s = b.status?;
        let ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == cloudlb::crd::ConditionStatus::True);
        (ready && s.registered_targets == Some(1)).then_some(())
    })
    .await;
    assert_eq!(cloud.targets(&tg_arn).await.len(), 1);
    bindings
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete binding");
    eventually("binding gone, its targets deregistered", WAIT, || async {
        let gone = bindings.get_opt("web").await.ok()?.is_none();
        (gone && cloud.targets(&tg_arn).await.is_empty()).then_some(())
    })
    .await;

    // Delete → finalizer released, nothing tagged with the cluster left.
    svcs.delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    eventually("service gone", WAIT, || async {
        svcs.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(cloud.inventory().await, vec![], "no cloud resource left");

    let log = std::fs::read_to_string(std::env::temp_dir().join(format!(
        "cloudlb-controller-{}-{metrics_port}.log",
        cloud.cluster
    )))
    .unwrap_or_default();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the chart's RBAC refused the controller something:\n{log}"
    );
    drop(controller);
    cloud
        .elb
        .delete_target_group()
        .target_group_arn(&tg_arn)
        .send()
        .await
        .expect("delete target group");
}
