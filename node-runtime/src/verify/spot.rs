//! Spot checks run by a hop on its neighbour: the next hop checks the hop before it
//! (it holds that hop's output and attestations), and the hop before the last checks
//! the last (the token comes back through it). A sampled hop's inputs for steps 0..=t
//! are fetched from the accused, matched against its own signed input digests, and
//! re-executed by an independent replica of its shard; a mismatch becomes a signed
//! fraud report to the registry, which re-executes again before it rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::*;

use super::attest;
use super::reexec::{HopOutput, compare};

/// Registered nodes by id, refreshed from the registry's Discover when a lookup misses.
pub struct Peers {
    net: crate::net::Net,
    registry: String,
    model: String,
    nodes: Mutex<(Instant, HashMap<String, NodeInfo>)>,
    /// The registry's certificate key, as its Discover states it.
    registry_pin: Mutex<Option<crate::net::Pin>>,
    /// Channels to peers by (address, pin): a spot check must not pay a handshake.
    channels: Mutex<HashMap<(String, String), tonic::transport::Channel>>,
    /// The registry's channel, kept for the same reason: discovery runs per spot check.
    registry_channel: Mutex<Option<tonic::transport::Channel>>,
}

/// How old a discovery `replicas` answers from while it lists a candidate: the
/// registry is not asked again at every spot check, and a replica that left since is
/// only a skipped check.
const REPLICAS_REUSE: Duration = Duration::from_secs(1);

impl Peers {
    pub fn new(net: crate::net::Net, registry: String, model: String) -> Self {
        Self {
            net,
            registry,
            model,
            nodes: Mutex::new((Instant::now() - Duration::from_secs(60), HashMap::new())),
            registry_pin: Mutex::new(None),
            channels: Mutex::default(),
            registry_channel: Mutex::default(),
        }
    }

    pub fn net(&self) -> &crate::net::Net {
        &self.net
    }

    /// A client of the registry these peers come from.
    pub fn registry_client(
        &self,
    ) -> Result<unfed_proto::registry_client::RegistryClient<tonic::transport::Channel>> {
        let mut kept = self.registry_channel.lock().expect("peers poisoned");
        let ch = match &*kept {
            Some(ch) => ch.clone(),
            None => kept
                .insert(crate::membership::registry_channel(
                    &self.net,
                    &self.registry,
                )?)
                .clone(),
        };
        Ok(crate::membership::registry_client_on(ch))
    }

    /// A client of the compute node `n`, pinned to its registered certificate (the
    /// channel is kept for the next call; every call times out after `timeout`).
    pub fn compute_client(
        &self,
        n: &NodeInfo,
        timeout: Duration,
    ) -> Result<ComputeClient<tonic::transport::Channel>> {
        let key = (n.address.clone(), n.tls_pin.clone());
        let cached = self
            .channels
            .lock()
            .expect("peers poisoned")
            .get(&key)
            .cloned();
        let ch = match cached {
            Some(ch) => ch,
            None => {
                let pin = crate::net::Pin::parse(&n.tls_pin)?;
                let ch = self
                    .net
                    .channel_with(&n.address, timeout, pin)
                    .with_context(|| format!("node {}", n.node_id))?;
                self.channels
                    .lock()
                    .expect("peers poisoned")
                    .insert(key, ch.clone());
                ch
            }
        };
        Ok(ComputeClient::new(ch)
            .max_decoding_message_size(crate::net::limits::COMPUTE)
            .max_encoding_message_size(crate::net::limits::COMPUTE))
    }

    async fn refresh(&self) -> Result<()> {
        let mut c = self.registry_client()?;
        let resp = c
            .discover(DiscoverRequest {
                model: self.model.clone(),
            })
            .await
            .map_err(|s| anyhow!("registry discover: {}", s.message()))?
            .into_inner();
        *self.registry_pin.lock().expect("peers poisoned") =
            crate::net::Pin::parse(&resp.registry_pin).ok().flatten();
        let mut g = self.nodes.lock().expect("peers poisoned");
        *g = (
            Instant::now(),
            resp.nodes
                .into_iter()
                .map(|n| (n.node_id.clone(), n))
                .collect(),
        );
        Ok(())
    }

