//! Test support on the real rig: attach to a running rig (or start one), give each test its own
//! Kubernetes namespace, AWS name prefix and network namespaces, and clean up after it.

pub mod apiserver;
pub mod backends;
pub mod cloud;
pub mod emulator;
pub mod faultproxy;
pub mod health_endpoint;
pub mod netns;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The repository root (where `dev/` lives).
pub fn repo_root() -> PathBuf {
    // This crate lives in tests/support.
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The `cloudlb` binary cargo built beside the running test (or bench) executable: tests run
/// from `target/<profile>/deps/`, the binary is `target/<profile>/cloudlb`. (`CARGO_BIN_EXE_*`
/// exists only inside the package's own test crates, not in this kit.)
pub fn cloudlb_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("cloudlb");
    assert!(
        bin.exists(),
        "{} not built (cargo builds it for integration tests)",
        bin.display()
    );
    bin
}

/// A running rig: paths and endpoints read from the env file `dev/rig up` writes.
#[derive(Clone, Debug)]
pub struct Rig {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub bridge_kubeconfig: PathBuf,
    pub aws_endpoint: String,
    pub region: String,
}

static RIG: OnceLock<Rig> = OnceLock::new();

impl Rig {
    /// Attaches to the rig named by `CLOUDLB_RIG_DIR` (or the default), starting it when it is
    /// not up. Test binaries run in parallel, so the start is serialised with a file lock.
    pub fn get() -> &'static Rig {
        RIG.get_or_init(|| {
            let root = repo_root();
            // -o: the rig's daemons must not inherit (and hold forever) the lock.
            let status = Command::new("flock")
                .arg("-o")
                .arg("/tmp/cloudlb-rig.lock")
                .arg(root.join("dev/rig"))
                .arg("up")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .output()
                .expect("run dev/rig up");
            assert!(status.status.success(), "dev/rig up failed");
            let env_file = String::from_utf8(status.stdout).expect("utf8");
            Rig::from_env_file(Path::new(env_file.trim()))
        })
    }

    fn from_env_file(path: &Path) -> Rig {
        let text = std::fs::read_to_string(path).expect("read rig env file");
        let var = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {}", path.display()))
                .to_string()
        };
        Rig {
            dir: PathBuf::from(var("CLOUDLB_RIG_DIR")),
            kubeconfig: PathBuf::from(var("KUBECONFIG")),
            bridge_kubeconfig: PathBuf::from(var("CLOUDLB_RIG_BRIDGE_KUBECONFIG")),
            aws_endpoint: var("AWS_ENDPOINT_URL"),
            region: var("AWS_REGION"),
        }
    }

    /// A value of the rig's env file (`CLOUDLB_RIG_NODE`, `CLOUDLB_RIG_CONTAINERD`, …).
    pub fn env(&self, key: &str) -> String {
        let path = self.dir.join("env");
        let text = std::fs::read_to_string(&path).expect("read rig env file");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {key}=")))
            .unwrap_or_else(|| panic!("{key} missing in {}", path.display()))
            .to_string()
    }

    /// A kube client with the rig's admin credential.
    pub async fn client(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }

    /// A kube client that authenticates with a bearer token (e.g. a ServiceAccount's).
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut kc = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        for user in &mut kc.auth_infos {
            if let Some(info) = user.auth_info.as_mut() {
                info.token = Some(token.to_string().into());
            }
        }
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }

    /// The AWS SDK configuration for the rig's LocalStack.
    pub async fn aws(&self) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.aws_endpoint)
            .region(Region::new(self.region.clone()))
            .credentials_provider(Credentials::new("test", "test", None, None, "rig"))
            .load()
            .await
    }

    /// Environment for a process (controller, node proxy) that should talk to this rig.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("AWS_ENDPOINT_URL", self.aws_endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]
    }

    /// `kubectl` against the rig; returns stdout, panics with stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Applies the generated CRDs (`crds/`) and waits until the apiserver serves them.
    pub fn install_crds(&self) {
        // Once per test process: tests running in parallel would race to create the CRD.
        static INSTALLED: OnceLock<()> = OnceLock::new();
        INSTALLED.get_or_init(|| self.apply_crds());
    }

    fn apply_crds(&self) {
        let dir = repo_root().join("crds");
        let dir = dir.to_str().expect("utf8 path");
        // Another test process may create it between our read and our create: apply again.
        let first = self.kubectl_output(&["apply", "-f", dir]);
        if !first.status.success() {
            let err = String::from_utf8_lossy(&first.stderr);
            assert!(
                err.contains("AlreadyExists"),
                "kubectl apply -f {dir} failed: {err}"
            );
            self.kubectl(&["apply", "-f", dir]);
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/targetgroupbindings.cloudlb.io",
            "--timeout=30s",
        ]);
    }

    pub fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(tool("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("run kubectl")
    }
}

