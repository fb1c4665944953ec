//! `stack-bench`: a confirmed order through the whole stack, as a person places it. The four
//! release binaries run on mutual TLS with certificates from a real OpenBao PKI, each with its
//! own Vault token (the `engram-e2e` harness); the Telegram, exchange and LLM doubles run in
//! this process. It measures, from the update injected at the Telegram double to the bot's
//! answer recorded there (so without Telegram's own network):
//! - `/buy` or `/sell` to the confirmation question (gateway, signer's quote check, audit appends);
//! - the Confirm press to the "Order placed ... FILLED" edit (gateway, signer policy, the
//!   signed request to the exchange double, audit appends): the confirmed order;
//! - both, one order at a time and with two people trading at once;
//! - each service's resident memory idle and at its peak under the load.
//!
//! It runs once with teloxide's outgoing throttle as shipped (it releases messages in 250 ms
//! ticks, which dominates) and once with it off (the stack's own cost). It prints figures and
//! asserts nothing. Run it with `make bench-stack`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use engram_bench::{percentile, rss_kib};
use engram_doubles::telegram::BotAction;
use engram_e2e::{ADMIN, Options, Stack, TRADER};

/// Orders placed before measuring (connections, caches, allocator).
const WARMUP: usize = 10;
/// How long the two-person load runs.
const LOAD: Duration = Duration::from_secs(15);
/// The longest the bot may take to answer before the run is abandoned.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// The first action after `after` that `wanted` accepts, woken by the double itself.
async fn wait_for(
    stack: &Stack,
    mut after: u64,
    wanted: impl Fn(&BotAction) -> bool,
) -> anyhow::Result<BotAction> {
    let deadline = Instant::now() + ANSWER_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {ANSWER_DEADLINE:?}");
        }
        let actions = stack.telegram.wait_actions_after(after, left).await;
        if let Some(found) = actions.iter().find(|a| wanted(a)) {
            return Ok(found.clone());
        }
        after = actions.last().map_or(after, |a| a.seq);
    }
}

/// The `n`th order of a person: buys and sells alternate, so the balances never run dry.
fn order_command(n: usize) -> &'static str {
    if n % 2 == 0 {
        "/buy BTCUSDT 0.001"
    } else {
        "/sell BTCUSDT 0.001"
    }
}

/// One confirmed order by `user`: (the command to the question, Confirm to the fill).
async fn confirmed_order(
    stack: &Stack,
    user: i64,
    n: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let seq = stack.telegram.last_seq();
    let asked_at = Instant::now();
    stack.telegram.send_from(user, user, order_command(n));
    let question = wait_for(stack, seq, |a| {
        a.kind == "send" && a.chat_id == user && !a.buttons.is_empty()
    })
    .await?;
    let asked = asked_at.elapsed();
    let confirm = question
        .buttons
        .first()
        .and_then(|row| row.first())
        .map(|(_, data)| data.clone())
        .context("the question has no Confirm button")?;
    let seq = stack.telegram.last_seq();
    let confirmed_at = Instant::now();
    stack
        .telegram
        .press(user, user, question.message_id, &confirm)
        .map_err(|e| anyhow::anyhow!("press: {e}"))?;
    let outcome = wait_for(stack, seq, |a| {
        a.kind == "edit"
            && a.chat_id == user
            && a.message_id == question.message_id
            && !a.text.contains("Sending")
    })
    .await?;
    let filled = confirmed_at.elapsed();
    if !outcome.text.contains("FILLED") {
        bail!("the order did not fill: {}", outcome.text);
    }
    Ok((asked, filled))
}

/// Latencies of one phase.
#[derive(Default)]
struct Phase {
    asked: Vec<Duration>,
    filled: Vec<Duration>,
    total: Vec<Duration>,
}

impl Phase {
    fn add(&mut self, (asked, filled): (Duration, Duration)) {
        self.asked.push(asked);
        self.filled.push(filled);
        self.total.push(asked + filled);
    }

