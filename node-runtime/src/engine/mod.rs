//! The inference engine: decoder blocks for a layer range, KV-cache sessions, sampling.

pub mod bandwidth;
pub mod batcher;
pub mod generate;
pub mod hugepages;
pub mod linear;
pub mod model;
pub mod pool;
pub mod sampling;
pub mod sessions;
pub mod weights;

pub use model::{KvCache, ShardInput, ShardModel, ShardOutput, ShardSpec};
pub use sampling::{Sampled, Sampler, SamplingConfig};
pub use sessions::{Session, SessionError, SessionStore};
pub use weights::WeightFiles;

/// Fixes the engine's thread count for the process, once, at start-up before any thread
/// exists. candle asks for the core count on every matmul, and unless RAYON_NUM_THREADS
/// is set it re-reads /proc/cpuinfo each time (≈ 55 µs here, a dozen times a token);
/// the count set is the one rayon would pick anyway.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: called at the top of main, while the process has a single thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
