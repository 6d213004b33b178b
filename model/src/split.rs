//! `split`: cut a HuggingFace checkpoint into per-shard safetensors files plus a manifest.
//!
//! Tensors are streamed from the memory-mapped checkpoint into each shard file (header
//! first, then each tensor's bytes in its own dtype) in 4 MiB pieces whose pages are
//! released after the copy, so memory stays at a few MiB whatever the tensor sizes. Everything is written into a temporary
//! directory beside the output and renamed into place at the end: a failure leaves no
//! half-written output (and a staging directory left by a killed run is removed by the
//! next split to the same output).

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result, io_err};
use crate::hashing::{HashingWriter, hash_file};
use crate::layout::{self, Expected};
use crate::manifest::{
    FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, ShardEntry, Stack, TensorEntry,
};
use crate::safetensors_io::{PlannedTensor, write_header};

/// Files copied next to the shards when the checkpoint has them (tokenizer.json is
/// required; the rest are optional).
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

#[derive(Debug, Clone)]
pub struct SplitOptions {
    pub text_shards: usize,
    /// `None`: one vision shard for vision-language models, none otherwise.
    pub vision_shards: Option<usize>,
    /// Overrides the id taken from `_name_or_path` / the directory name.
    pub model_id: Option<String>,
    /// Progress bar on a terminal, one line per shard otherwise.
    pub progress: bool,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            text_shards: 1,
            vision_shards: None,
            model_id: None,
            progress: false,
        }
    }
}

/// One shard before it is written: its manifest entry (hashes still empty) and where each
/// tensor's bytes come from.
struct ShardPlan<'a> {
    entry: ShardEntry,
    sources: Vec<(PlannedTensor, &'a TensorInfo)>,
}

pub fn split(model_dir: &Path, out_dir: &Path, opts: &SplitOptions) -> Result<Manifest> {
    let cfg = ModelConfig::from_dir(model_dir)?;
    let ckpt = Checkpoint::open(model_dir)?;
    let tokenizer = model_dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(ModelError::Checkpoint {
            path: tokenizer,
            msg: "missing; clients need it to tokenize prompts (save the tokenizer with \
                  `tokenizer.save_pretrained(dir)`)"
                .into(),
        });
    }
    let plans = plan(&cfg, &ckpt, opts)?;
    let model_id = match &opts.model_id {
        Some(id) => id.clone(),
        None => model_id(model_dir)?,
    };
    let staging = Staging::new(out_dir)?;

    let total: u64 = plans
        .iter()
        .flat_map(|p| &p.sources)
        .map(|(_, info)| info.nbytes() as u64)
        .sum();
    let bar = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:24} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });

    let mut shards = Vec::with_capacity(plans.len());
    for plan in plans {
        let mut entry = plan.entry;
        if let Some(bar) = &bar {
            bar.set_message(entry.file.clone());
        }
        let path = staging.dir().join(&entry.file);
        let hashes = write_shard(&ckpt, &path, &plan.sources, bar.as_ref())?;
        entry.size = hashes.size;
        entry.sha256 = hashes.sha256;
        entry.chunk_sha256 = hashes.chunk_sha256;
        if opts.progress && bar.is_none() {
            eprintln!(
                "wrote {} (layers {}..{}, {} tensors, {} bytes)",
                entry.file,
                entry.layer_start,
                entry.layer_end,
                entry.tensors.len(),
                entry.size
            );
        }
        shards.push(entry);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let mut files = Vec::new();
    for name in COPIED_FILES {
        let src = model_dir.join(name);
        if !src.is_file() {
            continue;
        }
        let dst = staging.dir().join(name);
        std::fs::copy(&src, &dst).map_err(io_err(&src))?;
        let hashes = hash_file(&dst).map_err(io_err(&dst))?;
        files.push(FileEntry {
            file: name.to_string(),
            size: hashes.size,
            sha256: hashes.sha256,
        });
    }

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        model_id,
        architecture: cfg.architecture,
        dtype: cfg.dtype,
        config: cfg,
        shards,
        files,
    };
    let path = staging.dir().join(MANIFEST_FILE);
    let mut text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    text.push('\n');
    std::fs::write(&path, text).map_err(io_err(&path))?;
    staging.commit()?;
    Ok(manifest)
}

