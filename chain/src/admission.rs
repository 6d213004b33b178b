//! Stake-gated signed admission: a node registers with an EIP-191 signature by its
//! stake wallet over a canonical payload; the registry admits it only if the signer is
//! the claimed node id, the timestamp is fresh, the nonce is new, and the wallet is
//! eligible (stake >= minStake) in the escrow contract.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, Signature, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::amount::format_amount;
use crate::contracts::UnfedEscrow;

/// Domain tag at the head of every canonical payload, so a registration signature can
/// never be replayed as a signature over anything else (and vice versa).
const DOMAIN: &str = "unfed-registration/v2";

/// What a node signs when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationPayload {
    /// The node's stake wallet: a 0x EVM address, checksummed or lower case.
    pub node_id: String,
    /// compute | vision | mpc | daemon
    pub role: String,
    /// host:port the node serves on.
    pub address: String,
    pub model: String,
    /// Shard index, -1 when not applicable.
    pub shard_index: i64,
    /// Hex Ed25519 public key the node signs shares and attestations with.
    pub share_key: String,
    /// Hex SHA-256 of the node's TLS certificate key (empty without TLS): signed, so
    /// nobody can register another certificate for a node.
    pub tls_pin: String,
    /// Unix seconds.
    pub timestamp: u64,
    /// Hex, 16 random bytes.
    pub nonce: String,
}

impl RegistrationPayload {
    /// A payload stamped with the current time and a fresh random nonce.
    pub fn new_now(
        node_id: impl Into<String>,
        role: impl Into<String>,
        address: impl Into<String>,
        model: impl Into<String>,
        shard_index: i64,
        share_key: impl Into<String>,
    ) -> Self {
        Self {
            node_id: node_id.into(),
            role: role.into(),
            address: address.into(),
            model: model.into(),
            shard_index,
            share_key: share_key.into(),
            tls_pin: String::new(),
            timestamp: unix_now(),
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    /// The exact bytes that are signed: a JSON array (unambiguous whatever the fields
    /// contain) of the domain tag and every field, hex fields lower-cased so that
    /// checksummed and lower-case spellings sign the same bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!([
            DOMAIN,
            self.node_id.to_ascii_lowercase(),
            self.role,
            self.address,
            self.model,
            self.shard_index,
            self.share_key.to_ascii_lowercase(),
            self.tls_pin.to_ascii_lowercase(),
            self.timestamp,
            self.nonce.to_ascii_lowercase(),
        ]))
        .expect("a JSON array of strings and integers always serializes")
    }
}

/// Signs `p` with EIP-191 (`personal_sign`): 65 bytes, r || s || v.
pub fn sign_registration(
    signer: &PrivateKeySigner,
    p: &RegistrationPayload,
) -> anyhow::Result<Vec<u8>> {
    let sig = signer
        .sign_message_sync(&p.canonical_bytes())
        .context("signing the registration payload")?;
    Ok(sig.as_bytes().to_vec())
}

/// Why a registration was refused; `as_str` is the stable snake_case code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    BadSignature,
    WrongSigner,
    StaleTimestamp,
    ReplayedNonce,
    NotStaked,
    UnderStaked,
    ChainUnavailable,
}

impl RejectReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::BadSignature => "bad_signature",
            RejectReason::WrongSigner => "wrong_signer",
            RejectReason::StaleTimestamp => "stale_timestamp",
            RejectReason::ReplayedNonce => "replayed_nonce",
            RejectReason::NotStaked => "not_staked",
            RejectReason::UnderStaked => "under_staked",
            RejectReason::ChainUnavailable => "chain_unavailable",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused registration: a machine-readable reason and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Rejection {}

/// A wallet's standing in the escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StakeStatus {
    pub stake: U256,
    pub min_stake: U256,
    pub eligible: bool,
}

/// Verifies signed registrations against the escrow contract.
pub struct AdmissionVerifier {
    escrow: UnfedEscrow::UnfedEscrowInstance<DynProvider>,
    max_skew: Duration,
    /// (lower-case node id, lower-case nonce) -> unix seconds after which it is forgotten.
    seen: Mutex<HashMap<(String, String), u64>>,
}

