//! Every Service annotation of the AWS Load Balancer Controller (its
//! `docs/guide/service/annotations.md`, v3.5) with what cloudlb does with it. The parser, the
//! unknown-key warning and the README's annotation table all read this one list, so a Service
//! moved from LBC is never silently served differently.

/// What cloudlb does with one annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Honoured with LBC's name, value syntax, default and effect.
    Implemented,
    /// Accepted but superseded; the text names the annotation to use instead. The Service
    /// still syncs.
    Deprecated(&'static str),
    /// Refused: a Service carrying it gets a Warning Event and `LoadBalancerSynced=False`
    /// naming it, and the cloud is left untouched. The text says why.
    Refused(&'static str),
}

/// One annotation: its full key (`${…}` marks a family, e.g. one per listener), where it
/// comes from, what cloudlb does with it and what it means.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub key: &'static str,
    /// Whether it is a row of LBC's annotation table (the figure counts only those).
    pub in_lbc_table: bool,
    pub status: Status,
    pub meaning: &'static str,
}

const S: &str = "service.beta.kubernetes.io/";

macro_rules! entry {
    ($key:literal, $lbc:literal, $status:expr, $meaning:literal) => {
        Entry {
            key: $key,
            in_lbc_table: $lbc,
            status: $status,
            meaning: $meaning,
        }
    };
}

use Status::{Deprecated, Implemented, Refused};

/// Why the refused ones are refused, said once.
const NOT_YET: &str = "not implemented in cloudlb yet";

