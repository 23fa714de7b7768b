//! What the controller and the node proxy share as processes: the tokio runtime they run on,
//! the signals that stop them, and the hardened HTTP server their admin endpoints (`/metrics`,
//! `/healthz`, `/readyz`) and the proxy's health-check node ports run on.

pub mod admin;
pub mod http;
pub mod signals;

/// The runtime a process runs on: `Some(1)` is a single-threaded runtime, `Some(n)` a
/// multi-threaded one with `n` workers, `None` one worker per core.
pub fn tokio_runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == Some(1) {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}
