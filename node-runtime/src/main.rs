use clap::Parser;

/// UNFED node: run one role of the network (registry, daemon, compute, MPC, web).
#[derive(Parser)]
#[command(name = "unfed-node", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
