//! The compute role: serves one text shard, registers with the registry, and forwards
//! hidden states along the route carried in each request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use unfed_model::{Manifest, ShardEntry};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::compute_server::{Compute, ComputeServer};
use unfed_proto::*;

use crate::engine::batcher::{BatchConfig, Batcher, Job, StepError, StepRows};
use crate::engine::sampling::{Sampler, SamplingConfig};
use crate::engine::{
    Session, SessionError, SessionStore, ShardModel, ShardOutput, ShardSpec, WeightFiles,
};
use crate::mpc::handoff::{Inbox, check_share, reconstruct};
use crate::step_link::StepLink;
use crate::verify::attest;
use crate::verify::cheat::Cheat;
use crate::verify::reexec::{HopOutput, reexecute};
use crate::verify::spot::{Peers, SpotChecker, Suspect, check_incoming};
use crate::wire;

pub struct ComputeConfig {
    pub shards_dir: PathBuf,
    pub shard_index: u32,
    pub node_id: String,
    /// host:port other processes dial.
    pub advertise: String,
    pub registry: Option<String>,
    pub heartbeat: Duration,
    pub hop_timeout: Duration,
    pub session_idle: Duration,
    pub kv_cap_bytes: usize,
    /// EVM stake key: registration is signed with it when set.
    pub stake_key: Option<unfed_chain::PrivateKeySigner>,
    /// Ed25519 key that signs this node's compute shares (registered as `share_key`).
    pub share_key: ed25519_dalek::SigningKey,
    /// Daemon host:port for compute shares; `None`: the daemon the registry lists.
    pub daemon: Option<String>,
    /// Undelivered shares are kept here across daemon outages and restarts.
    pub share_spool: Option<std::path::PathBuf>,
    /// Fraction of the neighbours' hops this node spot-checks (needs a registry).
    pub spot_check: f64,
    /// Test/demo only: how this node cheats.
    pub cheat: Option<Cheat>,
    /// The transport (TLS identity and CA, or plaintext on loopback).
    pub net: crate::net::Net,
    /// Refuse sessions without a spending voucher naming this node.
    pub require_voucher: bool,
    /// How concurrent sessions' steps are batched.
    pub batch: BatchConfig,
    /// Where readiness is reported (--health-port): admitted by the registry, or
    /// serving when there is none.
    pub health: crate::health::Health,
}

/// The loaded shard and its manifest entry.
pub struct LoadedShard {
    pub manifest: Manifest,
    pub entry: ShardEntry,
    pub model: ShardModel,
}

impl AsRef<ShardModel> for LoadedShard {
    fn as_ref(&self) -> &ShardModel {
        &self.model
    }
}

/// Loads text shard `index` of the split in `dir` (only that shard's file).
pub fn load_shard(dir: &Path, index: u32) -> Result<LoadedShard> {
    let manifest =
        Manifest::load_current(dir).context("is --shards-dir the output of `unfedctl split`?")?;
    let total = manifest.text_shards().count();
    let Some(entry) = manifest
        .text_shards()
        .find(|s| s.index == index as usize)
        .cloned()
    else {
        bail!(
            "--shard-index {index} is out of range: {} has {total} text shard(s) (0..{total})",
            dir.join(unfed_model::manifest::MANIFEST_FILE).display()
        );
    };
    let file = dir.join(&entry.file);
    let size = std::fs::metadata(&file)
        .with_context(|| format!("shard file {} is missing", file.display()))?
        .len();
    if size != entry.size {
        bail!(
            "{} is {size} bytes, the manifest says {}; the split is incomplete or corrupt (run `unfedctl verify {}`)",
            file.display(),
            entry.size,
            dir.display()
        );
    }
    let files = WeightFiles::open(&[file])?;
    let spec = ShardSpec {
        layer_start: entry.layer_start,
        layer_end: entry.layer_end,
        has_embedding: entry.has_embedding,
        has_head: entry.has_head,
    };
    let model = ShardModel::load(
        &manifest.config.text,
        &manifest.config.text_prefix,
        spec,
        &files,
    )
    .with_context(|| format!("loading text shard {index} of `{}`", manifest.model_id))?;
    Ok(LoadedShard {
        manifest,
        entry,
        model,
    })
}

#[derive(Clone)]
pub struct ComputeService {
    inner: Arc<Inner>,
}

struct Inner {
    shard: Arc<LoadedShard>,
    /// Runs the steps of concurrent sessions as batches through the shard.
    batcher: Batcher,
    node_id: String,
    sessions: SessionStore,
    hop_timeout: Duration,
    /// Next-hop channels by (address, pin).
    channels: Mutex<HashMap<(String, String), Channel>>,
    net: crate::net::Net,
    forwards: std::sync::atomic::AtomicU64,
    /// One signed compute share per served hop, submitted in the background.
    shares: Option<crate::shares::ShareSink>,
    /// Signs this node's forward attestations (the registered share key).
    key: ed25519_dalek::SigningKey,
    cheat: Option<Cheat>,
    /// Registered nodes (attestation keys); `None` when serving unregistered.
    peers: Option<Arc<Peers>>,
    /// The registry's address: a next hop that fails a forward is reported there.
    registry: Option<String>,
    checker: Option<Arc<SpotChecker>>,
    inputs: InputLog,
    /// Output shares of MPC pairs, waiting for the client's Forward that names them.
    handoffs: Inbox,
    /// The spending voucher of each paid session.
    vouchers: crate::voucher::Book,
    /// Set when the node shuts down: open step streams end (the server's graceful
    /// shutdown waits for every open stream).
    closing: tokio::sync::watch::Sender<bool>,
}

/// Each session's inputs and sampling, kept so that a spot checker can have a hop
/// re-executed; bounded like the KV caches they accompany. An ended session's inputs
/// stay for `ENDED_GRACE`: the checks of its last steps run after the client is done.
#[derive(Default)]
struct InputLog {
    sessions: Mutex<(
        std::collections::VecDeque<String>,
        HashMap<String, LoggedSession>,
    )>,
}

/// A session's sampling parameters, its inputs step by step, and when it ended.
#[derive(Default)]
struct LoggedSession {
    sampling: Option<SamplingParams>,
    inputs: Vec<StepInput>,
    ended: Option<Instant>,
}

