//! The `cloudlb` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use cloudlb::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "cloudlb",
    version,
    about = "LoadBalancer Services as AWS NLBs, with an embedded node proxy"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "CLOUDLB_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile Services of type LoadBalancer into NLBs.
    Controller(cloudlb::controller::ControllerArgs),
    /// Forward NodePort traffic on this node to ready pod endpoints.
    NodeProxy(cloudlb::proxy::NodeProxyArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
    /// Print the cloud changes the controller would make now, changing nothing.
    Plan(cloudlb::controller::plan_cmd::PlanArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Controller(args) => {
            cloudlb::runtime::tokio_runtime(None)?.block_on(cloudlb::controller::run(args))
        }
        Command::NodeProxy(args) => cloudlb::proxy::run(args),
        Command::Plan(args) => cloudlb::runtime::tokio_runtime(None)?
            .block_on(cloudlb::controller::plan_cmd::run(args)),
        Command::Crdgen => {
            for crd in cloudlb::crd::all() {
                print!("---\n{}", serde_yaml_ng::to_string(&crd)?);
            }
            Ok(())
        }
    }
}
