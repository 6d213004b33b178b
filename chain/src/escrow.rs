//! Placeholder: filled in below.
pub struct Chain;
pub struct Deployment;
pub struct EscrowParams;
pub enum SlashDestination {}
