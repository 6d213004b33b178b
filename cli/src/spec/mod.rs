//! The testnet spec: one TOML file describing a whole network. `load` reads and checks it
//! (syntax, keys, types, values, and the rules that tie sections together) and reports
//! every problem at once, compiler style.

pub mod amount;
pub mod diagnostics;
mod model;
pub mod schema;
mod validate;

use std::path::{Path, PathBuf};

pub use amount::TokenAmount;
pub use diagnostics::{SpecError, SpecErrors};
pub use model::*;
pub use validate::Spans;

use diagnostics::Reporter;

/// The spec `unfedctl` runs when none is given: the built-in tiny model, 2 shards, a local chain.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../specs/tiny.toml");
/// The keys an external chain needs (one per duty, plus the client's), by spec key.
const EXTERNAL_KEYS: [(&str, &str); 4] = [
    ("operator_key_file", "escrow admin"),
    ("settler_key_file", "settlement poster (the daemon)"),
    ("slasher_key_file", "slasher (the registry)"),
    ("client_key_file", "client wallet"),
];

pub const EMBEDDED_NAME: &str = "<embedded specs/tiny.toml>";

/// A checked spec and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: TestnetSpec,
    /// The path as the user wrote it, for messages.
    pub display_path: String,
    /// Directory relative paths in the spec are resolved against.
    pub base_dir: PathBuf,
    pub source: String,
    pub spans: Spans,
    /// Keys ("model.text_shards") whose values failed their check; rules that read them
    /// are skipped rather than reporting follow-on problems.
    pub rejected: Vec<String>,
    /// Problems found so far; `load` fails when there are any, the plan adds its own first.
    pub problems: Vec<SpecError>,
}

impl LoadedSpec {
    /// True when none of `keys` ("section.key") was rejected, so rules over them can run.
    pub fn sound(&self, keys: &[&str]) -> bool {
        !keys.iter().any(|k| {
            let section = k.split('.').next().unwrap_or(k);
            self.rejected
                .iter()
                .any(|r| r == k || *r == format!("{section}.*"))
        })
    }

    /// Turn a path written in the spec into one usable from the current directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Reporter for problems found after loading (plan building), pointing into this file;
    /// it starts with the problems already found.
    pub fn reporter(&self) -> Reporter<'_> {
        let mut report = Reporter::new(&self.display_path, &self.source);
        report.extend(self.problems.iter().cloned());
        report
    }
}

/// Read and check the spec at `path`, or the embedded default when `path` is None.
pub fn load(path: Option<&Path>) -> Result<LoadedSpec, SpecErrors> {
    let loaded = load_lenient(path)?;
    match loaded.problems.is_empty() {
        true => Ok(loaded),
        false => Err(SpecErrors(loaded.problems)),
    }
}

/// Like `load`, but a spec that parses is returned with its problems in `problems`, so that
/// later checks (the plan's) can add theirs and everything is reported at once.
pub fn load_lenient(path: Option<&Path>) -> Result<LoadedSpec, SpecErrors> {
    let Some(path) = path else {
        return parse(EMBEDDED_NAME, EMBEDDED_DEFAULT, Path::new("."), "tiny");
    };
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecErrors(vec![SpecError {
            file: display.clone(),
            location: None,
            message: format!(
                "cannot read the spec: {e} (create one with `unfedctl init {display}`)"
            ),
        }])
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("unfed");
    parse(&display, &text, base, stem)
}

