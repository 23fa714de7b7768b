//! When to call DescribeTargetHealth (pure): per group at its health-check interval while it
//! can still change by itself (a target `initial` or draining), while a gate waits, or when its
//! targets changed since the last answer; never while everything is steady. One bound on calls
//! per second across groups.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::gate::in_transition;
use crate::cloud::TargetHealth;
use crate::model::Target;

/// One group's last answer and when it came.
#[derive(Debug, Default)]
pub struct GroupClock {
    last_poll: Option<Instant>,
    health: Vec<TargetHealth>,
    /// The registered targets (as the controller left them) when the answer came.
    polled_targets: BTreeSet<Target>,
    /// The Service's last sync this clock has seen (see [`GroupClock::note_sync`]).
    seen_sync: Option<Instant>,
    /// Polls still owed after a sync (its change, e.g. of the health check, plays out).
    follow_ups: u32,
}

/// Polls after each sync of the Service: enough for a changed health check to show through
/// the default thresholds (2 failures, or 3 passes on an unhealthy target) with some slack for
/// the change to reach the load balancer.
pub const FOLLOW_UPS: u32 = 5;

impl GroupClock {
    /// Whether the group should be polled at `now`: never before one `interval` after the last
    /// poll; then if a gate is unsettled, a target is in transition, or the registered targets
    /// differ from those of the last answer. The first poll is due at once.
    pub fn due(
        &self,
        now: Instant,
        interval: Duration,
        unsettled: bool,
        registered: &BTreeSet<Target>,
    ) -> bool {
        let Some(last) = self.last_poll else {
            return true;
        };
        if now.saturating_duration_since(last) < interval {
            return false;
        }
        unsettled
            || self.follow_ups > 0
            || in_transition(&self.health)
            || *registered != self.polled_targets
    }

    /// The Service was synced at `at` (a change, or the periodic drift check): the next
    /// [`FOLLOW_UPS`] intervals are polled, since its health checks may have changed.
    pub fn note_sync(&mut self, at: Instant) {
        if self.seen_sync.is_some_and(|s| s != at) {
            self.follow_ups = FOLLOW_UPS;
        }
        self.seen_sync = Some(at);
    }

    /// Records an answer.
    pub fn record(
        &mut self,
        now: Instant,
        health: Vec<TargetHealth>,
        registered: &BTreeSet<Target>,
    ) {
        self.last_poll = Some(now);
        self.health = health;
        self.polled_targets = registered.clone();
        self.follow_ups = self.follow_ups.saturating_sub(1);
    }

    /// A failed call: retried after one interval, the old answer kept.
    pub fn failed(&mut self, now: Instant) {
        self.last_poll = Some(now);
    }

    /// The targets of the last answer (draining ones excepted).
    pub fn answered_targets(&self) -> BTreeSet<Target> {
        self.health
            .iter()
            .filter(|h| h.state != "draining")
            .map(|h| h.target.clone())
            .collect()
    }

    /// The target's last known health (`None`: not in the last answer, or never polled).
    pub fn health_of(&self, target: &Target) -> Option<&TargetHealth> {
        self.health.iter().find(|h| h.target == *target)
    }
}

/// At most `qps` calls per second (no burst): the next call waits for its slot.
#[derive(Debug)]
pub struct RateBound {
    gap: Duration,
    next: Option<Instant>,
}

impl RateBound {
    pub fn new(qps: f64) -> RateBound {
        let qps = if qps.is_finite() && qps > 0.0 {
            qps
        } else {
            1.0
        };
        RateBound {
            gap: Duration::from_secs_f64(1.0 / qps),
            next: None,
        }
    }

    /// Takes the slot at `now` if it is free.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.next.is_some_and(|n| now < n) {
            return false;
        }
        self.next = Some(now + self.gap);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str) -> Target {
        Target {
            id: id.into(),
            port: 80,
        }
    }

    fn h(id: &str, state: &str) -> TargetHealth {
        TargetHealth {
            target: t(id),
            state: state.into(),
            reason: None,
        }
    }

    #[test]
    fn polls_at_the_interval_only_while_something_can_change() {
        let t0 = Instant::now();
        let i = Duration::from_secs(10);
        let regs: BTreeSet<Target> = [t("a")].into();
        let mut c = GroupClock::default();
        assert!(c.due(t0, i, false, &regs), "first poll at once");
        c.record(t0, vec![h("a", "initial")], &regs);
        let cases = [
            // (after, unsettled, registered, want)
            (Duration::from_secs(5), true, regs.clone(), false), // not before one interval
            (Duration::from_secs(10), false, regs.clone(), true), // initial: in transition
        ];
        for (after, unsettled, r, want) in cases {
            assert_eq!(c.due(t0 + after, i, unsettled, &r), want, "{after:?}");
        }
        // Steady: healthy and settled → never due, however long.
        c.record(t0, vec![h("a", "healthy")], &regs);
        assert!(!c.due(t0 + Duration::from_secs(3600), i, false, &regs));
        // ... until a gate waits, or the targets change.
        assert!(c.due(t0 + i, i, true, &regs));
        let more: BTreeSet<Target> = [t("a"), t("b")].into();
        assert!(c.due(t0 + i, i, false, &more));
        // A draining target keeps it polling.
        c.record(t0, vec![h("a", "healthy"), h("b", "draining")], &regs);
        assert!(c.due(t0 + i, i, false, &regs));
    }

    #[test]
    fn a_sync_is_followed_by_a_few_polls_then_none() {
        let t0 = Instant::now();
        let i = Duration::from_secs(10);
        let regs: BTreeSet<Target> = [t("a")].into();
        let mut c = GroupClock::default();
        c.note_sync(t0); // the first sync seen: nothing owed
        c.record(t0, vec![h("a", "healthy")], &regs);
        assert!(!c.due(t0 + i, i, false, &regs));
        c.note_sync(t0 + Duration::from_secs(1));
        let mut polls = 0;
        for n in 1..10 {
            let now = t0 + i * n;
            if c.due(now, i, false, &regs) {
                polls += 1;
                c.record(now, vec![h("a", "healthy")], &regs);
            }
        }
        assert_eq!(polls, FOLLOW_UPS);
    }

    #[test]
    fn rate_bound_spaces_calls() {
        let t0 = Instant::now();
        let mut r = RateBound::new(4.0);
        let took: Vec<bool> = [0, 100, 249, 250, 300, 500]
            .iter()
            .map(|ms| r.take(t0 + Duration::from_millis(*ms)))
            .collect();
        assert_eq!(took, vec![true, false, false, true, false, true]);
    }
}
