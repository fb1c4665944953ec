//! A Telegram Bot API double: the methods the gateway uses, with the real JSON shapes, the
//! token checked in the `/bot<token>/<method>` path, long polling with offsets, webhooks with
//! the secret-token header, and Telegram's own refusals (401 for a bad token, 409 for a second
//! poller or polling while a webhook is set, 400 for entities that do not parse, 429 with
//! `retry_after`).
//!
//! A control API (`/control/...`) plays the people on the other side: it injects a user's
//! message or button press and reads back what the bot sent. `engramctl chat` and the tests
//! talk to it over HTTP, so it works across processes.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

/// The bot the double plays: `getMe` answers with these.
pub const BOT_ID: i64 = 200_000_001;
/// The bot's username (`/cmd@EngramDevBot` addresses it).
pub const BOT_USERNAME: &str = "EngramDevBot";
/// Telegram's cap on a message's text, in characters.
pub const MAX_TEXT_CHARS: usize = 4096;

/// One thing the bot did, as the control API reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct BotAction {
    /// Position in the double's log, starting at 1.
    pub seq: u64,
    /// `send`, `edit` or `answer` (a callback query answer).
    pub kind: String,
    /// Chat the message went to (0 for callback answers).
    pub chat_id: i64,
    /// The message sent or edited (0 for callback answers).
    pub message_id: i64,
    /// The text as sent (with its markup).
    pub text: String,
    /// `parse_mode` as sent (empty when none).
    pub parse_mode: String,
    /// Inline keyboard buttons as `(label, callback_data)` rows.
    pub buttons: Vec<Vec<(String, String)>>,
}

#[derive(Debug)]
struct Webhook {
    url: String,
    secret_token: Option<String>,
}

#[derive(Debug)]
struct FloodLimits {
    per_chat_per_sec: u32,
    overall_per_sec: u32,
}

#[derive(Debug, Default)]
struct TelegramState {
    tokens: HashSet<String>,
    next_update_id: i64,
    next_message_id: i64,
    next_callback_id: u64,
    pending: VecDeque<Value>,
    messages: BTreeMap<(i64, i64), Value>,
    open_callbacks: HashSet<String>,
    actions: Vec<BotAction>,
    webhook: Option<Webhook>,
    /// Bumped by every getUpdates call: an older poll that sees a newer one ends with 409.
    poll_generation: u64,
    answer_429_next: u32,
    answer_429_method: String,
    retry_after_secs: u64,
    flood: Option<FloodLimits>,
    recent_sends: VecDeque<(Instant, i64)>,
    calls: BTreeMap<String, u64>,
    too_many_requests: u64,
    conflicts: u64,
}

