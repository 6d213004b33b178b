//! Party A's shares, expanded from a seed. The client sends A one 32-byte seed per step
//! instead of a share of every tensor; both expand it in the same order, and B gets
//! x − r for each tensor x. A's share of a value is uniform and independent of the data
//! either way, so A's view is no richer (a seed instead of the stream it expands to),
//! and the client → A traffic of a step is 32 bytes.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Words (u64) of a step's seed.
pub const SEED_WORDS: usize = 4;

/// The masks of one step, in the order the protocol shares its tensors.
pub struct MaskStream(ChaCha20Rng);

impl MaskStream {
    /// A fresh seed from `rng` (the client's) and its stream.
    pub fn draw(rng: &mut impl RngCore) -> (Vec<u64>, Self) {
        let words: Vec<u64> = (0..SEED_WORDS).map(|_| rng.next_u64()).collect();
        let stream = Self::from_words(&words);
        (words, stream)
    }

    /// The stream of a seed received as `SEED_WORDS` words.
    pub fn from_words(words: &[u64]) -> Self {
        let mut seed = [0u8; 32];
        for (chunk, w) in seed.chunks_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Self(ChaCha20Rng::from_seed(seed))
    }

    /// A's share of the next tensor, `kind` of `shape`.
    pub fn next(&mut self, kind: &str, shape: &[usize]) -> Vec<u64> {
        let n = shape.iter().product::<usize>();
        #[allow(unused_mut)] // written only by the test-only mutation
        let mut r: Vec<u64> = (0..n).map(|_| self.0.next_u64()).collect();
        #[cfg(feature = "privacy-mutation")]
        leak_first_row(kind, shape, &mut r);
        #[cfg(not(feature = "privacy-mutation"))]
        let _ = kind;
        r
    }
}

/// Test-only fault (feature `privacy-mutation`): A's mask of the first row of every "h"
/// is zero, so B gets that row in the clear and the privacy tests can show that they
/// catch a leak (the sum still reconstructs: tokens do not change).
#[cfg(feature = "privacy-mutation")]
fn leak_first_row(kind: &str, shape: &[usize], r: &mut [u64]) {
    if kind == "h" {
        let w = shape.last().copied().unwrap_or(0);
        r[..w].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_and_party_a_expand_the_same_masks() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (words, mut client) = MaskStream::draw(&mut rng);
        let mut party = MaskStream::from_words(&words);
        for (kind, shape) in [("h", [2, 3]), ("attn", [2, 5])] {
            assert_eq!(client.next(kind, &shape), party.next(kind, &shape));
        }
        let (other, _) = MaskStream::draw(&mut rng);
        assert_ne!(words, other);
    }
}
