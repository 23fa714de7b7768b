//! The container image (issue 12): `dev/image` builds a reproducible docker-archive holding only
//! the binary, its shared libraries, the CA bundle and the user database, which a registry tool
//! (skopeo) reads; the image runs for real as an OCI container under runc (no Docker) as uid
//! 65532 with a read-only root and no capabilities, prints its version, and makes AWS calls over
//! HTTPS that verify the server against its CA bundle (a test CA in front of LocalStack).

use cloudlb_testkit as support;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::cloud::{TestCloud, free_port, http_get};
use support::{Proc, Rig, TestNamespace, TestNode, repo_root, unique};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ENTRYPOINT: &str = "/usr/local/bin/cloudlb";
const DEBIAN_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Upper bound for one container run (the failing-TLS plan retries with backoff for ~15 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// dev/image and the archive

/// What `dev/image` printed.
#[derive(Clone, Debug)]
struct Built {
    path: PathBuf,
    id: String,
    tar_sha256: String,
    size: u64,
    cached: bool,
}

fn dev_image(out: Option<&Path>, epoch: Option<&str>) -> Built {
    let mut cmd = Command::new(repo_root().join("dev/image"));
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    if let Some(epoch) = epoch {
        cmd.env("SOURCE_DATE_EPOCH", epoch);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("run dev/image");
    assert!(out.status.success(), "dev/image failed: {:?}", out.status);
    let text = String::from_utf8(out.stdout).expect("utf8");
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("dev/image printed no {k}: {text}"))
            .to_string()
    };
    assert_eq!(field("image"), format!("cloudlb:{VERSION}"));
    Built {
        path: field("path").into(),
        id: field("id"),
        tar_sha256: field("tar-sha256"),
        size: field("size-bytes").parse().expect("size-bytes"),
        cached: field("cached") == "yes",
    }
}

/// The image at its default path (the one the README and the rig load), built once per process.
fn image() -> &'static Built {
    static IMAGE: OnceLock<Built> = OnceLock::new();
    IMAGE.get_or_init(|| dev_image(None, None))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One member of a ustar archive.
#[derive(Debug)]
struct Entry {
    name: String,
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
}

