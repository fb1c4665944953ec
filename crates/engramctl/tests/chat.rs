//! `engramctl chat` against the Telegram double, with a small scripted bot on the other side
//! speaking the real Bot API: typed lines arrive as messages, the bot's replies and buttons
//! print as plain text, typing a number presses a button, and `/quit` ends the session.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engram_doubles::telegram::TelegramDouble;
use engram_testkit::poll_until;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "5:chat-test-token";

/// A bot that asks to confirm any message and reports the button it gets.
async fn scripted_bot(url: String) {
    let client = reqwest::Client::new();
    let api = |method: &str| format!("{url}/bot{TOKEN}/{method}");
    let mut offset = 0;
    loop {
        let Ok(response) = client
            .post(api("getUpdates"))
            .json(&json!({ "offset": offset, "timeout": 5 }))
            .send()
            .await
        else {
            continue;
        };
        let body: Value = response.json().await.unwrap_or_default();
        for update in body["result"].as_array().cloned().unwrap_or_default() {
            offset = update["update_id"].as_i64().unwrap_or(0) + 1;
            if let Some(message) = update.get("message") {
                let text = message["text"].as_str().unwrap_or_default();
                let reply = json!({
                    "chat_id": message["chat"]["id"],
                    "text": format!("Confirm <b>{}</b>? &lt;sure&gt;", text.replace('<', "&lt;")),
                    "parse_mode": "HTML",
                    "reply_markup": { "inline_keyboard": [[
                        { "text": "Confirm", "callback_data": "ok:1" },
                        { "text": "Cancel", "callback_data": "no:1" },
                    ]]},
                });
                let _ = client.post(api("sendMessage")).json(&reply).send().await;
            } else if let Some(query) = update.get("callback_query") {
                let _ = client
                    .post(api("answerCallbackQuery"))
                    .json(&json!({ "callback_query_id": query["id"], "text": "Got it" }))
                    .send()
                    .await;
                let edit = json!({
                    "chat_id": query["message"]["chat"]["id"],
                    "message_id": query["message"]["message_id"],
                    "text": format!("pressed {} by {}", query["data"].as_str().unwrap_or_default(), query["from"]["id"]),
                });
                let _ = client.post(api("editMessageText")).json(&edit).send().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_chats_and_presses_buttons() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = TelegramDouble::start("127.0.0.1:0".parse().expect("addr"), TOKEN)
        .await
        .expect("double");
    let bot = tokio::spawn(scripted_bot(double.url()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .args(["chat", "--url", &double.url(), "--user", "42"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn engramctl");
    let output = Arc::new(Mutex::new(String::new()));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    {
        let output = output.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let mut output = output.lock().expect("lock");
                output.push_str(&line);
                output.push('\n');
            }
        });
    }
    let wait_for = |needle: &'static str| {
        let output = output.clone();
        async move {
            poll_until(needle, Duration::from_secs(15), || {
                let output = output.clone();
                async move { output.lock().expect("lock").contains(needle).then_some(()) }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", output.lock().expect("lock")));
        }
    };
    wait_for("Chatting with the bot as user 42 in chat 42").await;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"/buy BTCUSDT 1\n").await.expect("type");
    wait_for("bot> Confirm /buy BTCUSDT 1? <sure>\n     [1] Confirm  [2] Cancel").await;
    stdin.write_all(b"1\n").await.expect("type");
    wait_for("bot (notice)> Got it").await;
    wait_for("bot (edited)> pressed ok:1 by 42").await;
    stdin.write_all(b"/quit\n").await.expect("type");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success());
    bot.abort();
}

#[tokio::test]
async fn an_unreachable_double_is_a_clear_error() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .args(["chat", "--url", "http://127.0.0.1:9"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the Telegram double"),
        "{stderr}"
    );
}
