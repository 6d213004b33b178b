//! Vision-language models (SmolVLM / Idefics3): the vision tower and connector for a
//! range of encoder layers, and the merge of image features into the first text shard's
//! input rows.

pub mod generate;
pub mod merge;
pub mod service;
pub mod tower;

pub use generate::VisionLanguageModel;
pub use merge::{image_prompt_rows, replace_image_rows};
pub use tower::{
    PatchStates, PixelBatch, VisionInput, VisionModel, VisionOutput, VisionSpec, image_seq_len,
};