/// Parses a ustar archive (what `dev/image` writes) without trusting any tar tool's formatting.
fn tar_entries(bytes: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= bytes.len() {
        let h = &bytes[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let text = |a: usize, b: usize| {
            String::from_utf8_lossy(&h[a..b])
                .trim_end_matches('\0')
                .trim()
                .to_string()
        };
        let octal = |a: usize, b: usize| u64::from_str_radix(&text(a, b), 8).expect("octal field");
        assert_eq!(&h[257..263], b"ustar\0", "not a ustar header at {off}");
        let prefix = text(345, 500);
        let name = if prefix.is_empty() {
            text(0, 100)
        } else {
            format!("{prefix}/{}", text(0, 100))
        };
        let size = octal(124, 136) as usize;
        let start = off + 512;
        out.push(Entry {
            name,
            kind: h[156],
            mode: octal(100, 108) as u32,
            uid: octal(108, 116),
            gid: octal(116, 124),
            mtime: octal(136, 148),
            data: bytes[start..start + size].to_vec(),
        });
        off = start + size.div_ceil(512) * 512;
    }
    out
}

/// The docker-archive's three parts.
struct Archive {
    members: Vec<Entry>,
    manifest: Value,
    config_bytes: Vec<u8>,
    config: Value,
    layer: Vec<u8>,
}

fn read_archive(path: &Path) -> Archive {
    let members = tar_entries(&std::fs::read(path).expect("read image tar"));
    let member = |name: &str| {
        members
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing in {}", path.display()))
            .data
            .clone()
    };
    let manifest: Value = serde_json::from_slice(&member("manifest.json")).expect("manifest");
    let config_bytes = member(manifest[0]["Config"].as_str().expect("Config"));
    let config = serde_json::from_slice(&config_bytes).expect("config json");
    let layer = member(manifest[0]["Layers"][0].as_str().expect("Layers"));
    Archive {
        members,
        manifest,
        config_bytes,
        config,
        layer,
    }
}

/// The shared objects `ldd` lists for a binary, by the path the loader maps them from.
fn ldd(binary: &Path) -> BTreeSet<String> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}", binary.display());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            assert!(!l.contains("not found"), "ldd: {l}");
            let path = l.split_once("=> ").map_or(l, |(_, p)| p);
            let path = path.split(" (").next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn the_image_is_a_reproducible_docker_archive_with_only_its_files() {
    let first = image();
    eprintln!(
        "image {} at {}: {:.1} MB, tar sha256 {}",
        first.id,
        first.path.display(),
        first.size as f64 / 1e6,
        first.tar_sha256
    );
    // The chart's default image is this one: `cloudlb:<appVersion>`, appVersion = crate version.
    let chart_file = |f: &str| -> Value {
        let text = std::fs::read_to_string(repo_root().join("charts/cloudlb").join(f)).expect(f);
        serde_yaml_ng::from_str(&text).expect("chart YAML")
    };
    assert_eq!(chart_file("Chart.yaml")["appVersion"], VERSION);
    let values = chart_file("values.yaml");
    assert_eq!(values["image"]["repository"], "cloudlb");
    assert_eq!(values["image"]["tag"], "");
    assert_eq!(values["image"]["pullPolicy"], "IfNotPresent");
    let tmp = tempfile::tempdir().expect("tempdir");

    // Reproducible: assembled again from the same inputs, byte for byte the same.
    let again_path = tmp.path().join("again.tar");
    let again = dev_image(Some(&again_path), None);
    assert!(!again.cached, "a new path is assembled, not copied");
    assert_eq!(
        (&again.id, &again.tar_sha256),
        (&first.id, &first.tar_sha256)
    );
    assert_eq!(
        std::fs::read(&again_path).expect("read"),
        std::fs::read(&first.path).expect("read"),
    );
    // Cached: unchanged inputs are not assembled again.
    let cached = dev_image(Some(&again_path), None);
    assert!(cached.cached);
    assert_eq!(cached.tar_sha256, first.tar_sha256);

    // The docker-archive: exactly a layer, its config (named by its sha256) and manifest.json.
    let archive = read_archive(&first.path);
    let config_hex = sha256_hex(&archive.config_bytes);
    assert_eq!(first.id, format!("sha256:{config_hex}"));
    let layer_hex = sha256_hex(&archive.layer);
    let names: BTreeSet<&str> = archive.members.iter().map(|e| e.name.as_str()).collect();
    let layer_member = format!("{layer_hex}/layer.tar");
    let config_member = format!("{config_hex}.json");
    assert_eq!(
        names,
        BTreeSet::from([
            format!("{layer_hex}/").as_str(),
            layer_member.as_str(),
            config_member.as_str(),
            "manifest.json",
        ])
    );
    assert_eq!(
        archive.manifest,
        json!([{
            "Config": config_member,
            "RepoTags": [format!("cloudlb:{VERSION}")],
            "Layers": [layer_member],
        }])
    );
    let c = &archive.config;
    assert_eq!(c["architecture"], "amd64");
    assert_eq!(c["os"], "linux");
    assert_eq!(c["config"]["Entrypoint"], json!([ENTRYPOINT]));
    assert_eq!(c["config"]["User"], "65532:65532");
    assert_eq!(
        c["config"]["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    assert!(
        c["config"]["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .all(|e| !e.as_str().unwrap_or_default().starts_with("SSL_CERT")),
        "the TLS stack must find the bundle at its default path, not through an override"
    );
    assert_eq!(c["rootfs"]["type"], "layers");
    assert_eq!(
        c["rootfs"]["diff_ids"],
        json!([format!("sha256:{layer_hex}")])
    );

    // The layer: the binary, exactly the libraries ldd lists for it, the CA bundle, the user
    // database, their directories — nothing else; owners 0:0, one fixed mtime.
    let layer = tar_entries(&archive.layer);
    let binary = layer
        .iter()
        .find(|e| e.name == "usr/local/bin/cloudlb")
        .expect("binary in the layer");
    assert_eq!(binary.mode, 0o755);
    let binary_path = tmp.path().join("cloudlb");
    std::fs::write(&binary_path, &binary.data).expect("write binary");
    let mut want_files: BTreeSet<String> = [
        "usr/local/bin/cloudlb",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
    ]
    .map(String::from)
    .into();
    want_files.extend(
        ldd(&binary_path)
            .iter()
            .map(|p| p.trim_start_matches('/').to_string()),
    );
    let mut want_dirs = BTreeSet::new();
    for f in &want_files {
        let mut p = Path::new(f).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            want_dirs.insert(format!("{}/", d.display()));
            p = d.parent();
        }
    }
    let files: BTreeSet<String> = layer
        .iter()
        .filter(|e| e.kind == b'0')
        .map(|e| e.name.clone())
        .collect();
    let dirs: BTreeSet<String> = layer
        .iter()
        .filter(|e| e.kind == b'5')
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(files, want_files);
    assert_eq!(dirs, want_dirs);
    assert_eq!(layer.len(), files.len() + dirs.len(), "only files and dirs");
    let mut sorted: Vec<&str> = layer.iter().map(|e| e.name.as_str()).collect();
    sorted.sort_unstable();
    assert_eq!(
        layer.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        sorted,
        "entries in sorted order"
    );
    let mtime = layer[0].mtime;
    assert!(
        layer
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == mtime)
    );
    let data = |name: &str| &layer.iter().find(|e| e.name == name).expect("entry").data;
    let bundle = data("etc/ssl/certs/ca-certificates.crt");
    assert_eq!(
        bundle,
        &std::fs::read(DEBIAN_CA_BUNDLE).expect("Debian's CA bundle")
    );
    let certs = String::from_utf8_lossy(bundle)
        .matches("BEGIN CERTIFICATE")
        .count();
    assert!(certs > 100, "{certs} CA certificates");
    let passwd = String::from_utf8_lossy(data("etc/passwd")).to_string();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );
    let group = String::from_utf8_lossy(data("etc/group")).to_string();
    assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{group}");

    // Every time in the image comes from SOURCE_DATE_EPOCH, none from the clock.
    let epoch1 = dev_image(Some(&tmp.path().join("epoch1.tar")), Some("1"));
    assert_ne!(epoch1.id, first.id);
    let e1 = read_archive(&epoch1.path);
    assert!(tar_entries(&e1.layer).iter().all(|e| e.mtime == 1));
    assert!(e1.members.iter().all(|e| e.mtime == 1));
    assert_eq!(e1.config["created"], "1970-01-01T00:00:01Z");

    // A registry tool reads it: skopeo inspects it and copies it (verifying every digest).
    let inspect: Value = serde_json::from_str(&run_ok(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", first.path.display())),
    ))
    .expect("skopeo inspect json");
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"], json!([format!("sha256:{layer_hex}")]));
    let oci = tmp.path().join("oci");
    run_ok(
        Command::new("skopeo")
            .arg("copy")
            .arg("--quiet")
            .arg(format!("docker-archive:{}", first.path.display()))
            .arg(format!("oci:{}:cloudlb:{VERSION}", oci.display())),
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).expect("oci index"))
            .expect("index json");
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("cloudlb:{VERSION}")
    );
}

