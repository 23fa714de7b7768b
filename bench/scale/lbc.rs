//! The AWS Load Balancer Controller (LBC) as a host process, run the way
//! `../shared/peers/README.md` verified on this rig: its CRDs installed first, every AWS endpoint
//! pointed at the counting proxy, leader election off, a self-signed webhook certificate (its
//! webhook server cannot be turned off; nothing calls it, its webhooks are not registered).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::cloud::{TestCloud, free_port, http_get};
use crate::support::{Proc, tool};

/// The class LBC serves without any annotation.
pub const CLASS: &str = "service.k8s.aws/nlb";

/// LBC's client-side limits off for ELBv2 (an override clears its defaults: 4/s for
/// Register/DeregisterTargets, 50/s Describe*, 3/s Modify*), as cloudlb's are off with
/// `--aws-qps 0 --aws-targets-qps 0`: LocalStack is not AWS. `default` keeps LBC's own.
pub const NO_THROTTLE: &str = "Elastic Load Balancing v2:.*=100000:100000";

/// A running LBC; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Lbc {
    pub proc: Proc,
    pub log: PathBuf,
    health_port: u16,
    _certs: tempfile::TempDir,
}

impl Lbc {
    /// Installs LBC's CRDs on the apiserver of `kubeconfig`, then starts `dir/lbc` for `cloud`
    /// with every AWS endpoint at `endpoint`; `throttle` is its `--aws-api-throttle` value
    /// (`default`: LBC's own limits), `extra` more flags.
    pub fn start(
        dir: &Path,
        cloud: &TestCloud,
        kubeconfig: &Path,
        endpoint: &str,
        throttle: &str,
        extra: &[String],
    ) -> Result<Lbc, String> {
        install_crds(dir, kubeconfig)?;
        let certs = tempfile::Builder::new()
            .prefix("cloudlb-bench-lbc-certs-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        webhook_cert(certs.path())?;
        let health_port = free_port();
        let log = std::env::temp_dir().join(format!("cloudlb-bench-lbc-{}.log", cloud.cluster));
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| format!("log: {e}"))?;
        let mut args = flags(cloud, kubeconfig, endpoint, health_port, certs.path());
        if throttle != "default" {
            args.push(format!("--aws-api-throttle={throttle}"));
        }
        args.extend(extra.iter().cloned());
        let child = Command::new(dir.join("lbc"))
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", dir.join("lbc").display()))?;
        Ok(Lbc {
            proc: Proc(child),
            log,
            health_port,
            _certs: certs,
        })
    }

    /// Its health probe answers `/readyz` with 200.
    pub fn ready(&self) -> bool {
        http_get(&format!("127.0.0.1:{}", self.health_port), "/readyz")
            .is_some_and(|(status, _)| status == 200)
    }
}

fn flags(
    cloud: &TestCloud,
    kubeconfig: &Path,
    endpoint: &str,
    health_port: u16,
    certs: &Path,
) -> Vec<String> {
    let endpoints = [
        "EC2",
        "Elastic Load Balancing v2",
        "STS",
        "ACM",
        "Shield",
        "WAFV2",
        "WAF Regional",
        "Resource Groups Tagging API",
        "Global Accelerator",
        "Route 53",
    ]
    .map(|service| format!("{service}={endpoint}"))
    .join(",");
    vec![
        format!("--cluster-name={}", cloud.cluster),
        "--aws-region=us-east-1".into(),
        format!("--aws-vpc-id={}", cloud.vpc_id),
        format!("--aws-api-endpoints={endpoints}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--enable-leader-election=false".into(),
        format!("--metrics-bind-addr=127.0.0.1:{}", free_port()),
        format!("--health-probe-bind-addr=127.0.0.1:{health_port}"),
        format!("--webhook-bind-port={}", free_port()),
        format!("--webhook-cert-dir={}", certs.display()),
        "--enable-shield=false".into(),
        "--enable-waf=false".into(),
        "--enable-wafv2=false".into(),
    ]
}

/// `kubectl create` of LBC's CRDs (a fresh apiserver each run), then waits until they are served.
fn install_crds(dir: &Path, kubeconfig: &Path) -> Result<(), String> {
    let crds = dir.join("crds.yaml");
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new(tool("kubectl"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let path = crds.display().to_string();
    run(&["create", "-f", &path])?;
    run(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])
}

/// A self-signed certificate for LBC's webhook server (`tls.crt`, `tls.key` in `dir`).
fn webhook_cert(dir: &Path) -> Result<(), String> {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=lbc-webhook",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
