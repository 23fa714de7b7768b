//! Listener moves without a gap. When a Service port's target group is replaced (a new
//! nodePort, protocol or target type), the listener must not switch to the new group before
//! the group's targets have passed their health checks: an NLB sends nothing to `initial`
//! targets, so every connection in between would fail. ELBv2 health-checks only groups a
//! listener forwards to, so the new group is first put behind a *warm-up listener* of its own
//! (a spare port of the same load balancer, not opened by the managed security group); the
//! real listener moves once the group is ready, or when the wait is over, and the warm-up
//! listener and the old group go in the same deploy. Pure: the controller brings the clock.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Change, LoadBalancerRef, ObservedLoadBalancer, ObservedStack, ObservedTargetGroup};
use crate::model::{DesiredLoadBalancer, ListenerSpec, TargetGroupSpec};

/// A listener move the plan holds back until its new group can take the traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldMove {
    /// The Service's listener port.
    pub port: i32,
    /// The group the listener forwards to now, and the one it will forward to.
    pub from: String,
    pub to: String,
    /// The spare port whose listener health-checks `to` meanwhile.
    pub warm_up_port: i32,
    /// Healthy targets of `to` now, and how many it needs before the move.
    pub healthy: usize,
    pub needed: usize,
}

/// How long a move may wait for its new group: a few rounds of the group's health check
/// (`healthy_threshold` passing checks, plus two intervals of slack), within [30 s, 300 s].
pub fn wait_bound(tg: &TargetGroupSpec) -> Duration {
    let hc = &tg.health_check;
    let rounds = hc.healthy_threshold.max(1) as u64 + 2;
    let secs = rounds * hc.interval_seconds.max(1) as u64;
    Duration::from_secs(secs.clamp(30, 300))
}

/// Healthy targets the new group needs before the listener moves: as many as the old group
/// has healthy (capacity is not lost), at most every target it has, and at least one. `None`:
/// nothing to protect (the old group has no healthy target), move at once.
fn needed(old: Option<&ObservedTargetGroup>, new_registered: usize) -> Option<usize> {
    let old_healthy = old.map_or(0, |o| o.healthy);
    if old_healthy == 0 {
        return None;
    }
    Some(old_healthy.min(new_registered).max(1))
}

/// The spare port of the warm-up listener for the Service's listener on `port`: from 65535
/// down, skipping the Service's own ports, one per listener by its place among them (so it
/// stays put while other moves come and go).
pub fn warm_up_port(desired: &DesiredLoadBalancer, port: i32) -> Option<i32> {
    let used: BTreeSet<i32> = desired.listeners.iter().map(|l| l.port).collect();
    let rank = used.iter().position(|p| *p == port)?;
    (1..=65535).rev().filter(|p| !used.contains(p)).nth(rank)
}

/// Holds back, in `changes`, every listener move whose new group is not ready and whose wait
/// (`waited_out(new group name)`) is not over: the `ModifyListener` and the deletion of the
/// group the listener still forwards to are taken out, and a warm-up listener for the new
/// group is created (or its existing one kept). Returns the held moves; empty when nothing
/// waits (then the plan's deletion of any warm-up listener stands).
pub fn hold_listener_moves(
    changes: &mut Vec<Change>,
    desired: &DesiredLoadBalancer,
    observed: &ObservedStack,
    waited_out: impl Fn(&str) -> bool,
) -> Vec<HeldMove> {
    let Some(lb) = &observed.load_balancer else {
        return Vec::new();
    };
    let group_by_name = |name: &str| observed.target_groups.iter().find(|t| t.name == name);
    let mut held = Vec::new();
    let moves = listener_moves(changes, lb, observed);
    let mut dropped: BTreeSet<usize> = BTreeSet::new();
    let mut keep_ports: BTreeSet<i32> = BTreeSet::new();
    let mut warm_ups: Vec<(usize, Change)> = Vec::new();
    for (i, port, from_name) in moves {
        let Change::ModifyListener { listener, .. } = &changes[i] else {
            continue;
        };
        let to = group_by_name(&listener.target_group);
        let Some(spec) = desired
            .target_groups
            .iter()
            .find(|t| t.name == listener.target_group)
        else {
            continue;
        };
        let Some(warm_up_port) = warm_up_port(desired, port) else {
            continue;
        };
        let from = group_by_name(&from_name);
        let Some(need) = needed(from, spec.targets.len()) else {
            continue;
        };
        let healthy = to.map_or(0, |t| t.healthy);
        if healthy >= need || waited_out(&spec.name) {
            continue;
        }
        dropped.insert(i);
        for (j, c) in changes.iter().enumerate() {
            if let Change::DeleteTargetGroup { name, .. } = c {
                if *name == from_name {
                    dropped.insert(j);
                }
            }
        }
        keep_ports.insert(warm_up_port);
        if !lb.listeners.iter().any(|l| l.port == warm_up_port) {
            warm_ups.push((
                i,
                Change::CreateListener {
                    load_balancer: LoadBalancerRef::Arn(lb.arn.clone()),
                    listener: ListenerSpec {
                        port: warm_up_port,
                        protocol: spec.protocol,
                        target_group: spec.name.clone(),
                        certificates: Vec::new(),
                        tags: listener.tags.clone(),
                    },
                },
            ));
        }
        held.push(HeldMove {
            port,
            from: from_name,
            to: spec.name.clone(),
            warm_up_port,
            healthy,
            needed: need,
        });
    }
    for (j, c) in changes.iter().enumerate() {
        if let Change::DeleteListener { port, .. } = c {
            if keep_ports.contains(port) {
                dropped.insert(j);
            }
        }
    }
    splice(changes, &dropped, warm_ups);
    held
}