/// Check `text` (named `display_path` in messages); relative paths resolve against `base_dir`,
/// and `default_name` names the testnet when the spec does not.
/// Problems found are in `LoadedSpec::problems`; only unparsable TOML is an `Err`.
pub fn parse(
    display_path: &str,
    text: &str,
    base_dir: &Path,
    default_name: &str,
) -> Result<LoadedSpec, SpecErrors> {
    let mut report = Reporter::new(display_path, text);
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            report.at(
                e.span(),
                format!("invalid TOML: {}", e.message().trim_end()),
            );
            return Err(report.finish().unwrap_err());
        }
    };
    let (spans, rejected) = validate::check_document(&doc, &mut report);
    // Read what passed, so the cross-key rules below report in the same run.
    let checked = validate::without(text, &rejected);
    let mut spec: TestnetSpec = match toml::from_str(&checked) {
        Ok(spec) => spec,
        Err(e) => {
            // Only reachable when the schema and the typed spec disagree.
            report.at(
                None,
                format!("internal error reading the checked spec: {}", e.message()),
            );
            return Err(report.finish().unwrap_err());
        }
    };
    if spec.testnet.name.is_empty() {
        spec.testnet.name = default_name.to_string();
    }
    let mut loaded = LoadedSpec {
        spec,
        display_path: display_path.to_string(),
        base_dir: base_dir.to_path_buf(),
        source: text.to_string(),
        spans,
        rejected: rejected
            .iter()
            .map(|r| format!("{}.{}", r.section, r.key.as_deref().unwrap_or("*")))
            .collect(),
        problems: Vec::new(),
    };
    check_rules(&loaded, &mut report);
    loaded.problems = report.finish().err().map(|e| e.0).unwrap_or_default();
    Ok(loaded)
}

/// Rules that tie keys together. Rules that need the model or the port layout live in the plan.
fn check_rules(loaded: &LoadedSpec, report: &mut Reporter) {
    let spec = &loaded.spec;
    let spans = &loaded.spans;
    let name = &spec.testnet.name;
    if !valid_name(name) {
        report.at(
            spans.key_or_section("testnet", "name"),
            format!("testnet.name \"{name}\" may contain only letters, digits, '-' and '_' (it names the run directory)"),
        );
    }

    match (&spec.model.source, &spec.model.path) {
        (Some(_), Some(_)) => report.at(
            spans.get("model.path"),
            "model.path and model.source are both set; keep one (path = a HuggingFace directory, source = \"builtin:tiny\")",
        ),
        (Some(source), None) if source != BUILTIN_TINY => report.at(
            spans.get("model.source"),
            format!("unknown model.source \"{source}\"; built-in models: \"{BUILTIN_TINY}\" (or set model.path to a HuggingFace directory)"),
        ),
        _ => {}
    }

    let chain = &spec.chain;
    let chain_mode_sound = loaded.sound(&["chain.mode"]);
    match chain.mode {
        _ if !chain_mode_sound => {}
        ChainMode::External => {
            if chain.rpc_url.is_none() {
                report.at(
                    spans.key_or_section("chain", "mode"),
                    "chain.mode = \"external\" needs chain.rpc_url (e.g. rpc_url = \"http://127.0.0.1:8545\")",
                );
            }
            // The public dev mnemonic is never used off Anvil: anyone could sweep it.
            for (key, what) in EXTERNAL_KEYS {
                if chain.key_file(key).is_none() {
                    report.at(
                        spans.key_or_section("chain", "mode"),
                        format!("chain.mode = \"external\" needs chain.{key} (a 0600 file holding the {what}'s private key; the public dev keys are refused off Anvil)"),
                    );
                }
            }
        }
        mode => {
            for key in std::iter::once("rpc_url").chain(CHAIN_KEY_FILES) {
                if let Some(span) = spans.get(&format!("chain.{key}")) {
                    report.at(
                        Some(span),
                        format!("chain.{key} is only used with mode = \"external\" (mode is \"{}\"); remove it or switch the mode", mode_name(mode)),
                    );
                }
            }
        }
    }
    if chain_mode_sound && chain.mode != ChainMode::Anvil {
        for key in ["port", "block_time", "chain_id"] {
            if let Some(span) = spans.get(&format!("chain.{key}")) {
                report.at(
                    Some(span),
                    format!("chain.{key} configures the local Anvil and needs mode = \"anvil\""),
                );
            }
        }
    }

    if chain_mode_sound && chain.mode != ChainMode::None && loaded.sound(&["economics.min_stake"]) {
        let min = spec.economics.min_stake;
        if spec.nodes.stake < min && loaded.sound(&["nodes.stake"]) {
            report.at(
                spans.get("nodes.stake").or_else(|| spans.get("economics.min_stake")),
                format!(
                    "nodes.stake ({}) is below economics.min_stake ({min}); nodes would not be admitted — raise nodes.stake or lower min_stake",
                    spec.nodes.stake
                ),
            );
        }
        for (i, node) in spec.node_overrides.iter().enumerate() {
            if let Some(stake) = node.stake.filter(|s| *s < min) {
                report.at(
                    spans.get(&format!("node[{i}].stake")),
                    format!(
                        "[[node]] #{} stake ({stake}) is below economics.min_stake ({min})",
                        i + 1
                    ),
                );
            }
        }
    }

    // The dashboard binds an IP address; a name would pass here and fail only after the
    // chain is up.
    let host = &spec.web.host;
    if loaded.sound(&["web.host"]) && host.parse::<std::net::IpAddr>().is_err() {
        let fix = if host.eq_ignore_ascii_case("localhost") {
            "use \"127.0.0.1\" (this machine only)".to_string()
        } else {
            "use the IP address to bind (\"127.0.0.1\" for this machine only, \"0.0.0.0\" for every interface)".to_string()
        };
        report.at(
            spans.key_or_section("web", "host"),
            format!("web.host \"{host}\" is not an IP address, and the dashboard binds an address; {fix}"),
        );
    }

    if spec.web.tls && !spec.testnet.tls && loaded.sound(&["web.tls", "testnet.tls"]) {
        report.at(
            spans.key_or_section("web", "tls"),
            "web.tls = true needs the testnet CA to issue the dashboard's certificate, but testnet.tls = false; set testnet.tls = true or remove web.tls",
        );
    }

    for (i, node) in spec.node_overrides.iter().enumerate() {
        let Some(cheat) = &node.cheat else { continue };
        let span = spans.get(&format!("node[{i}].cheat"));
        if node.role != NodeRole::Compute {
            report.at(
                span.clone(),
                format!("[[node]] #{} cheat = \"{cheat}\": only compute nodes cheat; set role = \"compute\" or remove cheat", i + 1),
            );
        }
        if chain_mode_sound && chain.mode != ChainMode::Anvil {
            report.at(
                span,
                format!(
                    "[[node]] #{} cheat = \"{cheat}\" is refused on a {} chain: cheating modes are for tests and demos on a local Anvil (chain.mode = \"anvil\")",
                    i + 1,
                    mode_name(chain.mode)
                ),
            );
        }
    }

    check_hosts(loaded, report);

    let mpc = &spec.mpc;
    if !loaded.sound(&["mpc.output", "mpc.pairs", "mpc.layers", "model.text_shards"]) {
        return;
    }
    if mpc.output != MpcOutput::Off && mpc.pairs == 0 {
        report.at(
            spans.key_or_section("mpc", "output"),
            format!(
                "mpc.output = \"{}\" needs an MPC pair to serve it; set mpc.pairs = 1 (or output = \"off\")",
                output_name(mpc.output)
            ),
        );
    }
    if mpc.output == MpcOutput::FullOutput2pc && spec.model.text_shards != 1 {
        report.at(
            spans.key_or_section("model", "text_shards"),
            format!(
                "mpc.output = \"full_output_2pc\" runs every layer in the MPC pair, so the model must be one text shard; set model.text_shards = 1 (found {})",
                spec.model.text_shards
            ),
        );
    }
    if mpc.layers.is_some() && mpc.pairs == 0 {
        report.at(spans.get("mpc.layers"), "mpc.layers needs mpc.pairs >= 1");
    }
}

