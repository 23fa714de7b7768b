//! Counts the connection and flow tasks still running, so shutdown can wait for them to finish.
//! (tokio-util's `TaskTracker` does this too, behind a feature that would rebuild much of the
//! dependency tree.)

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A cheap, cloneable counter of tracked tasks.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: AtomicUsize,
    idle: Notify,
}

/// Decrements the count when the task ends, however it ends (also on abort).
struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    /// Spawns `task` on the current runtime and tracks it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(Arc::clone(&self.inner));
        tokio::spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until no tracked task runs.
    pub async fn wait(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.len() == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_for_tracked_tasks_including_aborted_ones() {
        let t = Tracker::default();
        t.wait().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.spawn(async move {
            let _ = rx.await;
        });
        let forever = t.spawn(std::future::pending::<()>());
        assert_eq!(t.len(), 2);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), t.wait())
                .await
                .is_err()
        );
        tx.send(()).unwrap();
        forever.abort();
        tokio::time::timeout(Duration::from_secs(5), t.wait())
            .await
            .unwrap();
        assert_eq!(t.len(), 0);
    }
}