/// Sessions whose inputs are kept (the oldest are forgotten first).
const INPUT_LOG_SESSIONS: usize = 1024;
/// How long an ended session's inputs wait for the spot checks of its last steps.
const ENDED_GRACE: Duration = Duration::from_secs(30);

impl InputLog {
    fn record(&self, session: &str, step: u32, input: StepInput, sampling: Option<SamplingParams>) {
        let mut g = self.sessions.lock().expect("input log poisoned");
        let (order, map) = &mut *g;
        if step == 0 {
            // Sessions grow the log only here, so ended ones are swept only here.
            map.retain(|_, s| s.ended.is_none_or(|t| t.elapsed() < ENDED_GRACE));
            order.retain(|s| map.contains_key(s));
        }
        if !map.contains_key(session) {
            if order.len() >= INPUT_LOG_SESSIONS
                && let Some(old) = order.pop_front()
            {
                map.remove(&old);
            }
            order.push_back(session.to_string());
        }
        let entry = map.entry(session.to_string()).or_default();
        if step == 0 {
            *entry = LoggedSession {
                sampling,
                ..Default::default()
            };
        }
        if entry.inputs.len() == step as usize {
            entry.inputs.push(input);
        }
    }

    fn get(&self, session: &str, up_to: u32) -> Option<(Option<SamplingParams>, Vec<StepInput>)> {
        let g = self.sessions.lock().expect("input log poisoned");
        let s = g.1.get(session)?;
        let n = up_to as usize + 1;
        (s.inputs.len() >= n).then(|| (s.sampling, s.inputs[..n].to_vec()))
    }

    /// The session ended: its inputs go after the grace period.
    fn end(&self, session: &str) {
        let mut g = self.sessions.lock().expect("input log poisoned");
        if let Some(s) = g.1.get_mut(session) {
            s.ended = Some(Instant::now());
        }
    }
}

pub fn sampling_of(p: Option<&SamplingParams>) -> SamplingConfig {
    let p = p.cloned().unwrap_or_default();
    SamplingConfig {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p <= 0.0 { 1.0 } else { p.top_p },
        repetition_penalty: if p.repetition_penalty <= 0.0 {
            1.0
        } else {
            p.repetition_penalty
        },
        seed: p.seed,
        // Bounded: each costs the node one draw before the session's first step.
        sampled_before: p.sampled_before.min(MAX_SAMPLED_BEFORE),
    }
}

