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

    /// Address of the admin server (/metrics, /healthz, /readyz). Not kube-proxy's 10256, so
    /// both can run on one node.
    #[arg(long, default_value = "0.0.0.0:10266")]
    pub metrics_addr: SocketAddr,

    /// Also serve Services of type NodePort (LoadBalancer Services are always served).
    #[arg(long)]
    pub nodeport_services: bool,

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
