//! The request bodies of `/v1/chat/completions` and `/v1/completions`, checked into a
//! `Job`: every field this server does not implement is refused by name unless it asks
//! for nothing (null, false, 0, empty), so a client never gets silently different
//! behaviour from what it asked for.

use serde::Deserialize;
use serde_json::{Map, Value};
use unfed_proto::SamplingParams;

use super::error::OpenAiError;
use crate::client::image::IMAGE_TOKEN;
use crate::client::text::Turn;
use crate::web::chat::{Job, JobPrompt, MAX_TOKENS_LIMIT};

/// Stop sequences one request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Options {
    pub model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    /// The chat API's newer name for max_tokens.
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    /// OpenAI's default is 1 (sampled); 0 = greedy.
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Absent = a random seed, as OpenAI does.
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Extensions (as vLLM's): 0 = off; 1 = off.
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    pub options: Options,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
    /// A participant's name: templates ignore it, so it changes nothing.
    #[serde(default, rename = "name")]
    _name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    pub options: Options,
}

/// A checked request: what to generate and how to answer.
pub struct Checked {
    pub job: Job,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A request body of one endpoint, checked into what to generate.
pub trait Request: serde::de::DeserializeOwned {
    fn check(self) -> Result<Checked, OpenAiError>;
}

/// Parses a JSON body, answering a malformed one with OpenAI's 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, OpenAiError> {
    serde_json::from_slice(body)
        .map_err(|e| OpenAiError::new(400, format!("the request body is not valid: {e}")))
}

/// Asks for nothing: what a client sends for a feature it does not use.
fn neutral(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "none" || s == "auto",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty() || (o.len() == 1 && o.get("type") == Some(&"text".into())),
    }
}

