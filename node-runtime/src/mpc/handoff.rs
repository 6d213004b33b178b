//! The hand-off from the MPC pair to the compute node that continues after its layers.
//! After every step each party sends its share of the layer-k output straight to that
//! node (`Compute.PutShare`), signed with its registered share key; the node waits for
//! both, checks them and reconstructs. Neither party sees the other's share, and the
//! client's `Forward` names the pair and the layer, so the node never takes a hidden
//! state without both parties' signatures.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use tokio::sync::Notify;
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{Attestation, DType, MpcInput, PutShareRequest};

use super::ring::{FRAC_BITS, add, decode_at};
use crate::verify::attest;
use crate::verify::spot::Peers;

/// The shares' elements as signed: little-endian u64s.
fn share_bytes(data: &[u64]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One PutShare call.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// Who a party is when it hands over shares.
pub struct Signer {
    pub node_id: String,
    pub model_id: String,
    pub key: SigningKey,
}

/// A party's sender of one session's output shares to `target` (host:port).
pub struct Outbox<'a> {
    pub signer: &'a Signer,
    pub is_a: bool,
    pub hidden: usize,
    client: ComputeClient<tonic::transport::Channel>,
    target: String,
}

impl<'a> Outbox<'a> {
    /// A sender to the compute node `target`, pinned to its registered certificate.
    pub fn new(
        net: &crate::net::Net,
        signer: &'a Signer,
        is_a: bool,
        hidden: usize,
        target: &unfed_proto::Hop,
    ) -> Result<Self> {
        let pin = crate::net::Pin::parse(&target.tls_pin)?;
        if pin.is_none() && net.is_tls() {
            bail!(
                "the hand-off node {} has no certificate pin: the client must name the registered node",
                target.address
            );
        }
        let channel = net
            .channel_with(&target.address, HANDOFF_TIMEOUT, pin)
            .with_context(|| format!("bad hand-off address {:?}", target.address))?;
        Ok(Self {
            signer,
            is_a,
            hidden,
            client: ComputeClient::new(channel)
                .max_encoding_message_size(crate::net::limits::COMPUTE),
            target: target.address.clone(),
        })
    }

    /// The signed request carrying this party's share of `step`.
    pub fn request(&self, session: &str, step: u32, share: Vec<u64>) -> PutShareRequest {
        let rows = share.len() / self.hidden.max(1);
        let shape = vec![rows as u64, self.hidden as u64];
        let mut attestation = Attestation {
            node_id: self.signer.node_id.clone(),
            model_id: self.signer.model_id.clone(),
            shard_index: 0,
            session_id: session.to_string(),
            step,
            input_digest: attest::digest(&[]),
            output_digest: attest::digest(&share_bytes(&share)),
            output_shape: shape.clone(),
            output_dtype: DType::DtypeF32 as i32,
            signature: Vec::new(),
        };
        attest::sign(&self.signer.key, &mut attestation);
        PutShareRequest {
            model_id: self.signer.model_id.clone(),
            session_id: session.to_string(),
            step,
            party: if self.is_a { "A" } else { "B" }.into(),
            shape,
            data: share,
            frac_bits: FRAC_BITS,
            attestation: Some(attestation),
        }
    }

    /// Sends the share of `step` (blocks this worker thread; called from the party's
    /// protocol thread, which runs on the runtime's blocking pool).
    pub fn send(&mut self, session: &str, step: u32, share: Vec<u64>) -> Result<()> {
        let req = self.request(session, step, share);
        let target = self.target.clone();
        let client = &mut self.client;
        tokio::runtime::Handle::current()
            .block_on(client.put_share(req))
            .map_err(|s| {
                anyhow::anyhow!(
                    "handing the output share of step {step} to {target} failed: {}",
                    s.message()
                )
            })?;
        Ok(())
    }
}

#[derive(Default)]
struct Slot {
    a: Option<PutShareRequest>,
    b: Option<PutShareRequest>,
}

/// A compute node's shares received from MPC parties, until the client's Forward takes them.
pub struct Inbox {
    slots: Mutex<HashMap<(String, u32), (Instant, Slot)>>,
    notify: Notify,
    /// Unclaimed shares are dropped after this long.
    keep: Duration,
}

/// At most this many steps' shares wait unclaimed (a bound on memory, not on clients).
const MAX_SLOTS: usize = 1024;

