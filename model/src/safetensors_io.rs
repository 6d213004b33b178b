//! The safetensors container, read and written by hand: reading so that a truncated or
//! corrupt file is reported with the exact tensor and byte counts, writing so that split
//! streams tensor bytes straight from the source mmap (header first, then one tensor at a
//! time) instead of building the file in memory.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::config::DType;
use crate::error::{ModelError, Result};

/// One tensor of a safetensors header; `start..end` are absolute offsets in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Headers larger than this are refused: a corrupt length would otherwise allocate GBs.
const MAX_HEADER: u64 = 100 << 20;

fn corrupt(path: &Path, msg: String) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

/// Parses and validates the header of the safetensors file whose bytes are `data`.
/// Tensors come back in file order.
pub fn parse(path: &Path, data: &[u8]) -> Result<Vec<RawTensor>> {
    let len = data.len() as u64;
    if len < 8 {
        return Err(corrupt(
            path,
            format!(
                "truncated safetensors file: {len} bytes, shorter than the 8-byte header length; re-save or re-download it"
            ),
        ));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || 8 + n > len {
        return Err(corrupt(
            path,
            format!(
                "truncated or not a safetensors file: header claims {n} bytes but the file has {len}; re-save or re-download it"
            ),
        ));
    }
    let base = 8 + n as usize;
    let header: Map<String, Value> = serde_json::from_slice(&data[8..base]).map_err(|e| {
        corrupt(
            path,
            format!("not a safetensors file: header is not a JSON object ({e})"),
        )
    })?;
    let mut out = Vec::with_capacity(header.len());
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| corrupt(path, format!("tensor `{name}`: {what}"));
        let dtype_name = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing dtype"))?;
        let dtype = DType::from_safetensors(dtype_name).ok_or_else(|| {
            bad(&format!(
                "dtype {dtype_name} is not supported; supported: F32, F16, BF16"
            ))
        })?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("missing or invalid shape"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
            .ok_or_else(|| bad("missing or invalid data_offsets"))?;
        let numel: usize = shape.iter().product();
        let want = numel * dtype.size_in_bytes();
        if offsets.1 < offsets.0 || offsets.1 - offsets.0 != want {
            return Err(bad(&format!(
                "data_offsets {:?} span {} bytes but shape {shape:?} in {dtype_name} needs {want}",
                offsets,
                offsets.1.saturating_sub(offsets.0)
            )));
        }
        let (start, end) = (base + offsets.0, base + offsets.1);
        if end > data.len() {
            return Err(corrupt(
                path,
                format!(
                    "truncated safetensors file: tensor `{name}` ends at byte {end} but the file has {len} bytes; re-save or re-download it"
                ),
            ));
        }
        out.push(RawTensor {
            name: name.clone(),
            dtype,
            shape,
            start,
            end,
        });
    }
    out.sort_by_key(|t| t.start);
    Ok(out)
}

/// What one tensor of a file being written looks like.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Writes the header for `tensors` (data laid out in the given order); the caller then
/// writes each tensor's bytes in that order. Returns the header's length in bytes.
pub fn write_header(out: &mut impl Write, tensors: &[PlannedTensor]) -> std::io::Result<u64> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.nbytes();
        header.insert(
            t.name.clone(),
            json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header)).map_err(std::io::Error::other)?;
    // Pad with spaces so tensor data starts 8-byte aligned, as the format recommends.
    while (bytes.len() + 8) % 8 != 0 {
        bytes.push(b' ');
    }
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(&bytes)?;
    Ok(8 + bytes.len() as u64)
}
