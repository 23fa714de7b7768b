//! The Helm chart installed as a user installs it, on the rig's real kubelet node: the image built
//! here, the controller Deployment (two replicas, one leader) and the node-proxy DaemonSet as
//! pods with the chart's ServiceAccounts, probes and securityContext; a Service gets its hostname
//! from the in-cluster controller; a rollout restart, a drain and an uninstall behave as the
//! README says.

use cloudlb_testkit as support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Tag as Ec2Tag;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use serde_json::Value;
use support::cloud::http_get;
use support::{NetNs, Rig, TestNamespace, eventually, helm, repo_root, text, unique};

/// Builds the image (cached) and loads it into the kubelet node's containerd; its reference.
fn image() -> String {
    let out = Command::new(repo_root().join("dev/image"))
        .output()
        .expect("run dev/image");
    assert!(out.status.success(), "dev/image: {}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |key: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("dev/image printed no {key} line: {printed}"))
    };
    let load = Command::new(repo_root().join("dev/rig"))
        .args(["load-image", &field("path:")])
        .output()
        .expect("run dev/rig load-image");
    assert!(load.status.success(), "dev/rig load-image: {}", text(&load));
    field("image:")
}

fn json(rig: &Rig, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&rig.kubectl(&all)).expect("kubectl json")
}

