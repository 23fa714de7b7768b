//! Runner of the NLB data-plane emulator for the demo and for poking at the rig by hand
//! (`dev/emulator start` builds and starts it in the background). Not a test: `cargo test` runs it
//! without arguments and it returns at once.
//!
//!     nlb_emulator serve --netns NAME [--cluster NAME] [--time-scale F] [--poll-ms N] [--map-file PATH] [--registration-ms N] [--aws-listen ADDR]
//!
//! AWS settings come from the environment (`AWS_ENDPOINT_URL`, …, as in the rig's env file).
//! `--aws-listen ADDR` also serves the rig's AWS endpoint with real target health
//! (tests/support/health_endpoint.rs) on ADDR, in front of `AWS_ENDPOINT_URL`: point a controller's
//! `AWS_ENDPOINT_URL` at it to see the emulator's `DescribeTargetHealth`.

use cloudlb_testkit as support;

use std::path::PathBuf;
use std::time::Duration;

use support::emulator::{Emulator, EmulatorConfig};
use support::health_endpoint::HealthEndpoint;

fn usage() -> ! {
    eprintln!(
        "usage: nlb_emulator serve --netns NAME [--cluster NAME] [--time-scale F] [--poll-ms N] [--map-file PATH] [--registration-ms N] [--aws-listen ADDR]"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("serve") {
        println!(
            "nlb_emulator: a runner, not a test (`dev/emulator start` runs it); nothing to do"
        );
        return;
    }
    let mut config = EmulatorConfig::new("lbs");
    let mut aws_listen = None;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--netns" => config.netns = value,
            "--cluster" => config.cluster = Some(value),
            "--time-scale" => config.time_scale = value.parse().unwrap_or_else(|_| usage()),
            "--poll-ms" => {
                config.poll_interval =
                    Duration::from_millis(value.parse().unwrap_or_else(|_| usage()))
            }
            "--map-file" => config.map_file = Some(PathBuf::from(value)),
            "--registration-ms" => {
                config.registration_delay =
                    Duration::from_millis(value.parse().unwrap_or_else(|_| usage()))
            }
            "--aws-listen" => aws_listen = Some(value),
            _ => usage(),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let aws = aws_config::load_from_env().await;
        let emulator = Emulator::start(&aws, config).await;
        let _endpoint = match aws_listen {
            Some(listen) => {
                let upstream = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| usage());
                let e = HealthEndpoint::start(&listen, &upstream, emulator.health_view()).await;
                eprintln!(
                    "AWS endpoint with the emulator's target health: {}",
                    e.url()
                );
                Some(e)
            }
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        emulator.stop();
    });
}
