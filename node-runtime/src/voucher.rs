//! Spending vouchers on the wire: the proto form of `unfed_chain::voucher`, what a paid
//! hop checks before working for a session (and remembers for its shares), what a
//! client signs, and the keyed commitments shares make to what a hop produced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use hkdf::hmac::{Hmac, Mac};
use sha2::Sha256;
use unfed_chain::voucher::{Delegation, SignedVoucher, SpendingVoucher, session_hash};
use unfed_chain::{Address, PrivateKeySigner, U256};
use unfed_proto as pb;

pub fn to_proto(v: &SignedVoucher) -> pb::SpendingVoucher {
    let s = &v.voucher;
    pb::SpendingVoucher {
        chain_id: v.chain_id,
        escrow: v.escrow.to_string(),
        client: s.client.to_string(),
        model: s.model.clone(),
        session: s.session.to_vec(),
        route: s.route.clone(),
        max_input_tokens: s.maxInputTokens,
        max_output_tokens: s.maxOutputTokens,
        max_spend: s.maxSpend.to_string(),
        expiry: s.expiry,
        nonce: s.nonce,
        signature: v.signature.clone(),
        delegation: v.delegation.as_ref().map(|d| pb::Delegation {
            delegate: d.delegate.to_string(),
            max_spend: d.max_spend.to_string(),
            expiry: d.expiry,
            nonce: d.nonce.clone(),
            signature: d.signature.clone(),
        }),
    }
}

fn address(what: &str, s: &str) -> Result<Address> {
    s.parse()
        .with_context(|| format!("the voucher's {what} {s:?} is not an EVM address"))
}

fn amount(what: &str, s: &str) -> Result<U256> {
    s.parse()
        .with_context(|| format!("the voucher's {what} {s:?} is not a decimal amount"))
}

pub fn from_proto(p: &pb::SpendingVoucher) -> Result<SignedVoucher> {
    let client = address("client", &p.client)?;
    let session = <[u8; 32]>::try_from(p.session.as_slice())
        .map_err(|_| anyhow::anyhow!("the voucher's session hash is not 32 bytes"))?;
    Ok(SignedVoucher {
        voucher: SpendingVoucher {
            client,
            model: p.model.clone(),
            session: session.into(),
            route: p.route.clone(),
            maxInputTokens: p.max_input_tokens,
            maxOutputTokens: p.max_output_tokens,
            maxSpend: amount("max_spend", &p.max_spend)?,
            expiry: p.expiry,
            nonce: p.nonce,
        },
        chain_id: p.chain_id,
        escrow: address("escrow", &p.escrow)?,
        signature: p.signature.clone(),
        delegation: p
            .delegation
            .as_ref()
            .map(|d| -> Result<Delegation> {
                Ok(Delegation {
                    client,
                    delegate: address("delegate", &d.delegate)?,
                    max_spend: amount("delegation max_spend", &d.max_spend)?,
                    expiry: d.expiry,
                    nonce: d.nonce.clone(),
                    signature: d.signature.clone(),
                })
            })
            .transpose()?,
    })
}