    /// Who holds the certificate key `pin`: a registered node of this model, or the
    /// registry itself (`Caller::Registry`). Refreshes at most once a second on a miss.
    pub async fn caller(&self, pin: crate::net::Pin) -> Option<Caller> {
        for attempt in 0..2 {
            {
                if *self.registry_pin.lock().expect("peers poisoned") == Some(pin) {
                    return Some(Caller::Registry);
                }
                let g = self.nodes.lock().expect("peers poisoned");
                if let Some(n) =
                    g.1.values()
                        .find(|n| crate::net::Pin::parse(&n.tls_pin).ok().flatten() == Some(pin))
                {
                    return Some(Caller::Node(Box::new(n.clone())));
                }
                if attempt == 1 || g.0.elapsed() < Duration::from_secs(1) {
                    return None;
                }
            }
            if self.refresh().await.is_err() {
                return None;
            }
        }
        None
    }

    /// The registered node of `role` (e.g. "mpc_b") of this model, freshly discovered.
    /// Every registered node of `role` (several MPC pairs may serve a model).
    pub async fn with_role(&self, role: &str) -> Result<Vec<NodeInfo>> {
        self.refresh().await?;
        let g = self.nodes.lock().expect("peers poisoned");
        let nodes: Vec<NodeInfo> = g.1.values().filter(|n| n.role == role).cloned().collect();
        if nodes.is_empty() {
            return Err(anyhow!("the registry lists no {role} for `{}`", self.model));
        }
        Ok(nodes)
    }

    /// The node's registration, refreshing at most once a second on a miss.
    pub async fn get(&self, node_id: &str) -> Result<NodeInfo> {
        let stale = {
            let g = self.nodes.lock().expect("peers poisoned");
            if let Some(n) = g.1.get(node_id) {
                return Ok(n.clone());
            }
            g.0.elapsed() > Duration::from_secs(1)
        };
        if stale {
            self.refresh().await?;
        }
        self.nodes
            .lock()
            .expect("peers poisoned")
            .1
            .get(node_id)
            .cloned()
            .ok_or_else(|| anyhow!("{node_id} is not a registered node of `{}`", self.model))
    }

    pub async fn key(&self, node_id: &str) -> Result<VerifyingKey> {
        let n = self.get(node_id).await?;
        crate::shares::parse_public_key(&n.share_key)
            .with_context(|| format!("share key of {node_id}"))
    }

    /// Checks `a` against its signer's registered key, re-reading the registry once
    /// when the cached key fails (a restarted node registers a new key).
    pub async fn verify(&self, a: &Attestation) -> Result<()> {
        if let Ok(k) = self.key(&a.node_id).await
            && attest::verify(&k, a).is_ok()
        {
            return Ok(());
        }
        self.refresh().await?;
        attest::verify(&self.key(&a.node_id).await?, a)
    }

    /// Other live text nodes of `shard`: from a discovery under [`REPLICAS_REUSE`] old
    /// when it lists one, else freshly discovered.
    pub async fn replicas(&self, shard: u32, except: &[&str]) -> Result<Vec<NodeInfo>> {
        let pick = |nodes: &HashMap<String, NodeInfo>| -> Vec<NodeInfo> {
            nodes
                .values()
                .filter(|n| {
                    n.role == "compute"
                        && n.stack == Stack::Text as i32
                        && n.shard_index == shard
                        && !except.contains(&n.node_id.as_str())
                })
                .cloned()
                .collect()
        };
        {
            let g = self.nodes.lock().expect("peers poisoned");
            let found = pick(&g.1);
            if !found.is_empty() && g.0.elapsed() < REPLICAS_REUSE {
                return Ok(found);
            }
        }
        self.refresh().await?;
        Ok(pick(&self.nodes.lock().expect("peers poisoned").1))
    }
}

