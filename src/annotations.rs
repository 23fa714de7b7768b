//! Service annotations → validated [`LoadBalancerOptions`], or every problem found at once.
//!
//! Names follow the AWS Load Balancer Controller (`service.beta.kubernetes.io/aws-load-balancer-*`)
//! so Services move over unchanged. Parsing is pure: the controller turns errors into a Warning
//! Event and a status condition and makes no cloud change for that Service.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{
    Attributes, HealthCheckOverrides, HealthCheckPort, HealthCheckProtocol, IpAddressType, PortRef,
    Scheme, TargetType,
};

const PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// Every annotation cloudlb reads, with a one-line meaning. The README's annotation table is
/// checked against this list by a test, so the manual and the parser cannot drift apart.
pub const SUPPORTED: &[(&str, &str)] = &[
    (
        "type",
        "`external` or `nlb` (accepted for compatibility; `nlb-ip` means ip targets)",
    ),
    ("scheme", "`internal` (default) or `internet-facing`"),
    (
        "nlb-target-type",
        "`instance` (default: nodes at the nodePort) or `ip` (pod IPs at the targetPort)",
    ),
    (
        "subnets",
        "comma-separated subnet IDs or Name tags; default: discovered by tags",
    ),
    (
        "name",
        "the load balancer's name (≤ 32 characters: letters, digits, hyphens)",
    ),
    ("ip-address-type", "`ipv4` (default) or `dualstack`"),
    ("healthcheck-protocol", "`TCP`, `HTTP` or `HTTPS`"),
    ("healthcheck-port", "`traffic-port` or a port number"),
    (
        "healthcheck-path",
        "HTTP(S) health-check path, starting with `/`",
    ),
    ("healthcheck-interval", "seconds between checks, 5–300"),
    ("healthcheck-timeout", "seconds, 2–120"),
    (
        "healthcheck-healthy-threshold",
        "consecutive successes, 2–10",
    ),
    (
        "healthcheck-unhealthy-threshold",
        "consecutive failures, 2–10",
    ),
    (
        "healthcheck-success-codes",
        "HTTP codes, e.g. `200` or `200-399`",
    ),
    (
        "proxy-protocol",
        "`*` turns proxy protocol v2 on for every target group",
    ),
    (
        "target-group-attributes",
        "`key=value,…` target group attributes",
    ),
    (
        "load-balancer-attributes",
        "`key=value,…` load balancer attributes",
    ),
    (
        "additional-resource-tags",
        "`key=value,…` extra tags on every resource",
    ),
    (
        "target-node-labels",
        "`key=value,…` only nodes with these labels become targets",
    ),
    (
        "ssl-cert",
        "ACM certificate ARN(s), comma-separated: TLS listeners",
    ),
    (
        "ssl-ports",
        "ports (numbers or names) that get TLS listeners; default all when ssl-cert is set",
    ),
    (
        "security-groups",
        "comma-separated security group IDs to attach instead of a managed one",
    ),
];

/// The full annotation key for a short name from [`SUPPORTED`].
pub fn key(short: &str) -> String {
    format!("{PREFIX}{short}")
}

/// One problem with one annotation; shown verbatim in the Warning Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationError {
    pub annotation: String,
    pub reason: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "annotation {}: {}", self.annotation, self.reason)
    }
}

/// Everything the annotations say, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancerOptions {
    pub scheme: Scheme,
    pub target_type: TargetType,
    pub subnets: Option<Vec<String>>,
    pub name: Option<String>,
    pub ip_address_type: IpAddressType,
    pub health_check: HealthCheckOverrides,
    pub proxy_protocol: bool,
    pub target_group_attributes: Attributes,
    pub load_balancer_attributes: Attributes,
    pub additional_tags: BTreeMap<String, String>,
    pub target_node_labels: BTreeMap<String, String>,
    pub ssl_certificates: Vec<String>,
    pub ssl_ports: Option<Vec<PortRef>>,
    pub security_groups: Option<Vec<String>>,
}