/// The voucher's identity (its EIP-712 digest), as shares name it.
pub fn digest(p: &pb::SpendingVoucher) -> Result<[u8; 32]> {
    Ok(from_proto(p)?.digest().0)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Commitment to what a hop produced, keyed with the session's billing salt: the
/// client and the route can check it, the daemon (which never sees the salt) cannot
/// test guesses of a token against it.
pub fn commit(salt: &[u8], activation: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(salt).expect("HMAC takes any key length");
    m.update(activation);
    m.finalize().into_bytes().into()
}

/// Bytes of salt a paid session must carry.
pub const SALT_BYTES: usize = 16;

/// What a hop keeps of a paid session.
#[derive(Debug)]
pub struct Billing {
    pub voucher: Arc<pb::SpendingVoucher>,
    pub digest: [u8; 32],
    pub client: String,
    pub salt: Vec<u8>,
    pub max_input_tokens: u32,
    pub max_output_tokens: u32,
    pub expiry: u64,
}

impl Billing {
    /// Whether step `step` with `rows` input rows stays within the voucher.
    pub fn covers(&self, step: u32, rows: u32) -> Result<()> {
        if step == 0 && rows > self.max_input_tokens {
            bail!(
                "spending voucher refused: the prompt has {rows} rows, the voucher covers {}",
                self.max_input_tokens
            );
        }
        // Step s produces the (s+1)-th token.
        if step >= self.max_output_tokens {
            bail!(
                "the session's spending voucher covers {} generated tokens; step {step} would be token {}",
                self.max_output_tokens,
                step + 1
            );
        }
        if now_secs() > self.expiry {
            bail!("the session's spending voucher expired");
        }
        Ok(())
    }
}

/// A paid hop's book of sessions: the voucher each one runs under, and the vouchers
/// already used (a voucher starts one session, once).
pub struct Book {
    node_id: String,
    /// Refuse sessions without a voucher (the node bills a daemon).
    required: bool,
    inner: Mutex<BookInner>,
}

#[derive(Default)]
struct BookInner {
    sessions: HashMap<String, Arc<Billing>>,
    /// Digest → expiry of every voucher that started a session here.
    used: HashMap<[u8; 32], u64>,
}

impl Book {
    pub fn new(node_id: &str, required: bool) -> Self {
        Self {
            node_id: node_id.to_string(),
            required,
            inner: Default::default(),
        }
    }

    /// Step 0 of `session` with `rows` prompt rows (0 when not known yet): the voucher
    /// must be valid, name this node, cover the rows, and be new here. `None`: an unpaid session (allowed only
    /// when vouchers are not required).
    pub fn start(
        &self,
        session: &str,
        voucher: Option<&pb::SpendingVoucher>,
        salt: &[u8],
        rows: u32,
    ) -> Result<Option<Arc<Billing>>> {
        let Some(p) = voucher else {
            if self.required {
                bail!(
                    "node {} bills its work and the request carries no spending voucher: sign one for the session (a client with a funded escrow deposit)",
                    self.node_id
                );
            }
            return Ok(None);
        };
        let v = from_proto(p)?;
        let now = now_secs();
        v.check_for(session, &self.node_id, now)
            .map_err(|e| anyhow::anyhow!("spending voucher refused: {e:#}"))?;
        if salt.len() < SALT_BYTES {
            bail!("a paid session needs a billing salt of at least {SALT_BYTES} bytes");
        }
        let digest = v.digest().0;
        let billing = Arc::new(Billing {
            voucher: Arc::new(p.clone()),
            digest,
            client: v.voucher.client.to_string(),
            salt: salt.to_vec(),
            max_input_tokens: v.voucher.maxInputTokens,
            max_output_tokens: v.voucher.maxOutputTokens,
            expiry: v.voucher.expiry,
        });
        billing.covers(0, rows)?;
        let mut inner = self.inner.lock().expect("voucher book poisoned");
        inner.used.retain(|_, expiry| *expiry >= now);
        inner.sessions.retain(|_, b| b.expiry >= now);
        if inner.used.contains_key(&digest) {
            bail!("spending voucher refused: it already started a session on this node");
        }
        inner.used.insert(digest, v.voucher.expiry);
        inner.sessions.insert(session.to_string(), billing.clone());
        Ok(Some(billing))
    }

    /// A later step: the session's voucher must still cover one more generated token.
    pub fn step(&self, session: &str, step: u32) -> Result<Option<Arc<Billing>>> {
        let inner = self.inner.lock().expect("voucher book poisoned");
        let Some(b) = inner.sessions.get(session) else {
            if self.required {
                bail!("session {session} has no spending voucher on this node");
            }
            return Ok(None);
        };
        b.covers(step, 0)?;
        Ok(Some(b.clone()))
    }

    pub fn end(&self, session: &str) {
        self.inner
            .lock()
            .expect("voucher book poisoned")
            .sessions
            .remove(session);
    }
}

/// What a client needs from the daemon to sign vouchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub chain_id: u64,
    pub escrow: Address,
    pub prices: crate::daemon::Prices,
}

impl Terms {
    pub fn from_proto(t: &pb::GetTermsResponse) -> Result<Self> {
        Ok(Self {
            chain_id: t.chain_id,
            escrow: address("escrow", &t.escrow)?,
            prices: crate::daemon::Prices {
                input: amount("input price", &t.input_price)?,
                output: amount("output price", &t.output_price)?,
            },
        })
    }

    pub fn to_proto(&self) -> pb::GetTermsResponse {
        pb::GetTermsResponse {
            chain_id: self.chain_id,
            escrow: self.escrow.to_string(),
            input_price: self.prices.input.to_string(),
            output_price: self.prices.output.to_string(),
        }
    }

    /// What `input` prompt tokens and `output` generated tokens cost the whole route.
    pub fn cost(&self, input: u64, output: u64) -> U256 {
        self.prices.cost(input, output)
    }
}

/// Who signs a client's vouchers: its own wallet key, or a delegate key with the
/// wallet's delegation.
#[derive(Clone)]
pub struct Payer {
    pub signer: PrivateKeySigner,
    pub delegation: Option<Delegation>,
}

impl std::fmt::Debug for Payer {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payer")
            .field("client", &self.client())
            .field("delegated", &self.delegation.is_some())
            .finish()
    }
}

/// The delegate key an API key stands for: derived from the secret, so the dashboard
/// can sign a request's voucher only while the request presents the key, and the
/// stored hash of the key signs nothing.
pub fn key_delegate(secret: &str) -> PrivateKeySigner {
    let mut b = b"unfed-api-key-delegate\0".to_vec();
    b.extend_from_slice(secret.as_bytes());
    PrivateKeySigner::from_bytes(&unfed_chain::voucher::keccak(&b))
        .expect("a keccak hash is a valid key with overwhelming probability")
}

