//! The command grammar: a strict parser from a Telegram message's text to a typed
//! [`Command`], and the role each command needs.
//!
//! Strict means: a fixed set of commands, a fixed number of arguments each, symbols of
//! `[A-Z0-9]{2,20}`, decimals without sign, exponent or more than [`MAX_DECIMALS`] places,
//! and caps on every length. Errors name what was wrong and give the usage line, and never
//! repeat the user's text (it may be hostile, and it is not escaped here).

use std::fmt;

use rust_decimal::Decimal;

/// Longest accepted message text, in bytes (Telegram allows 4096 characters).
pub const MAX_COMMAND_BYTES: usize = 600;
/// Most decimal places in a quantity or price (Binance's own limit).
pub const MAX_DECIMALS: usize = 8;
/// Longest `/advice` question, in characters.
pub const MAX_QUESTION_CHARS: usize = 300;
/// Longest `/halt` reason, in characters (the signer's own cap is 200).
pub const MAX_REASON_CHARS: usize = 200;
/// Most records `/audit` shows.
pub const MAX_AUDIT_RECORDS: u32 = 20;
/// Records `/audit` shows by default.
pub const DEFAULT_AUDIT_RECORDS: u32 = 5;

/// What a person may do. Ordered: each role can do everything the ones below it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read-only: help, whoami, status, balance, price, orders, advice.
    Viewer,
    /// Also buy, sell and cancel.
    Trader,
    /// Also halt, resume, audit and keys.
    Admin,
}

impl Role {
    /// The role's name as written in `engram/telegram`'s `users` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Trader => "trader",
            Self::Admin => "admin",
        }
    }

    /// Parses `viewer`, `trader` or `admin`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "trader" => Some(Self::Trader),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// An exchange symbol, checked: 2-20 characters of A-Z and 0-9.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Symbol(String);

impl Symbol {
    /// Checks `text`.
    ///
    /// # Errors
    ///
    /// When it is not 2-20 characters of A-Z and 0-9.
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = (2..=20).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err("SYMBOL must be 2-20 characters of A-Z and 0-9, for example BTCUSDT".to_owned())
        }
    }

    /// The symbol's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A positive decimal as typed (kept as text so nothing is rounded on its way to the signer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Amount {
    text: String,
    value: Decimal,
}

impl Amount {
    /// Parses a plain positive decimal: digits, at most one point with digits on both sides,
    /// at most [`MAX_DECIMALS`] places, no sign, no exponent, not zero.
    ///
    /// # Errors
    ///
    /// When `text` is not such a number; `name` says which argument it was.
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        let well_formed = !whole.is_empty()
            && whole.len() <= 20
            && digits(whole)
            && digits(fraction)
            && (fraction.is_empty() != text.contains('.'));
        if !well_formed {
            return Err(format!(
                "{name} must be a plain decimal such as 0.001 (no sign, no exponent)"
            ));
        }
        if fraction.len() > MAX_DECIMALS {
            return Err(format!(
                "{name} has more than {MAX_DECIMALS} decimal places"
            ));
        }
        let value: Decimal = text
            .parse()
            .map_err(|_| format!("{name} is not a number"))?;
        if value.is_zero() {
            return Err(format!("{name} must be greater than zero"));
        }
        Ok(Self {
            text: text.to_owned(),
            value,
        })
    }

    /// The number as the person typed it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The number's value.
    pub fn value(&self) -> Decimal {
        self.value
    }
}

/// Buy or sell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/buy`
    Buy,
    /// `/sell`
    Sell,
}

impl Side {
    /// `BUY` or `SELL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "BUY",
            Self::Sell => "SELL",
        }
    }
}

/// An order the person asked for; MARKET without a price, LIMIT with one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    /// Buy or sell.
    pub side: Side,
    /// What to trade.
    pub symbol: Symbol,
    /// How much of the base asset.
    pub quantity: Amount,
    /// The limit price; `None` for a market order.
    pub limit_price: Option<Amount>,
}

/// Which order `/cancel` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRef {
    /// The exchange's numeric order id.
    Exchange(i64),
    /// The client order id (Engram's confirmation nonce).
    Client(String),
}