/// Decides every shard's layers and tensors, checking each against the config, before
/// anything is written.
fn plan<'a>(
    cfg: &ModelConfig,
    ckpt: &'a Checkpoint,
    opts: &SplitOptions,
) -> Result<Vec<ShardPlan<'a>>> {
    let unused = layout::unused_layer_tensors(cfg, ckpt.tensors().map(|t| t.name.as_str()));
    if let Some(first) = unused.first() {
        return Err(ModelError::Invalid {
            msg: format!(
                "the checkpoint's decoder layers hold {} tensor(s) unfed does not run, such as \
                 `{first}`: a {} variant (a bias on o_proj or the MLP, q/k norms, ...) whose \
                 outputs would differ from transformers without them; it is refused rather \
                 than split",
                unused.len(),
                cfg.architecture
            ),
        });
    }
    let text_layers = cfg.text.num_hidden_layers;
    let text_ranges = ranges("--text-shards", "text", text_layers, opts.text_shards)?;
    let vision_ranges = match (&cfg.vision, opts.vision_shards) {
        (None, None | Some(0)) => Vec::new(),
        (None, Some(n)) => {
            return Err(ModelError::Invalid {
                msg: format!(
                    "--vision-shards {n}: a {} model has no vision tower; drop --vision-shards",
                    cfg.architecture
                ),
            });
        }
        (Some(v), n) => ranges(
            "--vision-shards",
            "vision encoder",
            v.num_hidden_layers,
            n.unwrap_or(1),
        )?,
    };

    let mut plans = Vec::new();
    for (stack, ranges) in [(Stack::Vision, &vision_ranges), (Stack::Text, &text_ranges)] {
        let count = ranges.len();
        for (index, range) in ranges.iter().enumerate() {
            let (first, last) = (index == 0, index + 1 == count);
            let (expected, file) = match stack {
                Stack::Text => (
                    layout::text_tensors(cfg, range.clone(), first, last),
                    Manifest::text_shard_file(index),
                ),
                Stack::Vision => (
                    layout::vision_tensors(cfg, range.clone(), first, last),
                    Manifest::vision_shard_file(index),
                ),
            };
            let sources = sources(cfg, ckpt, stack, range, &expected, &file)?;
            let tensors = sources
                .iter()
                .map(|(t, _)| TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
                .collect();
            plans.push(ShardPlan {
                entry: ShardEntry {
                    index,
                    stack,
                    layer_start: range.start,
                    layer_end: range.end,
                    has_embedding: first,
                    has_head: last,
                    file,
                    size: 0,
                    sha256: String::new(),
                    chunk_sha256: Vec::new(),
                    tensors,
                },
                sources,
            });
        }
    }
    Ok(plans)
}

fn ranges(flag: &str, what: &str, layers: usize, n: usize) -> Result<Vec<Range<usize>>> {
    layout::layer_ranges(layers, n).ok_or_else(|| ModelError::Invalid {
        msg: if n == 0 {
            format!("{flag} 0: need at least one shard")
        } else {
            format!(
                "{flag} {n}: the model has only {layers} {what} layers, so at most {layers} \
                 shards (each shard holds at least one layer)"
            )
        },
    })
}

/// The checkpoint tensor behind each expected tensor (the embedding for a tied head),
/// plus any further tensors the checkpoint keeps under the shard's layer prefixes.
fn sources<'a>(
    cfg: &ModelConfig,
    ckpt: &'a Checkpoint,
    stack: Stack,
    range: &Range<usize>,
    expected: &[Expected],
    file: &str,
) -> Result<Vec<(PlannedTensor, &'a TensorInfo)>> {
    let mut out = Vec::with_capacity(expected.len());
    for want in expected {
        let info = match ckpt.info(&want.name) {
            Some(info) => info,
            // Tied head: written out from the embedding so the last shard needs no other.
            None if want.name == layout::LM_HEAD => ckpt
                .info(&layout::embedding_name(cfg))
                .ok_or_else(|| missing(ckpt, want, file))?,
            None => return Err(missing(ckpt, want, file)),
        };
        if info.shape != want.shape {
            return Err(ModelError::Checkpoint {
                path: ckpt.dir().to_path_buf(),
                msg: format!(
                    "tensor `{}` has shape {:?} but config.json implies {:?}; \
                     is config.json from the same model as the weights?",
                    want.name, info.shape, want.shape
                ),
            });
        }
        out.push((planned(&want.name, info), info));
    }
    let prefixes: Vec<String> = range
        .clone()
        .map(|l| layout::layer_prefix(cfg, stack, l))
        .collect();
    for info in ckpt.tensors() {
        if prefixes.iter().any(|p| info.name.starts_with(p.as_str()))
            && !expected.iter().any(|e| e.name == info.name)
        {
            out.push((planned(&info.name, info), info));
        }
    }
    Ok(out)
}