/// `helm` from the cache, with its cache/config/data under the temp dir (not the user's home).
pub fn helm(args: &[&str]) -> std::process::Output {
    let tmp = std::env::temp_dir().join("cloudlb-helm");
    Command::new(tool("helm"))
        .args(args)
        .env("HELM_CACHE_HOME", tmp.join("cache"))
        .env("HELM_CONFIG_HOME", tmp.join("config"))
        .env("HELM_DATA_HOME", tmp.join("data"))
        .output()
        .expect("run helm")
}

/// A command's stdout and stderr, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Path of a tool the rig built into the cache (kubectl, helm, ...).
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var("CLOUDLB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let base = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache")
                });
            base.join("cloudlb")
        });
    cache.join("bin").join(name)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process and call: `PREFIX-<pid base36><seq>`.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}{n}", radix36(std::process::id()))
}

fn radix36(mut v: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// A Kubernetes namespace owned by one test; deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    rig: &'static Rig,
}

impl TestNamespace {
    pub async fn new(rig: &'static Rig, prefix: &str) -> TestNamespace {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(rig.client().await);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "cloudlb.io/test": "true" } }
        }))
        .expect("namespace");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        // The ServiceAccount admission plugin refuses Pods until the namespace's `default`
        // ServiceAccount exists (the controller-manager creates it within a second), as on any
        // real cluster.
        let accounts: Api<ServiceAccount> = Api::namespaced(rig.client().await, &name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while accounts.get_opt("default").await.ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "namespace {name}: no default ServiceAccount after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TestNamespace { name, rig }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("CLOUDLB_KEEP").is_some() {
            return;
        }
        let _ = self
            .rig
            .kubectl_output(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Deletes a namespace through the API (for tests that want to wait on it).
pub async fn delete_namespace(client: kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client);
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// A network namespace on the rig bridge; removed (with its processes) when dropped.
pub struct NetNs {
    pub name: String,
    pub ip: String,
    children: Vec<Child>,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = unique(prefix);
        let out = Command::new(repo_root().join("dev/netns"))
            .args(["add", &name])
            .output()
            .expect("run dev/netns");
        assert!(
            out.status.success(),
            "dev/netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ip = String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string();
        NetNs {
            name,
            ip,
            children: Vec::new(),
        }
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("clb-{}", self.name)])
            .arg(program);
        cmd
    }

    /// Starts a long-running process inside the namespace; it is killed when this is dropped.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.spawn().expect("spawn in netns");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Stops one process started with `spawn` (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, pid: u32, grace: Duration) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(pos);
            terminate(&mut child, grace);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            terminate(&mut c, Duration::from_secs(2));
        }
        let _ = Command::new(repo_root().join("dev/netns"))
            .args(["del", &self.name])
            .status();
    }
}

/// SIGTERM a child we started, wait up to `grace`, then SIGKILL; always reaps it.
pub fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        terminate(&mut self.0, Duration::from_secs(5));
    }
}

/// Polls `check` until it returns `Some`, at most `timeout`; panics with `what` on timeout.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Node object (cluster-scoped) with an InternalIP and a Ready condition; deleted on drop.
pub struct TestNode {
    pub name: String,
    rig: &'static Rig,
}

impl TestNode {
    /// Creates the Node; `provider_id` links it to an EC2 instance (`aws:///zone/i-…`).
    pub async fn new(
        rig: &'static Rig,
        prefix: &str,
        ip: &str,
        provider_id: Option<&str>,
        labels: serde_json::Value,
    ) -> TestNode {
        use k8s_openapi::api::core::v1::Node;
        let name = unique(prefix);
        let api: Api<Node> = Api::all(rig.client().await);
        let mut spec = serde_json::json!({});
        if let Some(p) = provider_id {
            spec["providerID"] = p.into();
        }
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        }))
        .expect("node");
        api.create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let node = TestNode { name, rig };
        node.set_ready(true, ip).await;
        node
    }

    /// Sets the Ready condition (and the InternalIP) through the status subresource.
    pub async fn set_ready(&self, ready: bool, ip: &str) {
        use k8s_openapi::api::core::v1::Node;
        let api: Api<Node> = Api::all(self.rig.client().await);
        let status = serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}, "reason": "Rig",
                            "lastHeartbeatTime": null, "lastTransitionTime": null}]
        }});
        api.patch_status(
            &self.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await
        .expect("patch node status");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if std::env::var_os("CLOUDLB_KEEP").is_none() {
            let _ = self
                .rig
                .kubectl_output(&["delete", "node", &self.name, "--wait=false"]);
        }
    }
}

