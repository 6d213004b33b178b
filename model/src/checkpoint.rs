//! A HuggingFace checkpoint's weights: `model.safetensors`, or the files listed by
//! `model.safetensors.index.json`, memory-mapped, as one name -> tensor map.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::config::DType;
use crate::error::{ModelError, Result, io_err};
use crate::safetensors_io::{self, RawTensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte range in that file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A borrowed tensor: raw little-endian bytes in the checkpoint's own dtype.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Whether `dir` holds any weights Checkpoint::open would read.
    pub fn has_weights(dir: &Path) -> bool {
        dir.join(INDEX_FILE).is_file()
            || dir.join(SINGLE_FILE).is_file()
            || safetensors_in(dir).is_ok_and(|f| !f.is_empty())
    }

    /// Opens the weights of `dir`: the index if there is one, else `model.safetensors`,
    /// else every `*.safetensors` file (e.g. a split output directory).
    pub fn open(dir: &Path) -> Result<Self> {
        let file_names = weight_files(dir)?;
        Self::open_files(dir, &file_names)
    }

    /// Opens the given weight files of `dir` (e.g. one shard of a split directory).
    pub fn open_files(dir: &Path, file_names: &[impl AsRef<str>]) -> Result<Self> {
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let path = dir.join(name.as_ref());
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the mapping is read-only; a checkpoint modified by another process
            // while we run is outside what we can defend against, as for any reader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            for RawTensor {
                name,
                dtype,
                shape,
                start,
                end,
            } in safetensors_io::parse(&path, &mmap)?
            {
                if tensors.contains_key(&name) {
                    return Err(ModelError::Checkpoint {
                        path: path.clone(),
                        msg: format!("tensor `{name}` also appears in an earlier file"),
                    });
                }
                let info = TensorInfo {
                    name: name.clone(),
                    dtype,
                    shape,
                    file: file_idx,
                    start,
                    end,
                };
                tensors.insert(name, info);
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths of the weight files, in the order [`TensorInfo::file`] indexes.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].1[info.start..info.end]
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.tensors.get(name)?;
        Some(TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: self.bytes(info),
        })
    }

    /// Drops `info`'s pages from this process's resident set once they have been copied,
    /// so streaming a whole checkpoint keeps RSS near one tensor (the page cache keeps
    /// them; a later read faults them back in).
    pub fn release(&self, info: &TensorInfo) {
        self.release_range(info, 0, info.nbytes());
    }

    /// [`Checkpoint::release`] for `len` bytes at `offset` within the tensor, so that even
    /// one large tensor (an embedding) need not be resident at once.
    pub fn release_range(&self, info: &TensorInfo, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            let mmap = &self.files[info.file].1;
            let len = len.min(info.nbytes().saturating_sub(offset));
            // SAFETY: the mapping is read-only and file-backed, so DONTNEED discards
            // nothing: the bytes are re-read from the file if touched again.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    info.start + offset,
                    len,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (info, offset, len);
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.numel() as u64).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes() as u64).sum()
    }

    /// The dtype holding the most bytes (norms are sometimes kept in f32).
    pub fn dominant_dtype(&self) -> Option<DType> {
        let mut by_dtype: BTreeMap<&str, (DType, usize)> = BTreeMap::new();
        for t in self.tensors.values() {
            by_dtype.entry(t.dtype.as_str()).or_insert((t.dtype, 0)).1 += t.nbytes();
        }
        by_dtype
            .into_values()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
    }
}

/// The weight files of `dir`, relative names, validated to stay inside `dir`.
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let map = raw
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Checkpoint {
                path: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::Checkpoint {
                path: index.clone(),
                msg: format!("`weight_map.{tensor}` must be a file name"),
            })?;
            if !crate::paths::is_plain_relative(file) {
                return Err(ModelError::Checkpoint {
                    path: index.clone(),
                    msg: format!(
                        "`weight_map.{tensor}` = {file:?} points outside the model directory"
                    ),
                });
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
        }
        names.sort();
        for n in &names {
            if !dir.join(n).is_file() {
                return Err(ModelError::Checkpoint {
                    path: index.clone(),
                    msg: format!("lists {n}, which is missing from {}", dir.display()),
                });
            }
        }
        return Ok(names);
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let found = safetensors_in(dir)?;
    if found.is_empty() {
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!("no weights: expected {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files"),
        });
    }
    Ok(found)
}

fn safetensors_in(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && entry.path().is_file() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
