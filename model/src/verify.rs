//! `verify`: check a split directory against its manifest: files present inside the
//! directory, sizes and hashes (whole file and each 4 MiB chunk), layer ranges covering
//! each stack exactly once, and every tensor a shard needs present with the shape the
//! config implies.

use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::hashing::{CHUNK_SIZE, hash_file};
use crate::layout;
use crate::manifest::{MANIFEST_FILE, Manifest, ShardEntry, Stack};
use crate::paths::is_plain_relative;
use crate::safetensors_io;

/// One thing wrong, attributed to a file of the split directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, file: &str, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_string(),
            message: message.into(),
        });
    }
}

/// Every problem found in `dir`; empty means the directory is good.
pub fn verify(dir: &Path) -> Vec<Problem> {
    let mut p = Problems(Vec::new());
    let manifest = match Manifest::load(dir) {
        Ok(m) => m,
        Err(e) => {
            p.add(MANIFEST_FILE, format!("cannot read the manifest: {e}"));
            return p.0;
        }
    };
    if manifest.format_version != crate::manifest::FORMAT_VERSION {
        p.add(
            MANIFEST_FILE,
            format!(
                "format_version {} is not the supported {}; re-split with this unfedctl",
                manifest.format_version,
                crate::manifest::FORMAT_VERSION
            ),
        );
    }
    if manifest.architecture != manifest.config.architecture {
        p.add(
            MANIFEST_FILE,
            format!(
                "architecture {} disagrees with config.architecture {}",
                manifest.architecture, manifest.config.architecture
            ),
        );
    }
    coverage(&manifest, Stack::Text, &mut p);
    coverage(&manifest, Stack::Vision, &mut p);

    for shard in &manifest.shards {
        if check_file(
            dir,
            &shard.file,
            shard.size,
            &shard.sha256,
            Some(&shard.chunk_sha256),
            &mut p,
        ) {
            check_tensors(dir, &manifest, shard, &mut p);
        }
    }
    for f in &manifest.files {
        check_file(dir, &f.file, f.size, &f.sha256, None, &mut p);
    }
    p.0
}

/// Presence, containment, size and hashes. True when the bytes match the manifest.
fn check_file(
    dir: &Path,
    name: &str,
    size: u64,
    sha256: &str,
    chunks: Option<&[String]>,
    p: &mut Problems,
) -> bool {
    if !is_plain_relative(name) {
        p.add(
            name,
            "path leaves the split directory (absolute or with `..`); the manifest was tampered with",
        );
        return false;
    }
    let path = dir.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(_) => {
            p.add(name, "missing; re-copy the split directory or re-run split");
            return false;
        }
    };
    if !meta.is_file() {
        p.add(name, "not a regular file (symlinks are not followed)");
        return false;
    }
    if meta.len() != size {
        p.add(
            name,
            format!("size is {} bytes, manifest says {size}", meta.len()),
        );
        return false;
    }
    let got = match hash_file(&path) {
        Ok(h) => h,
        Err(e) => {
            p.add(name, format!("cannot read: {e}"));
            return false;
        }
    };
    let mut ok = true;
    if got.sha256 != sha256 {
        p.add(
            name,
            "sha256 does not match the manifest (file corrupted or modified)",
        );
        ok = false;
    }
    if let Some(want) = chunks {
        if want.len() != got.chunk_sha256.len() {
            p.add(
                name,
                format!(
                    "manifest lists {} chunk hashes, file has {} chunks",
                    want.len(),
                    got.chunk_sha256.len()
                ),
            );
            ok = false;
        } else {
            for (i, (w, g)) in want.iter().zip(&got.chunk_sha256).enumerate() {
                if w != g {
                    let start = i * CHUNK_SIZE;
                    p.add(
                        name,
                        format!(
                            "chunk {i} (bytes {start}..{}) sha256 does not match",
                            (start + CHUNK_SIZE).min(size as usize)
                        ),
                    );
                    ok = false;
                }
            }
        }
    }
    ok
}