/// A caller identified by its certificate key.
#[derive(Debug, Clone)]
pub enum Caller {
    Registry,
    Node(Box<NodeInfo>),
}

/// Checks that `a` is the previous hop's valid attestation of exactly `received`.
pub async fn check_incoming(
    peers: &Peers,
    a: &Attestation,
    model: &str,
    shard: u32,
    session: &str,
    step: u32,
    received: &[u8],
) -> Result<()> {
    if a.model_id != model || a.session_id != session || a.step != step {
        bail!(
            "attestation of {} is for {}/{}/step {}, not this hop ({model}/{session}/step {step})",
            a.node_id,
            a.model_id,
            a.session_id,
            a.step
        );
    }
    let info = peers.get(&a.node_id).await?;
    if info.shard_index != a.shard_index || a.shard_index + 1 != shard {
        bail!(
            "attestation signer {} serves shard {}, not shard {} (the hop before shard {shard})",
            a.node_id,
            info.shard_index,
            shard.saturating_sub(1)
        );
    }
    peers.verify(a).await?;
    if a.output_digest != attest::digest(received) {
        bail!(
            "the hidden state received differs from the one {} attested",
            a.node_id
        );
    }
    Ok(())
}

/// A hop to maybe spot-check: the accused's attestations of steps 0..=t (in order), what
/// it sent at step t, and the request's sampling and wire dtype.
pub struct Suspect {
    pub attestations: Vec<Attestation>,
    pub output: HopOutput,
    pub sampling: Option<SamplingParams>,
    pub dtype: DType,
}

pub struct SpotChecker {
    pub fraction: f64,
    pub node_id: String,
    pub key: SigningKey,
    /// Registered nodes and the registry they come from (reports go there).
    pub peers: Arc<Peers>,
    /// Attestations received from checked neighbours, per (session, node).
    seen: Mutex<HashMap<(String, String), Vec<Attestation>>>,
}

/// Sessions whose neighbour attestations are kept; beyond this the log is reset (a
/// spot check of an older session is skipped, never wrong).
const MAX_SESSIONS: usize = 4096;

