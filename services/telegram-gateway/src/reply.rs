//! Replies as Telegram HTML: every piece of text that did not come from this file goes
//! through [`escape`], so neither a person's text nor a service's message can inject markup
//! (or break Telegram's parser and lose the reply).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engram_proto::v1::{
    AdviceAction, AdviseResponse, AuditRecord, Balance, Order, OrderSide, OrderStatus, OrderType,
    SignerStatus,
};

use crate::grammar::{Command, OrderRef, OrderRequest, Role, USAGE};

/// Most list lines one reply shows.
pub const MAX_LINES: usize = 20;
/// Most characters of service-provided free text (a rationale, an error) in a reply.
pub const MAX_FREE_TEXT: usize = 600;

/// Escapes text for `parse_mode=HTML` (Telegram's rules: `&`, `<`, `>`; quotes for safety).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Escapes at most `max` characters of `text`, marking a cut with an ellipsis.
pub fn escape_bounded(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        escape(text)
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{}…", escape(&cut))
    }
}

/// `/help` for a role: the commands it may run.
pub fn help(role: Role) -> String {
    let mut lines = vec![format!("<b>Commands for the {} role</b>", role.as_str())];
    lines.extend(
        USAGE
            .iter()
            .filter(|(_, _, needed)| *needed <= role)
            .map(|(_, usage, _)| format!("<code>{}</code>", escape(usage))),
    );
    lines.push("Trades wait for your confirmation.".to_owned());
    lines.join("\n")
}

