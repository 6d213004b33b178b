//! The OpenAI-compatible API against a real testnet: `unfedctl up` prints a dev key, the
//! official `openai` npm SDK (tests/web-e2e/openai.mjs) lists models, chats (plain,
//! streamed, seeded twice), completes, and is refused with the right statuses; curl
//! shows the server-sent events' framing and a stop sequence. Greedy output equals
//! `unfedctl chat --json` for the same prompt. One testnet for every assertion.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Net, driver_result, run, text, unfedctl};
use serde_json::{Value, json};

const INSTALL: &str = "npm ci --prefix tests/web-e2e";

/// `curl` a JSON body to `url` with `key`: (HTTP status, response headers, body).
fn curl(url: &str, key: &str, body: &Value) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-N", "-D", "-", "-X", "POST", url])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: Bearer {key}")])
        .args(["--data-binary", &body.to_string()])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    let all = text(&out.stdout);
    let (head, body) = all.split_once("\r\n\r\n").expect("headers then body");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

/// The events of an SSE body: each `data: ...` block, checked to be framed as one line
/// and a blank line.
fn events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "the stream ends with a blank line: {body:?}"
    );
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .filter(|e| !e.starts_with(':')) // keep-alive comments
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            assert!(!data.contains('\n'), "one line per event: {e:?}");
            data.to_string()
        })
        .collect()
}