/// Why `p` is not a valid request, naming each field as `name` spells it (the API's
/// field or the CLI's flag); `None` when every value is in its range.
pub fn sampling_out_of_range(p: &SamplingParams, name: impl Fn(&str) -> String) -> Option<String> {
    let (t, top_p, r) = (p.temperature, p.top_p, p.repetition_penalty);
    if !(t.is_finite() && (0.0..=10.0).contains(&t)) {
        return Some(format!(
            "{} {t} is out of range; use 0 (greedy) to 10",
            name("temperature")
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Some(format!(
            "{} {top_p} is out of range; use (0, 1]",
            name("top_p")
        ));
    }
    if !(r.is_finite() && r > 0.0) {
        return Some(format!(
            "{} {r} must be positive (1 = off)",
            name("repetition_penalty")
        ));
    }
    None
}

/// More tokens than any context holds; a larger `sampled_before` is clamped to it.
const MAX_SAMPLED_BEFORE: u32 = 1 << 20;

impl ComputeService {
    pub fn new(shard: LoadedShard, cfg: &ComputeConfig) -> Self {
        let shares = share_sink(cfg, &shard);
        let peers = cfg.registry.clone().map(|r| {
            Arc::new(Peers::new(
                cfg.net.clone(),
                r,
                shard.manifest.model_id.clone(),
            ))
        });
        let checker = match &peers {
            Some(p) if cfg.spot_check > 0.0 => Some(Arc::new(SpotChecker::new(
                cfg.spot_check,
                cfg.node_id.clone(),
                cfg.share_key.clone(),
                p.clone(),
            ))),
            _ => None,
        };
        let shard = Arc::new(shard);
        Self {
            inner: Arc::new(Inner {
                batcher: Batcher::start(
                    shard.clone(),
                    BatchConfig {
                        // Routes start at shard 0: there the sessions' groups merge.
                        align: shard.entry.index == 0,
                        ..cfg.batch
                    },
                ),
                shard,
                node_id: cfg.node_id.clone(),
                sessions: SessionStore::new(cfg.session_idle, cfg.kv_cap_bytes),
                hop_timeout: cfg.hop_timeout,
                channels: Mutex::new(HashMap::new()),
                net: cfg.net.clone(),
                forwards: std::sync::atomic::AtomicU64::new(0),
                shares,
                key: cfg.share_key.clone(),
                cheat: cfg.cheat,
                peers,
                registry: cfg.registry.clone(),
                checker,
                inputs: InputLog::default(),
                handoffs: Inbox::new(cfg.hop_timeout * 2),
                vouchers: crate::voucher::Book::new(&cfg.node_id, cfg.require_voucher),
                closing: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// The voucher a step runs under: checked at step 0 (before any compute), looked up
    /// and held to its output cap after.
    fn billing(
        &self,
        req: &ForwardRequest,
        rows: u32,
    ) -> Result<Option<Arc<crate::voucher::Billing>>, Status> {
        let book = &self.inner.vouchers;
        let held = if req.step == 0 {
            book.start(
                &req.session_id,
                req.voucher.as_ref(),
                &req.billing_salt,
                rows,
            )
        } else {
            book.step(&req.session_id, req.step)
        };
        held.map_err(|e| {
            Status::permission_denied(format!(
                "node {} (shard {}): {e:#}",
                self.inner.node_id,
                self.shard_index()
            ))
        })
    }

    /// Refuses a request for another model.
    fn check_model(&self, model: &str) -> Result<(), Status> {
        let ours = &self.inner.shard.manifest.model_id;
        if model != ours {
            return Err(Status::not_found(format!(
                "node {} serves `{ours}`, not `{model}`",
                self.inner.node_id
            )));
        }
        Ok(())
    }

    fn shard_index(&self) -> u32 {
        self.inner.shard.entry.index as u32
    }

    /// The channel to a next hop, pinned to the certificate it registered.
    fn channel(&self, hop: &Hop) -> Result<Channel, Status> {
        let key = (hop.address.clone(), hop.tls_pin.clone());
        let mut map = self.inner.channels.lock().expect("channel map poisoned");
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let pin = crate::net::Pin::parse(&hop.tls_pin)
            .map_err(|e| Status::invalid_argument(format!("next hop {}: {e:#}", hop.node_id)))?;
        if pin.is_none() && self.inner.net.is_tls() {
            return Err(Status::invalid_argument(format!(
                "next hop {} has no certificate pin in the route; take the route from the registry",
                hop.node_id
            )));
        }
        let c = self
            .inner
            .net
            .channel_with(&hop.address, self.inner.hop_timeout, pin)
            .map_err(|e| Status::invalid_argument(format!("next hop {}: {e:#}", hop.node_id)))?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// SessionInputs and Reexecute: only a registered compute node of a neighbouring
    /// shard (the spot checker) or the registry (adjudicating) may call. The caller is
    /// known by its client certificate; a plaintext node (loopback, TLS opted out) has
    /// no way to tell and serves anyone on this machine.
    async fn authorize_checker(&self, peer: &crate::net::Peer, what: &str) -> Result<(), Status> {
        if !self.inner.net.is_tls() {
            return Ok(());
        }
        let refuse = |why: String| {
            tracing::warn!(remote = ?peer.remote, "{what} refused: {why}");
            Status::permission_denied(format!(
                "node {}: {what} refused: {why}",
                self.inner.node_id
            ))
        };
        let pin = crate::net::auth::caller_pin(peer, what)?;
        let Some(peers) = &self.inner.peers else {
            return Err(refuse(
                "this node is not registered, so it cannot tell a checker from a stranger".into(),
            ));
        };
        let mine = self.shard_index();
        match peers.caller(pin).await {
            Some(crate::verify::spot::Caller::Registry) => Ok(()),
            Some(crate::verify::spot::Caller::Node(n))
                if n.role == "compute"
                    && n.stack == Stack::Text as i32
                    && n.shard_index.abs_diff(mine) == 1 =>
            {
                Ok(())
            }
            Some(crate::verify::spot::Caller::Node(n)) => Err(refuse(format!(
                "{} ({} of shard {}) is not a compute node of a neighbouring shard of {mine}",
                n.node_id, n.role, n.shard_index
            ))),
            None => Err(refuse(format!(
                "certificate {} belongs to no registered node of `{}` nor to the registry",
                pin.short(),
                self.inner.shard.manifest.model_id
            ))),
        }
    }

    /// PutShare: the share must be signed by a registered MPC party of this model in the
    /// role it claims, checked as it arrives (not when claimed), and, over TLS, sent by
    /// that party's own certificate.
    async fn authorize_share(
        &self,
        caller: &crate::net::Peer,
        req: &PutShareRequest,
    ) -> Result<(), Status> {
        let refuse = |why: String| {
            tracing::warn!(remote = ?caller.remote, "PutShare refused: {why}");
            Status::permission_denied(format!(
                "node {}: PutShare refused: {why}",
                self.inner.node_id
            ))
        };
        let Some(peers) = &self.inner.peers else {
            return Err(refuse(
                "this node is not registered (no --registry), so it cannot check the parties' signatures".into(),
            ));
        };
        let info = crate::mpc::handoff::check_share_signer(peers, req)
            .await
            .map_err(|e| refuse(format!("{e:#}")))?;
        if self.inner.net.is_tls() && !crate::net::auth::is_registered_pin(caller, &info.tls_pin) {
            return Err(refuse(format!(
                "the share is signed by {} but sent by another certificate",
                info.node_id
            )));
        }
        Ok(())
    }

    /// Tells the registry, in the background, that `hop` failed a forward (it probes
    /// the node and delists it if it does not answer).
    fn report_unresponsive(&self, hop: &Hop, why: &str) {
        let Some(registry) = self.inner.registry.clone() else {
            return;
        };
        let (inner, node, why) = (self.inner.clone(), hop.node_id.clone(), why.to_string());
        tokio::spawn(async move {
            let me = (inner.node_id.as_str(), &inner.key);
            crate::membership::report_unresponsive(&inner.net, &registry, me, &node, &why).await;
        });
    }

    /// On a private route (fed by an MPC pair, or the client samples) the client keeps
    /// the penalty's tokens and the seed: a request that sends them is refused.
    fn check_private_sampling(&self, req: &ForwardRequest) -> Result<(), Status> {
        let route = if !req.client_key.is_empty() {
            "decode_client_sample (the client samples)"
        } else if matches!(req.input, Some(forward_request::Input::Mpc(_))) {
            "a route through an MPC pair"
        } else {
            return Ok(());
        };
        let seed = req.sampling.is_some_and(|p| p.seed != 0) && !req.client_key.is_empty();
        if req.penalty_tokens.is_empty() && !seed {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "node {} (shard {}): on {route} the client applies the repetition penalty and keeps the seed, \
             but this request sends {}; use decode_client_sample so the client samples",
            self.inner.node_id,
            self.shard_index(),
            if seed { "the seed" } else { "penalty_tokens" }
        )))
    }

    fn refuse_hop(&self, why: String) -> Status {
        Status::permission_denied(format!(
            "node {} (shard {}): {why}",
            self.inner.node_id,
            self.shard_index()
        ))
    }

    /// This node's signed statement of the step it just computed.
    fn attest(
        &self,
        (session, step): (&str, u32),
        input: &StepInput,
        output: &[u8],
        shape: &[u64],
        dtype: DType,
    ) -> Attestation {
        let mut a = Attestation {
            node_id: self.inner.node_id.clone(),
            model_id: self.inner.shard.manifest.model_id.clone(),
            shard_index: self.shard_index(),
            session_id: session.to_string(),
            step,
            input_digest: attest::input_digest(input),
            output_digest: attest::digest(output),
            output_shape: shape.to_vec(),
            output_dtype: dtype as i32,
            signature: Vec::new(),
        };
        if self.inner.cheat == Some(Cheat::ForgeAttestation) {
            attest::sign(&crate::shares::generate_key(), &mut a);
        } else {
            attest::sign(&self.inner.key, &mut a);
        }
        a
    }

    /// Reports `a` when it fails its signature check under the signer's registered
    /// key (other mismatches are refused but prove nothing to a third party).
    fn suspect_forgery(&self, a: &Attestation) {
        let (Some(peers), Some(checker)) = (self.inner.peers.clone(), self.inner.checker.clone())
        else {
            return;
        };
        let a = a.clone();
        tokio::spawn(async move {
            if let Ok(key) = peers.key(&a.node_id).await
                && attest::verify(&key, &a).is_err()
                && peers.verify(&a).await.is_err()
            {
                checker.report_forgery(a);
            }
        });
    }

    fn cheat(&self, cheat: Cheat, out: LocalOut, req: &ForwardRequest) -> LocalOut {
        let out = match out {
            Sampled(t, lp) => ShardOutput::Logits(vec![t as f32, lp]),
            HiddenOut(data, seq) => ShardOutput::Hidden { data, seq },
            sealed @ SealedOut(_) => return sealed,
        };
        let hidden = match &req.input {
            Some(forward_request::Input::Hidden(h)) => wire::decode(h).ok().map(|d| d.0),
            _ => None,
        };
        let tokens = match &req.input {
            Some(forward_request::Input::Tokens(t)) => Some(t.ids.as_slice()),
            _ => None,
        };
        match cheat.corrupt(&self.inner.shard.model, out, hidden.as_deref(), tokens) {
            ShardOutput::Logits(v) => Sampled(v[0] as u32, v[1]),
            ShardOutput::Hidden { data, seq } => HiddenOut(data, seq),
        }
    }

    /// The last hop's token comes back through this node: its attestation must cover
    /// the hidden state this node sent and the token returned; sampled ones are
    /// spot-checked.
    async fn check_last_hop(
        &self,
        next: &Hop,
        resp: &ForwardResponse,
        session: &str,
        step: u32,
        sent_digest: &[u8],
        sampling: Option<SamplingParams>,
    ) -> Result<(), Status> {
        let Some(peers) = &self.inner.peers else {
            return Ok(());
        };
        let bad = |why: String| {
            self.refuse_hop(format!(
                "the last hop {} (shard {}) returned {why}",
                next.node_id, next.shard_index
            ))
        };
        let a = resp
            .last_attestation
            .clone()
            .ok_or_else(|| bad("no attestation".into()))?;
        if a.node_id != next.node_id || a.session_id != session || a.step != step {
            return Err(bad(format!(
                "an attestation for another hop ({} step {})",
                a.node_id, a.step
            )));
        }
        if let Err(e) = peers.verify(&a).await {
            self.suspect_forgery(&a);
            return Err(bad(format!("an invalid attestation: {e:#}")));
        }
        let output = if resp.sealed_logits.is_empty() {
            resp.token_id.to_le_bytes().to_vec()
        } else {
            resp.sealed_logits.clone()
        };
        if a.input_digest != sent_digest || a.output_digest != attest::digest(&output) {
            return Err(bad("an attestation of another input or token".into()));
        }
        // Sealed logits cannot be re-derived by a checker (fresh encryption each time).
        if let Some(c) = &self.inner.checker
            && resp.sealed_logits.is_empty()
            && let Some(attestations) = c.observe(&a)
        {
            c.spawn(Suspect {
                attestations,
                output: HopOutput::Token(resp.token_id),
                sampling,
                dtype: DType::DtypeF32,
            });
        }
        Ok(())
    }

    /// The MPC pair's output for this step, reconstructed from the shares its parties
    /// handed over, as the hidden state entering layer `m.layer`, and the parties'
    /// share attestations (all this node keeps of it).
    async fn mpc_input(
        &self,
        req: &ForwardRequest,
        m: &MpcInput,
    ) -> Result<(Tensor, Vec<Attestation>), Status> {
        let e = &self.inner.shard.entry;
        let fail = |why: String| {
            format!(
                "node {} (shard {}): {why}",
                self.inner.node_id,
                self.shard_index()
            )
        };
        let layer = m.layer as usize;
        if !(e.layer_start..=e.layer_end).contains(&layer) || layer == 0 {
            return Err(Status::invalid_argument(fail(format!(
                "the MPC pair's output enters at layer {layer}, outside this shard's layers [{}, {}); send it to the shard that holds that layer",
                e.layer_start, e.layer_end
            ))));
        }
        let (a, b) = self
            .inner
            .handoffs
            .take(&req.session_id, req.step, self.inner.hop_timeout)
            .await
            .map_err(|e| Status::unavailable(fail(format!("{e:#}"))))?;
        if let Some(peers) = &self.inner.peers {
            for (share, node, role) in [(&a, &m.party_a, "mpc_a"), (&b, &m.party_b, "mpc_b")] {
                check_share(peers, share, node, role, m.layer)
                    .await
                    .map_err(|e| self.refuse_hop(format!("rejected the MPC share: {e:#}")))?;
            }
        }
        let rows =
            reconstruct(&a, &b, m).map_err(|e| Status::invalid_argument(fail(format!("{e:#}"))))?;
        let h = self.inner.shard.model.config().hidden_size;
        let shares = [a, b].into_iter().filter_map(|s| s.attestation).collect();
        Ok((
            wire::encode(&rows, &[1, m.rows as usize, h], DType::DtypeF32),
            shares,
        ))
    }

    /// Runs this shard's layers for one step; a hidden input enters at `from_layer`
    /// when given (the output of an MPC pair), else at the shard's first layer.
    async fn run_local(
        &self,
        req: &ForwardRequest,
        from_layer: Option<u32>,
    ) -> Result<LocalOut, Status> {
        let spec = self.inner.shard.model.spec();
        let input = match &req.input {
            Some(forward_request::Input::Tokens(t)) if spec.has_embedding => {
                match &req.image_features {
                    Some(f) => StepRows::Embedded(
                        crate::vision::merge::image_prompt_rows(
                            &self.inner.shard.model,
                            &self.inner.shard.manifest.config,
                            &t.ids,
                            f,
                        )
                        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?,
                        t.ids.len(),
                    ),
                    None => StepRows::Tokens(t.ids.clone()),
                }
            }
            Some(forward_request::Input::Hidden(t))
                if !spec.has_embedding || from_layer.is_some() =>
            {
                let (data, shape) =
                    wire::decode(t).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
                let h = self.inner.shard.model.config().hidden_size;
                match shape[..] {
                    [1, seq, hh] | [seq, hh] if hh == h => {
                        StepRows::Hidden(data, seq, from_layer.map(|l| l as usize))
                    }
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "hidden state shape {shape:?} is not [1, seq, {h}]"
                        )));
                    }
                }
            }
            Some(_) => {
                return Err(Status::invalid_argument(format!(
                    "shard {} expects {}",
                    self.shard_index(),
                    if spec.has_embedding {
                        "token ids"
                    } else {
                        "a hidden state"
                    }
                )));
            }
            None => return Err(Status::invalid_argument("forward request carries no input")),
        };
        let inner = self.inner.clone();
        let sampling = sampling_of(req.sampling.as_ref());
        let need = input_rows(req) as usize * inner.shard.model.kv_bytes_per_position();
        let session = inner
            .sessions
            .open(&req.session_id, req.step, &req.owner_key, need, || {
                Session {
                    cache: inner.shard.model.new_cache(),
                    sampler: Some(Sampler::new(sampling)),
                }
            })
            .map_err(|e| {
                let why = format!("node {} (shard {}): {e}", inner.node_id, self.shard_index());
                // Busy is worth retrying here later or on another replica; the rest is not.
                match e {
                    SessionError::Busy { .. } => Status::resource_exhausted(why),
                    _ => Status::failed_precondition(why),
                }
            })?;
        let (sid, position, penalty) = (
            req.session_id.clone(),
            req.position as usize,
            req.penalty_tokens.clone(),
        );
        // decode_client_sample: the client samples from the logits sealed to its key.
        let seal_to = (!req.client_key.is_empty()).then(|| {
            (
                req.client_key.clone(),
                crate::seal::logits_context(&req.model_id, &req.session_id, req.step),
            )
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        let who = format!("node {} (shard {})", inner.node_id, inner.shard.entry.index);
        let finish = move |s: &mut Session, out: Result<ShardOutput, StepError>| {
            let out = match out {
                Ok(out) => out,
                Err(StepError::Misplaced(why)) => {
                    let _ = reply.send(Err(Status::failed_precondition(why)));
                    return;
                }
                Err(StepError::Failed(e)) => {
                    let _ = reply.send(Err(Status::invalid_argument(format!("{who}: {e:#}"))));
                    return;
                }
            };
            if let Some(sampler) = s.sampler.as_mut() {
                sampler.observe(&penalty);
            }
            let bytes = s.cache.nbytes();
            let out = match (out, seal_to) {
                (ShardOutput::Logits(logits), Some((key, context))) => {
                    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
                    crate::seal::seal(&key, &context, &bytes)
                        .map(SealedOut)
                        .map_err(|e| Status::invalid_argument(format!("{e:#}")))
                }
                (ShardOutput::Logits(logits), None) => {
                    let sampled = s
                        .sampler
                        .as_mut()
                        .expect("sampler created at step 0")
                        .sample(logits);
                    Ok(Sampled(sampled.token, sampled.logprob))
                }
                (ShardOutput::Hidden { data, seq }, _) => Ok(HiddenOut(data, seq)),
            };
            inner.sessions.account(&sid, bytes);
            let _ = reply.send(out);
        };
        self.inner.batcher.submit(Job {
            session_id: req.session_id.clone(),
            session,
            position,
            rows: input,
            finish: Box::new(finish),
        });
        answer
            .await
            .map_err(|_| Status::internal("the shard worker dropped the step"))?
    }

    /// Runs a session's steps as they arrive on `inbound`, in order, answering each on
    /// the returned stream, and passes them down the route on a stream of its own. Ends
    /// when the caller closes its side, at a failed step (with its status), after the
    /// session's idle time without a step (an abandoned stream holds nothing for long),
    /// or when the node shuts down.
    fn serve_steps(
        &self,
        mut inbound: Streaming<ForwardRequest>,
    ) -> UnboundedReceiverStream<Result<ForwardResponse, Status>> {
        let (answers, out) = tokio::sync::mpsc::unbounded_channel();
        let (this, mut closing) = (self.clone(), self.inner.closing.subscribe());
        // A stream idle as long as its session would be is closed with it.
        let idle = self.inner.sessions.idle();
        tokio::spawn(async move {
            let mut next = StepLink::stream();
            loop {
                let req = tokio::select! {
                    m = tokio::time::timeout(idle, inbound.message()) => match m {
                        Ok(m) => m,
                        Err(_) => {
                            let _ = answers.send(Err(Status::deadline_exceeded(format!(
                                "no step for {} s: the session's step stream is closed",
                                idle.as_secs()
                            ))));
                            return;
                        }
                    },
                    _ = closing.wait_for(|c| *c) => {
                        let _ = answers.send(Err(Status::unavailable(format!(
                            "node {} (shard {}) is shutting down",
                            this.inner.node_id,
                            this.shard_index()
                        ))));
                        return;
                    }
                };
                // The caller closed the stream or went away.
                let Ok(Some(req)) = req else { return };
                let answer = this.step(req, &mut next).await;
                let failed = answer.is_err();
                if answers.send(answer).is_err() || failed {
                    return;
                }
            }
        });
        UnboundedReceiverStream::new(out)
    }

    /// Runs one step of a session here and, but at the last shard, down the rest of
    /// the route through `link`.
    async fn step(
        &self,
        mut req: ForwardRequest,
        link: &mut StepLink,
    ) -> Result<ForwardResponse, Status> {
        let started = Instant::now();
        self.check_model(&req.model_id)?;
        let model_id = &self.inner.shard.manifest.model_id;
        // Fed by an MPC pair: both parties' signed shares replace the previous hop's
        // attested hidden state.
        self.check_private_sampling(&req)?;
        let mut from_layer = None;
        let mut handoff = None;
        if let Some(forward_request::Input::Mpc(m)) = &req.input {
            let m = m.clone();
            let (hidden, shares) = self.mpc_input(&req, &m).await?;
            req.input = Some(forward_request::Input::Hidden(hidden));
            from_layer = Some(m.layer);
            handoff = Some(attest::handoff_input(shares, m.layer, &req.penalty_tokens));
        }
        let rows = input_rows(&req);
        let billing = self.billing(&req, rows)?;
        // What is logged and attested: a hand-off's rebuilt activations are the prompt,
        // so they are known by the parties' share digests only.
        let step_input =
            handoff.unwrap_or_else(|| attest::step_input_of(&req.input, &req.penalty_tokens));
        // The previous hop must have attested exactly the hidden state we received.
        let prev = match (&req.input, &self.inner.peers) {
            (Some(forward_request::Input::Hidden(h)), Some(peers)) if from_layer.is_none() => {
                let a = req.attestations.last().cloned().ok_or_else(|| {
                    self.refuse_hop("the previous hop sent no attestation".into())
                })?;
                check_incoming(
                    peers,
                    &a,
                    model_id,
                    self.shard_index(),
                    &req.session_id,
                    req.step,
                    &h.data,
                )
                .await
                .map_err(|e| {
                    self.suspect_forgery(&a);
                    self.refuse_hop(format!("rejected the hop from {}: {e:#}", a.node_id))
                })?;
                Some((a, h.clone()))
            }
            _ => None,
        };
        self.inner
            .inputs
            .record(&req.session_id, req.step, step_input.clone(), req.sampling);
        let mut out = self.run_local(&req, from_layer).await?;
        if let Some(cheat) = self.inner.cheat {
            out = self.cheat(cheat, out, &req);
        }
        self.inner
            .forwards
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let (Some((a, h)), Some(c)) = (&prev, &self.inner.checker)
            && let Some(attestations) = c.observe(a)
        {
            c.spawn(Suspect {
                attestations,
                output: HopOutput::Hidden(h.clone()),
                sampling: req.sampling,
                dtype: DType::try_from(h.dtype).unwrap_or(DType::DtypeF32),
            });
        }
        let hop = (req.session_id.clone(), req.step);
        let record = |activation: &[u8]| {
            if let (Some(sink), Some(billing)) = (&self.inner.shares, &billing) {
                sink.record(crate::shares::Hop {
                    session_id: hop.0.clone(),
                    step: hop.1,
                    // The prompt is the input; every step yields one output token.
                    input_tokens: if hop.1 == 0 { rows } else { 0 },
                    output_tokens: 1,
                    activation_hash: crate::voucher::commit(&billing.salt, activation),
                    billing: billing.clone(),
                });
            }
        };
        let compute_ms = started.elapsed().as_secs_f64() * 1e3;
        let me = |total_ms: f64| HopTiming {
            node_id: self.inner.node_id.clone(),
            shard_index: self.shard_index(),
            compute_ms,
            total_ms,
        };
        match out {
            SealedOut(sealed) => {
                record(&sealed);
                let att = self.attest(
                    (&req.session_id, req.step),
                    &step_input,
                    &sealed,
                    &[],
                    DType::DtypeF32,
                );
                Ok(ForwardResponse {
                    timings: vec![me(started.elapsed().as_secs_f64() * 1e3)],
                    last_attestation: Some(att),
                    sealed_logits: sealed,
                    ..Default::default()
                })
            }
            Sampled(token, logprob) => {
                record(&token.to_le_bytes());
                let is_eos = self
                    .inner
                    .shard
                    .model
                    .config()
                    .eos_token_ids
                    .contains(&token);
                let att = self.attest(
                    (&req.session_id, req.step),
                    &step_input,
                    &token.to_le_bytes(),
                    &[],
                    DType::DtypeF32,
                );
                Ok(ForwardResponse {
                    token_id: token,
                    logprob,
                    is_eos,
                    timings: vec![me(started.elapsed().as_secs_f64() * 1e3)],
                    last_attestation: Some(att),
                    sealed_logits: Vec::new(),
                })
            }
            HiddenOut(data, seq) => {
                if req.route.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "node {} (shard {}) is not the last shard but the request's route is empty",
                        self.inner.node_id,
                        self.shard_index()
                    )));
                }
                let next = req.route.remove(0);
                let next_is_last = req.route.is_empty();
                // Consumed here: later shards see only hidden states.
                req.image_features = None;
                let h = self.inner.shard.model.config().hidden_size;
                let dtype = DType::try_from(req.hidden_dtype).unwrap_or(DType::DtypeF32);
                let hidden = wire::encode(&data, &[1, seq, h], dtype);
                record(&hidden.data);
                let att = self.attest(
                    (&req.session_id, req.step),
                    &step_input,
                    &hidden.data,
                    &hidden.shape,
                    dtype,
                );
                let sent_digest = att.output_digest.clone();
                req.attestations = vec![att];
                req.input = Some(forward_request::Input::Hidden(hidden));
                let sampling = req.sampling;
                let (session, step) = (req.session_id.clone(), req.step);
                let client = || Ok(ComputeClient::new(self.channel(&next)?));
                let timeout = self.inner.hop_timeout;
                let mut resp = match link.step(&next, client, req, timeout).await {
                    Ok(r) => r,
                    // A failure reported by a node further down already names that node.
                    Err(s)
                        if s.code() != tonic::Code::Unavailable
                            && s.code() != tonic::Code::Cancelled
                            && s.code() != tonic::Code::DeadlineExceeded
                            && s.code() != tonic::Code::Unknown =>
                    {
                        return Err(s);
                    }
                    Err(s) if s.message().starts_with("node ") => return Err(s),
                    Err(s) => {
                        self.report_unresponsive(&next, s.message());
                        return Err(Status::unavailable(format!(
                            "node {} (shard {}) at {} is unreachable: {}",
                            next.node_id,
                            next.shard_index,
                            next.address,
                            s.message()
                        )));
                    }
                };
                if next_is_last {
                    self.check_last_hop(&next, &resp, &session, step, &sent_digest, sampling)
                        .await?;
                }
                resp.timings
                    .insert(0, me(started.elapsed().as_secs_f64() * 1e3));
                Ok(resp)
            }
        }
    }
}