/// A handle to a running Telegram Bot API double.
#[derive(Clone, Debug)]
pub struct TelegramDouble {
    state: Arc<Mutex<TelegramState>>,
    changed: Arc<Notify>,
    addr: SocketAddr,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<TelegramState>>,
    changed: Arc<Notify>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn bot_user() -> Value {
    json!({ "id": BOT_ID, "is_bot": true, "first_name": "Engram", "username": BOT_USERNAME })
}

fn person(user_id: i64, username: &str) -> Value {
    json!({ "id": user_id, "is_bot": false, "first_name": username, "username": username, "language_code": "en" })
}

/// A chat object: negative ids are groups, positive ones private chats (as on Telegram).
fn chat(chat_id: i64, username: &str) -> Value {
    if chat_id < 0 {
        json!({ "id": chat_id, "type": "group", "title": "Engram operators" })
    } else {
        json!({ "id": chat_id, "type": "private", "first_name": username, "username": username })
    }
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut TelegramState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl TelegramDouble {
    /// Starts the double on `addr` (port 0 for a free one), accepting `token`.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(TelegramState {
            tokens: HashSet::from([token.to_owned()]),
            next_update_id: 100_000,
            next_message_id: 1,
            retry_after_secs: 1,
            ..TelegramState::default()
        }));
        let changed = Arc::new(Notify::new());
        let shared = Shared {
            state: state.clone(),
            changed: changed.clone(),
        };
        let router = Router::new()
            .route("/{bot}/{method}", post(bot_api).get(bot_api))
            .route("/control/messages", post(control_message))
            .route("/control/callbacks", post(control_callback))
            .route("/control/actions", get(control_actions))
            .route("/control/stats", get(control_stats))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        tokio::spawn(deliver_webhooks(shared));
        Ok(Self {
            state,
            changed,
            addr,
        })
    }

    /// `http://127.0.0.1:PORT`: the Bot API base URL (the bot adds `/bot<token>/<method>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn shared(&self) -> Shared {
        Shared {
            state: self.state.clone(),
            changed: self.changed.clone(),
        }
    }

    /// Accepts another token for the same bot (a token reissued by BotFather).
    pub fn accept_token(&self, token: &str) {
        self.shared().with(|s| s.tokens.insert(token.to_owned()));
    }

    /// Stops accepting `token`: calls with it answer 401 from now on.
    pub fn revoke_token(&self, token: &str) {
        self.shared().with(|s| s.tokens.remove(token));
    }

    /// The next `count` calls of `method` answer 429 with `retry_after` seconds.
    pub fn answer_429(&self, method: &str, count: u32, retry_after_secs: u64) {
        self.shared().with(|s| {
            s.answer_429_method = method.to_owned();
            s.answer_429_next = count;
            s.retry_after_secs = retry_after_secs;
        });
    }

    /// Enforces Telegram's flood limits on sendMessage: more than `per_chat_per_sec` messages
    /// to one chat, or `overall_per_sec` in total, within a second earns a 429.
    pub fn enforce_flood_limits(&self, per_chat_per_sec: u32, overall_per_sec: u32) {
        self.shared().with(|s| {
            s.flood = Some(FloodLimits {
                per_chat_per_sec,
                overall_per_sec,
            });
        });
    }

    /// Injects a text message from `user_id` in `chat_id`; returns its update id.
    pub fn send_from(&self, chat_id: i64, user_id: i64, text: &str) -> i64 {
        inject_message(
            &self.shared(),
            chat_id,
            user_id,
            &format!("user{user_id}"),
            text,
            None,
        )
    }

    /// As [`Self::send_from`], dated `date` (Unix seconds): a message that waited in
    /// Telegram's queue while the bot was away.
    pub fn send_dated(&self, chat_id: i64, user_id: i64, text: &str, date: i64) -> i64 {
        inject_message(
            &self.shared(),
            chat_id,
            user_id,
            &format!("user{user_id}"),
            text,
            Some(date),
        )
    }

    /// Injects a button press by `user_id` on the bot's message; returns the callback query id.
    ///
    /// # Errors
    ///
    /// When the bot sent no such message in that chat.
    pub fn press(
        &self,
        chat_id: i64,
        user_id: i64,
        message_id: i64,
        data: &str,
    ) -> Result<String, String> {
        inject_callback(&self.shared(), chat_id, user_id, message_id, data)
    }

    /// Everything the bot did after action number `after`.
    pub fn actions_after(&self, after: u64) -> Vec<BotAction> {
        self.shared().with(|s| {
            s.actions
                .iter()
                .filter(|a| a.seq > after)
                .cloned()
                .collect()
        })
    }

    /// Waits (up to `timeout`) until the bot has done something after action number
    /// `after`, and returns what it did; empty when the time ran out. Woken by the action
    /// itself, so a benchmark measures the bot and not a polling interval.
    pub async fn wait_actions_after(&self, after: u64, timeout: Duration) -> Vec<BotAction> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let actions = self.actions_after(after);
            if !actions.is_empty() || tokio::time::Instant::now() >= deadline {
                return actions;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// The number of the newest action so far.
    pub fn last_seq(&self) -> u64 {
        self.shared()
            .with(|s| s.actions.last().map_or(0, |a| a.seq))
    }

    /// Calls received per method, 429s and 409s answered.
    pub fn stats(&self) -> Value {
        self.shared().with(stats_of)
    }
}

fn stats_of(s: &mut TelegramState) -> Value {
    json!({
        "calls": s.calls,
        "too_many_requests": s.too_many_requests,
        "conflicts": s.conflicts,
        "pending_updates": s.pending.len(),
        "webhook": s.webhook.as_ref().map(|w| w.url.clone()),
    })
}