/// `[[host]]` entries and the nodes placed on them.
fn check_hosts(loaded: &LoadedSpec, report: &mut Reporter) {
    let (spec, spans) = (&loaded.spec, &loaded.spans);
    let hosts = &spec.hosts;
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    for (i, host) in hosts.iter().enumerate() {
        let at = |key: &str| spans.key_or_section(&format!("host[{i}]"), key);
        if !valid_name(&host.name) {
            report.at(
                at("name"),
                format!(
                    "[[host]] #{} name \"{}\" may contain only letters, digits, '-' and '_'",
                    i + 1,
                    host.name
                ),
            );
        }
        if names[..i].contains(&host.name.as_str()) {
            report.at(
                at("name"),
                format!(
                    "[[host]] name \"{}\" is used twice; host names must be unique",
                    host.name
                ),
            );
        }
        match host.address.parse::<std::net::IpAddr>() {
            Err(_) => report.at(
                at("address"),
                format!("[[host]] \"{}\" address \"{}\" is not an IP address; give the address the other hosts dial it at (nodes bind it)", host.name, host.address),
            ),
            Ok(ip) if ip.is_unspecified() => report.at(
                at("address"),
                format!("[[host]] \"{}\" address {ip} is no address to dial; give the host's own IP address", host.name),
            ),
            Ok(ip) if !ip.is_loopback() && !spec.testnet.tls => report.at(
                at("address"),
                format!("[[host]] \"{}\" is at {ip}, off loopback, but testnet.tls = false: links between hosts must be encrypted; set testnet.tls = true", host.name),
            ),
            Ok(_) => {}
        }
    }
    let controls = hosts.iter().filter(|h| h.control).count();
    if !hosts.is_empty() && controls != 1 {
        report.at(
            spans.get("host[0]"),
            format!("{controls} [[host]] entries have control = true; exactly one host is the control host (it runs the chain, the registry and every node not placed elsewhere)"),
        );
    }
    for (i, node) in spec.node_overrides.iter().enumerate() {
        let Some(host) = &node.host else { continue };
        let span = spans.get(&format!("node[{i}].host"));
        if !names.contains(&host.as_str()) {
            let known = if names.is_empty() {
                "none is declared".to_string()
            } else {
                format!("declared: {}", names.join(", "))
            };
            report.at(
                span,
                format!(
                    "[[node]] #{} host = \"{host}\" names no [[host]] ({known})",
                    i + 1
                ),
            );
        } else if !matches!(node.role, NodeRole::Compute | NodeRole::Vision)
            && hosts.iter().any(|h| h.name == *host && !h.control)
        {
            report.at(
                span,
                format!("[[node]] #{} role \"{}\" runs on the control host; only compute and vision nodes join from other hosts", i + 1, node.role.as_str()),
            );
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn mode_name(mode: ChainMode) -> &'static str {
    match mode {
        ChainMode::Anvil => "anvil",
        ChainMode::External => "external",
        ChainMode::None => "none",
    }
}

pub fn output_name(output: MpcOutput) -> &'static str {
    match output {
        MpcOutput::Off => "off",
        MpcOutput::DecodeClientSample => "decode_client_sample",
        MpcOutput::FullOutput2pc => "full_output_2pc",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The schema (known keys, docs) and the typed spec (defaults) must list the same keys.
    #[test]
    fn schema_and_typed_spec_agree() {
        let mut spec = TestnetSpec::default();
        spec.node_overrides.push(NodeOverride {
            role: NodeRole::Compute,
            shard: 0,
            replica: 0,
            name: Some(String::new()),
            port: Some(1),
            stake: Some(TokenAmount::whole(1)),
            eth_key: Some(String::new()),
            cheat: Some(String::new()),
            host: Some(String::new()),
        });
        spec.hosts.push(HostEntry {
            name: String::new(),
            address: String::new(),
            control: true,
            delay_ms: Some(1),
        });
        spec.chaos.push(ChaosEntry {
            target: String::new(),
            action: ChaosAction::Kill,
            at: Some(1.0),
            after_tokens: Some(1),
            duration: Some(1.0),
            delay_ms: Some(1),
            ready_within: Some(1.0),
        });
        spec.chain.rpc_url = Some(String::new());
        spec.chain.operator_key_file = Some(String::new());
        spec.chain.settler_key_file = Some(String::new());
        spec.chain.slasher_key_file = Some(String::new());
        spec.chain.faucet_key_file = Some(String::new());
        spec.chain.client_key_file = Some(String::new());
        spec.chain.port = Some(1);
        spec.model.source = Some(String::new());
        spec.model.path = Some(String::new());
        spec.mpc.layers = Some(1);
        spec.web.port = Some(1);
        let value = toml::Value::try_from(&spec).unwrap();
        for section in schema::SECTIONS {
            let table = match &value[section.name] {
                toml::Value::Array(a) => a[0].as_table().unwrap(),
                v => v.as_table().unwrap(),
            };
            let typed: BTreeSet<&str> = table.keys().map(String::as_str).collect();
            let known: BTreeSet<&str> = section.keys.iter().map(|k| k.name).collect();
            assert_eq!(typed, known, "section [{}]", section.name);
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let loaded = load(None).unwrap();
        assert_eq!(loaded.spec.testnet.name, "tiny");
        assert_eq!(loaded.spec.model.source.as_deref(), Some(BUILTIN_TINY));
    }
}