/// What this node's step produced.
enum LocalOut {
    /// Last shard: the sampled token and its logprob.
    Sampled(u32, f32),
    HiddenOut(Vec<f32>, usize),
    /// Last shard, decode_client_sample: the logits sealed to the client.
    SealedOut(Vec<u8>),
}
use LocalOut::*;

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        self.step(req.into_inner(), &mut StepLink::Unary)
            .await
            .map(Response::new)
    }

    type StepsStream = UnboundedReceiverStream<Result<ForwardResponse, Status>>;

    async fn steps(
        &self,
        req: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        Ok(Response::new(self.serve_steps(req.into_inner())))
    }

    async fn end_session(
        &self,
        req: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        let mut req = req.into_inner();
        let Some(owner) = self.inner.sessions.owner(&req.session_id) else {
            // Not live here (ended, expired, never opened): nothing to end or forward.
            return Ok(Response::new(EndSessionResponse {}));
        };
        verify_end_session(&owner, &req.session_id, &req.owner_signature).map_err(|why| {
            Status::permission_denied(format!(
                "node {}: EndSession of session {} refused: {why}",
                self.inner.node_id, req.session_id
            ))
        })?;
        self.inner.sessions.end(&req.session_id);
        self.inner.inputs.end(&req.session_id);
        self.inner.vouchers.end(&req.session_id);
        if let Some(c) = &self.inner.checker {
            c.forget(&req.session_id);
        }
        if !req.route.is_empty() {
            let next = req.route.remove(0);
            if let Ok(c) = self.channel(&next) {
                // Best effort: a missing downstream session expires on its own.
                let _ = ComputeClient::new(c).end_session(req).await;
            }
        }
        Ok(Response::new(EndSessionResponse {}))
    }

    async fn session_inputs(
        &self,
        req: Request<SessionInputsRequest>,
    ) -> Result<Response<SessionInputsResponse>, Status> {
        self.authorize_checker(&crate::net::Peer::of(&req), "SessionInputs")
            .await?;
        let req = req.into_inner();
        let (sampling, inputs) = self
            .inner
            .inputs
            .get(&req.session_id, req.up_to_step)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "node {}: no inputs of session {} up to step {}",
                    self.inner.node_id, req.session_id, req.up_to_step
                ))
            })?;
        Ok(Response::new(SessionInputsResponse { inputs, sampling }))
    }

    async fn reexecute(
        &self,
        req: Request<ReexecuteRequest>,
    ) -> Result<Response<ReexecuteResponse>, Status> {
        self.authorize_checker(&crate::net::Peer::of(&req), "Reexecute")
            .await?;
        let req = req.into_inner();
        self.check_model(&req.model_id)?;
        let inner = self.inner.clone();
        let sampling = sampling_of(req.sampling.as_ref());
        let dtype = DType::try_from(req.hidden_dtype).unwrap_or(DType::DtypeF32);
        let last = req.inputs.last().cloned().unwrap_or_default();
        let step = req.inputs.len().saturating_sub(1) as u32;
        let out = tokio::task::spawn_blocking(move || {
            reexecute(&inner.shard.model, &req.inputs, sampling, dtype)
        })
        .await
        .map_err(|e| Status::internal(format!("re-execution worker failed: {e}")))?
        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let (bytes, shape) = match &out {
            HopOutput::Hidden(t) => (t.data.clone(), t.shape.clone()),
            HopOutput::Token(t) => (t.to_le_bytes().to_vec(), Vec::new()),
        };
        let att = self.attest(("reexecute", step), &last, &bytes, &shape, dtype);
        let mut resp = out.into_proto();
        resp.attestation = Some(att);
        Ok(Response::new(resp))
    }

    async fn put_share(
        &self,
        req: Request<PutShareRequest>,
    ) -> Result<Response<PutShareResponse>, Status> {
        let caller = crate::net::Peer::of(&req);
        let req = req.into_inner();
        self.check_model(&req.model_id)?;
        self.authorize_share(&caller, &req).await?;
        let hidden = self.inner.shard.model.config().hidden_size;
        self.inner
            .handoffs
            .put(req, hidden)
            .map_err(|e| Status::invalid_argument(format!("node {}: {e}", self.inner.node_id)))?;
        Ok(Response::new(PutShareResponse {}))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let (sessions, bytes) = self.inner.sessions.usage();
        let (batches, largest) = self.inner.batcher.stats();
        let (shares_recorded, shares_pending) =
            self.inner.shares.as_ref().map_or((0, 0), |s| s.counts());
        let e = &self.inner.shard.entry;
        Ok(Response::new(HealthResponse {
            node_id: self.inner.node_id.clone(),
            model_id: self.inner.shard.manifest.model_id.clone(),
            shard_index: e.index as u32,
            layer_start: e.layer_start as u32,
            layer_end: e.layer_end as u32,
            sessions: sessions as u32,
            kv_cache_bytes: bytes as u64,
            serving: true,
            forwards: self
                .inner
                .forwards
                .load(std::sync::atomic::Ordering::Relaxed),
            batches,
            largest_batch: largest as u32,
            shares_recorded,
            shares_pending,
        }))
    }
}