/// Each stack's shards are indexed 0..n and their layer ranges tile 0..layers exactly
/// once; the embedding sits on the first and the head on the last.
fn coverage(m: &Manifest, stack: Stack, p: &mut Problems) {
    let (what, layers) = match stack {
        Stack::Text => ("text", m.config.text.num_hidden_layers),
        Stack::Vision => match &m.config.vision {
            Some(v) => ("vision", v.num_hidden_layers),
            None => {
                for s in m.vision_shards() {
                    p.add(&s.file, "vision shard for a model without a vision tower");
                }
                return;
            }
        },
    };
    let mut shards: Vec<&ShardEntry> = m.shards.iter().filter(|s| s.stack == stack).collect();
    if shards.is_empty() {
        if stack == Stack::Text {
            p.add(MANIFEST_FILE, "no text shards");
        }
        return;
    }
    shards.sort_by_key(|s| (s.layer_start, s.index));
    let mut next = 0;
    let last = shards.len() - 1;
    for (pos, s) in shards.iter().enumerate() {
        if s.index != pos {
            p.add(
                &s.file,
                format!(
                    "{what} shard index {} where {pos} was expected (by layer order)",
                    s.index
                ),
            );
        }
        if s.layer_start >= s.layer_end {
            p.add(
                &s.file,
                format!("empty layer range {}..{}", s.layer_start, s.layer_end),
            );
        }
        if s.layer_start > next {
            p.add(
                &s.file,
                format!("{what} layers {next}..{} are in no shard", s.layer_start),
            );
        } else if s.layer_start < next {
            p.add(
                &s.file,
                format!(
                    "{what} layers {}..{next} are in more than one shard",
                    s.layer_start
                ),
            );
        }
        next = next.max(s.layer_end);
        if s.has_embedding != (pos == 0) {
            p.add(&s.file, "has_embedding must be set on the first shard only");
        }
        if s.has_head != (pos == last) {
            p.add(&s.file, "has_head must be set on the last shard only");
        }
    }
    if next < layers {
        p.add(
            &shards[last].file,
            format!("{what} layers {next}..{layers} are in no shard"),
        );
    } else if next > layers {
        p.add(
            &shards[last].file,
            format!("{what} layers reach {next} but the model has {layers}"),
        );
    }
}

/// The file's own header must hold every tensor the manifest lists and every tensor the
/// shard needs, with the expected dtype and shape.
fn check_tensors(dir: &Path, m: &Manifest, shard: &ShardEntry, p: &mut Problems) {
    let path = dir.join(&shard.file);
    let header = File::open(&path).and_then(|f| {
        // SAFETY: read-only mapping, only the header is parsed.
        unsafe { Mmap::map(&f) }
    });
    let tensors = match header
        .map_err(|e| e.to_string())
        .and_then(|mm| safetensors_io::parse(&path, &mm).map_err(|e| e.to_string()))
    {
        Ok(t) => t,
        Err(e) => {
            p.add(&shard.file, format!("unreadable safetensors: {e}"));
            return;
        }
    };
    let find = |name: &str| tensors.iter().find(|t| t.name == name);
    for listed in &shard.tensors {
        match find(&listed.name) {
            None => p.add(
                &shard.file,
                format!(
                    "tensor `{}` listed in the manifest is not in the file",
                    listed.name
                ),
            ),
            Some(t) if t.shape != listed.shape || t.dtype != listed.dtype => p.add(
                &shard.file,
                format!(
                    "tensor `{}` is {} {:?} in the file but {} {:?} in the manifest",
                    listed.name, t.dtype, t.shape, listed.dtype, listed.shape
                ),
            ),
            Some(_) => {}
        }
    }
    for t in &tensors {
        if !shard.tensors.iter().any(|l| l.name == t.name) {
            p.add(
                &shard.file,
                format!("tensor `{}` is in the file but not in the manifest", t.name),
            );
        }
        if let Some(layer) = layer_of(&m.config, shard.stack, &t.name)
            && !(shard.layer_start..shard.layer_end).contains(&layer)
        {
            p.add(
                &shard.file,
                format!(
                    "tensor `{}` belongs to layer {layer}, outside this shard's layers {}..{}",
                    t.name, shard.layer_start, shard.layer_end
                ),
            );
        }
    }
    for want in layout::shard_tensors(&m.config, shard) {
        match find(&want.name) {
            None => p.add(
                &shard.file,
                format!(
                    "tensor `{}` needed for layers {}..{} is missing",
                    want.name, shard.layer_start, shard.layer_end
                ),
            ),
            Some(t) if t.shape != want.shape => p.add(
                &shard.file,
                format!(
                    "tensor `{}` has shape {:?}, the config implies {:?}",
                    want.name, t.shape, want.shape
                ),
            ),
            Some(_) => {}
        }
    }
}

/// The layer index in a `{prefix}layers.{i}.…` tensor name of `stack`.
fn layer_of(cfg: &crate::config::ModelConfig, stack: Stack, name: &str) -> Option<usize> {
    let prefix = layout::layer_prefix(cfg, stack, 0);
    let stem = prefix.strip_suffix("0.")?;
    name.strip_prefix(stem)?.split('.').next()?.parse().ok()
}