/// Reasons of the Events recorded for object `name` in `ns` (of `kind` only, when given).
pub fn event_reasons(rig: &Rig, ns: &str, name: &str, kind: Option<&str>) -> Vec<String> {
    events(rig, ns, name, kind)
        .into_iter()
        .map(|(_, reason, _)| reason)
        .collect()
}

/// (type, reason, note) of the Events recorded for object `name` in `ns` (of `kind` only, when
/// given), oldest first.
pub fn events(
    rig: &Rig,
    ns: &str,
    name: &str,
    kind: Option<&str>,
) -> Vec<(String, String, String)> {
    let selector = match kind {
        Some(k) => format!("regarding.name={name},regarding.kind={k}"),
        None => format!("regarding.name={name}"),
    };
    rig.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "--field-selector",
        &selector,
        "--sort-by=.metadata.creationTimestamp",
        "-o",
        "jsonpath={range .items[*]}{.type}{\"\\t\"}{.reason}{\"\\t\"}{.note}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| {
        let mut parts = l.splitn(3, '\t');
        Some((
            parts.next()?.to_string(),
            parts.next()?.to_string(),
            parts.next()?.to_string(),
        ))
    })
    .collect()
}

/// A client acting as a namespace's tenant: a ServiceAccount `tenant` in `ns` whose Role lets
/// it manage Services and TargetGroupBindings there, and nothing else.
pub async fn tenant_client(rig: &'static Rig, ns: &str) -> kube::Client {
    let manifest = serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "tenant", "namespace": ns},
             "rules": [
                {"apiGroups": [""], "resources": ["services"], "verbs": ["*"]},
                {"apiGroups": ["cloudlb.io"], "resources": ["targetgroupbindings"], "verbs": ["*"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "tenant", "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
             "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}]}
        ]
    });
    let file = std::env::temp_dir().join(format!("cloudlb-tenant-{ns}.json"));
    std::fs::write(&file, manifest.to_string()).expect("write tenant manifest");
    rig.kubectl(&["apply", "-f", file.to_str().expect("utf8 path")]);
    let _ = std::fs::remove_file(&file);
    let token = rig.kubectl(&["create", "token", "tenant", "-n", ns]);
    rig.client_with_token(token.trim()).await
}

/// `status.loadBalancer.ingress[0].hostname` of Service `name`, when it has one.
pub async fn service_hostname(
    api: &Api<k8s_openapi::api::core::v1::Service>,
    name: &str,
) -> Option<String> {
    let svc = api.get_opt(name).await.ok()??;
    svc.status?
        .load_balancer?
        .ingress?
        .first()?
        .hostname
        .clone()
}

/// Moves the Service's ports to a nodePort of their own: `ports(n)` is the whole `ports` list
/// with nodePort `n`; tried from `after + 1` up (skipping ports another Service holds), at most
/// 50. Returns the port taken.
pub async fn move_node_port(
    api: &kube::Api<k8s_openapi::api::core::v1::Service>,
    name: &str,
    after: u16,
    ports: impl Fn(u16) -> serde_json::Value,
) -> u16 {
    let mut port = after;
    for _ in 0..50 {
        port = if port >= 32767 { 30000 } else { port + 1 };
        let patch = serde_json::json!({"spec": {"ports": ports(port)}});
        match api
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return port,
            Err(kube::Error::Api(s)) if s.message.contains("already allocated") => continue,
            Err(e) => panic!("move {name}'s nodePort to {port}: {e}"),
        }
    }
    panic!("no free nodePort after {after} for {name}")
}

/// A LoadBalancer Service of `class` selecting pods labelled `app: <name>`, with these ports
/// and annotations, as the tests create it.
pub fn lb_service(
    name: &str,
    class: &str,
    ports: serde_json::Value,
    annotations: serde_json::Value,
) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class,
                 "selector": {"app": name}, "ports": ports}
    }))
    .expect("a valid Service")
}
