//! The pair's messages over gRPC. Each link of a session (client↔A, client↔B, A↔B) is one
//! bidirectional `Mpc.Link` stream, bridged to the channels a [`Port`] reads and writes,
//! so the protocol code is the same in-process and between machines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use unfed_proto::mpc_client::MpcClient;
use unfed_proto::mpc_server::Mpc;
use unfed_proto::{
    MpcInfoRequest, MpcInfoResponse, MpcMessage, PublicParamsChunk, PublicParamsRequest,
};

use super::client::{Client, ClientOutput, ClientSession};
use super::handoff::{Outbox, Signer};
use super::port::{Header, Msg, Peer, Port};
use super::public::Packed;
use super::weights::PartyModel;

fn peer_name(p: Peer) -> &'static str {
    match p {
        Peer::Client => "client",
        Peer::A => "A",
        Peer::B => "B",
    }
}

/// `data` in the narrowest whole number of bytes every element fits in: (packed bytes,
/// width), or `None` when that is all 8.
fn pack(data: &[u64]) -> Option<(Vec<u8>, u32)> {
    let bits = 64 - data.iter().fold(0u64, |acc, v| acc | v).leading_zeros();
    let width = bits.div_ceil(8).max(1) as usize;
    if width >= 8 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * width);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    Some((out, width as u32))
}

/// The elements of a message, packed or not; `None` for a malformed packing.
fn unpack(m: &MpcMessage) -> Option<Vec<u64>> {
    let width = m.packed_width as usize;
    if width == 0 {
        return Some(m.data.clone());
    }
    if width >= 8 || !m.data.is_empty() || !m.packed.len().is_multiple_of(width) {
        return None;
    }
    Some(
        m.packed
            .chunks(width)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect(),
    )
}

fn to_proto(m: &Msg) -> MpcMessage {
    let (data, packed, packed_width) = match pack(&m.data) {
        Some((bytes, width)) => (Vec::new(), bytes, width),
        None => (m.data.clone(), Vec::new(), 0),
    };
    MpcMessage {
        packed,
        packed_width,
        session: m.header.session.clone(),
        step: m.header.step,
        kind: m.header.kind.clone(),
        shape: m.header.shape.iter().map(|d| *d as u64).collect(),
        data,
        from: peer_name(m.from).to_string(),
        handoff: String::new(),
        handoff_pin: String::new(),
        voucher: None,
        billing_salt: Vec::new(),
    }
}

fn from_proto(m: MpcMessage, from: Peer) -> Msg {
    // A malformed packing arrives as no elements, which the receiver refuses by shape.
    let data = unpack(&m).unwrap_or_default();
    Msg {
        // The link says who is at the other end, whatever the message claims.
        from,
        header: Header {
            session: m.session,
            step: m.step,
            kind: m.kind,
            shape: m.shape.iter().map(|d| *d as usize).collect(),
        },
        data,
    }
}

/// Bytes (protobuf-encoded, as they go on the gRPC stream) and messages of one link,
/// counted by the client for `unfedctl bench`.
#[derive(Debug, Default)]
pub struct Meter {
    sent_bytes: AtomicU64,
    sent_msgs: AtomicU64,
    received_bytes: AtomicU64,
    received_msgs: AtomicU64,
}

/// A [`Meter`]'s counts at one moment, or the difference of two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkTraffic {
    pub sent_bytes: u64,
    pub sent_msgs: u64,
    pub received_bytes: u64,
    pub received_msgs: u64,
}

