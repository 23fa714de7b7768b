//! The side-by-side scale benchmark's parts: the controllers under test, one controller's run
//! (its phases), AWS queries scoped to one run's VPC, and the report. Every wait is bounded by a
//! [`Budget`] and reports instead of hanging.

pub mod aws;
pub mod controllers;
pub mod lbc;
pub mod phases;
pub mod report;

use std::time::{Duration, Instant};

use crate::support::faultproxy::FaultProxy;

/// Reads `key` from the environment, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bounds every wait: each phase gets at most `phase`, and nothing runs past `deadline` (the
/// whole run's), so a stuck controller costs a reported timeout, not a hung benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub phase: Duration,
    pub deadline: Instant,
}

impl Budget {
    /// How long the next wait may take.
    pub fn timeout(&self) -> Duration {
        self.phase
            .min(self.deadline.saturating_duration_since(Instant::now()))
    }
}

/// Polls `done` every `every` until it holds (→ time taken) or `timeout` passes (→ `None`,
/// logged as `who: timed out … waiting for what`).
pub async fn wait_until(
    who: &str,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            eprintln!("bench: {who}: timed out after {timeout:?} waiting for {what}");
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_until`] with an async check (one that calls an API).
pub async fn wait_until_async(
    who: &str,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            eprintln!("bench: {who}: timed out after {timeout:?} waiting for {what}");
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// AWS requests the counting proxy has seen (all operations).
pub fn calls(proxy: &FaultProxy) -> u64 {
    proxy.counts().requests
}

/// Requests of one operation (`RegisterTargets`, …) the counting proxy has seen.
pub fn calls_of(proxy: &FaultProxy, operation: &str) -> u64 {
    proxy
        .counts()
        .by_operation
        .get(operation)
        .copied()
        .unwrap_or(0)
}

/// Waits until the controller has made no AWS call for `window` (its work after an event is
/// done), at most `timeout`; false on timeout.
pub async fn quiet(who: &str, proxy: &FaultProxy, window: Duration, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut last = calls(proxy);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = calls(proxy);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= window {
            return true;
        }
        if start.elapsed() >= timeout {
            eprintln!("bench: {who}: still calling AWS after {timeout:?}; counting so far");
            return false;
        }
    }
}

/// Peak resident set (VmHWM) of a process, in KiB (0 when it cannot be read).
pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The `p`th percentile (nearest rank) of sorted seconds; infinite entries stand for timeouts.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    let v = sorted[idx.min(sorted.len() - 1)];
    v.is_finite().then_some(v)
}

/// The machine's 1-minute load average (the rig is shared; the report says how busy it was).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