/// Parses every supported annotation; returns all errors, not just the first.
pub fn parse(
    annotations: &BTreeMap<String, String>,
) -> Result<LoadBalancerOptions, Vec<AnnotationError>> {
    let mut p = Parser {
        annotations,
        errors: Vec::new(),
    };
    let mut opts = LoadBalancerOptions::default();

    if let Some(v) = p.get("type") {
        match v {
            "external" | "nlb" => {}
            "nlb-ip" => opts.target_type = TargetType::Ip,
            _ => p.error(
                "type",
                format!("unknown value {v:?}; expected external, nlb or nlb-ip"),
            ),
        }
    }
    if let Some(v) = p.get("scheme") {
        match v {
            "internal" => opts.scheme = Scheme::Internal,
            "internet-facing" => opts.scheme = Scheme::InternetFacing,
            _ => p.error(
                "scheme",
                format!("unknown value {v:?}; expected internal or internet-facing"),
            ),
        }
    }
    if let Some(v) = p.get("nlb-target-type") {
        match v {
            "instance" => opts.target_type = TargetType::Instance,
            "ip" => opts.target_type = TargetType::Ip,
            _ => p.error(
                "nlb-target-type",
                format!("unknown value {v:?}; expected instance or ip"),
            ),
        }
    }
    opts.subnets = p.list("subnets");
    if let Some(v) = p.get("name") {
        if valid_lb_name(v) {
            opts.name = Some(v.to_string());
        } else {
            p.error(
                "name",
                format!("{v:?} is not a valid load balancer name: 1-32 letters, digits or hyphens, not starting or ending with a hyphen"),
            );
        }
    }
    if let Some(v) = p.get("ip-address-type") {
        match v {
            "ipv4" => opts.ip_address_type = IpAddressType::Ipv4,
            "dualstack" => opts.ip_address_type = IpAddressType::Dualstack,
            _ => p.error(
                "ip-address-type",
                format!("unknown value {v:?}; expected ipv4 or dualstack"),
            ),
        }
    }
    opts.health_check = p.health_check();
    if let Some(v) = p.get("proxy-protocol") {
        if v == "*" {
            opts.proxy_protocol = true;
        } else {
            p.error(
                "proxy-protocol",
                format!("unknown value {v:?}; the only supported value is \"*\""),
            );
        }
    }
    opts.target_group_attributes = p.map("target-group-attributes");
    opts.load_balancer_attributes = p.map("load-balancer-attributes");
    opts.additional_tags = p.map("additional-resource-tags");
    for k in opts.additional_tags.keys() {
        if k.starts_with("aws:") || k.starts_with("cloudlb.io/") {
            p.error(
                "additional-resource-tags",
                format!("tag key {k:?} is reserved"),
            );
        }
    }
    opts.target_node_labels = p.map("target-node-labels");
    opts.ssl_certificates = p.list("ssl-cert").unwrap_or_default();
    if let Some(ports) = p.list("ssl-ports") {
        opts.ssl_ports = Some(
            ports
                .into_iter()
                .map(|s| match s.parse::<i32>() {
                    Ok(n) => PortRef::Number(n),
                    Err(_) => PortRef::Name(s),
                })
                .collect(),
        );
        if opts.ssl_certificates.is_empty() {
            p.error(
                "ssl-ports",
                "is set but ssl-cert is not: TLS listeners need a certificate".into(),
            );
        }
    }
    opts.security_groups = p.list("security-groups");

    if p.errors.is_empty() {
        Ok(opts)
    } else {
        Err(p.errors)
    }
}

fn valid_lb_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-')
        && !v.starts_with("internal-")
}

struct Parser<'a> {
    annotations: &'a BTreeMap<String, String>,
    errors: Vec<AnnotationError>,
}

