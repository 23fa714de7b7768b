//! PURE: the UDP flow table of one node port, keyed by client address, that can name its idlest
//! flow overall and per client IP in O(log n), so caps evict the least recently active flow
//! (LRU) instead of refusing new clients.
//!
//! Flows record their own activity (an atomic touched by both directions), so the order is
//! kept lazily: each flow is indexed under the activity stamp it had when last indexed, and the
//! idlest candidate is re-indexed under its current stamp until the first one has not moved.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

/// A flow's last activity, in a clock shared by the whole table (larger = more recent).
pub trait Activity {
    /// The last activity stamp.
    fn last_active(&self) -> u64;
}

/// Index key: (stamp when indexed, flow id, client).
type Key = (u64, u64, SocketAddr);

#[derive(Debug)]
struct Entry<V> {
    value: V,
    id: u64,
    stamp: u64,
}

/// Flows of one node port.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<SocketAddr, Entry<V>>,
    by_idle: BTreeSet<Key>,
    by_source: HashMap<IpAddr, BTreeSet<Key>>,
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        FlowTable {
            flows: HashMap::new(),
            by_idle: BTreeSet::new(),
            by_source: HashMap::new(),
        }
    }
}

impl<V: Activity> FlowTable<V> {
    /// The flow of `client`.
    pub fn get(&self, client: &SocketAddr) -> Option<&V> {
        self.flows.get(client).map(|e| &e.value)
    }

    /// Live flows.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// No flow at all.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Live flows of one client IP.
    pub fn source_len(&self, ip: IpAddr) -> usize {
        self.by_source.get(&ip).map_or(0, BTreeSet::len)
    }

    /// Adds (or replaces) the flow of `client`, with id `id`.
    pub fn insert(&mut self, client: SocketAddr, id: u64, value: V) {
        self.remove(&client);
        let stamp = value.last_active();
        let key = (stamp, id, client);
        self.by_idle.insert(key);
        self.by_source.entry(client.ip()).or_default().insert(key);
        self.flows.insert(client, Entry { value, id, stamp });
    }

    /// Removes the flow of `client`.
    pub fn remove(&mut self, client: &SocketAddr) -> Option<V> {
        let entry = self.flows.remove(client)?;
        let key = (entry.stamp, entry.id, *client);
        self.by_idle.remove(&key);
        if let Some(set) = self.by_source.get_mut(&client.ip()) {
            set.remove(&key);
            if set.is_empty() {
                self.by_source.remove(&client.ip());
            }
        }
        Some(entry.value)
    }

    /// Removes the flow of `client` if it is still flow `id` (not a newer one).
    pub fn remove_if(&mut self, client: &SocketAddr, id: u64) -> Option<V> {
        if self.flows.get(client).is_some_and(|e| e.id == id) {
            self.remove(client)
        } else {
            None
        }
    }

    /// Keeps the flows for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let gone: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, e)| !keep(&e.value))
            .map(|(c, _)| *c)
            .collect();
        for client in gone {
            self.remove(&client);
        }
    }

    /// Removes and returns the least recently active flow.
    pub fn evict_idlest(&mut self) -> Option<V> {
        loop {
            let (_, _, client) = *self.by_idle.first()?;
            if !self.refresh(client) {
                return self.remove(&client);
            }
        }
    }

    /// Removes and returns the least recently active flow of client IP `ip`.
    pub fn evict_idlest_of(&mut self, ip: IpAddr) -> Option<V> {
        loop {
            let (_, _, client) = *self.by_source.get(&ip)?.first()?;
            if !self.refresh(client) {
                return self.remove(&client);
            }
        }
    }

    /// Re-indexes `client` under its current stamp; false when it had not moved.
    fn refresh(&mut self, client: SocketAddr) -> bool {
        let Some(entry) = self.flows.get_mut(&client) else {
            return false;
        };
        let now = entry.value.last_active();
        if now <= entry.stamp {
            return false;
        }
        let old = (entry.stamp, entry.id, client);
        let new = (now, entry.id, client);
        entry.stamp = now;
        self.by_idle.remove(&old);
        self.by_idle.insert(new);
        if let Some(set) = self.by_source.get_mut(&client.ip()) {
            set.remove(&old);
            set.insert(new);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A flow whose activity the test moves by hand.
    #[derive(Debug, Clone)]
    struct Fake(Rc<Cell<u64>>);

    impl Activity for Fake {
        fn last_active(&self) -> u64 {
            self.0.get()
        }
    }

    fn c(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table(flows: &[(&str, u64)]) -> (FlowTable<Fake>, Vec<Fake>) {
        let mut t = FlowTable::default();
        let mut handles = Vec::new();
        for (i, (client, stamp)) in flows.iter().enumerate() {
            let f = Fake(Rc::new(Cell::new(*stamp)));
            handles.push(f.clone());
            t.insert(c(client), i as u64, f);
        }
        (t, handles)
    }

    fn stamp(f: Option<Fake>) -> Option<u64> {
        f.map(|f| f.0.get())
    }

    #[test]
    fn evicts_the_least_recently_active_flow_even_after_activity_moved() {
        let (mut t, h) = table(&[
            ("10.0.0.1:1000", 1),
            ("10.0.0.1:1001", 2),
            ("10.0.0.2:1000", 3),
        ]);
        // The oldest flow was used since it was indexed: now the most recent.
        h[0].0.set(10);
        assert_eq!(stamp(t.evict_idlest()), Some(2));
        assert_eq!(stamp(t.evict_idlest()), Some(3));
        assert_eq!(stamp(t.evict_idlest()), Some(10));
        assert!(t.evict_idlest().is_none() && t.is_empty());
        assert_eq!(t.source_len("10.0.0.1".parse().unwrap()), 0);
    }

    #[test]
    fn per_source_eviction_only_touches_that_source() {
        let (mut t, h) = table(&[
            ("10.0.0.1:1000", 5),
            ("10.0.0.2:1000", 1),
            ("10.0.0.1:1001", 6),
            ("10.0.0.1:1002", 7),
        ]);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.source_len(ip1), 3);
        h[0].0.set(8);
        assert_eq!(stamp(t.evict_idlest_of(ip1)), Some(6));
        assert_eq!(t.source_len(ip1), 2);
        assert!(t.get(&c("10.0.0.2:1000")).is_some());
        assert!(t.evict_idlest_of("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn remove_if_replace_and_retain_keep_indexes_right() {
        let (mut t, h) = table(&[("10.0.0.1:1000", 1), ("10.0.0.1:1001", 2)]);
        // A stale id does not remove the newer flow of that client.
        assert!(t.remove_if(&c("10.0.0.1:1000"), 7).is_none());
        assert!(t.remove_if(&c("10.0.0.1:1000"), 0).is_some());
        // Replacing a client's flow leaves one index entry.
        t.insert(c("10.0.0.1:1001"), 9, Fake(Rc::new(Cell::new(4))));
        assert_eq!(t.len(), 1);
        assert_eq!(t.source_len("10.0.0.1".parse().unwrap()), 1);
        drop(h);
        t.insert(c("10.0.0.3:1"), 10, Fake(Rc::new(Cell::new(5))));
        t.retain(|f| f.0.get() != 4);
        assert_eq!(t.len(), 1);
        assert_eq!(stamp(t.evict_idlest()), Some(5));
        assert!(t.by_idle.is_empty() && t.by_source.is_empty());
    }
}