impl AdmissionVerifier {
    /// `max_skew` bounds how far a registration's timestamp may be from the registry's
    /// clock, either way; nonces are remembered for twice that, after which a replay
    /// would be refused as stale anyway.
    pub fn new(rpc_url: &str, escrow: Address, max_skew: Duration) -> anyhow::Result<Self> {
        let url = rpc_url
            .parse()
            .with_context(|| format!("chain RPC URL {rpc_url:?} is not a valid URL"))?;
        let provider = ProviderBuilder::new().connect_http(url).erased();
        Ok(Self {
            escrow: UnfedEscrow::new(escrow, provider),
            max_skew,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Admits `p` if `sig` is its registration signature by the wallet `p.node_id`, the
    /// timestamp is within the skew, the nonce is new and the wallet is eligible.
    pub async fn admit(&self, p: &RegistrationPayload, sig: &[u8]) -> Result<(), Rejection> {
        let claimed = parse_node_id(&p.node_id)?;
        let signature = Signature::try_from(sig).map_err(|_| {
            Rejection::new(
                RejectReason::BadSignature,
                format!(
                    "registration signature is not a 65-byte secp256k1 signature ({} bytes given)",
                    sig.len()
                ),
            )
        })?;
        let signer = signature
            .recover_address_from_msg(p.canonical_bytes())
            .map_err(|e| {
                Rejection::new(
                    RejectReason::BadSignature,
                    format!("cannot recover a signer from the registration signature: {e}"),
                )
            })?;
        if signer != claimed {
            return Err(Rejection::new(
                RejectReason::WrongSigner,
                format!(
                    "registration for node {claimed} is signed by {signer}; sign with the \
                     node's own stake wallet (UNFED_STAKE_EVM_PRIVATE_KEY_FILE must hold the \
                     key of --eth-address)"
                ),
            ));
        }

        let now = unix_now();
        let skew = self.max_skew.as_secs();
        if p.timestamp.abs_diff(now) > skew {
            return Err(Rejection::new(
                RejectReason::StaleTimestamp,
                format!(
                    "registration timestamp {} is {}s from the registry clock ({now}); at most \
                     {skew}s is accepted: check the node's clock and sign a fresh registration",
                    p.timestamp,
                    p.timestamp.abs_diff(now)
                ),
            ));
        }
        self.claim_nonce(&claimed, &p.nonce, now)?;

        let status = self.stake_status(claimed).await.map_err(|e| {
            Rejection::new(
                RejectReason::ChainUnavailable,
                format!("cannot check the stake of {claimed} on chain: {e:#}"),
            )
        })?;
        if status.eligible {
            return Ok(());
        }
        let (reason, what) = if status.stake.is_zero() {
            (RejectReason::NotStaked, "has no stake".to_string())
        } else {
            (
                RejectReason::UnderStaked,
                format!("stakes only {}", format_amount(status.stake)),
            )
        };
        Err(Rejection::new(
            reason,
            format!(
                "wallet {claimed} {what}; admission needs at least {} staked in escrow {}: \
                 stake with `unfedctl chain stake` (or approve + stake on the escrow)",
                format_amount(status.min_stake),
                self.escrow.address()
            ),
        ))
    }

    /// Whether `node_id` is currently eligible (the registry's periodic re-check).
    pub async fn is_eligible(&self, node_id: &str) -> anyhow::Result<bool> {
        let node = parse_node_id(node_id).map_err(|r| anyhow::anyhow!(r.message))?;
        // One call: this runs for every admitted node on each re-check interval.
        self.escrow
            .isEligible(node)
            .call()
            .await
            .context("isEligible")
    }

    /// Stake, minimum stake and eligibility of `node`, read from the escrow.
    pub async fn stake_status(&self, node: Address) -> anyhow::Result<StakeStatus> {
        let eligible = self
            .escrow
            .isEligible(node)
            .call()
            .await
            .context("isEligible")?;
        let stake = self
            .escrow
            .stakedBalance(node)
            .call()
            .await
            .context("stakedBalance")?;
        let min_stake = self.escrow.minStake().call().await.context("minStake")?;
        Ok(StakeStatus {
            stake,
            min_stake,
            eligible,
        })
    }

    /// Records the nonce, refusing one already seen from this node; drops expired ones.
    fn claim_nonce(&self, node: &Address, nonce: &str, now: u64) -> Result<(), Rejection> {
        let nonce = nonce.to_ascii_lowercase();
        if nonce.len() < 16 || !nonce.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Rejection::new(
                RejectReason::BadSignature,
                "registration nonce must be at least 8 random bytes in hex",
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, expires| *expires > now);
        let key = (format!("{node:#x}"), nonce);
        if seen.contains_key(&key) {
            return Err(Rejection::new(
                RejectReason::ReplayedNonce,
                format!(
                    "nonce {} was already used by {node}; every registration needs a fresh nonce",
                    key.1
                ),
            ));
        }
        seen.insert(key, now + 2 * self.max_skew.as_secs().max(1));
        Ok(())
    }
}

fn parse_node_id(node_id: &str) -> Result<Address, Rejection> {
    node_id.trim().parse::<Address>().map_err(|_| {
        Rejection::new(
            RejectReason::WrongSigner,
            format!("node id {node_id:?} is not an EVM address (0x followed by 40 hex digits)"),
        )
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::dev_signer;

    fn payload(node: &PrivateKeySigner) -> RegistrationPayload {
        RegistrationPayload::new_now(
            node.address().to_string(),
            "compute",
            "127.0.0.1:50051",
            "builtin:tiny",
            0,
            "AB".repeat(32),
        )
    }

    // Points at a port nothing listens on: every test here is decided before the chain.
    fn offline_verifier() -> AdmissionVerifier {
        AdmissionVerifier::new("http://127.0.0.1:9", Address::ZERO, Duration::from_secs(60))
            .unwrap()
    }

    #[test]
    fn canonical_bytes_ignore_hex_case_but_bind_every_field() {
        let s = dev_signer(1).unwrap();
        let p = payload(&s);
        let mut lower = p.clone();
        lower.node_id = lower.node_id.to_lowercase();
        lower.share_key = lower.share_key.to_lowercase();
        assert_eq!(p.canonical_bytes(), lower.canonical_bytes());
        let mut other = p.clone();
        other.shard_index = 1;
        assert_ne!(p.canonical_bytes(), other.canonical_bytes());
        let mut other = p.clone();
        other.address = "127.0.0.1:50052".into();
        assert_ne!(p.canonical_bytes(), other.canonical_bytes());
    }

    #[test]
    fn signature_is_65_bytes_and_recovers_the_signer() {
        let s = dev_signer(1).unwrap();
        let p = payload(&s);
        let sig = sign_registration(&s, &p).unwrap();
        assert_eq!(sig.len(), 65);
        let recovered = Signature::try_from(sig.as_slice())
            .unwrap()
            .recover_address_from_msg(p.canonical_bytes())
            .unwrap();
        assert_eq!(recovered, s.address());
    }

    #[tokio::test]
    async fn offline_rejections_have_distinct_reasons() {
        let v = offline_verifier();
        let node = dev_signer(1).unwrap();
        let p = payload(&node);

        let err = v.admit(&p, &[1, 2, 3]).await.unwrap_err();
        assert_eq!(err.reason, RejectReason::BadSignature);

        let forged = sign_registration(&dev_signer(2).unwrap(), &p).unwrap();
        let err = v.admit(&p, &forged).await.unwrap_err();
        assert_eq!(err.reason, RejectReason::WrongSigner);
        assert!(err.message.contains(&node.address().to_string()), "{err}");

        // A signature over one payload does not cover an edited one.
        let sig = sign_registration(&node, &p).unwrap();
        let mut edited = p.clone();
        edited.address = "10.0.0.1:1".into();
        assert_eq!(
            v.admit(&edited, &sig).await.unwrap_err().reason,
            RejectReason::WrongSigner
        );

        let mut stale = payload(&node);
        stale.timestamp -= 61;
        let sig = sign_registration(&node, &stale).unwrap();
        assert_eq!(
            v.admit(&stale, &sig).await.unwrap_err().reason,
            RejectReason::StaleTimestamp
        );
        let mut future = payload(&node);
        future.timestamp += 61;
        let sig = sign_registration(&node, &future).unwrap();
        assert_eq!(
            v.admit(&future, &sig).await.unwrap_err().reason,
            RejectReason::StaleTimestamp
        );

        // First use reaches the (unreachable) chain; the replay is caught before it.
        let sig = sign_registration(&node, &p).unwrap();
        assert_eq!(
            v.admit(&p, &sig).await.unwrap_err().reason,
            RejectReason::ChainUnavailable
        );
        assert_eq!(
            v.admit(&p, &sig).await.unwrap_err().reason,
            RejectReason::ReplayedNonce
        );
    }

    #[test]
    fn reason_codes_are_snake_case_and_distinct() {
        let all = [
            RejectReason::BadSignature,
            RejectReason::WrongSigner,
            RejectReason::StaleTimestamp,
            RejectReason::ReplayedNonce,
            RejectReason::NotStaked,
            RejectReason::UnderStaked,
            RejectReason::ChainUnavailable,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(
            codes
                .iter()
                .all(|c| c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'))
        );
    }
}
