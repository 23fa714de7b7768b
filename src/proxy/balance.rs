//! Backend choice for new connections and flows: round robin, with ClientIP session affinity.
//!
//! Round robin, not least-connections: it is O(1) with one atomic add and no state that must
//! survive endpoint updates, it spreads short requests exactly evenly, and it is what kube-proxy's
//! IPVS mode does by default (its iptables mode picks at random). Least-connections would only
//! win for long flows of very unequal length, at the price of a scan or shared per-backend
//! counters on every connect.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use prometheus_client::metrics::counter::Counter;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Affinity entries are swept of expired ones when the map grows past this (then twice its size).
const SWEEP_AT_LEAST: usize = 1024;

/// Per-frontend balancing state. Lives as long as the frontend, across endpoint updates, so
/// affinity survives a scale-up. The affinity table holds at most `max_clients` clients: past
/// that, expired entries go first, then the least recently seen eighth (counted in `evicted`).
#[derive(Debug)]
pub struct Balancer {
    next: AtomicUsize,
    affinity: Mutex<Affinity>,
    max_clients: usize,
    evicted: Counter,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer::new(65_536, Counter::default())
    }
}

#[derive(Debug, Default)]
struct Affinity {
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
    sweep_at: usize,
}

impl Balancer {
    /// A balancer remembering at most `max_clients` (at least 1) for affinity.
    pub fn new(max_clients: usize, evicted: Counter) -> Balancer {
        Balancer {
            next: AtomicUsize::new(0),
            affinity: Mutex::new(Affinity::default()),
            max_clients: max_clients.max(1),
            evicted,
        }
    }

    /// Picks a backend among `targets` (the current eligible set) for `client`. With affinity, a
    /// client keeps the backend it used last as long as that is still a target and it came back
    /// within `timeout` of its previous connection (kube-proxy refreshes on every connection).
    pub fn pick(
        &self,
        targets: &[SocketAddr],
        client: IpAddr,
        affinity: Option<Duration>,
        now: Instant,
    ) -> Option<SocketAddr> {
        if targets.is_empty() {
            return None;
        }
        let Some(timeout) = affinity else {
            return Some(self.round_robin(targets));
        };
        let mut aff = self
            .affinity
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let kept = aff.sticky.get(&client).and_then(|(backend, last)| {
            let fresh = now.saturating_duration_since(*last) <= timeout;
            (fresh && targets.binary_search(backend).is_ok()).then_some(*backend)
        });
        let backend = kept.unwrap_or_else(|| self.round_robin(targets));
        aff.sticky.insert(client, (backend, now));
        let full = aff.sticky.len() > self.max_clients;
        if full || aff.sticky.len() >= aff.sweep_at.max(SWEEP_AT_LEAST) {
            aff.sticky
                .retain(|_, (_, last)| now.saturating_duration_since(*last) <= timeout);
            if aff.sticky.len() > self.max_clients {
                self.forget_least_recent(&mut aff);
            }
            aff.sweep_at = aff.sticky.len() * 2;
        }
        Some(backend)
    }

    /// Forgets the least recently seen eighth of the clients (so this runs once per
    /// `max_clients / 8` new clients, not on every one).
    fn forget_least_recent(&self, aff: &mut Affinity) {
        let mut seen: Vec<Instant> = aff.sticky.values().map(|(_, last)| *last).collect();
        let keep = self.max_clients - self.max_clients / 8;
        let drop_n = aff.sticky.len().saturating_sub(keep);
        if drop_n == 0 {
            return;
        }
        let (_, cutoff, _) = seen.select_nth_unstable(drop_n - 1);
        let cutoff = *cutoff;
        let before = aff.sticky.len();
        aff.sticky.retain(|_, (_, last)| *last > cutoff);
        self.evicted.inc_by((before - aff.sticky.len()) as u64);
    }

