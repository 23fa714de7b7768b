//! An in-memory [`Cloud`] for unit tests: it holds load balancers, target groups and security
//! groups as the plan's changes leave them, records every call in a [`Journal`] shared with
//! the fake Kubernetes writes, and can be told to fail the next deploys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::plan::{
    Change, LoadBalancerRef, ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup,
    ObservedStack, ObservedTargetGroup, SecurityGroupRef, TargetGroupRef,
};
use super::{BoundTargetGroup, Cloud, CloudError, Deployed, Plan, StackQuery, TaggedResource};
use crate::model::{Target, tags};

/// Calls in the order they happened, as short text (`cloud:observe ns/s`, `kube:event …`).
#[derive(Clone, Debug, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    /// Appends one entry.
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().expect("journal lock").push(entry.into());
    }

    /// Every entry so far.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().expect("journal lock").clone()
    }

    /// Entries starting with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries()
            .into_iter()
            .filter(|e| e.starts_with(prefix))
            .collect()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.0.lock().expect("journal lock").clear();
    }
}

#[derive(Default)]
struct State {
    load_balancers: BTreeMap<String, ObservedLoadBalancer>,
    target_groups: BTreeMap<String, ObservedTargetGroup>,
    security_groups: BTreeMap<String, ObservedSecurityGroup>,
    /// Deploys still to fail, with the error's message.
    failures: Vec<String>,
    next_id: u64,
}

/// The in-memory cloud.
#[derive(Default)]
pub struct FakeCloud {
    state: Mutex<State>,
    /// Every call, shared with the fake Kubernetes writes.
    pub journal: Journal,
}

fn owned_by(t: &BTreeMap<String, String>, service: &str) -> bool {
    t.get(tags::SERVICE).map(String::as_str) == Some(service)
}

impl FakeCloud {
    /// A fake recording into `journal`.
    pub fn new(journal: Journal) -> FakeCloud {
        FakeCloud {
            state: Mutex::default(),
            journal,
        }
    }

    /// The next `n` deploys fail with a Rejected error before changing anything.
    pub fn fail_next_deploys(&self, n: usize) {
        let mut s = self.state.lock().expect("fake lock");
        s.failures
            .extend((0..n).map(|i| format!("injected failure {}", i + 1)));
    }

    /// Removes the load balancers (and their security groups) of Service `namespace/name` but
    /// keeps its target groups: what a teardown leaves when DeleteTargetGroup stays
    /// ResourceInUse past its retries.
    pub fn leave_only_target_groups_of(&self, service: &str) {
        let mut s = self.state.lock().expect("fake lock");
        s.load_balancers.retain(|_, l| !owned_by(&l.tags, service));
        s.security_groups.retain(|_, g| !owned_by(&g.tags, service));
    }

    /// How many resources (load balancers, target groups, security groups) the fake holds
    /// for Service `namespace/name`.
    pub fn resources_of(&self, service: &str) -> usize {
        let s = self.state.lock().expect("fake lock");
        s.load_balancers
            .values()
            .filter(|l| owned_by(&l.tags, service))
            .count()
            + s.target_groups
                .values()
                .filter(|t| owned_by(&t.tags, service))
                .count()
            + s.security_groups
                .values()
                .filter(|g| owned_by(&g.tags, service))
                .count()
    }

    /// Target ids registered in the target groups tagged for `service`, sorted.
    pub fn targets_of(&self, service: &str) -> Vec<String> {
        let s = self.state.lock().expect("fake lock");
        let mut ids: Vec<String> = s
            .target_groups
            .values()
            .filter(|t| owned_by(&t.tags, service))
            .flat_map(|t| t.targets.iter().map(|x| x.id.clone()))
            .collect();
        ids.sort();
        ids
    }

    /// Deletes every target group (as if someone removed them by hand).
    pub fn delete_target_groups(&self) {
        self.state.lock().expect("fake lock").target_groups.clear();
    }

