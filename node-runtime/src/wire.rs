//! Hidden states on the wire: little-endian bytes + shape + dtype (f32 by default,
//! f16/bf16 on request to halve the bytes between hops).

use anyhow::{Result, bail};
use half::{bf16, f16};
use unfed_proto::{DType, Tensor};

/// Encodes row-major f32 values of `shape` as `dtype`.
pub fn encode(values: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    let data = match dtype {
        DType::DtypeF32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::DtypeF16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::DtypeBf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    };
    Tensor {
        data,
        shape: shape.iter().map(|&d| d as u64).collect(),
        dtype: dtype as i32,
    }
}

/// Decodes a tensor into f32 values, checking that the bytes match shape and dtype.
pub fn decode(t: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
    let Ok(dtype) = DType::try_from(t.dtype) else {
        bail!(
            "tensor has unknown dtype code {}; expected f32, f16 or bf16",
            t.dtype
        );
    };
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let width = match dtype {
        DType::DtypeF32 => 4,
        DType::DtypeF16 | DType::DtypeBf16 => 2,
    };
    if t.data.len() != n * width {
        bail!(
            "tensor of shape {shape:?} and dtype {} needs {} bytes, got {}",
            dtype.as_str_name(),
            n * width,
            t.data.len()
        );
    }
    let values = match dtype {
        DType::DtypeF32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::DtypeF16 => t
            .data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::DtypeBf16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    Ok((values, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_dtype_and_rejects_bad_lengths() {
        let v = [1.0f32, -2.5, 0.375, 1024.0, 3.0, -0.125];
        for dt in [DType::DtypeF32, DType::DtypeF16, DType::DtypeBf16] {
            let t = encode(&v, &[1, 2, 3], dt);
            let (back, shape) = decode(&t).unwrap();
            assert_eq!(shape, [1, 2, 3]);
            assert_eq!(back, v, "{dt:?} round trip of exactly representable values");
        }
        let mut t = encode(&v, &[1, 2, 3], DType::DtypeF32);
        t.data.pop();
        assert!(
            decode(&t)
                .unwrap_err()
                .to_string()
                .contains("needs 24 bytes, got 23")
        );
    }
}
