//! Pod readiness gates for ip targets (LBC's contract with cloudlb's names): pods declaring
//! `target-health.cloudlb.io/<service>` get that condition `True` once their target is healthy
//! in every target group of the Service, `False` with the target's state as reason before.
//!
//! One task watches the pods that declare a gate, tells the Service reconcile which of them wait
//! only on their gates (they are registered although not Ready, see [`gate::with_gated_ready`]),
//! and follows target health: a group is polled (`DescribeTargetHealth`) at its health-check
//! interval while a target is `initial` or draining or a gated pod's condition is not settled,
//! never while everything is steady, and all polls share one calls-per-second bound.

pub mod gate;
pub mod schedule;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Context;
use super::service::RegisteredGroup;
use crate::cloud::TargetHealth;
use crate::crd::{TargetGroupBinding, TargetType};
use crate::model::Target;
use gate::{GateOwner, GateStatus};
use schedule::{GroupClock, RateBound};

/// Settings of the readiness-gate tracker.
#[derive(Clone, Debug, clap::Args)]
pub struct ReadinessArgs {
    /// Bound on DescribeTargetHealth calls per second across all target groups followed for
    /// pod readiness gates.
    #[arg(long, env = "CLOUDLB_TARGET_HEALTH_QPS", default_value_t = 5.0)]
    pub target_health_qps: f64,
    /// Multiplies every health-check interval the tracker polls at (test rigs whose NLB runs
    /// a faster clock; 1 in production).
    #[arg(
        long,
        env = "CLOUDLB_TARGET_HEALTH_INTERVAL_SCALE",
        default_value_t = 1.0
    )]
    pub target_health_interval_scale: f64,
}

/// Pods (namespace, name) that wait only on their readiness gates: shared with the Service
/// reconcile, which registers them although their endpoints are not ready.
#[derive(Default)]
pub struct Waiting(Mutex<HashSet<(String, String)>>);

impl Waiting {
    /// A copy of the set.
    pub fn snapshot(&self) -> HashSet<(String, String)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the set; returns the pods that entered or left it.
    fn replace(&self, now: HashSet<(String, String)>) -> Vec<(String, String)> {
        let mut cur = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = cur.symmetric_difference(&now).cloned().collect();
        *cur = now;
        changed
    }
}

/// Keeps of a pod only what the gates need (the tracker holds gated pods only).
fn trim(pod: &Pod) -> Pod {
    let mut meta = pod.metadata.clone();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    Pod {
        metadata: meta,
        spec: pod.spec.as_ref().map(|s| PodSpec {
            readiness_gates: s.readiness_gates.clone(),
            ..Default::default()
        }),
        status: pod.status.as_ref().map(|s| PodStatus {
            conditions: s.conditions.clone(),
            pod_ip: s.pod_ip.clone(),
            ..Default::default()
        }),
    }
}

/// The tracker's state between ticks.
struct Tracker {
    ctx: Arc<Context>,
    client: Client,
    args: ReadinessArgs,
    pods: HashMap<(String, String), Pod>,
    /// Group ARN → its clock and last answer.
    groups: HashMap<String, GroupClock>,
    rate: RateBound,
    wake: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    /// Reaches the binding controller (a Service change wakes the bindings naming it).
    wake_bindings: futures::channel::mpsc::UnboundedSender<Service>,
}

/// The health-check interval assumed for a group bound by a TargetGroupBinding (not read from
/// the cloud): ELBv2's default.
const BOUND_GROUP_INTERVAL_SECONDS: i32 = 10;

/// How often the tracker looks at its state (in memory; calls only when a group is due).
const TICK: Duration = Duration::from_millis(100);

/// Where the tracker wakes the reconciles that register gated pods.
pub struct Wakes {
    pub services: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    pub bindings: futures::channel::mpsc::UnboundedSender<Service>,
}

