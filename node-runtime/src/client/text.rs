//! Text in and out: the tokenizer, the chat template, and incremental decoding.

use anyhow::{Context, Result, anyhow};
use tokenizers::Tokenizer;
use unfed_proto::GetManifestResponse;

/// One message of a conversation: its role (system, user, assistant), its text, and
/// whether it carries the prompt's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub text: String,
    pub image: bool,
}

impl Turn {
    pub fn user(text: &str) -> Self {
        Self {
            role: "user".into(),
            text: text.into(),
            image: false,
        }
    }

    /// The text, with the `<image>` marker where the image goes when it has one.
    fn marked_text(&self) -> String {
        if self.image {
            super::image::user_message_with_image(&self.text)
        } else {
            self.text.clone()
        }
    }

    /// `[{type: text}, {type: image}, {type: text}]` around the marker, empty parts left out.
    fn typed_parts(&self) -> minijinja::Value {
        let marked = self.marked_text();
        let (before, after) = marked
            .split_once(super::image::IMAGE_TOKEN)
            .expect("user_message_with_image adds the marker");
        let text_part = |s: &str| minijinja::context! { type => "text", text => s };
        let mut parts = Vec::new();
        if !before.is_empty() {
            parts.push(text_part(before));
        }
        parts.push(minijinja::context! { type => "image" });
        if !after.is_empty() {
            parts.push(text_part(after));
        }
        minijinja::Value::from(parts)
    }
}

pub struct TextCodec {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

/// A special token from tokenizer_config.json: a string or `{ "content": ... }`.
fn special(cfg: &serde_json::Value, key: &str) -> String {
    match cfg.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl TextCodec {
    /// From the files the registry serves beside the manifest.
    pub fn from_manifest_files(files: &GetManifestResponse, model: &str) -> Result<Self> {
        if files.tokenizer_json.is_empty() {
            anyhow::bail!(
                "the registry has no tokenizer.json for `{model}`: copy the checkpoint's tokenizer.json into the split directory"
            );
        }
        let tokenizer = Tokenizer::from_bytes(files.tokenizer_json.as_bytes())
            .map_err(|e| anyhow!("tokenizer.json of `{model}` does not load: {e}"))?;
        let cfg: serde_json::Value = if files.tokenizer_config_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&files.tokenizer_config_json)
                .context("tokenizer_config.json does not parse")?
        };
        let chat_template = if !files.chat_template.is_empty() {
            Some(files.chat_template.clone())
        } else {
            cfg.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: special(&cfg, "bos_token"),
            eos_token: special(&cfg, "eos_token"),
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The prompt as the model expects it: wrapped in the chat template for instruct
    /// models (one user turn, generation prompt added) unless `raw`.
    pub fn render_prompt(&self, user: &str, raw: bool) -> Result<String> {
        if raw {
            return Ok(user.to_string());
        }
        self.render_conversation(&[Turn::user(user)])
    }

    /// `render_prompt` for a turn with one image, placed where `text` says `<image>` (or
    /// first).
    pub fn render_image_prompt(&self, text: &str, raw: bool) -> Result<String> {
        if raw {
            return Ok(super::image::user_message_with_image(text));
        }
        self.render_conversation(&[Turn {
            image: true,
            ..Turn::user(text)
        }])
    }

    /// A whole conversation through the chat template, generation prompt added. A turn
    /// with the image places it where its text says `<image>` (or first): templates of
    /// multimodal models (SmolVLM's) read typed content parts, so they get
    /// `[{type: image}, {type: text, text}]` as transformers' processors pass them; other
    /// templates get the text with the `<image>` marker in it. Without a template the
    /// turns' texts are joined by newlines (one user turn: its text as is).
    pub fn render_conversation(&self, turns: &[Turn]) -> Result<String> {
        let Some(t) = &self.chat_template else {
            let texts: Vec<String> = turns.iter().map(Turn::marked_text).collect();
            return Ok(texts.join("\n"));
        };
        let typed = ["'type'", "\"type\"", ".type"]
            .iter()
            .any(|k| t.contains(k));
        let messages: Vec<minijinja::Value> = turns
            .iter()
            .map(|turn| {
                let content = if turn.image && typed {
                    turn.typed_parts()
                } else {
                    minijinja::Value::from(turn.marked_text())
                };
                minijinja::context! { role => turn.role.clone(), content => content }
            })
            .collect();
        self.render_template(t, messages)
    }

    /// The chat template over `messages`, generation prompt added.
    fn render_template(&self, t: &str, messages: Vec<minijinja::Value>) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", t)
            .context("the model's chat template does not parse")?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        env.get_template("chat")?
            .render(ctx)
            .context("rendering the chat template failed")
    }

    /// Token ids of a prompt. The chat template writes its own special tokens; a raw
    /// prompt gets the tokenizer's post-processing (as `tokenizer(prompt)` does).
    pub fn encode_prompt(&self, user: &str, raw: bool) -> Result<Vec<u32>> {
        let text = self.render_prompt(user, raw)?;
        self.encode_rendered(&text, raw)
    }

    /// Token ids of a conversation (`render_conversation`).
    pub fn encode_conversation(&self, turns: &[Turn]) -> Result<Vec<u32>> {
        let text = self.render_conversation(turns)?;
        self.encode_rendered(&text, false)
    }

    /// Token ids of rendered text: special tokens added unless the template wrote them.
    fn encode_rendered(&self, text: &str, raw: bool) -> Result<Vec<u32>> {
        let templated = self.chat_template.is_some() && !raw;
        let enc = self
            .tokenizer
            .encode(text, !templated)
            .map_err(|e| anyhow!("tokenizing the prompt failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding tokens failed: {e}"))
    }
}

/// Turns a growing token list into text deltas, holding back an incomplete UTF-8
/// sequence (shown as U+FFFD) until the next token completes it.
pub struct IncrementalDecoder<'a> {
    codec: &'a TextCodec,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(codec: &'a TextCodec) -> Self {
        Self {
            codec,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// The new text after adding `id` (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }
}