// ---------------------------------------------------------------------------------------------
// Running the image with runc

/// The image's root filesystem unpacked, with the config a container runtime reads from it.
struct Unpacked {
    dir: tempfile::TempDir,
    user: (u32, u32),
    entrypoint: Vec<String>,
    env: Vec<String>,
}

impl Unpacked {
    fn new(image: &Built) -> Unpacked {
        let archive = read_archive(&image.path);
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).expect("rootfs");
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, &archive.layer).expect("write layer");
        run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "--same-permissions", "-xf"])
                .arg(&layer)
                .arg("-C")
                .arg(&rootfs),
        );
        let conf = &archive.config["config"];
        let (uid, gid) = conf["User"]
            .as_str()
            .and_then(|u| u.split_once(':'))
            .expect("User uid:gid");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .expect("array")
                .iter()
                .map(|s| s.as_str().expect("string").to_string())
                .collect()
        };
        Unpacked {
            user: (uid.parse().expect("uid"), gid.parse().expect("gid")),
            entrypoint: strings(&conf["Entrypoint"]),
            env: strings(&conf["Env"]),
            dir,
        }
    }

    /// A container of this image running the entrypoint with `args`.
    fn container(&self, args: &[&str]) -> Container<'_> {
        let mut argv: Vec<&str> = self.entrypoint.iter().map(String::as_str).collect();
        argv.extend(args);
        self.command(&argv)
    }

    /// A container of this image running `argv` instead of the entrypoint.
    fn command(&self, argv: &[&str]) -> Container<'_> {
        Container {
            image: self,
            args: argv.iter().map(|s| s.to_string()).collect(),
            env: self.env.clone(),
            mounts: Vec::new(),
        }
    }
}