    fn print(&mut self, throttle: &str, phase: &str, seconds: f64) {
        let orders = self.filled.len();
        for (label, series) in [
            ("`/buy` or `/sell` to the question", &mut self.asked),
            ("Confirm to FILLED", &mut self.filled),
            ("both", &mut self.total),
        ] {
            series.sort_unstable();
            println!(
                "| {throttle} | {phase} | {label} | {orders} | {:.2} ms | {:.2} ms |",
                percentile(series, 0.5).as_secs_f64() * 1e3,
                percentile(series, 0.99).as_secs_f64() * 1e3,
            );
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = orders as f64 / seconds;
        println!("| {throttle} | {phase} | confirmed orders per second | {orders} | {rate:.1} | |");
    }
}

fn services(stack: &Stack) -> [(&'static str, u32); 4] {
    [
        ("telegram-gateway", stack.gateway.pid().unwrap_or(0)),
        ("exchange-signer", stack.signer.pid().unwrap_or(0)),
        ("llm-advisor", stack.advisor.pid().unwrap_or(0)),
        ("audit-sink", stack.audit.pid().unwrap_or(0)),
    ]
}

async fn run_mode(throttle: &str, sequential: usize) -> anyhow::Result<Vec<String>> {
    let lifted = || "100000000".to_owned();
    let stack = Stack::start(Options {
        signer: vec![
            ("ENGRAM_POLICY_MAX_ORDERS_PER_MINUTE", lifted()),
            ("ENGRAM_POLICY_MAX_DAILY_NOTIONAL", lifted()),
            ("ENGRAM_EXCHANGE_WEIGHT_LIMIT", lifted()),
        ],
        gateway: vec![
            ("ENGRAM_TELEGRAM_THROTTLE", throttle.to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", lifted()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT", lifted()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", lifted()),
            ("ENGRAM_GATEWAY_USER_COMMANDS", lifted()),
            ("ENGRAM_GATEWAY_GLOBAL_COMMANDS", lifted()),
        ],
        ..Options::default()
    })
    .await?;
    let result = measure(&stack, throttle, sequential).await;
    if result.is_err() {
        eprintln!("{}", stack.outputs());
    }
    stack.stop().await;
    result
}

async fn measure(stack: &Stack, throttle: &str, sequential: usize) -> anyhow::Result<Vec<String>> {
    for n in 0..WARMUP {
        confirmed_order(stack, TRADER, n).await?;
    }
    let idle: Vec<u64> = services(stack)
        .iter()
        .map(|(_, pid)| rss_kib(*pid))
        .collect();

    let mut one = Phase::default();
    let started = Instant::now();
    for n in 0..sequential {
        one.add(confirmed_order(stack, TRADER, n).await?);
    }
    one.print(throttle, "one at a time", started.elapsed().as_secs_f64());

    // Two people trading at once while a sampler keeps each service's peak memory.
    let mut peak = idle.clone();
    let mut two = Phase::default();
    let started = Instant::now();
    let person = |user: i64| async move {
        let mut done = Vec::new();
        while started.elapsed() < LOAD {
            done.push(confirmed_order(stack, user, done.len()).await?);
        }
        anyhow::Ok(done)
    };
    let sampler = async {
        while started.elapsed() < LOAD {
            for (slot, (_, pid)) in peak.iter_mut().zip(services(stack)) {
                *slot = (*slot).max(rss_kib(pid));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (admin, trader, ()) = tokio::join!(person(ADMIN), person(TRADER), sampler);
    for sample in admin?.into_iter().chain(trader?) {
        two.add(sample);
    }
    two.print(
        throttle,
        "two people at once",
        started.elapsed().as_secs_f64(),
    );

    #[allow(clippy::cast_precision_loss)]
    let memory = services(stack)
        .iter()
        .zip(idle.iter().zip(&peak))
        .map(|((name, _), (idle, peak))| {
            format!(
                "| {throttle} | {name} | {:.1} MiB | {:.1} MiB |",
                *idle as f64 / 1024.0,
                *peak as f64 / 1024.0
            )
        })
        .collect();
    Ok(memory)
}

async fn run() -> anyhow::Result<()> {
    println!("| throttle | phase | measure | orders | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    let mut memory = Vec::new();
    for (throttle, sequential) in [("off", 200), ("on", 40)] {
        memory.extend(run_mode(throttle, sequential).await?);
    }
    println!();
    println!(
        "| throttle | service | RSS idle (after warm-up) | RSS peak under the two-person load |"
    );
    println!("|---|---|---|---|");
    for row in memory {
        println!("{row}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
