//! Coalesces bursts of watch events into one wake-up: ten nodes joining within a second cost
//! one reconcile per Service (so one call per target group), while a Service's own changes
//! are reconciled at once (the Controller itself has no debounce).

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;

/// How long a burst may stay open after its last event, and at most after its first.
pub const QUIET: Duration = Duration::from_millis(200);
pub const LONGEST: Duration = Duration::from_secs(1);

/// The items of `inner` in batches: a batch closes once `quiet` passes without a new item, or
/// `longest` after its first item, whichever comes first. Ends when `inner` ends (after
/// yielding what it holds). `inner` is polled all the time, so a reflector behind it keeps
/// its store current.
pub fn bursts<S>(inner: S, quiet: Duration, longest: Duration) -> impl Stream<Item = Vec<S::Item>>
where
    S: Stream + Unpin,
{
    futures::stream::unfold(Some(inner), move |state| async move {
        let mut inner = state?;
        let first = inner.next().await?;
        let mut batch = vec![first];
        let cap = Instant::now() + longest;
        loop {
            let deadline = (Instant::now() + quiet).min(cap);
            tokio::select! {
                item = inner.next() => match item {
                    Some(i) => batch.push(i),
                    None => return Some((batch, None)),
                },
                _ = tokio::time::sleep_until(deadline) => return Some((batch, Some(inner))),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_batch_and_a_gap_starts_another() {
        let (tx, rx) = mpsc::unbounded::<u32>();
        let mut out = Box::pin(bursts(rx, QUIET, LONGEST));
        let feeder = tokio::spawn(async move {
            for i in 0..5 {
                tx.unbounded_send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx.unbounded_send(9).unwrap();
        });
        assert_eq!(out.next().await, Some(vec![0, 1, 2, 3, 4]));
        assert_eq!(out.next().await, Some(vec![9]));
        feeder.await.unwrap();
        assert_eq!(out.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_trickle_still_closes_a_batch_after_the_longest_wait() {
        let (tx, rx) = mpsc::unbounded::<u32>();
        let mut out = Box::pin(bursts(rx, QUIET, LONGEST));
        let feeder = tokio::spawn(async move {
            for i in 0..30 {
                tx.unbounded_send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = Instant::now();
        let first = out.next().await.unwrap();
        assert!(started.elapsed() <= LONGEST, "{:?}", started.elapsed());
        assert!(first.len() >= 9 && first.len() <= 11, "{first:?}");
        feeder.abort();
    }
}
