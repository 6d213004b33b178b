//! An LM head that makes the tiny model speak corpus-like text: least squares from the
//! (normalised) token embeddings to spiky bigram targets, so greedy decoding follows the
//! most frequent successor of each token. Plain f64 loops in a fixed order: the result is
//! bit-identical on every run.

/// Sparse rows: for each token, `(next token, target logit)` from the corpus bigrams,
/// scaled so that the most likely successor stands out.
pub fn bigram_targets(tokens: &[u32], vocab: usize) -> Vec<Vec<(usize, f64)>> {
    const SCALE: f64 = 12.0;
    let mut counts = vec![std::collections::BTreeMap::<usize, u32>::new(); vocab];
    for pair in tokens.windows(2) {
        *counts[pair[0] as usize]
            .entry(pair[1] as usize)
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|row| {
            // One spike on the most frequent successor (the first on ties): a rank-limited
            // fit keeps a single clear winner per row better than a spread distribution.
            let best = row.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
            best.map(|(&v, _)| (v, SCALE)).into_iter().collect()
        })
        .collect()
}

/// `W` (vocab x hidden, row-major) minimising `|| N Wᵀ - L ||²` (plus a small ridge),
/// where row t of `N` is the RMS-normalised embedding of token t times the final norm
/// weight (what the head sees when the layers add little) and `L` the targets.
pub fn bigram_head(
    embedding: &[f32],
    norm: &[f32],
    targets: &[Vec<(usize, f64)>],
    hidden: usize,
) -> Vec<f32> {
    let vocab = embedding.len() / hidden;
    let n: Vec<f64> = embedding
        .chunks(hidden)
        .flat_map(|row| {
            let rms = (row.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / hidden as f64
                + 1e-6)
                .sqrt();
            row.iter()
                .zip(norm)
                .map(move |(x, w)| f64::from(*x) / rms * f64::from(*w))
        })
        .collect();

    // G = NᵀN + λI (hidden x hidden), B = NᵀL (hidden x vocab).
    // Only tokens seen in the corpus constrain the fit; the rest would spend the
    // head's limited rank on predicting nothing.
    let seen: Vec<usize> = (0..vocab).filter(|&t| !targets[t].is_empty()).collect();
    let mut g = vec![0.0f64; hidden * hidden];
    for row in seen.iter().map(|&t| &n[t * hidden..(t + 1) * hidden]) {
        for i in 0..hidden {
            for j in 0..=i {
                g[i * hidden + j] += row[i] * row[j];
            }
        }
    }
    for i in 0..hidden {
        g[i * hidden + i] += 1e-3;
        for j in 0..i {
            g[j * hidden + i] = g[i * hidden + j];
        }
    }
    let mut b = vec![0.0f64; hidden * vocab];
    for (t, row) in targets.iter().enumerate() {
        for &(v, target) in row {
            for k in 0..hidden {
                b[k * vocab + v] += n[t * hidden + k] * target;
            }
        }
    }
    // Centre each target column: a successor common to many tokens ("," or " the")
    // would otherwise leak into every row through the rank-`hidden` fit.
    let mut mean = vec![0.0f64; vocab];
    for row in targets {
        for &(v, target) in row {
            mean[v] += target / seen.len() as f64;
        }
    }
    let mut col_sum = vec![0.0f64; hidden];
    for row in seen.iter().map(|&t| &n[t * hidden..(t + 1) * hidden]) {
        for k in 0..hidden {
            col_sum[k] += row[k];
        }
    }
    for k in 0..hidden {
        for v in 0..vocab {
            b[k * vocab + v] -= col_sum[k] * mean[v];
        }
    }
    let x = solve_spd(&g, hidden, &b, vocab);
    let mut w = vec![0.0f32; vocab * hidden];
    for v in 0..vocab {
        for k in 0..hidden {
            w[v * hidden + k] = x[k * vocab + v] as f32;
        }
    }
    w
}

/// Solves `G X = B` for symmetric positive-definite `G` (n x n) by Cholesky; `B` is
/// n x cols, row-major.
fn solve_spd(g: &[f64], n: usize, b: &[f64], cols: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let d = (g[j * n + j] - (0..j).map(|k| l[j * n + k].powi(2)).sum::<f64>()).sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let s = g[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            l[i * n + j] = s / d;
        }
    }
    let mut x = b.to_vec();
    // L Y = B, then Lᵀ X = Y, all columns at once.
    for i in 0..n {
        for k in 0..i {
            let f = l[i * n + k];
            for c in 0..cols {
                x[i * cols + c] -= f * x[k * cols + c];
            }
        }
        for c in 0..cols {
            x[i * cols + c] /= l[i * n + i];
        }
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            let f = l[k * n + i];
            for c in 0..cols {
                x[i * cols + c] -= f * x[k * cols + c];
            }
        }
        for c in 0..cols {
            x[i * cols + c] /= l[i * n + i];
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::solve_spd;

    #[test]
    fn cholesky_solves() {
        let g = [4.0, 2.0, 2.0, 3.0];
        let b = [2.0, 1.0, 1.0, 2.0]; // columns (2,1) and (1,2)
        let x = solve_spd(&g, 2, &b, 2);
        // G x = b, checked column by column.
        for c in 0..2 {
            let (x0, x1) = (x[c], x[2 + c]);
            assert!((4.0 * x0 + 2.0 * x1 - b[c]).abs() < 1e-12);
            assert!((2.0 * x0 + 3.0 * x1 - b[2 + c]).abs() < 1e-12);
        }
    }
}