fn push_update(shared: &Shared, build: impl FnOnce(i64, &mut TelegramState) -> Value) -> i64 {
    let id = shared.with(|s| {
        let id = s.next_update_id;
        s.next_update_id += 1;
        let update = build(id, s);
        s.pending.push_back(update);
        id
    });
    shared.changed.notify_waiters();
    id
}

fn inject_message(
    shared: &Shared,
    chat_id: i64,
    user_id: i64,
    username: &str,
    text: &str,
    date: Option<i64>,
) -> i64 {
    push_update(shared, |update_id, s| {
        let message_id = s.next_message_id;
        s.next_message_id += 1;
        let mut message = json!({
            "message_id": message_id,
            "from": person(user_id, username),
            "chat": chat(chat_id, username),
            "date": date.unwrap_or_else(now_unix),
            "text": text,
        });
        if let Some(length) = text.starts_with('/').then(|| {
            text.split_whitespace()
                .next()
                .map_or(0, |c| c.encode_utf16().count())
        }) {
            message["entities"] = json!([{ "type": "bot_command", "offset": 0, "length": length }]);
        }
        json!({ "update_id": update_id, "message": message })
    })
}

fn inject_callback(
    shared: &Shared,
    chat_id: i64,
    user_id: i64,
    message_id: i64,
    data: &str,
) -> Result<String, String> {
    let known = shared.with(|s| s.messages.get(&(chat_id, message_id)).cloned());
    let Some(message) = known else {
        return Err(format!("no bot message {message_id} in chat {chat_id}"));
    };
    let mut callback_id = String::new();
    push_update(shared, |update_id, s| {
        s.next_callback_id += 1;
        callback_id = format!("cbq-{}", s.next_callback_id);
        s.open_callbacks.insert(callback_id.clone());
        json!({
            "update_id": update_id,
            "callback_query": {
                "id": callback_id,
                "from": person(user_id, &format!("user{user_id}")),
                "message": message,
                "chat_instance": format!("ci{chat_id}"),
                "data": data,
            }
        })
    });
    Ok(callback_id)
}

fn api_ok(result: Value) -> Response {
    Json(json!({ "ok": true, "result": result })).into_response()
}

fn api_error(code: u16, description: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({ "ok": false, "error_code": code, "description": description })),
    )
        .into_response()
}

fn too_many(retry_after: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "ok": false, "error_code": 429,
            "description": format!("Too Many Requests: retry after {retry_after}"),
            "parameters": { "retry_after": retry_after },
        })),
    )
        .into_response()
}

/// Parameters from the query string, a JSON body or a form body, as Telegram accepts all three.
fn parameters(
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Map<String, Value> {
    let mut params: Map<String, Value> = query
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("application/json") {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
            params.extend(map);
        }
    } else if let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| rest.split("boundary=").nth(1))
    {
        params.extend(multipart_fields(body, boundary.trim_matches('"')));
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        params.extend(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned()))),
        );
    }
    params
}

/// The text fields of a `multipart/form-data` body (teloxide sends setWebhook this way, since
/// it may carry a certificate file).
fn multipart_fields(body: &[u8], boundary: &str) -> Vec<(String, Value)> {
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    text.split(delimiter.as_str())
        .filter_map(|part| {
            let (headers, value) = part.split_once("\r\n\r\n")?;
            let name = headers
                .split("name=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_owned();
            let value = value.strip_suffix("\r\n").unwrap_or(value);
            Some((name, Value::String(value.to_owned())))
        })
        .collect()
}

fn int(params: &Map<String, Value>, name: &str) -> Option<i64> {
    match params.get(name)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn string<'a>(params: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    params.get(name).and_then(Value::as_str)
}

/// Inline keyboard rows of `(label, callback_data)`.
type Rows = Vec<Vec<(String, String)>>;

/// `reply_markup` may arrive as an object or as a JSON string (form encoding).
fn keyboard(params: &Map<String, Value>) -> Result<(Option<Value>, Rows), String> {
    let markup = match params.get("reply_markup") {
        None | Some(Value::Null) => return Ok((None, Vec::new())),
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|_| "can't parse reply keyboard markup JSON object")?
        }
        Some(other) => other.clone(),
    };
    let Some(rows) = markup["inline_keyboard"].as_array() else {
        return Ok((Some(markup), Vec::new()));
    };
    let mut buttons = Vec::new();
    for row in rows {
        let mut out = Vec::new();
        for button in row.as_array().into_iter().flatten() {
            let text = button["text"].as_str().unwrap_or_default();
            let data = button["callback_data"].as_str().unwrap_or_default();
            if text.is_empty() {
                return Err("BUTTON_TEXT_EMPTY".to_owned());
            }
            // Telegram's limit: 1-64 bytes of callback data.
            if data.is_empty() || data.len() > 64 {
                return Err("BUTTON_DATA_INVALID".to_owned());
            }
            out.push((text.to_owned(), data.to_owned()));
        }
        buttons.push(out);
    }
    Ok((Some(markup), buttons))
}

