//! The command line of `cloudlb controller` and `cloudlb plan`: which cluster and which
//! Services are ours, and the controller's own settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{policy, readiness, webhook};
use crate::cloud::aws::Ownership;

/// Settings shared by `controller` and `plan`: which cluster and which Services are ours.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Name of this cluster; tagged on every AWS resource, which is how ownership is decided.
    #[arg(long, env = "CLOUDLB_CLUSTER_NAME")]
    pub cluster_name: String,
    /// spec.loadBalancerClass this controller serves.
    #[arg(
        long,
        env = "CLOUDLB_LOAD_BALANCER_CLASS",
        default_value = "cloudlb.io/nlb"
    )]
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services without a loadBalancerClass (this controller is the
    /// cluster's default load balancer implementation).
    #[arg(long, env = "CLOUDLB_DEFAULT_CLASS")]
    pub default_class: bool,
    /// With `--default-class`: serve every class-less LoadBalancer Service, for clusters with no
    /// cloud-controller-manager service controller. Without it only class-less Services
    /// annotated `aws-load-balancer-type: external` or `nlb-ip` are served — the ones the
    /// cloud provider leaves alone (LBC's rule), so two controllers never serve one Service.
    #[arg(long, env = "CLOUDLB_DEFAULT_CLASS_ALL", requires = "default_class")]
    pub default_class_all: bool,
    /// AWS region (else the standard AWS config chain: AWS_REGION, profile, IMDS).
    #[arg(long, env = "CLOUDLB_REGION")]
    pub region: Option<String>,
    /// Keep NotReady nodes registered and leave failing nodes to the health checks, as the
    /// Kubernetes service controller does since 1.30. Default: NotReady nodes are deregistered.
    #[arg(long, env = "CLOUDLB_KEEP_NOT_READY_NODES")]
    pub keep_not_ready_nodes: bool,
    /// When more than this percentage of a Service's nodes is NotReady at once, none of them is
    /// deregistered (a Warning and `cloudlb_not_ready_targets_withheld_total` say so): a
    /// cluster-wide NotReady blip must not empty every target group. Deleted nodes always go.
    /// 100 turns the guard off.
    #[arg(long, env = "CLOUDLB_NOT_READY_GUARD_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub not_ready_guard_percent: u8,
    /// cloudlb's node proxy serves the NodePorts and its admin server listens on this port:
    /// externalTrafficPolicy Cluster target groups then health-check `HTTP /readyz` there,
    /// which fails as soon as the proxy starts draining (instead of TCP on the traffic port).
    #[arg(long, env = "CLOUDLB_NODE_PROXY_HEALTH_PORT")]
    pub node_proxy_health_port: Option<u16>,
    /// Only nodes with all of these labels (`key=value,…`) are ever targets, for every Service
    /// (the target-node-labels annotation narrows it further per Service).
    #[arg(long, env = "CLOUDLB_NODE_SELECTOR", value_parser = parse_labels, default_value = "")]
    pub node_selector: BTreeMap<String, String>,
    /// What tenants' annotations may ask for (see [`policy`]).
    #[command(flatten)]
    pub policy: policy::PolicyArgs,
}

impl ClusterArgs {
    /// Who this installation is in the account: cluster and class tags decide ownership.
    pub fn ownership(&self) -> Ownership {
        Ownership {
            cluster: self.cluster_name.clone(),
            class: self.load_balancer_class.clone(),
        }
    }

    /// The model's view of these settings.
    pub fn context(&self) -> crate::model::ClusterContext {
        crate::model::ClusterContext {
            cluster_name: self.cluster_name.clone(),
            load_balancer_class: self.load_balancer_class.clone(),
            node_proxy_health_port: self.node_proxy_health_port,
        }
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{p:?} is not key=value")),
        })
        .collect()
}

/// Command-line settings of `cloudlb controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "CLOUDLB_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Services reconciled at once.
    #[arg(long, env = "CLOUDLB_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Seconds between full drift checks of a Service against AWS when nothing changed.
    #[arg(long, env = "CLOUDLB_RESYNC_SECONDS", default_value_t = 600)]
    pub resync_seconds: u64,
    /// Take a coordination.k8s.io Lease and reconcile only while holding it.
    #[arg(long, env = "CLOUDLB_LEADER_ELECT")]
    pub leader_elect: bool,
    #[arg(long, env = "CLOUDLB_LEASE_NAME", default_value = "cloudlb-controller")]
    pub lease_name: String,
    /// Namespace of the lease (default: the POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the lease (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "CLOUDLB_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Client-side AWS rate limit (calls per second) for everything but target registration.
    #[arg(long, env = "CLOUDLB_AWS_QPS", default_value_t = 10.0)]
    pub aws_qps: f64,
    #[arg(long, env = "CLOUDLB_AWS_BURST", default_value_t = 40)]
    pub aws_burst: u32,
    /// Client-side AWS rate limit for RegisterTargets / DeregisterTargets.
    #[arg(long, env = "CLOUDLB_AWS_TARGETS_QPS", default_value_t = 4.0)]
    pub aws_targets_qps: f64,
    #[arg(long, env = "CLOUDLB_AWS_TARGETS_BURST", default_value_t = 20)]
    pub aws_targets_burst: u32,
    /// Only TargetGroupBindings with all of these labels (`key=value,…`) are served (default:
    /// every binding), so that more than one controller can share a cluster.
    #[arg(
        long,
        env = "CLOUDLB_TARGET_GROUP_BINDING_SELECTOR",
        value_parser = parse_labels,
        default_value = ""
    )]
    pub target_group_binding_selector: BTreeMap<String, String>,
    /// Delete resources tagged for this cluster and class whose Service no longer exists.
    #[arg(long, env = "CLOUDLB_ORPHAN_SWEEP")]
    pub orphan_sweep: bool,
    /// How often the orphan sweep lists the account.
    #[arg(
        long,
        env = "CLOUDLB_ORPHAN_SWEEP_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub orphan_sweep_interval_seconds: u64,
    /// How long an orphan must stay orphaned before it is deleted.
    #[arg(long, env = "CLOUDLB_ORPHAN_GRACE_SECONDS", default_value_t = 600)]
    pub orphan_grace_seconds: u64,
    /// Pod readiness gates (see [`readiness`]).
    #[command(flatten)]
    pub readiness: readiness::ReadinessArgs,
    /// The readiness-gate injection webhook (see [`webhook`]).
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
}

/// `{a: 1, b: 2}` → `a=1,b=2`, a Kubernetes label selector.
pub(super) fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_flags_parse_and_become_selectors() {
        let cases = [
            ("", Ok("")),
            ("a=1", Ok("a=1")),
            (" b=2 , a=1,", Ok("a=1,b=2")),
            ("a=", Ok("a=")),
            ("a", Err(())),
            ("=1", Err(())),
        ];
        for (flag, want) in cases {
            let got = parse_labels(flag)
                .map(|l| label_selector(&l))
                .map_err(|_| ());
            assert_eq!(got.as_deref().map_err(|_| ()), want, "{flag:?}");
        }
    }
}