/// The plan's `ModifyListener`s that move a listener to another group: (index in `changes`,
/// listener port, name of the group it forwards to now).
fn listener_moves(
    changes: &[Change],
    lb: &ObservedLoadBalancer,
    observed: &ObservedStack,
) -> Vec<(usize, i32, String)> {
    let group_by_arn = |arn: &str| observed.target_groups.iter().find(|t| t.arn == arn);
    let mut moves = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let Change::ModifyListener { arn, listener } = c else {
            continue;
        };
        let Some(current) = lb.listeners.iter().find(|l| &l.arn == arn) else {
            continue;
        };
        let Some(from) = current.target_group_arn.as_deref().and_then(group_by_arn) else {
            continue;
        };
        if from.name == listener.target_group {
            continue; // Not a move: certificates or protocol of the same group.
        }
        moves.push((i, listener.port, from.name.clone()));
    }
    moves
}

/// `changes` without the `dropped` indices, each warm-up listener put before the change whose
/// index it carries.
fn splice(changes: &mut Vec<Change>, dropped: &BTreeSet<usize>, warm_ups: Vec<(usize, Change)>) {
    let mut out = Vec::with_capacity(changes.len() + warm_ups.len());
    for (i, c) in changes.drain(..).enumerate() {
        for (_, w) in warm_ups.iter().filter(|(at, _)| *at == i) {
            out.push(w.clone());
        }
        if !dropped.contains(&i) {
            out.push(c);
        }
    }
    *changes = out;
}

#[cfg(test)]
mod tests {
    use super::super::plan;
    use super::super::tests::{desired, observed_from};
    use super::*;

    fn kinds(cs: &[Change]) -> Vec<String> {
        cs.iter()
            .map(|c| format!("{} {}", c.kind(), port_of(c)))
            .collect()
    }

    fn port_of(c: &Change) -> String {
        match c {
            Change::CreateListener { listener, .. } | Change::ModifyListener { listener, .. } => {
                listener.port.to_string()
            }
            Change::DeleteListener { port, .. } => port.to_string(),
            _ => String::new(),
        }
    }

    /// The stack at nodePort 30080 on two nodes, the Service now at 30081: the plan's changes,
    /// and the observed stack with the new group's health as given (`None`: not created yet).
    fn moved(new_healthy: Option<usize>) -> (DesiredLoadBalancer, ObservedStack) {
        let before = desired(30080, &["a", "b"]);
        let after = desired(30081, &["a", "b"]);
        let mut observed = observed_from(&before);
        if let Some(healthy) = new_healthy {
            let mut new = observed_from(&after).target_groups.remove(0);
            new.healthy = healthy;
            observed.target_groups.push(new);
        }
        (after, observed)
    }

