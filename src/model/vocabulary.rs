//! The domain's words: scheme, target type, address type, protocols. Annotations parse into
//! these, the AWS edge converts observed values into them, and the plan compares them.
//!
//! Each type knows its ELBv2 spelling (`as_aws`, `from_aws`): that spelling is also part of
//! the deterministic resource names, so it is fixed here once.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Load balancer or target group attributes (`key` → `value`, ELBv2's keys).
pub type Attributes = BTreeMap<String, String>;

/// Whether the load balancer is reachable from the internet. Immutable in AWS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheme {
    #[default]
    Internal,
    InternetFacing,
}

impl Scheme {
    /// ELBv2's spelling.
    pub fn as_aws(self) -> &'static str {
        match self {
            Scheme::Internal => "internal",
            Scheme::InternetFacing => "internet-facing",
        }
    }

    /// From ELBv2's spelling; `None` for anything else.
    pub fn from_aws(s: &str) -> Option<Scheme> {
        match s {
            "internal" => Some(Scheme::Internal),
            "internet-facing" => Some(Scheme::InternetFacing),
            _ => None,
        }
    }
}

/// How targets are addressed in the target group.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    /// Node instance ids on the Service's NodePort (the node proxy forwards to pods).
    #[default]
    Instance,
    /// Pod IPs on the target port, bypassing the node proxy.
    Ip,
}

impl TargetType {
    /// ELBv2's spelling.
    pub fn as_aws(self) -> &'static str {
        match self {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        }
    }

    /// From ELBv2's spelling; `None` for the types cloudlb never registers (`lambda`, `alb`).
    pub fn from_aws(s: &str) -> Option<TargetType> {
        match s {
            "instance" => Some(TargetType::Instance),
            "ip" => Some(TargetType::Ip),
            _ => None,
        }
    }
}

/// The load balancer's address families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpAddressType {
    #[default]
    Ipv4,
    Dualstack,
}

impl IpAddressType {
    /// ELBv2's spelling.
    pub fn as_aws(self) -> &'static str {
        match self {
            IpAddressType::Ipv4 => "ipv4",
            IpAddressType::Dualstack => "dualstack",
        }
    }

    /// From ELBv2's spelling; `None` for anything else (e.g. `dualstack-without-public-ipv4`).
    pub fn from_aws(s: &str) -> Option<IpAddressType> {
        match s {
            "ipv4" => Some(IpAddressType::Ipv4),
            "dualstack" => Some(IpAddressType::Dualstack),
            _ => None,
        }
    }
}

/// Listener and target-group protocols an NLB offers for Service ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
    Tls,
}

impl Protocol {
    /// ELBv2's spelling.
    pub fn as_aws(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::TcpUdp => "TCP_UDP",
            Protocol::Tls => "TLS",
        }
    }

    /// From ELBv2's spelling; `None` for protocols an NLB of ours never uses (HTTP, …).
    pub fn from_aws(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "TCP_UDP" => Protocol::TcpUdp,
            "TLS" => Protocol::Tls,
            _ => return None,
        })
    }

    /// The IP protocols a listener of this protocol receives (for security group rules).
    pub fn ip_protocols(self) -> &'static [&'static str] {
        match self {
            Protocol::Tcp | Protocol::Tls => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::TcpUdp => &["tcp", "udp"],
        }
    }
}

/// How a target group checks its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthCheckProtocol {
    Tcp,
    Http,
    Https,
}

impl HealthCheckProtocol {
    /// ELBv2's spelling.
    pub fn as_aws(self) -> &'static str {
        match self {
            HealthCheckProtocol::Tcp => "TCP",
            HealthCheckProtocol::Http => "HTTP",
            HealthCheckProtocol::Https => "HTTPS",
        }
    }

    /// From ELBv2's spelling; anything else reads as TCP (the only other NLB check).
    pub fn from_aws(s: &str) -> HealthCheckProtocol {
        match s {
            "HTTP" => HealthCheckProtocol::Http,
            "HTTPS" => HealthCheckProtocol::Https,
            _ => HealthCheckProtocol::Tcp,
        }
    }

    /// Whether the check is an HTTP(S) request (then path and success codes apply).
    pub fn is_http(self) -> bool {
        self != HealthCheckProtocol::Tcp
    }
}

/// Where a health check connects: the traffic port, a fixed port, or a Service port by name
/// (resolved by the model: its nodePort for instance targets, its numeric targetPort for ip).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheckPort {
    TrafficPort,
    Port(u16),
    Name(String),
}

/// A Service port named by number or by name (for `ssl-ports`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_spellings_round_trip() {
        for s in [Scheme::Internal, Scheme::InternetFacing] {
            assert_eq!(Scheme::from_aws(s.as_aws()), Some(s));
        }
        for t in [TargetType::Instance, TargetType::Ip] {
            assert_eq!(TargetType::from_aws(t.as_aws()), Some(t));
        }
        for i in [IpAddressType::Ipv4, IpAddressType::Dualstack] {
            assert_eq!(IpAddressType::from_aws(i.as_aws()), Some(i));
        }
        for p in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::TcpUdp,
            Protocol::Tls,
        ] {
            assert_eq!(Protocol::from_aws(p.as_aws()), Some(p));
        }
        for h in [
            HealthCheckProtocol::Tcp,
            HealthCheckProtocol::Http,
            HealthCheckProtocol::Https,
        ] {
            assert_eq!(HealthCheckProtocol::from_aws(h.as_aws()), h);
        }
        assert_eq!(TargetType::from_aws("lambda"), None);
        assert_eq!(
            IpAddressType::from_aws("dualstack-without-public-ipv4"),
            None
        );
    }
}