/// LBC's list (48 rows of its table) plus the per-port target group attributes its text
/// documents and cloudlb's own misnamed attributes annotation (a deprecated alias).
pub const ENTRIES: &[Entry] = &[
    entry!(
        "service.beta.kubernetes.io/load-balancer-source-ranges",
        true,
        Implemented,
        "CIDRs (IPv4 or IPv6) allowed by the managed security group; `spec.loadBalancerSourceRanges` wins when set"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists",
        true,
        Refused(NOT_YET),
        "managed prefix lists allowed by the managed security group"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-type",
        true,
        Implemented,
        "`external` or `nlb`; `nlb-ip` means ip targets (with `--default-class`, class-less Services are served only with `external`/`nlb-ip`)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
        true,
        Implemented,
        "`instance` (default: nodes at the nodePort) or `ip` (pod IPs at the targetPort)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-name",
        true,
        Implemented,
        "the load balancer's name (≤ 32 characters: letters, digits, hyphens)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-internal",
        true,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-scheme"),
        "`true` = internal, `false` = internet-facing; `scheme` wins when both are set"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-scheme",
        true,
        Implemented,
        "`internal` (default) or `internet-facing`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol",
        true,
        Implemented,
        "`*` turns proxy protocol v2 on for every target group (wins over the other two)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol-per-target-group",
        true,
        Implemented,
        "Service port numbers, comma-separated: proxy protocol v2 on for these, off for the others"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-ip-address-type",
        true,
        Implemented,
        "`ipv4` (default) or `dualstack` (the managed security group then also opens `::/0`)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-access-log-enabled",
        true,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "`true`/`false` → `access_logs.s3.enabled` (wins over the attributes annotation, as in LBC)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-access-log-s3-bucket-name",
        true,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "→ `access_logs.s3.bucket`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-access-log-s3-bucket-prefix",
        true,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "→ `access_logs.s3.prefix`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled",
        true,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "`true`/`false` → `load_balancing.cross_zone.enabled`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-ssl-cert",
        true,
        Implemented,
        "ACM certificate ARN(s), comma-separated: TLS listeners (the first is the default certificate)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-ssl-ports",
        true,
        Implemented,
        "ports (numbers or names) that get TLS listeners; default all when ssl-cert is set"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy",
        true,
        Refused(NOT_YET),
        "TLS listeners' security policy (LBC default `ELBSecurityPolicy-2016-08`)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-backend-protocol",
        true,
        Refused(NOT_YET),
        "`ssl`: TLS from the load balancer to the targets behind TLS listeners"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags",
        true,
        Implemented,
        "`key=value,…` extra tags on every resource (at most 40; reserved prefixes refused; removed keys are removed from AWS)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol",
        true,
        Implemented,
        "`TCP`, `HTTP` or `HTTPS`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port",
        true,
        Implemented,
        "`traffic-port`, a port number, or a Service port name (its nodePort for instance targets, its numeric targetPort for ip targets)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path",
        true,
        Implemented,
        "HTTP(S) health-check path, starting with `/`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold",
        true,
        Implemented,
        "consecutive successes, 2–10 (default 3)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-unhealthy-threshold",
        true,
        Implemented,
        "consecutive failures, 2–10 (default 3)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout",
        true,
        Implemented,
        "seconds, 2–120 (default 10)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval",
        true,
        Implemented,
        "seconds between checks, 5–300 (default 10)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-success-codes",
        true,
        Implemented,
        "HTTP codes, e.g. `200` or `200-399`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-eip-allocations",
        true,
        Refused(NOT_YET),
        "Elastic IP allocation ids, one per subnet (internet-facing)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses",
        true,
        Refused(NOT_YET),
        "private IPv4 addresses, one per subnet (internal)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-ipv6-addresses",
        true,
        Refused(NOT_YET),
        "IPv6 addresses, one per subnet (dualstack)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes",
        true,
        Implemented,
        "`key=value,…` target group attributes (NLB keys only, values checked)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.${Port}",
        false,
        Implemented,
        "`key=value,…` for the target group of one Service port; overrides the global ones (an empty value keeps the global one)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-subnets",
        true,
        Implemented,
        "comma-separated subnet IDs or Name tags; default: discovered by tags"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-alpn-policy",
        true,
        Refused(NOT_YET),
        "TLS listeners' ALPN policy"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-target-node-labels",
        true,
        Implemented,
        "`key=value,…` only nodes with these labels become targets"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-attributes",
        true,
        Implemented,
        "`key=value,…` load balancer attributes (NLB keys only, values checked; `deletion_protection.enabled=true` blocks teardown with a Warning)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-load-balancer-attributes",
        false,
        Deprecated("service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "cloudlb's earlier, misnamed spelling of the attributes annotation; still read, with a Warning (LBC's name wins when both are set)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-security-groups",
        true,
        Implemented,
        "comma-separated security group IDs to attach instead of a managed one"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-manage-backend-security-group-rules",
        true,
        Refused(
            "`true` is not supported yet: cloudlb does not edit the nodes' security groups; `false` (what cloudlb does) is accepted"
        ),
        "whether the controller opens the target ports on the nodes' security groups"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-inbound-sg-rules-on-private-link-traffic",
        true,
        Refused(NOT_YET),
        "`on`/`off`: security group rules for PrivateLink traffic"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.${Protocol}-${Port}",
        true,
        Refused(NOT_YET),
        "`key=value,…` attributes of one listener, e.g. `tcp.idle_timeout.seconds=400`"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-multi-cluster-target-group",
        true,
        Refused(
            "`true` is not supported yet: cloudlb deregisters every target it does not want; `false` is accepted"
        ),
        "share target groups with other clusters"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-enable-prefix-for-ipv6-source-nat",
        true,
        Refused("`on` is not supported yet (subnet mappings); `off` is accepted"),
        "IPv6 source NAT prefixes for UDP over IPv6 (dualstack)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-source-nat-ipv6-prefixes",
        true,
        Refused(NOT_YET),
        "IPv6 source NAT prefixes, one per subnet"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity",
        true,
        Refused(
            "LocalStack's ELBv2 has no ModifyCapacityReservation, so it cannot be built and tested here"
        ),
        "`CapacityUnits=N` capacity reservation"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-enable-icmp-for-path-mtu-discovery",
        true,
        Refused(NOT_YET),
        "`on`: ICMP fragmentation-needed rules in the managed security group"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-enable-tcp-udp-listener",
        true,
        Implemented,
        "`true` changes nothing (cloudlb makes TCP_UDP listeners by default); `false` on a Service with TCP and UDP on one port is refused"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-disable-nlb-sg",
        true,
        Implemented,
        "`true`: no security group on the load balancer (set it at creation: groups cannot be added or removed later)"
    ),
    entry!(
        "service.beta.kubernetes.io/aws-load-balancer-quic-enabled-ports",
        true,
        Refused("LocalStack's ELBv2 has no QUIC protocol, so it cannot be built and tested here"),
        "UDP ports upgraded to QUIC"
    ),
    entry!(
        "service.beta.kubernetes.io/actions.${protocol}-${port}",
        true,
        Refused(NOT_YET),
        "a listener's action (weighted target groups of other Services)"
    ),
    entry!(
        "cloudlb.io/proxy-protocol-to-pod",
        false,
        Implemented,
        "cloudlb's own: `v2` makes the node proxy start each TCP connection to a pod with a PROXY protocol v2 header carrying the client's address (from the NLB's own header when the target group has proxy protocol, else the peer); UDP is forwarded unchanged"
    ),
];

