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
            &[("attributes", "load_balancing.cross_zone.enabled=true")],
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
        ("healthcheck-port", "Http!", "neither traffic-port"),
        ("healthcheck-path", "healthz", "must start with /"),
        ("healthcheck-interval", "1", "from 5 to 300"),
        ("healthcheck-timeout", "x", "from 2 to 120"),
        ("healthcheck-healthy-threshold", "11", "from 2 to 10"),
        ("healthcheck-unhealthy-threshold", "1", "from 2 to 10"),
        ("healthcheck-success-codes", "ok", "is not like"),
        ("proxy-protocol", "true", "only supported value"),
        ("target-group-attributes", "novalue", "is not key=value"),
        ("attributes", "=x", "is not key=value"),
        ("additional-resource-tags", "aws:x=1", "reserved"),
        ("subnets", "a,,b", "empty item"),
        ("ssl-ports", "443", "ssl-cert is not"),
    ];
    for (short, value, reason) in cases {
        let errs = parse(&ann(&[(short, value)])).expect_err(&format!("{short}={value} must fail"));
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
#[allow(clippy::type_complexity)] // a table of (annotations, predicate) reads best inline
fn lbc_annotations_parse_to_the_model() {
    let cases: Vec<(&[(&str, &str)], Box<dyn Fn(&LoadBalancerOptions) -> bool>)> = vec![
        (
            &[("internal", "false")],
            Box::new(|o| o.scheme == Scheme::InternetFacing),
        ),
        (
            &[("internal", "false"), ("scheme", "internal")],
            Box::new(|o| o.scheme == Scheme::Internal),
        ),
        (
            &[("healthcheck-port", "http")],
            Box::new(|o| o.health_check.port == Some(HealthCheckPort::Name("http".into()))),
        ),
        (
            &[("proxy-protocol-per-target-group", "80, 443")],
            Box::new(|o| o.proxy_protocol_ports == Some([80, 443].into())),
        ),
        (
            &[(
                "target-group-attributes.3306",
                "deregistration_delay.timeout_seconds=5,stickiness.enabled=",
            )],
            Box::new(|o| {
                o.port_target_group_attributes[&3306]
                    == [(
                        "deregistration_delay.timeout_seconds".to_string(),
                        "5".to_string(),
                    )]
                    .into()
            }),
        ),
        (
            &[
                (
                    "attributes",
                    "access_logs.s3.enabled=false,deletion_protection.enabled=true",
                ),
                ("access-log-enabled", "true"),
                ("access-log-s3-bucket-name", "logs-bucket"),
                ("access-log-s3-bucket-prefix", "web"),
                ("cross-zone-load-balancing-enabled", "true"),
            ],
            Box::new(|o| {
                let a = &o.load_balancer_attributes;
                a["access_logs.s3.enabled"] == "true"
                    && a["access_logs.s3.bucket"] == "logs-bucket"
                    && a["access_logs.s3.prefix"] == "web"
                    && a["load_balancing.cross_zone.enabled"] == "true"
                    && a["deletion_protection.enabled"] == "true"
            }),
        ),
        (
            &[("enable-tcp-udp-listener", "false")],
            Box::new(|o| o.tcp_udp_listener == Some(false)),
        ),
        (
            &[("disable-nlb-sg", "true")],
            Box::new(|o| o.disable_security_group),
        ),
        (
            &[("manage-backend-security-group-rules", "false")],
            Box::new(|o| o.warnings.is_empty()),
        ),
        (
            &[("multi-cluster-target-group", "false")],
            Box::new(|_| true),
        ),
        (
            &[("enable-prefix-for-ipv6-source-nat", "off")],
            Box::new(|_| true),
        ),
        (
            &[("additional-resource-tags", "Team=web,cost-center=42")],
            Box::new(|o| o.additional_tags.len() == 2),
        ),
    ];
    for (input, check) in cases {
        let opts = parse(&ann(input)).unwrap_or_else(|e| panic!("{input:?}: {e:?}"));
        assert!(check(&opts), "{input:?} parsed to {opts:?}");
    }
}

#[test]
fn source_ranges_annotation_takes_ipv4_and_ipv6() {
    let a: BTreeMap<String, String> = [(
        SOURCE_RANGES.to_string(),
        "10.0.0.0/24, 2001:db8::/32".to_string(),
    )]
    .into();
    let o = parse(&a).unwrap();
    assert_eq!(
        o.source_ranges,
        Some(vec!["10.0.0.0/24".into(), "2001:db8::/32".into()])
    );
    let bad: BTreeMap<String, String> =
        [(SOURCE_RANGES.to_string(), "10.0.0.0".to_string())].into();
    let e = parse(&bad).unwrap_err();
    assert_eq!(e[0].annotation, SOURCE_RANGES);
    assert!(e[0].reason.contains("not CIDRs"), "{e:?}");
}

#[test]
fn new_bad_values_name_the_annotation_and_the_reason() {
    let cases: &[(&str, &str, &str)] = &[
        ("internal", "yes", "not true or false"),
        (
            "proxy-protocol-per-target-group",
            "http",
            "not a port number",
        ),
        (
            "target-group-attributes",
            "bogus.key=1",
            "not a Network Load Balancer target group attribute",
        ),
        (
            "target-group-attributes",
            "deregistration_delay.timeout_seconds=9999",
            "from 0 to 3600",
        ),
        (
            "target-group-attributes.http",
            "stickiness.enabled=true",
            "not a Service port number",
        ),
        (
            "attributes",
            "deletion_protection.enabled=maybe",
            "true or false",
        ),
        (
            "attributes",
            "idle_timeout.timeout_seconds=60",
            "not a Network Load Balancer load balancer attribute",
        ),
        ("access-log-s3-bucket-name", "Not_A_Bucket", "S3 bucket"),
        (
            "cross-zone-load-balancing-enabled",
            "on",
            "not true or false",
        ),
        (
            "additional-resource-tags",
            "elbv2.k8s.aws/cluster=x",
            "reserved",
        ),
        (
            "additional-resource-tags",
            "Kubernetes.io/Cluster/prod=owned",
            "reserved",
        ),
        (
            "additional-resource-tags",
            "CloudLB.io/service=a/b",
            "reserved",
        ),
        ("additional-resource-tags", "AWS:x=1", "reserved"),
        (
            "additional-resource-tags",
            "service.k8s.aws/stack=a/b",
            "reserved",
        ),
        ("enable-tcp-udp-listener", "maybe", "not true or false"),
        ("disable-nlb-sg", "1x", "not true or false"),
        (
            "manage-backend-security-group-rules",
            "true",
            "is not supported",
        ),
        ("multi-cluster-target-group", "true", "is not supported"),
        (
            "enable-prefix-for-ipv6-source-nat",
            "on",
            "is not supported",
        ),
        (
            "minimum-load-balancer-capacity",
            "CapacityUnits=3000",
            "is not supported: LocalStack",
        ),
        ("quic-enabled-ports", "443", "is not supported: LocalStack"),
        ("eip-allocations", "eipalloc-1", "is not supported"),
        (
            "listener-attributes.TCP-80",
            "tcp.idle_timeout.seconds=400",
            "is not supported",
        ),
    ];
    for (short, value, reason) in cases {
        let errs = parse(&ann(&[(short, value)])).expect_err(&format!("{short}={value} must fail"));
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
fn too_many_tags_are_refused() {
    let many: Vec<String> = (0..=tags::MAX_USER_TAGS)
        .map(|i| format!("k{i}=v"))
        .collect();
    let errs = parse(&ann(&[("additional-resource-tags", &many.join(","))])).unwrap_err();
    assert!(errs[0].reason.contains("at most 40"), "{errs:?}");
}

#[test]
fn every_refused_lbc_annotation_is_refused_with_its_reason() {
    for e in catalog::ENTRIES {
        let catalog::Status::Refused(why) = e.status else {
            continue;
        };
        let k = e
            .key
            .replace("${Protocol}-${Port}", "TCP-80")
            .replace("${protocol}-${port}", "TCP-80");
        let errs = parse(&[(k.clone(), "x".to_string())].into()).unwrap_err();
        assert!(
            errs.iter()
                .any(|er| er.annotation == k && er.reason == format!("is not supported: {why}")),
            "{k}: {errs:?}"
        );
    }
}

#[test]
fn unknown_keys_in_lbc_namespace_warn_and_the_service_still_parses() {
    let a: BTreeMap<String, String> = [
        (key("schema"), "internet-facing".to_string()),
        (
            "service.beta.kubernetes.io/actions-TCP-80".to_string(),
            "x".to_string(),
        ),
        ("example.com/other".to_string(), "x".to_string()),
    ]
    .into();
    let o = parse(&a).unwrap();
    assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
    assert!(o.warnings[0].contains(&key("schema")), "{:?}", o.warnings);
    assert!(o.warnings[0].contains("a typo?"));
    assert_eq!(o.scheme, Scheme::Internal);
}

#[test]
fn the_misnamed_attributes_annotation_still_works_with_a_deprecation_warning() {
    let o = parse(&ann(&[(
        "load-balancer-attributes",
        "load_balancing.cross_zone.enabled=true,deletion_protection.enabled=true",
    )]))
    .unwrap();
    assert_eq!(
        o.load_balancer_attributes["load_balancing.cross_zone.enabled"],
        "true"
    );
    assert_eq!(o.warnings.len(), 1);
    assert!(
        o.warnings[0]
            .contains("is deprecated: use service.beta.kubernetes.io/aws-load-balancer-attributes"),
        "{:?}",
        o.warnings
    );
    // LBC's name wins per key when both are set.
    let both = parse(&ann(&[
        (
            "load-balancer-attributes",
            "deletion_protection.enabled=true",
        ),
        ("attributes", "deletion_protection.enabled=false"),
    ]))
    .unwrap();
    assert_eq!(
        both.load_balancer_attributes["deletion_protection.enabled"],
        "false"
    );
}

#[test]
fn lbc_deprecated_annotations_warn() {
    let o = parse(&ann(&[
        ("internal", "true"),
        ("access-log-enabled", "false"),
    ]))
    .unwrap();
    assert_eq!(o.warnings.len(), 2, "{:?}", o.warnings);
}

#[test]
fn proxy_protocol_to_pod_takes_v2_only() {
    let full = |v: &str| {
        BTreeMap::from([(
            crate::annotations::PROXY_PROTOCOL_TO_POD.to_string(),
            v.to_string(),
        )])
    };
    // (value, Ok(on) or Err(reason))
    let cases: [(&str, Result<bool, &str>); 4] = [
        ("v2", Ok(true)),
        (" v2 ", Ok(true)),
        ("v1", Err("only supported value is \"v2\"")),
        ("true", Err("only supported value is \"v2\"")),
    ];
    for (value, want) in cases {
        match (parse(&full(value)), want) {
            (Ok(o), Ok(on)) => assert_eq!(o.proxy_protocol_to_pod, on, "{value:?}"),
            (Err(errs), Err(reason)) => {
                assert_eq!(errs.len(), 1, "{value:?}: {errs:?}");
                assert_eq!(
                    errs[0].annotation,
                    crate::annotations::PROXY_PROTOCOL_TO_POD
                );
                assert!(
                    errs[0].reason.contains(reason),
                    "{value:?}: {}",
                    errs[0].reason
                );
            }
            (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
        }
    }
    assert!(!parse(&BTreeMap::new()).unwrap().proxy_protocol_to_pod);
}
