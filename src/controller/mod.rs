//! The Service controller: Services of type LoadBalancer → NLBs, targets, status and Events.

/// Command-line settings of `cloudlb controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(_args: ControllerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
