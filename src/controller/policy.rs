//! The admin's limits on what a Service's annotations may ask for, applied after parsing and
//! before any cloud call: which security groups a Service may attach, which certificates its TLS
//! listeners may use, which namespaces may choose their load balancer's name, and the VPC every
//! load balancer, target group and bound target group must be in. Pure; the flags are here too.
//!
//! Annotations are written by namespace users and untrusted: without an allowlist entry, the
//! `security-groups` and `ssl-cert` annotations and a custom `name` are refused.

use std::fmt;

use crate::annotations::{LoadBalancerOptions, key};
use crate::cloud::{TagRule, TagVetting};

/// Flags of the controller (and `cloudlb plan`) that limit tenants.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct PolicyArgs {
    /// The cluster's VPC: load balancers, target groups and bound target groups outside it are
    /// refused, and subnets (annotation or discovery) must be in it. Default: the VPC of the
    /// nodes' EC2 instances.
    #[arg(long, env = "CLOUDLB_VPC_ID")]
    pub vpc_id: Option<String>,
    /// Security group ids (`sg-…`, comma-separated) the `security-groups` annotation may name;
    /// `*` in an entry matches any characters. Empty: the annotation is refused.
    #[arg(long, env = "CLOUDLB_ALLOWED_SECURITY_GROUPS", value_delimiter = ',')]
    pub allowed_security_groups: Vec<String>,
    /// Tags (`KEY=VALUE` or `KEY` for any value, comma-separated) that let the
    /// `security-groups` annotation name a group not in `--allowed-security-groups`: the group
    /// must carry one of them (checked on the group itself before any write).
    #[arg(long, env = "CLOUDLB_ALLOWED_SECURITY_GROUP_TAGS", value_delimiter = ',', value_parser = parse_tag_rule)]
    pub allowed_security_group_tags: Vec<TagRule>,
    /// Certificate ARN patterns (comma-separated, `*` matches any characters) the `ssl-cert`
    /// annotation may name. Empty: the annotation is refused.
    #[arg(long, env = "CLOUDLB_ALLOWED_CERTIFICATES", value_delimiter = ',')]
    pub allowed_certificates: Vec<String>,
    /// Namespaces (comma-separated, `*` matches any characters) whose Services may choose their
    /// load balancer's name with the `name` annotation. Empty: only generated names.
    #[arg(long, env = "CLOUDLB_CUSTOM_NAME_NAMESPACES", value_delimiter = ',')]
    pub custom_name_namespaces: Vec<String>,
}

/// One refused annotation value; shown verbatim in the Warning Event and condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub annotation: &'static str,
    pub value: String,
    pub why: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}: {:?} {}",
            key(self.annotation),
            self.value,
            self.why
        )
    }
}

/// Whether `value` matches `pattern`, where `*` stands for any run of characters.
pub fn matches(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || !value.ends_with(last) || value.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// `KEY=VALUE` or `KEY`; the key may not be empty.
pub fn parse_tag_rule(text: &str) -> Result<TagRule, String> {
    let (key, value) = match text.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
        None => (text.trim(), None),
    };
    if key.is_empty() {
        return Err(format!(
            "{text:?}: a tag rule is KEY=VALUE or KEY, with a key"
        ));
    }
    Ok(TagRule {
        key: key.to_string(),
        value,
    })
}

/// The annotation's groups that pass only if they carry an allowed tag (checked by the cloud
/// edge, which reads the groups' tags before any write).
pub fn tag_vetting(groups: Option<&[String]>, p: &PolicyArgs) -> TagVetting {
    if p.allowed_security_group_tags.is_empty() {
        return TagVetting::default();
    }
    TagVetting {
        groups: groups
            .into_iter()
            .flatten()
            .filter(|sg| !allowed(&p.allowed_security_groups, sg))
            .cloned()
            .collect(),
        rules: p.allowed_security_group_tags.clone(),
    }
}

fn allowed(list: &[String], value: &str) -> bool {
    list.iter().any(|p| matches(p.trim(), value))
}

/// Generated names start so; a chosen name may not, so it can never take a Service's default.
pub const GENERATED_PREFIX: &str = "k8s-";

