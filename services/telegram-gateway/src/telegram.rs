//! The connection to Telegram: a teloxide `Bot` behind teloxide's `Throttle` (so bursts wait
//! for Telegram's limits instead of earning 429s), rebuilt whenever Vault hands out a new bot
//! token, and the two ways updates arrive: long polling and a webhook.
//!
//! The bot token is part of every Bot API URL, so it can surface in a network error's text.
//! Every error leaving this module goes through [`redact`] first.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use teloxide::adaptors::Throttle;
use teloxide::adaptors::throttle::Limits;
use teloxide::payloads::{
    AnswerCallbackQuerySetters, EditMessageTextSetters, GetUpdatesSetters, SendMessageSetters,
    SetWebhookSetters,
};
use teloxide::requests::{Requester, RequesterExt};
use teloxide::types::{
    AllowedUpdate, CallbackQueryId, ChatId, InlineKeyboardButton, InlineKeyboardMarkup, MessageId,
    ParseMode, Update,
};
use teloxide::{ApiError, Bot, RequestError};
use url::Url;

use crate::config::SendLimits;

/// A Bot API call that failed, with the token removed from its description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("telegram {method}: {description}")]
pub struct TelegramError {
    /// The Bot API method.
    pub method: &'static str,
    /// What went wrong (never the token).
    pub description: String,
    /// A short, bounded label for metrics: `unauthorized`, `conflict`, `bad_request`,
    /// `retry_after`, `network`, `other`.
    pub kind: &'static str,
}

/// Replaces every occurrence of `token` (also percent-encoded) in `text`.
pub fn redact(text: &str, token: &str) -> String {
    if token.is_empty() {
        return text.to_owned();
    }
    let encoded = token.replace(':', "%3A");
    text.replace(token, "[bot token]")
        .replace(&encoded, "[bot token]")
}

fn classify(error: &RequestError) -> &'static str {
    match error {
        RequestError::Api(ApiError::InvalidToken) => "unauthorized",
        RequestError::Api(ApiError::TerminatedByOtherGetUpdates | ApiError::CantGetUpdates) => {
            "conflict"
        }
        RequestError::Api(_) => "bad_request",
        RequestError::RetryAfter(_) => "retry_after",
        RequestError::Network(_) | RequestError::Io(_) => "network",
        _ => "other",
    }
}

/// A button under a message: its label and its callback data.
pub type Button = (String, String);

/// The Bot API client: throttled to Telegram's limits, or not (see [`SendLimits`]).
enum Client {
    Throttled(Throttle<Bot>),
    Direct(Bot),
}

/// Runs `$call` (an expression over `$bot`, awaited inside) on whichever client is in use.
macro_rules! on_client {
    ($client:expr, |$bot:ident| $call:expr) => {
        match $client {
            Client::Throttled($bot) => $call,
            Client::Direct($bot) => $call,
        }
    };
}

/// One bot token's client.
struct Connection {
    bot: Client,
    token: SecretString,
}

/// The bot, as the rest of the gateway uses it; the token inside can change at any time.
#[derive(Clone)]
pub struct TelegramBot {
    api_url: Url,
    limits: SendLimits,
    request_timeout: Duration,
    connection: Arc<ArcSwapOption<Connection>>,
}

impl std::fmt::Debug for TelegramBot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token (teloxide's own Bot would print it).
        f.debug_struct("TelegramBot")
            .field("api_url", &self.api_url.as_str())
            .field("connected", &self.connection.load().is_some())
            .finish_non_exhaustive()
    }
}

impl TelegramBot {
    /// A bot for the API at `api_url`; no token yet. `request_timeout` must exceed the
    /// long-poll timeout.
    pub fn new(api_url: Url, limits: SendLimits, request_timeout: Duration) -> Self {
        Self {
            api_url,
            limits,
            request_timeout,
            connection: Arc::new(ArcSwapOption::empty()),
        }
    }

