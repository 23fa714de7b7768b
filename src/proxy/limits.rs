//! Process-wide caps of the node proxy, so no client can exhaust its memory or descriptors:
//! open TCP connections (overall and per client IP) and live UDP flows (overall). Each cap
//! hands out a permit that gives its slot back when dropped, however the connection ends.
//! What a cap refuses or evicts is counted in `cloudlb_proxy_limited_total`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;

/// Open TCP connections: at most `max`, and at most `per_source` from one client IP (0 = no
/// per-source cap).
#[derive(Debug)]
pub struct TcpLimits {
    open: Budget,
    per_source: usize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
    refused: Counter,
    refused_per_source: Counter,
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The overall cap.
    Global,
    /// The client IP's cap.
    PerSource,
}

/// A TCP connection's slot (and its client's), given back on drop.
#[derive(Debug)]
pub struct TcpPermit {
    limits: Arc<TcpLimits>,
    source: Option<IpAddr>,
    _slot: Permit,
}

impl TcpLimits {
    /// Caps of `max` connections, `per_source` per client IP (0 = none); `refused` and
    /// `refused_per_source` count what each cap turned away.
    pub fn new(
        max: usize,
        per_source: usize,
        refused: Counter,
        refused_per_source: Counter,
    ) -> Arc<TcpLimits> {
        Arc::new(TcpLimits {
            open: Budget::new_inner(max),
            per_source,
            by_source: Mutex::new(HashMap::new()),
            refused,
            refused_per_source,
        })
    }

    /// A slot for a connection from `client`, or which cap is full (counted).
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<TcpPermit, Refusal> {
        let source = if self.per_source > 0 {
            let mut by_source = self
                .by_source
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let n = by_source.entry(client).or_insert(0);
            if *n >= self.per_source {
                self.refused_per_source.inc();
                return Err(Refusal::PerSource);
            }
            *n += 1;
            Some(client)
        } else {
            None
        };
        // Built before the global check, so a refusal there gives the client's slot back.
        let partial = SourceSlot {
            limits: self,
            source,
        };
        let Some(slot) = self.open.take() else {
            self.refused.inc();
            return Err(Refusal::Global);
        };
        let source = partial.keep();
        Ok(TcpPermit {
            limits: Arc::clone(self),
            source,
            _slot: slot,
        })
    }

    /// Open connections.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.live()
    }

    fn release_source(&self, client: IpAddr) {
        let mut by_source = self
            .by_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = by_source.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&client);
            }
        }
    }
}

/// A per-source slot taken during `admit`, given back unless kept.
struct SourceSlot<'a> {
    limits: &'a TcpLimits,
    source: Option<IpAddr>,
}

impl SourceSlot<'_> {
    fn keep(mut self) -> Option<IpAddr> {
        self.source.take()
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.source {
            self.limits.release_source(client);
        }
    }
}

impl Drop for TcpPermit {
    fn drop(&mut self) {
        if let Some(client) = self.source {
            self.limits.release_source(client);
        }
    }
}

/// A counted budget of slots (lock-free).
#[derive(Debug)]
pub struct Budget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    max: usize,
    live: AtomicUsize,
}

/// One slot of a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<BudgetInner>);

impl Budget {
    /// A budget of `max` slots.
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget::new_inner(max))
    }

    fn new_inner(max: usize) -> Budget {
        Budget {
            inner: Arc::new(BudgetInner {
                max,
                live: AtomicUsize::new(0),
            }),
        }
    }

    /// A slot, or `None` when all are taken.
    pub fn take(&self) -> Option<Permit> {
        let inner = &self.inner;
        inner
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(inner)))
    }

    /// Slots taken.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn budget_hands_out_at_most_max_and_takes_slots_back() {
        let b = Budget::new(2);
        let one = b.take().unwrap();
        let two = b.take().unwrap();
        assert!(b.take().is_none());
        assert_eq!(b.live(), 2);
        drop(one);
        let three = b.take().unwrap();
        drop((two, three));
        assert_eq!(b.live(), 0);
    }

    #[test]
    fn tcp_caps_count_refusals_and_give_slots_back() {
        let (refused, per_source) = (Counter::default(), Counter::default());
        let l = TcpLimits::new(3, 2, refused.clone(), per_source.clone());
        let a1 = l.admit(ip("10.0.0.1")).unwrap();
        let a2 = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerSource);
        let b1 = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.2")).unwrap_err(), Refusal::Global);
        assert_eq!((refused.get(), per_source.get()), (1, 1));
        // The global refusal gave 10.0.0.2's per-source slot back: one more fits after a1 ends.
        drop(a1);
        let b2 = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.open(), 3);
        drop((a2, b1, b2));
        assert_eq!(l.open(), 0);
        assert!(l.by_source.lock().unwrap().is_empty());

        let unlimited = TcpLimits::new(1, 0, Counter::default(), Counter::default());
        let _p = unlimited.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            unlimited.admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::Global
        );
        assert!(unlimited.by_source.lock().unwrap().is_empty());
    }
}
