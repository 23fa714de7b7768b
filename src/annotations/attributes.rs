//! Which ELBv2 attributes a Service may set, per resource kind, and what their values look
//! like. Annotations are written by namespace users: an unknown key or a bad value is refused
//! before any cloud call instead of surfacing as an AWS validation error mid-deploy.

/// The value an attribute takes.
#[derive(Clone, Copy, Debug)]
enum Value {
    Bool,
    /// A whole number in the range.
    Int(i64, i64),
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// `off` or a whole number in the range.
    OffOr(i64, i64),
    /// An S3 bucket name (3–63 lowercase letters, digits, dots, hyphens).
    Bucket,
    /// An S3 key prefix (no leading slash, no `AWSLogs`, printable, ≤ 1024).
    Prefix,
}

/// The kind of resource an attribute belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LoadBalancer,
    TargetGroup,
}

/// Network Load Balancer attributes (ELBv2 API reference, `LoadBalancerAttribute`).
const LOAD_BALANCER: &[(&str, Value)] = &[
    ("deletion_protection.enabled", Value::Bool),
    ("load_balancing.cross_zone.enabled", Value::Bool),
    ("access_logs.s3.enabled", Value::Bool),
    ("access_logs.s3.bucket", Value::Bucket),
    ("access_logs.s3.prefix", Value::Prefix),
    ("ipv6.deny_all_igw_traffic", Value::Bool),
    (
        "dns_record.client_routing_policy",
        Value::OneOf(&[
            "availability_zone_affinity",
            "partial_availability_zone_affinity",
            "any_availability_zone",
        ]),
    ),
    ("zonal_shift.config.enabled", Value::Bool),
    ("secondary_ips.auto_assigned.per_subnet", Value::Int(0, 7)),
];

/// Network Load Balancer target group attributes (`TargetGroupAttribute`).
const TARGET_GROUP: &[(&str, Value)] = &[
    ("deregistration_delay.timeout_seconds", Value::Int(0, 3600)),
    (
        "deregistration_delay.connection_termination.enabled",
        Value::Bool,
    ),
    ("preserve_client_ip.enabled", Value::Bool),
    ("proxy_protocol_v2.enabled", Value::Bool),
    (
        "proxy_protocol_v2.client_to_server.header_placement",
        Value::OneOf(&["on_first_ack"]),
    ),
    ("stickiness.enabled", Value::Bool),
    ("stickiness.type", Value::OneOf(&["source_ip"])),
    (
        "load_balancing.cross_zone.enabled",
        Value::OneOf(&["true", "false", "use_load_balancer_configuration"]),
    ),
    (
        "target_health_state.unhealthy.connection_termination.enabled",
        Value::Bool,
    ),
    (
        "target_health_state.unhealthy.draining_interval_seconds",
        Value::Int(0, 360_000),
    ),
    (
        "target_group_health.dns_failover.minimum_healthy_targets.count",
        Value::OffOr(1, 1_000_000),
    ),
    (
        "target_group_health.dns_failover.minimum_healthy_targets.percentage",
        Value::OffOr(1, 100),
    ),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.count",
        Value::Int(1, 1_000_000),
    ),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.percentage",
        Value::OffOr(1, 100),
    ),
];

/// `Ok` when `key=value` is a known attribute of `kind` with a valid value; else the reason.
pub fn check(kind: Kind, key: &str, value: &str) -> Result<(), String> {
    let table = match kind {
        Kind::LoadBalancer => LOAD_BALANCER,
        Kind::TargetGroup => TARGET_GROUP,
    };
    let Some((_, ty)) = table.iter().find(|(k, _)| *k == key) else {
        let known: Vec<&str> = table.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "{key:?} is not a Network Load Balancer {} attribute (known: {})",
            match kind {
                Kind::LoadBalancer => "load balancer",
                Kind::TargetGroup => "target group",
            },
            known.join(", ")
        ));
    };
    if valid(*ty, value) {
        Ok(())
    } else {
        Err(format!("{key}={value:?}: expected {}", expected(*ty)))
    }
}

fn int_in(v: &str, min: i64, max: i64) -> bool {
    v.parse::<i64>().is_ok_and(|n| (min..=max).contains(&n))
}

fn valid(ty: Value, v: &str) -> bool {
    match ty {
        Value::Bool => v == "true" || v == "false",
        Value::Int(min, max) => int_in(v, min, max),
        Value::OneOf(words) => words.contains(&v),
        Value::OffOr(min, max) => v == "off" || int_in(v, min, max),
        Value::Bucket => {
            (3..=63).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
                && v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
        }
        Value::Prefix => {
            v.len() <= 1024
                && !v.starts_with('/')
                && !v.contains("AWSLogs")
                && v.chars().all(|c| c.is_ascii_graphic())
        }
    }
}

fn expected(ty: Value) -> String {
    match ty {
        Value::Bool => "true or false".into(),
        Value::Int(min, max) => format!("a whole number from {min} to {max}"),
        Value::OneOf(words) => format!("one of {}", words.join(", ")),
        Value::OffOr(min, max) => format!("off or a whole number from {min} to {max}"),
        Value::Bucket => "an S3 bucket name".into(),
        Value::Prefix => "an S3 prefix (no leading /, no AWSLogs)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_with_good_values_pass_and_others_say_why() {
        let cases: &[(Kind, &str, &str, Option<&str>)] = &[
            (
                Kind::LoadBalancer,
                "deletion_protection.enabled",
                "true",
                None,
            ),
            (
                Kind::LoadBalancer,
                "deletion_protection.enabled",
                "yes",
                Some("true or false"),
            ),
            (
                Kind::LoadBalancer,
                "access_logs.s3.bucket",
                "my-logs.1",
                None,
            ),
            (
                Kind::LoadBalancer,
                "access_logs.s3.bucket",
                "My_Logs",
                Some("S3 bucket"),
            ),
            (
                Kind::LoadBalancer,
                "access_logs.s3.prefix",
                "/x",
                Some("S3 prefix"),
            ),
            (
                Kind::LoadBalancer,
                "dns_record.client_routing_policy",
                "any_availability_zone",
                None,
            ),
            (
                Kind::LoadBalancer,
                "idle_timeout.timeout_seconds",
                "60",
                Some("not a Network Load Balancer load balancer attribute"),
            ),
            (
                Kind::TargetGroup,
                "deregistration_delay.timeout_seconds",
                "3600",
                None,
            ),
            (
                Kind::TargetGroup,
                "deregistration_delay.timeout_seconds",
                "3601",
                Some("from 0 to 3600"),
            ),
            (
                Kind::TargetGroup,
                "stickiness.type",
                "lb_cookie",
                Some("one of source_ip"),
            ),
            (
                Kind::TargetGroup,
                "load_balancing.cross_zone.enabled",
                "use_load_balancer_configuration",
                None,
            ),
            (
                Kind::TargetGroup,
                "target_group_health.dns_failover.minimum_healthy_targets.count",
                "off",
                None,
            ),
            (
                Kind::TargetGroup,
                "deletion_protection.enabled",
                "true",
                Some("target group attribute"),
            ),
        ];
        for (kind, k, v, want) in cases {
            let got = check(*kind, k, v);
            match want {
                None => assert!(got.is_ok(), "{k}={v}: {got:?}"),
                Some(text) => {
                    let e = got.expect_err(&format!("{k}={v} must fail"));
                    assert!(e.contains(text), "{k}={v}: {e}");
                }
            }
        }
    }
}
