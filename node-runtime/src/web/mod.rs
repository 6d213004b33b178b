//! The web dashboard (`unfed-node web`): chat with streamed tokens, the network and
//! chain views, wallet sign-in and the faucet, over a JSON API under `/api/` that the
//! embedded page uses too.

pub mod args;
pub mod auth;
pub mod chat;
pub mod dev_wallet;
pub mod faucet;
pub mod https;
pub mod openai;
pub mod origin;
pub mod probe;
pub mod server;
pub mod views;
pub mod wallet;
