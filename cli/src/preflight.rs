//! Go/No-Go checks, as the original's `testnet_preflight`: one `[PASS]`/`[FAIL]` line per
//! check, then `[GO]` (exit 0) or `[NO-GO] N check(s) failed` (exit 1). `up` runs the spec
//! checks before it starts anything and the runtime checks once the network is up.

use std::net::{IpAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use crate::plan::LaunchPlan;
use crate::spec::LoadedSpec;

/// Dashboard switches the web checks read: the dashboard's own names and parsing.
pub use unfed_node::web::args::{
    DEMO_AUTH_ENV, DEV_AUTH_BYPASS_ENV, FAUCET_ENABLED_ENV, FAUCET_REQUIRE_AUTH_ENV, is_loopback,
    truthy,
};

pub struct Check {
    pub name: String,
    /// Err holds the reason and the fix.
    pub result: Result<(), String>,
}

impl Check {
    fn new(name: impl Into<String>, result: Result<(), String>) -> Self {
        Self {
            name: name.into(),
            result,
        }
    }
}

/// Print the checks and the verdict; the exit code `preflight` returns.
pub fn report(checks: &[Check]) -> ExitCode {
    let failed = failures(checks);
    for c in checks {
        match &c.result {
            Ok(()) => println!("[PASS] {}", c.name),
            Err(why) => println!("[FAIL] {}: {why}", c.name),
        }
    }
    if failed == 0 {
        println!("[GO]");
        ExitCode::SUCCESS
    } else {
        println!("[NO-GO] {failed} check(s) failed");
        ExitCode::FAILURE
    }
}

pub fn failures(checks: &[Check]) -> usize {
    checks.iter().filter(|c| c.result.is_err()).count()
}

/// `preflight spec`: the spec loads and plans (each problem named), then the static checks
/// of its plan.
pub fn spec_file_checks(path: Option<&Path>) -> Vec<Check> {
    let name = path.map_or("(embedded default)".to_string(), |p| {
        p.display().to_string()
    });
    let loaded = crate::spec::load(path).map_err(anyhow::Error::from);
    let planned = loaded.and_then(|loaded| {
        let plan = LaunchPlan::build(&loaded, crate::plan::model_facts(&loaded))?;
        Ok((loaded, plan))
    });
    match planned {
        Ok((loaded, plan)) => {
            let mut checks = vec![Check::new(format!("spec {name} is valid"), Ok(()))];
            checks.extend(spec_checks(&loaded, &plan, true));
            checks
        }
        Err(e) => vec![Check::new(
            format!("spec {name} is valid"),
            Err(format!(
                "{e}\nfix these in the spec; `unfedctl init` writes one with every key explained"
            )),
        )],
    }
}

/// Static checks of a spec's plan, before anything starts. `verify_split` also re-hashes a
/// cached split (thorough, but seconds on a large model; `up` leaves it to the nodes, which
/// check their own shard's size on load).
pub fn spec_checks(loaded: &LoadedSpec, plan: &LaunchPlan, verify_split: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Some(path) = &loaded.spec.model.path {
        let dir = loaded.resolve(path);
        checks.push(Check::new(
            format!("model directory {} is readable", dir.display()),
            crate::model_source::readable(&dir),
        ));
    }
    for step in plan.steps.iter() {
        if let Some(port) = step.port {
            let free = TcpListener::bind(("127.0.0.1", port))
                .map(drop)
                .map_err(|_| format!("port {port} is already in use; stop what uses it or set testnet.base_port = 0"));
            checks.push(Check::new(
                format!("port {port} for {} is free", step.name),
                free,
            ));
        }
        if let Some(key) = &step.eth_key {
            checks.push(Check::new(
                format!("key file of {} is private", step.name),
                private_file(key),
            ));
        }
    }
    for key in crate::spec::CHAIN_KEY_FILES {
        if let Some(file) = loaded.spec.chain.key_file(key) {
            checks.push(Check::new(
                format!("chain.{key} is private"),
                private_file(&loaded.resolve(file)),
            ));
        }
    }
    if plan
        .steps
        .iter()
        .any(|s| s.kind == crate::plan::StepKind::Web)
    {
        checks.extend(web_checks(
            &loaded.spec.web.host,
            &std::env::vars().collect(),
        ));
    }
    let manifest = plan.shards_dir.join(unfed_model::manifest::MANIFEST_FILE);
    if verify_split && manifest.is_file() {
        let problems = unfed_model::verify::verify(&plan.shards_dir);
        let ok = match problems.first() {
            None => Ok(()),
            Some(p) => Err(format!(
                "{p} ({} problem(s)); remove {} and `up` splits the model again",
                problems.len(),
                plan.shards_dir.display()
            )),
        };
        checks.push(Check::new(
            format!("cached split in {} verifies", plan.shards_dir.display()),
            ok,
        ));
    }
    checks
}

/// A key file must exist and be readable by its owner only.
pub fn private_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:o}; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Loopback, private and link-local addresses are local; anything else, hostnames
/// included, is public.
pub fn is_local_host(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unique_local()
                || ip.is_unicast_link_local()
                || ip.is_unspecified()
        }
        Err(_) => false,
    }
}