    /// Switches to `token` (first use or a rotation). Requests in flight finish on the old
    /// connection; new ones use the new token.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn set_token(&self, token: &SecretString) -> Result<(), String> {
        let client = teloxide::net::default_reqwest_settings()
            .timeout(self.request_timeout)
            .build()
            .map_err(|e| format!("cannot build the Telegram HTTP client: {e}"))?;
        let bot = Bot::with_client(token.expose_secret(), client).set_api_url(self.api_url.clone());
        let bot = if self.limits.throttle {
            Client::Throttled(bot.throttle(Limits {
                messages_per_sec_chat: self.limits.per_sec_chat,
                messages_per_min_chat: self.limits.per_min_chat,
                messages_per_min_channel_or_supergroup: self.limits.per_min_chat,
                messages_per_sec_overall: self.limits.per_sec_overall,
            }))
        } else {
            Client::Direct(bot)
        };
        self.connection.store(Some(Arc::new(Connection {
            bot,
            token: token.clone(),
        })));
        Ok(())
    }

    /// Whether the token in use is `token`.
    pub fn uses_token(&self, token: &SecretString) -> bool {
        self.connection
            .load()
            .as_ref()
            .is_some_and(|c| c.token.expose_secret() == token.expose_secret())
    }

    fn connection(&self, method: &'static str) -> Result<Arc<Connection>, TelegramError> {
        self.connection.load_full().ok_or(TelegramError {
            method,
            description: "no bot token loaded yet".to_owned(),
            kind: "other",
        })
    }

    fn error(connection: &Connection, method: &'static str, error: &RequestError) -> TelegramError {
        TelegramError {
            method,
            description: redact(&error.to_string(), connection.token.expose_secret()),
            kind: classify(error),
        }
    }

    /// `getMe`: the bot's username.
    ///
    /// # Errors
    ///
    /// When Telegram refuses or cannot be reached.
    pub async fn username(&self) -> Result<String, TelegramError> {
        let connection = self.connection("getMe")?;
        let me = on_client!(&connection.bot, |bot| bot.get_me().await)
            .map_err(|e| Self::error(&connection, "getMe", &e))?;
        Ok(me.user.username.unwrap_or_default())
    }

    fn keyboard(buttons: &[Button]) -> Option<InlineKeyboardMarkup> {
        (!buttons.is_empty()).then(|| {
            InlineKeyboardMarkup::new([buttons
                .iter()
                .map(|(label, data)| InlineKeyboardButton::callback(label.clone(), data.clone()))
                .collect::<Vec<_>>()])
        })
    }

    /// Sends `html` (already escaped) to `chat_id`, with optional buttons; waits for the
    /// throttle when Telegram's limits require it (and out a 429's `retry_after`). Returns the
    /// new message's id.
    ///
    /// # Errors
    ///
    /// When Telegram refuses the message or cannot be reached.
    pub async fn send(
        &self,
        chat_id: i64,
        html: &str,
        buttons: &[Button],
    ) -> Result<i32, TelegramError> {
        self.with_one_retry("sendMessage", |connection| async move {
            on_client!(&connection.bot, |bot| {
                let mut request = bot
                    .send_message(ChatId(chat_id), html)
                    .parse_mode(ParseMode::Html);
                if let Some(keyboard) = Self::keyboard(buttons) {
                    request = request.reply_markup(keyboard);
                }
                request.await.map(|message| message.id.0)
            })
        })
        .await
    }

    /// Runs a call, waiting once if Telegram answers 429 (the throttle retries sends itself;
    /// this covers edits, button answers and the unthrottled client).
    async fn with_one_retry<'a, T, F, Fut>(
        &self,
        method: &'static str,
        call: F,
    ) -> Result<T, TelegramError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, RequestError>> + 'a,
    {
        let connection = self.connection(method)?;
        match call(connection.clone()).await {
            Err(RequestError::RetryAfter(after)) => {
                tokio::time::sleep(after.duration()).await;
                call(connection.clone())
                    .await
                    .map_err(|e| Self::error(&connection, method, &e))
            }
            other => other.map_err(|e| Self::error(&connection, method, &e)),
        }
    }

    /// Replaces a message's text (and buttons: none when `buttons` is empty).
    ///
    /// # Errors
    ///
    /// When Telegram refuses or cannot be reached.
    pub async fn edit(
        &self,
        chat_id: i64,
        message_id: i32,
        html: &str,
        buttons: &[Button],
    ) -> Result<(), TelegramError> {
        self.with_one_retry("editMessageText", |connection| async move {
            on_client!(&connection.bot, |bot| {
                let mut request = bot
                    .edit_message_text(ChatId(chat_id), MessageId(message_id), html)
                    .parse_mode(ParseMode::Html);
                if let Some(keyboard) = Self::keyboard(buttons) {
                    request = request.reply_markup(keyboard);
                }
                request.await.map(|_| ())
            })
        })
        .await
    }

    /// Answers a button press (the small notice the client shows).
    ///
    /// # Errors
    ///
    /// When Telegram refuses or cannot be reached.
    pub async fn answer(&self, callback_id: &str, text: &str) -> Result<(), TelegramError> {
        self.with_one_retry("answerCallbackQuery", |connection| async move {
            on_client!(&connection.bot, |bot| bot
                .answer_callback_query(CallbackQueryId(callback_id.to_owned()))
                .text(text)
                .await
                .map(|_| ()))
        })
        .await
    }

    /// One long poll: updates from `offset`, waiting up to `timeout` for one to arrive.
    ///
    /// # Errors
    ///
    /// When Telegram refuses (a bad token, another poller, a webhook set) or cannot be reached.
    pub async fn poll(&self, offset: i32, timeout: Duration) -> Result<Vec<Update>, TelegramError> {
        let connection = self.connection("getUpdates")?;
        let seconds = u32::try_from(timeout.as_secs()).unwrap_or(25);
        on_client!(&connection.bot, |bot| bot
            .get_updates()
            .offset(offset)
            .timeout(seconds)
            .allowed_updates([AllowedUpdate::Message, AllowedUpdate::CallbackQuery])
            .await)
        .map_err(|e| Self::error(&connection, "getUpdates", &e))
    }

    /// `deleteWebhook`, before polling (Telegram refuses getUpdates while one is set).
    ///
    /// # Errors
    ///
    /// When Telegram refuses or cannot be reached.
    pub async fn delete_webhook(&self) -> Result<(), TelegramError> {
        self.with_one_retry("deleteWebhook", |connection| async move {
            on_client!(&connection.bot, |bot| bot
                .delete_webhook()
                .await
                .map(|_| ()))
        })
        .await
    }

    /// `setWebhook` with the secret Telegram will send back in every delivery's header.
    ///
    /// # Errors
    ///
    /// When Telegram refuses or cannot be reached.
    pub async fn set_webhook(&self, url: &Url, secret: &SecretString) -> Result<(), TelegramError> {
        self.with_one_retry("setWebhook", |connection| async move {
            on_client!(&connection.bot, |bot| bot
                .set_webhook(url.clone())
                .secret_token(secret.expose_secret().to_owned())
                .allowed_updates([AllowedUpdate::Message, AllowedUpdate::CallbackQuery])
                .await
                .map(|_| ()))
        })
        .await
    }
}