/// A delegation as stored (proto bytes, the client implied by its owner).
pub fn delegation_bytes(d: &Delegation) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::Delegation {
        delegate: d.delegate.to_string(),
        max_spend: d.max_spend.to_string(),
        expiry: d.expiry,
        nonce: d.nonce.clone(),
        signature: d.signature.clone(),
    })
}

/// The stored delegation of `client`.
pub fn delegation_from_bytes(client: Address, bytes: &[u8]) -> Result<Delegation> {
    let d = <pb::Delegation as prost::Message>::decode(bytes).context("a stored delegation")?;
    Ok(Delegation {
        client,
        delegate: address("delegate", &d.delegate)?,
        max_spend: amount("delegation max_spend", &d.max_spend)?,
        expiry: d.expiry,
        nonce: d.nonce,
        signature: d.signature,
    })
}

/// How long a voucher stays valid: long enough for a long generation.
const VOUCHER_LIFETIME_SECS: u64 = 3600;

impl Payer {
    /// The client's own key.
    pub fn wallet(signer: PrivateKeySigner) -> Self {
        Self {
            signer,
            delegation: None,
        }
    }

    /// The wallet that pays.
    pub fn client(&self) -> Address {
        self.delegation
            .as_ref()
            .map_or(self.signer.address(), |d| d.client)
    }

    /// A voucher for `session` over `route` (node ids of the paid hops), capped at
    /// `max_input` prompt rows and `max_output` tokens at the daemon's prices.
    pub fn issue(
        &self,
        terms: &Terms,
        (model, session): (&str, &str),
        route: Vec<String>,
        (max_input, max_output): (u32, u32),
    ) -> Result<(pb::SpendingVoucher, Vec<u8>)> {
        let mut expiry = now_secs() + VOUCHER_LIFETIME_SECS;
        if let Some(d) = &self.delegation {
            expiry = expiry.min(d.expiry);
        }
        let voucher = SpendingVoucher {
            client: self.client(),
            model: model.to_string(),
            session: session_hash(session),
            route,
            maxInputTokens: max_input,
            maxOutputTokens: max_output,
            maxSpend: terms.cost(max_input.into(), max_output.into()),
            expiry,
            nonce: rand::random(),
        };
        let signed = SignedVoucher::sign(
            &self.signer,
            voucher,
            (terms.chain_id, terms.escrow),
            self.delegation.clone(),
        )?;
        let salt = rand::random::<[u8; 32]>().to_vec();
        Ok((to_proto(&signed), salt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms() -> Terms {
        Terms {
            chain_id: 31337,
            escrow: Address::repeat_byte(0xee),
            prices: crate::daemon::Prices {
                input: U256::from(1),
                output: U256::from(10),
            },
        }
    }

    #[test]
    fn the_proto_form_round_trips_and_keeps_the_signature_valid() {
        let payer = Payer::wallet(unfed_chain::dev_signer(3).unwrap());
        let (p, salt) = payer
            .issue(&terms(), ("m", "s1"), vec!["a".into()], (4, 2))
            .unwrap();
        assert_eq!(salt.len(), 32);
        let v = from_proto(&p).unwrap();
        v.verify().unwrap();
        assert_eq!(to_proto(&v), p);
        assert_eq!(v.voucher.maxSpend, U256::from(4 + 2 * 10));
    }

    #[test]
    fn a_hop_takes_a_voucher_once_and_only_within_its_caps() {
        let payer = Payer::wallet(unfed_chain::dev_signer(3).unwrap());
        let (p, salt) = payer
            .issue(&terms(), ("m", "s1"), vec!["a".into(), "b".into()], (4, 2))
            .unwrap();
        let book = Book::new("b", true);
        assert!(book.start("s1", None, &salt, 4).is_err(), "no voucher");
        assert!(
            book.start("s1", Some(&p), &salt, 5).is_err(),
            "prompt over the cap"
        );
        assert!(
            book.start("s2", Some(&p), &salt, 4).is_err(),
            "another session"
        );
        assert!(
            Book::new("c", true)
                .start("s1", Some(&p), &salt, 4)
                .is_err(),
            "not on the route"
        );
        book.start("s1", Some(&p), &salt, 4).unwrap().unwrap();
        book.step("s1", 1).unwrap();
        assert!(book.step("s1", 2).is_err(), "a third token");
        book.end("s1");
        assert!(book.start("s1", Some(&p), &salt, 4).is_err(), "replayed");
        assert!(
            Book::new("x", false)
                .start("s", None, &[], 1)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn commitments_depend_on_the_salt() {
        assert_ne!(
            commit(b"salt-one", b"\x01\0\0\0"),
            commit(b"salt-two", b"\x01\0\0\0")
        );
        assert_eq!(commit(b"k", b"x"), commit(b"k", b"x"));
    }
}
