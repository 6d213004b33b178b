//! Who is calling: a node proves it is itself by its client certificate (mutual TLS) or,
//! where a link may be plaintext, by a fresh signature of its registered share key over
//! what it asks, the time and a nonce. The checks every role's RPCs share.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use tonic::Status;

use super::Peer;
use super::pki::Pin;

/// How far a signed call's timestamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

/// A node's proof, in a request, that it made this call now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallProof {
    pub timestamp: u64,
    pub nonce: String,
    pub signature: Vec<u8>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The bytes a call proof signs: the purpose (which RPC), its subject and the freshness.
fn message(purpose: &str, subject: &str, timestamp: u64, nonce: &str) -> Vec<u8> {
    format!("unfed-call-v1\n{purpose}\n{subject}\n{timestamp}\n{nonce}").into_bytes()
}

impl CallProof {
    /// Signs `purpose` (e.g. "registry.Heartbeat") about `subject` (e.g. the node id).
    pub fn sign(key: &SigningKey, purpose: &str, subject: &str) -> Self {
        let timestamp = unix_now();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let signature = key
            .sign(&message(purpose, subject, timestamp, &nonce))
            .to_bytes()
            .to_vec();
        Self {
            timestamp,
            nonce,
            signature,
        }
    }

    /// Checks the signature under `key`, the clock skew, and that the nonce is new.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        purpose: &str,
        subject: &str,
        seen: &ReplayGuard,
    ) -> Result<(), Status> {
        let now = unix_now();
        if self.timestamp.abs_diff(now) > MAX_SKEW.as_secs() {
            return Err(Status::unauthenticated(format!(
                "{purpose}: the signed timestamp is {} s from this node's clock (at most {} s allowed); check the clocks",
                self.timestamp.abs_diff(now),
                MAX_SKEW.as_secs()
            )));
        }
        let sig = ed25519_dalek::Signature::from_slice(&self.signature).map_err(|_| {
            Status::unauthenticated(format!("{purpose}: the call's signature is not 64 bytes"))
        })?;
        key.verify(
            &message(purpose, subject, self.timestamp, &self.nonce),
            &sig,
        )
        .map_err(|_| {
            Status::unauthenticated(format!(
                "{purpose}: the signature is not by {subject}'s registered share key"
            ))
        })?;
        if !seen.first_use(&self.nonce, self.timestamp) {
            return Err(Status::unauthenticated(format!(
                "{purpose}: this signed call was already used (replay refused)"
            )));
        }
        Ok(())
    }
}

/// Nonces seen within the skew window, so a captured call cannot be sent again.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<Seen>,
}

/// Nonces in arrival order (with their time, to expire them) and as a set.
#[derive(Default)]
struct Seen {
    order: VecDeque<(u64, String)>,
    set: HashSet<String>,
}

/// More nonces than this within the window are forgotten oldest first.
const REPLAY_CAP: usize = 100_000;

impl ReplayGuard {
    /// True the first time `nonce` is offered (timestamps outside the window are
    /// refused by the caller before this).
    pub fn first_use(&self, nonce: &str, timestamp: u64) -> bool {
        let mut g = self.seen.lock().expect("replay guard poisoned");
        let Seen { order, set } = &mut *g;
        let horizon = unix_now().saturating_sub(2 * MAX_SKEW.as_secs());
        while let Some((t, n)) = order.front() {
            if *t >= horizon && order.len() < REPLAY_CAP {
                break;
            }
            set.remove(n);
            order.pop_front();
        }
        if !set.insert(nonce.to_string()) {
            return false;
        }
        order.push_back((timestamp.max(horizon), nonce.to_string()));
        true
    }
}

/// The caller's certificate key, or a refusal naming what is required.
pub fn caller_pin(peer: &Peer, what: &str) -> Result<Pin, Status> {
    match peer.pin {
        Some(p) => Ok(p),
        None if peer.tls => Err(Status::unauthenticated(format!(
            "{what} needs the caller's client certificate (mutual TLS); none was presented"
        ))),
        None => Err(Status::unauthenticated(format!(
            "{what} needs mutual TLS, and this link is plaintext"
        ))),
    }
}

/// Whether the caller's certificate is the one `registered` (a registry field, hex).
pub fn is_registered_pin(peer: &Peer, registered: &str) -> bool {
    match (peer.pin, Pin::parse(registered)) {
        (Some(p), Ok(Some(r))) => p == r,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_proofs_bind_key_purpose_subject_and_are_single_use() {
        let key = crate::shares::generate_key();
        let other = crate::shares::generate_key();
        let guard = ReplayGuard::default();
        let p = CallProof::sign(&key, "registry.Heartbeat", "node-1");
        assert!(
            p.verify(
                &other.verifying_key(),
                "registry.Heartbeat",
                "node-1",
                &guard
            )
            .is_err()
        );
        assert!(
            p.verify(
                &key.verifying_key(),
                "registry.Unregister",
                "node-1",
                &guard
            )
            .is_err()
        );
        assert!(
            p.verify(&key.verifying_key(), "registry.Heartbeat", "node-2", &guard)
                .is_err()
        );
        p.verify(&key.verifying_key(), "registry.Heartbeat", "node-1", &guard)
            .unwrap();
        let replay = p
            .verify(&key.verifying_key(), "registry.Heartbeat", "node-1", &guard)
            .unwrap_err();
        assert!(replay.message().contains("replay"), "{}", replay.message());
        let mut stale = CallProof::sign(&key, "registry.Heartbeat", "node-1");
        stale.timestamp -= 600;
        assert!(
            stale
                .verify(&key.verifying_key(), "registry.Heartbeat", "node-1", &guard)
                .is_err()
        );
    }
}
