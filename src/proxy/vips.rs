//! PURE: the ClusterIP leg of the Services the proxy takes (kube-proxy skips them): for each
//! Service port, the virtual addresses (`clusterIPs`, `externalIPs`) and the frontend their
//! connections reach, with the same endpoint rules as the NodePort path. clusterIPs follow
//! `internalTrafficPolicy`; externalIPs are external traffic and follow
//! `externalTrafficPolicy`, as in kube-proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

use super::table::{Candidate, Frontend, Protocol, ServicePortName, targets};

/// Which virtual addresses a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// `spec.clusterIPs` (internalTrafficPolicy).
    ClusterIp,
    /// `spec.externalIPs` (externalTrafficPolicy).
    ExternalIp,
}

impl Leg {
    /// Name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::ClusterIp => "cluster-ip",
            Leg::ExternalIp => "external-ip",
        }
    }
}

/// One ClusterIP-leg frontend: a Service port, its protocol and leg.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The Service port.
    pub service: ServicePortName,
    /// ClusterIPs or externalIPs.
    pub leg: Leg,
}

/// The virtual addresses of one frontend and where their connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipFrontend {
    /// Every `address:port` redirected to this frontend, sorted.
    pub vips: Vec<SocketAddr>,
    /// Targets and rules, as for a node port.
    pub frontend: Arc<Frontend>,
}

/// A Service's virtual addresses and traffic policies.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    internal_local: bool,
    external_local: bool,
}

impl Policies {
    /// Reads them from the spec; a headless Service (`clusterIP: None`) has no clusterIPs.
    pub fn of(spec: &ServiceSpec) -> Policies {
        let parse = |ips: &[String]| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips.iter().filter_map(|s| s.trim().parse().ok()).collect();
            v.sort();
            v.dedup();
            v
        };
        let cluster = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => parse(ips),
            _ => parse(spec.cluster_ip.as_slice()),
        };
        Policies {
            cluster_ips: cluster,
            external_ips: parse(spec.external_ips.as_deref().unwrap_or_default()),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        }
    }
}

/// Adds the frontends of one Service port (`template` carries its names and rules; the
/// targets are chosen here per leg).
pub fn insert(
    vips: &mut BTreeMap<VipKey, VipFrontend>,
    policies: &Policies,
    port: &ServicePort,
    protocol: Protocol,
    template: Frontend,
    candidates: &[Candidate],
) {
    let Ok(number) = u16::try_from(port.port) else {
        return;
    };
    let legs = [
        (Leg::ClusterIp, &policies.cluster_ips, policies.internal_local),
        (
            Leg::ExternalIp,
            &policies.external_ips,
            policies.external_local,
        ),
    ];
    for (leg, ips, local_only) in legs {
        if ips.is_empty() || number == 0 {
            continue;
        }
        let frontend = Frontend {
            targets: targets(candidates, local_only),
            ..template.clone()
        };
        vips.insert(
            VipKey {
                protocol,
                service: template.service.clone(),
                leg,
            },
            VipFrontend {
                vips: ips.iter().map(|ip| SocketAddr::new(*ip, number)).collect(),
                frontend: Arc::new(frontend),
            },
        );
    }
}
