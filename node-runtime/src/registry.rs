//! The registry role: admits nodes, tracks liveness by heartbeat, reports model
//! readiness and pool health, and serves the shard manifest to nodes and clients.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use unfed_chain::admission::{AdmissionVerifier, RegistrationPayload};
use unfed_model::Manifest;
use unfed_proto::registry_server::{Registry, RegistryServer};
use unfed_proto::*;

use crate::verify::adjudicate::{Adjudicator, Stage};

/// Nodes silent for this many heartbeat intervals are dropped.
const MISSED_HEARTBEATS: u32 = 3;

/// `--cluster-config` JSON (the original's cluster_config.json); unknown keys are kept
/// for other roles and ignored here.
#[derive(Debug, Default, Deserialize)]
pub struct ClusterConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub chain_rpc_url: Option<String>,
    #[serde(default)]
    pub escrow_contract_address: Option<String>,
    #[serde(default)]
    pub daemon_required_count: Option<u32>,
    #[serde(default)]
    pub require_mpc: Option<bool>,
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read cluster config {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!("{} is not a valid cluster config (JSON object with chain_rpc_url, escrow_contract_address, daemon_required_count, ...)", path.display())
        })
    }
}

pub struct RegistryConfig {
    pub heartbeat: Duration,
    /// Split output directory (or a directory of them) whose manifests are served.
    pub shards_dir: Option<PathBuf>,
    pub require_mpc: bool,
    pub daemon_required_count: u32,
    /// Signed, stake-gated admission; `None` admits every node (no chain).
    pub admission: Option<Arc<AdmissionVerifier>>,
    pub stake_recheck: Duration,
    /// Rules on fraud reports (re-execution, exclusion, slashing).
    pub adjudicator: Arc<Adjudicator>,
    /// The transport: with TLS, every registration must come over mutual TLS with the
    /// certificate it registers.
    pub net: crate::net::Net,
    /// Where exclusions are kept across restarts; `None` keeps them in memory only.
    pub state: Option<Arc<crate::exclusions::ExclusionStore>>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            shards_dir: None,
            require_mpc: false,
            daemon_required_count: 0,
            admission: None,
            stake_recheck: Duration::from_secs(30),
            adjudicator: Arc::new(Adjudicator::new(Stage::Shadow, None)),
            net: crate::net::Net::plaintext(),
            state: None,
        }
    }
}

/// A manifest with the files served beside it.
struct ServedModel {
    /// The split's directory (the registry re-executes disputed hops from it).
    dir: PathBuf,
    manifest: Manifest,
    response: GetManifestResponse,
}

struct NodeRecord {
    info: NodeInfo,
    last_seen: Instant,
    /// False while the stake re-check finds the node below min_stake.
    eligible: bool,
}

struct State {
    nodes: HashMap<String, NodeRecord>,
    /// Nodes found guilty of fraud (soft and enforced stages): never listed again.
    excluded: BTreeSet<String>,
    models: BTreeMap<String, ServedModel>,
}

#[derive(Clone)]
pub struct RegistryService {
    state: Arc<Mutex<State>>,
    config: Arc<RegistryConfig>,
    /// Nonces of signed heartbeats and unregistrations (replays are refused).
    calls: Arc<crate::net::auth::ReplayGuard>,
}

/// Loads `dir/manifest.json`, or the manifests of `dir`'s subdirectories.
fn load_models(dir: &Path) -> Result<BTreeMap<String, ServedModel>> {
    let mut dirs = Vec::new();
    if dir.join(unfed_model::manifest::MANIFEST_FILE).is_file() {
        dirs.push(dir.to_path_buf());
    } else {
        for e in std::fs::read_dir(dir)
            .with_context(|| format!("cannot read shards dir {}", dir.display()))?
        {
            let p = e?.path();
            if p.join(unfed_model::manifest::MANIFEST_FILE).is_file() {
                dirs.push(p);
            }
        }
    }
    if dirs.is_empty() {
        anyhow::bail!(
            "no manifest.json in {} or its subdirectories; point --shards-dir at the output of `unfedctl split`",
            dir.display()
        );
    }
    let mut models = BTreeMap::new();
    for d in dirs {
        let path = d.join(unfed_model::manifest::MANIFEST_FILE);
        let json = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&json)
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        manifest.check_current(&d)?;
        let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
        let response = GetManifestResponse {
            manifest_json: json,
            tokenizer_json: read("tokenizer.json"),
            tokenizer_config_json: read("tokenizer_config.json"),
            generation_config_json: read("generation_config.json"),
            chat_template: read("chat_template.jinja"),
            // Either layout (transformers 4 or 5); the client reads both.
            preprocessor_config_json: crate::client::image::ImageProcessorConfig::file_in(&d)
                .map(|(text, _)| text)
                .unwrap_or_default(),
        };
        models.insert(
            manifest.model_id.clone(),
            ServedModel {
                dir: d.clone(),
                manifest,
                response,
            },
        );
    }
    Ok(models)
}

