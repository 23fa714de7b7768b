//! A private etcd + kube-apiserver for tests that restart the apiserver (the shared rig's must
//! never be disturbed). Reuses the rig's binaries and PKI; own data dir, own ports; both
//! processes are children of the test, recorded by pid and stopped on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cloud::free_port;
use super::{Proc, Rig, terminate, tool};

pub struct PrivateApiserver {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub kubeconfig: PathBuf,
    etcd_port: u16,
    pki: PathBuf,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    pub restarts: u32,
}

impl PrivateApiserver {
    /// Starts etcd and kube-apiserver and waits until the apiserver is ready.
    pub async fn start(rig: &Rig) -> PrivateApiserver {
        let dir = tempfile::Builder::new()
            .prefix("cloudlb-private-apiserver-")
            .tempdir()
            .expect("tempdir");
        let (port, etcd_port, peer_port) = (free_port(), free_port(), free_port());
        let pki = rig.dir.join("pki");
        let kubeconfig = dir.path().join("kubeconfig");
        let rig_kc = std::fs::read_to_string(&rig.kubeconfig).expect("rig kubeconfig");
        let server_line = rig_kc
            .lines()
            .find(|l| l.trim_start().starts_with("server:"))
            .expect("server in kubeconfig")
            .to_string();
        let indent = &server_line[..server_line.len() - server_line.trim_start().len()];
        std::fs::write(
            &kubeconfig,
            rig_kc.replace(
                &server_line,
                &format!("{indent}server: https://127.0.0.1:{port}"),
            ),
        )
        .expect("write kubeconfig");
        let log = |name: &str| {
            std::fs::File::create(dir.path().join(format!("{name}.log"))).expect("log file")
        };
        let peer = format!("http://127.0.0.1:{peer_port}");
        let client = format!("http://127.0.0.1:{etcd_port}");
        let etcd = Command::new(tool("etcd"))
            .args([
                "--name",
                "private",
                "--unsafe-no-fsync",
                "--listen-metrics-urls",
                "",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("private={peer}")])
            .stdout(Stdio::null())
            .stderr(log("etcd"))
            .spawn()
            .expect("start etcd");
        eprintln!(
            "private etcd pid {} on {etcd_port}, data in {}",
            etcd.id(),
            dir.path().display()
        );
        let mut me = PrivateApiserver {
            dir,
            port,
            kubeconfig,
            etcd_port,
            pki,
            etcd: Some(Proc(etcd)),
            apiserver: None,
            restarts: 0,
        };
        me.start_apiserver().await;
        me
    }

    async fn start_apiserver(&mut self) {
        let pki = |f: &str| self.pki.join(f).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kube-apiserver.log"))
            .expect("log file");
        let child = Command::new(tool("kube-apiserver"))
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            .arg("--endpoint-reconciler-type=none")
            .arg(format!(
                "--cert-dir={}",
                self.dir.path().join("apiserver").display()
            ))
            .arg(format!("--tls-cert-file={}", pki("server.crt")))
            .arg(format!("--tls-private-key-file={}", pki("server.key")))
            .arg(format!("--client-ca-file={}", pki("ca.crt")))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--authorization-mode=RBAC")
            .arg(format!("--token-auth-file={}", pki("tokens.csv")))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", pki("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki("sa.key")
            ))
            .args([
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--profiling=false",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kube-apiserver");
        eprintln!("private kube-apiserver pid {} on {}", child.id(), self.port);
        self.apiserver = Some(Proc(child));
        self.wait_ready(Duration::from_secs(60)).await;
    }

    /// Polls /readyz through kubectl until it answers ok.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new(tool("kubectl"))
                .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
                .env("KUBECONFIG", &self.kubeconfig)
                .output()
                .expect("kubectl");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private apiserver not ready after {timeout:?}; see {}",
                self.dir.path().join("kube-apiserver.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the apiserver (SIGTERM, as a rolling restart does), stays down for `down`, starts
    /// it again on the same port and etcd.
    pub async fn restart(&mut self, down: Duration) {
        if let Some(mut p) = self.apiserver.take() {
            terminate(&mut p.0, Duration::from_secs(20));
        }
        tokio::time::sleep(down).await;
        self.start_apiserver().await;
        self.restarts += 1;
    }

    /// Freezes the apiserver process (SIGSTOP to its PID): connections stay open, nothing
    /// answers — a hung apiserver as a client sees it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused apiserver run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.apiserver.as_ref().expect("apiserver running").0.id();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("config");
        kube::Client::try_from(config).expect("client")
    }
}

impl Drop for PrivateApiserver {
    fn drop(&mut self) {
        // apiserver before etcd
        drop(self.apiserver.take());
        drop(self.etcd.take());
    }
}

/// A Ready Node named `name` (InternalIP `ip`, providerID of a new EC2 instance in the test
/// subnet, the label the controller's node selector wants); returns the instance id.
pub async fn ready_node(
    client: &kube::Client,
    cloud: &super::cloud::TestCloud,
    name: &str,
    ip: &str,
) -> String {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let id = cloud.instance(None).await;
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"cloudlb.io/test-cluster": cloud.cluster}},
        "spec": {"providerID": super::cloud::TestCloud::provider_id(&id)},
    }))
    .expect("node");
    api.create(&PostParams::default(), &node)
        .await
        .expect("create node");
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Rig",
                            "lastHeartbeatTime": null, "lastTransitionTime": null}]}})),
    )
    .await
    .expect("node status");
    id
}
