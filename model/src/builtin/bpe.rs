//! A byte-level BPE tokenizer (GPT-2 style) learned deterministically from an embedded
//! corpus and written as a HuggingFace `tokenizer.json`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// GPT-2's reversible byte -> printable char table: printable Latin-1 bytes map to
/// themselves, the rest to 256 + n.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid char")
        };
    }
    table
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Approximates GPT-2's pre-tokenizer regex: an optional leading space plus a run of
/// letters, digits or other symbols; whitespace runs on their own.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let idx: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let start = idx[i].0;
        if idx[i].1 == ' ' && i + 1 < idx.len() && class(idx[i + 1].1) != Class::Space {
            i += 1;
        }
        let c = class(idx[i].1);
        while i < idx.len() && class(idx[i].1) == c {
            i += 1;
        }
        let end = idx.get(i).map_or(text.len(), |(p, _)| *p);
        out.push(&text[start..end]);
    }
    out
}

pub struct Bpe {
    /// Token string (byte-level alphabet) by id.
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
    pub specials: Vec<String>,
}

/// Learns merges until the vocabulary (specials + 256 bytes + merges) reaches `vocab`.
/// Ties between equally frequent pairs go to the smallest id pair, so the result is a
/// pure function of the corpus.
pub fn train(corpus: &str, vocab: usize, specials: &[&str]) -> Bpe {
    let table = byte_to_char();
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let base = tokens.len() as u32;
    tokens.extend(table.iter().map(|c| c.to_string()));
    let mut ids: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();

    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for w in pre_tokenize(corpus) {
        *counts.entry(w).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, u32)> = counts
        .into_iter()
        .map(|(w, n)| (w.bytes().map(|b| base + b as u32).collect(), n))
        .collect();

    let mut merges = Vec::new();
    while tokens.len() < vocab {
        let mut pairs: HashMap<(u32, u32), u32> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Pairs seen once still merge: the corpus is small and the vocabulary must fill.
        let Some((&(a, b), _)) = pairs
            .iter()
            .max_by(|x, y| x.1.cmp(y.1).then_with(|| y.0.cmp(x.0)))
        else {
            break;
        };
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        let id = *ids.entry(merged.clone()).or_insert_with(|| {
            tokens.push(merged);
            tokens.len() as u32 - 1
        });
        merges.push((tokens[a as usize].clone(), tokens[b as usize].clone()));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    Bpe {
        tokens,
        merges,
        specials: specials.iter().map(|s| s.to_string()).collect(),
    }
}

impl Bpe {
    pub fn id(&self, token: &str) -> Option<u32> {
        self.tokens
            .iter()
            .position(|t| t == token)
            .map(|i| i as u32)
    }

    /// Encodes `text` by applying the merges in rank order within each pre-token (what
    /// the HF BPE model does, up to the approximate pre-tokenizer).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let base = self.specials.len() as u32;
        let ids: HashMap<&str, u32> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let rank: HashMap<(u32, u32), usize> = self
            .merges
            .iter()
            .enumerate()
            .map(|(r, (a, b))| ((ids[a.as_str()], ids[b.as_str()]), r))
            .collect();
        let mut out = Vec::new();
        for word in pre_tokenize(text) {
            let mut w: Vec<u32> = word.bytes().map(|b| base + b as u32).collect();
            while let Some((pos, _)) = w
                .windows(2)
                .enumerate()
                .filter_map(|(i, p)| rank.get(&(p[0], p[1])).map(|r| (i, *r)))
                .min_by_key(|(_, r)| *r)
            {
                let merged = format!(
                    "{}{}",
                    self.tokens[w[pos] as usize],
                    self.tokens[w[pos + 1] as usize]
                );
                w.splice(pos..pos + 2, [ids[merged.as_str()]]);
            }
            out.extend(w);
        }
        out
    }

    /// The HuggingFace `tokenizer.json` document.
    pub fn to_json(&self) -> Value {
        let byte_level = |prefix: bool| json!({ "type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true });
        let added: Vec<Value> = self
            .specials
            .iter()
            .map(|s| {
                json!({
                    "id": self.id(s),
                    "content": s,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": true
                })
            })
            .collect();
        let vocab: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<String> = self
            .merges
            .iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level(false),
            "post_processor": byte_level(false),
            "decoder": byte_level(false),
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printables() {
        let t = byte_to_char();
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn pre_tokenizer_keeps_leading_spaces() {
        assert_eq!(
            pre_tokenize("Hello world, 42!\n  x"),
            vec!["Hello", " world", ",", " 42", "!", "\n  ", "x"]
        );
    }
}