/// An OCI runtime spec for one run: the image's user, a read-only root, no capabilities, no new
/// privileges, its own pid/ipc/uts/mount namespaces and cgroup; the host's network namespace, so
/// loopback reaches the rig. (No oomScoreAdj: this VM lacks CAP_SYS_RESOURCE.)
struct Container<'a> {
    image: &'a Unpacked,
    args: Vec<String>,
    env: Vec<String>,
    mounts: Vec<(PathBuf, String)>,
}

impl Container<'_> {
    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Bind-mounts a host file read-only at `at`.
    fn mount(mut self, host: &Path, at: &str) -> Self {
        self.mounts.push((host.to_path_buf(), at.to_string()));
        self
    }

    fn spec(&self, cgroup: &str) -> Value {
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=1024k"]}),
        ];
        mounts.extend(self.mounts.iter().map(|(host, at)| {
            json!({"destination": at, "type": "bind", "source": host,
                   "options": ["rbind", "ro", "nosuid", "nodev"]})
        }));
        let no_caps: [&str; 0] = [];
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": self.image.user.0, "gid": self.image.user.1},
                "args": self.args,
                "env": self.env,
                "cwd": "/",
                "capabilities": {"bounding": no_caps, "effective": no_caps,
                                 "inheritable": no_caps, "permitted": no_caps, "ambient": no_caps},
                "noNewPrivileges": true,
            },
            "root": {"path": self.image.dir.path().join("rootfs"), "readonly": true},
            "hostname": "cloudlb-image-test",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "cgroupsPath": cgroup,
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        })
    }

    /// Starts `runc run` (foreground; the container's stdout/stderr go to files).
    fn start(self) -> Running {
        let id = unique("clbimg");
        let cgroup = format!("/cloudlb-image-test-{id}");
        let dir = tempfile::tempdir().expect("bundle dir");
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec_pretty(&self.spec(&cgroup)).expect("spec"),
        )
        .expect("write config.json");
        let state = dir.path().join("runc-state");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr");
        let child = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(dir.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("runc run (dev/install-deps installs runc)");
        Running {
            id,
            cgroup,
            state,
            dir,
            child,
        }
    }

    /// Runs to completion (at most RUN_TIMEOUT): (status, stdout, stderr).
    fn run(self) -> (ExitStatus, String, String) {
        let mut running = self.start();
        let status = running.wait(RUN_TIMEOUT).unwrap_or_else(|| {
            let (out, err) = running.output();
            panic!("container still running after {RUN_TIMEOUT:?}: {out}{err}")
        });
        let (out, err) = running.output();
        (status, out, err)
    }
}

/// A `runc run`; on drop the container is killed (if still running) and deleted, with its cgroup.
struct Running {
    id: String,
    cgroup: String,
    state: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
}