/// `/whoami`
pub fn whoami(user_id: i64, chat_id: i64, role: Role) -> String {
    format!(
        "user <code>{user_id}</code> in chat <code>{chat_id}</code>, role <b>{}</b>",
        role.as_str()
    )
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(time: Option<&prost_types::Timestamp>) -> String {
    let Some(time) = time else {
        return "unknown".to_owned();
    };
    let secs = time.seconds.max(0);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to a calendar date (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn side(side: i32) -> &'static str {
    match OrderSide::try_from(side) {
        Ok(OrderSide::Buy) => "BUY",
        Ok(OrderSide::Sell) => "SELL",
        _ => "?",
    }
}

fn status(status: i32) -> &'static str {
    match OrderStatus::try_from(status) {
        Ok(OrderStatus::New) => "NEW",
        Ok(OrderStatus::PartiallyFilled) => "PARTIALLY_FILLED",
        Ok(OrderStatus::Filled) => "FILLED",
        Ok(OrderStatus::Canceled) => "CANCELED",
        Ok(OrderStatus::Rejected) => "REJECTED",
        Ok(OrderStatus::Expired) => "EXPIRED",
        Ok(OrderStatus::Unknown) => "UNKNOWN (being reconciled)",
        _ => "?",
    }
}

/// One order as a line.
pub fn order_line(order: &Order) -> String {
    let price = match OrderType::try_from(order.r#type) {
        Ok(OrderType::Limit) => format!(" @ {}", escape(&order.limit_price)),
        _ => " at market".to_owned(),
    };
    format!(
        "#{} {} {} {}{price}: <b>{}</b>, filled {}",
        order.exchange_order_id,
        side(order.side),
        escape(&order.quantity),
        escape(&order.symbol),
        status(order.status),
        escape(&order.executed_quantity),
    )
}

/// `/orders`
pub fn orders(list: &[Order]) -> String {
    if list.is_empty() {
        return "No open orders.".to_owned();
    }
    let mut lines = vec![format!("<b>{} open order(s)</b>", list.len())];
    lines.extend(list.iter().take(MAX_LINES).map(order_line));
    if list.len() > MAX_LINES {
        lines.push(format!("… and {} more", list.len() - MAX_LINES));
    }
    lines.join("\n")
}

/// `/balance`
pub fn balances(list: &[Balance]) -> String {
    if list.is_empty() {
        return "No balances.".to_owned();
    }
    let mut lines = vec!["<b>Balances</b> (free / locked)".to_owned()];
    lines.extend(list.iter().take(MAX_LINES).map(|b| {
        format!(
            "{}: {} / {}",
            escape(&b.asset),
            escape(&b.free),
            escape(&b.locked)
        )
    }));
    if list.len() > MAX_LINES {
        lines.push(format!("… and {} more", list.len() - MAX_LINES));
    }
    lines.join("\n")
}

/// `/status`
pub fn signer_status(status: &SignerStatus) -> String {
    let trading = if status.halted {
        format!(
            "<b>HALTED</b>: {}",
            escape_bounded(&status.halt_reason, MAX_FREE_TEXT)
        )
    } else {
        "<b>trading</b>".to_owned()
    };
    let policy = status.policy.as_ref();
    format!(
        "Signer: {trading}\nToday's notional: {} of {}\nOpen orders: {} of {}\nExchange weight: {} of {}\nClock offset: {} ms\nExchange key: version {}, {} days old",
        escape(&status.today_notional),
        escape(policy.map_or("?", |p| p.max_daily_notional.as_str())),
        status.open_orders,
        policy.map_or(0, |p| p.max_open_orders),
        status.request_weight_used,
        status.request_weight_limit,
        status.clock_offset_ms,
        status.key_version,
        status.key_age_days,
    )
}

/// `/advice`
pub fn advice(symbol: &str, answer: &AdviseResponse) -> String {
    let action = match AdviceAction::try_from(answer.action) {
        Ok(AdviceAction::Buy) => "BUY",
        Ok(AdviceAction::Sell) => "SELL",
        Ok(AdviceAction::Hold) => "HOLD",
        _ => "?",
    };
    let latency = answer
        .latency
        .as_ref()
        .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
    format!(
        "<b>Advice for {}: {action}</b> (confidence {:.2})\n{}\n<i>model {}, {latency:.1} s. Advice only: nothing was traded.</i>",
        escape(symbol),
        answer.confidence,
        escape_bounded(&answer.rationale, MAX_FREE_TEXT),
        escape_bounded(&answer.model, 80),
    )
}

/// `/audit`: one line per record, newest first; details are not shown (they may hold HMAC'd
/// fields and are for `engramctl audit`).
pub fn audit_records(records: &[AuditRecord], verified: Result<u64, String>) -> String {
    let mut lines = vec![match verified {
        Ok(count) => format!("<b>Audit chain verified</b>: {count} records"),
        Err(reason) => format!(
            "<b>Audit chain does NOT verify</b>: {}",
            escape_bounded(&reason, 200)
        ),
    }];
    for record in records.iter().take(MAX_LINES) {
        let actor = record.actor.as_ref();
        let user = actor
            .map(|a| a.telegram_user_id)
            .filter(|id| *id != 0)
            .map(|id| format!(" user {id}"))
            .unwrap_or_default();
        lines.push(format!(
            "#{} {} <b>{}</b> by {}{user}",
            record.sequence,
            utc(record.recorded_at.as_ref()),
            escape(&record.action),
            escape(actor.map_or("?", |a| a.service.as_str())),
        ));
    }
    lines.join("\n")
}

/// The question under a trade's Confirm/Cancel buttons.
pub fn confirmation_question(command: &Command, estimate: Option<String>, ttl: Duration) -> String {
    let what = match command {
        Command::Order(order) => order_summary(order),
        Command::Cancel { symbol, order } => {
            format!(
                "CANCEL order <b>{}</b> on {}",
                escape(&order.to_string()),
                escape(symbol.as_str())
            )
        }
        other => escape(other.name()),
    };
    let estimate = estimate.map_or_else(String::new, |e| {
        format!("\nEstimated notional: {}", escape(&e))
    });
    format!(
        "Confirm: {what}?{estimate}\nValid for {} s, for you only.",
        ttl.as_secs()
    )
}

/// "BUY 0.001 BTCUSDT at market" or "… limit 43000".
pub fn order_summary(order: &OrderRequest) -> String {
    let price = order.limit_price.as_ref().map_or_else(
        || "at market".to_owned(),
        |p| format!("limit {}", escape(p.as_str())),
    );
    format!(
        "<b>{} {} {}</b> {price}",
        order.side.as_str(),
        escape(order.quantity.as_str()),
        escape(order.symbol.as_str())
    )
}

/// How a cancel target reads in a reply.
pub fn order_ref(order: &OrderRef) -> String {
    escape(&order.to_string())
}

/// Seconds since the Unix epoch (for ages and due dates).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One `/keys` line: age and rotation due date (90 days after creation, the seed's rule).
pub fn key_line(name: &str, version: u64, created_unix: Option<i64>) -> String {
    const ROTATE_AFTER_DAYS: i64 = 90;
    match created_unix {
        Some(created) => {
            let age_days = (unix_now() - created).max(0) / 86_400;
            let due = created + ROTATE_AFTER_DAYS * 86_400;
            let (y, m, d) = civil_from_days(due.div_euclid(86_400));
            let overdue = if age_days >= ROTATE_AFTER_DAYS {
                " <b>OVERDUE</b>"
            } else {
                ""
            };
            format!(
                "{}: version {version}, {age_days} days old, rotate by {y:04}-{m:02}-{d:02}{overdue}",
                escape(name)
            )
        }
        None => format!("{}: version {version}, creation date unknown", escape(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_escaped() {
        let hostile = "<b>bold</b> & <a href=\"x\">link</a>";
        let escaped = escape(hostile);
        assert!(
            !escaped.contains('<') && !escaped.contains('>'),
            "{escaped}"
        );
        assert_eq!(escape("a&b"), "a&amp;b");
        assert_eq!(escape("tab\there"), "tab here");
        assert_eq!(escape_bounded("abcdef", 3), "abc…");
    }

    #[test]
    fn dates_are_calendar_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        let t = prost_types::Timestamp {
            seconds: 1_796_300_000,
            nanos: 0,
        };
        assert_eq!(utc(Some(&t)), "2026-12-03 12:13:20 UTC");
    }

    #[test]
    fn key_lines_flag_overdue_keys() {
        let old = unix_now() - 100 * 86_400;
        assert!(key_line("bot token", 3, Some(old)).contains("OVERDUE"));
        let fresh = unix_now() - 86_400;
        assert!(!key_line("bot token", 3, Some(fresh)).contains("OVERDUE"));
        assert!(key_line("audit key", 1, None).contains("unknown"));
    }

    #[test]
    fn help_lists_only_what_the_role_may_run() {
        let viewer = help(Role::Viewer);
        assert!(viewer.contains("/price") && !viewer.contains("/buy") && !viewer.contains("/halt"));
        let admin = help(Role::Admin);
        assert!(admin.contains("/buy") && admin.contains("/keys"));
    }
}
