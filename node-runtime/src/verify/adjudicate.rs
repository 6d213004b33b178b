//! The registry's side of fraud reports: refuse what is not valid evidence (with a
//! reason), re-execute the accused hop itself, and act on a guilty verdict according to
//! the rollout stage — record it, exclude the node, or also slash its stake on-chain.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use unfed_chain::{Address, Chain, Deployment};
use unfed_proto::*;

use super::attest;
use super::reexec::{HopOutput, compare, reexecute};
use crate::engine::ShardModel;

/// How often a slash that did not reach the chain is sent, and the pause before the
/// next attempt (growing with each).
const SLASH_ATTEMPTS: u32 = 3;
const SLASH_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// `he_dispute_rollout_stage`: what a guilty verdict does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Record the verdict only.
    Shadow,
    /// Also exclude the node from discovery.
    Soft,
    /// Also slash its stake on-chain.
    Enforced,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Shadow => "shadow",
            Stage::Soft => "soft",
            Stage::Enforced => "enforced",
        }
    }
}

/// The operator's handle on the escrow, for slashing.
pub struct Slasher {
    pub chain: Chain,
    pub deployment: Deployment,
}

/// Reports one reporter may file per minute.
const REPORTS_PER_MINUTE: usize = 10;
/// Reports older than this are refused as stale.
const MAX_REPORT_AGE: Duration = Duration::from_secs(300);

pub struct Adjudicator {
    pub stage: Stage,
    slasher: Option<Slasher>,
    shards: Mutex<HashMap<(String, u32), Arc<ShardModel>>>,
    seen: Mutex<HashSet<Vec<u8>>>,
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
    verdicts: Mutex<Vec<Verdict>>,
    /// Held by the registry for the whole of one report's ruling.
    pub ruling: tokio::sync::Mutex<()>,
}

/// A refusal with its reason code.
fn refuse(reason: &str, message: impl Into<String>) -> FraudVerdict {
    FraudVerdict {
        accepted: false,
        reason: reason.into(),
        guilty: false,
        message: message.into(),
    }
}

