//! A circuit breaker and a per-minute budget, on tokio's clock (so tests can pause time).
//!
//! The breaker opens after N consecutive failures of the model server, answers "open" at once
//! while open, and after a cooldown lets one probe through (half-open): its success closes the
//! breaker, its failure opens it again for another cooldown.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's state, as exported in `engram_llm_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed = 0,
    /// Requests are refused at once.
    Open = 1,
    /// One probe is allowed through.
    HalfOpen = 2,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// The breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// Opens after `threshold` consecutive failures, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner {
                failures: 0,
                open_until: None,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go: always when closed; never while open; once (the probe) when
    /// the cooldown is over.
    pub fn try_acquire(&self) -> bool {
        let mut inner = self.lock();
        match inner.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if inner.probing => false,
            Some(_) => {
                inner.probing = true;
                true
            }
        }
    }

    /// Records the outcome of a request that was let through.
    pub fn record(&self, success: bool) {
        let mut inner = self.lock();
        inner.probing = false;
        if success {
            inner.failures = 0;
            inner.open_until = None;
            return;
        }
        inner.failures += 1;
        if inner.open_until.is_some() || inner.failures >= self.threshold {
            inner.open_until = Some(Instant::now() + self.cooldown);
        }
    }
}

/// At most `limit` requests per rolling minute.
#[derive(Debug)]
pub struct MinuteBudget {
    limit: u32,
    recent: Mutex<std::collections::VecDeque<Instant>>,
}

impl MinuteBudget {
    /// A budget of `limit` requests per minute.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            recent: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Takes one request from the budget, or says no.
    pub fn try_take(&self) -> bool {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= self.limit as usize {
            return false;
        }
        recent.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_probes_after_the_cooldown_and_closes() {
        let breaker = CircuitBreaker::new(3, Duration::from_secs(30));
        for _ in 0..3 {
            assert!(breaker.try_acquire());
            breaker.record(false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.try_acquire(), "fails fast while open");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.try_acquire(), "one probe");
        assert!(!breaker.try_acquire(), "only one");
        breaker.record(false);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed probe opens it again"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(breaker.try_acquire());
        breaker.record(true);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.try_acquire());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_the_minute_rolls() {
        let budget = MinuteBudget::new(2);
        assert!(budget.try_take() && budget.try_take());
        assert!(!budget.try_take());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(budget.try_take());
    }
}