    #[test]
    fn a_move_waits_behind_a_warm_up_listener_until_the_new_group_is_healthy() {
        let (d, o) = moved(None);
        let mut cs = plan(Some(&d), &o);
        assert!(kinds(&cs).contains(&"ModifyListener 80".to_string()));
        let held = hold_listener_moves(&mut cs, &d, &o, |_| false);
        let new = d.target_groups[0].name.clone();
        assert_eq!(
            held,
            vec![HeldMove {
                port: 80,
                from: o.target_groups[0].name.clone(),
                to: new.clone(),
                warm_up_port: 65535,
                healthy: 0,
                needed: 2,
            }]
        );
        let k = kinds(&cs);
        assert!(k.contains(&"CreateTargetGroup ".to_string()), "{k:?}");
        assert!(k.contains(&"CreateListener 65535".to_string()), "{k:?}");
        assert!(!k.iter().any(|c| c.starts_with("ModifyListener")), "{k:?}");
        assert!(
            !k.iter().any(|c| c.starts_with("DeleteTargetGroup")),
            "{k:?}"
        );
        // The warm-up listener comes after the group it forwards to is made.
        let create_tg = k.iter().position(|c| c.starts_with("CreateTargetGroup"));
        let warm = k.iter().position(|c| c == "CreateListener 65535");
        assert!(create_tg < warm, "{k:?}");

        // Still initial (1 of 2 healthy) with the warm-up listener in place: nothing to do.
        let (d, mut o) = moved(Some(1));
        let lb = o.load_balancer.as_mut().unwrap();
        lb.listeners.push(crate::cloud::plan::ObservedListener {
            arn: "arn:l/warm".into(),
            port: 65535,
            protocol: Some(d.target_groups[0].protocol),
            target_group_arn: Some(format!("arn:tg/{new}")),
            certificates: Vec::new(),
        });
        let mut cs = plan(Some(&d), &o);
        let held = hold_listener_moves(&mut cs, &d, &o, |_| false);
        assert_eq!(held.len(), 1);
        assert_eq!(kinds(&cs), Vec::<String>::new(), "{cs:?}");

        // Healthy enough: the move, the warm-up listener's and the old group's deletion.
        o.target_groups[1].healthy = 2;
        let mut cs = plan(Some(&d), &o);
        assert!(hold_listener_moves(&mut cs, &d, &o, |_| false).is_empty());
        let k = kinds(&cs);
        assert!(k.contains(&"ModifyListener 80".to_string()), "{k:?}");
        assert!(k.contains(&"DeleteListener 65535".to_string()), "{k:?}");
        assert!(k.contains(&"DeleteTargetGroup ".to_string()), "{k:?}");

        // Or the wait is over: the same.
        o.target_groups[1].healthy = 0;
        let mut cs = plan(Some(&d), &o);
        assert!(hold_listener_moves(&mut cs, &d, &o, |tg| tg == new).is_empty());
        assert!(kinds(&cs).contains(&"ModifyListener 80".to_string()));
    }

    #[test]
    fn nothing_waits_when_nothing_is_at_stake() {
        // The old group has no healthy target: move at once.
        let (d, mut o) = moved(None);
        o.target_groups[0].healthy = 0;
        let mut cs = plan(Some(&d), &o);
        let before = cs.clone();
        assert!(hold_listener_moves(&mut cs, &d, &o, |_| false).is_empty());
        assert_eq!(cs, before);
        // A new load balancer, or an unchanged one: no move at all.
        let d = desired(30080, &["a"]);
        let mut cs = plan(Some(&d), &ObservedStack::default());
        let before = cs.clone();
        assert!(hold_listener_moves(&mut cs, &d, &ObservedStack::default(), |_| false).is_empty());
        assert_eq!(cs, before);
        let o = observed_from(&d);
        let mut cs = plan(Some(&d), &o);
        assert!(hold_listener_moves(&mut cs, &d, &o, |_| false).is_empty());
        assert!(cs.is_empty());
    }

    #[test]
    fn warm_up_ports_are_spare_and_stable() {
        let d = desired(30080, &["a"]);
        assert_eq!(warm_up_port(&d, 80), Some(65535));
        assert_eq!(warm_up_port(&d, 81), None);
        let mut two = d.clone();
        let mut l = two.listeners[0].clone();
        l.port = 65535;
        two.listeners.push(l);
        assert_eq!(warm_up_port(&two, 80), Some(65534));
        assert_eq!(warm_up_port(&two, 65535), Some(65533));
    }

    #[test]
    fn the_wait_is_a_few_health_check_rounds_within_bounds() {
        let mut tg = desired(30080, &["a"]).target_groups.remove(0);
        tg.health_check.interval_seconds = 10;
        tg.health_check.healthy_threshold = 3;
        assert_eq!(wait_bound(&tg), Duration::from_secs(50));
        tg.health_check.interval_seconds = 5;
        tg.health_check.healthy_threshold = 2;
        assert_eq!(wait_bound(&tg), Duration::from_secs(30));
        tg.health_check.interval_seconds = 300;
        assert_eq!(wait_bound(&tg), Duration::from_secs(300));
    }
}
