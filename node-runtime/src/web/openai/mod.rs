//! The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`)
//! on the dashboard's server, so SDKs, editors and evaluation harnesses reach a network
//! unchanged. It is a front end like the dashboard's chat: the same client library,
//! chat template, private modes and billing (`chat::prepare_job`); what is its own is
//! the API key (`keys`, `payer`), OpenAI's request and answer shapes, server-sent
//! events, and a cap on concurrent generations (429 beyond it).

pub mod error;
pub mod keys;
pub mod payer;
mod request;
mod stops;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use unfed_proto::ModelState;

use self::error::OpenAiError;
use self::keys::ApiKeys;
use self::request::{ChatRequest, Checked, CompletionRequest, Request, parse};
use self::stops::StopScan;
use super::chat::{Prepared, prepare_job};
use super::server::WebState;
use super::views::amount;
use crate::client::text::IncrementalDecoder;
use crate::client::{Client, GenerateOutput};

/// The API's own state in the dashboard's.
pub struct ApiState {
    pub keys: ApiKeys,
    /// One permit per generation in progress.
    slots: Arc<Semaphore>,
    max_concurrent: usize,
}

impl ApiState {
    pub fn new(keys: ApiKeys, max_concurrent: usize) -> Self {
        Self {
            keys,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
        }
    }

    /// A generation slot, or 429 when every one is taken.
    fn slot(&self) -> Result<OwnedSemaphorePermit, OpenAiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            OpenAiError::new(
                429,
                format!(
                    "the server is busy: {} generations are in progress (--api-max-concurrent); retry shortly",
                    self.max_concurrent
                ),
            )
        })
    }
}

pub fn routes() -> Router<Arc<WebState>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
}

async fn models(
    State(s): State<Arc<WebState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, OpenAiError> {
    payer::payer_of(&s.api.keys, &headers)?;
    let mut client = Client::connect(&s.net, &s.registry)
        .await
        .map_err(|e| OpenAiError::new(503, format!("{e:#}")))?;
    let models = client
        .list_models()
        .await
        .map_err(|e| OpenAiError::new(502, format!("{e:#}")))?;
    let data: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({
                "id": m.model,
                "object": "model",
                "created": 0,
                "owned_by": "unfed",
                // Extensions: whether the network can serve it now, and why not.
                "ready": m.state == ModelState::Ready as i32,
                "state": crate::client::readiness_text(m),
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Which endpoint answers: the shapes of its objects differ.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(
    State(s): State<Arc<WebState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    serve::<ChatRequest>(s, &headers, &body, Kind::Chat).await
}

async fn completions(
    State(s): State<Arc<WebState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    serve::<CompletionRequest>(s, &headers, &body, Kind::Completion).await
}

/// The key first (401 whatever the body), then the body's checks, then the answer.
async fn serve<R: Request>(
    s: Arc<WebState>,
    headers: &HeaderMap,
    body: &[u8],
    kind: Kind,
) -> Result<Response, OpenAiError> {
    let payer = payer::payer_of(&s.api.keys, headers)?;
    let checked = parse::<R>(body)?.check()?;
    respond(s, payer, kind, checked).await
}

/// What every answer object of one request shares.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(kind: Kind, model: &str) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Self {
            kind,
            id: format!("{prefix}-{}", hex::encode(rand::random::<[u8; 12]>())),
            created: keys::now_ms() / 1000,
            model: model.to_string(),
        }
    }

    /// An answer object with `choices` (one, index 0, or none) and maybe `usage`.
    fn object(&self, stream: bool, choice: Option<Value>, usage: Option<Value>) -> Value {
        let object = match (self.kind, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choice.map(|c| vec![c]).unwrap_or_default(),
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// One choice with `text` (a message, a delta, or completion text).
    fn choice(&self, stream: bool, text: Option<&str>, finish: Option<&str>) -> Value {
        let mut c = json!({ "index": 0, "finish_reason": finish, "logprobs": null });
        match (self.kind, stream) {
            (Kind::Chat, false) => {
                c["message"] = json!({ "role": "assistant", "content": text.unwrap_or("") })
            }
            (Kind::Chat, true) => {
                c["delta"] = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                }
            }
            (Kind::Completion, _) => c["text"] = json!(text.unwrap_or("")),
        }
        c
    }
}

/// A generation that ran to its end.
struct Finished {
    out: GenerateOutput,
    /// "stop" (EOS or a stop sequence) or "length" (max_tokens).
    finish: &'static str,
}

/// Prompt and completion tokens, and (an extension) what the payer is billed for them in
/// the network's token.
fn usage(s: &WebState, f: &Finished) -> Value {
    let (prompt, completion) = (f.out.prompt_tokens, f.out.tokens.len());
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": amount(s.prices.cost(prompt as u64, completion as u64)),
    })
}