fn planned(name: &str, info: &TensorInfo) -> PlannedTensor {
    PlannedTensor {
        name: name.to_string(),
        dtype: info.dtype,
        shape: info.shape.clone(),
    }
}

fn missing(ckpt: &Checkpoint, want: &Expected, file: &str) -> ModelError {
    ModelError::Checkpoint {
        path: ckpt.dir().to_path_buf(),
        msg: format!(
            "tensor `{}` (needed by {file}) is not in the checkpoint; \
             is config.json from the same model as the weights?",
            want.name
        ),
    }
}

fn write_shard(
    ckpt: &Checkpoint,
    path: &Path,
    sources: &[(PlannedTensor, &TensorInfo)],
    bar: Option<&ProgressBar>,
) -> Result<crate::hashing::FileHashes> {
    let io = io_err(path);
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let planned: Vec<PlannedTensor> = sources.iter().map(|(p, _)| p.clone()).collect();
    let result = (|| -> std::io::Result<()> {
        write_header(&mut out, &planned)?;
        const PIECE: usize = 4 << 20;
        for (_, info) in sources {
            for (i, piece) in ckpt.bytes(info).chunks(PIECE).enumerate() {
                out.write_all(piece)?;
                ckpt.release_range(info, i * PIECE, piece.len());
                if let Some(bar) = bar {
                    bar.inc(piece.len() as u64);
                }
            }
        }
        Ok(())
    })();
    result.map_err(io_err(path))?;
    let (buf, hashes) = out.finish();
    let file = buf.into_inner().map_err(|e| e.into_error()).map_err(io)?;
    file.sync_all().map_err(io_err(path))?;
    Ok(hashes)
}

/// The model id: the last component of `_name_or_path` in config.json when set, else the
/// directory's name. Never a full path.
fn model_id(model_dir: &Path) -> Result<String> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let from_config = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string))
        .and_then(|p| last_component(&p));
    if let Some(id) = from_config {
        return Ok(id);
    }
    let abs = std::fs::canonicalize(model_dir).map_err(io_err(model_dir))?;
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ModelError::Invalid {
            msg: format!(
                "cannot name the model from {}; pass a model id",
                model_dir.display()
            ),
        })
}

fn last_component(path: &str) -> Option<String> {
    path.trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
        .map(str::to_string)
}

/// A temporary directory beside the output that becomes the output on `commit`, and is
/// removed if dropped before.
struct Staging {
    tmp: tempfile::TempDir,
    out: PathBuf,
}

impl Staging {
    fn new(out: &Path) -> Result<Self> {
        if out.exists() {
            let empty = out.is_dir()
                && std::fs::read_dir(out)
                    .map_err(io_err(out))?
                    .next()
                    .is_none();
            if !empty {
                return Err(ModelError::Invalid {
                    msg: format!(
                        "output {} already exists and is not an empty directory; \
                         remove it or choose another --output",
                        out.display()
                    ),
                });
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "split".into());
        let prefix = format!(".{name}.partial-");
        remove_abandoned(&parent, &prefix);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{prefix}{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(io_err(&parent))?;
        Ok(Self {
            tmp,
            out: out.to_path_buf(),
        })
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn commit(self) -> Result<()> {
        if self.out.is_dir() {
            std::fs::remove_dir(&self.out).map_err(io_err(&self.out))?;
        }
        let tmp = self.tmp.keep();
        std::fs::rename(&tmp, &self.out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            ModelError::Io {
                path: self.out.clone(),
                source: e,
            }
        })?;
        // tempfile creates the directory 0700; the split output is meant to be shared.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.out, std::fs::Permissions::from_mode(0o755));
        }
        Ok(())
    }
}

/// Removes staging directories of earlier splits to the same output whose process is
/// gone (killed before it could clean up). Directories of live processes are left alone.
fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if cfg!(target_os = "linux") && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