/// Runs the tracker until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    client: Client,
    args: ReadinessArgs,
    wakes: Wakes,
    shutdown: CancellationToken,
) {
    let rate = RateBound::new(args.target_health_qps);
    let mut t = Tracker {
        ctx,
        client: client.clone(),
        args,
        pods: HashMap::new(),
        groups: HashMap::new(),
        rate,
        wake: wakes.services,
        wake_bindings: wakes.bindings,
    };
    let mut events = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.next() => match ev {
                Some(Ok(ev)) => t.on_event(ev),
                Some(Err(e)) => debug!(error = %e, "pod watch"),
                None => return,
            },
            _ = tick.tick() => t.tick().await,
        }
    }
}

impl Tracker {
    fn on_event(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let key = (p.namespace().unwrap_or_default(), p.name_any());
                if gate::gates(&p).is_empty() {
                    self.pods.remove(&key);
                } else {
                    self.pods.insert(key, trim(&p));
                }
            }
            watcher::Event::Delete(p) => {
                self.pods
                    .remove(&(p.namespace().unwrap_or_default(), p.name_any()));
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    async fn tick(&mut self) {
        let waiting: HashSet<(String, String)> = self
            .pods
            .iter()
            .filter(|(_, p)| gate::ready_but_for_gates(p))
            .map(|(k, _)| k.clone())
            .collect();
        for (ns, name) in self.ctx.gated.replace(waiting) {
            let owners = self
                .pods
                .get(&(ns.clone(), name))
                .map(gate::gates)
                .unwrap_or_default();
            for (_, owner) in owners {
                self.wake_owner(&ns, &owner);
            }
        }
        if !self.ctx.is_leader() || !self.ctx.stores_synced() {
            return;
        }
        // Gated pods per owner (Service or TargetGroupBinding).
        let mut by_owner: BTreeMap<(String, GateOwner), Vec<(String, Pod)>> = BTreeMap::new();
        for ((ns, _), p) in &self.pods {
            for (type_, owner) in gate::gates(p) {
                by_owner
                    .entry((ns.clone(), owner))
                    .or_default()
                    .push((type_, p.clone()));
            }
        }
        let mut live = HashSet::new();
        for ((ns, owner), pods) in by_owner {
            if let Some((synced_at, groups)) = self.groups_of(&ns, &owner) {
                live.extend(groups.values().map(|g| g.arn.clone()));
                self.follow(&ns, synced_at, groups, &pods).await;
            }
        }
        self.groups.retain(|arn, _| live.contains(arn));
    }

    /// Wakes the reconcile that registers the owner's targets.
    fn wake_owner(&self, ns: &str, owner: &GateOwner) {
        match owner {
            GateOwner::Service(svc) => {
                let _ = self.wake.unbounded_send(ObjectRef::new(svc).within(ns));
            }
            GateOwner::Binding(name) => {
                let svc = self.binding(ns, name).and_then(|b| {
                    self.ctx
                        .services
                        .get(&ObjectRef::new(&b.spec.service_ref.name).within(ns))
                });
                if let Some(svc) = svc {
                    let _ = self.wake_bindings.unbounded_send((*svc).clone());
                }
            }
        }
    }

    fn binding(&self, ns: &str, name: &str) -> Option<Arc<TargetGroupBinding>> {
        self.ctx
            .bindings
            .store
            .get()?
            .get(&ObjectRef::new(name).within(ns))
    }

    /// The owner's target groups by name, and its last sync (a Service's; `None` for a binding):
    /// a Service's from the last sync, an ip binding's one group with the targets last seen in it.
    fn groups_of(
        &self,
        ns: &str,
        owner: &GateOwner,
    ) -> Option<(Option<Instant>, BTreeMap<String, RegisteredGroup>)> {
        match owner {
            GateOwner::Service(svc) => {
                let key = ObjectRef::<Service>::new(svc).within(ns);
                let applied = self.ctx.services_memory.applied.get(&key)?;
                Some((Some(applied.at), applied.target_groups))
            }
            GateOwner::Binding(name) => {
                let b = self.binding(ns, name)?;
                if b.spec.target_type != TargetType::Ip {
                    return None;
                }
                let arn = b.spec.target_group_arn.clone();
                let targets = self
                    .groups
                    .get(&arn)
                    .map(GroupClock::answered_targets)
                    .unwrap_or_default();
                let group = RegisteredGroup {
                    arn,
                    targets,
                    health_check_interval_seconds: BOUND_GROUP_INTERVAL_SECONDS,
                };
                Some((None, [(name.clone(), group)].into()))
            }
        }
    }

    /// Polls the owner's groups that are due, then writes every gate that changed.
    async fn follow(
        &mut self,
        ns: &str,
        synced_at: Option<Instant>,
        groups: BTreeMap<String, RegisteredGroup>,
        pods: &[(String, Pod)],
    ) {
        // What each gate would say now, from the last answers.
        let desired = |groups_health: &HashMap<String, GroupClock>| -> Vec<(usize, GateStatus)> {
            pods.iter()
                .enumerate()
                .filter_map(|(i, (_, p))| {
                    let ip = p.status.as_ref()?.pod_ip.clone()?;
                    let per_group: BTreeMap<String, Option<&TargetHealth>> = groups
                        .iter()
                        .map(|(name, g)| {
                            let h = g
                                .targets
                                .iter()
                                .find(|t| t.id == ip)
                                .and_then(|t| groups_health.get(&g.arn)?.health_of(t));
                            (name.clone(), h)
                        })
                        .collect();
                    let port = groups
                        .values()
                        .find_map(|g| g.targets.iter().find(|t| t.id == ip).map(|t| t.port))
                        .unwrap_or_default();
                    let target = Target { id: ip, port };
                    Some((i, gate::gate_status(&target, &per_group)))
                })
                .collect()
        };
        // Unsettled: a gate is not yet written, or still False (its target may pass any time).
        let unsettled = desired(&self.groups).iter().any(|(i, s)| {
            let (type_, pod) = &pods[*i];
            pod.metadata.deletion_timestamp.is_none() && (!s.ready || !s.is_set_on(pod, type_))
        });
        let now = Instant::now();
        for g in groups.values() {
            let interval = Duration::from_secs_f64(
                (g.health_check_interval_seconds.max(1) as f64
                    * self.args.target_health_interval_scale)
                    .max(0.05),
            );
            let clock = self.groups.entry(g.arn.clone()).or_default();
            if let Some(at) = synced_at {
                clock.note_sync(at);
            }
            if !clock.due(now, interval, unsettled, &g.targets) || !self.rate.take(now) {
                continue;
            }
            self.ctx.metrics.target_health_polls.inc();
            match self.ctx.cloud.target_health(&g.arn).await {
                Ok(Some(h)) => clock.record(now, h, &g.targets),
                Ok(None) => clock.record(now, Vec::new(), &g.targets),
                Err(e) => {
                    clock.failed(now);
                    warn!(target_group = %g.arn, error = %e, "DescribeTargetHealth failed");
                }
            }
        }
        for (i, status) in desired(&self.groups) {
            let (type_, pod) = &pods[i];
            // A terminating pod is deregistered on purpose; its gate no longer matters.
            if pod.metadata.deletion_timestamp.is_none() && !status.is_set_on(pod, type_) {
                self.write(ns, pod, type_, &status).await;
            }
        }
    }

    /// Patches the pod's gate condition (pods/status).
    async fn write(&mut self, ns: &str, pod: &Pod, type_: &str, status: &GateStatus) {
        let name = pod.name_any();
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": type_,
            "status": status.status(),
            "reason": status.reason,
            "message": status.message,
            "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now()),
        }]}});
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(p) => {
                self.ctx.metrics.readiness_gate_updates.inc();
                info!(pod = %format!("{ns}/{name}"), gate = %type_, status = status.status(),
                      reason = %status.reason, "readiness gate");
                // The watch brings the same; keep the store current so the next tick agrees.
                if !gate::gates(&p).is_empty() {
                    self.pods.insert((ns.to_string(), name), trim(&p));
                }
            }
            Err(e) => {
                warn!(pod = %format!("{ns}/{name}"), error = %e, "patching the readiness gate failed")
            }
        }
    }
}