impl Running {
    fn runc(&self, args: &[&str]) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("run runc")
    }

    /// The container process's pid on the host (`runc state`).
    fn pid(&self) -> u32 {
        let out = self.runc(&["state", &self.id]);
        assert!(out.status.success(), "runc state: {:?}", out);
        let state: Value = serde_json::from_slice(&out.stdout).expect("state json");
        assert_eq!(state["status"], "running");
        state["pid"].as_u64().expect("pid") as u32
    }

    fn signal(&self, signal: &str) {
        let out = self.runc(&["kill", &self.id, signal]);
        assert!(out.status.success(), "runc kill {signal}: {out:?}");
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait runc") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> (String, String) {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        (read("stdout"), read("stderr"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.runc(&["kill", &self.id, "KILL"]);
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = self.runc(&["delete", "--force", &self.id]);
    }
}

/// Whether any cgroup v1/v2 hierarchy still has the container's cgroup.
fn cgroup_left(cgroup: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join(cgroup.trim_start_matches('/')))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

/// A static probe: identity, capabilities and write attempts, from inside the container.
fn probe_binary(dir: &Path) -> PathBuf {
    let src = dir.join("probe.c");
    std::fs::write(
        &src,
        r#"#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
  printf("uid=%d gid=%d euid=%d egid=%d\n", getuid(), getgid(), geteuid(), getegid());
  const char *paths[] = {"/probe-write", "/etc/probe-write", "/etc/passwd", "/usr/local/bin/cloudlb", 0};
  for (int i = 0; paths[i]; i++) {
    int fd = open(paths[i], O_WRONLY | O_CREAT, 0644);
    printf("write %s: %s\n", paths[i], fd < 0 ? strerror(errno) : "ok");
    if (fd >= 0) close(fd);
  }
  char line[512];
  FILE *f = fopen("/proc/self/status", "r");
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10)) fputs(line, stdout);
  return 0;
}
"#,
    )
    .expect("write probe.c");
    let bin = dir.join("probe");
    run_ok(
        Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    bin
}

#[test]
fn the_image_runs_under_runc_as_nonroot_with_a_read_only_root_and_no_capabilities() {
    let image = Unpacked::new(image());
    assert_eq!(image.user, (65532, 65532));

    let version = image.container(&["--version"]);
    let (status, out, err) = version.run();
    assert!(status.success(), "cloudlb --version: {status:?} {err}");
    assert_eq!(out.trim(), format!("cloudlb {VERSION}"));

    // The same container settings, with a static probe bind-mounted in (not part of the image).
    let tmp = tempfile::tempdir().expect("tempdir");
    let probe = probe_binary(tmp.path());
    let mut running = image.command(&["/.probe"]).mount(&probe, "/.probe").start();
    let cgroup = running.cgroup.clone();
    let status = running.wait(RUN_TIMEOUT).expect("probe finished");
    let (out, err) = running.output();
    assert!(status.success(), "probe: {status:?} {out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"uid=65532 gid=65532 euid=65532 egid=65532"),
        "{out}"
    );
    // Creating a file fails with EROFS, not EACCES (the directories are root's, so a writable
    // root would say EACCES): the root filesystem is mounted read-only.
    for path in ["/probe-write", "/etc/probe-write"] {
        assert!(
            lines.contains(&format!("write {path}: Read-only file system").as_str()),
            "{out}"
        );
    }
    // The image's own files (root's, 0644/0755) cannot be written either.
    for path in ["/etc/passwd", "/usr/local/bin/cloudlb"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("write {path}: ")))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(!line.ends_with(": ok"), "{out}");
    }
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            lines.contains(&format!("{cap}:\t0000000000000000").as_str()),
            "{cap} not empty: {out}"
        );
    }
    assert!(lines.contains(&"NoNewPrivs:\t1"), "{out}");

    // Cleaned up: no container left in runc's state, no cgroup left.
    drop(running);
    assert!(
        cgroup_left(&cgroup).is_empty(),
        "{:?}",
        cgroup_left(&cgroup)
    );
}

// ---------------------------------------------------------------------------------------------
// AWS over HTTPS from inside the image