/// Whether the compute node at `hop` answers a Health call within `timeout`.
pub async fn probe_health(net: &crate::net::Net, hop: &Hop, timeout: Duration) -> Result<()> {
    health(net, hop, timeout).await.map(|_| ())
}

/// The Health answer of the compute node at `hop`, within `timeout`.
pub async fn health(net: &crate::net::Net, hop: &Hop, timeout: Duration) -> Result<HealthResponse> {
    let probe = async {
        let pin = crate::net::Pin::parse(&hop.tls_pin)?;
        let channel = net.channel_with(&hop.address, timeout, pin)?;
        let answer = ComputeClient::new(channel)
            .health(HealthRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("unreachable: {}", s.message()))?;
        anyhow::Ok(answer.into_inner())
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("no health answer within {} ms (hung?)", timeout.as_millis()),
    }
}

/// Rows (tokens) the request feeds this shard.
fn input_rows(req: &ForwardRequest) -> u32 {
    match &req.input {
        Some(forward_request::Input::Tokens(t)) => t.ids.len() as u32,
        Some(forward_request::Input::Hidden(t)) if t.shape.len() >= 2 => {
            t.shape[t.shape.len() - 2] as u32
        }
        _ => 0,
    }
}

/// The share sink of a node that knows a daemon or a registry to find one.
fn share_sink(cfg: &ComputeConfig, shard: &LoadedShard) -> Option<crate::shares::ShareSink> {
    let daemon = match (&cfg.daemon, &cfg.registry) {
        (Some(d), _) => crate::shares::DaemonSource::Address(d.clone()),
        (None, Some(r)) => crate::shares::DaemonSource::Registry(r.clone()),
        (None, None) => return None,
    };
    // Vision hops are not priced per token yet: only the text route records shares.
    if shard.entry.stack != unfed_model::Stack::Text {
        return None;
    }
    let (sink, _task) = crate::shares::ShareSink::spawn(crate::shares::SinkConfig {
        node_id: cfg.node_id.clone(),
        model: shard.manifest.model_id.clone(),
        shard_index: cfg.shard_index,
        shards_total: shard.manifest.text_shards().count() as u32,
        key: cfg.share_key.clone(),
        daemon,
        net: cfg.net.clone(),
        batch: 64,
        flush_every: Duration::from_millis(200),
        spool: cfg.share_spool.clone(),
    });
    Some(sink)
}