/// The dashboard's safe defaults, for `host` and the given environment.
pub fn web_checks(host: &str, env: &std::collections::HashMap<String, String>) -> Vec<Check> {
    let bypass = truthy(env, DEV_AUTH_BYPASS_ENV, false);
    let demo = truthy(env, DEMO_AUTH_ENV, false);
    let faucet = truthy(env, FAUCET_ENABLED_ENV, false);
    let faucet_auth = truthy(env, FAUCET_REQUIRE_AUTH_ENV, true);
    let off = |on: bool, var: &str| {
        if on {
            Err(format!("{var} is on; unset it"))
        } else {
            Ok(())
        }
    };
    let loopback = is_loopback(host);
    vec![
        Check::new(
            "web: dev auth bypass is off",
            off(bypass, DEV_AUTH_BYPASS_ENV),
        ),
        Check::new("web: demo auth is off", off(demo, DEMO_AUTH_ENV)),
        Check::new(
            "web: faucet is off, or on with wallet auth required",
            if faucet && !faucet_auth {
                Err(format!(
                    "{FAUCET_ENABLED_ENV}=1 with {FAUCET_REQUIRE_AUTH_ENV}=0; require auth or turn the faucet off"
                ))
            } else {
                Ok(())
            },
        ),
        Check::new(
            format!("web: host {host} is loopback, or public with no auth bypass"),
            if !loopback && (bypass || demo) {
                Err(format!(
                    "binding {host} with an auth bypass on exposes the wallet flows; bind 127.0.0.1 or turn the bypass off"
                ))
            } else {
                Ok(())
            },
        ),
    ]
}

/// What `preflight web` says of one-click dev-wallet sign-in (a fact, not a check: wallet
/// sign-in is there either way).
pub fn dev_wallet_line(offer: &Result<unfed_chain::Address, String>) -> String {
    match offer {
        Ok(a) => format!(
            "[INFO] web: one-click sign-in as the testnet's dev client wallet {a} is ON (loopback dashboard, local Anvil: its key is public)"
        ),
        Err(why) => format!("[INFO] web: dev-wallet sign-in is off: {why}"),
    }
}

/// A node's TLS files, as its flags name them.
#[derive(Debug, Default, Clone)]
pub struct NodeTls<'a> {
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub ca: Option<&'a Path>,
}

