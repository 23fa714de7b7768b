//! The node proxy: forwards NodePort traffic on this node to ready pod endpoints.

/// Command-line settings of `cloudlb node-proxy`.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeProxyArgs {}

/// Runs the node proxy until SIGTERM/SIGINT.
pub async fn run(_args: NodeProxyArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
