//! The one retry policy of the crate: exponential backoff with jitter.
//!
//! Every caller that tries something again (a read-only store call whose body broke, a
//! Delta commit's create or a commit that lost its version to another writer, a shard
//! whose stream broke, a method that failed on a batch)
//! takes its waits from a [`Backoff`], so the policy lives in one place.
//!
//! Hazard: jitter matters at scale. Workers that fail together (a throttled bucket, a
//! restarted endpoint) must not retry in lockstep, so every wait is drawn uniformly from
//! the upper half of its exponential window ("equal jitter").

use std::future::Future;
use std::time::Duration;

/// How often and how long to wait before trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The window of the first wait; each retry doubles it.
    pub first: Duration,
    /// The largest window.
    pub max: Duration,
    /// Tries after the first one.
    pub retries: u32,
    /// Whether a retry is part of normal operation (a commit that lost its version to
    /// another writer: with many workers on one table, most commits lose a race or two).
    /// Routine retries are logged at debug level; the others at warn, since they mean the
    /// store or the network is in trouble.
    pub routine: bool,
}

impl Backoff {
    /// Read-only store calls whose response broke mid-body (listings, small objects).
    pub const STORE_READ: Backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(5),
        retries: 4,
        routine: false,
    };

    /// Creating a Delta commit file (not idempotent, so the store client does not retry it).
    pub const COMMIT: Backoff = Backoff {
        first: Duration::from_millis(400),
        max: Duration::from_secs(10),
        retries: 5,
        routine: false,
    };

    /// Going back to a Delta log after another writer took the version we tried: short
    /// waits (the next version is usually free at once), many tries (each lost race
    /// means another worker's commit landed, so the table moves on).
    pub const COMMIT_RACE: Backoff = Backoff {
        first: Duration::from_millis(20),
        max: Duration::from_secs(2),
        retries: 100,
        routine: true,
    };

    /// Reading a shard again after its stream broke, or running a failed batch again.
    pub fn shard(retries: u32) -> Backoff {
        Backoff {
            first: Duration::from_millis(400),
            max: Duration::from_secs(30),
            retries,
            routine: false,
        }
    }

    /// A fresh schedule for one operation.
    pub fn start(&self) -> Retries {
        Retries { policy: *self, used: 0 }
    }

    /// The wait before retry number `retry` (0-based): uniform in [w/2, w], where
    /// w = min(max, first * 2^retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let window = self.first.saturating_mul(1u32 << retry.min(20)).min(self.max);
        window.mul_f64(0.5 + 0.5 * rand::random::<f64>())
    }
}

/// The retries left to one operation.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    used: u32,
}

impl Retries {
    /// The wait before the next try, or `None` when the retries are spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.used >= self.policy.retries {
            return None;
        }
        let wait = self.policy.delay(self.used);
        self.used += 1;
        Some(wait)
    }

    /// Tries made so far, the first one included.
    pub fn attempts(&self) -> u32 {
        self.used + 1
    }

    /// Tries allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.policy.retries + 1
    }
}

/// Runs `op` until it succeeds, fails with an error `is_final` calls final, or the
/// retries are spent; logs every retry with `what`.
pub async fn retry<T, E, F, Fut>(what: &str, policy: Backoff, is_final: impl Fn(&E) -> bool, mut op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retries = policy.start();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                let Some(wait) = retries.next_delay() else {
                    return Err(e);
                };
                let (attempt, of) = (retries.attempts() - 1, retries.max_attempts());
                if policy.routine {
                    tracing::debug!("{what}: attempt {attempt}/{of} failed ({e}); again in {wait:?}");
                } else {
                    tracing::warn!("{what}: attempt {attempt}/{of} failed ({e}); again in {wait:?}");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_within_their_jittered_windows_and_stop() {
        let policy = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(350),
            retries: 4,
            routine: false,
        };
        let mut retries = policy.start();
        let windows = [100, 200, 350, 350];
        for w in windows {
            let wait = retries.next_delay().unwrap();
            let w = Duration::from_millis(w);
            assert!(wait >= w / 2 && wait <= w, "{wait:?} outside [{:?}, {w:?}]", w / 2);
        }
        assert_eq!(retries.attempts(), 5);
        assert_eq!(retries.next_delay(), None, "four retries, then no more");
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let waits: std::collections::BTreeSet<Duration> = (0..32).map(|_| Backoff::COMMIT.delay(3)).collect();
        assert!(waits.len() > 16, "{waits:?}");
    }

    #[tokio::test]
    async fn retry_stops_at_final_errors_and_after_the_last_try() {
        let fast = Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(1),
            retries: 2,
            routine: false,
        };
        let mut calls = 0;
        let r: Result<(), String> = retry(
            "t",
            fast,
            |_| false,
            || {
                calls += 1;
                async { Err("down".to_string()) }
            },
        )
        .await;
        assert_eq!((r.unwrap_err().as_str(), calls), ("down", 3));
        let mut calls = 0;
        let r: Result<(), String> = retry(
            "t",
            fast,
            |e: &String| e == "gone",
            || {
                calls += 1;
                async { Err("gone".to_string()) }
            },
        )
        .await;
        assert_eq!((r.unwrap_err().as_str(), calls), ("gone", 1));
        let mut calls = 0;
        let r = retry(
            "t",
            fast,
            |_: &String| false,
            || {
                calls += 1;
                let ok = calls == 2;
                async move {
                    if ok {
                        Ok(7)
                    } else {
                        Err("blip".to_string())
                    }
                }
            },
        )
        .await;
        assert_eq!((r.unwrap(), calls), (7, 2));
    }
}