impl Meter {
    fn count(&self, sent: bool, msg: &MpcMessage) {
        let bytes = prost::Message::encoded_len(msg) as u64;
        let (b, n) = if sent {
            (&self.sent_bytes, &self.sent_msgs)
        } else {
            (&self.received_bytes, &self.received_msgs)
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        n.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LinkTraffic {
        LinkTraffic {
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            sent_msgs: self.sent_msgs.load(Ordering::Relaxed),
            received_bytes: self.received_bytes.load(Ordering::Relaxed),
            received_msgs: self.received_msgs.load(Ordering::Relaxed),
        }
    }
}

impl LinkTraffic {
    /// What was counted between `earlier` and `self`.
    pub fn since(self, earlier: LinkTraffic) -> LinkTraffic {
        LinkTraffic {
            sent_bytes: self.sent_bytes - earlier.sent_bytes,
            sent_msgs: self.sent_msgs - earlier.sent_msgs,
            received_bytes: self.received_bytes - earlier.received_bytes,
            received_msgs: self.received_msgs - earlier.received_msgs,
        }
    }

    pub fn add(&mut self, o: LinkTraffic) {
        self.sent_bytes += o.sent_bytes;
        self.sent_msgs += o.sent_msgs;
        self.received_bytes += o.received_bytes;
        self.received_msgs += o.received_msgs;
    }
}

/// The client's traffic with party A ([0]) and B ([1]) over a generation: the steps
/// that carried a prompt (the first of a session, a replay after a failover too) and
/// the decode steps after them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MpcTraffic {
    pub prefill: [LinkTraffic; 2],
    pub prefill_rows: usize,
    pub decode: [LinkTraffic; 2],
    pub decode_steps: usize,
}

impl MpcTraffic {
    /// Adds one step of `rows` rows (`prefill`: the session's first) that moved `moved`.
    pub fn add_step(&mut self, prefill: bool, rows: usize, moved: [LinkTraffic; 2]) {
        let into = if prefill {
            self.prefill_rows += rows;
            &mut self.prefill
        } else {
            self.decode_steps += 1;
            &mut self.decode
        };
        for (acc, m) in into.iter_mut().zip(moved) {
            acc.add(m);
        }
    }
}

type Outgoing = UnboundedReceiverStream<Result<MpcMessage, Status>>;
type PublicStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<PublicParamsChunk, Status>> + Send>>;

/// A sender whose messages leave on a gRPC stream (items made by `wrap`: a server
/// stream carries `Result`s, a client stream plain messages).
fn outgoing<T: Send + 'static>(
    wrap: fn(MpcMessage) -> T,
    meter: Option<Arc<Meter>>,
) -> (Sender<Msg>, UnboundedReceiverStream<T>) {
    let (tx, rx) = channel::<Msg>();
    let (stream_tx, stream_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(m) = rx.recv() {
            let m = to_proto(&m);
            if let Some(meter) = &meter {
                meter.count(true, &m);
            }
            if stream_tx.send(wrap(m)).is_err() {
                break;
            }
        }
    });
    (tx, UnboundedReceiverStream::new(stream_rx))
}

/// A receiver of the messages arriving on `stream` from `peer`; it disconnects when the
/// stream ends, so a dead peer fails the next receive at once.
fn incoming(
    mut stream: Streaming<MpcMessage>,
    peer: Peer,
    meter: Option<Arc<Meter>>,
) -> Receiver<Msg> {
    let (tx, rx) = channel();
    tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            if let Some(meter) = &meter {
                meter.count(false, &m);
            }
            if tx.send(from_proto(m, peer)).is_err() {
                break;
            }
        }
    });
    rx
}

fn hello(session: &str, from: Peer) -> MpcMessage {
    to_proto(&Msg {
        from,
        header: Header {
            session: session.to_string(),
            step: 0,
            kind: "hello".into(),
            shape: vec![0],
        },
        data: Vec::new(),
    })
}

/// What the client's hello tells each party about a session.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Where both parties send their output shares after every step (the compute node
    /// holding the next layer: its address and certificate pin); `None`: the client
    /// takes the output.
    pub handoff: Option<unfed_proto::Hop>,
    /// The session's spending voucher (its route starts with A and B) and billing salt.
    pub voucher: Option<unfed_proto::SpendingVoucher>,
    pub billing_salt: Vec<u8>,
}

