use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use unfedctl::{
    api_key_cmd, billing_cmd, chain_cmd, client_cmd, init, launch, model_cmd, plan, preflight,
    render, spec,
};

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
    /// Start a whole testnet: chain, contracts, stakes, model split, registry and nodes, in
    /// dependency order, each step gated on the readiness of the ones before it.
    ///
    /// Runs in the foreground (Ctrl-C stops everything) unless --detach.
    Up {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        /// Return once the model is READY and leave the testnet running.
        #[arg(long)]
        detach: bool,
        /// Seconds one step may take to become ready.
        #[arg(long, default_value_t = 120)]
        wait_timeout: u64,
        /// Internal: run as the background supervisor that `--detach` starts.
        #[arg(long, hide = true, conflicts_with = "detach")]
        supervise: bool,
        /// Join a testnet that spans machines as this `[[host]]` of the spec (with --join).
        #[arg(long, requires = "join")]
        host: Option<String>,
        /// The join bundle the control host's `up` wrote for this host
        /// (<run_dir>/join/<host>.json there).
        #[arg(long, requires = "host")]
        join: Option<PathBuf>,
    },
    /// Stop a testnet started with `up`: every process, newest first (SIGTERM, grace, SIGKILL).
    Down {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        /// Stop only the part this joined `[[host]]` runs.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show a testnet's processes and model readiness.
    Status {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// The part this joined `[[host]]` runs.
        #[arg(long)]
        host: Option<String>,
    },
    /// Print a node's log (`logs SPEC` lists them).
    Logs {
        /// Testnet spec (TOML).
        spec: Option<PathBuf>,
        /// Node name, as in `unfedctl plan` (registry, compute-0, anvil, ...).
        node: Option<String>,
        /// Keep printing as the log grows.
        #[arg(long, short)]
        follow: bool,
    },
    /// What CI runs: an ephemeral copy of the testnet (free ports, temporary run dir), a
    /// conformance pass (model READY, nodes admitted, stakes on-chain, a chat identical to
    /// the single-process engine), a report, teardown. Exit 0 only if every check passed.
    Test {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        /// Also write the results as JUnit XML.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Seconds one step may take to become ready.
        #[arg(long, default_value_t = 120)]
        wait_timeout: u64,
    },
    /// Run one node role in this process, exactly as `unfed-node ROLE ...` does (how `up`
    /// starts nodes, so one binary is enough).
    #[command(hide = true, disable_help_flag = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Go/No-Go checks: one [PASS]/[FAIL] line per check, then [GO] (exit 0) or [NO-GO] (exit 1).
    #[command(subcommand)]
    Preflight(PreflightCommand),
    #[command(flatten)]
    Model(model_cmd::Commands),
    #[command(flatten)]
    Chain(chain_cmd::Commands),
    #[command(flatten)]
    Billing(billing_cmd::Commands),
    #[command(flatten)]
    Client(client_cmd::Commands),
    /// Keys of the OpenAI-compatible API the dashboard serves at /v1/.
    #[command(subcommand)]
    ApiKey(api_key_cmd::Command),
    /// Write deployment manifests for a spec: `--target kubernetes` gives a namespace,
    /// Secrets (a fresh CA, a certificate per node, wallet keys), the model split and
    /// chain Jobs, and a StatefulSet + headless Service per node, started in the plan's
    /// order by init containers. Apply with `kubectl apply -f DIR`.
    Render(render::RenderArgs),
    /// Wait until a dependency is ready (the init containers of rendered pods): a node's
    /// plaintext health port SERVING, a TCP port open, a file present, contracts deployed.
    Wait(render::wait::WaitArgs),
}

#[derive(Subcommand)]
enum PreflightCommand {
    /// Static checks of a spec: valid, ports free, key files private, stakes, cached split.
    Spec {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
    },
    /// A node's TLS: certificate, key (0600, its own) and CA given; the certificate
    /// valid today, signed by the CA and naming the advertise host; with --connect, a
    /// handshake with the running node that presents exactly that certificate.
    Node {
        /// HOST:PORT other processes will dial.
        #[arg(long)]
        advertise: String,
        #[arg(long, env = "UNFED_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        #[arg(long, env = "UNFED_TLS_KEY")]
        tls_key: Option<PathBuf>,
        #[arg(long, env = "UNFED_TLS_CA")]
        tls_ca: Option<PathBuf>,
        /// Also handshake with the node running at --advertise.
        #[arg(long)]
        connect: bool,
        /// Accept a node without TLS (a throwaway test, never a real network).
        #[arg(long)]
        allow_insecure_public: bool,
    },
    /// The dashboard's safe defaults (auth bypasses off, faucet guarded, loopback bind),
    /// and whether it offers one-click sign-in as the testnet's dev client wallet.
    Web {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The chain the dashboard reads (dev-wallet sign-in needs a local Anvil).
        #[arg(long)]
        chain_rpc: Option<String>,
    },
    /// Checks against a running testnet: registry answers, model READY.
    Runtime {
        /// Registry host:port. Default: the one in the spec's run directory.
        #[arg(long)]
        registry: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Testnet spec whose running registry to check.
        spec: Option<PathBuf>,
        /// The network's CA certificate, with --registry on a TLS network.
        #[arg(long, env = "UNFED_TLS_CA")]
        tls_ca: Option<PathBuf>,
    },
}

