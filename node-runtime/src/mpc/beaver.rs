//! Beaver matrix triples dealt by the client, compressed with PRG seeds, and the
//! multiplication of two shared matrices with them.
//!
//! A batch multiplies, for every head h of group g, X_h [m, k] by Y_g (as Y_gᵀ with Y_g
//! [n, k] for attention scores, or Y_g [k, n] for probabilities × values). The dealer
//! (the client — neither A nor B) draws masks A_h, B_g and C_h = A_h·B_g. Party A gets one
//! 32-byte seed and expands its shares of A, B and C from it; party B gets a seed for its
//! shares of A and B and its share of C explicitly (C − C_A). Neither party ever holds both
//! halves of a mask, so the openings X − A and Y − B it sees are uniform.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::ring::{add, add_assign, mm_nn, mm_nt, sub};

/// The shape of a batch of triples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub heads: usize,
    pub groups: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Products X·Yᵀ (Y stored [n, k]) rather than X·Y (Y stored [k, n]).
    pub transposed: bool,
}

impl Batch {
    fn group_of(&self, h: usize) -> usize {
        h / (self.heads / self.groups)
    }

    fn product(&self, x: &[u64], y: &[u64]) -> Vec<u64> {
        if self.transposed {
            mm_nt(x, y, self.m, self.k, self.n)
        } else {
            mm_nn(x, y, self.m, self.k, self.n)
        }
    }

    pub fn x_len(&self) -> usize {
        self.m * self.k
    }

    pub fn y_len(&self) -> usize {
        self.k * self.n
    }

    pub fn z_len(&self) -> usize {
        self.m * self.n
    }
}

/// One party's shares of a batch of triples.
pub struct Triples {
    pub a: Vec<Vec<u64>>,
    pub b: Vec<Vec<u64>>,
    pub c: Vec<Vec<u64>>,
}

fn draw(rng: &mut ChaCha20Rng, len: usize) -> Vec<u64> {
    (0..len).map(|_| rng.next_u64()).collect()
}

fn seed_of(words: &[u64]) -> [u8; 32] {
    let mut seed = [0u8; 32];
    for (chunk, w) in seed.chunks_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    seed
}

/// A party's masks from its seed, in a fixed order; `with_c` for party A.
fn expand(words: &[u64], batch: &Batch, with_c: bool) -> Triples {
    let mut rng = ChaCha20Rng::from_seed(seed_of(words));
    let b = (0..batch.groups)
        .map(|_| draw(&mut rng, batch.y_len()))
        .collect();
    let a = (0..batch.heads)
        .map(|_| draw(&mut rng, batch.x_len()))
        .collect();
    let c = if with_c {
        (0..batch.heads)
            .map(|_| draw(&mut rng, batch.z_len()))
            .collect()
    } else {
        Vec::new()
    };
    Triples { a, b, c }
}

/// Deals a batch: (message for A: its seed, message for B: its seed then C − C_A per head).
pub fn deal(batch: &Batch, rng: &mut impl RngCore) -> (Vec<u64>, Vec<u64>) {
    let seed_a: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    let seed_b: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    let ta = expand(&seed_a, batch, true);
    let tb = expand(&seed_b, batch, false);
    let mut for_b = seed_b;
    for h in 0..batch.heads {
        let g = batch.group_of(h);
        let a = add(&ta.a[h], &tb.a[h]);
        let b = add(&ta.b[g], &tb.b[g]);
        for_b.extend(sub(&batch.product(&a, &b), &ta.c[h]));
    }
    (seed_a, for_b)
}

/// Length of B's dealing message.
pub fn b_message_len(batch: &Batch) -> usize {
    4 + batch.heads * batch.z_len()
}

/// A party's triples from its dealing message.
pub fn receive(msg: &[u64], batch: &Batch, party_a: bool) -> Triples {
    if party_a {
        return expand(&msg[..4], batch, true);
    }
    let mut t = expand(&msg[..4], batch, false);
    t.c = msg[4..]
        .chunks(batch.z_len().max(1))
        .take(batch.heads)
        .map(<[u64]>::to_vec)
        .collect();
    t
}

/// This party's openings of X − A (per head) and Y − B (per group), concatenated.
pub fn mask(batch: &Batch, t: &Triples, x: &[Vec<u64>], y: &[Vec<u64>]) -> Vec<u64> {
    let mut out = Vec::with_capacity(batch.heads * batch.x_len() + batch.groups * batch.y_len());
    for (xh, ah) in x.iter().zip(&t.a).take(batch.heads) {
        out.extend(sub(xh, ah));
    }
    for (yg, bg) in y.iter().zip(&t.b).take(batch.groups) {
        out.extend(sub(yg, bg));
    }
    out
}

/// Given both parties' openings, this party's share of every X_h · Y_g.
pub fn combine(
    batch: &Batch,
    t: &Triples,
    mine: &[u64],
    theirs: &[u64],
    party_a: bool,
) -> Vec<Vec<u64>> {
    let opened = add(mine, theirs);
    let (e_all, f_all) = opened.split_at(batch.heads * batch.x_len());
    (0..batch.heads)
        .map(|h| {
            let g = batch.group_of(h);
            let e = &e_all[h * batch.x_len()..(h + 1) * batch.x_len()];
            let f = &f_all[g * batch.y_len()..(g + 1) * batch.y_len()];
            let mut z = t.c[h].clone();
            add_assign(&mut z, &batch.product(e, &t.b[g]));
            add_assign(&mut z, &batch.product(&t.a[h], f));
            if party_a {
                add_assign(&mut z, &batch.product(e, f));
            }
            z
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mpc::ring::share;

    #[test]
    fn shared_products_reconstruct_exactly() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for transposed in [true, false] {
            let batch = Batch {
                heads: 4,
                groups: 2,
                m: 3,
                k: 5,
                n: 2,
                transposed,
            };
            let xs: Vec<Vec<u64>> = (0..4).map(|_| draw(&mut rng, batch.x_len())).collect();
            let ys: Vec<Vec<u64>> = (0..2).map(|_| draw(&mut rng, batch.y_len())).collect();
            let split =
                |v: &Vec<Vec<u64>>, rng: &mut ChaCha20Rng| -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
                    v.iter().map(|x| share(x, rng)).unzip()
                };
            let (xa, xb) = split(&xs, &mut rng);
            let (ya, yb) = split(&ys, &mut rng);
            let (ma, mb) = deal(&batch, &mut rng);
            assert_eq!(mb.len(), b_message_len(&batch));
            let (ta, tb) = (receive(&ma, &batch, true), receive(&mb, &batch, false));
            let (oa, ob) = (mask(&batch, &ta, &xa, &ya), mask(&batch, &tb, &xb, &yb));
            let za = combine(&batch, &ta, &oa, &ob, true);
            let zb = combine(&batch, &tb, &ob, &oa, false);
            for h in 0..4 {
                let expect = batch.product(&xs[h], &ys[h / 2]);
                assert_eq!(
                    add(&za[h], &zb[h]),
                    expect,
                    "head {h} transposed {transposed}"
                );
            }
        }
    }
}
