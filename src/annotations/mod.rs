//! Service annotations → validated [`LoadBalancerOptions`], or every problem found at once.
//!
//! Names follow the AWS Load Balancer Controller (`service.beta.kubernetes.io/aws-load-balancer-*`)
//! so Services move over unchanged; [`catalog`] lists every one of LBC's with what cloudlb does
//! with it. Parsing is pure: the controller turns errors into a Warning Event and a status
//! condition and makes no cloud change for that Service; warnings (unknown keys, deprecated
//! names) become Warning Events while the Service still syncs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::model::{
    Attributes, HealthCheckOverrides, HealthCheckPort, HealthCheckProtocol, IpAddressType, PortRef,
    Scheme, TargetType,
};

pub mod attributes;
pub mod catalog;
mod parser;
mod tags;

use attributes::Kind;
use parser::{Parser, parse_bool};

const PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// The full annotation key for a short name (`scheme` →
/// `service.beta.kubernetes.io/aws-load-balancer-scheme`).
pub fn key(short: &str) -> String {
    format!("{PREFIX}{short}")
}

/// cloudlb's own: the node proxy sends the pods a PROXY protocol header (`v2`).
pub const PROXY_PROTOCOL_TO_POD: &str = "cloudlb.io/proxy-protocol-to-pod";

/// LBC's source-ranges annotation (outside the `aws-load-balancer-` prefix).
pub const SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

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
    /// `proxy-protocol: "*"`: on for every target group (wins over the per-group list).
    pub proxy_protocol: bool,
    /// `proxy-protocol-per-target-group`: on for these Service ports, off for the others.
    pub proxy_protocol_ports: Option<BTreeSet<i32>>,
    /// `cloudlb.io/proxy-protocol-to-pod: v2`: the node proxy sends a PROXY v2 header with the
    /// client's address to the pod (externalTrafficPolicy Cluster keeps it that way).
    pub proxy_protocol_to_pod: bool,
    pub target_group_attributes: Attributes,
    /// `target-group-attributes.<port>`: per Service port, over the global ones.
    pub port_target_group_attributes: BTreeMap<i32, Attributes>,
    pub load_balancer_attributes: Attributes,
    pub additional_tags: BTreeMap<String, String>,
    pub target_node_labels: BTreeMap<String, String>,
    pub ssl_certificates: Vec<String>,
    pub ssl_ports: Option<Vec<PortRef>>,
    pub security_groups: Option<Vec<String>>,
    /// `load-balancer-source-ranges` (`spec.loadBalancerSourceRanges` wins when set).
    pub source_ranges: Option<Vec<String>>,
    /// `enable-tcp-udp-listener`; `Some(false)` refuses TCP and UDP on one port.
    pub tcp_udp_listener: Option<bool>,
    /// `disable-nlb-sg: "true"`: no security group on the load balancer.
    pub disable_security_group: bool,
    /// Not errors: unknown keys in LBC's namespace (typos) and deprecated names. Each becomes
    /// a Warning Event; the Service still syncs.
    pub warnings: Vec<String>,
}

/// Parses every annotation; returns all errors, not just the first.
pub fn parse(
    annotations: &BTreeMap<String, String>,
) -> Result<LoadBalancerOptions, Vec<AnnotationError>> {
    parse_recording(annotations).0
}

/// [`parse`], and the keys it looked at.
fn parse_recording(
    annotations: &BTreeMap<String, String>,
) -> (
    Result<LoadBalancerOptions, Vec<AnnotationError>>,
    BTreeSet<String>,
) {
    let mut p = Parser::new(annotations);
    let mut opts = LoadBalancerOptions {
        warnings: screen(&mut p),
        ..Default::default()
    };
    kinds(&mut p, &mut opts);
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
    opts.health_check = p.health_check();
    proxy_protocol(&mut p, &mut opts);
    opts.target_group_attributes = p.attributes("target-group-attributes", Kind::TargetGroup);
    opts.port_target_group_attributes = p.port_target_group_attributes();
    opts.load_balancer_attributes = load_balancer_attributes(&mut p);
    opts.additional_tags = tags::additional_tags(&mut p);
    opts.target_node_labels = p.map("target-node-labels");
    tls(&mut p, &mut opts);
    opts.security_groups = p.list("security-groups");
    opts.source_ranges = p.cidrs(SOURCE_RANGES);
    opts.tcp_udp_listener = p.bool("enable-tcp-udp-listener");
    opts.disable_security_group = p.bool("disable-nlb-sg").unwrap_or(false);
    if opts.disable_security_group && opts.security_groups.is_some() {
        p.error(
            "disable-nlb-sg",
            "is true but security-groups names groups to attach".into(),
        );
    }
    accepted_no_ops(&mut p);
    let read = p.read.take();
    (p.finish(opts), read)
}

/// Every annotation key [`parse`] reads (families as their catalog pattern, e.g.
/// `…-target-group-attributes.${Port}`): the README test checks each is documented.
pub fn keys_read() -> BTreeSet<String> {
    parse_recording(&BTreeMap::new()).1
}

