//! The trading policy and the validated order it judges.
//!
//! Validation at the edge turns a `PlaceOrderRequest` into an [`OrderIntent`] (typed symbol,
//! decimal quantity and price, client order id) or INVALID_ARGUMENT naming the field. The
//! [`Policy`] then decides with the current price and the running counters ([`Usage`]); a
//! refusal names the rule it broke, so it can be audited and counted per rule.

use rust_decimal::Decimal;

/// Most decimal places accepted in a quantity or price (Binance's own precision is 8).
pub const MAX_DECIMALS: u32 = 8;

/// Buy or sell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Buy the base asset.
    Buy,
    /// Sell the base asset.
    Sell,
}

impl Side {
    /// Binance's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "BUY",
            Self::Sell => "SELL",
        }
    }
}

/// Market or limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// At the market price.
    Market,
    /// At this price or better.
    Limit(Decimal),
}

/// A checked order request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderIntent {
    /// Upper-case exchange symbol.
    pub symbol: String,
    /// Buy or sell.
    pub side: Side,
    /// Market or limit with price.
    pub kind: OrderKind,
    /// Positive quantity of the base asset.
    pub quantity: Decimal,
    /// The idempotency key, sent as `newClientOrderId`.
    pub client_order_id: String,
}

/// A field that did not validate, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The request field, for example `quantity`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Checks a symbol: 2-20 characters of A-Z and 0-9.
///
/// # Errors
///
/// When it is anything else (lower case included).
pub fn parse_symbol(symbol: &str) -> Result<String, InvalidField> {
    let ok = (2..=20).contains(&symbol.len())
        && symbol
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    if ok {
        Ok(symbol.to_owned())
    } else {
        Err(invalid(
            "symbol",
            "must be 2-20 characters of A-Z and 0-9, for example BTCUSDT",
        ))
    }
}

/// Parses a positive decimal without sign, exponent or more than [`MAX_DECIMALS`] places.
///
/// # Errors
///
/// When the text is not such a number.
pub fn parse_positive_decimal(field: &'static str, text: &str) -> Result<Decimal, InvalidField> {
    let well_formed = !text.is_empty()
        && text.len() <= 32
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.chars().filter(|c| *c == '.').count() <= 1
        && !text.starts_with('.')
        && !text.ends_with('.');
    if !well_formed {
        return Err(invalid(
            field,
            "must be a plain decimal such as 0.001 (no sign, no exponent)",
        ));
    }
    if text
        .split('.')
        .nth(1)
        .is_some_and(|fraction| fraction.len() > MAX_DECIMALS as usize)
    {
        return Err(invalid(
            field,
            format!("has more than {MAX_DECIMALS} decimal places"),
        ));
    }
    let value: Decimal = text
        .parse()
        .map_err(|_| invalid(field, "is not a number"))?;
    if value <= Decimal::ZERO {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(value)
}

/// Checks a client order id as Binance accepts it: 1-36 characters of A-Z, a-z, 0-9, - and _.
///
/// # Errors
///
/// When it is empty or has other characters.
pub fn parse_client_order_id(id: &str) -> Result<String, InvalidField> {
    let ok = (1..=36).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(invalid(
            "context.idempotency_key",
            "is required: 1-36 characters of A-Z, a-z, 0-9, - and _",
        ))
    }
}

/// What the running counters behind the caps say right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Notional placed since 00:00 UTC (filled plus still open).
    pub today_notional: Decimal,
    /// Orders open now.
    pub open_orders: u32,
    /// Orders placed in the last 60 s.
    pub orders_last_minute: u32,
}

/// The trading policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Symbols that may be traded.
    pub symbols: Vec<String>,
    /// Whether buying is allowed.
    pub allow_buy: bool,
    /// Whether selling is allowed.
    pub allow_sell: bool,
    /// Whether market orders are allowed.
    pub allow_market: bool,
    /// Whether limit orders are allowed.
    pub allow_limit: bool,
    /// Largest notional of one order, at the current price (quote asset).
    pub max_order_notional: Decimal,
    /// Largest notional per UTC day.
    pub max_daily_notional: Decimal,
    /// Most open orders.
    pub max_open_orders: u32,
    /// Most orders per minute.
    pub max_orders_per_minute: u32,
    /// Limit prices must be within this many basis points of the last price.
    pub price_band_bps: u32,
}

/// A broken rule: its stable name (for metrics and audit) and a sentence for the person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy rule {rule}: {detail}")]
pub struct Violation {
    /// For example `max_order_notional`.
    pub rule: &'static str,
    /// For example "order notional 1200 USDT exceeds 1000".
    pub detail: String,
}

fn violation(rule: &'static str, detail: String) -> Violation {
    Violation { rule, detail }
}