    /// The next target in turn. `targets` is never empty here.
    fn round_robin(&self, targets: &[SocketAddr]) -> SocketAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        targets[n % targets.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_spreads_evenly_and_follows_updates() {
        let b = Balancer::default();
        let now = Instant::now();
        let two = [a("10.0.0.1:80"), a("10.0.0.2:80")];
        let picks: Vec<_> = (0..4)
            .map(|_| b.pick(&two, ip("1.1.1.1"), None, now).unwrap())
            .collect();
        assert_eq!(picks, [two[0], two[1], two[0], two[1]]);
        assert_eq!(b.pick(&[], ip("1.1.1.1"), None, now), None);
        let three = [a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")];
        let mut counts = HashMap::new();
        for _ in 0..30 {
            *counts
                .entry(b.pick(&three, ip("1.1.1.1"), None, now).unwrap())
                .or_insert(0) += 1;
        }
        assert!(counts.values().all(|&c| c == 10), "{counts:?}");
    }

    #[test]
    fn client_ip_affinity() {
        struct Case {
            what: &'static str,
            /// Seconds after the first pick.
            after: u64,
            targets_after: Vec<&'static str>,
            same_backend: bool,
        }
        let cases = [
            Case {
                what: "within the timeout",
                after: 5,
                targets_after: vec!["10.0.0.1:80", "10.0.0.2:80"],
                same_backend: true,
            },
            Case {
                what: "within the timeout, after a scale-up",
                after: 5,
                targets_after: vec!["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
                same_backend: true,
            },
            Case {
                what: "past the timeout",
                after: 11,
                targets_after: vec!["10.0.0.1:80", "10.0.0.2:80"],
                same_backend: false,
            },
        ];
        for case in cases {
            let b = Balancer::default();
            let t0 = Instant::now();
            let targets = [a("10.0.0.1:80"), a("10.0.0.2:80")];
            let timeout = Some(Duration::from_secs(10));
            let first = b.pick(&targets, ip("1.1.1.1"), timeout, t0).unwrap();
            // Two other clients move the round robin on, so a fresh pick would differ.
            b.pick(&targets, ip("2.2.2.2"), timeout, t0);
            b.pick(&targets, ip("3.3.3.3"), timeout, t0);
            let after: Vec<_> = case.targets_after.iter().map(|s| a(s)).collect();
            let t1 = t0 + Duration::from_secs(case.after);
            let second = b.pick(&after, ip("1.1.1.1"), timeout, t1).unwrap();
            assert_eq!(second == first, case.same_backend, "{}", case.what);
        }
    }

    #[test]
    fn affinity_moves_off_a_removed_backend_and_refreshes_on_use() {
        let b = Balancer::default();
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(10));
        let both = [a("10.0.0.1:80"), a("10.0.0.2:80")];
        let first = b.pick(&both, ip("1.1.1.1"), timeout, t0).unwrap();
        // Used every 6 s: each use refreshes the 10 s timeout.
        for i in 1..5 {
            let t = t0 + Duration::from_secs(6 * i);
            assert_eq!(b.pick(&both, ip("1.1.1.1"), timeout, t), Some(first));
        }
        let rest: Vec<_> = both.iter().copied().filter(|x| *x != first).collect();
        let t = t0 + Duration::from_secs(25);
        assert_eq!(b.pick(&rest, ip("1.1.1.1"), timeout, t), Some(rest[0]));
    }

    #[test]
    fn expired_affinity_entries_are_swept() {
        let b = Balancer::default();
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(1));
        let targets = [a("10.0.0.1:80")];
        for i in 0..(SWEEP_AT_LEAST as u32) {
            let client = IpAddr::from(std::net::Ipv4Addr::from(i));
            b.pick(&targets, client, timeout, t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        for i in 0..(SWEEP_AT_LEAST as u32) {
            let client = IpAddr::from(std::net::Ipv4Addr::from(100_000 + i));
            b.pick(&targets, client, timeout, t1);
        }
        let len = b.affinity.lock().unwrap().sticky.len();
        assert!(len <= SWEEP_AT_LEAST, "{len}");
    }

    #[test]
    fn affinity_table_stays_within_its_cap_forgetting_the_least_recent() {
        let evicted = Counter::default();
        let b = Balancer::new(80, evicted.clone());
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(3600));
        let targets = [a("10.0.0.1:80"), a("10.0.0.2:80")];
        // 1000 clients, each a second after the previous, none expired.
        for i in 0..1000u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(i));
            b.pick(
                &targets,
                client,
                timeout,
                t0 + Duration::from_secs(u64::from(i)),
            );
        }
        let sticky = &b.affinity.lock().unwrap().sticky;
        assert!(sticky.len() <= 80, "{}", sticky.len());
        assert_eq!(evicted.get() as usize, 1000 - sticky.len());
        // The most recent client is remembered, the first ones are not.
        assert!(sticky.contains_key(&IpAddr::from(std::net::Ipv4Addr::from(999u32))));
        assert!(!sticky.contains_key(&IpAddr::from(std::net::Ipv4Addr::from(0u32))));
    }
}