impl<'a> Parser<'a> {
    fn get(&self, short: &str) -> Option<&'a str> {
        self.annotations.get(&key(short)).map(|s| s.trim())
    }

    fn error(&mut self, short: &str, reason: String) {
        self.errors.push(AnnotationError {
            annotation: key(short),
            reason,
        });
    }

    /// A comma-separated list; empty items are an error.
    fn list(&mut self, short: &str) -> Option<Vec<String>> {
        let v = self.get(short)?;
        let items: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
        if items.iter().any(String::is_empty) {
            self.error(short, format!("{v:?} has an empty item"));
            return None;
        }
        Some(items)
    }

    /// `key=value,key=value`; a pair without `=` or with an empty key is an error.
    fn map(&mut self, short: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(v) = self.get(short) else { return out };
        for pair in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match pair.split_once('=') {
                Some((k, val)) if !k.trim().is_empty() => {
                    out.insert(k.trim().to_string(), val.trim().to_string());
                }
                _ => self.error(short, format!("{pair:?} is not key=value")),
            }
        }
        out
    }

    fn int_in(&mut self, short: &str, min: i32, max: i32) -> Option<i32> {
        let v = self.get(short)?;
        match v.parse::<i32>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(
                    short,
                    format!("{v:?} is not a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    fn health_check(&mut self) -> HealthCheckOverrides {
        let mut hc = HealthCheckOverrides::default();
        if let Some(v) = self.get("healthcheck-protocol") {
            hc.protocol = match v.to_ascii_uppercase().as_str() {
                "TCP" => Some(HealthCheckProtocol::Tcp),
                "HTTP" => Some(HealthCheckProtocol::Http),
                "HTTPS" => Some(HealthCheckProtocol::Https),
                _ => {
                    self.error(
                        "healthcheck-protocol",
                        format!("unknown value {v:?}; expected TCP, HTTP or HTTPS"),
                    );
                    None
                }
            };
        }
        if let Some(v) = self.get("healthcheck-port") {
            hc.port = if v == "traffic-port" {
                Some(HealthCheckPort::TrafficPort)
            } else {
                match v.parse::<u16>() {
                    Ok(n) if n > 0 => Some(HealthCheckPort::Port(n)),
                    _ => {
                        self.error(
                            "healthcheck-port",
                            format!("{v:?} is neither traffic-port nor a port number"),
                        );
                        None
                    }
                }
            };
        }
        if let Some(v) = self.get("healthcheck-path") {
            if v.starts_with('/') && v.len() <= 1024 {
                hc.path = Some(v.to_string());
            } else {
                self.error(
                    "healthcheck-path",
                    format!("{v:?} must start with / (at most 1024 characters)"),
                );
            }
        }
        hc.interval_seconds = self.int_in("healthcheck-interval", 5, 300);
        hc.timeout_seconds = self.int_in("healthcheck-timeout", 2, 120);
        hc.healthy_threshold = self.int_in("healthcheck-healthy-threshold", 2, 10);
        hc.unhealthy_threshold = self.int_in("healthcheck-unhealthy-threshold", 2, 10);
        if let Some(v) = self.get("healthcheck-success-codes") {
            if valid_success_codes(v) {
                hc.success_codes = Some(v.to_string());
            } else {
                self.error(
                    "healthcheck-success-codes",
                    format!("{v:?} is not like 200, 200,202 or 200-399"),
                );
            }
        }
        if hc.path.is_some() && hc.protocol == Some(HealthCheckProtocol::Tcp) {
            self.error(
                "healthcheck-path",
                "is set but healthcheck-protocol is TCP".into(),
            );
        }
        hc
    }
}

fn valid_success_codes(v: &str) -> bool {
    let code = |s: &str| s.parse::<u16>().is_ok_and(|n| (200..=599).contains(&n));
    v.split(',').all(|part| match part.split_once('-') {
        Some((a, b)) => code(a) && code(b) && a.parse::<u16>().ok() <= b.parse::<u16>().ok(),
        None => code(part),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (key(k), v.to_string())).collect()
    }

    #[test]
    fn no_annotations_give_the_defaults() {
        let opts = parse(&BTreeMap::new()).unwrap();
        assert_eq!(opts, LoadBalancerOptions::default());
        assert_eq!(opts.scheme, Scheme::Internal);
        assert_eq!(opts.target_type, TargetType::Instance);
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table of (annotations, predicate) reads best inline
    fn valid_values_parse() {
        let cases: Vec<(&[(&str, &str)], Box<dyn Fn(&LoadBalancerOptions) -> bool>)> = vec![
            (
                &[("scheme", "internet-facing")],
                Box::new(|o| o.scheme == Scheme::InternetFacing),
            ),
            (
                &[("nlb-target-type", "ip")],
                Box::new(|o| o.target_type == TargetType::Ip),
            ),
            (
                &[("type", "nlb-ip")],
                Box::new(|o| o.target_type == TargetType::Ip),
            ),
            (
                &[("subnets", "subnet-1, subnet-2")],
                Box::new(|o| o.subnets == Some(vec!["subnet-1".into(), "subnet-2".into()])),
            ),
            (
                &[("name", "my-lb-1")],
                Box::new(|o| o.name.as_deref() == Some("my-lb-1")),
            ),
            (
                &[("ip-address-type", "dualstack")],
                Box::new(|o| o.ip_address_type == IpAddressType::Dualstack),
            ),
            (
                &[("healthcheck-protocol", "http")],
                Box::new(|o| o.health_check.protocol == Some(HealthCheckProtocol::Http)),
            ),
            (
                &[("healthcheck-port", "traffic-port")],
                Box::new(|o| o.health_check.port == Some(HealthCheckPort::TrafficPort)),
            ),
            (
                &[("healthcheck-port", "8081")],
                Box::new(|o| o.health_check.port == Some(HealthCheckPort::Port(8081))),
            ),
            (
                &[("healthcheck-path", "/ready")],
                Box::new(|o| o.health_check.path.as_deref() == Some("/ready")),
            ),
            (
                &[("healthcheck-interval", "30")],
                Box::new(|o| o.health_check.interval_seconds == Some(30)),
            ),
            (
                &[("healthcheck-timeout", "6")],
                Box::new(|o| o.health_check.timeout_seconds == Some(6)),
            ),
            (
                &[("healthcheck-healthy-threshold", "2")],
                Box::new(|o| o.health_check.healthy_threshold == Some(2)),
            ),
            (
                &[("healthcheck-unhealthy-threshold", "10")],
                Box::new(|o| o.health_check.unhealthy_threshold == Some(10)),
            ),
            (
                &[("healthcheck-success-codes", "200-399")],
                Box::new(|o| o.health_check.success_codes.as_deref() == Some("200-399")),
            ),
            (&[("proxy-protocol", "*")], Box::new(|o| o.proxy_protocol)),
            (
                &[(
                    "target-group-attributes",
                    "deregistration_delay.timeout_seconds=30, preserve_client_ip.enabled=true",
                )],
                Box::new(|o| {
                    o.target_group_attributes.len() == 2
                        && o.target_group_attributes["deregistration_delay.timeout_seconds"] == "30"
                }),
            ),
            (
                &[(
                    "load-balancer-attributes",
                    "load_balancing.cross_zone.enabled=true",
                )],
                Box::new(|o| o.load_balancer_attributes.len() == 1),
            ),
            (
                &[("additional-resource-tags", "team=web,env=prod")],
                Box::new(|o| o.additional_tags["env"] == "prod"),
            ),
            (
                &[("target-node-labels", "pool=edge")],
                Box::new(|o| o.target_node_labels["pool"] == "edge"),
            ),
            (
                &[
                    ("ssl-cert", "arn:aws:acm:us-east-1:1:certificate/x"),
                    ("ssl-ports", "443,https"),
                ],
                Box::new(|o| {
                    o.ssl_ports == Some(vec![PortRef::Number(443), PortRef::Name("https".into())])
                        && o.ssl_certificates.len() == 1
                }),
            ),
            (
                &[("security-groups", "sg-1,sg-2")],
                Box::new(|o| o.security_groups.as_ref().map(Vec::len) == Some(2)),
            ),
        ];
        for (input, check) in cases {
            let opts = parse(&ann(input)).unwrap_or_else(|e| panic!("{input:?}: {e:?}"));
            assert!(check(&opts), "{input:?} parsed to {opts:?}");
        }
    }

    #[test]
    fn bad_values_name_the_annotation_and_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("scheme", "public", "unknown value"),
            ("nlb-target-type", "pod", "unknown value"),
            ("type", "classic", "unknown value"),
            ("name", "-bad", "not a valid load balancer name"),
            (
                "name",
                "a-name-that-is-far-too-long-for-aws-limits",
                "not a valid load balancer name",
            ),
            ("ip-address-type", "ipv6", "unknown value"),
            ("healthcheck-protocol", "UDP", "unknown value"),
            ("healthcheck-port", "http", "neither traffic-port"),
            ("healthcheck-path", "healthz", "must start with /"),
            ("healthcheck-interval", "1", "from 5 to 300"),
            ("healthcheck-timeout", "x", "from 2 to 120"),
            ("healthcheck-healthy-threshold", "11", "from 2 to 10"),
            ("healthcheck-unhealthy-threshold", "1", "from 2 to 10"),
            ("healthcheck-success-codes", "ok", "is not like"),
            ("proxy-protocol", "true", "only supported value"),
            ("target-group-attributes", "novalue", "is not key=value"),
            ("load-balancer-attributes", "=x", "is not key=value"),
            ("additional-resource-tags", "aws:x=1", "reserved"),
            ("subnets", "a,,b", "empty item"),
            ("ssl-ports", "443", "ssl-cert is not"),
        ];
        for (short, value, reason) in cases {
            let errs =
                parse(&ann(&[(short, value)])).expect_err(&format!("{short}={value} must fail"));
            assert_eq!(errs.len(), 1, "{short}={value}: {errs:?}");
            assert_eq!(errs[0].annotation, key(short));
            assert!(
                errs[0].reason.contains(reason),
                "{short}={value}: {}",
                errs[0].reason
            );
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let errs = parse(&ann(&[
            ("scheme", "x"),
            ("healthcheck-interval", "0"),
            ("name", "_"),
        ]))
        .unwrap_err();
        assert_eq!(errs.len(), 3);
    }

    #[test]
    fn supported_list_has_no_duplicates() {
        let mut names: Vec<&str> = SUPPORTED.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SUPPORTED.len());
    }
}
