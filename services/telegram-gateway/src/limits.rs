//! The gateway's limits, all in memory and all restored from the audit trail at start (so a
//! restart does not reset them): per-user and global command rate limits with one notice
//! then silence, the once-per-hour "Unauthorized access" reply per chat, and alert
//! de-duplication and rate limiting.
//!
//! Times are `Instant`s passed in by the caller, so tests drive them without sleeping.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Most keys any one tracker remembers; beyond it, the oldest idle ones are forgotten first,
/// and when none is idle the newcomer is treated as already seen (silence, not amplification).
pub const MAX_TRACKED_KEYS: usize = 10_000;

/// The outcome of one rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Under the limit: go ahead (and it counts).
    Allowed,
    /// Over the limit; `notify` is true for the first refusal only.
    Limited {
        /// Whether this is the first refusal since the limit was reached.
        notify: bool,
        /// When the oldest counted command leaves the window.
        retry_after: Duration,
    },
}

#[derive(Debug, Default)]
struct Window {
    events: VecDeque<Instant>,
    noticed: bool,
}

/// A sliding-window limit: at most `limit` events per `window` for each key.
#[derive(Debug)]
pub struct SlidingWindow<K> {
    limit: usize,
    window: Duration,
    keys: HashMap<K, Window>,
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    /// `limit` events per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: limit as usize,
            window,
            keys: HashMap::new(),
        }
    }

    fn prune(window: &mut Window, span: Duration, now: Instant) {
        while window
            .events
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= span)
        {
            window.events.pop_front();
        }
        if window.events.is_empty() {
            window.noticed = false;
        }
    }

    /// Counts an event for `key` at `now` if the limit allows it.
    pub fn check(&mut self, key: &K, now: Instant) -> RateDecision {
        if !self.keys.contains_key(key) && self.keys.len() >= MAX_TRACKED_KEYS {
            let span = self.window;
            self.keys.retain(|_, w| {
                Self::prune(w, span, now);
                !w.events.is_empty()
            });
            if self.keys.len() >= MAX_TRACKED_KEYS {
                return RateDecision::Limited {
                    notify: false,
                    retry_after: span,
                };
            }
        }
        let span = self.window;
        let window = self.keys.entry(key.clone()).or_default();
        Self::prune(window, span, now);
        if window.events.len() < self.limit {
            window.events.push_back(now);
            window.noticed = false;
            return RateDecision::Allowed;
        }
        let retry_after = window.events.front().map_or(span, |oldest| {
            span.saturating_sub(now.saturating_duration_since(*oldest))
        });
        let notify = !window.noticed;
        window.noticed = true;
        RateDecision::Limited {
            notify,
            retry_after,
        }
    }

    /// Records an event that happened at `at` (restoring state at start); events outside the
    /// window at `now` are ignored.
    pub fn restore(&mut self, key: K, at: Instant, now: Instant) {
        if now.saturating_duration_since(at) >= self.window || self.keys.len() >= MAX_TRACKED_KEYS {
            return;
        }
        let window = self.keys.entry(key).or_default();
        let position = window.events.partition_point(|e| *e <= at);
        window.events.insert(position, at);
    }
}

/// "At most once per key per window": the unauthorized reply per chat, the alert per kind.
#[derive(Debug)]
pub struct OncePerWindow<K> {
    window: Duration,
    last: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Clone> OncePerWindow<K> {
    /// Once per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: HashMap::new(),
        }
    }

    /// True (and remembered) when `key` was not let through within the window before `now`.
    pub fn first(&mut self, key: &K, now: Instant) -> bool {
        if let Some(last) = self.last.get(key)
            && now.saturating_duration_since(*last) < self.window
        {
            return false;
        }
        if !self.last.contains_key(key) && self.last.len() >= MAX_TRACKED_KEYS {
            let window = self.window;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < window);
            if self.last.len() >= MAX_TRACKED_KEYS {
                return false;
            }
        }
        self.last.insert(key.clone(), now);
        true
    }

    /// Forgets `key` (its delivery failed, so a retry must not count as a repeat).
    pub fn forget(&mut self, key: &K) {
        self.last.remove(key);
    }

    /// Remembers that `key` was let through at `at` (restoring state at start).
    pub fn restore(&mut self, key: K, at: Instant) {
        let newest = self.last.get(&key).is_none_or(|last| *last < at);
        if newest && self.last.len() < MAX_TRACKED_KEYS {
            self.last.insert(key, at);
        }
    }
}

/// Turns "this long ago" (from a record's wall-clock time) into an `Instant`, clamping
/// records from the future (clock skew) to now.
pub fn instant_ago(now: Instant, ago: Duration) -> Instant {
    now.checked_sub(ago).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_allows_the_limit_then_one_notice_then_silence() {
        let start = Instant::now();
        let mut limit = SlidingWindow::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(limit.check(&1, start), RateDecision::Allowed);
        }
        let RateDecision::Limited {
            notify,
            retry_after,
        } = limit.check(&1, start)
        else {
            panic!("fourth allowed");
        };
        assert!(notify);
        assert_eq!(retry_after, Duration::from_secs(60));
        assert!(matches!(
            limit.check(&1, start + Duration::from_secs(30)),
            RateDecision::Limited { notify: false, .. }
        ));
        // Another user is not affected.
        assert_eq!(limit.check(&2, start), RateDecision::Allowed);
        // The window slides: after 60 s the first three have left it.
        assert_eq!(
            limit.check(&1, start + Duration::from_secs(60)),
            RateDecision::Allowed
        );
    }

    #[test]
    fn restored_events_count_against_the_limit() {
        let now = Instant::now();
        let mut limit = SlidingWindow::new(2, Duration::from_secs(60));
        limit.restore(7, instant_ago(now, Duration::from_secs(10)), now);
        limit.restore(7, instant_ago(now, Duration::from_secs(5)), now);
        limit.restore(7, instant_ago(now, Duration::from_secs(120)), now);
        let RateDecision::Limited { retry_after, .. } = limit.check(&7, now) else {
            panic!("restored events were ignored");
        };
        assert_eq!(retry_after, Duration::from_secs(50));
    }

    #[test]
    fn once_per_window_per_key() {
        let now = Instant::now();
        let mut once = OncePerWindow::new(Duration::from_secs(3600));
        assert!(once.first(&-5, now));
        assert!(!once.first(&-5, now + Duration::from_secs(3599)));
        assert!(once.first(&-6, now));
        assert!(once.first(&-5, now + Duration::from_secs(3600)));
        let mut restored = OncePerWindow::new(Duration::from_secs(3600));
        restored.restore(-5, instant_ago(now, Duration::from_secs(60)));
        assert!(!restored.first(&-5, now));
    }

    #[test]
    fn key_floods_are_bounded() {
        let now = Instant::now();
        let mut once = OncePerWindow::new(Duration::from_secs(3600));
        for chat in 0..MAX_TRACKED_KEYS as i64 {
            assert!(once.first(&chat, now));
        }
        // Full of fresh keys: a newcomer gets silence, not a reply.
        assert!(!once.first(&-1, now));
        // Once they are stale, they make room.
        assert!(once.first(&-1, now + Duration::from_secs(3600)));
        let mut limit = SlidingWindow::new(1, Duration::from_secs(60));
        for user in 0..MAX_TRACKED_KEYS as i64 {
            assert_eq!(limit.check(&user, now), RateDecision::Allowed);
        }
        assert!(matches!(
            limit.check(&-1, now),
            RateDecision::Limited { notify: false, .. }
        ));
    }
}
