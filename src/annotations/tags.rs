//! The `additional-resource-tags` annotation: user tags on every resource, never one that
//! claims ownership for cloudlb, another controller or AWS.

use std::collections::BTreeMap;

use super::parser::Parser;

/// Tag key prefixes a Service may not set (compared case-insensitively): ownership keys of
/// cloudlb, the AWS Load Balancer Controller and Kubernetes cloud providers, and AWS's own.
pub const RESERVED_PREFIXES: &[&str] = &[
    "cloudlb.io/",
    "elbv2.k8s.aws/",
    "service.k8s.aws/",
    "ingress.k8s.aws/",
    "kubernetes.io/cluster/",
    "aws:",
];

/// AWS allows 50 tags per resource; cloudlb keeps 10 for its own (it sets 5 or 6 today).
pub const MAX_USER_TAGS: usize = 40;

const SHORT: &str = "additional-resource-tags";

pub(super) fn additional_tags(p: &mut Parser) -> BTreeMap<String, String> {
    let mut tags = p.map(SHORT);
    let mut bad = Vec::new();
    for (k, v) in &tags {
        let lower = k.to_ascii_lowercase();
        if let Some(prefix) = RESERVED_PREFIXES.iter().find(|r| lower.starts_with(*r)) {
            p.error(
                SHORT,
                format!("tag key {k:?} is reserved (prefix {prefix})"),
            );
            bad.push(k.clone());
        } else if k.chars().count() > 128 || v.chars().count() > 256 {
            p.error(
                SHORT,
                format!("tag {k:?}: keys are at most 128 characters, values 256"),
            );
            bad.push(k.clone());
        }
    }
    for k in bad {
        tags.remove(&k);
    }
    if tags.len() > MAX_USER_TAGS {
        p.error(
            SHORT,
            format!(
                "{} tags; at most {MAX_USER_TAGS} (AWS allows 50 per resource, cloudlb keeps 10)",
                tags.len()
            ),
        );
    }
    tags
}
