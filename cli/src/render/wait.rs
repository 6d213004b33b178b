//! `unfedctl wait`: block until one dependency of a step is ready, for the init
//! containers of rendered Kubernetes pods (one init container per dependency, in the
//! plan's wave order). Polls; fails with the last thing it saw at the deadline.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Wait until a dependency is ready: a node's plaintext health port says SERVING, a TCP
/// port accepts, a file exists, or the chain Job has recorded the deployed contracts.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// A node's --health-port (grpc.health.v1, plaintext): wait for SERVING.
    #[arg(long, value_name = "HOST:PORT")]
    pub grpc_health: Option<String>,
    /// Wait until HOST:PORT accepts TCP connections (the Anvil service).
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// Wait until this file exists (a Job's output: the split's manifest.json, a marker).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Wait until this state.json (written by `unfedctl chain deploy`) records the
    /// deployed escrow and token.
    #[arg(long, value_name = "STATE_JSON")]
    pub chain_state: Option<PathBuf>,
    /// With --chain-state: write UNFED_ESCROW, UNFED_TOKEN and UNFED_CHAIN_ID there
    /// (a shell env file the node's container sources).
    #[arg(long, value_name = "PATH", requires = "chain_state")]
    pub env_file: Option<PathBuf>,
    /// Give up after this long: 300s, 10m, 1h, or plain seconds.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// "300s", "10m", "1h", "500ms" or "300" (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 300s, 10m or 1h"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use ms, s, m or h")),
    })
}

enum Target {
    Health(String),
    Tcp(String),
    File(PathBuf),
    Chain(PathBuf, Option<PathBuf>),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Health(a) => format!("{a} to report SERVING"),
            Target::Tcp(a) => format!("{a} to accept connections"),
            Target::File(p) => format!("{} to exist", p.display()),
            Target::Chain(p, _) => format!("{} to record the deployed contracts", p.display()),
        }
    }

    /// Ok(None) when ready, Ok(Some(why not)) to keep waiting.
    async fn check(&self) -> anyhow::Result<Option<String>> {
        match self {
            Target::Health(addr) => Ok(health(addr).await.err()),
            Target::Tcp(addr) => Ok(tokio::net::TcpStream::connect(addr)
                .await
                .err()
                .map(|e| e.to_string())),
            Target::File(p) => Ok((!p.exists()).then(|| "not there yet".to_string())),
            Target::Chain(state, env) => chain(state, env.as_deref()),
        }
    }
}

async fn health(addr: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.map_err(|e| {
        let mut msg = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            msg = format!("{msg}: {src}");
        }
        msg
    })?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner()
        .status();
    match status {
        tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
        other => Err(other.as_str_name().to_string()),
    }
}

fn chain(state: &Path, env: Option<&Path>) -> anyhow::Result<Option<String>> {
    let text = match std::fs::read_to_string(state) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some("no state.json yet".into()));
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", state.display())),
    };
    // A half-written file parses on a later poll.
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(Some("state.json is being written".into()));
    };
    let field = |k: &str| json["chain"][k].as_str().map(str::to_string);
    let (Some(escrow), Some(token)) = (field("escrow"), field("token")) else {
        return Ok(Some("contracts not deployed yet".into()));
    };
    if let Some(env) = env {
        let chain_id = json["chain"]["chain_id"].as_u64().unwrap_or(0);
        // Addresses are hex: nothing to quote, but refuse anything else reaching a shell.
        for v in [&escrow, &token] {
            if !v.starts_with("0x") || !v[2..].chars().all(|c| c.is_ascii_hexdigit()) {
                bail!("{} records {v:?}, which is not an address", state.display());
            }
        }
        let body =
            format!("UNFED_ESCROW={escrow}\nUNFED_TOKEN={token}\nUNFED_CHAIN_ID={chain_id}\n");
        let tmp = env.with_extension("tmp");
        std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, env).with_context(|| format!("writing {}", env.display()))?;
    }
    Ok(None)
}

pub fn run(args: WaitArgs) -> anyhow::Result<ExitCode> {
    let mut targets = Vec::new();
    targets.extend(args.grpc_health.map(Target::Health));
    targets.extend(args.tcp.map(Target::Tcp));
    targets.extend(args.file.map(Target::File));
    targets.extend(args.chain_state.map(|s| Target::Chain(s, args.env_file)));
    let target = match targets.len() {
        1 => targets.remove(0),
        _ => bail!(
            "pass exactly one of --grpc-health HOST:PORT, --tcp HOST:PORT, --file PATH, --chain-state STATE_JSON"
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(wait(&target, args.timeout))?;
    println!("ready: {}", target.describe().replace(" to ", ": "));
    Ok(ExitCode::SUCCESS)
}

async fn wait(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    let mut reported = Instant::now();
    eprintln!("waiting for {}", target.describe());
    loop {
        let why = match target.check().await? {
            None => return Ok(()),
            Some(why) => why,
        };
        if Instant::now() >= deadline {
            bail!(
                "gave up after {timeout:?} waiting for {} (last: {why}); check the pod or Job that provides it (kubectl get pods; kubectl logs POD), or raise --timeout",
                target.describe()
            );
        }
        // One progress line every 30 s is enough for `kubectl logs`.
        if reported.elapsed() > Duration::from_secs(30) {
            eprintln!("still waiting for {} ({why})", target.describe());
            reported = Instant::now();
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }
}