fn run_preflight(cmd: PreflightCommand) -> anyhow::Result<ExitCode> {
    let checks = match cmd {
        PreflightCommand::Spec { spec } => preflight::spec_file_checks(spec.as_deref()),
        PreflightCommand::Node {
            advertise,
            tls_cert,
            tls_key,
            tls_ca,
            connect,
            allow_insecure_public,
        } => runtime()?.block_on(preflight::node_checks(
            &advertise,
            preflight::NodeTls {
                cert: tls_cert.as_deref(),
                key: tls_key.as_deref(),
                ca: tls_ca.as_deref(),
            },
            connect,
            allow_insecure_public,
        )),
        PreflightCommand::Web { host, chain_rpc } => {
            let offer = runtime()?.block_on(unfed_node::web::dev_wallet::offer(
                &host,
                chain_rpc.as_deref(),
            ));
            println!("{}", preflight::dev_wallet_line(&offer));
            preflight::web_checks(&host, &std::env::vars().collect())
        }
        PreflightCommand::Runtime {
            registry,
            model,
            spec,
            tls_ca,
        } => {
            let (registry, net) = match registry {
                Some(r) => (
                    r,
                    match &tls_ca {
                        Some(ca) => unfed_node::net::Net::client_from_ca(ca)?,
                        None => unfed_node::net::Net::plaintext(),
                    },
                ),
                None => {
                    let plan = plan::load_plan(spec.as_deref())?;
                    let state = launch::state::RunState::load(&plan.run_dir)?
                        .filter(|s| s.registry.is_some())
                        .ok_or_else(|| {
                            anyhow::anyhow!("testnet '{}' is not running; pass --registry or start it with `unfedctl up`", plan.name)
                        })?;
                    (state.registry.clone().unwrap_or_default(), state.net()?)
                }
            };
            runtime()?.block_on(preflight::runtime_checks(&net, &registry, model.as_deref()))
        }
    };
    Ok(preflight::report(&checks))
}

/// Exit status for input the user must fix (bad spec, bad flag value).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    unfed_node::engine::fix_thread_count();
    // Piping into `head` must end the program quietly, not panic on a closed stdout.
    // SAFETY: set once at start-up, before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    if let Command::Node { args } = cli.command {
        let program = std::ffi::OsString::from("unfedctl node");
        return unfed_node::cli::main_from(std::iter::once(program).chain(args));
    }
    let result = match cli.command {
        Command::Plan { spec, json } => run_plan(spec, json),
        Command::Init {
            template,
            path,
            force,
        } => init::write(template, &path, force).map(|()| ExitCode::SUCCESS),
        Command::Up {
            spec,
            detach,
            wait_timeout,
            supervise,
            host,
            join,
        } => (|| {
            let loaded = spec::load(spec.as_deref())?;
            let plan = plan::LaunchPlan::build(&loaded, plan::model_facts(&loaded))?;
            let (plan, join) = match (host, join) {
                (Some(host), Some(bundle)) => (plan.joined_as(&host)?, Some((host, bundle))),
                _ => (plan, None),
            };
            if detach {
                return launch::detach::run(&loaded, &plan, spec.as_deref(), wait_timeout, join);
            }
            let opts = launch::UpOptions {
                supervise,
                wait_timeout: std::time::Duration::from_secs(wait_timeout),
                join,
            };
            runtime()?.block_on(launch::up(loaded, plan, opts))
        })(),
        Command::Down { spec, host } => {
            host_plan(spec.as_deref(), host.as_deref()).and_then(|p| launch::down(&p))
        }
        Command::Status { spec, json, host } => host_plan(spec.as_deref(), host.as_deref())
            .and_then(|p| runtime()?.block_on(launch::status(&p, json))),
        Command::Logs { spec, node, follow } => {
            // `unfedctl logs registry`: one argument that is no file is a node of the default testnet.
            let (spec, node) = match (spec, node) {
                (Some(s), None) if !s.exists() && s.extension().is_none() => {
                    (None, s.to_str().map(String::from))
                }
                other => other,
            };
            plan::load_plan(spec.as_deref())
                .map_err(Into::into)
                .and_then(|p| launch::logs(&p, node.as_deref(), follow))
        }
        Command::Test {
            spec,
            junit,
            wait_timeout,
        } => spec::load(spec.as_deref())
            .map_err(Into::into)
            .and_then(|loaded| {
                let timeout = std::time::Duration::from_secs(wait_timeout);
                runtime()?.block_on(launch::conformance::test(loaded, junit, timeout))
            }),
        Command::Node { .. } => unreachable!("handled above"),
        Command::Preflight(cmd) => run_preflight(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Chain(cmd) => chain_cmd::run(cmd),
        Command::Billing(cmd) => billing_cmd::run(cmd),
        Command::Client(cmd) => client_cmd::run(cmd),
        Command::ApiKey(cmd) => api_key_cmd::run(cmd),
        Command::Render(args) => render::run(args),
        Command::Wait(args) => render::wait::run(args),
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

/// The plan of a testnet, or of the part a joined host runs.
fn host_plan(
    spec: Option<&std::path::Path>,
    host: Option<&str>,
) -> anyhow::Result<plan::LaunchPlan> {
    let plan = plan::load_plan(spec)?;
    match host {
        Some(host) => plan.joined_as(host),
        None => Ok(plan),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
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
