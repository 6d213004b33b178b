//! `unfedctl` as a library: the testnet spec, the launch plan and the verbs.

pub mod chain_cmd;
pub mod client_cmd;
pub mod model_cmd;