impl Adjudicator {
    pub fn new(stage: Stage, slasher: Option<Slasher>) -> Self {
        Self {
            stage,
            slasher,
            shards: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashSet::new()),
            recent: Mutex::new(HashMap::new()),
            verdicts: Mutex::new(Vec::new()),
            ruling: tokio::sync::Mutex::new(()),
        }
    }

    /// Verdicts so far (the registry adds its exclusions).
    pub fn list(&self) -> ListVerdictsResponse {
        ListVerdictsResponse {
            verdicts: self.verdicts.lock().expect("verdicts poisoned").clone(),
            excluded: Vec::new(),
        }
    }

    /// Checks the report's form and provenance; `Err` is the refusal to return.
    pub fn admit(
        &self,
        r: &FraudReport,
        reporter: Option<&NodeInfo>,
        accused: Option<&NodeInfo>,
    ) -> Result<(), FraudVerdict> {
        let Some(reporter) = reporter else {
            return Err(refuse(
                "unknown_reporter",
                format!("{} is not a registered node", r.reporter),
            ));
        };
        let key = crate::shares::parse_public_key(&reporter.share_key)
            .map_err(|_| refuse("unknown_reporter", "the reporter has no share key"))?;
        attest::verify_report(&key, r).map_err(|e| refuse("bad_signature", format!("{e:#}")))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now.abs_diff(r.timestamp) > MAX_REPORT_AGE.as_secs() {
            return Err(refuse(
                "stale",
                "the report's timestamp is more than 300 s off",
            ));
        }
        {
            let mut recent = self.recent.lock().expect("rate poisoned");
            let q = recent.entry(r.reporter.clone()).or_default();
            while q
                .front()
                .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
            {
                q.pop_front();
            }
            if q.len() >= REPORTS_PER_MINUTE {
                return Err(refuse(
                    "rate_limited",
                    format!(
                        "more than {REPORTS_PER_MINUTE} reports a minute from {}",
                        r.reporter
                    ),
                ));
            }
            q.push_back(Instant::now());
        }
        let Some(a) = &r.accused else {
            return Err(refuse("bad_evidence", "no accused attestation"));
        };
        if !self
            .seen
            .lock()
            .expect("seen poisoned")
            .insert(a.signature.clone())
        {
            return Err(refuse("replay", "this attestation was already adjudicated"));
        }
        let Some(accused) = accused else {
            return Err(refuse(
                "unknown_accused",
                format!("{} is not a registered node", a.node_id),
            ));
        };
        let akey = crate::shares::parse_public_key(&accused.share_key)
            .map_err(|_| refuse("unknown_accused", "the accused has no share key"))?;
        if r.kind == FORGED_ATTESTATION {
            // The evidence is the attestation itself: it must fail under the real key.
            if attest::verify(&akey, a).is_ok() {
                return Err(refuse(
                    "bad_evidence",
                    "the attestation verifies under the accused's registered key",
                ));
            }
            return Ok(());
        }
        // Every step's attestation must be the accused's own, in order, for this session,
        // and every input must be the one it signed for.
        let steps = &r.input_attestations;
        if steps.len() != r.inputs.len()
            || steps.len() != a.step as usize + 1
            || steps.last() != Some(a)
        {
            return Err(refuse(
                "bad_evidence",
                "inputs and attestations do not cover steps 0..=step",
            ));
        }
        for (i, (s, input)) in steps.iter().zip(&r.inputs).enumerate() {
            if s.step as usize != i
                || s.session_id != a.session_id
                || s.node_id != a.node_id
                || s.shard_index != a.shard_index
            {
                return Err(refuse(
                    "bad_evidence",
                    format!("attestation {i} is not the accused's step {i}"),
                ));
            }
            attest::verify(&akey, s).map_err(|e| refuse("bad_evidence", format!("{e:#}")))?;
            if attest::input_digest(input) != s.input_digest {
                return Err(refuse(
                    "bad_evidence",
                    format!("input {i} is not what the accused attested"),
                ));
            }
        }
        if let Some(why) = attest::not_checkable(&r.inputs) {
            return Err(refuse("not_checkable", why));
        }
        if claimed_output(r).map(|o| o.digest()) != Some(a.output_digest.clone()) {
            return Err(refuse(
                "bad_evidence",
                "the output is not what the accused attested",
            ));
        }
        Ok(())
    }

    /// Re-executes the accused hop from the split in `split_dir` (or, for a forged
    /// attestation, probes the accused) and rules.
    pub async fn rule(
        &self,
        net: &crate::net::Net,
        r: &FraudReport,
        split_dir: &Path,
        accused: &NodeInfo,
    ) -> FraudVerdict {
        let a = r.accused.clone().expect("admitted");
        let model = match self
            .shard(split_dir.to_path_buf(), &a.model_id, a.shard_index)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                return refuse(
                    "unavailable",
                    format!("cannot load shard {}: {e:#}", a.shard_index),
                );
            }
        };
        let finding = if r.kind == FORGED_ATTESTATION {
            probe_attestation(net, &model, accused)
                .await
                .map_err(|e| refuse("unavailable", format!("cannot probe the accused: {e:#}")))
        } else {
            reexecute_report(r, model).await
        };
        let (guilty, detail) = match finding {
            Ok(f) => f,
            Err(v) => return v,
        };
        let detail = if r.kind.is_empty() {
            detail
        } else {
            format!("{}: {detail}", r.kind)
        };
        let slashed = if guilty {
            self.punish(&a.node_id).await
        } else {
            String::new()
        };
        let verdict = Verdict {
            accused: a.node_id.clone(),
            reporter: r.reporter.clone(),
            model: a.model_id.clone(),
            shard_index: a.shard_index,
            session_id: a.session_id.clone(),
            step: a.step,
            guilty,
            stage: self.stage.name().into(),
            detail: detail.clone(),
            slashed,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        tracing::warn!(accused = %a.node_id, reporter = %r.reporter, guilty, stage = self.stage.name(), "verdict: {detail}");
        self.verdicts
            .lock()
            .expect("verdicts poisoned")
            .push(verdict);
        FraudVerdict {
            accepted: true,
            reason: String::new(),
            guilty,
            message: format!("{}: {detail}", if guilty { "guilty" } else { "not guilty" }),
        }
    }

    /// Slashes (enforced stage); returns the wei slashed. Exclusion is the registry's.
    async fn punish(&self, node: &str) -> String {
        let (Stage::Enforced, Some(s)) = (self.stage, &self.slasher) else {
            return String::new();
        };
        let Ok(addr) = node.parse::<Address>() else {
            tracing::warn!(node, "cannot slash: the node id is not an EVM address");
            return String::new();
        };
        let before = s.chain.stake_info(&s.deployment, addr).await.ok();
        // A transaction that never reached the chain (an RPC hiccup, another process
        // sending from this key and taking its nonce) is sent again; a revert is final.
        let mut attempt = 1;
        while let Err(e) = s
            .chain
            .slash(&s.deployment, addr, "fraud proven by re-execution")
            .await
        {
            if e.revert_reason().is_some() || attempt == SLASH_ATTEMPTS {
                tracing::error!(node, attempt, "slashNode failed: {e}");
                return String::new();
            }
            // Sent but its receipt lost: the stake already fell, and a second slash
            // would take more than the verdict does.
            let now = s.chain.stake_info(&s.deployment, addr).await.ok();
            if let (Some(b), Some(n)) = (&before, &now)
                && n.active + n.cooling < b.active + b.cooling
            {
                break;
            }
            tracing::warn!(node, attempt, "slashNode failed, sending it again: {e}");
            tokio::time::sleep(SLASH_RETRY_PAUSE * attempt).await;
            attempt += 1;
        }
        let after = s.chain.stake_info(&s.deployment, addr).await.ok();
        match (before, after) {
            (Some(b), Some(a)) => ((b.active + b.cooling) - (a.active + a.cooling)).to_string(),
            _ => String::new(),
        }
    }

    async fn shard(&self, dir: PathBuf, model: &str, index: u32) -> Result<Arc<ShardModel>> {
        let key = (model.to_string(), index);
        if let Some(m) = self.shards.lock().expect("shards poisoned").get(&key) {
            return Ok(m.clone());
        }
        let loaded =
            tokio::task::spawn_blocking(move || crate::compute::load_shard(&dir, index)).await??;
        let m = Arc::new(loaded.model);
        self.shards
            .lock()
            .expect("shards poisoned")
            .insert(key, m.clone());
        Ok(m)
    }
}

