//! `unfedctl` as a library: the testnet spec, the launch plan and the verbs.

pub mod api_key_cmd;
pub mod bench_cmd;
pub mod bench_load;
pub mod billing_cmd;
pub mod chain_cmd;
pub mod chaos_plan;
pub mod client_cmd;
pub mod init;
pub mod launch;
pub mod model_cmd;
pub mod model_source;
pub mod plan;
pub mod preflight;
pub mod render;
pub mod spec;
