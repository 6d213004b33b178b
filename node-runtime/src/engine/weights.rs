//! Reading a shard's tensors from safetensors files (memory-mapped while loading).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::hugepages::weight_buffer;
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
            Dtype::BF16 => WeightData::Bf16(copy_released(bytes, 2, |b| {
                u16::from_le_bytes([b[0], b[1]])
            })),
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

/// Bytes copied between releases: a few MiB, so a tensor's file pages and its copy are
/// never both whole in memory (a 272 MB head would otherwise peak at twice that).
const RELEASE_BLOCK: usize = 8 << 20;

/// `bytes` decoded `width` bytes per element into a weight buffer, block by block, each
/// block's file pages dropped from the process once copied: loading peaks near the
/// weights' size, not near twice it. The page cache keeps the pages; a second read of the
/// tensor (a tied head) faults them back in.
fn copy_released<T>(bytes: &[u8], width: usize, decode: impl Fn(&[u8]) -> T) -> Vec<T> {
    let mut out = weight_buffer(bytes.len() / width);
    for block in bytes.chunks(RELEASE_BLOCK) {
        out.extend(block.chunks_exact(width).map(&decode));
        release(block);
    }
    out
}

/// Unmaps the whole pages of `block`, a range of a read-only file mapping.
fn release(block: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (block.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (block.as_ptr() as usize + block.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: whole pages inside a read-only private file mapping that is never
            // written: MADV_DONTNEED only unmaps them, and any later read of the range
            // gets the same bytes from the file again.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => copy_released(bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => copy_released(bytes, 2, |b| {
            half::f16::from_le_bytes([b[0], b[1]]).to_f32()
        }),
        Dtype::BF16 => copy_released(bytes, 2, |b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        other => bail!("tensor `{name}` has dtype {other:?}; only f32, f16 and bf16 are supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of this process's mappings of `path` (from /proc/self/smaps).
    fn resident(path: &Path) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kb = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                ours = line.ends_with(path.to_str().unwrap());
            } else if ours && let Some(v) = line.strip_prefix("Rss:") {
                kb += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<usize>()
                    .unwrap();
            }
        }
        kb * 1024
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_copied_matrix_leaves_no_file_pages_resident() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let (rows, cols) = (1024, 2048); // 4 MiB of bf16
        let data: Vec<u8> = (0..rows * cols * 2).map(|i| (i % 251) as u8).collect();
        let view =
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![rows, cols], &data).unwrap();
        std::fs::write(&path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
        let files = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
        // Control: reading the tensor makes its pages resident, and the probe sees them.
        let (_, _, bytes) = files.view("w").unwrap();
        let sum: u64 = bytes.iter().map(|&b| b as u64).sum();
        assert!(sum > 0);
        assert!(resident(&path) >= rows * cols * 2, "{}", resident(&path));
        let m = files.matrix("w", rows, cols).unwrap();
        assert!(
            resident(&path) < 64 << 10,
            "{} bytes still resident",
            resident(&path)
        );
        // The copy is intact, and the file reads the same again after the release.
        let WeightData::Bf16(w) = m else {
            panic!("bf16 stays bf16")
        };
        assert_eq!(w[12345], u16::from_le_bytes([data[24690], data[24691]]));
        let (_, _, again) = files.view("w").unwrap();
        assert_eq!(again, &data[..]);
    }
}