impl Policy {
    /// Judges `intent` at `last_price` given `usage`; the halt switch is checked by the caller.
    ///
    /// # Errors
    ///
    /// The first rule the order breaks.
    pub fn check(
        &self,
        intent: &OrderIntent,
        last_price: Decimal,
        usage: Usage,
    ) -> Result<Decimal, Violation> {
        if !self.symbols.contains(&intent.symbol) {
            return Err(violation(
                "symbol_allowlist",
                format!("{} is not an allowed symbol", intent.symbol),
            ));
        }
        let side_ok = match intent.side {
            Side::Buy => self.allow_buy,
            Side::Sell => self.allow_sell,
        };
        if !side_ok {
            return Err(violation(
                "allowed_sides",
                format!("{} orders are not allowed", intent.side.as_str()),
            ));
        }
        let price = match intent.kind {
            OrderKind::Market if !self.allow_market => {
                return Err(violation(
                    "allowed_order_types",
                    "MARKET orders are not allowed".to_owned(),
                ));
            }
            OrderKind::Limit(_) if !self.allow_limit => {
                return Err(violation(
                    "allowed_order_types",
                    "LIMIT orders are not allowed".to_owned(),
                ));
            }
            OrderKind::Market => last_price,
            OrderKind::Limit(limit) => {
                let band = last_price * Decimal::from(self.price_band_bps) / Decimal::from(10_000);
                if (limit - last_price).abs() > band {
                    return Err(violation(
                        "price_band",
                        format!(
                            "limit price {limit} is more than {} bps from the last price {last_price}",
                            self.price_band_bps
                        ),
                    ));
                }
                limit
            }
        };
        // Valued at the current price (or the limit, when that is what will be paid).
        let notional = intent.quantity * price.max(last_price);
        if notional > self.max_order_notional {
            return Err(violation(
                "max_order_notional",
                format!(
                    "order notional {notional} exceeds {}",
                    self.max_order_notional
                ),
            ));
        }
        if usage.today_notional + notional > self.max_daily_notional {
            return Err(violation(
                "max_daily_notional",
                format!(
                    "today's notional would reach {}, over {}",
                    usage.today_notional + notional,
                    self.max_daily_notional
                ),
            ));
        }
        if intent.kind != OrderKind::Market && usage.open_orders >= self.max_open_orders {
            return Err(violation(
                "max_open_orders",
                format!(
                    "{} orders are already open (at most {})",
                    usage.open_orders, self.max_open_orders
                ),
            ));
        }
        if usage.orders_last_minute >= self.max_orders_per_minute {
            return Err(violation(
                "max_orders_per_minute",
                format!(
                    "{} orders in the last minute (at most {})",
                    usage.orders_last_minute, self.max_orders_per_minute
                ),
            ));
        }
        Ok(notional)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().expect("decimal")
    }

    fn policy() -> Policy {
        Policy {
            symbols: vec!["BTCUSDT".to_owned()],
            allow_buy: true,
            allow_sell: true,
            allow_market: true,
            allow_limit: true,
            max_order_notional: d("1000"),
            max_daily_notional: d("5000"),
            max_open_orders: 2,
            max_orders_per_minute: 3,
            price_band_bps: 500,
        }
    }

    fn intent(qty: &str, kind: OrderKind) -> OrderIntent {
        OrderIntent {
            symbol: "BTCUSDT".to_owned(),
            side: Side::Buy,
            kind,
            quantity: d(qty),
            client_order_id: "c-1".to_owned(),
        }
    }

    #[test]
    fn every_rule_is_named_when_broken() {
        let p = policy();
        let price = d("40000");
        let ok = Usage::default();
        let mut other = intent("0.01", OrderKind::Market);
        other.symbol = "ETHUSDT".to_owned();
        let cases: Vec<(&str, Result<Decimal, Violation>)> = vec![
            ("symbol_allowlist", p.check(&other, price, ok)),
            (
                "allowed_sides",
                Policy {
                    allow_buy: false,
                    ..p.clone()
                }
                .check(&intent("0.01", OrderKind::Market), price, ok),
            ),
            (
                "allowed_order_types",
                Policy {
                    allow_market: false,
                    ..p.clone()
                }
                .check(&intent("0.01", OrderKind::Market), price, ok),
            ),
            (
                "price_band",
                p.check(&intent("0.01", OrderKind::Limit(d("45000"))), price, ok),
            ),
            (
                "max_order_notional",
                p.check(&intent("0.03", OrderKind::Market), price, ok),
            ),
            (
                "max_daily_notional",
                p.check(
                    &intent("0.02", OrderKind::Market),
                    price,
                    Usage {
                        today_notional: d("4500"),
                        ..ok
                    },
                ),
            ),
            (
                "max_open_orders",
                p.check(
                    &intent("0.01", OrderKind::Limit(d("39000"))),
                    price,
                    Usage {
                        open_orders: 2,
                        ..ok
                    },
                ),
            ),
            (
                "max_orders_per_minute",
                p.check(
                    &intent("0.01", OrderKind::Market),
                    price,
                    Usage {
                        orders_last_minute: 3,
                        ..ok
                    },
                ),
            ),
        ];
        for (rule, result) in cases {
            assert_eq!(result.expect_err(rule).rule, rule);
        }
        assert_eq!(
            p.check(&intent("0.01", OrderKind::Market), price, ok),
            Ok(d("400.00"))
        );
        assert_eq!(
            p.check(&intent("0.01", OrderKind::Limit(d("41000"))), price, ok),
            Ok(d("410.00"))
        );
    }

    #[test]
    fn fields_are_validated_strictly() {
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1e3",
            "0.000000001",
            ".5",
            "5.",
            "1.2.3",
            "１",
            "NaN",
            "0.00000000",
        ] {
            assert!(
                parse_positive_decimal("quantity", bad).is_err(),
                "{bad:?} must be refused"
            );
        }
        assert_eq!(
            parse_positive_decimal("quantity", "0.00100000"),
            Ok(d("0.001"))
        );
        for bad in ["btcusdt", "B", "BTC-USDT", "ＢＴＣ", &"A".repeat(21)] {
            assert!(parse_symbol(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_symbol("BTCUSDT").is_ok());
        for bad in ["", "has space", "x".repeat(37).as_str(), "semi;colon"] {
            assert!(
                parse_client_order_id(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
        assert!(parse_client_order_id("nonce-3f1e_2d").is_ok());
    }
}
