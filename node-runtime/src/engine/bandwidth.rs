//! The machine's memory read rate, measured on the spot. A decode step streams every
//! weight of the model once, so this rate over the bytes a step reads bounds decode
//! speed; `unfedctl bench` reports the engine against that bound from the same run.

use rayon::prelude::*;
use std::time::Instant;

/// Far past any last-level cache, so the reads come from memory.
const BUFFER_BYTES: usize = 256 << 20;
const PASSES: usize = 3;

/// Bytes per second read by every thread streaming its part of a large buffer held as
/// weights are held (the best of a few passes: a pass that a neighbour's burst slowed
/// says less about the memory).
pub fn read_bytes_per_second() -> f64 {
    let words = BUFFER_BYTES / 8;
    // On the pages weights get, and non-zero, so every page is really mapped and read.
    let mut buf = super::hugepages::weight_buffer(words);
    buf.extend(0..words as u64);
    let chunk = words.div_ceil(rayon::current_num_threads());
    let mut best = f64::MAX;
    for _ in 0..PASSES {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    BUFFER_BYTES as f64 / best
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rate_is_a_plausible_memory_rate() {
        let r = super::read_bytes_per_second();
        // Between a slow laptop's 1 GB/s and anything a CPU socket reaches.
        assert!((1e9..2e12).contains(&r), "{r} bytes/s");
    }
}
