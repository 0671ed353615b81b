//! Per-key request rates: each API key (and the admin token) may send
//! `HOLDFAST_HTTP_KEY_RATE` requests a second on average, in bursts of up to
//! `HOLDFAST_HTTP_KEY_BURST`; past that the answer is `429` with
//! `Retry-After`. A generic cell rate algorithm (the `governor` crate) keeps
//! one small state per key, in this process: a fleet of N processes serving
//! the API lets a key send N times the rate in all.
//!
//! Only requests whose key checked out are counted, so the table holds only
//! real keys; requests without a valid key are refused (401) before they
//! reach it.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::problem::Problem;

/// Keys tracked before the states of keys idle long enough to be full again
/// are dropped.
const TIDY_ABOVE: usize = 10_000;

/// The rate limits of one process.
pub struct Limiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    per_sec: u32,
}

impl Limiter {
    /// `per_sec` requests a second per key, bursts of `burst`; `None` when
    /// `per_sec` is 0 (no limit).
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_sec)?;
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
        let clock = DefaultClock::default();
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            per_sec,
        })
    }

    /// Count one request of `key`; `Err` with how long to wait when it is over its rate.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.limiter.len() > TIDY_ABOVE {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// The `429` answer for a wait of `wait`.
    pub fn refusal(&self, wait: Duration) -> Response {
        let secs = retry_after_secs(wait);
        let mut response = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!(
                "this key sent more than {} requests a second (HOLDFAST_HTTP_KEY_RATE); \
                 send it again in {secs} s",
                self.per_sec
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// Whole seconds to wait, at least one (`Retry-After` takes no fractions).
fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_burst_waits_and_others_do_not() {
        let limiter = Limiter::new(1, 3).unwrap();
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limiter.check("b").is_ok(), "each key has its own budget");
        let response = limiter.refusal(wait);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(Limiter::new(0, 10).is_none());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