/// Opens a Link to the party `to` (pinned to its registered certificate) for
/// `session`, with the client's `options`.
async fn dial(
    net: &crate::net::Net,
    to: &unfed_proto::Hop,
    session: &str,
    me: Peer,
    them: Peer,
    options: &SessionOptions,
    meter: Option<Arc<Meter>>,
) -> Result<(Sender<Msg>, Receiver<Msg>)> {
    let addr = &to.address;
    let pin = crate::net::Pin::parse(&to.tls_pin)?;
    // A link lives as long as its session: no per-call deadline.
    let ch = net
        .connect(addr, Duration::from_secs(24 * 3600), pin)
        .await
        .with_context(|| format!("cannot reach MPC party {them:?} at {addr}"))?;
    let mut client = MpcClient::new(ch)
        .max_decoding_message_size(crate::net::limits::MPC)
        .max_encoding_message_size(crate::net::limits::MPC);
    let (tx, stream) = outgoing(|m| m, meter.clone());
    let mut first = hello(session, me);
    if let Some(h) = &options.handoff {
        first.handoff = h.address.clone();
        first.handoff_pin = h.tls_pin.clone();
    }
    first.voucher = options.voucher.clone();
    first.billing_salt = options.billing_salt.clone();
    let stream = futures::stream::once(async move { first }).chain(stream);
    let resp = client.link(stream).await.map_err(|s| {
        anyhow::anyhow!(
            "MPC party {them:?} at {addr} refused the session: {}",
            s.message()
        )
    })?;
    Ok((tx, incoming(resp.into_inner(), them, meter)))
}

type Link = (Sender<Msg>, Receiver<Msg>);

/// A session's links as they arrive; the party starts once it has both.
#[derive(Default)]
struct Pending {
    client: Option<Link>,
    peer: Option<Link>,
    /// What the client's hello said.
    options: SessionOptions,
    /// The voucher the session runs under (checked at the hello).
    billing: Option<Arc<crate::voucher::Billing>>,
}

/// Party A or B serving `Mpc.Link`.
pub struct PartyService {
    model: Arc<PartyModel>,
    is_a: bool,
    /// Signs the output shares handed to the next shard.
    signer: Arc<Signer>,
    /// Full-output pairs: one compute share per step, billed to the session's client.
    shares: Option<crate::shares::ShareSink>,
    /// The public parameters clients fetch.
    public: Arc<Packed>,
    /// Party B's address (party A dials it for every session).
    peer: Option<String>,
    net: crate::net::Net,
    /// Registered nodes: the counterpart party must be the registered one.
    peers: Option<Arc<crate::verify::spot::Peers>>,
    timeout: Duration,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    /// The spending voucher of each paid session.
    vouchers: Arc<crate::voucher::Book>,
}

/// How a party reaches and recognises the others.
pub struct PartyLinks {
    /// Party B's address (party A only).
    pub peer: Option<String>,
    /// A session's other link must arrive, and every message, within this.
    pub timeout: Duration,
    pub net: crate::net::Net,
    /// Registered nodes (the counterpart must be the registered one); `None` unregistered.
    pub peers: Option<Arc<crate::verify::spot::Peers>>,
    /// Refuse sessions without a spending voucher naming this party.
    pub require_voucher: bool,
}

impl PartyService {
    pub fn new(
        model: Arc<PartyModel>,
        is_a: bool,
        signer: Signer,
        public: Packed,
        shares: Option<crate::shares::ShareSink>,
        links: PartyLinks,
    ) -> Result<Self> {
        let PartyLinks {
            peer,
            timeout,
            net,
            peers,
            require_voucher,
        } = links;
        if is_a && peer.is_none() {
            bail!("party A needs --peer (party B's host:port)");
        }
        let vouchers = Arc::new(crate::voucher::Book::new(&signer.node_id, require_voucher));
        Ok(Self {
            model,
            is_a,
            signer: Arc::new(signer),
            public: Arc::new(public),
            shares,
            peer,
            timeout,
            pending: Default::default(),
            vouchers,
            net,
            peers,
        })
    }