/// Compares a presented webhook secret with the expected one in constant time (over their
/// SHA-256 digests, so lengths leak nothing either).
pub fn secret_matches(presented: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected);
    let difference = a
        .iter()
        .zip(b.iter())
        .fold(0_u8, |acc, (x, y)| acc | (x ^ y));
    difference == 0 && !expected.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_covers_plain_and_encoded_tokens() {
        let token = "123:canary-token-value";
        let text = "error sending request for url (http://h/bot123:canary-token-value/getMe) and bot123%3Acanary-token-value";
        let redacted = redact(text, token);
        assert!(!redacted.contains("canary-token-value"), "{redacted}");
        assert_eq!(redacted.matches("[bot token]").count(), 2);
    }

    #[test]
    fn webhook_secrets_compare_exactly() {
        assert!(secret_matches(b"s3cr3t", b"s3cr3t"));
        assert!(!secret_matches(b"s3cr3", b"s3cr3t"));
        assert!(!secret_matches(b"", b""));
        assert!(!secret_matches(b"S3cr3t", b"s3cr3t"));
    }

    #[tokio::test]
    async fn debug_output_has_no_token() {
        let bot = TelegramBot::new(
            Url::parse("http://127.0.0.1:9").expect("url"),
            SendLimits {
                throttle: true,
                per_sec_chat: 1,
                per_min_chat: 20,
                per_sec_overall: 30,
            },
            Duration::from_secs(5),
        );
        bot.set_token(&SecretString::from("42:canary-debug-token"))
            .expect("client");
        assert!(!format!("{bot:?}").contains("canary-debug-token"));
    }
}
