//! Model tools shared by `unfedctl` and `unfed-node`: reading HuggingFace checkpoint
//! directories, the shard manifest, splitting, verifying, and the built-in tiny model.

pub mod config;
pub mod layout;
pub mod manifest;

pub use config::{Architecture, DType, ModelConfig, TextConfig, VisionConfig};
pub use manifest::{Manifest, ShardEntry, Stack, TensorEntry};