    /// Party B: the caller claiming to be party A must hold the certificate the
    /// registered party A of this model registered (mutual TLS). Plaintext pairs (loopback
    /// testnets that opted out of TLS) cannot tell, and accept.
    async fn check_counterpart(&self, caller: &crate::net::Peer) -> Result<(), Status> {
        if !self.net.is_tls() {
            return Ok(());
        }
        let pin = crate::net::auth::caller_pin(caller, "a link from party A")?;
        let peers = self.peers.as_ref().ok_or_else(|| {
            Status::permission_denied(
                "this party is not registered (no --registry): it cannot tell party A from a stranger",
            )
        })?;
        let parties = peers
            .with_role("mpc_a")
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        if !parties
            .iter()
            .any(|a| crate::net::auth::is_registered_pin(caller, &a.tls_pin))
        {
            tracing::warn!(remote = ?caller.remote, "refused a link claiming to be party A");
            let ids: Vec<&str> = parties.iter().map(|a| a.node_id.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "the caller's certificate ({}) is not that of a registered party A ({})",
                pin.short(),
                ids.join(", ")
            )));
        }
        Ok(())
    }

    /// Party A: party B as registered (pinned), or as given by --peer when unregistered.
    async fn counterpart_b(&self) -> Result<unfed_proto::Hop> {
        let addr = self.peer.clone().expect("checked at start");
        let Some(peers) = &self.peers else {
            return Ok(unfed_proto::Hop {
                address: addr,
                ..Default::default()
            });
        };
        // Of several pairs, ours is the B registered at the address we dial.
        let b = peers
            .with_role("mpc_b")
            .await?
            .into_iter()
            .find(|b| b.address == addr)
            .with_context(|| format!("no registered party B at {addr} (--peer)"))?;
        if self.net.is_tls() && b.tls_pin.is_empty() {
            bail!(
                "the registered party B {} has no certificate pin",
                b.node_id
            );
        }
        Ok(unfed_proto::Hop {
            node_id: b.node_id,
            address: addr,
            shard_index: 0,
            tls_pin: b.tls_pin,
        })
    }

    fn me(&self) -> Peer {
        if self.is_a { Peer::A } else { Peer::B }
    }

    /// Adds a link of `session`; starts the session when both are there, or drops the
    /// half-open session after the timeout.
    fn attach(
        &self,
        session: &str,
        from: Peer,
        link: Link,
        (options, billing): (SessionOptions, Option<Arc<crate::voucher::Billing>>),
    ) {
        let mut pending = self.pending.lock().expect("pending poisoned");
        let entry = pending.entry(session.to_string()).or_default();
        match from {
            Peer::Client => {
                entry.client = Some(link);
                entry.options = options;
                entry.billing = billing;
            }
            _ => entry.peer = Some(link),
        }
        if entry.client.is_none() || entry.peer.is_none() {
            let (pending, session, timeout) =
                (self.pending.clone(), session.to_string(), self.timeout);
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(p) = pending.lock().expect("pending poisoned").get(&session)
                    && (p.client.is_none() || p.peer.is_none())
                {
                    tracing::warn!(%session, "MPC session dropped: the other link never came");
                    pending.lock().expect("pending poisoned").remove(&session);
                }
            });
            return;
        }
        let Pending {
            client,
            peer,
            options,
            billing,
        } = pending.remove(session).expect("entry present");
        let ((ctx, crx), (ptx, prx)) = (client.expect("client"), peer.expect("peer"));
        let other = if self.is_a { Peer::B } else { Peer::A };
        let mut port = Port::new(
            self.me(),
            session,
            self.timeout,
            vec![(Peer::Client, ctx, crx), (other, ptx, prx)],
        );
        let (model, is_a, session) = (self.model.clone(), self.is_a, session.to_string());
        let (signer, shares) = (self.signer.clone(), self.shares.clone());
        let vouchers = self.vouchers.clone();
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || {
            let hidden = model.cfg.hidden_size;
            let run = |port: &mut Port| -> Result<()> {
                let mut outbox = options
                    .handoff
                    .as_ref()
                    .map(|to| Outbox::new(&net, &signer, is_a, hidden, to))
                    .transpose()?;
                let mut on_output = |step: u32, rows: usize, share: Vec<u64>| {
                    if let Some(billing) = &billing {
                        billing.covers(step, rows as u32)?;
                    }
                    if let (Some(sink), Some(billing)) = (&shares, &billing) {
                        let bytes: Vec<u8> = share.iter().flat_map(|v| v.to_le_bytes()).collect();
                        sink.record(crate::shares::Hop {
                            session_id: session.clone(),
                            step,
                            // The prompt is the input; every step yields one token.
                            input_tokens: if step == 0 { rows as u32 } else { 0 },
                            output_tokens: 1,
                            activation_hash: crate::voucher::commit(&billing.salt, &bytes),
                            billing: billing.clone(),
                        });
                    }
                    match outbox.as_mut() {
                        Some(o) => o.send(&session, step, share),
                        None => Ok(()),
                    }
                };
                super::party::serve(&model, port, is_a, None, &mut on_output)
            };
            match run(&mut port) {
                Ok(()) => tracing::info!(%session, steps = port.step, "MPC session ended"),
                Err(e) => tracing::warn!(%session, "MPC session failed: {e:#}"),
            }
            vouchers.end(&session);
        });
    }
}

