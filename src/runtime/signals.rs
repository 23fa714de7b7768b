//! SIGTERM and SIGINT, the two ways a process here is asked to stop (kubelet sends SIGTERM,
//! a terminal SIGINT).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// SIGTERM and SIGINT, either of which counts; each `recv` waits for the next one (the node
/// proxy treats a second signal as "skip the rest of the drain").
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers (before anything is served, so no signal is lost).
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Cancels `token` at the first signal.
    pub async fn cancel_on_first(mut self, token: CancellationToken) {
        self.recv().await;
        tracing::info!("shutdown requested");
        token.cancel();
    }
}
