//! Rust bindings generated from the committed solc artifacts in contracts/out (ABI and
//! bytecode), so building the crate needs neither node nor solc.

#![allow(clippy::too_many_arguments)]

use alloy::sol;

sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    UnfedToken,
    "../contracts/out/UnfedToken.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    UnfedEscrow,
    "../contracts/out/UnfedEscrow.json"
);