const HTML_TAGS: [&str; 12] = [
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "code",
    "pre",
    "tg-spoiler",
];

/// Checks text the way Telegram does for `parse_mode=HTML`: only its tags, properly nested,
/// and `&` only as a named or numeric entity. Markdown modes are not used by Engram and are
/// refused, so a test cannot pass by switching mode.
fn check_entities(text: &str, parse_mode: &str) -> Result<(), String> {
    match parse_mode {
        "" => return Ok(()),
        "HTML" => {}
        other => return Err(format!("unsupported parse_mode {other} in this double")),
    }
    let mut open: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(index) = rest.find(['<', '&']) {
        let (head, tail) = rest.split_at(index);
        let _ = head;
        if tail.starts_with('&') {
            let end = tail.find(';').filter(|e| *e <= 10).ok_or_else(|| {
                format!(
                    "can't parse entities: unsupported start tag or entity at byte offset {}",
                    text.len() - tail.len()
                )
            })?;
            let name = &tail[1..end];
            let ok = matches!(name, "lt" | "gt" | "amp" | "quot")
                || name
                    .strip_prefix('#')
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return Err(format!("can't parse entities: unknown entity &{name};"));
            }
            rest = &tail[end + 1..];
        } else {
            let end = tail
                .find('>')
                .ok_or("can't parse entities: unclosed start tag")?;
            let tag = &tail[1..end];
            if let Some(closing) = tag.strip_prefix('/') {
                if open.pop().as_deref() != Some(closing) {
                    return Err(format!("can't parse entities: unmatched end tag {closing}"));
                }
            } else if HTML_TAGS.contains(&tag) {
                open.push(tag.to_owned());
            } else {
                return Err(format!(
                    "can't parse entities: unsupported start tag \"{tag}\""
                ));
            }
            rest = &tail[end + 1..];
        }
    }
    if let Some(tag) = open.pop() {
        return Err(format!(
            "can't parse entities: can't find end tag corresponding to start tag \"{tag}\""
        ));
    }
    Ok(())
}

/// Telegram's text checks for sendMessage and editMessageText.
fn check_text(params: &Map<String, Value>) -> Result<(String, String), String> {
    let text = string(params, "text").unwrap_or_default();
    if text.trim().is_empty() {
        return Err("message text is empty".to_owned());
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err("message is too long".to_owned());
    }
    let parse_mode = string(params, "parse_mode").unwrap_or_default();
    check_entities(text, parse_mode)?;
    Ok((text.to_owned(), parse_mode.to_owned()))
}

/// A message's checked text, parse mode and keyboard.
struct Content {
    text: String,
    parse_mode: String,
    markup: Option<Value>,
    buttons: Rows,
}

/// Telegram's checks on what sendMessage and editMessageText carry.
fn content(params: &Map<String, Value>) -> Result<Content, String> {
    let (text, parse_mode) = check_text(params)?;
    let (markup, buttons) = keyboard(params)?;
    Ok(Content {
        text,
        parse_mode,
        markup,
        buttons,
    })
}

/// Appends to the log of what the bot did.
fn log_action(
    s: &mut TelegramState,
    kind: &str,
    chat_id: i64,
    message_id: i64,
    content: (String, String, Rows),
) {
    let seq = s.actions.len() as u64 + 1;
    let (text, parse_mode, buttons) = content;
    s.actions.push(BotAction {
        seq,
        kind: kind.to_owned(),
        chat_id,
        message_id,
        text,
        parse_mode,
        buttons,
    });
}

