//! The readiness-gate injection webhook against the rig's real kube-apiserver (issue 17): the
//! controller as a host process serves it over TLS; a MutatingWebhookConfiguration of this test
//! points at it by `url` (the apiserver runs on the host, so a `service` reference would resolve
//! to a ClusterIP only the kubelet node's namespace can reach; the chart uses the Service form).
//! Pods are created with server-side dry run: admission runs in full, nothing is scheduled.

use cloudlb_testkit as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::cloud::{ControllerProc, TestCloud, free_port};
use support::{Rig, TestNamespace, eventually, text, unique};

/// Deletes the test's MutatingWebhookConfiguration when dropped.
struct WebhookConfig<'a>(&'a Rig, String);

impl Drop for WebhookConfig<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .kubectl_output(&["delete", "mutatingwebhookconfiguration", &self.1]);
    }
}

/// A self-signed certificate for 127.0.0.1 in `dir` (`tls.crt`, `tls.key`); its PEM.
fn certificate(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=cloudlb-webhook-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {}", text(&out));
    std::fs::read_to_string(dir.join("tls.crt")).expect("read cert")
}

fn b64(s: &str) -> String {
    cloudlb::controller::webhook::inject::base64(s.as_bytes())
}

/// Creates a pod `app=web` with server-side dry run; its readiness gates and how long it took.
async fn dry_run_pod(pods: &Api<Pod>) -> (Vec<String>, Duration) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": unique("p"), "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "localhost/rig/hello:1"}]}
    }))
    .unwrap();
    let t0 = Instant::now();
    let created = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
        .expect("pod creation is never blocked");
    let gates = created
        .spec
        .and_then(|s| s.readiness_gates)
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.condition_type)
        .collect();
    (gates, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_gates_only_in_opted_in_namespaces_and_never_blocks_pods() {
    let rig = Rig::get();
    let cloud = TestCloud::new(rig, "wh").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = certificate(dir.path());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut controller = ControllerProc::start(
        rig,
        &cloud,
        &[
            "--webhook-addr",
            &addr,
            "--webhook-cert-dir",
            dir.path().to_str().unwrap(),
        ],
    );

    let test_label = unique("wh");
    let opted = TestNamespace::new(rig, "wh-in").await;
    let plain = TestNamespace::new(rig, "wh-out").await;
    for (ns, opt) in [(&opted.name, true), (&plain.name, false)] {
        let mut args = vec!["label".to_string(), "namespace".into(), ns.clone()];
        args.push(format!("cloudlb.io/webhook-test={test_label}"));
        if opt {
            args.push("cloudlb.io/pod-readiness-gate-inject=enabled".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rig.kubectl(&args);
    }
    let name = unique("cloudlb-wh");
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "readiness-gates.cloudlb.io", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Ignore", "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://{addr}/mutate-pod"), "caBundle": b64(&ca)},
            "namespaceSelector": {"matchLabels": {
                "cloudlb.io/pod-readiness-gate-inject": "enabled",
                "cloudlb.io/webhook-test": test_label}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}]}]
    });
    let file = dir.path().join("webhook.json");
    std::fs::write(&file, config.to_string()).unwrap();
    rig.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let _config = WebhookConfig(rig, name);

    // An ip-target Service of ours selecting app=web in both namespaces.
    let service = |ns: &str| {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns, "annotations": {
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip"}},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": cloud.class,
                     "selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}})
    };
    for ns in [&opted.name, &plain.name] {
        let f = dir.path().join(format!("{ns}.json"));
        std::fs::write(&f, service(ns).to_string()).unwrap();
        rig.kubectl(&["apply", "-f", f.to_str().unwrap()]);
    }
    let client = rig.client().await;
    let in_pods: Api<Pod> = Api::namespaced(client.clone(), &opted.name);
    let out_pods: Api<Pod> = Api::namespaced(client.clone(), &plain.name);
    let gates = eventually(
        "the gate injected in the opted-in namespace",
        Duration::from_secs(30),
        || async {
            let (g, took) = dry_run_pod(&in_pods).await;
            println!("opted-in namespace: gates {g:?} in {took:?}");
            (!g.is_empty()).then_some(g)
        },
    )
    .await;
    assert_eq!(gates, vec!["target-health.cloudlb.io/web".to_string()]);
    let (g, _) = dry_run_pod(&out_pods).await;
    assert!(g.is_empty(), "no gate without the namespace label: {g:?}");

    // Teardown of the Services while the controller runs (finalizers), then the controller goes.
    for ns in [&opted.name, &plain.name] {
        let out = rig.kubectl_output(&["delete", "svc", "web", "-n", ns, "--timeout=60s"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    controller.kill();
    let (g, took) = dry_run_pod(&in_pods).await;
    println!("FIGURE pod_create_with_webhook_down {took:?} (gates {g:?})");
    assert!(g.is_empty());
    assert!(
        took < Duration::from_secs(5),
        "failurePolicy Ignore, refused at once: {took:?}"
    );
}
