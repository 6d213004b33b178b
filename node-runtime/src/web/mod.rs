//! The web dashboard's rules that do not depend on HTTP: wallet sign-in (EIP-191
//! challenges and sessions) and the faucet's admission with its persisted cooldown.

pub mod auth;
pub mod faucet;
