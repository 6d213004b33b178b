use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use unfedctl::{chain_cmd, client_cmd, init, model_cmd, plan, spec};

/// One testnet spec in, one running UNFED network out.
///
/// A testnet spec (TOML) describes a whole network: chain, contracts, stakes, the model and
/// how to shard it, and every node. Start with `unfedctl init` to write a commented spec,
/// `unfedctl plan SPEC` to see what would run and in which order.
#[derive(Parser)]
#[command(name = "unfedctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the launch graph for a spec: every process and step, its dependencies, ports,
    /// and which steps start together.
    Plan {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a commented testnet spec to start from.
    Init {
        /// Which template to write.
        #[arg(long, short, value_enum, default_value_t = init::Template::Tiny)]
        template: init::Template,
        /// Where to write it. Default: ./unfed.toml
        #[arg(default_value = "unfed.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    #[command(flatten)]
    Model(model_cmd::Commands),
    #[command(flatten)]
    Chain(chain_cmd::Commands),
    #[command(flatten)]
    Client(client_cmd::Commands),
}

/// Exit status for input the user must fix (bad spec, bad flag value).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan { spec, json } => run_plan(spec, json),
        Command::Init {
            template,
            path,
            force,
        } => init::write(template, &path, force).map(|()| ExitCode::SUCCESS),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Chain(cmd) => chain_cmd::run(cmd),
        Command::Client(cmd) => client_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => match err.downcast_ref::<spec::SpecErrors>() {
            Some(errors) => {
                eprintln!("{errors}");
                let n = errors.0.len();
                eprintln!(
                    "error: {n} problem{} in the spec",
                    if n == 1 { "" } else { "s" }
                );
                ExitCode::from(EXIT_USAGE)
            }
            None => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_plan(spec_path: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let plan = plan::load_plan(spec_path.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render_text());
    }
    Ok(ExitCode::SUCCESS)
}