/// A node about to advertise `advertise`: its TLS is complete, the key private and
/// its own, the certificate valid today, signed by the CA and naming the advertise host;
/// with `connect`, the running node presents exactly this certificate in a handshake.
pub async fn node_checks(
    advertise: &str,
    tls: NodeTls<'_>,
    connect: bool,
    allow_insecure_public: bool,
) -> Vec<Check> {
    let host = advertise.rsplit_once(':').map_or(advertise, |(h, _)| h);
    let port_ok = advertise
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .map(drop)
        .ok_or_else(|| format!("--advertise {advertise} must be HOST:PORT with a non-zero port"));
    let mut checks = vec![Check::new(
        format!("advertise address {advertise} is HOST:PORT"),
        port_ok,
    )];
    let (Some(cert), Some(key), Some(ca)) = (tls.cert, tls.key, tls.ca) else {
        let some = tls.cert.is_some() || tls.key.is_some() || tls.ca.is_some();
        let result = if some {
            Err("give --tls-cert, --tls-key and --tls-ca together".to_string())
        } else if allow_insecure_public {
            Ok(())
        } else {
            Err(format!(
                "the node at {host} would serve plaintext: anyone on the path reads prompts and activations; \
                 give it --tls-cert/--tls-key/--tls-ca (`unfedctl up` issues them under run_dir/keys/tls), \
                 or pass --allow-insecure-public for a throwaway test"
            ))
        };
        checks.push(Check::new("TLS: certificate, key and CA are given", result));
        return checks;
    };
    checks.push(Check::new("TLS: certificate, key and CA are given", Ok(())));
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let (cert_pem, ca_pem) = match (read(cert), read(ca)) {
        (Ok(c), Ok(a)) => (c, a),
        (c, a) => {
            for (what, r) in [("certificate", c), ("CA", a)] {
                checks.push(Check::new(format!("TLS {what} is readable"), r.map(drop)));
            }
            return checks;
        }
    };
    checks.push(Check::new(
        format!("TLS key {} is private (0600)", key.display()),
        private_file(key),
    ));
    let facts = match unfed_node::net::pki::CertFacts::of_pem(&cert_pem) {
        Ok(f) => f,
        Err(e) => {
            checks.push(Check::new(
                format!("certificate {} parses", cert.display()),
                Err(format!("{e:#}")),
            ));
            return checks;
        }
    };
    let key_matches = read(key).and_then(|k| {
        unfed_node::net::pki::key_matches(&cert_pem, &k).map_err(|e| format!("{e:#}"))
    });
    checks.push(Check::new(
        "the key belongs to the certificate",
        key_matches.clone(),
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let valid = if now < facts.not_before {
        Err(format!(
            "not valid before {} (unix time; now {now}): check this machine's clock",
            facts.not_before
        ))
    } else if now > facts.not_after {
        Err(format!(
            "expired {} days ago: issue a new certificate (`unfedctl up` issues fresh ones)",
            (now - facts.not_after) / 86_400
        ))
    } else {
        Ok(())
    };
    checks.push(Check::new(
        format!("certificate is valid today ({})", facts.subject),
        valid,
    ));
    checks.push(Check::new(
        "certificate is signed by the CA",
        unfed_node::net::pki::CertFacts::signed_by(&cert_pem, &ca_pem)
            .map_err(|e| format!("{e:#}")),
    ));
    let covers = if facts.covers(host) {
        Ok(())
    } else {
        Err(format!(
            "the certificate names {} but not {host}: peers dialling {advertise} would refuse it; issue one for {host}",
            facts.names()
        ))
    };
    checks.push(Check::new(
        format!("certificate names the advertise host {host}"),
        covers,
    ));
    if connect {
        let result = match key_matches {
            Ok(_) => match unfed_node::net::Net::client_from_ca(ca) {
                Ok(net) => net
                    .connect(
                        advertise,
                        std::time::Duration::from_secs(5),
                        Some(facts.pin),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| format!("{e:#}")),
                Err(e) => Err(format!("{e:#}")),
            },
            Err(_) => Err("skipped: the key does not belong to the certificate".into()),
        };
        checks.push(Check::new(
            format!(
                "the node at {advertise} completes a TLS handshake under the CA with this certificate ({})",
                facts.pin.short()
            ),
            result,
        ));
    }
    checks
}

/// Checks against a running testnet: the model is READY at the registry.
pub async fn runtime_checks(
    net: &unfed_node::net::Net,
    registry: &str,
    model: Option<&str>,
) -> Vec<Check> {
    let mut client = match unfed_node::client::Client::connect(net, registry).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::new(
                format!("registry {registry} answers"),
                Err(format!("{e:#}")),
            )];
        }
    };
    let mut checks = vec![Check::new(format!("registry {registry} answers"), Ok(()))];
    let models = match client.list_models().await {
        Ok(m) => m,
        Err(e) => {
            checks.push(Check::new("registry lists models", Err(format!("{e:#}"))));
            return checks;
        }
    };
    let names: Vec<String> = match model {
        Some(m) => vec![m.to_string()],
        None => models.iter().map(|m| m.model.clone()).collect(),
    };
    if names.is_empty() {
        checks.push(Check::new(
            "a model is served",
            Err("the registry serves no model yet".into()),
        ));
    }
    for name in names {
        let ready = client
            .require_ready(&name)
            .await
            .map(drop)
            .map_err(|e| format!("{e:#}"));
        checks.push(Check::new(format!("model {name} is READY"), ready));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn web_defaults_pass_and_each_bypass_fails() {
        assert_eq!(failures(&web_checks("127.0.0.1", &env(&[]))), 0);
        assert_eq!(
            failures(&web_checks(
                "127.0.0.1",
                &env(&[(DEV_AUTH_BYPASS_ENV, "1")])
            )),
            1
        );
        assert_eq!(
            failures(&web_checks("0.0.0.0", &env(&[(DEMO_AUTH_ENV, "true")]))),
            2
        );
        assert_eq!(
            failures(&web_checks("127.0.0.1", &env(&[(FAUCET_ENABLED_ENV, "1")]))),
            0
        );
        let open_faucet = env(&[(FAUCET_ENABLED_ENV, "1"), (FAUCET_REQUIRE_AUTH_ENV, "0")]);
        assert_eq!(failures(&web_checks("127.0.0.1", &open_faucet)), 1);
    }

    fn node(advertise: &str, tls: NodeTls<'_>, allow: bool) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        failures(&rt.block_on(node_checks(advertise, tls, false, allow)))
    }

    /// A CA and certificates for `hosts` written as a node would keep them.
    struct Files {
        dir: tempfile::TempDir,
        ca: unfed_node::net::pki::Ca,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = unfed_node::net::pki::Ca::generate("t").unwrap();
            std::fs::write(dir.path().join("ca.crt"), &ca.cert_pem).unwrap();
            Self { dir, ca }
        }

        fn issue(&self, name: &str, hosts: &[&str], days: i64) -> unfed_node::net::TlsFiles {
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
            let c = self.ca.issue(name, &hosts, days).unwrap();
            let f = unfed_node::net::TlsFiles::in_dir(self.dir.path(), name);
            std::fs::write(&f.cert, &c.cert_pem).unwrap();
            unfed_chain::keys::create_private_file(&f.key, c.key_pem.as_bytes()).unwrap();
            f
        }
    }

    fn tls(f: &unfed_node::net::TlsFiles) -> NodeTls<'_> {
        NodeTls {
            cert: Some(&f.cert),
            key: Some(&f.key),
            ca: Some(&f.ca),
        }
    }

    /// The names of the failed checks.
    fn failed(checks: &[Check]) -> Vec<String> {
        checks
            .iter()
            .filter_map(|c| c.result.as_ref().err().map(|e| format!("{}: {e}", c.name)))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_node_is_go_and_each_flaw_is_named() {
        let files = Files::new();
        let good = files.issue("good", &["127.0.0.1", "localhost"], 30);
        // A running node serving this certificate, for --connect.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let advertise = listener.local_addr().unwrap().to_string();
        let config = unfed_node::registry::RegistryConfig {
            net: unfed_node::net::Net::from_files(&good).unwrap(),
            ..Default::default()
        };
        tokio::spawn(unfed_node::registry::run(
            config,
            listener,
            std::future::pending(),
        ));
        let checks = node_checks(&advertise, tls(&good), true, false).await;
        assert_eq!(failed(&checks), Vec::<String>::new());

        let flaw = |checks: Vec<Check>, want: &str| {
            let f = failed(&checks);
            assert!(
                f.len() == 1 && f[0].contains(want),
                "expected one failure about {want:?}, got {f:#?}"
            );
        };
        // Another certificate for the same host: the running node is not this one.
        let other = files.issue("other", &["127.0.0.1"], 30);
        flaw(
            node_checks(&advertise, tls(&other), true, false).await,
            "impersonation",
        );
        let expired = files.issue("expired", &["127.0.0.1"], -1);
        flaw(
            node_checks(&advertise, tls(&expired), false, false).await,
            "expired",
        );
        let elsewhere = files.issue("elsewhere", &["10.9.9.9"], 30);
        flaw(
            node_checks(&advertise, tls(&elsewhere), false, false).await,
            "names 10.9.9.9 but not 127.0.0.1",
        );
        let readable = files.issue("readable", &["127.0.0.1"], 30);
        std::fs::set_permissions(&readable.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        flaw(
            node_checks(&advertise, tls(&readable), false, false).await,
            "chmod 600",
        );
        let foreign = Files::new();
        let mut signed_elsewhere = foreign.issue("foreign", &["127.0.0.1"], 30);
        signed_elsewhere.ca = good.ca.clone();
        flaw(
            node_checks(&advertise, tls(&signed_elsewhere), false, false).await,
            "not signed by this CA",
        );
        let mut mixed = files.issue("mixed", &["127.0.0.1"], 30);
        mixed.key = other.key.clone();
        flaw(
            node_checks(&advertise, tls(&mixed), false, false).await,
            "does not belong",
        );
        flaw(
            node_checks(&advertise, NodeTls::default(), false, false).await,
            "plaintext",
        );
    }

    #[test]
    fn a_plaintext_node_is_no_go_unless_explicitly_allowed() {
        assert_eq!(node("127.0.0.1:50051", NodeTls::default(), false), 1);
        assert_eq!(node("203.0.113.42:50051", NodeTls::default(), false), 1);
        assert_eq!(node("203.0.113.42:50051", NodeTls::default(), true), 0);
        assert_eq!(node("203.0.113.42:0", NodeTls::default(), true), 1);
        let cert = Path::new("/nonexistent/server.crt");
        let lone = NodeTls {
            cert: Some(cert),
            ..Default::default()
        };
        assert_eq!(node("203.0.113.42:50051", lone, true), 1);
    }

    #[test]
    fn local_hosts() {
        for h in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "169.254.1.1",
            "localhost",
            "::1",
            "[fe80::1]",
            "fd00::1",
        ] {
            assert!(is_local_host(h), "{h}");
        }
        for h in ["203.0.113.42", "8.8.8.8", "example.org", "2001:db8::1"] {
            assert!(!is_local_host(h), "{h}");
        }
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = private_file(&key).unwrap_err();
        assert!(
            err.contains("has mode 644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(private_file(&key).is_ok());
    }
}