impl SpotChecker {
    pub fn new(fraction: f64, node_id: String, key: SigningKey, peers: Arc<Peers>) -> Self {
        Self {
            fraction,
            node_id,
            key,
            peers,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records the neighbour's attestation of this step; returns the suspect's
    /// attestations 0..=step when this hop is sampled for a check.
    pub fn observe(&self, a: &Attestation) -> Option<Vec<Attestation>> {
        let mut seen = self.seen.lock().expect("spot log poisoned");
        if seen.len() >= MAX_SESSIONS {
            seen.clear();
        }
        let log = seen
            .entry((a.session_id.clone(), a.node_id.clone()))
            .or_default();
        if a.step == 0 {
            log.clear();
        }
        if log.len() != a.step as usize {
            // A gap (e.g. this hop joined mid-session): nothing to check against.
            return None;
        }
        log.push(a.clone());
        (rand::random::<f64>() < self.fraction).then(|| log.clone())
    }

    pub fn forget(&self, session: &str) {
        self.seen
            .lock()
            .expect("spot log poisoned")
            .retain(|(s, _), _| s != session);
    }

    /// Runs one spot check in the background.
    pub fn spawn(self: &Arc<Self>, s: Suspect) {
        let me = self.clone();
        tokio::spawn(async move {
            let accused = s
                .attestations
                .last()
                .map(|a| a.node_id.clone())
                .unwrap_or_default();
            match me.check(s).await {
                Ok(Checked::Passed) => tracing::info!(node = %accused, "spot check passed"),
                Ok(Checked::NotCheckable(why)) => {
                    tracing::info!(node = %accused, "spot check recorded as {why}")
                }
                Ok(Checked::Ruled(v)) => {
                    tracing::warn!(node = %accused, guilty = v.guilty, accepted = v.accepted, reason = %v.reason, "{}", v.message)
                }
                Err(e) => tracing::info!(node = %accused, "spot check skipped: {e:#}"),
            }
        });
    }

    /// Reports an attestation that fails its signature check; the registry probes the
    /// accused itself, since bytes on an unsigned channel prove nothing on their own.
    pub fn report_forgery(self: &Arc<Self>, a: Attestation) {
        let me = self.clone();
        tokio::spawn(async move {
            let accused = a.node_id.clone();
            let mut report = FraudReport {
                reporter: me.node_id.clone(),
                accused: Some(a),
                kind: super::adjudicate::FORGED_ATTESTATION.into(),
                timestamp: unix_now(),
                ..Default::default()
            };
            attest::sign_report(&me.key, &mut report);
            match me.send(report).await {
                Ok(v) => {
                    tracing::warn!(node = %accused, guilty = v.guilty, reason = %v.reason, "forged attestation reported: {}", v.message)
                }
                Err(e) => {
                    tracing::warn!(node = %accused, "could not report a forged attestation: {e:#}")
                }
            }
        });
    }

    async fn send(&self, report: FraudReport) -> Result<FraudVerdict> {
        let mut c = self.peers.registry_client()?;
        Ok(c.report_fraud(report)
            .await
            .map_err(|st| anyhow!("registry refused the report: {}", st.message()))?
            .into_inner())
    }

    /// Re-executes the suspect's hop on an independent replica; a mismatch is reported
    /// to the registry, which rules.
    pub async fn check(&self, s: Suspect) -> Result<Checked> {
        let accused = s.attestations.last().context("no attestation")?.clone();
        let info = self.peers.get(&accused.node_id).await?;
        let inputs = fetch_inputs(&self.peers, &info, &accused.session_id, &s.attestations).await?;
        if let Some(why) = attest::not_checkable(&inputs) {
            // The accused committed to these share digests when it served the step; they
            // must be the registered pair's, or "not checkable" would be an excuse.
            check_handoff_shares(&self.peers, &accused, &inputs).await?;
            return Ok(Checked::NotCheckable(why));
        }
        let replicas = self
            .peers
            .replicas(accused.shard_index, &[&accused.node_id, &self.node_id])
            .await?;
        let Some(verifier) = replicas.first() else {
            bail!(
                "no independent replica of shard {} to re-execute on",
                accused.shard_index
            );
        };
        let recomputed =
            reexecute_on(&self.peers, verifier, &accused.model_id, &inputs, &s).await?;
        if compare(&s.output, &recomputed).is_ok() {
            return Ok(Checked::Passed);
        }
        let mut report = FraudReport {
            reporter: self.node_id.clone(),
            accused: Some(accused),
            inputs,
            input_attestations: s.attestations.clone(),
            sampling: s.sampling,
            output: Some(match s.output {
                HopOutput::Hidden(t) => fraud_report::Output::Hidden(t),
                HopOutput::Token(t) => fraud_report::Output::TokenId(t),
            }),
            timestamp: unix_now(),
            signature: Vec::new(),
            kind: String::new(),
        };
        attest::sign_report(&self.key, &mut report);
        Ok(Checked::Ruled(self.send(report).await?))
    }
}

/// How a spot check ended.
#[derive(Debug)]
pub enum Checked {
    /// The hop re-executed identically.
    Passed,
    /// The hop's input came from MPC shares, which no node keeps; why, for the record.
    NotCheckable(String),
    /// It did not re-execute identically, and the registry ruled on the report.
    Ruled(FraudVerdict),
}

/// Every MPC-fed input of the accused carries one share attestation of each party of
/// the registered pair, for this session and step, with a valid signature.
async fn check_handoff_shares(
    peers: &Peers,
    accused: &Attestation,
    inputs: &[StepInput],
) -> Result<()> {
    for (step, input) in inputs.iter().enumerate() {
        if input.mpc_shares.is_empty() {
            continue;
        }
        let mut roles: Vec<String> = Vec::new();
        for share in &input.mpc_shares {
            if share.session_id != accused.session_id
                || share.step as usize != step
                || share.model_id != accused.model_id
            {
                bail!(
                    "the accused's step {step} names a share attestation of another session, step or model"
                );
            }
            let info = peers.get(&share.node_id).await?;
            peers.verify(share).await.with_context(|| {
                format!("the share attestation of step {step} by {}", share.node_id)
            })?;
            roles.push(info.role);
        }
        roles.sort();
        if roles != ["mpc_a", "mpc_b"] {
            bail!("the accused's step {step} is not fed by one share of each MPC party: {roles:?}");
        }
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The accused's inputs for steps 0..=t, each matching its signed input digest.
async fn fetch_inputs(
    peers: &Peers,
    accused: &NodeInfo,
    session: &str,
    atts: &[Attestation],
) -> Result<Vec<StepInput>> {
    let up_to = atts.last().context("no attestation")?.step;
    let inputs = peers
        .compute_client(accused, CHECK_TIMEOUT)?
        .session_inputs(SessionInputsRequest {
            session_id: session.to_string(),
            up_to_step: up_to,
        })
        .await
        .map_err(|s| anyhow!("the accused withheld its inputs: {}", s.message()))?
        .into_inner()
        .inputs;
    if inputs.len() != atts.len() {
        bail!(
            "the accused returned {} inputs for {} steps",
            inputs.len(),
            atts.len()
        );
    }
    for (i, a) in inputs.iter().zip(atts) {
        if attest::input_digest(i) != a.input_digest {
            bail!(
                "input of step {} does not match the accused's attestation",
                a.step
            );
        }
    }
    Ok(inputs)
}

/// One fetch of inputs or re-execution of a whole session.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

async fn reexecute_on(
    peers: &Peers,
    replica: &NodeInfo,
    model: &str,
    inputs: &[StepInput],
    s: &Suspect,
) -> Result<HopOutput> {
    let address = &replica.address;
    let r = peers
        .compute_client(replica, CHECK_TIMEOUT)?
        .reexecute(ReexecuteRequest {
            model_id: model.to_string(),
            inputs: inputs.to_vec(),
            sampling: s.sampling,
            hidden_dtype: s.dtype as i32,
        })
        .await
        .map_err(|st| {
            anyhow!(
                "replica at {address} could not re-execute: {}",
                st.message()
            )
        })?;
    HopOutput::from_proto(r.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At 5 % per hop, how many requests until a cheater is first sampled: a cheater
    /// serving half the routes, 16 steps per request, over the checker's own sampling.
    #[test]
    fn detection_at_five_percent_takes_a_few_requests() {
        let peers = Arc::new(Peers::new(
            crate::net::Net::plaintext(),
            "127.0.0.1:1".into(),
            "m".into(),
        ));
        let checker = SpotChecker::new(0.05, "me".into(), crate::shares::generate_key(), peers);
        let mut counts = Vec::new();
        for trial in 0..2000 {
            let mut requests = 0u32;
            'requests: loop {
                requests += 1;
                if rand::random::<bool>() {
                    continue; // routed through the honest replica
                }
                let session = format!("{trial}-{requests}");
                for step in 0..16 {
                    let a = Attestation {
                        node_id: "cheater".into(),
                        session_id: session.clone(),
                        step,
                        ..Default::default()
                    };
                    if checker.observe(&a).is_some() {
                        break 'requests;
                    }
                }
            }
            counts.push(requests);
        }
        counts.sort();
        let mean = counts.iter().sum::<u32>() as f64 / counts.len() as f64;
        let pct = |p: f64| counts[((counts.len() - 1) as f64 * p) as usize];
        println!(
            "requests to detection at 5%: mean {mean:.2}, p50 {}, p90 {}, p99 {}, max {}",
            pct(0.5),
            pct(0.9),
            pct(0.99),
            counts[counts.len() - 1]
        );
        // Expected 1 / (0.5 × (1 − 0.95^16)) ≈ 3.6 requests.
        assert!((2.5..5.0).contains(&mean), "mean {mean}");
        assert!(pct(0.99) <= 100);
    }
}