#[tonic::async_trait]
impl Mpc for PartyService {
    type LinkStream = Outgoing;

    async fn info(&self, _: Request<MpcInfoRequest>) -> Result<Response<MpcInfoResponse>, Status> {
        Ok(Response::new(MpcInfoResponse {
            model_id: self.signer.model_id.clone(),
            layer_end: self.model.layers.len() as u32,
            full_output: self.model.full_output,
            frac_bits: super::ring::FRAC_BITS,
            public_sha256: self.public.sha256.clone(),
            public_bytes: self.public.bytes.len() as u64,
            peer: self.peer.clone().unwrap_or_default(),
        }))
    }

    type PublicParamsStream = PublicStream;

    async fn public_params(
        &self,
        _: Request<PublicParamsRequest>,
    ) -> Result<Response<Self::PublicParamsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::iter(
            self.public.chunks().map(Ok),
        ))))
    }

    async fn link(
        &self,
        req: Request<Streaming<MpcMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let caller = crate::net::Peer::of(&req);
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty link: send a hello first"))?;
        let from = match (first.kind.as_str(), first.from.as_str(), self.is_a) {
            ("hello", "client", _) => Peer::Client,
            ("hello", "A", false) => Peer::A,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "a link starts with a hello from the client{}; got {:?} from {:?}",
                    if self.is_a { "" } else { " or party A" },
                    first.kind,
                    first.from
                )));
            }
        };
        if first.session.is_empty() {
            return Err(Status::invalid_argument("the hello names no session"));
        }
        if from == Peer::A {
            self.check_counterpart(&caller).await?;
        }
        let options = SessionOptions {
            handoff: (!first.handoff.is_empty()).then(|| unfed_proto::Hop {
                address: first.handoff.clone(),
                tls_pin: first.handoff_pin.clone(),
                ..Default::default()
            }),
            voucher: first.voucher.clone(),
            billing_salt: first.billing_salt.clone(),
        };
        if options.handoff.is_some() && self.model.full_output {
            return Err(Status::invalid_argument(
                "this pair runs every layer and the head (full_output_2pc): the logits go to the client, not to a compute node; open the session without a hand-off",
            ));
        }
        // Before any work: the client's voucher must name this party.
        let billing = if from == Peer::Client {
            self.vouchers
                .start(
                    &first.session,
                    options.voucher.as_ref(),
                    &options.billing_salt,
                    0,
                )
                .map_err(|e| {
                    Status::permission_denied(format!("party {}: {e:#}", self.signer.node_id))
                })?
        } else {
            None
        };
        let (tx, stream) = outgoing(Ok, None);
        let rx = incoming(inbound, from, None);
        if self.is_a && from == Peer::Client {
            let to = self
                .counterpart_b()
                .await
                .map_err(|e| Status::unavailable(format!("{e:#}")))?;
            let link = dial(
                &self.net,
                &to,
                &first.session,
                Peer::A,
                Peer::B,
                &Default::default(),
                None,
            )
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
            self.attach(&first.session, Peer::B, link, Default::default());
        }
        self.attach(&first.session, from, (tx, rx), (options, billing));
        Ok(Response::new(stream))
    }
}