/// What the session owner signs to end a session early.
fn end_session_message(session: &str) -> Vec<u8> {
    format!("unfed-end-session-v1\n{session}").into_bytes()
}

/// The owner's signature that ends `session` on every hop of its route.
pub fn sign_end_session(owner: &ed25519_dalek::SigningKey, session: &str) -> Vec<u8> {
    use ed25519_dalek::Signer;
    owner
        .sign(&end_session_message(session))
        .to_bytes()
        .to_vec()
}

fn verify_end_session(owner: &[u8], session: &str, signature: &[u8]) -> Result<(), String> {
    use ed25519_dalek::Verifier;
    let key: [u8; 32] = owner.try_into().map_err(|_| {
        "the session was opened without an owner key, so no one may end it early".to_string()
    })?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| "the session's owner key is not a valid Ed25519 key".to_string())?;
    let sig = ed25519_dalek::Signature::from_slice(signature)
        .map_err(|_| "the request carries no owner signature".to_string())?;
    key.verify(&end_session_message(session), &sig)
        .map_err(|_| "the signature is not by the session's owner".to_string())
}

/// Builds this node's registration, signed when a stake key is configured.
fn registration(
    cfg: &ComputeConfig,
    manifest: &Manifest,
    entry: &ShardEntry,
) -> Result<RegisterRequest> {
    let vision = entry.stack == unfed_model::Stack::Vision;
    crate::membership::Listing {
        node_id: cfg.node_id.clone(),
        role: if vision { "vision" } else { "compute" },
        address: cfg.advertise.clone(),
        model: manifest.model_id.clone(),
        shard_index: cfg.shard_index as i64,
        share_key: crate::shares::public_key_hex(&cfg.share_key),
        stack: if vision { Stack::Vision } else { Stack::Text },
        layers: (entry.layer_start as u32, entry.layer_end as u32),
        shards_total: manifest
            .shards
            .iter()
            .filter(|s| s.stack == entry.stack)
            .count() as u32,
        tls_pin: cfg.net.own_pin().map(|p| p.hex()).unwrap_or_default(),
    }
    .request(cfg.stake_key.as_ref())
}