    fn observe_now(&self, q: &StackQuery) -> ObservedStack {
        let s = self.state.lock().expect("fake lock");
        let load_balancer = q.load_balancer_names.iter().find_map(|n| {
            s.load_balancers
                .values()
                .find(|l| &l.name == n && owned_by(&l.tags, &q.service))
                .cloned()
        });
        let attached: BTreeSet<&str> = load_balancer
            .iter()
            .flat_map(|l| l.listeners.iter())
            .filter_map(|l| l.target_group_arn.as_deref())
            .collect();
        let target_groups = s
            .target_groups
            .values()
            .filter(|t| owned_by(&t.tags, &q.service))
            .filter(|t| {
                attached.contains(t.arn.as_str())
                    || q.target_group_names.contains(&t.name)
                    || (load_balancer.is_none()
                        && q.target_groups_by_tag
                            .as_ref()
                            .is_some_and(|p| t.name.starts_with(p.as_str())))
            })
            // The fake's targets pass their checks at once.
            .map(|t| ObservedTargetGroup {
                healthy: t.targets.len(),
                ..t.clone()
            })
            .collect();
        let security_group = s
            .security_groups
            .values()
            .find(|g| q.load_balancer_names.contains(&g.name) && owned_by(&g.tags, &q.service))
            .cloned();
        ObservedStack {
            load_balancer,
            target_groups,
            security_group,
            duplicate_load_balancers: Vec::new(),
        }
    }

