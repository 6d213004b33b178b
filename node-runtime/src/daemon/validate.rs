//! Share validation: each check, in order, with its own rejection reason.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use unfed_proto::ComputeShare;

use super::store::Store;
use crate::shares;

/// Why a share was refused (the `reason` string of its ShareResult).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    SubmitterMismatch,
    MissingField,
    TimestampSkew,
    UnknownNode,
    BadSignature,
    Replay,
    UnknownAnchor,
    BrokenPrevLink,
    NonMonotonicStep,
    SessionCap,
    WindowCap,
    NoVoucher,
    BadVoucher,
    VoucherMismatch,
    VoucherExpired,
    VoucherCap,
    VoucherReplay,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::SubmitterMismatch => "submitter_mismatch",
            Reject::MissingField => "missing_field",
            Reject::TimestampSkew => "timestamp_skew",
            Reject::UnknownNode => "unknown_node",
            Reject::BadSignature => "bad_signature",
            Reject::Replay => "replay",
            Reject::UnknownAnchor => "unknown_anchor",
            Reject::BrokenPrevLink => "broken_prev_link",
            Reject::NonMonotonicStep => "non_monotonic_step",
            Reject::SessionCap => "session_cap",
            Reject::WindowCap => "window_cap",
            Reject::NoVoucher => "no_voucher",
            Reject::BadVoucher => "bad_voucher",
            Reject::VoucherMismatch => "voucher_mismatch",
            Reject::VoucherExpired => "voucher_expired",
            Reject::VoucherCap => "voucher_cap",
            Reject::VoucherReplay => "voucher_replay",
        }
    }
}

/// Limits a share must respect.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How far ahead of the daemon's clock a share may be stamped.
    pub max_skew: Duration,
    /// How old a share may be: nodes keep shares while the daemon is away and
    /// deliver them late.
    pub max_late: Duration,
    pub max_shares_per_session: u64,
    pub max_shares_per_window: u64,
    pub window: Duration,
    /// Prompt rows one share may claim (the original's ReportUsage bound).
    pub max_input_tokens: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_skew: Duration::from_secs(120),
            max_late: Duration::from_secs(6 * 3600),
            max_shares_per_session: 100_000,
            max_shares_per_window: 100_000,
            window: Duration::from_secs(60),
            max_input_tokens: 200_000,
        }
    }
}

pub type Verdict = Result<(), (Reject, String)>;

fn fail(r: Reject, msg: impl Into<String>) -> Verdict {
    Err((r, msg.into()))
}

/// Checks that need neither the store nor the key: submitter, fields, clock.
pub fn check_stateless(submitter: &str, s: &ComputeShare, limits: &Limits, now_ms: u64) -> Verdict {
    if s.node_id != submitter {
        return fail(
            Reject::SubmitterMismatch,
            format!("share of node {:?} submitted by {submitter:?}", s.node_id),
        );
    }
    let missing = [
        (s.node_id.is_empty(), "node_id"),
        (s.model.is_empty(), "model"),
        (s.session_id.is_empty(), "session_id"),
        (s.activation_hash.len() != 32, "activation_hash (32 bytes)"),
        (s.chain_tip.len() != 32, "chain_tip (32 bytes)"),
        (
            !(s.prev_share_hash.is_empty() || s.prev_share_hash.len() == 32),
            "prev_share_hash (empty or 32 bytes)",
        ),
        (s.timestamp_ms == 0, "timestamp_ms"),
        (
            s.shards_total == 0 || s.shard_index >= s.shards_total,
            "shard_index < shards_total",
        ),
        (
            s.output_tokens > 1 || s.input_tokens > limits.max_input_tokens,
            "token counts (output <= 1, input within the cap)",
        ),
        (s.signature.is_empty(), "signature"),
    ];
    if let Some((_, field)) = missing.iter().find(|(bad, _)| *bad) {
        return fail(
            Reject::MissingField,
            format!("missing or malformed field: {field}"),
        );
    }
    let ahead = s.timestamp_ms.saturating_sub(now_ms);
    if ahead > limits.max_skew.as_millis() as u64 {
        return fail(
            Reject::TimestampSkew,
            format!(
                "timestamp is {:.1} s ahead of the daemon's clock (max {} s); check the node's clock",
                ahead as f64 / 1e3,
                limits.max_skew.as_secs()
            ),
        );
    }
    let age = now_ms.saturating_sub(s.timestamp_ms);
    if age > limits.max_late.as_millis() as u64 {
        return fail(
            Reject::TimestampSkew,
            format!(
                "the share is {:.1} s old, older than the daemon accepts (--max-late-secs {}); \
                 check the node's clock",
                age as f64 / 1e3,
                limits.max_late.as_secs()
            ),
        );
    }
    Ok(())
}

pub fn check_signature(key: &VerifyingKey, s: &ComputeShare) -> Verdict {
    shares::verify(key, s).or_else(|e| fail(Reject::BadSignature, format!("{e:#}")))
}

/// Checks against the chain: replay, anchor, link, order, caps. Storage errors are
/// the daemon's fault and surface as `Err` of the outer result.
pub fn check_chain(
    store: &Store,
    hash: &[u8; 32],
    s: &ComputeShare,
    limits: &Limits,
    now_ms: u64,
) -> anyhow::Result<Verdict> {
    if store.share_exists(hash)? {
        return Ok(fail(Reject::Replay, "this share was already accepted"));
    }
    if s.chain_tip != shares::GENESIS && !store.block_exists(&s.chain_tip)? {
        return Ok(fail(
            Reject::UnknownAnchor,
            format!(
                "chain tip {} is not a block of this chain",
                hex::encode(&s.chain_tip)
            ),
        ));
    }
    let last = store.last_share(&s.node_id, &s.session_id)?;
    match &last {
        None if !s.prev_share_hash.is_empty() => {
            return Ok(fail(
                Reject::BrokenPrevLink,
                "first share of the session must have an empty prev_share_hash",
            ));
        }
        Some(l) if s.prev_share_hash != l.hash => {
            return Ok(fail(
                Reject::BrokenPrevLink,
                format!(
                    "prev_share_hash does not name the node's last accepted share of the session ({})",
                    hex::encode(l.hash)
                ),
            ));
        }
        _ => {}
    }
    if let Some(l) = &last {
        if s.step <= l.step {
            return Ok(fail(
                Reject::NonMonotonicStep,
                format!("step {} does not follow step {}", s.step, l.step),
            ));
        }
        if l.count >= limits.max_shares_per_session {
            return Ok(fail(
                Reject::SessionCap,
                format!(
                    "session already has {} shares from this node (cap {})",
                    l.count, limits.max_shares_per_session
                ),
            ));
        }
    }
    let since = now_ms.saturating_sub(limits.window.as_millis() as u64);
    let recent = store.shares_since(&s.node_id, since)?;
    if recent >= limits.max_shares_per_window {
        return Ok(fail(
            Reject::WindowCap,
            format!(
                "{recent} shares from this node in the last {} s (cap {})",
                limits.window.as_secs(),
                limits.max_shares_per_window
            ),
        ));
    }
    Ok(Ok(()))
}
