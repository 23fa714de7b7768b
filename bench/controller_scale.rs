//! Scale benchmark driver, cloudlb side by side with the AWS Load Balancer Controller (run by
//! `bench/controller-scale`; prints figures, asserts nothing about time). Each controller in
//! turn, alone on the machine: N Services of its own class on its own private kube-apiserver
//! (rig binaries and PKI), its own VPC, subnet and cluster name on the rig's LocalStack, its AWS
//! calls counted by a proxy in front of LocalStack. Then a table with both and the ratio, and
//! one `FIGURE <controller> <name> <value>` line per figure.
//!
//! Env: N (1000), CONTROLLERS (`cloudlb,lbc`), STEADY_SECONDS (60), QUIET_SECONDS (3),
//! PHASE_TIMEOUT_SECONDS (900), TIMEOUT_SECONDS (2400, the whole run), LBC_DIR (from
//! `bench/build-lbc`), CLOUDLB_BENCH_FLAGS, CLOUDLB_BENCH_RUST_LOG, LBC_AWS_API_THROTTLE,
//! LBC_BENCH_FLAGS (see `bench/controller-scale`).

use cloudlb_testkit as support;

mod scale;

use std::time::{Duration, Instant};

use scale::controllers::{Kind, Settings, settings_from_env};
use scale::phases::{self, Config};
use scale::{Budget, env_or, load_average, report};
use support::Rig;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env_or("N", 1000);
    let cfg = Config {
        n,
        first: n.min(20),
        steady: Duration::from_secs(env_or("STEADY_SECONDS", 60)),
        in_flight: 16,
        quiet: Duration::from_secs(env_or("QUIET_SECONDS", 3)),
    };
    let kinds: Vec<Kind> = std::env::var("CONTROLLERS")
        .unwrap_or_else(|_| "cloudlb,lbc".into())
        .split(',')
        .map(|k| Kind::parse(k).unwrap_or_else(|| panic!("CONTROLLERS: unknown {k:?}")))
        .collect();
    let settings = settings_from_env();
    let started = Instant::now();
    let budget = Budget {
        phase: Duration::from_secs(env_or("PHASE_TIMEOUT_SECONDS", 900)),
        deadline: started + Duration::from_secs(env_or("TIMEOUT_SECONDS", 2400)),
    };
    let load0 = load_average();
    let rig = Rig::get();
    let mut runs = Vec::new();
    let mut took = Vec::new();
    for kind in kinds {
        let t0 = Instant::now();
        eprintln!("bench: {}: N={n}, starting", kind.name());
        let figures = phases::run(kind, rig, &cfg, &settings, budget).await;
        took.push(format!(
            "{} {:.1} min",
            kind.name(),
            t0.elapsed().as_secs_f64() / 60.0
        ));
        runs.push((kind, figures));
    }
    let header = header(rig, &cfg, &settings, &took, started, &load0);
    report::print(&header, &runs, n, cfg.first, cfg.steady.as_secs());
}

fn header(
    rig: &Rig,
    cfg: &Config,
    settings: &Settings,
    took: &[String],
    started: Instant,
    load0: &str,
) -> String {
    let lbc = settings
        .lbc_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("version")).ok())
        .unwrap_or_else(|| "LBC".into());
    format!(
        "Controller scale, side by side — N={} Services (1 TCP port each), 3 nodes (+1 joining, \
         then leaving); each controller alone in turn, with its own private kube-apiserver, VPC, \
         subnet and cluster name, its AWS calls counted by a proxy in front of LocalStack {}.\n\
         cloudlb: flags `{}`, RUST_LOG={}. {}: `--aws-api-throttle={}` {}, other flags as \
         ../shared/peers/README.md. Steady window {} s, quiet window {} s.\n\
         Run took {:.1} min ({}); 1-min load average {} at the start, {} at the end.",
        cfg.n,
        rig.aws_endpoint,
        settings.cloudlb_flags.join(" "),
        settings.cloudlb_log,
        lbc.trim(),
        settings.lbc_throttle,
        settings.lbc_flags.join(" "),
        cfg.steady.as_secs(),
        cfg.quiet.as_secs(),
        started.elapsed().as_secs_f64() / 60.0,
        took.join(", "),
        load0,
        load_average()
    )
}