fn over_flood_limit(s: &mut TelegramState, chat_id: i64) -> bool {
    let Some(limits) = &s.flood else {
        return false;
    };
    let now = Instant::now();
    while s
        .recent_sends
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) >= Duration::from_secs(1))
    {
        s.recent_sends.pop_front();
    }
    let in_chat = s.recent_sends.iter().filter(|(_, c)| *c == chat_id).count();
    let over = in_chat >= limits.per_chat_per_sec as usize
        || s.recent_sends.len() >= limits.overall_per_sec as usize;
    if !over {
        s.recent_sends.push_back((now, chat_id));
    }
    over
}

/// The Bot API methods the double serves.
const METHODS: [&str; 8] = [
    "getMe",
    "getUpdates",
    "sendMessage",
    "editMessageText",
    "answerCallbackQuery",
    "setWebhook",
    "deleteWebhook",
    "getWebhookInfo",
];

async fn bot_api(
    State(shared): State<Shared>,
    Path((bot, method)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = bot.strip_prefix("bot") else {
        return api_error(404, "Not Found");
    };
    // Telegram matches method names case-insensitively (teloxide sends "GetMe"); the double
    // keys everything by the documented camelCase name.
    let method = METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(&method))
        .map_or(method, |m| (*m).to_owned());
    let params = parameters(&query, &headers, &body);
    let early = shared.with(|s| {
        if !s.tokens.contains(token) {
            return Some(api_error(401, "Unauthorized"));
        }
        *s.calls.entry(method.clone()).or_default() += 1;
        if s.answer_429_next > 0 && s.answer_429_method == method {
            s.answer_429_next -= 1;
            s.too_many_requests += 1;
            return Some(too_many(s.retry_after_secs));
        }
        None
    });
    if let Some(response) = early {
        return response;
    }
    let response = match method.as_str() {
        "getMe" => {
            let mut me = bot_user();
            for (field, value) in [
                ("can_join_groups", true),
                ("can_read_all_group_messages", false),
                ("supports_inline_queries", false),
                ("can_connect_to_business", false),
                ("has_main_web_app", false),
            ] {
                me[field] = json!(value);
            }
            api_ok(me)
        }
        "getUpdates" => get_updates(&shared, &params).await,
        "sendMessage" => send_message(&shared, &params),
        "editMessageText" => edit_message(&shared, &params),
        "answerCallbackQuery" => answer_callback(&shared, &params),
        "setWebhook" => set_webhook(&shared, &params),
        "deleteWebhook" => {
            let drop_pending = params
                .get("drop_pending_updates")
                .is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true"));
            shared.with(|s| {
                s.webhook = None;
                if drop_pending {
                    s.pending.clear();
                }
            });
            shared.changed.notify_waiters();
            api_ok(json!(true))
        }
        "getWebhookInfo" => shared.with(|s| {
            api_ok(json!({
                "url": s.webhook.as_ref().map_or("", |w| w.url.as_str()),
                "has_custom_certificate": false,
                "pending_update_count": s.pending.len(),
            }))
        }),
        _ => api_error(404, "Not Found: method not found"),
    };
    // Wakes the control API's long polls (and `engramctl chat`) for what the bot just did.
    if matches!(
        method.as_str(),
        "sendMessage" | "editMessageText" | "answerCallbackQuery"
    ) {
        shared.changed.notify_waiters();
    }
    response
}