/// (name, ready, pod IP) of the release's controller pods.
fn controller_pods(rig: &Rig, ns: &str, release: &str) -> Vec<(String, bool, String)> {
    let selector =
        format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=controller");
    let pods = json(rig, &["get", "pods", "-n", ns, "-l", &selector]);
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let ready = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ready,
                p["status"]["podIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// The value of an unlabelled metric (or the sum of a labelled family) in a /metrics text.
fn metric_sum(metrics: &str, name: &str, filter: impl Fn(&str) -> bool) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter(|l| filter(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn is_write_call(line: &str) -> bool {
    [
        "Create",
        "Register",
        "Deregister",
        "Modify",
        "Delete",
        "Authorize",
        "Revoke",
        "Set",
        "Add",
        "Remove",
    ]
    .iter()
    .any(|w| line.contains(&format!("operation=\"{w}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_runs_on_the_kubelet_node_with_one_leader_and_survives_restart_drain_and_uninstall() {
    let rig = Rig::get();
    let node = rig.env("CLOUDLB_RIG_NODE");
    let node_ip = rig.env("CLOUDLB_RIG_NODE_IP");
    let image = image();
    let (repo, tag) = image.rsplit_once(':').expect("image name:tag");

    // This test's cluster: its own cluster name and class; internal load balancers in the node's subnet.
    let cluster = unique("pods");
    let class = format!("cloudlb.io/{cluster}");
    let conf = rig.aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let elb = elbv2::Client::new(&conf);
    let tag_kv = |k: &str, v: &str| Ec2Tag::builder().key(k).value(v).build();
    ec2.create_tags()
        .resources(rig.env("CLOUDLB_RIG_NODE_SUBNET"))
        .tags(tag_kv("kubernetes.io/role/internal-elb", "1"))
        .tags(tag_kv(
            &format!("kubernetes.io/cluster/{cluster}"),
            "shared",
        ))
        .send()
        .await
        .expect("tag the node's subnet");

    let system = TestNamespace::new(rig, "pods-sys").await;
    let apps = TestNamespace::new(rig, "pods-app").await;
    let release = unique("clb");
    let kubeconfig = rig.kubeconfig.display().to_string();
    let chart = repo_root().join("charts/cloudlb");
    let sets = [
        format!("clusterName={cluster}"),
        format!("loadBalancerClass={class}"),
        format!("region={}", rig.region),
        format!(
            "awsEndpoint={}",
            rig.env("CLOUDLB_RIG_AWS_ENDPOINT_FOR_PODS")
        ),
        format!("image.repository={repo}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".to_string(),
        "nodeProxy.enabled=true".to_string(),
        "controller.env[0].name=AWS_ACCESS_KEY_ID".to_string(),
        "controller.env[0].value=test".to_string(),
        "controller.env[1].name=AWS_SECRET_ACCESS_KEY".to_string(),
        "controller.env[1].value=test".to_string(),
    ];
    let install = |extra: &[&str]| {
        let mut args = vec![
            "upgrade",
            "--install",
            &release,
            chart.to_str().expect("utf8"),
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &system.name,
            "--wait",
            "--timeout",
            "180s",
        ];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        args.extend(extra);
        let started = Instant::now();
        let out = helm(&args);
        assert!(out.status.success(), "helm install: {}", text(&out));
        started.elapsed()
    };
    let uninstall = || {
        let out = helm(&[
            "uninstall",
            &release,
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &system.name,
            "--wait",
        ]);
        assert!(out.status.success(), "helm uninstall: {}", text(&out));
    };
    let took = install(&[]);
    println!("FIGURE helm_install_wait_s {:.2}", took.as_secs_f64());

    // Both controller replicas Ready — the standby too (readiness is not leadership).
    let pods = controller_pods(rig, &system.name, &release);
    assert_eq!(pods.len(), 2, "two controller pods: {pods:?}");
    assert!(
        pods.iter().all(|p| p.1),
        "both controller pods Ready: {pods:?}"
    );
    for (name, _, _) in &pods {
        let pod = json(rig, &["get", "pod", name, "-n", &system.name]);
        let created = pod["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ready_at = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap_or_default()
            .to_string();
        println!("controller pod {name}: created {created}, Ready {ready_at}");
        // What the chart promised: non-root, read-only root filesystem, nothing added.
        let c = &pod["spec"]["containers"][0]["securityContext"];
        assert_eq!(c["readOnlyRootFilesystem"], true);
        assert_eq!(c["allowPrivilegeEscalation"], false);
    }
    eventually(
        "the PDB to allow one disruption with both pods Ready",
        Duration::from_secs(30),
        || async {
            let pdb = json(rig, &["get", "pdb", "-n", &system.name]);
            (pdb["items"][0]["status"]["disruptionsAllowed"].as_i64() == Some(1)).then_some(())
        },
    )
    .await;

    // A web Deployment on the node and its LoadBalancer Service, served by cloudlb's node proxy.
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
          "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "web", "image": "localhost/rig/hello:1", "imagePullPolicy": "Never",
              "ports": [{"containerPort": 8080}],
              "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]}}}
    });
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "labels": {"service.kubernetes.io/service-proxy-name": "cloudlb"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": "web"},
          "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    });
    let apply = |obj: &Value| {
        let file = std::env::temp_dir().join(format!("{}.json", unique("obj")));
        std::fs::write(&file, obj.to_string()).expect("write manifest");
        let out = rig.kubectl_output(&[
            "apply",
            "-n",
            &apps.name,
            "-f",
            file.to_str().expect("utf8"),
        ]);
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "kubectl apply: {}", text(&out));
    };
    apply(&deployment);
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        &apps.name,
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "web rollout: {}", text(&out));
    let created = Instant::now();
    apply(&service);
    let hostname_of = || {
        rig.kubectl(&[
            "get",
            "svc",
            "web",
            "-n",
            &apps.name,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].hostname}",
        ])
        .trim()
        .to_string()
    };
    let hostname = eventually(
        "the Service's hostname",
        Duration::from_secs(60),
        || async { Some(hostname_of()).filter(|h| !h.is_empty()) },
    )
    .await;
    println!(
        "FIGURE in_cluster_hostname_s {:.3} ({hostname})",
        created.elapsed().as_secs_f64()
    );
    // moto's DNS names read NAME-1.REGION.elb.amazonaws.com
    let lb_name = hostname
        .split('.')
        .next()
        .and_then(|h| h.rsplit_once('-'))
        .map(|(name, _)| name.to_string())
        .expect("NAME-N. hostname");
    let lbs_named = |elb: elbv2::Client, name: String| async move {
        elb.describe_load_balancers()
            .names(name)
            .send()
            .await
            .map(|r| {
                r.load_balancers()
                    .iter()
                    .filter_map(|l| l.load_balancer_arn().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let arns = lbs_named(elb.clone(), lb_name.clone()).await;
    assert_eq!(arns.len(), 1, "one load balancer {lb_name}: {arns:?}");

    // Exactly one leader; only it calls AWS (the standby makes no call at all).
    let scrape = |ip: &str| {
        http_get(&format!("{ip}:8080"), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let pods = controller_pods(rig, &system.name, &release);
    let mut leaders = 0;
    let mut calls_by_pod = BTreeMap::new();
    for (name, _, ip) in &pods {
        let m = scrape(ip);
        let leader = metric_sum(&m, "cloudlb_leader", |_| true);
        let calls = metric_sum(&m, "cloudlb_aws_api_calls_total", |_| true);
        let writes = metric_sum(&m, "cloudlb_aws_api_calls_total", is_write_call);
        println!("pod {name}: leader {leader}, AWS calls {calls} (writes {writes})");
        if leader == 1.0 {
            leaders += 1;
            assert!(writes > 0.0, "the leader made the writes");
        } else {
            assert_eq!(calls, 0.0, "the standby {name} made no AWS call");
        }
        calls_by_pod.insert(name.clone(), calls);
    }
    assert_eq!(leaders, 1, "exactly one leader: {calls_by_pod:?}");

    // The node-proxy DaemonSet pod serves the nodePort: a request from a client namespace.
    let node_port = rig.kubectl(&[
        "get",
        "svc",
        "web",
        "-n",
        &apps.name,
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let client = NetNs::new("podcl");
    let url = format!("http://{node_ip}:{}/", node_port.trim());
    let reply = eventually(
        "an answer through nodeIP:nodePort",
        Duration::from_secs(30),
        || async {
            let out = client
                .command("curl")
                .args(["-sS", "--max-time", "2", &url])
                .output()
                .ok()?;
            let body = String::from_utf8_lossy(&out.stdout).to_string();
            body.starts_with("hello from web-").then_some(body)
        },
    )
    .await;
    println!("through the node proxy: {}", reply.trim());

    // rollout restart completes, and the Service keeps its one load balancer.
    let deploy = format!("deployment/{release}-cloudlb-controller");
    let out = rig.kubectl_output(&["rollout", "restart", &deploy, "-n", &system.name]);
    assert!(out.status.success(), "rollout restart: {}", text(&out));
    let restarted = Instant::now();
    let out = rig.kubectl_output(&[
        "rollout",
        "status",
        &deploy,
        "-n",
        &system.name,
        "--timeout=180s",
    ]);
    assert!(
        out.status.success(),
        "the rolling restart completes: {}",
        text(&out)
    );
    println!(
        "FIGURE rollout_restart_s {:.2}",
        restarted.elapsed().as_secs_f64()
    );
    let svc = json(rig, &["get", "svc", "web", "-n", &apps.name]);
    assert_eq!(
        svc["status"]["loadBalancer"]["ingress"][0]["hostname"],
        hostname.as_str()
    );
    // the new leader has reconciled the Service, and converged on the same load balancer
    eventually(
        "a new leader that reconciled the Service",
        Duration::from_secs(60),
        || async {
            controller_pods(rig, &system.name, &release)
                .iter()
                .find_map(|(_, _, ip)| {
                    let m = scrape(ip);
                    (metric_sum(&m, "cloudlb_leader", |_| true) == 1.0
                        && metric_sum(&m, "cloudlb_reconciles_total", |_| true) > 0.0)
                        .then_some(())
                })
        },
    )
    .await;
    assert_eq!(
        lbs_named(elb.clone(), lb_name.clone()).await,
        arns,
        "no delete, no duplicate"
    );

    // drain: the PDB lets one controller pod go at once (its rules), not zero.
    let out = rig.kubectl_output(&[
        "drain",
        &node,
        "--pod-selector",
        &format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=controller"),
        "--ignore-daemonsets",
        "--timeout=15s",
    ]);
    let drained = text(&out);
    let _ = rig.kubectl_output(&["uncordon", &node]);
    let evicted = drained.matches("evicted").count();
    println!("drain: {}", drained.trim());
    assert!(
        evicted >= 1,
        "the drain evicted a controller pod: {drained}"
    );
    // with a single node the replacement cannot start while cordoned, so the second waits — the
    // budget's rule; after uncordon both replicas are Ready again
    eventually(
        "both controller pods Ready after the drain",
        Duration::from_secs(120),
        || async {
            let pods = controller_pods(rig, &system.name, &release);
            (pods.len() == 2 && pods.iter().all(|p| p.1)).then_some(())
        },
    )
    .await;

    // helm uninstall: the controller goes, the Service's cloud side stays under its finalizer
    // (README: delete LoadBalancer Services before uninstalling); a reinstall tears it down.
    uninstall();
    let svc = json(rig, &["get", "svc", "web", "-n", &apps.name]);
    let finalizers = svc["metadata"]["finalizers"].to_string();
    assert!(
        finalizers.contains("cloudlb.io/"),
        "the finalizer stays: {finalizers}"
    );
    assert_eq!(
        lbs_named(elb.clone(), lb_name.clone()).await,
        arns,
        "the load balancer stays"
    );
    install(&[]);
    let out = rig.kubectl_output(&["delete", "svc", "web", "-n", &apps.name, "--timeout=60s"]);
    assert!(out.status.success(), "delete the Service: {}", text(&out));
    assert!(
        lbs_named(elb.clone(), lb_name.clone()).await.is_empty(),
        "the load balancer is gone"
    );
    uninstall();
}
