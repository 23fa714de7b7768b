//! NLB data-plane emulator for the rig (issue 8). LocalStack records load balancers, listeners
//! and targets but carries no traffic; this polls its ELBv2 and EC2 state and, for every network
//! load balancer, serves each listener on an address of its own in a rig network namespace,
//! spreading TCP connections and UDP flows over the target group's healthy targets as AWS
//! documents NLBs:
//!
//! - health checks from the target group's settings: TCP connect, or HTTP GET on the port and
//!   path with the success codes; interval, timeout, healthy and unhealthy thresholds. A new
//!   target gets traffic after its first passing check ("initial" → "healthy").
//! - no healthy target at all: fail open to every registered target (AWS's documented fail-open).
//! - a deregistered target gets no new flows; established flows go on ("draining") for
//!   `deregistration_delay.timeout_seconds`, after which they are closed only when
//!   `deregistration_delay.connection_termination.enabled` is true (AWS's default: false).
//! - a target turning unhealthy has its established connections reset, as AWS does by default
//!   (`target_health_state.unhealthy.connection_termination.enabled`, default true); when that is
//!   false they continue, and are reset after `target_health_state.unhealthy.draining_interval_seconds`.
//! - `proxy_protocol_v2.enabled`: each TCP connection to a target starts with a PPv2 header
//!   carrying the client's and the listener's addresses.
//!
//! Every duration from the cloud (intervals, timeouts, delays) is multiplied by `time_scale`, so
//! tests run in seconds. Instance targets resolve to the instance's private IP (DescribeInstances),
//! ip targets are used as they are. Health transitions are logged and kept for tests; the DNS
//! name → address map is a method and, optionally, a file (`NAME ADDRESS` lines) for the demo.
//! Test rig only: never part of the product binary.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::netns::NetnsSockets;

mod flows;
mod health;
mod poll;

pub use flows::proxy_protocol_v2_header;
use flows::*;
pub use health::success_code_matches;
use health::*;
use poll::*;

/// What the emulator serves and how fast its clock runs.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// The `dev/netns` name of the namespace the load balancers' addresses live in (`clb-NAME`).
    pub netns: String,
    /// Only load balancers tagged `cloudlb.io/cluster=<this>`; `None` serves every one.
    pub cluster: Option<String>,
    /// Multiplies every cloud duration (health-check interval and timeout, delays).
    pub time_scale: f64,
    /// How often LocalStack is read.
    pub poll_interval: Duration,
    /// Where to write the `DNS-NAME ADDRESS` map after each change.
    pub map_file: Option<PathBuf>,
    /// How long a newly registered target waits for its first health check, staying `initial`
    /// (AWS takes a while to register a target; unscaled). Zero by default.
    pub registration_delay: Duration,
}

impl EmulatorConfig {
    pub fn new(netns: &str) -> EmulatorConfig {
        EmulatorConfig {
            netns: netns.to_string(),
            cluster: None,
            time_scale: 0.05,
            poll_interval: Duration::from_millis(300),
            map_file: None,
            registration_delay: Duration::ZERO,
        }
    }
}

/// A target's health as the emulated NLB sees it (DescribeTargetHealth's states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Initial,
    Healthy,
    Unhealthy,
    /// Failed its checks; established connections continue for the unhealthy draining interval.
    UnhealthyDraining,
    /// Deregistered; established flows continue for the deregistration delay.
    Draining,
    /// Gone (after draining).
    Unused,
}

/// One logged health transition.
#[derive(Clone, Debug)]
pub struct Transition {
    pub at: Instant,
    pub target_group: String,
    pub target: SocketAddr,
    pub from: Health,
    pub to: Health,
}

/// Counters over the emulator's whole life.
#[derive(Debug, Default)]
pub struct Counters {
    pub tcp_connections: AtomicU64,
    pub udp_flows: AtomicU64,
    /// Client connections refused because no target could take them.
    pub no_target: AtomicU64,
    /// Client connections reset because the target refused or failed to connect.
    pub target_connect_failures: AtomicU64,
    /// Established connections the emulator reset (unhealthy or deregistered with termination).
    pub terminated: AtomicU64,
}