/// Every value of `opts` the policy refuses for a Service in `namespace`.
pub fn refusals(opts: &LoadBalancerOptions, namespace: &str, p: &PolicyArgs) -> Vec<Refusal> {
    let mut out = Vec::new();
    for sg in opts.security_groups.iter().flatten() {
        // With allowed tags, a group not listed by id is judged on its tags (`tag_vetting`).
        if !allowed(&p.allowed_security_groups, sg) && p.allowed_security_group_tags.is_empty() {
            out.push(Refusal {
                annotation: "security-groups",
                value: sg.clone(),
                why:
                    "is not in the controller's allowed security groups (--allowed-security-groups)"
                        .into(),
            });
        }
    }
    for cert in &opts.ssl_certificates {
        if !allowed(&p.allowed_certificates, cert) {
            out.push(Refusal {
                annotation: "ssl-cert",
                value: cert.clone(),
                why: "is not an allowed certificate (--allowed-certificates)".into(),
            });
        }
    }
    if let Some(name) = &opts.name {
        if !allowed(&p.custom_name_namespaces, namespace) {
            out.push(Refusal {
                annotation: "name",
                value: name.clone(),
                why: format!(
                    "is refused: Services in namespace {namespace} may not choose their load balancer's name (--custom-name-namespaces)"
                ),
            });
        } else if name.to_ascii_lowercase().starts_with(GENERATED_PREFIX) {
            out.push(Refusal {
                annotation: "name",
                value: name.clone(),
                why: format!("is refused: names starting with {GENERATED_PREFIX:?} are cloudlb's generated names"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_with_stars() {
        let cases = [
            ("sg-1", "sg-1", true),
            ("sg-1", "sg-12", false),
            ("*", "anything", true),
            (
                "arn:aws:acm:us-east-1:111:certificate/*",
                "arn:aws:acm:us-east-1:111:certificate/abc",
                true,
            ),
            (
                "arn:aws:acm:us-east-1:111:certificate/*",
                "arn:aws:acm:us-east-1:222:certificate/abc",
                false,
            ),
            ("team-*", "team-a", true),
            ("team-*", "xteam-a", false),
            ("*-prod", "web-prod", true),
            ("*-prod", "web-prod2", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
            ("", "", true),
            ("", "x", false),
        ];
        for (p, v, want) in cases {
            assert_eq!(matches(p, v), want, "{p} {v}");
        }
    }

    fn opts(sgs: &[&str], certs: &[&str], name: Option<&str>) -> LoadBalancerOptions {
        LoadBalancerOptions {
            security_groups: (!sgs.is_empty()).then(|| sgs.iter().map(|s| s.to_string()).collect()),
            ssl_certificates: certs.iter().map(|s| s.to_string()).collect(),
            name: name.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn only_allowed_groups_certificates_and_names_pass() {
        let p = PolicyArgs {
            allowed_security_groups: vec!["sg-shared".into(), "sg-team-*".into()],
            allowed_certificates: vec!["arn:aws:acm:*:111:certificate/*".into()],
            custom_name_namespaces: vec!["edge".into(), "team-*".into()],
            ..Default::default()
        };
        let cases: [(LoadBalancerOptions, &str, Vec<&str>); 8] = [
            (opts(&[], &[], None), "any", vec![]),
            (opts(&["sg-shared", "sg-team-a"], &[], None), "any", vec![]),
            (
                opts(&["sg-shared", "sg-victim"], &[], None),
                "any",
                vec!["security-groups"],
            ),
            (
                opts(&[], &["arn:aws:acm:us-east-1:111:certificate/x"], None),
                "any",
                vec![],
            ),
            (
                opts(&[], &["arn:aws:acm:us-east-1:999:certificate/x"], None),
                "any",
                vec!["ssl-cert"],
            ),
            (opts(&[], &[], Some("custom")), "team-a", vec![]),
            (opts(&[], &[], Some("custom")), "shop", vec!["name"]),
            (
                opts(&[], &[], Some("K8S-shop-web-0123456789")),
                "edge",
                vec!["name"],
            ),
        ];
        for (i, (o, ns, want)) in cases.into_iter().enumerate() {
            let got: Vec<&str> = refusals(&o, ns, &p).iter().map(|r| r.annotation).collect();
            assert_eq!(got, want, "case {i}");
        }
        // Nothing allowed by default.
        let all = refusals(
            &opts(
                &["sg-1"],
                &["arn:aws:acm:us-east-1:1:certificate/x"],
                Some("n"),
            ),
            "shop",
            &PolicyArgs::default(),
        );
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[0].to_string(),
            "annotation service.beta.kubernetes.io/aws-load-balancer-security-groups: \"sg-1\" is not in the controller's allowed security groups (--allowed-security-groups)"
        );
    }

    #[test]
    fn groups_not_listed_by_id_are_judged_on_their_tags() {
        let rule = |k: &str, v: Option<&str>| TagRule {
            key: k.into(),
            value: v.map(str::to_string),
        };
        assert_eq!(
            parse_tag_rule("team=payments"),
            Ok(rule("team", Some("payments")))
        );
        assert_eq!(parse_tag_rule(" shared "), Ok(rule("shared", None)));
        assert_eq!(parse_tag_rule("k="), Ok(rule("k", Some(""))));
        assert!(parse_tag_rule("=v").is_err());
        assert!(parse_tag_rule("").is_err());

        let tags = [("team", "payments"), ("env", "prod")];
        let cases = [
            (rule("team", Some("payments")), true),
            (rule("team", Some("search")), false),
            (rule("env", None), true),
            (rule("owner", None), false),
            (rule("Team", Some("payments")), false),
        ];
        for (r, want) in cases {
            assert_eq!(r.carried_by(tags.iter().copied()), want, "{r}");
        }

        let p = PolicyArgs {
            allowed_security_groups: vec!["sg-shared".into()],
            allowed_security_group_tags: vec![rule("team", Some("payments"))],
            ..Default::default()
        };
        let groups = vec!["sg-shared".to_string(), "sg-team".to_string()];
        // Not refused before the cloud is asked; the group not listed by id is vetted by tag.
        assert!(refusals(&opts(&["sg-shared", "sg-team"], &[], None), "shop", &p).is_empty());
        let v = tag_vetting(Some(&groups), &p);
        assert_eq!(v.groups, vec!["sg-team".to_string()]);
        assert_eq!(v.rules, p.allowed_security_group_tags);
        // Without tag rules there is nothing to vet (the id list alone decided).
        let by_id = PolicyArgs {
            allowed_security_groups: vec!["sg-shared".into()],
            ..Default::default()
        };
        assert_eq!(tag_vetting(Some(&groups), &by_id), TagVetting::default());
        assert_eq!(tag_vetting(None, &p).groups, Vec::<String>::new());
    }
}
