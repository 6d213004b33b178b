use std::process::ExitCode;

use clap::{Parser, Subcommand};
use unfedctl::{chain_cmd, client_cmd, model_cmd};

/// One testnet spec in, one running UNFED network out.
#[derive(Parser)]
#[command(name = "unfedctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Model(model_cmd::Commands),
    #[command(flatten)]
    Chain(chain_cmd::Commands),
    #[command(flatten)]
    Client(client_cmd::Commands),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Chain(cmd) => chain_cmd::run(cmd),
        Command::Client(cmd) => client_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
