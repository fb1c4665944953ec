//! `engramctl chat`: talk to the bot from a terminal, through the Telegram double's control
//! API, as a chosen user in a chosen chat. Lines are sent as messages; the bot's messages,
//! edits and button answers are printed as plain text; `1`, `2`, ... press the buttons under
//! the newest message that has any.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What a typed line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Send as a message.
    Say(String),
    /// Press button N (1-based) of the newest message with buttons.
    Press(usize),
    /// Leave.
    Quit,
    /// Nothing to do (an empty line).
    Nothing,
}

/// Reads one typed line.
pub fn parse_input(line: &str) -> Input {
    let line = line.trim();
    match line {
        "" => Input::Nothing,
        "/quit" | "/exit" => Input::Quit,
        _ => match line.parse::<usize>() {
            Ok(n) if (1..=8).contains(&n) => Input::Press(n),
            _ => Input::Say(line.to_owned()),
        },
    }
}

/// Telegram HTML as terminal text: tags dropped, entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        match rest[start..].find('>') {
            Some(end) => rest = &rest[start + end + 1..],
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// One thing the bot did, as the double's control API reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    /// Position in the double's log.
    pub seq: u64,
    /// `send`, `edit` or `answer`.
    pub kind: String,
    /// The chat (0 for button answers).
    pub chat_id: i64,
    /// The message sent or edited.
    pub message_id: i64,
    /// Its text (Telegram HTML).
    pub text: String,
    /// Button rows of `(label, data)`.
    pub buttons: Vec<Vec<(String, String)>>,
}

/// How an action prints, or `None` when it is for another chat.
pub fn render(action: &Action, chat_id: i64) -> Option<String> {
    let text = html_to_text(&action.text);
    match action.kind.as_str() {
        "send" if action.chat_id == chat_id => {
            let buttons: Vec<String> = action
                .buttons
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, (label, _))| format!("[{}] {label}", i + 1))
                .collect();
            Some(if buttons.is_empty() {
                format!("bot> {text}")
            } else {
                format!(
                    "bot> {text}\n     {}  (type the number)",
                    buttons.join("  ")
                )
            })
        }
        "edit" if action.chat_id == chat_id => Some(format!("bot (edited)> {text}")),
        "answer" if !text.is_empty() => Some(format!("bot (notice)> {text}")),
        _ => None,
    }
}

/// The chat session's settings.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// The double's base URL.
    pub url: String,
    /// Who speaks.
    pub user_id: i64,
    /// Where.
    pub chat_id: i64,
    /// The name shown to the bot.
    pub username: String,
}

async fn newest_seq(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let actions: Vec<Action> = client
        .get(format!("{url}/control/actions"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(actions.last().map_or(0, |a| a.seq))
}

/// Runs the session until `/quit`, end of input or Ctrl-C.
///
/// # Errors
///
/// When the double cannot be reached.
pub async fn run(settings: ChatSettings) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()?;
    let url = settings.url.trim_end_matches('/').to_owned();
    let mut seen = newest_seq(&client, &url).await.map_err(|e| {
        anyhow::anyhow!("cannot reach the Telegram double at {url} ({e}); is `make up` running?")
    })?;
    println!(
        "Chatting with the bot as user {} in chat {}. /help lists the commands; /quit leaves.",
        settings.user_id, settings.chat_id
    );
    let (printed_tx, mut printed_rx) = tokio::sync::watch::channel(None::<Action>);
    let printer = {
        let (client, url) = (client.clone(), url.clone());
        let chat_id = settings.chat_id;
        tokio::spawn(async move {
            loop {
                let response = client
                    .get(format!("{url}/control/actions?after={seen}&wait=25"))
                    .send()
                    .await;
                let actions: Vec<Action> = match response {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                for action in actions {
                    seen = seen.max(action.seq);
                    if let Some(line) = render(&action, chat_id) {
                        println!("{line}");
                    }
                    if action.kind == "send"
                        && action.chat_id == chat_id
                        && !action.buttons.is_empty()
                    {
                        let _ = printed_tx.send(Some(action));
                    }
                }
            }
        })
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        match parse_input(&line) {
            Input::Nothing => {}
            Input::Quit => break,
            Input::Say(text) => {
                client
                    .post(format!("{url}/control/messages"))
                    .json(&serde_json::json!({
                        "chat_id": settings.chat_id, "user_id": settings.user_id,
                        "username": settings.username, "text": text,
                    }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
            Input::Press(n) => {
                let newest = printed_rx.borrow_and_update().clone();
                let button = newest.as_ref().and_then(|a| {
                    a.buttons
                        .iter()
                        .flatten()
                        .nth(n - 1)
                        .map(|b| (a.message_id, b.1.clone()))
                });
                let Some((message_id, data)) = button else {
                    println!("(no button {n} to press)");
                    continue;
                };
                client
                    .post(format!("{url}/control/callbacks"))
                    .json(&serde_json::json!({
                        "chat_id": settings.chat_id, "user_id": settings.user_id,
                        "message_id": message_id, "data": data,
                    }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }
    }
    printer.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_become_messages_or_presses() {
        assert_eq!(
            parse_input("/price BTCUSDT"),
            Input::Say("/price BTCUSDT".to_owned())
        );
        assert_eq!(parse_input(" 1 "), Input::Press(1));
        assert_eq!(parse_input("9"), Input::Say("9".to_owned()));
        assert_eq!(parse_input("0"), Input::Say("0".to_owned()));
        assert_eq!(parse_input(""), Input::Nothing);
        assert_eq!(parse_input("/quit"), Input::Quit);
    }

    #[test]
    fn html_prints_as_plain_text() {
        assert_eq!(
            html_to_text("<b>BUY</b> 1 &lt;x&gt; &amp;amp; <code>a</code>"),
            "BUY 1 <x> &amp; a"
        );
        assert_eq!(html_to_text("a < b"), "a < b");
    }

    #[test]
    fn only_this_chats_messages_print() {
        let action = |kind: &str, chat_id| Action {
            seq: 1,
            kind: kind.to_owned(),
            chat_id,
            message_id: 5,
            text: "<b>hi</b>".to_owned(),
            buttons: vec![vec![("Confirm".to_owned(), "ok:x".to_owned())]],
        };
        assert_eq!(
            render(&action("send", 7), 7).expect("shown"),
            "bot> hi\n     [1] Confirm  (type the number)"
        );
        assert!(render(&action("send", 8), 7).is_none());
        assert_eq!(
            render(&action("edit", 7), 7).expect("shown"),
            "bot (edited)> hi"
        );
        assert_eq!(
            render(&action("answer", 0), 7).expect("shown"),
            "bot (notice)> hi"
        );
    }
}
