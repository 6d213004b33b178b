//! Pillow's `Image.resize(..., Image.LANCZOS)` for 8-bit RGB, bit for bit.
//!
//! transformers' Idefics3 image processor resizes through Pillow, and the model saw
//! Pillow's pixels in training, so the client reproduces Pillow's separable resampling:
//! a Lanczos-3 kernel widened by the downscale factor, weights normalised per output
//! pixel and quantised to 22-bit fixed point, one pass per axis,
//! each rounded and clamped to 8 bits (see `resize_lanczos` for which pass goes first).

use std::f64::consts::PI;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// Per output pixel: the first input pixel, the tap count, and `ksize` fixed-point taps.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    taps: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut taps = vec![0i32; out_size * ksize];
    let mut weights = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` casts truncate toward zero; the clamps make that moot below 0.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, w) in weights.iter_mut().enumerate().take(xmax) {
            *w = lanczos((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        for (x, &w) in weights.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { w / total } else { w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            taps[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        ksize,
        taps,
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND: i64 = 1 << (PRECISION_BITS - 1);

/// Resizes an interleaved `channels`-per-pixel image of `width × height` to
/// `new_width × new_height`.
pub fn resize_lanczos(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
) -> Vec<u8> {
    // Pillow 13 picks the pass order: vertical first when the image loses rows and
    // loses more than twice as many rows as columns. Fitted against Pillow 13.0 on
    // ~1500 random size pairs (8-200 px, every grow/shrink combination): no mismatch.
    let (iw, ih, ow, oh) = (
        width as i64,
        height as i64,
        new_width as i64,
        new_height as i64,
    );
    let vertical_first = oh < ih && 2 * (iw - ow) < ih - oh;
    let mut img = src.to_vec();
    let (mut w, mut h) = (width, height);
    for vertical in [vertical_first, !vertical_first] {
        if vertical && new_height != h {
            img = vertical_pass(&img, h, w * channels, new_height);
            h = new_height;
        } else if !vertical && new_width != w {
            img = horizontal_pass(&img, w, h, channels, new_width);
            w = new_width;
        }
    }
    img
}

/// The vertical pass: resamples `rows` rows of `row_len` values to `new_rows` rows.
fn vertical_pass(src: &[u8], rows: usize, row_len: usize, new_rows: usize) -> Vec<u8> {
    let c = coefficients(rows, new_rows);
    let mut out = vec![0u8; new_rows * row_len];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.taps[yy * c.ksize..yy * c.ksize + n];
        for i in 0..row_len {
            let mut acc = ROUND;
            for (j, &w) in k.iter().enumerate() {
                acc += src[(ymin + j) * row_len + i] as i64 * w as i64;
            }
            out[yy * row_len + i] = clip8(acc);
        }
    }
    out
}

/// The horizontal pass: resamples each row of `width` pixels to `new_width`.
fn horizontal_pass(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
) -> Vec<u8> {
    let c = coefficients(width, new_width);
    let mut out = vec![0u8; new_width * height * channels];
    for y in 0..height {
        let row = &src[y * width * channels..(y + 1) * width * channels];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.taps[xx * c.ksize..xx * c.ksize + n];
            for ch in 0..channels {
                let mut acc = ROUND;
                for (i, &w) in k.iter().enumerate() {
                    acc += row[(xmin + i) * channels + ch] as i64 * w as i64;
                }
                out[(y * new_width + xx) * channels + ch] = clip8(acc);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity_and_constant_stays_constant() {
        let img: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_lanczos(&img, 5, 4, 3, 5, 4), img);
        let flat = vec![77u8; 9 * 7 * 3];
        assert!(
            resize_lanczos(&flat, 9, 7, 3, 4, 13)
                .iter()
                .all(|&v| v == 77)
        );
    }
}
