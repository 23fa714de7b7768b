//! Conversions between the model and the SDK's types, each written once: tags, attributes,
//! protocols, health checks, target descriptions, listener actions and certificates.

use std::collections::BTreeMap;

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{Action, ActionTypeEnum, Certificate, ProtocolEnum, Tag, TargetDescription};

use crate::model::{HealthCheckProtocol, HealthCheckSpec, ListenerSpec, Protocol, Target};

/// Tags (or attributes) read from AWS: `(key, value)` pairs into a map; pairs without a key
/// are dropped, a missing value reads as empty. Collect into it, then take `.0`.
pub(super) struct KeyValues(pub(super) BTreeMap<String, String>);

impl<'a> FromIterator<(Option<&'a str>, Option<&'a str>)> for KeyValues {
    fn from_iter<I: IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>>(it: I) -> Self {
        KeyValues(
            it.into_iter()
                .filter_map(|(k, v)| Some((k?.to_string(), v.unwrap_or_default().to_string())))
                .collect(),
        )
    }
}

/// Tags for an ELBv2 request.
pub(super) fn aws_tags(t: &BTreeMap<String, String>) -> Vec<Tag> {
    t.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Tags for an EC2 request.
pub(super) fn ec2_tags(t: &BTreeMap<String, String>) -> Vec<ec2::types::Tag> {
    t.iter()
        .map(|(k, v)| ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

/// Sets a health check on a CreateTargetGroup or ModifyTargetGroup request: the same setters
/// on two builder types, written once.
macro_rules! with_health_check {
    ($request:expr, $h:expr) => {{
        let h: &HealthCheckSpec = $h;
        let mut r = $request
            .health_check_protocol(ProtocolEnum::from(h.protocol.as_aws()))
            .health_check_port(&h.port)
            .health_check_interval_seconds(h.interval_seconds)
            .health_check_timeout_seconds(h.timeout_seconds)
            .healthy_threshold_count(h.healthy_threshold)
            .unhealthy_threshold_count(h.unhealthy_threshold);
        if h.protocol.is_http() {
            r = r.set_health_check_path(h.path.clone());
            if let Some(c) = &h.success_codes {
                r = r.matcher(Matcher::builder().http_code(c).build());
            }
        }
        r
    }};
}
pub(super) use with_health_check;

pub(super) fn aws_protocol(p: Protocol) -> ProtocolEnum {
    ProtocolEnum::from(p.as_aws())
}

pub(super) fn descriptions(ts: &[Target]) -> Vec<TargetDescription> {
    ts.iter()
        .map(|t| TargetDescription::builder().id(&t.id).port(t.port).build())
        .collect()
}

pub(super) fn forward(tg_arn: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

pub(super) fn certificates(l: &ListenerSpec) -> Option<Vec<Certificate>> {
    (l.protocol == Protocol::Tls).then(|| {
        l.certificates
            .iter()
            .map(|c| Certificate::builder().certificate_arn(c).build())
            .collect()
    })
}

/// The observed health check in the model's terms; fields AWS reports but that do not apply to
/// the protocol (a path on a TCP check) are dropped so they never look like drift.
pub(super) fn observed_health_check(tg: &elbv2::types::TargetGroup) -> HealthCheckSpec {
    let protocol = HealthCheckProtocol::from_aws(
        tg.health_check_protocol()
            .map(|p| p.as_str())
            .unwrap_or_default(),
    );
    let http = protocol.is_http();
    HealthCheckSpec {
        protocol,
        port: tg.health_check_port().unwrap_or("traffic-port").to_string(),
        path: if http {
            tg.health_check_path().map(str::to_string)
        } else {
            None
        },
        interval_seconds: tg.health_check_interval_seconds().unwrap_or_default(),
        timeout_seconds: tg.health_check_timeout_seconds().unwrap_or_default(),
        healthy_threshold: tg.healthy_threshold_count().unwrap_or_default(),
        unhealthy_threshold: tg.unhealthy_threshold_count().unwrap_or_default(),
        success_codes: if http {
            tg.matcher().and_then(|m| m.http_code()).map(str::to_string)
        } else {
            None
        },
    }
}