impl Inbox {
    pub fn new(keep: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            notify: Notify::new(),
            keep,
        }
    }

    /// Files a party's share; refuses malformed ones and a second share for the same slot.
    pub fn put(&self, req: PutShareRequest, hidden: usize) -> Result<(), String> {
        let is_a = match req.party.as_str() {
            "A" => true,
            "B" => false,
            p => return Err(format!("party must be \"A\" or \"B\", not {p:?}")),
        };
        let rows = match req.shape[..] {
            [rows, h] if h as usize == hidden && rows > 0 => rows as usize,
            _ => {
                return Err(format!(
                    "share shape {:?} is not [rows, {hidden}]",
                    req.shape
                ));
            }
        };
        if req.data.len() != rows * hidden {
            return Err(format!(
                "share has {} elements, its shape {:?} says {}",
                req.data.len(),
                req.shape,
                rows * hidden
            ));
        }
        if req.frac_bits != FRAC_BITS {
            return Err(format!(
                "share has {} fractional bits; this node reads {FRAC_BITS}",
                req.frac_bits
            ));
        }
        let mut slots = self.slots.lock().expect("inbox poisoned");
        let keep = self.keep;
        slots.retain(|_, (at, _)| at.elapsed() < keep);
        if slots.len() >= MAX_SLOTS {
            return Err("too many unclaimed MPC shares; retry later".into());
        }
        let (_, slot) = slots
            .entry((req.session_id.clone(), req.step))
            .or_insert_with(|| (Instant::now(), Slot::default()));
        let place = if is_a { &mut slot.a } else { &mut slot.b };
        if place.is_some() {
            return Err(format!(
                "party {} already handed over its share of session {} step {}",
                req.party, req.session_id, req.step
            ));
        }
        *place = Some(req);
        drop(slots);
        self.notify.notify_waiters();
        Ok(())
    }

    fn try_take(&self, key: &(String, u32)) -> Option<(PutShareRequest, PutShareRequest)> {
        let mut slots = self.slots.lock().expect("inbox poisoned");
        match slots.get(key) {
            Some((
                _,
                Slot {
                    a: Some(_),
                    b: Some(_),
                },
            )) => {
                let (_, slot) = slots.remove(key).expect("present");
                Some((slot.a.expect("a"), slot.b.expect("b")))
            }
            _ => None,
        }
    }

    /// Both parties' shares of (`session`, `step`), waiting up to `within` for them.
    pub async fn take(
        &self,
        session: &str,
        step: u32,
        within: Duration,
    ) -> Result<(PutShareRequest, PutShareRequest)> {
        let key = (session.to_string(), step);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(both) = self.try_take(&key) {
                return Ok(both);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let slots = self.slots.lock().expect("inbox poisoned");
                let missing = match slots.get(&key) {
                    Some((_, s)) if s.a.is_some() => "party B's",
                    Some((_, s)) if s.b.is_some() => "party A's",
                    _ => "neither party's",
                };
                bail!(
                    "{missing} share of session {session} step {step} arrived within {within:?}; the MPC pair is down or slow"
                );
            }
        }
    }
}

/// Checks `share` from the party `node_id` (role `role`): its attestation is for this
/// model, session and step, covers exactly these elements, and is signed by a node the
/// registry lists in that role for the pair's layers.
pub async fn check_share(
    peers: &Peers,
    share: &PutShareRequest,
    node_id: &str,
    role: &str,
    layer: u32,
) -> Result<()> {
    let info = check_share_signer(peers, share).await?;
    if info.node_id != node_id {
        bail!(
            "the share of the pair's {role} is signed by {}, not by {node_id}",
            info.node_id
        );
    }
    if info.role != role || info.layer_end != layer {
        bail!(
            "{node_id} is registered as {} for layers [0, {}), not as {role} for [0, {layer})",
            info.role,
            info.layer_end
        );
    }
    Ok(())
}

/// At intake: the share is signed by a registered party of its model in the role its
/// `party` field names, over exactly these elements. Returns the signer's registration.
pub async fn check_share_signer(
    peers: &Peers,
    share: &PutShareRequest,
) -> Result<unfed_proto::NodeInfo> {
    let a = share
        .attestation
        .as_ref()
        .context("the share carries no attestation")?;
    if a.model_id != share.model_id || a.session_id != share.session_id || a.step != share.step {
        bail!(
            "the attestation of {} is for another session, step or model",
            a.node_id
        );
    }
    let role = match share.party.as_str() {
        "A" => "mpc_a",
        "B" => "mpc_b",
        p => bail!("party must be \"A\" or \"B\", not {p:?}"),
    };
    let info = peers.get(&a.node_id).await?;
    if info.role != role {
        bail!(
            "{} is registered as {}, not as {role} (party {})",
            a.node_id,
            info.role,
            share.party
        );
    }
    peers.verify(a).await?;
    if a.output_digest != attest::digest(&share_bytes(&share.data)) {
        bail!(
            "the share received differs from the one {} signed",
            a.node_id
        );
    }
    Ok(info)
}

/// The layer-k rows the two shares add up to.
pub fn reconstruct(a: &PutShareRequest, b: &PutShareRequest, input: &MpcInput) -> Result<Vec<f32>> {
    if a.shape != b.shape || a.shape.first() != Some(&(input.rows as u64)) {
        bail!(
            "the parties' shares have shapes {:?} and {:?}; the request has {} rows",
            a.shape,
            b.shape,
            input.rows
        );
    }
    Ok(add(&a.data, &b.data)
        .iter()
        .map(|v| decode_at(*v, a.frac_bits) as f32)
        .collect())
}