/// The running emulator; stops (and removes its addresses) when dropped.
pub struct Emulator {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Shared {
    config: EmulatorConfig,
    sockets: NetnsSockets,
    elb: elbv2::Client,
    ec2: aws_sdk_ec2::Client,
    state: Mutex<State>,
    transitions: Mutex<Vec<Transition>>,
    counters: Counters,
    /// The last account-wide listing: when, and the load balancers served.
    listing: Mutex<Option<(Instant, Vec<LbName>)>>,
}

#[derive(Default)]
struct State {
    load_balancers: BTreeMap<String, LbRuntime>,
    target_groups: HashMap<String, Arc<TgRuntime>>,
    /// load balancer ARN → owned (per the cluster filter)
    ownership: HashMap<String, bool>,
    instance_ips: HashMap<String, Ipv4Addr>,
}

struct LbRuntime {
    dns_name: String,
    address: Ipv4Addr,
    /// (port, protocol) → listener
    listeners: BTreeMap<(i32, String), ListenerRuntime>,
}

struct ListenerRuntime {
    target_group: Arc<Mutex<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ListenerRuntime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Target-group settings read from the cloud.
#[derive(Clone, Debug, PartialEq)]
struct TgSettings {
    arn: String,
    name: String,
    hc_protocol: String,
    hc_port: String,
    hc_path: String,
    hc_interval: Duration,
    hc_timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    success_codes: String,
    deregistration_delay: Duration,
    deregistration_termination: bool,
    unhealthy_termination: bool,
    unhealthy_draining: Duration,
    proxy_protocol_v2: bool,
}

struct TgRuntime {
    settings: Mutex<TgSettings>,
    /// (target id, port) → target
    targets: Mutex<BTreeMap<(String, i32), Arc<TargetRuntime>>>,
}

struct TargetRuntime {
    addr: SocketAddr,
    state: Mutex<TargetState>,
    /// Cancelled to reset every established flow to this target; replaced afterwards.
    kill: Mutex<CancellationToken>,
    checker: Mutex<Option<JoinHandle<()>>>,
    active: AtomicUsize,
    flows: AtomicU64,
}

struct TargetState {
    health: Health,
    /// The health before deregistration (restored when registered again while draining).
    before_draining: Health,
    successes: u32,
    failures: u32,
    /// Bumped on each drain start, so a stale drain timer does nothing.
    drain_epoch: u64,
}

impl Drop for TargetRuntime {
    fn drop(&mut self) {
        if let Some(t) = self.checker.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl TargetRuntime {
    fn health(&self) -> Health {
        self.state.lock().unwrap().health
    }

    fn terminate_flows(&self) -> usize {
        let mut kill = self.kill.lock().unwrap();
        kill.cancel();
        *kill = CancellationToken::new();
        self.active.load(Ordering::Relaxed)
    }
}

/// One target as the tests see it.
#[derive(Clone, Debug)]
pub struct TargetView {
    pub id: String,
    pub addr: SocketAddr,
    pub health: Health,
    pub active: usize,
    pub flows: u64,
}

impl Emulator {
    /// Starts polling LocalStack (through `aws`) and serving what it finds.
    pub async fn start(aws: &aws_config::SdkConfig, config: EmulatorConfig) -> Emulator {
        let sockets = NetnsSockets::enter(&format!("clb-{}", config.netns))
            .unwrap_or_else(|e| panic!("enter netns clb-{}: {e}", config.netns));
        let shared = Arc::new(Shared {
            sockets,
            elb: elbv2::Client::new(aws),
            ec2: aws_sdk_ec2::Client::new(aws),
            config,
            state: Mutex::new(State::default()),
            transitions: Mutex::new(Vec::new()),
            counters: Counters::default(),
            listing: Mutex::new(None),
        });
        write_map(&shared); // empty until the first load balancer appears
        let cancel = CancellationToken::new();
        let task = tokio::spawn(poll_loop(shared.clone(), cancel.clone()));
        Emulator {
            shared,
            cancel,
            task,
        }
    }

    /// The address serving `dns_name`, once the emulator has picked the load balancer up.
    pub fn address(&self, dns_name: &str) -> Option<Ipv4Addr> {
        let st = self.shared.state.lock().unwrap();
        st.load_balancers
            .values()
            .find(|lb| lb.dns_name == dns_name)
            .map(|lb| lb.address)
    }

    /// Waits up to `timeout` for `dns_name` to get an address.
    pub async fn resolve(&self, dns_name: &str, timeout: Duration) -> Ipv4Addr {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.address(dns_name) {
                return a;
            }
            assert!(Instant::now() < deadline, "{dns_name} got no address");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `DNS-NAME → address` for every load balancer served.
    pub fn dns_map(&self) -> BTreeMap<String, Ipv4Addr> {
        let st = self.shared.state.lock().unwrap();
        st.load_balancers
            .values()
            .map(|lb| (lb.dns_name.clone(), lb.address))
            .collect()
    }

    /// The targets of the target group behind `dns_name`'s listener on `port`.
    pub fn targets(&self, dns_name: &str, port: i32) -> Vec<TargetView> {
        let st = self.shared.state.lock().unwrap();
        let Some(lb) = st
            .load_balancers
            .values()
            .find(|lb| lb.dns_name == dns_name)
        else {
            return Vec::new();
        };
        let Some(l) = lb.listeners.iter().find(|((p, _), _)| *p == port) else {
            return Vec::new();
        };
        let tg_arn = l.1.target_group.lock().unwrap().clone();
        let Some(tg) = st.target_groups.get(&tg_arn) else {
            return Vec::new();
        };
        tg.targets
            .lock()
            .unwrap()
            .iter()
            .map(|((id, _), t)| TargetView {
                id: id.clone(),
                addr: t.addr,
                health: t.health(),
                active: t.active.load(Ordering::Relaxed),
                flows: t.flows.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// A handle on the emulator's target health, for the rig's AWS endpoint
    /// ([`crate::health_endpoint`]) to answer `DescribeTargetHealth` from.
    pub fn health_view(&self) -> HealthView {
        HealthView(self.shared.clone())
    }

    /// Every health transition so far.
    pub fn transitions(&self) -> Vec<Transition> {
        self.shared.transitions.lock().unwrap().clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Stops serving; the load balancers' addresses are removed.
    pub fn stop(&self) {
        self.cancel.cancel();
        let mut st = self.shared.state.lock().unwrap();
        let lbs = std::mem::take(&mut st.load_balancers);
        st.target_groups.clear();
        drop(st);
        for lb in lbs.values() {
            release_address(&self.shared.config.netns, lb.address);
        }
    }
}

/// Read-only view of the emulated NLB's target health (cheap to clone).
#[derive(Clone)]
pub struct HealthView(Arc<Shared>);

impl HealthView {
    /// `(target id, port) → health` of every target the emulator tracks in the group, draining
    /// ones included; `None` when it does not serve the group (yet).
    pub fn target_group(&self, arn: &str) -> Option<BTreeMap<(String, i32), Health>> {
        let tg = self.0.state.lock().unwrap().target_groups.get(arn)?.clone();
        let targets = tg.targets.lock().unwrap();
        Some(
            targets
                .iter()
                .map(|(k, t)| (k.clone(), t.health()))
                .collect(),
        )
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
        self.task.abort();
    }
}
