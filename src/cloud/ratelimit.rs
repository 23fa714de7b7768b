//! Client-side token buckets for AWS calls, so a large cluster stays under the account's API
//! limits instead of meeting throttling (the AWS Load Balancer Controller's defaults: target
//! registration 4/s burst 20, every other ELBv2/EC2 call 10/s burst 40).

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate <= 0` disables limiting.
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        if self.rate <= 0.0 {
            return;
        }
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                let (tokens, last) = *s;
                let tokens =
                    (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
                if tokens >= 1.0 {
                    *s = (tokens - 1.0, now);
                    return;
                }
                *s = (tokens, now);
                Duration::from_secs_f64((1.0 - tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let b = TokenBucket::new(10.0, 5);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            b.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "the burst is free"
        );
        for _ in 0..10 {
            b.acquire().await;
        }
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(900) && e <= Duration::from_millis(1100),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn zero_rate_is_unlimited() {
        let b = TokenBucket::new(0.0, 1);
        for _ in 0..1000 {
            b.acquire().await;
        }
    }
}
