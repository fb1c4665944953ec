//! Who may talk to the bot: the allow-listed chats, the users and their roles, and the admin
//! chat, all read from `engram/telegram` in Vault (so they rotate like any secret).
//!
//! Fields (strings, as KV stores them): `allowed_chats` = `"-1001234,5678"`, `users` =
//! `"5678:admin,91011:viewer"`, `admin_chat` = `"5678"`. Both the chat and the user must be
//! allowed: unlike a chat-id-only check, a stranger in an allowed group gets nothing.

use std::collections::{HashMap, HashSet};

use engram_runtime::secrets::SecretBundle;
use secrecy::ExposeSecret;

use crate::grammar::Role;

/// The access rules of one secret version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessList {
    chats: HashSet<i64>,
    users: HashMap<i64, Role>,
    /// Where security alerts go.
    pub admin_chat: i64,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The chat is not allow-listed.
    Chat,
    /// The chat is allowed, the user is not.
    User,
}

impl Denied {
    /// `chat` or `user`, for metrics and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::User => "user",
        }
    }
}

fn id(text: &str) -> Option<i64> {
    let text = text.trim();
    let digits = text.strip_prefix('-').unwrap_or(text);
    (!digits.is_empty() && digits.len() <= 19 && digits.chars().all(|c| c.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
        .filter(|id| *id != 0)
}

impl AccessList {
    /// Parses the three fields.
    ///
    /// # Errors
    ///
    /// Which field is wrong and where (values are not repeated: they come from a secret).
    pub fn parse(allowed_chats: &str, users: &str, admin_chat: &str) -> Result<Self, String> {
        let mut chats = HashSet::new();
        for (index, entry) in allowed_chats.split(',').enumerate() {
            let chat = id(entry)
                .ok_or_else(|| format!("allowed_chats entry {} is not a chat id", index + 1))?;
            chats.insert(chat);
        }
        let mut roles = HashMap::new();
        for (index, entry) in users.split(',').enumerate() {
            let (user, role) = entry
                .split_once(':')
                .ok_or_else(|| format!("users entry {} is not USER_ID:ROLE", index + 1))?;
            let user = id(user)
                .filter(|u| *u > 0)
                .ok_or_else(|| format!("users entry {} has no valid user id", index + 1))?;
            let role = Role::parse(role.trim()).ok_or_else(|| {
                format!(
                    "users entry {}: role must be viewer, trader or admin",
                    index + 1
                )
            })?;
            if roles.insert(user, role).is_some() {
                return Err(format!("users entry {} repeats a user", index + 1));
            }
        }
        let admin_chat = id(admin_chat).ok_or("admin_chat is not a chat id")?;
        Ok(Self {
            chats,
            users: roles,
            admin_chat,
        })
    }

    /// Reads the fields from a secret bundle.
    ///
    /// # Errors
    ///
    /// As [`Self::parse`], or a missing field.
    pub fn from_bundle(bundle: &SecretBundle) -> Result<Self, String> {
        let field = |name: &str| {
            bundle
                .field(name)
                .map(|v| v.expose_secret().to_owned())
                .ok_or_else(|| format!("{name} is missing"))
        };
        Self::parse(
            &field("allowed_chats")?,
            &field("users")?,
            &field("admin_chat")?,
        )
    }

    /// The user's role, when both the chat and the user are allowed.
    ///
    /// # Errors
    ///
    /// Which of the two is not allowed (the chat is checked first).
    pub fn authorize(&self, chat_id: i64, user_id: i64) -> Result<Role, Denied> {
        if !self.chats.contains(&chat_id) {
            return Err(Denied::Chat);
        }
        self.users.get(&user_id).copied().ok_or(Denied::User)
    }

    /// How many users are configured (for `/status` and the doctor).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_chat_and_user_must_be_allowed() {
        let access = AccessList::parse("-100200, 42", "42:admin, 7:viewer", "42").expect("valid");
        assert_eq!(access.authorize(42, 42), Ok(Role::Admin));
        assert_eq!(access.authorize(-100200, 7), Ok(Role::Viewer));
        assert_eq!(access.authorize(-100200, 8), Err(Denied::User));
        assert_eq!(access.authorize(99, 42), Err(Denied::Chat));
        assert_eq!(access.admin_chat, 42);
        assert_eq!(access.user_count(), 2);
    }

    #[test]
    fn bad_fields_are_named_without_their_values() {
        let cases = [
            ("", "1:admin", "1", "allowed_chats entry 1"),
            ("1,x", "1:admin", "1", "allowed_chats entry 2"),
            ("1", "1", "1", "users entry 1 is not USER_ID:ROLE"),
            ("1", "1:root", "1", "role must be"),
            ("1", "-5:admin", "1", "no valid user id"),
            ("1", "1:admin,1:viewer", "1", "repeats a user"),
            ("1", "1:admin", "", "admin_chat"),
            ("1", "1:admin", "0", "admin_chat"),
            ("1", "1:admin", "99999999999999999999", "admin_chat"),
            ("+1", "1:admin", "1", "allowed_chats entry 1"),
        ];
        for (chats, users, admin, expected) in cases {
            let error = AccessList::parse(chats, users, admin).expect_err(expected);
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains("root") && !error.contains("999"), "{error}");
        }
    }
}