    fn apply(&self, plan: &Plan) -> Result<Deployed, CloudError> {
        let mut s = self.state.lock().expect("fake lock");
        if !s.failures.is_empty() {
            let message = s.failures.remove(0);
            return Err(CloudError::Rejected {
                operation: "Deploy",
                code: "InjectedFailure".into(),
                message,
            });
        }
        let mut lb_arn = plan.observed.load_balancer.as_ref().map(|l| l.arn.clone());
        let mut sg_id = plan.observed.security_group.as_ref().map(|g| g.id.clone());
        let tg_arn = |s: &State, r: &TargetGroupRef| -> Result<String, CloudError> {
            match r {
                TargetGroupRef::Arn(a) => Ok(a.clone()),
                TargetGroupRef::Planned(n) => s
                    .target_groups
                    .values()
                    .find(|t| &t.name == n)
                    .map(|t| t.arn.clone())
                    .ok_or_else(|| CloudError::Internal(format!("target group {n} not created"))),
            }
        };
        let internal = |m: &str| CloudError::Internal(m.to_string());
        for c in &plan.changes {
            s.next_id += 1;
            let id = s.next_id;
            match c {
                Change::CreateTargetGroup(tg) => {
                    let arn = format!("arn:fake:targetgroup/{}/{id}", tg.name);
                    s.target_groups.insert(
                        arn.clone(),
                        ObservedTargetGroup {
                            arn,
                            name: tg.name.clone(),
                            protocol: Some(tg.protocol),
                            port: tg.port,
                            health_check: tg.health_check.clone(),
                            attributes: tg.attributes.clone(),
                            tags: tg.tags.clone(),
                            targets: BTreeSet::new(),
                            healthy: 0,
                        },
                    );
                }
                Change::ModifyTargetGroupHealthCheck {
                    target_group,
                    health_check,
                } => {
                    let arn = tg_arn(&s, target_group)?;
                    if let Some(t) = s.target_groups.get_mut(&arn) {
                        t.health_check = health_check.clone();
                    }
                }
                Change::ModifyTargetGroupAttributes {
                    target_group,
                    attributes,
                } => {
                    let arn = tg_arn(&s, target_group)?;
                    if let Some(t) = s.target_groups.get_mut(&arn) {
                        t.attributes.extend(attributes.clone());
                    }
                }
                Change::RegisterTargets {
                    target_group,
                    targets,
                } => {
                    let arn = tg_arn(&s, target_group)?;
                    if let Some(t) = s.target_groups.get_mut(&arn) {
                        t.targets.extend(targets.iter().cloned());
                    }
                }
                Change::DeregisterTargets {
                    target_group,
                    targets,
                } => {
                    if let Some(t) = s.target_groups.get_mut(target_group) {
                        for x in targets {
                            t.targets.remove(x);
                        }
                    }
                }
                Change::CreateLoadBalancer(d) => {
                    let arn = format!("arn:fake:loadbalancer/{}/{id}", d.name);
                    let groups = match (&d.security_groups, &sg_id) {
                        (Some(ids), _) => ids.clone(),
                        (None, Some(id)) => vec![id.clone()],
                        (None, None) => return Err(internal("security group not created")),
                    };
                    s.load_balancers.insert(
                        arn.clone(),
                        ObservedLoadBalancer {
                            arn: arn.clone(),
                            name: d.name.clone(),
                            dns_name: format!("{}-{id}.fake.elb.example", d.name),
                            scheme: Some(d.scheme),
                            ip_address_type: Some(d.ip_address_type),
                            attributes: BTreeMap::new(),
                            tags: d.tags.clone(),
                            listeners: Vec::new(),
                            security_groups: groups,
                        },
                    );
                    lb_arn = Some(arn);
                }
                Change::SetIpAddressType {
                    load_balancer,
                    ip_address_type,
                } => {
                    if let Some(l) = s.load_balancers.get_mut(load_balancer) {
                        l.ip_address_type = Some(*ip_address_type);
                    }
                }
                Change::ModifyLoadBalancerAttributes {
                    load_balancer,
                    attributes,
                } => {
                    let arn = match load_balancer {
                        LoadBalancerRef::Arn(a) => a.clone(),
                        LoadBalancerRef::Planned => {
                            lb_arn.clone().ok_or_else(|| internal("no load balancer"))?
                        }
                    };
                    if let Some(l) = s.load_balancers.get_mut(&arn) {
                        l.attributes.extend(attributes.clone());
                    }
                }
                Change::AddTags { arn, tags } => {
                    if let Some(l) = s.load_balancers.get_mut(arn) {
                        l.tags.extend(tags.clone());
                    } else if let Some(t) = s.target_groups.get_mut(arn) {
                        t.tags.extend(tags.clone());
                    }
                }
                Change::RemoveTags { arn, keys } => {
                    let tags = match s.load_balancers.get_mut(arn) {
                        Some(l) => Some(&mut l.tags),
                        None => s.target_groups.get_mut(arn).map(|t| &mut t.tags),
                    };
                    if let Some(tags) = tags {
                        tags.retain(|k, _| !keys.contains(k));
                    }
                }
                Change::CreateListener {
                    load_balancer,
                    listener,
                } => {
                    let arn = match load_balancer {
                        LoadBalancerRef::Arn(a) => a.clone(),
                        LoadBalancerRef::Planned => {
                            lb_arn.clone().ok_or_else(|| internal("no load balancer"))?
                        }
                    };
                    let tg = tg_arn(&s, &TargetGroupRef::Planned(listener.target_group.clone()))?;
                    let l = s
                        .load_balancers
                        .get_mut(&arn)
                        .ok_or_else(|| internal("load balancer gone"))?;
                    l.listeners.push(ObservedListener {
                        arn: format!("arn:fake:listener/{id}"),
                        port: listener.port,
                        protocol: Some(listener.protocol),
                        target_group_arn: Some(tg),
                        certificates: listener.certificates.clone(),
                    });
                }
                Change::ModifyListener { arn, listener } => {
                    let tg = tg_arn(&s, &TargetGroupRef::Planned(listener.target_group.clone()))?;
                    for l in s.load_balancers.values_mut() {
                        for o in l.listeners.iter_mut().filter(|o| &o.arn == arn) {
                            o.port = listener.port;
                            o.protocol = Some(listener.protocol);
                            o.target_group_arn = Some(tg.clone());
                            o.certificates = listener.certificates.clone();
                        }
                    }
                }
                Change::DeleteListener { arn, .. } => {
                    for l in s.load_balancers.values_mut() {
                        l.listeners.retain(|o| &o.arn != arn);
                    }
                }
                Change::DeleteLoadBalancer { arn, .. } => {
                    s.load_balancers.remove(arn);
                    if lb_arn.as_deref() == Some(arn) {
                        lb_arn = None;
                    }
                }
                Change::DeleteTargetGroup { arn, .. } => {
                    s.target_groups.remove(arn);
                }
                Change::CreateSecurityGroup(sg) => {
                    let gid = format!("sg-fake{id}");
                    s.security_groups.insert(
                        gid.clone(),
                        ObservedSecurityGroup {
                            id: gid.clone(),
                            name: sg.name.clone(),
                            ingress: sg.ingress.clone(),
                            tags: sg.tags.clone(),
                        },
                    );
                    sg_id = Some(gid);
                }
                Change::AuthorizeIngress { group, rules } => {
                    let gid = match group {
                        SecurityGroupRef::Id(g) => g.clone(),
                        SecurityGroupRef::Planned => {
                            sg_id.clone().ok_or_else(|| internal("no security group"))?
                        }
                    };
                    if let Some(g) = s.security_groups.get_mut(&gid) {
                        g.ingress.extend(rules.iter().cloned());
                    }
                }
                Change::RevokeIngress { group, rules } => {
                    if let Some(g) = s.security_groups.get_mut(group) {
                        for r in rules {
                            g.ingress.remove(r);
                        }
                    }
                }
                Change::SetSecurityGroups {
                    load_balancer,
                    explicit,
                } => {
                    let groups = match (explicit, &sg_id) {
                        (Some(ids), _) => ids.clone(),
                        (None, Some(id)) => vec![id.clone()],
                        (None, None) => return Err(internal("no security group")),
                    };
                    if let Some(l) = s.load_balancers.get_mut(load_balancer) {
                        l.security_groups = groups;
                    }
                }
                Change::DeleteSecurityGroup { id, .. } => {
                    s.security_groups.remove(id);
                    if sg_id.as_deref() == Some(id) {
                        sg_id = None;
                    }
                }
            }
        }
        Ok(Deployed {
            dns_name: lb_arn
                .and_then(|a| s.load_balancers.get(&a))
                .map(|l| l.dns_name.clone()),
            target_group_arns: s
                .target_groups
                .values()
                .map(|t| (t.name.clone(), t.arn.clone()))
                .collect(),
        })
    }
}