impl Options {
    fn check(self, prompt: JobPrompt, image: Option<String>) -> Result<Checked, OpenAiError> {
        for (name, value) in &self.rest {
            // `user` only labels the caller for abuse reports; it changes no output.
            if name != "user" && !neutral(value) {
                return Err(OpenAiError::param(
                    name,
                    format!("`{name}` is not supported by this server; remove it from the request"),
                ));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(OpenAiError::param(
                "n",
                "only n = 1 is supported: send one request per completion",
            ));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens
            && (m == 0 || m > MAX_TOKENS_LIMIT)
        {
            return Err(OpenAiError::param(
                "max_tokens",
                format!("max_tokens {m} is out of range; use 1..={MAX_TOKENS_LIMIT}"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(OpenAiError::param(
                "temperature",
                format!("temperature {temperature} is out of range; use 0 (greedy) to 2"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(OpenAiError::param(
                "top_p",
                format!("top_p {top_p} is out of range; use (0, 1]"),
            ));
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(OpenAiError::param(
                "repetition_penalty",
                format!("repetition_penalty {repetition_penalty} must be positive (1 = off)"),
            ));
        }
        let stops = stops(self.stop)?;
        if self.model.trim().is_empty() {
            return Err(OpenAiError::param(
                "model",
                "`model` is empty; GET /v1/models lists the models",
            ));
        }
        Ok(Checked {
            job: Job {
                model: Some(self.model),
                prompt,
                image,
                max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_p,
                    top_k: self.top_k.unwrap_or(0),
                    repetition_penalty,
                    seed: self.seed.unwrap_or_else(rand::random),
                    ..Default::default()
                },
            },
            stops,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

/// `stop`: a string or up to four strings, none empty.
fn stops(v: Option<Value>) -> Result<Vec<String>, OpenAiError> {
    let bad = || {
        OpenAiError::param(
            "stop",
            format!("`stop` must be a string or a list of at most {MAX_STOPS} non-empty strings"),
        )
    };
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if list.len() > MAX_STOPS || list.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(list)
}

impl Request for ChatRequest {
    fn check(self) -> Result<Checked, OpenAiError> {
        if self.messages.is_empty() {
            return Err(OpenAiError::param(
                "messages",
                "`messages` is empty; send at least one user message",
            ));
        }
        let mut image = None;
        let mut turns = Vec::new();
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" | "assistant" => m.role.as_str(),
                other => {
                    return Err(OpenAiError::param(
                        "messages",
                        format!(
                            "messages[{i}].role `{other}` is not supported; use system, user or assistant"
                        ),
                    ));
                }
            };
            let (text, has_image) = content(i, &m.content, &mut image)?;
            turns.push(Turn {
                role: role.to_string(),
                text,
                image: has_image,
            });
        }
        self.options.check(JobPrompt::Conversation(turns), image)
    }
}

/// A message's text (parts joined, the image's place marked `<image>`), and whether it
/// holds the request's one image (stored in `image`).
fn content(i: usize, v: &Value, image: &mut Option<String>) -> Result<(String, bool), OpenAiError> {
    let bad = |m: String| Err(OpenAiError::param("messages", m));
    let parts = match v {
        Value::String(s) => return Ok((s.clone(), false)),
        Value::Array(parts) => parts,
        _ => {
            return bad(format!(
                "messages[{i}].content must be a string or a list of parts"
            ));
        }
    };
    let mut text = String::new();
    let mut has_image = false;
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(part.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .or_else(|| part.get("image_url"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !url.starts_with("data:image/") || !url.contains(";base64,") {
                    return bad(format!(
                        "messages[{i}]: an image must be a data URL (data:image/png;base64,...); this server fetches no URLs"
                    ));
                }
                if image.is_some() {
                    return bad("only one image per request is supported".into());
                }
                *image = Some(url.to_string());
                has_image = true;
                text.push_str(IMAGE_TOKEN);
            }
            other => {
                return bad(format!(
                    "messages[{i}]: content part type {other:?} is not supported; use text or image_url"
                ));
            }
        }
    }
    Ok((text, has_image))
}

impl Request for CompletionRequest {
    fn check(self) -> Result<Checked, OpenAiError> {
        let text = match &self.prompt {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            _ => {
                return Err(OpenAiError::param(
                    "prompt",
                    "`prompt` must be one string (token-id prompts and batches are not supported)",
                ));
            }
        };
        if text.is_empty() {
            return Err(OpenAiError::param("prompt", "`prompt` is empty"));
        }
        // A completion continues the text as is: no chat template.
        self.options
            .check(JobPrompt::Text { text, raw: true }, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Result<Checked, OpenAiError> {
        parse::<ChatRequest>(v.to_string().as_bytes())?.check()
    }

    fn refused_param(v: Value) -> (u16, Option<String>) {
        let e = chat(v).err().expect("refused");
        (e.status.as_u16(), e.param)
    }

    #[test]
    fn unsupported_or_out_of_range_fields_are_refused_by_name() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            refused_param(base(json!({"n": 2}))),
            (400, Some("n".into()))
        );
        assert_eq!(
            refused_param(base(json!({"logprobs": true}))),
            (400, Some("logprobs".into()))
        );
        assert_eq!(
            refused_param(base(json!({"tools": [{"type": "function"}]}))),
            (400, Some("tools".into()))
        );
        assert_eq!(
            refused_param(base(json!({"temperature": 2.5}))),
            (400, Some("temperature".into()))
        );
        assert_eq!(
            refused_param(base(json!({"stop": ["a", "b", "c", "d", "e"]}))),
            (400, Some("stop".into()))
        );
        assert_eq!(
            refused_param(base(json!({"max_tokens": 0}))),
            (400, Some("max_tokens".into()))
        );
        // What asks for nothing passes; n = 1 and a stop string too.
        let ok = chat(base(json!({
            "n": 1, "logprobs": false, "presence_penalty": 0, "user": "u", "stop": "\n",
            "temperature": 0, "seed": 5, "max_tokens": 3
        })))
        .unwrap();
        assert_eq!(ok.stops, vec!["\n".to_string()]);
        assert_eq!(ok.job.max_tokens, Some(3));
        assert_eq!(
            (ok.job.sampling.temperature, ok.job.sampling.seed),
            (0.0, 5)
        );
    }

    #[test]
    fn messages_become_turns_with_the_image_in_place() {
        let c = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": " this?"}
            ]}
        ]}))
        .unwrap();
        let JobPrompt::Conversation(turns) = &c.job.prompt else {
            panic!("a conversation")
        };
        assert_eq!(turns[0].role, "system");
        assert_eq!(turns[1].text, "what is <image> this?");
        assert!(turns[1].image && !turns[0].image);
        assert_eq!(c.job.image.as_deref(), Some("data:image/png;base64,AAAA"));
        // Only data URLs: this server fetches nothing on a client's behalf.
        let (status, param) = refused_param(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}),
        );
        assert_eq!((status, param.as_deref()), (400, Some("messages")));
    }
}