async fn get_updates(shared: &Shared, params: &Map<String, Value>) -> Response {
    let offset = int(params, "offset").unwrap_or(0);
    let limit = int(params, "limit").unwrap_or(100).clamp(1, 100);
    let timeout = Duration::from_secs(
        u64::try_from(int(params, "timeout").unwrap_or(0).clamp(0, 50)).unwrap_or(0),
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let generation = shared.with(|s| {
        s.poll_generation += 1;
        s.poll_generation
    });
    // A newer poll ends this one, as Telegram does with two pollers on one token.
    shared.changed.notify_waiters();
    loop {
        let notified = shared.changed.notified();
        let answer = shared.with(|s| {
            if s.webhook.is_some() {
                s.conflicts += 1;
                return Some(api_error(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
                ));
            }
            if s.poll_generation != generation {
                s.conflicts += 1;
                return Some(api_error(
                    409,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                ));
            }
            // Confirms every update below the offset, as Telegram does.
            if offset != 0 {
                while s
                    .pending
                    .front()
                    .is_some_and(|u| u["update_id"].as_i64().unwrap_or(0) < offset)
                {
                    s.pending.pop_front();
                }
            }
            let batch: Vec<Value> = s
                .pending
                .iter()
                .take(usize::try_from(limit).unwrap_or(100))
                .cloned()
                .collect();
            (!batch.is_empty()).then(|| api_ok(Value::Array(batch)))
        });
        if let Some(response) = answer {
            return response;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            // A new call may have started while this one slept: answer empty, not 409.
            return api_ok(json!([]));
        }
    }
}

fn send_message(shared: &Shared, params: &Map<String, Value>) -> Response {
    let Some(chat_id) = int(params, "chat_id") else {
        return api_error(400, "Bad Request: chat not found");
    };
    let Content {
        text,
        parse_mode,
        markup,
        buttons,
    } = match content(params) {
        Ok(content) => content,
        Err(description) => return api_error(400, &format!("Bad Request: {description}")),
    };
    shared.with(|s| {
        if over_flood_limit(s, chat_id) {
            s.too_many_requests += 1;
            return too_many(s.retry_after_secs);
        }
        let message_id = s.next_message_id;
        s.next_message_id += 1;
        let mut message = json!({
            "message_id": message_id,
            "from": bot_user(),
            "chat": chat(chat_id, &format!("user{chat_id}")),
            "date": now_unix(),
            "text": text,
        });
        if let Some(markup) = markup {
            message["reply_markup"] = markup;
        }
        s.messages.insert((chat_id, message_id), message.clone());
        log_action(s, "send", chat_id, message_id, (text, parse_mode, buttons));
        api_ok(message)
    })
}

fn edit_message(shared: &Shared, params: &Map<String, Value>) -> Response {
    let (Some(chat_id), Some(message_id)) = (int(params, "chat_id"), int(params, "message_id"))
    else {
        return api_error(400, "Bad Request: message to edit not found");
    };
    let Content {
        text,
        parse_mode,
        markup,
        buttons,
    } = match content(params) {
        Ok(content) => content,
        Err(description) => return api_error(400, &format!("Bad Request: {description}")),
    };
    shared.with(|s| {
        let Some(message) = s.messages.get_mut(&(chat_id, message_id)) else {
            return api_error(400, "Bad Request: message to edit not found");
        };
        if message["text"].as_str() == Some(text.as_str())
            && message.get("reply_markup") == markup.as_ref()
        {
            return api_error(
                400,
                "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
            );
        }
        message["text"] = Value::String(text.clone());
        match markup {
            Some(markup) => message["reply_markup"] = markup,
            None => {
                if let Some(object) = message.as_object_mut() {
                    object.remove("reply_markup");
                }
            }
        }
        message["edit_date"] = json!(now_unix());
        let edited = message.clone();
        log_action(s, "edit", chat_id, message_id, (text, parse_mode, buttons));
        api_ok(edited)
    })
}

fn answer_callback(shared: &Shared, params: &Map<String, Value>) -> Response {
    let id = string(params, "callback_query_id")
        .unwrap_or_default()
        .to_owned();
    shared.with(|s| {
        if !s.open_callbacks.remove(&id) {
            return api_error(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            );
        }
        let text = string(params, "text").unwrap_or_default().to_owned();
        log_action(s, "answer", 0, 0, (text, String::new(), Vec::new()));
        api_ok(json!(true))
    })
}

fn set_webhook(shared: &Shared, params: &Map<String, Value>) -> Response {
    let url = string(params, "url").unwrap_or_default();
    if url.is_empty() {
        shared.with(|s| s.webhook = None);
        return api_ok(json!(true));
    }
    if url::Url::parse(url).is_err() {
        return api_error(400, "Bad Request: bad webhook: Failed to resolve host");
    }
    let secret_token = string(params, "secret_token").map(str::to_owned);
    // Telegram's rule for the secret: 1-256 characters of A-Z, a-z, 0-9, _ and -.
    if secret_token.as_ref().is_some_and(|t| {
        t.is_empty()
            || t.len() > 256
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        return api_error(
            400,
            "Bad Request: bad webhook: secret token contains unallowed characters",
        );
    }
    shared.with(|s| {
        s.webhook = Some(Webhook {
            url: url.to_owned(),
            secret_token,
        });
    });
    shared.changed.notify_waiters();
    api_ok(json!(true))
}

/// Posts pending updates to the webhook, oldest first; a failed delivery is retried.
async fn deliver_webhooks(shared: Shared) {
    // reqwest is built without a default TLS provider (see TOOLS.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(client) = reqwest::Client::builder().build() else {
        return;
    };
    loop {
        let notified = shared.changed.notified();
        let next = shared.with(|s| {
            let webhook = s.webhook.as_ref()?;
            let update = s.pending.front()?.clone();
            Some((webhook.url.clone(), webhook.secret_token.clone(), update))
        });
        let Some((url, secret, update)) = next else {
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            continue;
        };
        let mut request = client
            .post(&url)
            .json(&update)
            .timeout(Duration::from_secs(10));
        if let Some(secret) = secret {
            request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
        }
        let delivered = request
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if delivered {
            shared.with(|s| {
                if s.pending.front() == Some(&update) {
                    s.pending.pop_front();
                }
            });
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[derive(Debug, Deserialize)]
struct InjectMessage {
    chat_id: i64,
    user_id: i64,
    #[serde(default)]
    username: Option<String>,
    text: String,
}

async fn control_message(
    State(shared): State<Shared>,
    Json(body): Json<InjectMessage>,
) -> Response {
    let username = body
        .username
        .unwrap_or_else(|| format!("user{}", body.user_id));
    let update_id = inject_message(
        &shared,
        body.chat_id,
        body.user_id,
        &username,
        &body.text,
        None,
    );
    Json(json!({ "update_id": update_id })).into_response()
}

#[derive(Debug, Deserialize)]
struct InjectCallback {
    chat_id: i64,
    user_id: i64,
    message_id: i64,
    data: String,
}

async fn control_callback(
    State(shared): State<Shared>,
    Json(body): Json<InjectCallback>,
) -> Response {
    match inject_callback(
        &shared,
        body.chat_id,
        body.user_id,
        body.message_id,
        &body.data,
    ) {
        Ok(id) => Json(json!({ "callback_query_id": id })).into_response(),
        Err(error) => (StatusCode::NOT_FOUND, Json(json!({ "error": error }))).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ActionsQuery {
    #[serde(default)]
    after: u64,
    /// Waits up to this many seconds for a new action (a long poll for `engramctl chat`).
    #[serde(default)]
    wait: u64,
}

async fn control_actions(
    State(shared): State<Shared>,
    Query(query): Query<ActionsQuery>,
) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(query.wait.min(30));
    loop {
        let notified = shared.changed.notified();
        let actions: Vec<BotAction> = shared.with(|s| {
            s.actions
                .iter()
                .filter(|a| a.seq > query.after)
                .cloned()
                .collect()
        });
        if !actions.is_empty() || tokio::time::Instant::now() >= deadline {
            return Json(actions).into_response();
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn control_stats(State(shared): State<Shared>) -> Response {
    Json(shared.with(stats_of)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_checks_match_telegrams_rules() {
        assert!(check_entities("<b>bold</b> &lt;x&gt; &amp; &#39;", "HTML").is_ok());
        assert!(check_entities("<code>a<b</code>", "HTML").is_err());
        assert!(check_entities("<script>x</script>", "HTML").is_err());
        assert!(check_entities("a & b", "HTML").is_err());
        assert!(check_entities("<b>open", "HTML").is_err());
        assert!(check_entities("<b><i>x</b></i>", "HTML").is_err());
        assert!(check_entities("a & b <x>", "").is_ok());
        assert!(check_entities("*x*", "MarkdownV2").is_err());
    }

    #[test]
    fn multipart_text_fields_are_read() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"url\"\r\n\r\nhttps://h/x\r\n--XyZ\r\nContent-Disposition: form-data; name=\"secret_token\"\r\n\r\nabc\r\n--XyZ--\r\n";
        let fields = multipart_fields(body.as_bytes(), "XyZ");
        assert_eq!(
            fields,
            vec![
                ("url".to_owned(), json!("https://h/x")),
                ("secret_token".to_owned(), json!("abc"))
            ]
        );
    }
}
