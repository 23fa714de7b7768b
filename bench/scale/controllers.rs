//! The two controllers under test behind one face: start against a run's cloud, apiserver and
//! counting proxy; ready; pid (for peak RSS); stop on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::Rig;
use crate::support::cloud::{ControllerProc, TestCloud};

use super::lbc::{self, Lbc};

/// Which controller a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cloudlb,
    Lbc,
}

impl Kind {
    /// The name in `FIGURE <name> …` lines and the table header.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cloudlb => "cloudlb",
            Kind::Lbc => "lbc",
        }
    }

    /// Parses `cloudlb` / `lbc` (the `CONTROLLERS` list).
    pub fn parse(s: &str) -> Option<Kind> {
        match s.trim() {
            "cloudlb" => Some(Kind::Cloudlb),
            "lbc" => Some(Kind::Lbc),
            _ => None,
        }
    }
}

/// How each controller is started (from the environment; see `bench/controller-scale`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub cloudlb_flags: Vec<String>,
    pub cloudlb_log: String,
    pub lbc_dir: Option<PathBuf>,
    pub lbc_throttle: String,
    pub lbc_flags: Vec<String>,
}

/// A controller process under test.
pub enum Controller {
    Cloudlb(ControllerProc),
    Lbc(Lbc),
}

impl Controller {
    /// Starts `kind` for `cloud` against the apiserver of `kubeconfig`, its AWS calls through
    /// `endpoint` (the counting proxy).
    pub fn start(
        kind: Kind,
        rig: &Rig,
        cloud: &TestCloud,
        kubeconfig: &Path,
        endpoint: &str,
        settings: &Settings,
    ) -> Result<Controller, String> {
        match kind {
            Kind::Cloudlb => {
                let kc = kubeconfig.display().to_string();
                let flags: Vec<&str> = settings.cloudlb_flags.iter().map(String::as_str).collect();
                let env = [
                    ("KUBECONFIG", kc.as_str()),
                    ("AWS_ENDPOINT_URL", endpoint),
                    ("RUST_LOG", settings.cloudlb_log.as_str()),
                ];
                Ok(Controller::Cloudlb(ControllerProc::start_with_env(
                    rig, cloud, &flags, &env,
                )))
            }
            Kind::Lbc => {
                let dir = settings.lbc_dir.as_deref().ok_or(
                    "LBC_DIR is not set (bench/controller-scale sets it from bench/build-lbc)",
                )?;
                Ok(Controller::Lbc(Lbc::start(
                    dir,
                    cloud,
                    kubeconfig,
                    endpoint,
                    &settings.lbc_throttle,
                    &settings.lbc_flags,
                )?))
            }
        }
    }

    /// The class of the Services this controller serves in a run on `cloud`.
    pub fn class(kind: Kind, cloud: &TestCloud) -> String {
        match kind {
            Kind::Cloudlb => cloud.class.clone(),
            Kind::Lbc => lbc::CLASS.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            Controller::Cloudlb(c) => c.proc.0.id(),
            Controller::Lbc(l) => l.proc.0.id(),
        }
    }

    /// Serving: cloudlb's /metrics answers, LBC's /readyz is 200.
    pub fn ready(&self) -> bool {
        match self {
            Controller::Cloudlb(c) => !c.metrics().is_empty(),
            Controller::Lbc(l) => l.ready(),
        }
    }

    /// Still running (a crashed controller ends the run's waits early, with its log named).
    pub fn alive(&mut self) -> bool {
        let proc = match self {
            Controller::Cloudlb(c) => &mut c.proc,
            Controller::Lbc(l) => &mut l.proc,
        };
        matches!(proc.0.try_wait(), Ok(None))
    }

    /// Where its log goes.
    pub fn log(&self, cluster: &str) -> PathBuf {
        match self {
            Controller::Cloudlb(c) => std::env::temp_dir().join(format!(
                "cloudlb-controller-{cluster}-{}.log",
                c.metrics_port
            )),
            Controller::Lbc(l) => l.log.clone(),
        }
    }
}

/// The run's settings from the environment.
pub fn settings_from_env() -> Settings {
    let words = |key: &str, default: &str| -> Vec<String> {
        std::env::var(key)
            .unwrap_or_else(|_| default.into())
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    Settings {
        cloudlb_flags: words("CLOUDLB_BENCH_FLAGS", "--aws-qps 0 --aws-targets-qps 0"),
        cloudlb_log: std::env::var("CLOUDLB_BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        lbc_dir: std::env::var_os("LBC_DIR").map(PathBuf::from),
        lbc_throttle: std::env::var("LBC_AWS_API_THROTTLE")
            .unwrap_or_else(|_| lbc::NO_THROTTLE.into()),
        lbc_flags: words("LBC_BENCH_FLAGS", ""),
    }
}

/// How long a controller may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
