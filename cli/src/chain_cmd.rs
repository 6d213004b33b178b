//! Placeholder verbs: its owner replaces this module.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Commands {}

pub fn run(cmd: Commands) -> anyhow::Result<ExitCode> {
    match cmd {}
}
