//! `unfedctl` as a library: the testnet spec, the launch plan and the verbs.
