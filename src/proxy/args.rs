//! Command-line settings of `cloudlb node-proxy` and their parsing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Command-line settings of `cloudlb node-proxy`.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeProxyArgs {
    /// This node's name: endpoints on it are "local" (externalTrafficPolicy Local). Set it from
    /// the downward API (`spec.nodeName`) in a DaemonSet. Required unless `--static` is given.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Address node ports and health-check node ports are bound on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_address: IpAddr,

    /// Address of `/healthz` and `/readyz` (kubelet probes, the NLB's health check with the
    /// controller's `--node-proxy-health-port`): all addresses, as kube-proxy's healthz server.
    /// Not kube-proxy's 10256, so both can run on one node.
    #[arg(long, default_value = "0.0.0.0:10266")]
    pub health_addr: SocketAddr,

    /// Address of `/metrics` (and `/healthz`, `/readyz`): loopback by default, as kube-proxy's
    /// metrics server, since the host network is reachable by every client of the node. The
    /// same address as `--health-addr` serves all three on one listener.
    #[arg(long, default_value = "127.0.0.1:10267")]
    pub metrics_addr: SocketAddr,

    /// Serve the Services labelled `service.kubernetes.io/service-proxy-name=NAME` (which
    /// kube-proxy skips), whatever their type or class.
    #[arg(long, default_value = "cloudlb", value_name = "NAME")]
    pub service_proxy_name: String,

    /// Also serve Services without a `service.kubernetes.io/service-proxy-name` label (clusters
    /// with no kube-proxy): LoadBalancer Services of `--load-balancer-class` (and NodePort ones
    /// with `--nodeport-services`).
    #[arg(long)]
    pub serve_unlabelled: bool,

    /// With `--serve-unlabelled`: the `spec.loadBalancerClass` whose unlabelled Services are
    /// served (the controller's `--load-balancer-class`).
    #[arg(long, default_value = "cloudlb.io/nlb")]
    pub load_balancer_class: String,

    /// With `--serve-unlabelled`: also serve unlabelled LoadBalancer Services without a class
    /// (as the controller's `--default-class`).
    #[arg(long)]
    pub default_class: bool,

    /// With `--serve-unlabelled`: also serve unlabelled Services of type NodePort.
    #[arg(long)]
    pub nodeport_services: bool,

    /// The ClusterIP leg of the Services served: their clusterIPs and externalIPs, from this
    /// node and its pods, are redirected to the proxy by an nftables table of its own in the
    /// node's network namespace (needs the `nft` program and CAP_NET_ADMIN there).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub cluster_ips: bool,

    /// Name of that nftables table (`ip NAME`): one per proxy on a node; replaced whole at
    /// start, removed at clean shutdown.
    #[arg(long, default_value = "cloudlb", value_name = "NAME")]
    pub nft_table: String,

    /// The `nft` program (Debian's nftables).
    #[arg(long, default_value = "nft", value_name = "PATH")]
    pub nft: String,

    /// Standalone mode, no cluster: serve PROTOCOL:NODE_PORT=BACKEND[,BACKEND...] (repeatable),
    /// e.g. `--static tcp:30021=127.0.0.1:5201`.
    #[arg(long = "static", value_name = "SPEC")]
    pub static_ports: Vec<String>,

    /// Runtime worker threads; 1 runs everything on one thread, 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,

    /// On SIGTERM, how long health checks fail before the proxy stops accepting, so load
    /// balancers notice (AWS NLB: 2 checks × 10 s with the AWS Load Balancer Controller's
    /// externalTrafficPolicy Local defaults).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub shutdown_health_delay: Duration,

    /// When a Service port moves to a new nodePort, how long the old one keeps accepting (and
    /// sending to the port's current endpoints): its load balancer sends there until the
    /// listener moves to the new target group, which cloudlb does once that group's targets
    /// pass their health checks (at most 300 s). `0s` closes it at once, as kube-proxy does.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub node_port_linger: Duration,

    /// After accepting stops, how long open connections and UDP flows may take to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Timeout of a TCP connect to a backend (the next endpoint is tried after it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// A UDP flow ends after this long without a datagram either way (the kernel's
    /// conntrack default for UDP is 30 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,

    /// Live UDP flows over all node ports; a new flow past it replaces the idlest flow of its
    /// node port (or is dropped when that port has none).
    #[arg(long, default_value_t = 16_384)]
    pub udp_max_flows: usize,

    /// Live UDP flows of one client IP on one node port; a new one past it replaces that
    /// client's idlest flow. 0 = no limit.
    #[arg(long, default_value_t = 1_024)]
    pub udp_max_flows_per_source: usize,

    /// Open TCP connections over all node ports; connections past it are reset at accept.
    #[arg(long, default_value_t = 32_768)]
    pub tcp_max_connections: usize,

    /// Open TCP connections of one client IP over all node ports; past it they are reset at
    /// accept. 0 = no limit (clients behind one NAT share an IP).
    #[arg(long, default_value_t = 0)]
    pub tcp_max_connections_per_source: usize,

    /// A TCP connection with no byte either way for this long is closed (above the NLB's
    /// largest configurable TCP idle timeout, 6000 s). 0 = never.
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// Clients remembered per node port for `sessionAffinity: ClientIP`; past it the least
    /// recently seen are forgotten.
    #[arg(long, default_value_t = 65_536)]
    pub affinity_max_clients: usize,

    /// HTTP servers (health-check node ports, `--health-addr`, `--metrics-addr`): a request's
    /// headers must arrive within this long of the connection opening, else it is closed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Open connections per HTTP server; a new one past it closes that server's oldest.
    #[arg(long, default_value_t = 128)]
    pub http_max_connections: usize,
}

/// Parses `250ms`, `20s`, `2m`, `1h` or a bare `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then ms, s, m or h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("0", Some(Duration::ZERO)),
            ("250ms", Some(Duration::from_millis(250))),
            ("20s", Some(Duration::from_secs(20))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            ("20", None),
            ("s", None),
            ("5d", None),
            ("-1s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s).ok(), want, "{s}");
        }
    }
}
