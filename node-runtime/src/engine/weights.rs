//! Reading a shard's tensors from safetensors files (memory-mapped while loading).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::hugepages::collect_weights;
use super::linear::{WeightData, bf16_to_f32};

/// The tensors of one or more safetensors files, looked up by HF name.
pub struct WeightFiles {
    maps: Vec<(PathBuf, Mmap)>,
    /// name → (file index)
    index: HashMap<String, usize>,
}

impl WeightFiles {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path)
                .with_context(|| format!("cannot open weight file {}", path.display()))?;
            // SAFETY: the file is opened read-only and only read while loading; shard
            // files are not rewritten while a node starts.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let st = SafeTensors::deserialize(&map)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            maps.push((path.clone(), map));
        }
        Ok(Self { maps, index })
    }

    /// Every `*.safetensors` file of a HuggingFace checkpoint directory.
    pub fn open_checkpoint_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read checkpoint directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no *.safetensors file in {}", dir.display());
        }
        Self::open(&files)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let Some(&i) = self.index.get(name) else {
            let files: Vec<_> = self
                .maps
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            bail!("tensor `{name}` is missing from {}", files.join(", "));
        };
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map)?;
        let t = st
            .tensor(name)
            .with_context(|| format!("reading `{name}` from {}", path.display()))?;
        let (dtype, shape) = (t.dtype(), t.shape().to_vec());
        let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
        Ok((dtype, shape, &map[start..start + t.data().len()]))
    }

    /// A matrix kept in its storage precision: bf16 stays bf16, f16 widens to f32.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightData> {
        let (dtype, shape, bytes) = self.view(name)?;
        if shape != [rows, cols] {
            bail!("tensor `{name}` has shape {shape:?}, the config implies [{rows}, {cols}]");
        }
        Ok(match dtype {
            Dtype::BF16 => WeightData::Bf16(collect_weights(
                rows * cols,
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            )),
            _ => WeightData::F32(to_f32(name, dtype, bytes)?),
        })
    }

    /// Any tensor as f32 with its shape: conv kernels and other weights that are
    /// neither a matrix nor a vector.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dtype, shape, bytes) = self.view(name)?;
        Ok((shape, to_f32(name, dtype, bytes)?))
    }

    /// The tensors `names`, in their stored dtype, as one safetensors file.
    pub fn subset(&self, names: &[String]) -> Result<Vec<u8>> {
        let views = names
            .iter()
            .map(|n| {
                let (dtype, shape, bytes) = self.view(n)?;
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, shape, bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, None)?)
    }

    /// A vector (norm weight, bias) as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (dtype, shape, bytes) = self.view(name)?;
        if shape != [len] {
            bail!("tensor `{name}` has shape {shape:?}, the config implies [{len}]");
        }
        to_f32(name, dtype, bytes)
    }
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => collect_weights(
            bytes.len() / 4,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::F16 => collect_weights(
            bytes.len() / 2,
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::BF16 => collect_weights(
            bytes.len() / 2,
            bytes
                .chunks_exact(2)
                .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        ),
        other => bail!("tensor `{name}` has dtype {other:?}; only f32, f16 and bf16 are supported"),
    })
}