impl RegistryService {
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let models = match &config.shards_dir {
            Some(d) => load_models(d)?,
            None => BTreeMap::new(),
        };
        let excluded = match &config.state {
            Some(db) => db.excluded()?,
            None => BTreeSet::new(),
        };
        if !excluded.is_empty() {
            tracing::info!(nodes = ?excluded, "excluded for fraud in an earlier run");
        }
        Ok(Self {
            state: Arc::new(Mutex::new(State {
                nodes: HashMap::new(),
                excluded,
                models,
            })),
            config: Arc::new(config),
            calls: Arc::default(),
        })
    }

    /// The caller is the registered node `node_id`: its client certificate is the one
    /// it registered, or `(timestamp, nonce, signature)` is a fresh signature of its
    /// registered share key over `purpose`. `Ok(false)`: no such node is registered.
    fn authorize_node(
        &self,
        peer: &crate::net::Peer,
        node_id: &str,
        (timestamp, nonce, signature): (u64, String, Vec<u8>),
        purpose: &str,
    ) -> Result<bool, Status> {
        let Some(info) = self.state().nodes.get(node_id).map(|n| n.info.clone()) else {
            return Ok(false);
        };
        if crate::net::auth::is_registered_pin(peer, &info.tls_pin) {
            return Ok(true);
        }
        let proof = crate::net::auth::CallProof {
            timestamp,
            nonce,
            signature,
        };
        let key = crate::shares::parse_public_key(&info.share_key).map_err(|_| {
            Status::permission_denied(format!(
                "{purpose} for {}: the caller is not that node (no registered certificate presented, and the node has no share key to sign with)",
                info.node_id
            ))
        })?;
        proof
            .verify(&key, purpose, &info.node_id, &self.calls)
            .map(|()| true)
            .map_err(|s| {
                tracing::warn!(node = %info.node_id, remote = ?peer.remote, "{purpose} refused: {}", s.message());
                Status::permission_denied(format!(
                    "{purpose} for {} refused: the caller is not that node ({})",
                    info.node_id,
                    s.message()
                ))
            })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("registry state poisoned")
    }

    /// Drops nodes that missed their heartbeats.
    fn reap(&self) {
        let limit = self.config.heartbeat * MISSED_HEARTBEATS;
        self.state().nodes.retain(|id, n| {
            let alive = n.last_seen.elapsed() <= limit;
            if !alive {
                tracing::warn!(node = %id, "dropping node: no heartbeat for {} s", limit.as_secs());
            }
            alive
        });
    }

    async fn recheck_stakes(&self) {
        let Some(verifier) = &self.config.admission else {
            return;
        };
        let ids: Vec<String> = self.state().nodes.keys().cloned().collect();
        for id in ids {
            match verifier.is_eligible(&id).await {
                Ok(eligible) => {
                    if let Some(n) = self.state().nodes.get_mut(&id) {
                        if n.eligible != eligible {
                            tracing::warn!(node = %id, eligible, "stake eligibility changed");
                        }
                        n.eligible = eligible;
                    }
                }
                Err(e) => tracing::warn!(node = %id, "stake re-check failed: {e:#}"),
            }
        }
    }

    /// Live, eligible nodes.
    fn visible(state: &State) -> impl Iterator<Item = &NodeInfo> {
        state
            .nodes
            .values()
            .filter(|n| Self::listed(state, n))
            .map(|n| &n.info)
    }

    /// Eligible by stake and not excluded for fraud.
    fn listed(state: &State, n: &NodeRecord) -> bool {
        n.eligible && !state.excluded.contains(&n.info.node_id)
    }

    fn model_status(&self, state: &State, model: &str) -> ModelStatus {
        let nodes: Vec<&NodeInfo> = Self::visible(state).filter(|n| n.model == model).collect();
        let served = state.models.get(model);
        let text_total = match served {
            Some(s) => s.manifest.text_shards().count() as u32,
            None => nodes
                .iter()
                .filter(|n| n.role == "compute")
                .map(|n| n.shards_total)
                .max()
                .unwrap_or(0),
        };
        let covered: BTreeSet<u32> = nodes
            .iter()
            .filter(|n| n.role == "compute" && n.stack == Stack::Text as i32)
            .map(|n| n.shard_index)
            .filter(|&i| i < text_total)
            .collect();
        let mut status = ModelStatus {
            model: model.to_string(),
            nodes: nodes.len() as u32,
            text_shards_covered: covered.len() as u32,
            text_shards_total: text_total,
            state: ModelState::Incomplete as i32,
            reason: String::new(),
            message: String::new(),
        };
        let inconsistent = served.is_none()
            && nodes
                .iter()
                .filter(|n| n.role == "compute")
                .any(|n| n.shards_total != text_total);
        let fail = |reason: &str, message: String| (reason.to_string(), message);
        let verdict = if text_total == 0 || inconsistent {
            Some(fail(
                "invalid_model",
                format!(
                    "model `{model}` has no valid manifest and its nodes disagree on the shard count"
                ),
            ))
        } else if nodes.is_empty() {
            Some(fail("no_nodes", format!("no live node serves `{model}`")))
        } else if (covered.len() as u32) < text_total {
            let missing: Vec<String> = (0..text_total)
                .filter(|i| !covered.contains(i))
                .map(|i| i.to_string())
                .collect();
            Some(fail(
                "incomplete_text_coverage",
                format!(
                    "text shard(s) {} of {text_total} have no live compute node",
                    missing.join(", ")
                ),
            ))
        } else if let Some(missing) = self
            .config
            .require_mpc
            .then(|| missing_mpc_party(&nodes))
            .flatten()
        {
            Some(fail(
                "missing_mpc",
                format!(
                    "MPC is required and {missing} of the pair is not live; start `unfed-node mpc --role B`, then `--role A`"
                ),
            ))
        } else if let Some(s) = served.filter(|s| {
            let vision_total = s.manifest.vision_shards().count();
            let vision_covered: BTreeSet<u32> = nodes
                .iter()
                .filter(|n| n.stack == Stack::Vision as i32)
                .map(|n| n.shard_index)
                .collect();
            vision_covered.len() < vision_total
        }) {
            Some(fail(
                "incomplete_vision_coverage",
                format!(
                    "{} vision shard(s) need live vision nodes",
                    s.manifest.vision_shards().count()
                ),
            ))
        } else {
            let daemons = Self::visible(state).filter(|n| n.role == "daemon").count() as u32;
            (daemons < self.config.daemon_required_count).then(|| {
                fail(
                    "missing_daemon",
                    format!(
                        "{daemons} healthy daemon(s), {} required",
                        self.config.daemon_required_count
                    ),
                )
            })
        };
        match verdict {
            Some((reason, message)) => {
                status.reason = reason;
                status.message = message;
            }
            None => status.state = ModelState::Ready as i32,
        }
        status
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = crate::net::Peer::of(&req);
        let r = req.into_inner();
        let reject = |reason: &str, message: String| {
            tracing::warn!(node = %r.node_id, reason, "registration refused: {message}");
            Ok(Response::new(RegisterResponse {
                accepted: false,
                reason: reason.to_string(),
                message,
                heartbeat_secs: 0,
            }))
        };
        if r.node_id.is_empty() || r.address.is_empty() {
            return reject(
                "missing_fields",
                "node_id and address are required".to_string(),
            );
        }
        if let Err((reason, message)) = check_registered_pin(&peer, &r.tls_pin) {
            return reject(reason, message);
        }
        if let Some(verifier) = &self.config.admission {
            let payload = RegistrationPayload {
                node_id: r.node_id.clone(),
                role: r.role.clone(),
                address: r.address.clone(),
                model: r.model.clone(),
                shard_index: r.shard_index,
                share_key: r.share_key.clone(),
                tls_pin: r.tls_pin.clone(),
                timestamp: r.timestamp,
                nonce: r.nonce.clone(),
            };
            if let Err(rej) = verifier.admit(&payload, &r.signature).await {
                return reject(rej.reason.as_str(), rej.message);
            }
        }
        if r.role == "compute" || r.role == "vision" {
            let state = self.state();
            if let Some(served) = state.models.get(&r.model) {
                let stack = if r.stack == Stack::Vision as i32 {
                    unfed_model::Stack::Vision
                } else {
                    unfed_model::Stack::Text
                };
                let entry = served
                    .manifest
                    .shards
                    .iter()
                    .find(|s| s.stack == stack && s.index as i64 == r.shard_index);
                match entry {
                    None => {
                        drop(state);
                        return reject(
                            "invalid_shard",
                            format!(
                                "model `{}` has no {:?} shard {}",
                                r.model, stack, r.shard_index
                            ),
                        );
                    }
                    Some(e)
                        if (e.layer_start, e.layer_end)
                            != (r.layer_start as usize, r.layer_end as usize) =>
                    {
                        let msg = format!(
                            "shard {} of `{}` covers layers [{}, {}), the node claims [{}, {}); re-split or use the registry's manifest",
                            r.shard_index,
                            r.model,
                            e.layer_start,
                            e.layer_end,
                            r.layer_start,
                            r.layer_end
                        );
                        drop(state);
                        return reject("manifest_mismatch", msg);
                    }
                    Some(_) => {}
                }
            }
        }
        let info = NodeInfo {
            node_id: r.node_id.clone(),
            role: r.role.clone(),
            address: r.address.clone(),
            model: r.model.clone(),
            stack: r.stack,
            shard_index: r.shard_index.max(0) as u32,
            layer_start: r.layer_start,
            layer_end: r.layer_end,
            shards_total: r.shards_total,
            last_seen_ms_ago: 0,
            share_key: r.share_key.clone(),
            tls_pin: r.tls_pin.clone(),
        };
        tracing::info!(node = %r.node_id, role = %r.role, model = %r.model, shard = r.shard_index, address = %r.address, "node registered");
        self.state().nodes.insert(
            r.node_id,
            NodeRecord {
                info,
                last_seen: Instant::now(),
                eligible: true,
            },
        );
        Ok(Response::new(RegisterResponse {
            accepted: true,
            reason: String::new(),
            message: String::new(),
            heartbeat_secs: self.config.heartbeat.as_secs().max(1) as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = crate::net::Peer::of(&req);
        let r = req.into_inner();
        let proof = (r.timestamp, r.nonce, r.signature);
        let known = self.authorize_node(&peer, &r.node_id, proof, HEARTBEAT)?;
        if let Some(n) = self.state().nodes.get_mut(&r.node_id) {
            n.last_seen = Instant::now();
        }
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn unregister(
        &self,
        req: Request<UnregisterRequest>,
    ) -> Result<Response<UnregisterResponse>, Status> {
        let peer = crate::net::Peer::of(&req);
        let r = req.into_inner();
        let proof = (r.timestamp, r.nonce, r.signature);
        let removed = self.authorize_node(&peer, &r.node_id, proof, UNREGISTER)?
            && self.state().nodes.remove(&r.node_id).is_some();
        if removed {
            tracing::info!(node = %r.node_id, "node unregistered");
        }
        Ok(Response::new(UnregisterResponse { removed }))
    }

    async fn discover(
        &self,
        req: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        let model = req.into_inner().model;
        let state = self.state();
        let mut nodes: Vec<NodeInfo> = state
            .nodes
            .values()
            .filter(|n| {
                Self::listed(&state, n)
                    && (model.is_empty() || n.info.model == model || n.info.role == "daemon")
            })
            .map(|n| NodeInfo {
                last_seen_ms_ago: n.last_seen.elapsed().as_millis() as u64,
                ..n.info.clone()
            })
            .collect();
        nodes.sort_by(|a, b| {
            (a.stack, a.shard_index, &a.node_id).cmp(&(b.stack, b.shard_index, &b.node_id))
        });
        Ok(Response::new(DiscoverResponse {
            nodes,
            registry_pin: self
                .config
                .net
                .own_pin()
                .map(|p| p.hex())
                .unwrap_or_default(),
        }))
    }

    async fn report_unresponsive(
        &self,
        req: Request<UnresponsiveReport>,
    ) -> Result<Response<UnresponsiveVerdict>, Status> {
        let peer = crate::net::Peer::of(&req);
        let r = req.into_inner();
        let proof = (r.timestamp, r.nonce, r.signature);
        if !self.authorize_node(&peer, &r.reporter_id, proof, REPORT_UNRESPONSIVE)? {
            return Err(Status::permission_denied(format!(
                "report about {} refused: {} is not a registered node; only registered nodes report failed hops",
                r.node_id, r.reporter_id
            )));
        }
        let target = self.state().nodes.get(&r.node_id).map(|n| n.info.clone());
        let Some(target) = target.filter(|t| t.role == "compute") else {
            return Ok(Response::new(UnresponsiveVerdict { delisted: false }));
        };
        let hop = Hop {
            node_id: target.node_id.clone(),
            address: target.address.clone(),
            shard_index: target.shard_index,
            tls_pin: target.tls_pin.clone(),
        };
        // The report only prompts a probe: what delists is the node not answering us.
        let Err(why) = crate::compute::probe_health(&self.config.net, &hop, PROBE_TIMEOUT).await
        else {
            tracing::info!(node = %r.node_id, reporter = %r.reporter_id, "reported unresponsive, but it answers");
            return Ok(Response::new(UnresponsiveVerdict { delisted: false }));
        };
        let delisted = self.state().nodes.remove(&r.node_id).is_some();
        if delisted {
            tracing::warn!(node = %r.node_id, reporter = %r.reporter_id, "delisted: {why:#} (reported: {})", r.reason);
        }
        Ok(Response::new(UnresponsiveVerdict { delisted }))
    }

    async fn report_fraud(
        &self,
        req: Request<FraudReport>,
    ) -> Result<Response<FraudVerdict>, Status> {
        let r = req.into_inner();
        let accused_id = r
            .accused
            .as_ref()
            .map(|a| a.node_id.clone())
            .unwrap_or_default();
        // One ruling at a time: a cheater reported for several steps at once is judged
        // (and slashed) once, and the operator's transactions do not race.
        let _ruling = self.config.adjudicator.ruling.lock().await;
        let (reporter, accused, dir, excluded) = {
            let st = self.state();
            let info = |id: &str| st.nodes.get(id).map(|n| n.info.clone());
            let dir = r
                .accused
                .as_ref()
                .and_then(|a| st.models.get(&a.model_id))
                .map(|m| m.dir.clone());
            (
                info(&r.reporter),
                info(&accused_id),
                dir,
                st.excluded.contains(&accused_id),
            )
        };
        let adj = &self.config.adjudicator;
        if let Err(v) = adj.admit(&r, reporter.as_ref(), accused.as_ref()) {
            tracing::warn!(reporter = %r.reporter, accused = %accused_id, reason = %v.reason, "fraud report refused: {}", v.message);
            return Ok(Response::new(v));
        }
        if excluded {
            return Ok(Response::new(FraudVerdict {
                accepted: false,
                reason: "excluded".into(),
                guilty: true,
                message: format!("{accused_id} is already excluded"),
            }));
        }
        let Some(dir) = dir else {
            return Ok(Response::new(FraudVerdict {
                accepted: false,
                reason: "unavailable".into(),
                guilty: false,
                message:
                    "the registry has no split of this model to re-execute from (--shards-dir)"
                        .into(),
            }));
        };
        let v = adj
            .rule(
                &self.config.net,
                &r,
                &dir,
                accused.as_ref().expect("admitted"),
            )
            .await;
        if v.guilty && adj.stage != Stage::Shadow {
            tracing::warn!(node = %accused_id, "excluded from discovery after a guilty verdict");
            if let Some(db) = &self.config.state
                && let Err(e) = db.exclude(&accused_id, &v.message, crate::daemon::now_ms())
            {
                // Still excluded for this run; only the restart would forget it.
                tracing::error!(node = %accused_id, "cannot persist the exclusion: {e:#}");
            }
            self.state().excluded.insert(accused_id);
        }
        Ok(Response::new(v))
    }

    async fn list_verdicts(
        &self,
        _: Request<ListVerdictsRequest>,
    ) -> Result<Response<ListVerdictsResponse>, Status> {
        let mut out = self.config.adjudicator.list();
        out.excluded = self.state().excluded.iter().cloned().collect();
        Ok(Response::new(out))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let state = self.state();
        let mut names: BTreeSet<String> = state.models.keys().cloned().collect();
        names.extend(
            Self::visible(&state)
                .filter(|n| !n.model.is_empty())
                .map(|n| n.model.clone()),
        );
        let models = names.iter().map(|m| self.model_status(&state, m)).collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn get_pool_health(
        &self,
        req: Request<GetPoolHealthRequest>,
    ) -> Result<Response<GetPoolHealthResponse>, Status> {
        let model = req.into_inner().model;
        let state = self.state();
        let status = self.model_status(&state, &model);
        let mut shards = Vec::new();
        for i in 0..status.text_shards_total {
            let n = Self::visible(&state)
                .filter(|n| {
                    n.model == model
                        && n.role == "compute"
                        && n.stack == Stack::Text as i32
                        && n.shard_index == i
                })
                .count() as u32;
            let st = match n {
                0 => ShardState::Missing,
                1 | 2 => ShardState::Degraded,
                _ => ShardState::Healthy,
            };
            shards.push(ShardHealth {
                stack: Stack::Text as i32,
                shard_index: i,
                nodes: n,
                state: st as i32,
            });
        }
        Ok(Response::new(GetPoolHealthResponse { shards }))
    }

    async fn get_manifest(
        &self,
        req: Request<GetManifestRequest>,
    ) -> Result<Response<GetManifestResponse>, Status> {
        let model = req.into_inner().model;
        let state = self.state();
        match state.models.get(&model) {
            Some(s) => Ok(Response::new(s.response.clone())),
            None => {
                let known: Vec<&String> = state.models.keys().collect();
                Err(Status::not_found(format!(
                    "the registry serves no manifest for model `{model}` (known: {known:?}); start it with --shards-dir pointing at the split output"
                )))
            }
        }
    }
}

/// Serves the registry on `listener` until `shutdown` completes.
pub async fn run(
    config: RegistryConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let net = config.net.clone();
    let service = RegistryService::new(config)?;
    let reaper = {
        let s = service.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval((s.config.heartbeat / 2).max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                s.reap();
            }
        })
    };
    let rechecker = {
        let s = service.clone();
        tokio::spawn(async move {
            if s.config.admission.is_none() {
                return;
            }
            let mut tick = tokio::time::interval(s.config.stake_recheck);
            loop {
                tick.tick().await;
                s.recheck_stakes().await;
            }
        })
    };
    tracing::info!(address = %listener.local_addr()?, transport = net.describe(), "registry serving");
    let router = net.server().add_service(
        RegistryServer::new(service)
            .max_decoding_message_size(crate::net::limits::REGISTRY)
            .max_encoding_message_size(crate::net::limits::REGISTRY),
    );
    let result = net.serve(router, listener, shutdown).await;
    reaper.abort();
    rechecker.abort();
    result.context("registry gRPC server failed")
}

/// What a heartbeat and an unregistration sign (net::auth::CallProof purposes).
pub const HEARTBEAT: &str = "registry.Heartbeat";
pub const UNREGISTER: &str = "registry.Unregister";
pub const REPORT_UNRESPONSIVE: &str = "registry.ReportUnresponsive";

/// How long a reported node has to answer the registry's health probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// A registration naming a certificate pin must come over mutual TLS with that
/// certificate; over TLS, a registration must name one (nodes are pinned by peers).
fn check_registered_pin(
    peer: &crate::net::Peer,
    tls_pin: &str,
) -> Result<(), (&'static str, String)> {
    let named = crate::net::Pin::parse(tls_pin).map_err(|e| ("bad_tls_pin", format!("{e:#}")))?;
    match (named, peer.pin) {
        (None, _) if peer.tls => Err((
            "no_tls_pin",
            "this registry runs TLS: register with the pin of your certificate (the node does this when started with --tls-cert/--tls-key/--tls-ca)".into(),
        )),
        (None, _) => Ok(()),
        (Some(_), None) => Err((
            "no_client_certificate",
            "the registration names a TLS certificate but the connection presented none: register over mutual TLS".into(),
        )),
        (Some(n), Some(p)) if n != p => Err((
            "tls_pin_mismatch",
            format!(
                "the registration names certificate key {} but the connection presented {}",
                n.short(),
                p.short()
            ),
        )),
        _ => Ok(()),
    }
}

/// Which party of the MPC pair (A then B) has no live node, if one is missing.
fn missing_mpc_party<T: std::ops::Deref<Target = NodeInfo>>(nodes: &[T]) -> Option<&'static str> {
    let has = |role: &str| nodes.iter().any(|n| n.role == role);
    match (has("mpc_a"), has("mpc_b")) {
        (true, true) => None,
        (false, _) => Some("party A"),
        (true, false) => Some("party B"),
    }
}