#[test]
fn openai_sdk_and_curl_reach_a_testnet_unchanged() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    if !root.join("tests/web-e2e/node_modules/openai").is_dir() {
        let why = "tests/web-e2e/node_modules/openai is missing";
        // CI installs it, so there a missing package is a failure, not a skip.
        if std::env::var_os("CI").is_some() {
            panic!("{why}; run `{INSTALL}`");
        }
        eprintln!("\n*** SKIPPED the OpenAI SDK test: {why}; run `{INSTALL}` ***\n");
        return;
    }
    let net = Net::new("");
    let up = run(unfedctl().arg("up").arg(&net.spec).arg("--detach"));
    let up_out = text(&up.stdout);
    assert!(
        up.status.success(),
        "up failed:\n{up_out}\n{}",
        text(&up.stderr)
    );
    // `up` on Anvil prints the base URL and a dev key.
    let line = up_out
        .lines()
        .find(|l| l.trim_start().starts_with("openai "))
        .unwrap_or_else(|| panic!("no openai line in:\n{up_out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let base = words[1].to_string();
    let dev_key = words
        .iter()
        .find(|w| w.starts_with("unfed-sk-"))
        .unwrap()
        .to_string();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{line}"
    );

    // A key of its own, as a user would make one; the dev key keeps working beside it.
    let created = run(unfedctl()
        .args(["api-key", "create"])
        .arg(&net.spec)
        .args(["--label", "sdk", "--json"]));
    assert!(created.status.success(), "{}", text(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    assert_eq!(created["base_url"], base.as_str());
    assert_ne!(key, dev_key);
    let db = std::fs::read(net.run_dir().join("web.db")).unwrap();
    assert!(
        !db.windows(key.len()).any(|w| w == key.as_bytes()),
        "stored hashed"
    );

    let (prompt, max_tokens) = ("What is a network?", "24");
    let chat = run(unfedctl().arg("chat").arg(&net.spec).args([
        "--prompt",
        prompt,
        "--json",
        "--max-tokens",
        max_tokens,
    ]));
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let chat: Value = serde_json::from_slice(&chat.stdout).unwrap();

    let drive = Command::new("node")
        .arg(root.join("tests/web-e2e/openai.mjs"))
        .env("BASE_URL", &base)
        .env("API_KEY", &key)
        .env("PROMPT", prompt)
        .env("MAX_TOKENS", max_tokens)
        .output()
        .expect("run node");
    let seen = driver_result(&net, &drive, "SDK run");

    assert_eq!(seen["models"], json!([chat["model"]]), "{seen:#}");
    // Greedy: exactly what `unfedctl chat` says, plain and streamed.
    let tokens = chat["token_ids"].as_array().unwrap().len() as u64;
    assert_eq!(seen["greedy"]["text"], chat["text"], "{seen:#}");
    assert_eq!(seen["greedy"]["object"], "chat.completion");
    assert_eq!(seen["greedy"]["role"], "assistant");
    let usage = &seen["greedy"]["usage"];
    assert_eq!(usage["prompt_tokens"], chat["prompt_tokens"], "{seen:#}");
    assert_eq!(usage["completion_tokens"], tokens);
    // The cost at the spec's default prices, in the network's token.
    let cost: u128 = usage["cost"]["wei"].as_str().unwrap().parse().unwrap();
    let prompt_tokens = chat["prompt_tokens"].as_u64().unwrap() as u128;
    assert_eq!(
        cost,
        prompt_tokens * 100_000_000_000_000 + tokens as u128 * 1_000_000_000_000_000
    );
    let finish = if chat["stopped_on_eos"] == true {
        "stop"
    } else {
        "length"
    };
    assert_eq!(seen["greedy"]["finish_reason"], finish);
    assert_eq!(seen["stream"]["text"], chat["text"], "{seen:#}");
    assert_eq!(seen["stream"]["finish_reason"], finish);
    assert_eq!(seen["stream"]["usage"]["completion_tokens"], tokens);
    assert!(seen["stream"]["chunks"].as_u64().unwrap() >= 2, "{seen:#}");
    // Seeded sampling repeats itself.
    assert_eq!(seen["seeded"][0], seen["seeded"][1], "{seen:#}");
    assert!(!seen["seeded"][0].as_str().unwrap().is_empty());
    assert_eq!(seen["completion"]["object"], "text_completion");
    let completed = seen["completion"]["usage"]["completion_tokens"].as_u64();
    assert!(completed.is_some_and(|n| (1..=8).contains(&n)), "{seen:#}");
    // Refusals: status, OpenAI's error type, and the field at fault.
    assert_eq!(seen["bad_key"]["status"], 401, "{seen:#}");
    assert_eq!(seen["bad_key"]["type"], "authentication_error");
    assert_eq!(seen["unknown_model"]["status"], 404, "{seen:#}");
    assert_eq!(seen["unknown_model"]["code"], "model_not_found");
    assert_eq!(seen["long_prompt"]["status"], 400, "{seen:#}");
    assert!(
        seen["long_prompt"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{seen:#}"
    );
    assert_eq!(seen["n2"]["status"], 400);
    assert_eq!(seen["n2"]["param"], "n");

    // curl, with the dev key: the SSE framing, event by event, ending in [DONE].
    let url = format!("{base}/chat/completions");
    let body = json!({
        "model": chat["model"], "max_tokens": 24, "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": prompt}],
    });
    let (status, head, sse) = curl(&url, &dev_key, &body);
    assert_eq!(status, 200, "{head}{sse}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let evs = events(&sse);
    assert_eq!(evs.last().unwrap(), "[DONE]", "{sse}");
    let chunks: Vec<Value> = evs[..evs.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}")))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, chat["text"].as_str().unwrap());
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
    }
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish
    );

    // A stop sequence from the middle of the greedy answer cuts it there.
    let full = chat["text"].as_str().unwrap();
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(3).collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain["stop"] = json!([stop]);
    let (status, _, answer) = curl(&url, &dev_key, &plain);
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"], expected,
        "stop {stop:?}"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    // Streamed with the same stop: the same text.
    plain["stream"] = json!(true);
    let (_, _, sse) = curl(&url, &dev_key, &plain);
    let streamed: String = events(&sse)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, expected);

    // An unsupported parameter is refused by name, in OpenAI's error shape.
    let mut tools = body.clone();
    tools["stream"] = json!(false);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let (status, _, err) = curl(&url, &dev_key, &tools);
    assert_eq!(status, 400);
    let err: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(err["error"]["param"], "tools", "{err}");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(err["error"]["message"].is_string() && err["error"].get("code").is_some());

    // Throughput at one session: the API's streamed decode rate against `chat`'s.
    let api = seen["stream"]["decode_tokens_per_s"]
        .as_f64()
        .unwrap_or(0.0);
    let cli = chat["decode_tokens_per_s"].as_f64().unwrap();
    println!(
        "decode throughput at one session: API {api:.1} tok/s, unfedctl chat {cli:.1} tok/s ({:+.1} %)",
        (api / cli - 1.0) * 100.0
    );
}
