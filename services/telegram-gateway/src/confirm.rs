//! Trade confirmations: a buy, sell or cancel waits behind Confirm/Cancel buttons bound to a
//! one-time nonce. Only the person who asked can press them; a nonce is taken once (a double
//! press finds it already taken and places nothing); after its time to live it is expired.
//!
//! The nonce is also the signer's idempotency key (and so the exchange's `newClientOrderId`):
//! even a confirmation replayed across a gateway restart cannot place a second order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use crate::grammar::Command;

/// Most confirmations one person may have open at once.
pub const MAX_OPEN_PER_USER: usize = 5;
/// Callback data prefix of the Confirm button.
pub const CONFIRM_PREFIX: &str = "ok:";
/// Callback data prefix of the Cancel button.
pub const CANCEL_PREFIX: &str = "no:";

/// A fresh nonce: `eg` and 32 hex characters from the system's secure random source, which
/// fits Binance's `newClientOrderId` (at most 36 of `[A-Za-z0-9_-]`).
///
/// # Errors
///
/// When the system's random source fails.
pub fn new_nonce(random: &SystemRandom) -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0_u8; 16];
    random.fill(&mut bytes)?;
    Ok(format!("eg{}", hex::encode(bytes)))
}

/// A trade waiting for its confirmation.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The command to run once confirmed (an order or a cancel).
    pub command: Command,
    /// Who asked: only they may confirm.
    pub user_id: i64,
    /// Where the question was asked.
    pub chat_id: i64,
    /// The message with the buttons, once sent.
    pub message_id: Option<i32>,
    /// The correlation id of the command that asked.
    pub correlation_id: String,
    created: Instant,
}

/// What pressing a button amounts to.
#[derive(Debug, Clone)]
pub enum Press {
    /// The right person, in time: run it.
    Confirmed(Pending),
    /// The right person said no.
    Cancelled(Pending),
    /// Past its time to live (the entry is gone).
    Expired(Pending),
    /// Someone else pressed; the confirmation stays open for its owner.
    WrongUser,
    /// Already confirmed or cancelled, or never existed (a double press, or a restart).
    Unknown,
}

/// Why a confirmation could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The person already has [`MAX_OPEN_PER_USER`] open.
    TooMany,
}

/// The open confirmations, by nonce.
#[derive(Debug)]
pub struct Confirmations {
    ttl: Duration,
    open: HashMap<String, Pending>,
}

impl Confirmations {
    /// Confirmations valid for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            open: HashMap::new(),
        }
    }

    /// How long a confirmation stays valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Drops expired entries and returns them (so their messages can say "expired").
    pub fn sweep(&mut self, now: Instant) -> Vec<(String, Pending)> {
        let ttl = self.ttl;
        let expired: Vec<String> = self
            .open
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.created) >= ttl)
            .map(|(nonce, _)| nonce.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|nonce| self.open.remove(&nonce).map(|p| (nonce, p)))
            .collect()
    }

    /// Opens a confirmation under `nonce`.
    ///
    /// # Errors
    ///
    /// When the person has too many open.
    pub fn open(
        &mut self,
        nonce: String,
        command: Command,
        user_id: i64,
        chat_id: i64,
        correlation_id: String,
        now: Instant,
    ) -> Result<(), OpenError> {
        let ttl = self.ttl;
        let open_for_user = self
            .open
            .values()
            .filter(|p| p.user_id == user_id && now.saturating_duration_since(p.created) < ttl)
            .count();
        if open_for_user >= MAX_OPEN_PER_USER {
            return Err(OpenError::TooMany);
        }
        self.open.insert(
            nonce,
            Pending {
                command,
                user_id,
                chat_id,
                message_id: None,
                correlation_id,
                created: now,
            },
        );
        Ok(())
    }

    /// Records the message that carries the buttons.
    pub fn set_message(&mut self, nonce: &str, message_id: i32) {
        if let Some(pending) = self.open.get_mut(nonce) {
            pending.message_id = Some(message_id);
        }
    }

    /// Forgets a confirmation whose question could not be sent.
    pub fn discard(&mut self, nonce: &str) {
        self.open.remove(nonce);
    }

    /// A press of Confirm (`confirm` true) or Cancel by `user_id` at `now`.
    pub fn press(&mut self, nonce: &str, user_id: i64, confirm: bool, now: Instant) -> Press {
        let Some(pending) = self.open.get(nonce) else {
            return Press::Unknown;
        };
        if pending.user_id != user_id {
            return Press::WrongUser;
        }
        let expired = now.saturating_duration_since(pending.created) >= self.ttl;
        let Some(pending) = self.open.remove(nonce) else {
            return Press::Unknown;
        };
        if expired {
            Press::Expired(pending)
        } else if confirm {
            Press::Confirmed(pending)
        } else {
            Press::Cancelled(pending)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(confirmations: &mut Confirmations, nonce: &str, user: i64, now: Instant) {
        confirmations
            .open(
                nonce.to_owned(),
                Command::Status,
                user,
                1,
                "c".to_owned(),
                now,
            )
            .expect("open");
    }

    #[test]
    fn nonces_fit_the_exchange_and_differ() {
        let random = SystemRandom::new();
        let a = new_nonce(&random).expect("nonce");
        let b = new_nonce(&random).expect("nonce");
        assert_ne!(a, b);
        assert_eq!(a.len(), 34);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert!(
            format!("{CONFIRM_PREFIX}{a}").len() <= 64,
            "Telegram's callback data limit"
        );
    }

    #[test]
    fn only_the_owner_confirms_and_only_once() {
        let now = Instant::now();
        let mut confirmations = Confirmations::new(Duration::from_secs(60));
        open(&mut confirmations, "n1", 7, now);
        assert!(matches!(
            confirmations.press("n1", 8, true, now),
            Press::WrongUser
        ));
        assert!(
            matches!(confirmations.press("n1", 7, true, now), Press::Confirmed(p) if p.user_id == 7)
        );
        assert!(matches!(
            confirmations.press("n1", 7, true, now),
            Press::Unknown
        ));
        open(&mut confirmations, "n2", 7, now);
        assert!(matches!(
            confirmations.press("n2", 7, false, now),
            Press::Cancelled(_)
        ));
        assert!(matches!(
            confirmations.press("n2", 7, true, now),
            Press::Unknown
        ));
    }

    #[test]
    fn expiry_is_reported_once_and_swept() {
        let now = Instant::now();
        let mut confirmations = Confirmations::new(Duration::from_secs(60));
        open(&mut confirmations, "late", 7, now);
        let later = now + Duration::from_secs(60);
        assert!(matches!(
            confirmations.press("late", 7, true, later),
            Press::Expired(_)
        ));
        assert!(matches!(
            confirmations.press("late", 7, true, later),
            Press::Unknown
        ));
        open(&mut confirmations, "swept", 7, now);
        assert!(
            confirmations
                .sweep(now + Duration::from_secs(59))
                .is_empty()
        );
        assert_eq!(confirmations.sweep(later).len(), 1);
    }

    #[test]
    fn open_confirmations_per_user_are_capped() {
        let now = Instant::now();
        let mut confirmations = Confirmations::new(Duration::from_secs(60));
        for i in 0..MAX_OPEN_PER_USER {
            open(&mut confirmations, &format!("n{i}"), 7, now);
        }
        let refused = confirmations.open("x".to_owned(), Command::Status, 7, 1, String::new(), now);
        assert_eq!(refused, Err(OpenError::TooMany));
        open(&mut confirmations, "other", 8, now);
    }
}