/// Unknown keys in LBC's namespace → warnings; refused ones → errors; deprecated ones →
/// warnings. The values of known ones are read by the rest of [`parse`].
fn screen(p: &mut Parser) -> Vec<String> {
    let mut warnings = Vec::new();
    for (k, v) in p.annotations {
        match catalog::lookup(k) {
            None if catalog::in_lbc_namespace(k) => warnings.push(format!(
                "annotation {k} is not one cloudlb or the AWS Load Balancer Controller knows (a typo?); it is ignored"
            )),
            None => {}
            Some(e) => match e.status {
                catalog::Status::Deprecated(by) => {
                    warnings.push(format!("annotation {k} is deprecated: use {by}"))
                }
                catalog::Status::Refused(why) if !accepted_value(k, v.trim()) => {
                    p.error_full(k, format!("is not supported: {why}"))
                }
                _ => {}
            },
        }
    }
    warnings
}

/// Refused annotations whose value asks for exactly what cloudlb does anyway.
fn accepted_value(k: &str, v: &str) -> bool {
    let short = k.strip_prefix(PREFIX).unwrap_or(k);
    match short {
        "manage-backend-security-group-rules" | "multi-cluster-target-group" => {
            parse_bool(v) == Some(false)
        }
        "enable-prefix-for-ipv6-source-nat" => v == "off",
        _ => false,
    }
}

/// The accepted values of [`accepted_value`] still need a valid spelling.
fn accepted_no_ops(p: &mut Parser) {
    let _ = p.bool("manage-backend-security-group-rules");
    let _ = p.bool("multi-cluster-target-group");
}

/// `type`, `scheme` (and its deprecated `internal`), `nlb-target-type`, `ip-address-type`.
fn kinds(p: &mut Parser, opts: &mut LoadBalancerOptions) {
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
    if let Some(internal) = p.bool("internal") {
        opts.scheme = if internal {
            Scheme::Internal
        } else {
            Scheme::InternetFacing
        };
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
}

fn proxy_protocol(p: &mut Parser, opts: &mut LoadBalancerOptions) {
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
    if let Some(items) = p.list("proxy-protocol-per-target-group") {
        let mut ports = BTreeSet::new();
        for s in items {
            match s.parse::<i32>() {
                Ok(n) if (1..=65535).contains(&n) => {
                    ports.insert(n);
                }
                _ => p.error(
                    "proxy-protocol-per-target-group",
                    format!("{s:?} is not a port number"),
                ),
            }
        }
        opts.proxy_protocol_ports = Some(ports);
    }
    match p.get_full(PROXY_PROTOCOL_TO_POD) {
        None => {}
        Some("v2") => opts.proxy_protocol_to_pod = true,
        Some(v) => p.error_full(
            PROXY_PROTOCOL_TO_POD,
            format!("unknown value {v:?}; the only supported value is \"v2\""),
        ),
    }
}

/// LBC's attributes annotation, cloudlb's old misnamed one (LBC's wins per key), then the
/// deprecated single-attribute annotations, which win over both, as in LBC.
fn load_balancer_attributes(p: &mut Parser) -> Attributes {
    let mut attrs = p.attributes("load-balancer-attributes", Kind::LoadBalancer);
    attrs.extend(p.attributes("attributes", Kind::LoadBalancer));
    if let Some(b) = p.bool("access-log-enabled") {
        attrs.insert("access_logs.s3.enabled".into(), b.to_string());
    }
    for (short, attr) in [
        ("access-log-s3-bucket-name", "access_logs.s3.bucket"),
        ("access-log-s3-bucket-prefix", "access_logs.s3.prefix"),
    ] {
        if let Some(v) = p.get(short) {
            match attributes::check(Kind::LoadBalancer, attr, v) {
                Ok(()) => {
                    attrs.insert(attr.into(), v.to_string());
                }
                Err(e) => p.error(short, e),
            }
        }
    }
    if let Some(b) = p.bool("cross-zone-load-balancing-enabled") {
        attrs.insert("load_balancing.cross_zone.enabled".into(), b.to_string());
    }
    attrs
}

fn tls(p: &mut Parser, opts: &mut LoadBalancerOptions) {
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
}

fn valid_lb_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-')
        && !v.starts_with("internal-")
}

/// Health-check overrides; kept beside the parser because they share its helpers.
impl Parser<'_> {
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
            hc.port = health_check_port(v);
            if hc.port.is_none() {
                self.error(
                    "healthcheck-port",
                    format!("{v:?} is neither traffic-port, a port number nor a port name"),
                );
            }
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

/// `traffic-port`, a number 1–65535, or a Service port name (a DNS label, as Kubernetes
/// port names are).
fn health_check_port(v: &str) -> Option<HealthCheckPort> {
    if v == "traffic-port" {
        return Some(HealthCheckPort::TrafficPort);
    }
    if let Ok(n) = v.parse::<u16>() {
        return (n > 0).then_some(HealthCheckPort::Port(n));
    }
    let name_ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && v.chars().any(|c| c.is_ascii_lowercase())
        && !v.starts_with('-')
        && !v.ends_with('-');
    name_ok.then(|| HealthCheckPort::Name(v.to_string()))
}

fn valid_success_codes(v: &str) -> bool {
    let code = |s: &str| s.parse::<u16>().is_ok_and(|n| (200..=599).contains(&n));
    v.split(',').all(|part| match part.split_once('-') {
        Some((a, b)) => code(a) && code(b) && a.parse::<u16>().ok() <= b.parse::<u16>().ok(),
        None => code(part),
    })
}

#[cfg(test)]
mod tests;