impl Cloud for FakeCloud {
    fn observe<'a>(
        &'a self,
        q: &'a StackQuery,
    ) -> BoxFuture<'a, Result<ObservedStack, CloudError>> {
        self.journal.push(format!("cloud:observe {}", q.service));
        let stack = self.observe_now(q);
        Box::pin(async move { Ok(stack) })
    }

    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<Deployed, CloudError>> {
        for c in &plan.changes {
            self.journal.push(format!("cloud:deploy {c}"));
        }
        let res = self.apply(plan);
        Box::pin(async move { res })
    }

    fn target_group<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BoundTargetGroup>, CloudError>> {
        self.journal.push(format!("cloud:target-group {arn}"));
        Box::pin(async move { Ok(None) })
    }

    fn active_targets<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeSet<Target>>, CloudError>> {
        self.journal.push(format!("cloud:active-targets {arn}"));
        Box::pin(async move { Ok(None) })
    }

    fn target_health<'a>(
        &'a self,
        arn: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<crate::cloud::TargetHealth>>, CloudError>> {
        self.journal.push(format!("cloud:target-health {arn}"));
        let s = self.state.lock().expect("fake lock");
        let out = s.target_groups.get(arn).map(|tg| {
            tg.targets
                .iter()
                .map(|t| crate::cloud::TargetHealth {
                    target: t.clone(),
                    state: "healthy".into(),
                    reason: None,
                })
                .collect()
        });
        Box::pin(async move { Ok(out) })
    }

    fn register_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        self.journal.push(format!("cloud:register {arn}"));
        let mut s = self.state.lock().expect("fake lock");
        let res = match s.target_groups.get_mut(arn) {
            Some(tg) => {
                tg.targets.extend(targets.iter().cloned());
                Ok(())
            }
            None => Err(CloudError::Rejected {
                operation: "RegisterTargets",
                code: "TargetGroupNotFound".into(),
                message: format!("{arn} not found"),
            }),
        };
        Box::pin(async move { res })
    }

    fn deregister_targets<'a>(
        &'a self,
        arn: &'a str,
        targets: &'a [Target],
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        self.journal.push(format!("cloud:deregister {arn}"));
        let mut s = self.state.lock().expect("fake lock");
        if let Some(tg) = s.target_groups.get_mut(arn) {
            for t in targets {
                tg.targets.remove(t);
            }
        }
        Box::pin(async move { Ok(()) })
    }

    fn cluster_vpc<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<String, CloudError>> {
        Box::pin(async { Ok("vpc-fake".to_string()) })
    }

    fn vet<'a>(
        &'a self,
        _: &'a crate::model::DesiredLoadBalancer,
        _: &'a super::TagVetting,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async { Ok(()) })
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Vec<TaggedResource>, CloudError>> {
        self.journal.push("cloud:inventory");
        Box::pin(async move { Ok(Vec::new()) })
    }

    fn delete_resource<'a>(
        &'a self,
        resource: &'a TaggedResource,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        self.journal.push(format!("cloud:delete {}", resource.arn));
        Box::pin(async move { Ok(()) })
    }
}
