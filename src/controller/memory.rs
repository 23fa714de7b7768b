//! Per-object memory of a controller (not persisted; a restart simply observes again): what was
//! last applied, consecutive failures for the backoff, target groups of unfinished plans.
//! Plain mutexes, never held across an await, so `error_policy` always counts (no `try_lock`
//! fallback that would reset the backoff), and every entry is pruned when its object goes.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Requeue delay after `failures` consecutive failures: 5 s doubling to 300 s (the service
/// controller's).
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs((5u64 << (failures.clamp(1, 7) - 1)).min(300))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (single inserts/removes).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Consecutive failures per object.
pub struct Failures<K> {
    counts: Mutex<HashMap<K, u32>>,
}

impl<K> Default for Failures<K> {
    fn default() -> Self {
        Failures {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash> Failures<K> {
    /// Counts one more failure of `key`; returns the count.
    pub fn record(&self, key: K) -> u32 {
        let mut m = lock(&self.counts);
        let n = m.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// A success: the count starts over.
    pub fn clear(&self, key: &K) {
        lock(&self.counts).remove(key);
    }

    /// Keeps only the keys `live` accepts.
    pub fn retain(&self, live: impl Fn(&K) -> bool) {
        lock(&self.counts).retain(|k, _| live(k));
    }

    /// How many objects are remembered.
    pub fn len(&self) -> usize {
        lock(&self.counts).len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A map from object to a value, with the same locking rules.
pub struct PerObject<K, V> {
    map: Mutex<HashMap<K, V>>,
}

impl<K, V> Default for PerObject<K, V> {
    fn default() -> Self {
        PerObject {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> PerObject<K, V> {
    pub fn get(&self, key: &K) -> Option<V> {
        lock(&self.map).get(key).cloned()
    }

    pub fn insert(&self, key: K, value: V) {
        lock(&self.map).insert(key, value);
    }

    pub fn remove(&self, key: &K) -> Option<V> {
        lock(&self.map).remove(key)
    }

    /// Changes the value of `key` (inserting the default first).
    pub fn update(&self, key: K, f: impl FnOnce(&mut V))
    where
        V: Default,
    {
        f(lock(&self.map).entry(key).or_default());
    }

    /// Keeps only the keys `live` accepts.
    pub fn retain(&self, live: impl Fn(&K) -> bool) {
        lock(&self.map).retain(|k, _| live(k));
    }

    /// How many values satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&V) -> bool) -> usize {
        lock(&self.map).values().filter(|v| pred(v)).count()
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> HashMap<K, V> {
        lock(&self.map).clone()
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Target-group names per object.
pub type NameSets<K> = PerObject<K, BTreeSet<String>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        let got: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(0).as_secs(), 5);
    }

    #[test]
    fn failures_count_up_clear_and_prune() {
        let f = Failures::default();
        assert_eq!((f.record("a"), f.record("a"), f.record("b")), (1, 2, 1));
        f.clear(&"a");
        assert_eq!(f.record("a"), 1);
        f.retain(|k| *k == "a");
        assert_eq!(f.len(), 1);
    }
}