async fn respond(
    s: Arc<WebState>,
    (payer, signer): (unfed_chain::Address, Option<crate::voucher::Payer>),
    kind: Kind,
    c: Checked,
) -> Result<Response, OpenAiError> {
    let slot = s.api.slot()?;
    let p = prepare_job(&s, (Some(payer), signer), c.job).await?;
    let meta = Meta::new(kind, &p.model);
    if !c.stream {
        let mut text = String::new();
        let f = drive(p, c.stops, |t| {
            text.push_str(&t);
            true
        })
        .await?;
        let choice = meta.choice(false, Some(&text), Some(f.finish));
        return Ok(Json(meta.object(false, Some(choice), Some(usage(&s, &f)))).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let _slot = slot;
        if let Kind::Chat = kind {
            let mut first = meta.choice(true, None, None);
            first["delta"] = json!({ "role": "assistant", "content": "" });
            let _ = tx.send(meta.object(true, Some(first), None));
        }
        let sent = drive(p, c.stops, |t| {
            tx.send(meta.object(true, Some(meta.choice(true, Some(&t), None)), None))
                .is_ok()
        })
        .await;
        let _ = match sent {
            Ok(f) => {
                let last = meta.choice(true, None, Some(f.finish));
                let _ = tx.send(meta.object(true, Some(last), None));
                match c.include_usage {
                    true => tx.send(meta.object(true, None, Some(usage(&s, &f)))),
                    false => Ok(()),
                }
            }
            Err(e) => tx.send(e.body()),
        };
    });
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Runs the generation, passing each piece of text that is final (stop sequences cut)
/// to `emit`; `emit` returning false (the client left) stops it after the current step.
async fn drive(
    mut p: Prepared,
    stops: Vec<String>,
    mut emit: impl FnMut(String) -> bool,
) -> Result<Finished, OpenAiError> {
    let stop = Arc::new(AtomicBool::new(false));
    p.opts.stop = Some(stop.clone());
    let codec = p.codec.clone();
    let mut decoder = IncrementalDecoder::new(&codec);
    let mut scan = StopScan::new(stops);
    let (mut matched, mut gone) = (false, false);
    let (task, mut rx) = p.spawn();
    while let Some(id) = rx.recv().await {
        if matched || gone {
            continue;
        }
        let (text, hit) = scan.push(&decoder.push(id).unwrap_or_default());
        if !text.is_empty() && !emit(text) {
            gone = true;
        }
        matched = hit;
        if matched || gone {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let (_, out) = task
        .await
        .map_err(|e| OpenAiError::new(500, format!("the generation task failed: {e}")))?;
    let out = out.map_err(|e| OpenAiError::new(502, format!("{e:#}")))?;
    if !matched && !gone {
        let rest = scan.finish();
        if !rest.is_empty() {
            emit(rest);
        }
    }
    let finish = if matched || out.stopped_on_eos {
        "stop"
    } else {
        "length"
    };
    Ok(Finished { out, finish })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_beyond_the_cap_are_refused_with_429_until_one_ends() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ApiKeys::open(&dir.path().join("web.db")).unwrap();
        let api = ApiState::new(keys, 1);
        let held = api.slot().unwrap();
        let refused = api.slot().unwrap_err();
        assert_eq!(refused.status.as_u16(), 429);
        assert_eq!(refused.body()["error"]["type"], "rate_limit_error");
        drop(held);
        assert!(api.slot().is_ok());
    }
}