/// A TLS terminator (socat) on loopback in front of the rig's LocalStack, with a throwaway CA.
struct TlsFront {
    _proc: Proc,
    port: u16,
    ca: PathBuf,
    dir: tempfile::TempDir,
}

impl TlsFront {
    fn start(rig: &Rig) -> TlsFront {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| dir.path().join(f);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(ec)
                .arg("-keyout")
                .arg(p("ca.key"))
                .arg("-out")
                .arg(p("ca.crt"))
                .args(["-days", "2", "-subj", "/CN=cloudlb image test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
        );
        run_ok(
            Command::new("openssl")
                .arg("req")
                .args(ec)
                .arg("-keyout")
                .arg(p("server.key"))
                .arg("-out")
                .arg(p("server.csr"))
                .args(["-subj", "/CN=127.0.0.1"]),
        );
        std::fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("server.ext");
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
                .arg("-in")
                .arg(p("server.csr"))
                .arg("-CA")
                .arg(p("ca.crt"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(p("server.ext"))
                .arg("-out")
                .arg(p("server.crt")),
        );
        let upstream = rig
            .aws_endpoint
            .strip_prefix("http://")
            .expect("the rig's LocalStack speaks plain HTTP")
            .trim_end_matches('/')
            .to_string();
        assert!(upstream.starts_with("127.0.0.1:"), "{upstream}");
        let port = free_port();
        let log = std::fs::File::create(p("socat.log")).expect("socat log");
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                p("server.crt").display(),
                p("server.key").display()
            ))
            .arg(format!("TCP:{upstream}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start socat");
        let proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsFront {
            _proc: proc,
            port,
            ca: p("ca.crt"),
            dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// A container of the image talking to the rig: its kubeconfig mounted read-only, AWS at the TLS
/// front, static test credentials (no instance metadata lookups).
fn rig_container<'a>(
    image: &'a Unpacked,
    rig: &Rig,
    front: &TlsFront,
    args: &[&str],
) -> Container<'a> {
    image
        .container(args)
        .mount(&rig.kubeconfig, "/etc/cloudlb/kubeconfig")
        .env("KUBECONFIG", "/etc/cloudlb/kubeconfig")
        .env("AWS_ENDPOINT_URL", &front.endpoint())
        .env("AWS_REGION", &rig.region)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_over_https_from_the_image_verifies_the_server_against_its_ca_bundle() {
    let rig = Rig::get();
    let ns = TestNamespace::new(rig, "image").await;
    let cloud = TestCloud::new(rig, "image").await;
    let instance = cloud.instance(None).await;
    let _node = TestNode::new(
        rig,
        "image-a",
        "10.213.250.41",
        Some(&TestCloud::provider_id(&instance)),
        json!({"cloudlb.io/test-cluster": cloud.cluster}),
    )
    .await;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": cloud.class, "selector": {"app": "web"},
                 "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    Api::<Service>::namespaced(rig.client().await, &ns.name)
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");

    let front = TlsFront::start(rig);
    let image = Unpacked::new(image());
    // Debian's bundle plus the test CA, to put where the TLS stack looks by default.
    let combined = front.dir.path().join("bundle-with-test-ca.crt");
    let mut bundle = std::fs::read(DEBIAN_CA_BUNDLE).expect("bundle");
    bundle.extend(std::fs::read(&front.ca).expect("ca"));
    std::fs::write(&combined, bundle).expect("combined bundle");

    let selector = format!("cloudlb.io/test-cluster={}", cloud.cluster);
    let args = [
        "plan",
        "--cluster-name",
        &cloud.cluster,
        "--load-balancer-class",
        &cloud.class,
        "-n",
        &ns.name,
        "--node-selector",
        &selector,
    ];
    let key = format!("{}/web:", ns.name);
    let container = || rig_container(&image, rig, &front, &args);

    // 1. Only the image's own (Debian) bundle: the test CA is unknown, so every call fails on
    //    certificate verification, and the bundle itself was found and loaded.
    let (out, err) = run_plan(container());
    let failure = out
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("no line for the Service: {out}\n{err}"));
    assert!(
        failure.starts_with(&format!("{key} cannot observe:")),
        "{out}\n{err}"
    );
    assert!(
        failure.contains("invalid peer certificate") && failure.contains("UnknownIssuer"),
        "not a certificate error: {failure}"
    );
    assert!(
        !format!("{out}{err}").contains("no native root CA certificates found"),
        "{err}"
    );

    // 2. The test CA trusted through SSL_CERT_FILE (the variable rustls-native-certs honours).
    let (out, err) = run_plan(
        container()
            .mount(&front.ca, "/etc/cloudlb-test/ca.crt")
            .env("SSL_CERT_FILE", "/etc/cloudlb-test/ca.crt"),
    );
    assert_observed(&out, &err, &key);

    // 3. The test CA added to the bundle at the image's path, no variable: that path is where
    //    the TLS stack looks by default.
    let (out, err) = run_plan(container().mount(&combined, DEBIAN_CA_BUNDLE));
    assert_observed(&out, &err, &key);
}

/// Runs `cloudlb plan` in a container (blocking this runtime worker only); it exits 0 either way.
fn run_plan(c: Container<'_>) -> (String, String) {
    let (status, out, err) = tokio::task::block_in_place(|| c.run());
    assert!(status.success(), "cloudlb plan: {status:?}\n{out}\n{err}");
    (out, err)
}

/// `cloudlb plan` observed the Service's cloud state (the Describe calls succeeded over HTTPS)
/// and planned its load balancer.
fn assert_observed(out: &str, err: &str, key: &str) {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with(key)).collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| !l.contains("cannot observe")),
        "{out}\n{err}"
    );
    for step in ["CreateTargetGroup", "CreateLoadBalancer", "CreateListener"] {
        assert!(lines.iter().any(|l| l.contains(step)), "no {step}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_runs_in_the_image_as_65532_on_a_read_only_root_and_stops_on_sigterm() {
    let rig = Rig::get();
    rig.install_crds();
    let front = TlsFront::start(rig);
    let image = Unpacked::new(image());
    let cluster = unique("image-ctl");
    let class = format!("cloudlb.io/{cluster}");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let c = rig_container(
        &image,
        rig,
        &front,
        &[
            "controller",
            "--cluster-name",
            &cluster,
            "--load-balancer-class",
            &class,
            "--metrics-addr",
            &metrics_addr,
        ],
    )
    .mount(&front.ca, "/etc/cloudlb-test/ca.crt")
    .env("SSL_CERT_FILE", "/etc/cloudlb-test/ca.crt");
    let mut running = c.start();

    // Ready: its caches synced through the apiserver, from inside the container.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = http_get(&metrics_addr, "/readyz") {
            break;
        }
        let (out, err) = running.output();
        assert!(
            running.child.try_wait().expect("wait").is_none(),
            "controller exited: {out}{err}"
        );
        assert!(Instant::now() < deadline, "not ready in 30 s: {out}{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The kernel's view of the cloudlb process itself.
    let pid = running.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("{k} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Name"), ["cloudlb"]);
    assert_eq!(field("Uid"), ["65532"; 4]);
    assert_eq!(field("Gid"), ["65532"; 4]);
    for cap in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(cap), ["0000000000000000"], "{cap}");
    }
    let mut mountinfo = String::new();
    std::fs::File::open(format!("/proc/{pid}/mountinfo"))
        .and_then(|mut f| f.read_to_string(&mut mountinfo))
        .expect("mountinfo");
    let root = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .expect("root mount");
    assert!(
        root[5].split(',').any(|o| o == "ro"),
        "root mount options {}",
        root[5]
    );

    // SIGTERM (what the kubelet sends): a clean exit, promptly.
    running.signal("TERM");
    let exit = running.wait(Duration::from_secs(20));
    let (out, err) = running.output();
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit after SIGTERM: {exit:?}\n{out}{err}"
    );
}