impl fmt::Display for OrderRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exchange(id) => write!(f, "{id}"),
            Self::Client(id) => f.write_str(id),
        }
    }
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/help` (also `/start`, which Telegram clients send first).
    Help,
    /// `/whoami`
    Whoami,
    /// `/status`
    Status,
    /// `/balance`
    Balance,
    /// `/price SYMBOL`
    Price(Symbol),
    /// `/orders [SYMBOL]`
    Orders(Option<Symbol>),
    /// `/buy SYMBOL QTY [PRICE]` and `/sell SYMBOL QTY [PRICE]`
    Order(OrderRequest),
    /// `/cancel SYMBOL ORDER_ID`
    Cancel {
        /// The order's symbol.
        symbol: Symbol,
        /// The order.
        order: OrderRef,
    },
    /// `/advice SYMBOL [question]`
    Advice {
        /// What to advise on.
        symbol: Symbol,
        /// The person's question, whitespace-normalised (empty when none).
        question: String,
    },
    /// `/halt [reason]`
    Halt(String),
    /// `/resume`
    Resume,
    /// `/audit [N]`
    Audit(u32),
    /// `/keys`
    Keys,
}

/// The usage lines, one per command, in the order `/help` lists them.
pub const USAGE: [(&str, &str, Role); 14] = [
    ("help", "/help", Role::Viewer),
    ("whoami", "/whoami", Role::Viewer),
    ("status", "/status", Role::Viewer),
    ("balance", "/balance", Role::Viewer),
    ("price", "/price SYMBOL", Role::Viewer),
    ("orders", "/orders [SYMBOL]", Role::Viewer),
    ("advice", "/advice SYMBOL [question]", Role::Viewer),
    ("buy", "/buy SYMBOL QTY [PRICE]", Role::Trader),
    ("sell", "/sell SYMBOL QTY [PRICE]", Role::Trader),
    ("cancel", "/cancel SYMBOL ORDER_ID", Role::Trader),
    ("halt", "/halt [reason]", Role::Admin),
    ("resume", "/resume", Role::Admin),
    ("audit", "/audit [N]", Role::Admin),
    ("keys", "/keys", Role::Admin),
];

/// The usage line of a command by name.
pub fn usage(name: &str) -> Option<&'static str> {
    USAGE
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, u, _)| *u)
}

impl Command {
    /// The command's name (without the slash), as in [`USAGE`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::Help => "help",
            Self::Whoami => "whoami",
            Self::Status => "status",
            Self::Balance => "balance",
            Self::Price(_) => "price",
            Self::Orders(_) => "orders",
            Self::Order(order) => match order.side {
                Side::Buy => "buy",
                Side::Sell => "sell",
            },
            Self::Cancel { .. } => "cancel",
            Self::Advice { .. } => "advice",
            Self::Halt(_) => "halt",
            Self::Resume => "resume",
            Self::Audit(_) => "audit",
            Self::Keys => "keys",
        }
    }

    /// The least role allowed to run it.
    pub fn required_role(&self) -> Role {
        USAGE
            .iter()
            .find(|(n, _, _)| *n == self.name())
            .map_or(Role::Admin, |(_, _, role)| *role)
    }
}

/// Why a message is not a valid command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The command it was meant to be, when that much was recognised.
    pub command: Option<&'static str>,
    /// What was wrong, in a few words (never the user's text).
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(usage) = self.command.and_then(usage) {
            write!(f, "\nUsage: {usage}")?;
        }
        Ok(())
    }
}

/// What the parser made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A valid command for this bot.
    Command(Command),
    /// A command addressed to another bot (`/cmd@OtherBot`): not ours to answer.
    OtherBot,
}

fn fail(command: Option<&'static str>, reason: impl Into<String>) -> ParseError {
    ParseError {
        command,
        reason: reason.into(),
    }
}

/// Free text (a question or a reason): printable characters only, whitespace collapsed,
/// at most `max` characters.
fn free_text(
    command: &'static str,
    words: &[&str],
    max: usize,
    what: &str,
) -> Result<String, ParseError> {
    let text = words.join(" ");
    if text.chars().any(char::is_control) {
        return Err(fail(
            Some(command),
            format!("the {what} contains control characters"),
        ));
    }
    if text.chars().count() > max {
        return Err(fail(
            Some(command),
            format!("the {what} is longer than {max} characters"),
        ));
    }
    Ok(text)
}

fn no_more(command: &'static str, args: &[&str], allowed: usize) -> Result<(), ParseError> {
    if args.len() > allowed {
        Err(fail(Some(command), "too many arguments"))
    } else {
        Ok(())
    }
}

fn symbol(command: &'static str, arg: Option<&&str>) -> Result<Symbol, ParseError> {
    let arg = arg.ok_or_else(|| fail(Some(command), "SYMBOL is missing"))?;
    Symbol::parse(arg).map_err(|reason| fail(Some(command), reason))
}

fn order(command: &'static str, side: Side, args: &[&str]) -> Result<Command, ParseError> {
    no_more(command, args, 3)?;
    let symbol = symbol(command, args.first())?;
    let quantity = args
        .get(1)
        .ok_or_else(|| fail(Some(command), "QTY is missing"))
        .and_then(|q| Amount::parse("QTY", q).map_err(|r| fail(Some(command), r)))?;
    let limit_price = args
        .get(2)
        .map(|p| Amount::parse("PRICE", p).map_err(|r| fail(Some(command), r)))
        .transpose()?;
    Ok(Command::Order(OrderRequest {
        side,
        symbol,
        quantity,
        limit_price,
    }))
}

fn order_ref(arg: Option<&&str>) -> Result<OrderRef, ParseError> {
    let arg = arg.ok_or_else(|| fail(Some("cancel"), "ORDER_ID is missing"))?;
    if arg.chars().all(|c| c.is_ascii_digit()) {
        return arg
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(OrderRef::Exchange)
            .ok_or_else(|| fail(Some("cancel"), "ORDER_ID is out of range"));
    }
    let client_id = (1..=36).contains(&arg.len())
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if client_id {
        Ok(OrderRef::Client((*arg).to_owned()))
    } else {
        Err(fail(
            Some("cancel"),
            "ORDER_ID must be the exchange's order number or a client order id (1-36 of A-Z, a-z, 0-9, - and _)",
        ))
    }
}

/// Parses a message's text. `bot_username` is this bot's username, so `/cmd@ThisBot` is
/// accepted and `/cmd@OtherBot` is left alone.
///
/// # Errors
///
/// A [`ParseError`] naming what was wrong, with the command's usage when it was recognised.
pub fn parse(text: &str, bot_username: &str) -> Result<Parsed, ParseError> {
    if text.len() > MAX_COMMAND_BYTES {
        return Err(fail(
            None,
            format!("the message is longer than {MAX_COMMAND_BYTES} bytes"),
        ));
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some((head, args)) = words.split_first() else {
        return Err(fail(None, "send a command such as /help"));
    };
    let Some(head) = head.strip_prefix('/') else {
        return Err(fail(None, "send a command such as /help"));
    };
    let (name, addressee) = match head.split_once('@') {
        Some((name, addressee)) => (name, Some(addressee)),
        None => (head, None),
    };
    if let Some(addressee) = addressee
        && !addressee.eq_ignore_ascii_case(bot_username)
    {
        return Ok(Parsed::OtherBot);
    }
    let command = match name {
        "help" | "start" => {
            no_more("help", args, 0)?;
            Command::Help
        }
        "whoami" => {
            no_more("whoami", args, 0)?;
            Command::Whoami
        }
        "status" => {
            no_more("status", args, 0)?;
            Command::Status
        }
        "balance" => {
            no_more("balance", args, 0)?;
            Command::Balance
        }
        "price" => {
            no_more("price", args, 1)?;
            Command::Price(symbol("price", args.first())?)
        }
        "orders" => {
            no_more("orders", args, 1)?;
            Command::Orders(
                args.first()
                    .map(|_| symbol("orders", args.first()))
                    .transpose()?,
            )
        }
        "buy" => order("buy", Side::Buy, args)?,
        "sell" => order("sell", Side::Sell, args)?,
        "cancel" => {
            no_more("cancel", args, 2)?;
            Command::Cancel {
                symbol: symbol("cancel", args.first())?,
                order: order_ref(args.get(1))?,
            }
        }
        "advice" => Command::Advice {
            symbol: symbol("advice", args.first())?,
            question: free_text(
                "advice",
                args.get(1..).unwrap_or_default(),
                MAX_QUESTION_CHARS,
                "question",
            )?,
        },
        "halt" => Command::Halt(free_text("halt", args, MAX_REASON_CHARS, "reason")?),
        "resume" => {
            no_more("resume", args, 0)?;
            Command::Resume
        }
        "audit" => {
            no_more("audit", args, 1)?;
            let count = match args.first() {
                None => DEFAULT_AUDIT_RECORDS,
                Some(n) => n
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_AUDIT_RECORDS).contains(n))
                    .ok_or_else(|| {
                        fail(
                            Some("audit"),
                            format!("N must be a whole number from 1 to {MAX_AUDIT_RECORDS}"),
                        )
                    })?,
            };
            Command::Audit(count)
        }
        "keys" => {
            no_more("keys", args, 0)?;
            Command::Keys
        }
        _ => {
            return Err(fail(
                None,
                "unknown command; /help lists the commands you may use",
            ));
        }
    };
    Ok(Parsed::Command(command))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "EngramDevBot";

    fn ok(text: &str) -> Command {
        match parse(text, BOT) {
            Ok(Parsed::Command(command)) => command,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    fn bad(text: &str) -> ParseError {
        parse(text, BOT).expect_err(text)
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(ok("/help"), Command::Help);
        assert_eq!(ok("/start"), Command::Help);
        assert_eq!(ok("/whoami"), Command::Whoami);
        assert_eq!(ok("/status"), Command::Status);
        assert_eq!(ok("/balance"), Command::Balance);
        assert_eq!(ok("/price BTCUSDT").name(), "price");
        assert_eq!(ok("/orders"), Command::Orders(None));
        assert_eq!(ok("/orders ETHUSDT").name(), "orders");
        let Command::Order(order) = ok("/buy BTCUSDT 0.001 43000.5") else {
            panic!("not an order");
        };
        assert_eq!((order.side, order.quantity.as_str()), (Side::Buy, "0.001"));
        assert_eq!(
            order.limit_price.map(|p| p.value()),
            Some(Decimal::new(430_005, 1))
        );
        let Command::Order(order) = ok("/sell BTCUSDT 1") else {
            panic!("not an order");
        };
        assert_eq!((order.side, order.limit_price), (Side::Sell, None));
        assert_eq!(
            ok("/cancel BTCUSDT 12345"),
            Command::Cancel {
                symbol: Symbol::parse("BTCUSDT").expect("symbol"),
                order: OrderRef::Exchange(12345)
            }
        );
        assert!(matches!(
            ok("/cancel BTCUSDT eg-abc_1"),
            Command::Cancel {
                order: OrderRef::Client(_),
                ..
            }
        ));
        assert_eq!(
            ok("/advice BTCUSDT  should   I buy?"),
            Command::Advice {
                symbol: Symbol::parse("BTCUSDT").expect("symbol"),
                question: "should I buy?".to_owned()
            }
        );
        assert_eq!(ok("/halt"), Command::Halt(String::new()));
        assert_eq!(
            ok("/halt market is crazy"),
            Command::Halt("market is crazy".to_owned())
        );
        assert_eq!(ok("/resume"), Command::Resume);
        assert_eq!(ok("/audit"), Command::Audit(DEFAULT_AUDIT_RECORDS));
        assert_eq!(ok("/audit 20"), Command::Audit(20));
        assert_eq!(ok("/keys"), Command::Keys);
        assert_eq!(ok("/price@EngramDevBot BTCUSDT").name(), "price");
        assert_eq!(ok("/price@engramdevbot BTCUSDT").name(), "price");
    }

    #[test]
    fn other_bots_commands_are_left_alone() {
        assert_eq!(parse("/buy@OtherBot BTCUSDT 1", BOT), Ok(Parsed::OtherBot));
        assert_eq!(parse("/anything@OtherBot", BOT), Ok(Parsed::OtherBot));
    }

    #[test]
    fn bad_arguments_name_the_problem_and_give_usage() {
        let cases = [
            ("/price", "SYMBOL is missing", Some("price")),
            ("/price btcusdt", "SYMBOL must be", Some("price")),
            ("/price B", "SYMBOL must be", Some("price")),
            (
                "/price BTCUSDTBTCUSDTBTCUSDT",
                "SYMBOL must be",
                Some("price"),
            ),
            ("/price BTC-USDT", "SYMBOL must be", Some("price")),
            (
                "/price BTCUSDT ETHUSDT",
                "too many arguments",
                Some("price"),
            ),
            ("/buy BTCUSDT", "QTY is missing", Some("buy")),
            ("/buy BTCUSDT -1", "plain decimal", Some("buy")),
            ("/buy BTCUSDT +1", "plain decimal", Some("buy")),
            ("/buy BTCUSDT 1e3", "plain decimal", Some("buy")),
            ("/buy BTCUSDT .5", "plain decimal", Some("buy")),
            ("/buy BTCUSDT 5.", "plain decimal", Some("buy")),
            ("/buy BTCUSDT 1.2.3", "plain decimal", Some("buy")),
            ("/buy BTCUSDT 0,5", "plain decimal", Some("buy")),
            ("/buy BTCUSDT NaN", "plain decimal", Some("buy")),
            ("/buy BTCUSDT ０.１", "plain decimal", Some("buy")),
            (
                "/buy BTCUSDT 0.000000001",
                "more than 8 decimal places",
                Some("buy"),
            ),
            ("/buy BTCUSDT 0", "greater than zero", Some("buy")),
            ("/buy BTCUSDT 0.0", "greater than zero", Some("buy")),
            (
                "/buy BTCUSDT 123456789012345678901",
                "plain decimal",
                Some("buy"),
            ),
            ("/sell BTCUSDT 1 2 3", "too many arguments", Some("sell")),
            ("/sell BTCUSDT 1 -2", "PRICE must be", Some("sell")),
            ("/cancel BTCUSDT", "ORDER_ID is missing", Some("cancel")),
            ("/cancel BTCUSDT 0", "out of range", Some("cancel")),
            (
                "/cancel BTCUSDT 99999999999999999999",
                "out of range",
                Some("cancel"),
            ),
            ("/cancel BTCUSDT a;b", "ORDER_ID must be", Some("cancel")),
            ("/advice", "SYMBOL is missing", Some("advice")),
            ("/audit 0", "from 1 to 20", Some("audit")),
            ("/audit 21", "from 1 to 20", Some("audit")),
            ("/audit many", "from 1 to 20", Some("audit")),
            ("/help me", "too many arguments", Some("help")),
            ("/resume now", "too many arguments", Some("resume")),
            ("/withdraw BTC 1", "unknown command", None),
            ("/BUY BTCUSDT 1", "unknown command", None),
            ("hello", "send a command", None),
            ("", "send a command", None),
            ("   ", "send a command", None),
        ];
        for (text, reason, command) in cases {
            let error = bad(text);
            assert!(error.reason.contains(reason), "{text:?}: {error:?}");
            assert_eq!(error.command, command, "{text:?}");
            if let Some(command) = command {
                assert!(
                    error
                        .to_string()
                        .contains(&format!("Usage: {}", usage(command).expect("usage")))
                );
            }
        }
    }

    #[test]
    fn free_text_is_capped_and_has_no_control_characters() {
        let long = format!("/halt {}", "x".repeat(MAX_REASON_CHARS + 1));
        assert!(bad(&long).reason.contains("longer than 200"));
        assert!(bad("/halt a\u{7}b").reason.contains("control characters"));
        let question = format!("/advice BTCUSDT {}", "y ".repeat(200));
        assert!(bad(&question).reason.contains("longer than 300"));
        assert!(
            bad(&format!("/help {}", "z".repeat(700)))
                .reason
                .contains("longer than 600 bytes")
        );
    }

    #[test]
    fn errors_never_repeat_the_users_text() {
        for text in [
            "/price <b>x</b>",
            "/buy BTCUSDT <script>",
            "/nope<i>",
            "/cancel BTCUSDT '&lt;'",
        ] {
            let shown = bad(text).to_string();
            assert!(!shown.contains('<') || shown.contains("Usage"), "{shown}");
            for word in text.split_whitespace().skip(1) {
                assert!(!shown.contains(word), "{text:?} echoed in {shown:?}");
            }
        }
    }

    #[test]
    fn roles_follow_the_issue() {
        let viewer = [
            "help", "whoami", "status", "balance", "price", "orders", "advice",
        ];
        let trader = ["buy", "sell", "cancel"];
        let admin = ["halt", "resume", "audit", "keys"];
        for (name, _, role) in USAGE {
            let expected = if viewer.contains(&name) {
                Role::Viewer
            } else if trader.contains(&name) {
                Role::Trader
            } else {
                assert!(admin.contains(&name), "{name}");
                Role::Admin
            };
            assert_eq!(role, expected, "{name}");
        }
        assert!(Role::Admin > Role::Trader && Role::Trader > Role::Viewer);
        assert_eq!(Role::parse("root"), None);
    }
}
