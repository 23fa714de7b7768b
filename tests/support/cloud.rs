//! Per-test AWS state on LocalStack (a VPC, a tagged subnet, EC2 instances for nodes) and the
//! controller as a real process against the rig.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag as Ec2Tag, TagSpecification};
use aws_sdk_elasticloadbalancingv2 as elbv2;

use super::{Proc, Rig, unique};

/// One test's slice of the cloud: its own cluster name, load balancer class and subnet.
pub struct TestCloud {
    pub cluster: String,
    pub class: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub elb: elbv2::Client,
    pub ec2: aws_sdk_ec2::Client,
}

impl TestCloud {
    pub async fn new(rig: &Rig, prefix: &str) -> TestCloud {
        let conf = rig.aws().await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let elb = elbv2::Client::new(&conf);
        let cluster = unique(prefix);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.213.0.0/16")
            .send()
            .await
            .expect("vpc");
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("vpc id")
            .to_string();
        let tag = |k: &str, v: &str| Ec2Tag::builder().key(k).value(v).build();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block("10.213.0.0/16")
            .availability_zone("us-east-1a")
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Subnet)
                    .tags(tag("kubernetes.io/role/internal-elb", "1"))
                    .tags(tag("kubernetes.io/role/elb", "1"))
                    .tags(tag(&format!("kubernetes.io/cluster/{cluster}"), "shared"))
                    .build(),
            )
            .send()
            .await
            .expect("subnet");
        let subnet_id = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .expect("subnet id")
            .to_string();
        TestCloud {
            class: format!("cloudlb.io/{cluster}"),
            cluster,
            vpc_id,
            subnet_id,
            elb,
            ec2,
        }
    }

    /// An EC2 instance in the test subnet (a node's machine); returns its id.
    pub async fn instance(&self, private_ip: Option<&str>) -> String {
        let out = self
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .subnet_id(&self.subnet_id)
            .set_private_ip_address(private_ip.map(str::to_string))
            .send()
            .await
            .expect("run instance");
        out.instances()[0].instance_id().expect("id").to_string()
    }

    pub fn provider_id(instance: &str) -> String {
        format!("aws:///us-east-1a/{instance}")
    }

    /// Every load balancer and target group tagged with this test's cluster: (arn, name, tags).
    pub async fn inventory(&self) -> Vec<(String, String, BTreeMap<String, String>)> {
        let mut arns = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let lbs = self
                .elb
                .describe_load_balancers()
                .set_marker(marker.take())
                .send()
                .await
                .expect("lbs");
            arns.extend(lbs.load_balancers().iter().map(|l| {
                (
                    l.load_balancer_arn().unwrap().to_string(),
                    l.load_balancer_name().unwrap().to_string(),
                )
            }));
            marker = lbs.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        loop {
            let tgs = self
                .elb
                .describe_target_groups()
                .set_marker(marker.take())
                .send()
                .await
                .expect("tgs");
            arns.extend(tgs.target_groups().iter().map(|t| {
                (
                    t.target_group_arn().unwrap().to_string(),
                    t.target_group_name().unwrap().to_string(),
                )
            }));
            marker = tgs.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for chunk in arns.chunks(20) {
            let mut descriptions = Vec::new();
            match self
                .elb
                .describe_tags()
                .set_resource_arns(Some(chunk.iter().map(|(a, _)| a.clone()).collect()))
                .send()
                .await
            {
                Ok(res) => descriptions.extend(res.tag_descriptions().to_vec()),
                // One of the chunk went away since the listing (a controller deletes
                // concurrently): ask one by one and skip the vanished.
                Err(_) => {
                    for (arn, _) in chunk {
                        if let Ok(res) = self.elb.describe_tags().resource_arns(arn).send().await {
                            descriptions.extend(res.tag_descriptions().to_vec());
                        }
                    }
                }
            }
            for d in &descriptions {
                let t: BTreeMap<String, String> = d
                    .tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap().to_string(),
                            t.value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                if t.get("cloudlb.io/cluster") == Some(&self.cluster) {
                    let arn = d.resource_arn().unwrap().to_string();
                    let name = chunk
                        .iter()
                        .find(|(a, _)| *a == arn)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_default();
                    out.push((arn, name, t));
                }
            }
        }
        out
    }

    pub async fn load_balancer(&self, name: &str) -> Option<elbv2::types::LoadBalancer> {
        self.elb
            .describe_load_balancers()
            .names(name)
            .send()
            .await
            .ok()?
            .load_balancers()
            .first()
            .cloned()
    }

    /// (port, protocol, target group arn) of each listener, sorted by port.
    pub async fn listeners(&self, lb_arn: &str) -> Vec<(i32, String, String)> {
        let out = self
            .elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .expect("listeners");
        let mut v: Vec<(i32, String, String)> = out
            .listeners()
            .iter()
            .map(|l| {
                (
                    l.port().unwrap_or_default(),
                    l.protocol()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    l.default_actions()
                        .first()
                        .and_then(|a| a.target_group_arn())
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub async fn target_group(&self, arn: &str) -> elbv2::types::TargetGroup {
        self.elb
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
            .expect("tg")
            .target_groups()[0]
            .clone()
    }

    pub async fn targets(&self, tg_arn: &str) -> BTreeSet<(String, i32)> {
        let out = self
            .elb
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .expect("health");
        out.target_health_descriptions()
            .iter()
            .filter_map(|d| {
                d.target().map(|t| {
                    (
                        t.id().unwrap_or_default().to_string(),
                        t.port().unwrap_or_default(),
                    )
                })
            })
            .collect()
    }

    /// Everything AWS says about a target group, for byte-for-byte before/after comparisons:
    /// the group (health check, port, load balancers), its attributes, tags and target health.
    pub async fn snapshot_target_group(&self, arn: &str) -> String {
        let tg = self.target_group(arn).await;
        let attributes = self
            .elb
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .expect("target group attributes");
        let tags = self
            .elb
            .describe_tags()
            .resource_arns(arn)
            .send()
            .await
            .expect("tags");
        let health = self
            .elb
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .expect("target health");
        let mut attrs: Vec<String> = attributes
            .attributes()
            .iter()
            .map(|a| format!("{:?}={:?}", a.key(), a.value()))
            .collect();
        attrs.sort();
        let mut tag_list: Vec<String> = tags
            .tag_descriptions()
            .iter()
            .flat_map(|d| {
                d.tags()
                    .iter()
                    .map(|t| format!("{:?}={:?}", t.key(), t.value()))
            })
            .collect();
        tag_list.sort();
        let mut targets: Vec<String> = health
            .target_health_descriptions()
            .iter()
            .map(|d| format!("{d:?}"))
            .collect();
        targets.sort();
        format!("group: {tg:?}\nattributes: {attrs:?}\ntags: {tag_list:?}\ntargets: {targets:?}")
    }

    /// A full describe of a security group (rules, tags, VPC), for before/after comparisons.
    pub async fn snapshot_security_group(&self, id: &str) -> String {
        let out = self
            .ec2
            .describe_security_groups()
            .group_ids(id)
            .send()
            .await
            .expect("describe security group");
        format!("{:?}", out.security_groups())
    }

    /// A full describe of a subnet (tags, VPC, zone), for before/after comparisons.
    pub async fn snapshot_subnet(&self, id: &str) -> String {
        let out = self
            .ec2
            .describe_subnets()
            .subnet_ids(id)
            .send()
            .await
            .expect("describe subnet");
        format!("{:?}", out.subnets())
    }

    /// A full describe of a load balancer: itself, attributes, tags and listeners.
    pub async fn snapshot_load_balancer(&self, arn: &str) -> String {
        let lb = self
            .elb
            .describe_load_balancers()
            .load_balancer_arns(arn)
            .send()
            .await
            .expect("describe load balancer");
        let attributes = self
            .elb
            .describe_load_balancer_attributes()
            .load_balancer_arn(arn)
            .send()
            .await
            .expect("attributes");
        let tags = self
            .elb
            .describe_tags()
            .resource_arns(arn)
            .send()
            .await
            .expect("tags");
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}",
            lb.load_balancers(),
            attributes.attributes(),
            tags.tag_descriptions(),
            self.listeners(arn).await
        )
    }

    /// Security groups tagged with this test's cluster: (id, ingress as (protocol, port, cidr)),
    /// IPv4 (`IpRanges`) and IPv6 (`Ipv6Ranges`) CIDRs alike.
    pub async fn security_groups(&self) -> Vec<(String, BTreeSet<(String, i32, String)>)> {
        let f = Filter::builder()
            .name("tag:cloudlb.io/cluster")
            .values(&self.cluster)
            .build();
        let out = self
            .ec2
            .describe_security_groups()
            .filters(f)
            .send()
            .await
            .expect("security groups");
        out.security_groups()
            .iter()
            .map(|g| {
                let rules = g
                    .ip_permissions()
                    .iter()
                    .flat_map(|p| {
                        let v4 = p.ip_ranges().iter().filter_map(|r| r.cidr_ip());
                        let v6 = p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6());
                        v4.chain(v6).map(move |c| {
                            (
                                p.ip_protocol().unwrap_or_default().to_string(),
                                p.from_port().unwrap_or_default(),
                                c.to_string(),
                            )
                        })
                    })
                    .collect();
                (g.group_id().unwrap_or_default().to_string(), rules)
            })
            .collect()
    }

    pub async fn subnets_tagged(&self) -> usize {
        let f = Filter::builder()
            .name("vpc-id")
            .values(&self.vpc_id)
            .build();
        self.ec2
            .describe_subnets()
            .filters(f)
            .send()
            .await
            .expect("subnets")
            .subnets()
            .len()
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `cloudlb controller` as a child process for one test cloud.
pub struct ControllerProc {
    pub proc: Proc,
    pub metrics_port: u16,
}

impl ControllerProc {
    pub fn start(rig: &Rig, cloud: &TestCloud, extra: &[&str]) -> ControllerProc {
        Self::start_with_env(rig, cloud, extra, &[])
    }

    pub fn start_with_env(
        rig: &Rig,
        cloud: &TestCloud,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControllerProc {
        Self::start_class(rig, cloud, &cloud.class, extra, env)
    }

    /// A controller of `cloud`'s cluster serving another load balancer class (a second
    /// installation with the same cluster name).
    pub fn start_class(
        rig: &Rig,
        cloud: &TestCloud,
        class: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControllerProc {
        let metrics_port = free_port();
        let mut args: Vec<String> = [
            "controller",
            "--cluster-name",
            &cloud.cluster,
            "--load-balancer-class",
            class,
            "--node-selector",
            &format!("cloudlb.io/test-cluster={}", cloud.cluster),
            "--target-group-binding-selector",
            &format!("cloudlb.io/test-cluster={}", cloud.cluster),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--vpc-id",
            &cloud.vpc_id,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(rig, &cloud.cluster, &args, env, metrics_port)
    }

    /// `cloudlb` with exactly `args` (nothing added; they must serve /metrics on `metrics_port`),
    /// logging to `$TMPDIR/cloudlb-controller-<name>-<port>.log`; `env` overrides the rig's
    /// (and `RUST_LOG`, `info,cloudlb=debug` by default).
    pub fn spawn(
        rig: &Rig,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        metrics_port: u16,
    ) -> ControllerProc {
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("cloudlb-controller-{name}-{metrics_port}.log")),
        )
        .expect("log file");
        let mut cmd = Command::new(super::cloudlb_bin());
        cmd.args(args)
            .envs(rig.process_env())
            .env("RUST_LOG", "info,cloudlb=debug")
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let child = cmd.spawn().expect("start controller");
        ControllerProc {
            proc: Proc(child),
            metrics_port,
        }
    }

    /// The controller's /metrics text (empty while it is not up).
    pub fn metrics(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of an unlabelled metric (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .sum()
    }

    /// Sum of `cloudlb_aws_api_calls_total` over operations matching `pred`.
    pub fn aws_calls(&self, pred: impl Fn(&str) -> bool) -> f64 {
        aws_calls(&self.metrics(), pred)
    }

    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }
}

/// Sums `cloudlb_aws_api_calls_total{operation=...}` samples whose operation matches.
pub fn aws_calls(metrics: &str, pred: impl Fn(&str) -> bool) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("cloudlb_aws_api_calls_total{"))
        .filter_map(|l| {
            let op = l.split("operation=\"").nth(1)?.split('"').next()?;
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            pred(op).then_some(v)
        })
        .sum()
}

/// Whether an ELBv2/EC2 operation writes.
pub fn is_write(op: &str) -> bool {
    !op.starts_with("Describe")
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