/// The entry `key` belongs to: an exact key, or a family (`…${x}`) whose fixed part it
/// starts with and which has something after it.
pub fn lookup(key: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| match e.key.split_once("${") {
        None => e.key == key,
        Some((fixed, _)) => key.len() > fixed.len() && key.starts_with(fixed),
    })
}

/// Whether `key` looks like one of LBC's Service annotations (so an unknown one is a typo).
pub fn in_lbc_namespace(key: &str) -> bool {
    key.strip_prefix(S)
        .is_some_and(|rest| rest.starts_with("aws-load-balancer-") || rest.starts_with("actions."))
}

/// `implemented / refused / total` over LBC's table; deprecated aliases count as implemented
/// (they are honoured).
pub fn figures() -> (usize, usize, usize) {
    let lbc: Vec<&Entry> = ENTRIES.iter().filter(|e| e.in_lbc_table).collect();
    let refused = lbc
        .iter()
        .filter(|e| matches!(e.status, Status::Refused(_)))
        .count();
    (lbc.len() - refused, refused, lbc.len())
}

/// The README's status column for an entry.
pub fn status_text(e: &Entry) -> String {
    match e.status {
        Status::Implemented => "implemented".into(),
        Status::Deprecated(by) => format!("deprecated alias of `{by}`"),
        Status::Refused(why) => format!("refused: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbc_table_has_its_48_rows_and_no_duplicates() {
        let mut keys: Vec<&str> = ENTRIES.iter().map(|e| e.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), ENTRIES.len());
        assert_eq!(ENTRIES.iter().filter(|e| e.in_lbc_table).count(), 48);
    }

    #[test]
    fn families_match_their_members_only() {
        let l = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80";
        assert_eq!(lookup(l).map(|e| e.in_lbc_table), Some(true));
        let t = "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.3306";
        assert!(lookup(t).is_some_and(|e| !e.in_lbc_table));
        assert!(lookup("service.beta.kubernetes.io/actions.TCP-80").is_some());
        assert!(
            lookup("service.beta.kubernetes.io/aws-load-balancer-listener-attributes.").is_none()
        );
        assert!(lookup("service.beta.kubernetes.io/aws-load-balancer-schema").is_none());
        assert!(in_lbc_namespace(
            "service.beta.kubernetes.io/aws-load-balancer-schema"
        ));
        assert!(!in_lbc_namespace("service.beta.kubernetes.io/other"));
    }

    /// The closing figure of issue 14: `cargo test --lib annotation_figures -- --nocapture`.
    #[test]
    fn annotation_figures() {
        let (implemented, refused, total) = figures();
        assert_eq!(implemented + refused, total);
        println!(
            "annotations: {implemented} implemented / {refused} refused / {total} total against LBC's list"
        );
    }
}