/// Registers, then heartbeats; re-registers when the registry forgot the node. A
/// rejected registration is fatal: the node cannot serve without admission.
pub(crate) async fn membership(
    cfg: Arc<ComputeConfig>,
    manifest: Manifest,
    entry: ShardEntry,
    registry: String,
    ready: tokio::sync::oneshot::Sender<Result<()>>,
) {
    let member = crate::membership::Member {
        net: cfg.net.clone(),
        registry,
        key: cfg.share_key.clone(),
        node_id: cfg.node_id.clone(),
        what: "node",
        heartbeat: cfg.heartbeat,
        health: cfg.health.clone(),
    };
    crate::membership::keep_registered(member, || registration(&cfg, &manifest, &entry), ready)
        .await
}

/// Serves the shard on `listener` until `shutdown`, registered with the registry while up.
pub async fn run(
    cfg: ComputeConfig,
    shard: LoadedShard,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let service = ComputeService::new(shard, &cfg);
    let cfg = Arc::new(cfg);
    let sweeper = {
        let s = service.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let n = s.inner.sessions.sweep_idle();
                if n > 0 {
                    tracing::info!(sessions = n, "dropped idle sessions");
                }
            }
        })
    };
    let net = cfg.net.clone();
    let router = net.server().add_service(
        ComputeServer::new(service.clone())
            .max_decoding_message_size(crate::net::limits::COMPUTE)
            .max_encoding_message_size(crate::net::limits::COMPUTE),
    );
    let closing = service.inner.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    let server = tokio::spawn(async move { net.serve(router, listener, shutdown).await });
    let mut member = None;
    if let Some(registry) = cfg.registry.clone() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (manifest, entry) = (
            service.inner.shard.manifest.clone(),
            service.inner.shard.entry.clone(),
        );
        member = Some(tokio::spawn(membership(
            cfg.clone(),
            manifest,
            entry,
            registry,
            tx,
        )));
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                server.abort();
                return Err(e);
            }
            Err(_) => {}
        }
    }
    if cfg.registry.is_none() {
        cfg.health.set_serving(true).await;
    }
    tracing::info!(node = %cfg.node_id, shard = cfg.shard_index, address = %cfg.advertise, "compute node serving");
    let result = server.await.context("compute server task failed")?;
    sweeper.abort();
    if let Some(m) = member {
        m.abort();
    }
    unregister(&cfg).await;
    result.context("compute gRPC server failed")
}

/// Best-effort unregistration on the way out (the registry drops silent nodes anyway).
pub(crate) async fn unregister(cfg: &ComputeConfig) {
    if let Some(registry) = &cfg.registry {
        crate::membership::unregister(&cfg.net, registry, &cfg.node_id, &cfg.share_key).await;
    }
}