/// The client's session with a pair running elsewhere.
pub struct RemotePair {
    port: Port,
    /// The links to A and B.
    meters: [Arc<Meter>; 2],
}

impl RemotePair {
    /// Opens a session with party A `a` and party B `b` (each pinned to its registered
    /// certificate), telling both `options`.
    pub async fn connect(
        net: &crate::net::Net,
        a: &unfed_proto::Hop,
        b: &unfed_proto::Hop,
        session: &str,
        timeout: Duration,
        options: &SessionOptions,
    ) -> Result<Self> {
        let meters: [Arc<Meter>; 2] = Default::default();
        let link =
            |to, them, meter| dial(net, to, session, Peer::Client, them, options, Some(meter));
        let (atx, arx) = link(a, Peer::A, meters[0].clone()).await?;
        let (btx, brx) = link(b, Peer::B, meters[1].clone()).await?;
        Ok(Self {
            meters,
            port: Port::new(
                Peer::Client,
                session,
                timeout,
                vec![(Peer::A, atx, arx), (Peer::B, btx, brx)],
            ),
        })
    }

    /// One step of the client's rows through the pair (blocks this worker thread while
    /// the protocol runs; needs the multi-threaded runtime).
    pub fn step(
        &mut self,
        client: &Client,
        sess: &mut ClientSession,
        input: &[f32],
    ) -> Result<ClientOutput> {
        let out = tokio::task::block_in_place(|| client.step(sess, &self.port, input));
        self.port.step += 1;
        out
    }

    /// The client's traffic with A and with B so far (a message the client has sent
    /// counts once it is on its way).
    pub fn traffic(&self) -> [LinkTraffic; 2] {
        [self.meters[0].snapshot(), self.meters[1].snapshot()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(data: Vec<u64>) -> Msg {
        Msg {
            from: Peer::A,
            header: Header {
                session: "s".into(),
                step: 0,
                kind: "k".into(),
                shape: vec![data.len()],
            },
            data,
        }
    }

    #[test]
    fn elements_travel_in_the_narrowest_width_and_arrive_unchanged() {
        let near_44_bits: Vec<u64> = ((1u64 << 44) - 2..(1 << 44)).collect();
        let cases: [(Vec<u64>, u32); 4] = [
            (vec![1, 255], 1),
            (near_44_bits, 6),
            (vec![u64::MAX, 3], 0),
            (vec![], 1),
        ];
        for (data, width) in cases {
            let wire = to_proto(&msg(data.clone()));
            assert_eq!(wire.packed_width, width, "{data:?}");
            assert_eq!(from_proto(wire, Peer::A).data, data);
        }
        // A packing that does not divide into elements arrives as none (refused by shape).
        let mut wire = to_proto(&msg(vec![1 << 40, 2]));
        wire.packed.pop();
        assert!(from_proto(wire, Peer::A).data.is_empty());
    }
}
