//! The inference engine: decoder blocks for a layer range, KV-cache sessions, sampling.

pub mod bandwidth;
pub mod batcher;
pub mod generate;
pub mod hugepages;
pub mod linear;
pub mod model;
pub mod sampling;
pub mod sessions;
pub mod weights;

pub use model::{KvCache, ShardInput, ShardModel, ShardOutput, ShardSpec};
pub use sampling::{Sampled, Sampler, SamplingConfig};
pub use sessions::{Session, SessionError, SessionStore};
pub use weights::WeightFiles;