/// Recomputes the accused's step from the report's inputs and compares it with what
/// the accused sent: `(guilty, why)`.
async fn reexecute_report(
    r: &FraudReport,
    model: Arc<ShardModel>,
) -> Result<(bool, String), FraudVerdict> {
    let a = r.accused.as_ref().expect("admitted");
    let inputs = r.inputs.clone();
    let sampling = crate::compute::sampling_of(r.sampling.as_ref());
    let dtype = DType::try_from(a.output_dtype).unwrap_or(DType::DtypeF32);
    let recomputed =
        tokio::task::spawn_blocking(move || reexecute(&model, &inputs, sampling, dtype))
            .await
            .map_err(|e| refuse("unavailable", format!("re-execution failed: {e}")))?
            .map_err(|e| refuse("bad_evidence", format!("the inputs do not run: {e:#}")))?;
    let claimed = claimed_output(r).expect("admitted");
    Ok(match compare(&claimed, &recomputed) {
        Ok(()) => (
            false,
            "the accused's output matches re-execution".to_string(),
        ),
        Err(why) => (true, why),
    })
}

/// `FraudReport.kind` of a report about an attestation that fails its signature check.
pub const FORGED_ATTESTATION: &str = "forged_attestation";

/// Has the accused re-execute a probe input and checks the attestation it returns: a
/// node that forges attestations cannot answer with a valid one.
async fn probe_attestation(
    net: &crate::net::Net,
    model: &ShardModel,
    accused: &NodeInfo,
) -> Result<(bool, String)> {
    let input = if model.spec().has_embedding {
        step_input::Input::Tokens(TokenIds { ids: vec![1, 2, 3] })
    } else {
        let h = model.config().hidden_size;
        let rows: Vec<f32> = (0..3 * h).map(|i| ((i % 17) as f32 - 8.0) / 16.0).collect();
        step_input::Input::Hidden(crate::wire::encode(&rows, &[1, 3, h], DType::DtypeF32))
    };
    let pin = crate::net::Pin::parse(&accused.tls_pin)?;
    let ch = net
        .connect(&accused.address, Duration::from_secs(30), pin)
        .await?;
    let resp = unfed_proto::compute_client::ComputeClient::new(ch)
        .reexecute(ReexecuteRequest {
            model_id: accused.model.clone(),
            inputs: vec![StepInput {
                input: Some(input),
                penalty_tokens: vec![],
                from_layer: None,
                mpc_shares: vec![],
            }],
            sampling: None,
            hidden_dtype: DType::DtypeF32 as i32,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let key = crate::shares::parse_public_key(&accused.share_key)?;
    Ok(
        match resp.attestation.as_ref().map(|a| attest::verify(&key, a)) {
            Some(Ok(())) => (false, "the accused attests correctly when probed".into()),
            Some(Err(e)) => (
                true,
                format!("probed, it returned a forged attestation: {e:#}"),
            ),
            None => (true, "probed, it returned no attestation".into()),
        },
    )
}

fn claimed_output(r: &FraudReport) -> Option<HopOutput> {
    match r.output.clone()? {
        fraud_report::Output::Hidden(t) => Some(HopOutput::Hidden(t)),
        fraud_report::Output::TokenId(t) => Some(HopOutput::Token(t)),
    }
}
