//! The README's first command, run as a user runs it: `./dev/demo` from a clean demo state, with
//! its output checked line by line — a command users run first must never break unseen.

use cloudlb_testkit as support;

use std::process::Command;

use support::{Rig, repo_root};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(repo_root().join("dev/demo"))
        .args(args)
        .output()
        .expect("run dev/demo")
}

/// The line that follows the first line starting with `marker`.
fn line_after<'a>(out: &'a str, marker: &str) -> Option<&'a str> {
    let mut lines = out.lines();
    lines.find(|l| l.starts_with(marker))?;
    lines.next()
}

#[test]
fn demo_shows_the_hostname_and_answers_through_the_node_port_and_the_hostname() {
    let rig = Rig::get();
    let cleaned = run(&["clean"]);
    assert!(cleaned.status.success(), "dev/demo clean: {cleaned:?}");

    let started = std::time::Instant::now();
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dev/demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    println!(
        "dev/demo took {:.1} s\n{stdout}",
        started.elapsed().as_secs_f64()
    );

    // Both controller pods and the node proxy pod are Running and Ready (1/1).
    let pods: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("$ kubectl get pods"))
        .skip(2)
        .take_while(|l| !l.is_empty())
        .collect();
    let ready = |prefix: &str| {
        pods.iter()
            .filter(|l| l.starts_with(prefix) && l.contains(" 1/1 ") && l.contains("Running"))
            .count()
    };
    assert_eq!(ready("cloudlb-controller-"), 2, "pods: {pods:#?}");
    assert_eq!(ready("cloudlb-node-proxy-"), 1, "pods: {pods:#?}");

    // The `kubectl get svc` row: NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE.
    let header = line_after(&stdout, "$ kubectl get svc").expect("kubectl get svc output");
    assert!(header.starts_with("NAME"), "header: {header}");
    let row = stdout
        .lines()
        .skip_while(|l| !l.starts_with("$ kubectl get svc"))
        .find(|l| l.starts_with("demo "))
        .expect("the demo Service's row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "LoadBalancer", "row: {row}");
    let hostname = cols[3];
    assert!(
        hostname.starts_with("k8s-demo-demo-") && hostname.ends_with(".elb.amazonaws.com"),
        "EXTERNAL-IP is the NLB's DNS name: {row}"
    );
    assert!(
        cols[4].starts_with("80:") && cols[4].ends_with("/TCP"),
        "row: {row}"
    );
    let status = rig.kubectl(&[
        "get",
        "svc",
        "demo",
        "-n",
        "demo",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].hostname}",
    ]);
    assert_eq!(status.trim(), hostname, "the row shows status.loadBalancer");

    // A pod answers through nodeIP:nodePort, then through the hostname (emulated NLB).
    let via_node_port = line_after(&stdout, "$ curl http://").expect("nodePort curl");
    let via_hostname = line_after(&stdout, "$ curl --resolve").expect("hostname curl");
    for reply in [via_node_port, via_hostname] {
        assert!(
            reply.starts_with("hello from demo-") && reply.contains("(10.213.240."),
            "a demo pod answers (its name and pod address): {reply}"
        );
    }

    // A second run attaches to what is there and shows the same.
    let again = run(&[]);
    assert!(again.status.success(), "second dev/demo run: {again:?}");
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.contains(hostname),
        "second run shows the same hostname"
    );

    // Clean removes the demo, and its load balancer goes through the finalizer.
    let cleaned = run(&["clean"]);
    assert!(cleaned.status.success(), "dev/demo clean: {cleaned:?}");
    let left = rig.kubectl_output(&["get", "namespace", "demo"]);
    assert!(!left.status.success(), "demo namespace is gone");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let names = rt.block_on(async {
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&rig.aws().await);
        let lbs = elb
            .describe_load_balancers()
            .send()
            .await
            .expect("describe load balancers");
        lbs.load_balancers()
            .iter()
            .filter_map(|lb| lb.dns_name().map(str::to_string))
            .collect::<Vec<_>>()
    });
    assert!(
        !names.iter().any(|n| n == hostname),
        "the demo's NLB {hostname} was deleted: {names:?}"
    );
}
