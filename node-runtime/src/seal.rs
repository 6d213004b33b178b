//! Sealing a message to one recipient (decode_client_sample: the last shard's logits to
//! the client), so the hops it travels back through learn nothing from it.
//!
//! ECIES-style: a fresh X25519 key per message; the ChaCha20-Poly1305 key is
//! HKDF-SHA256 of the shared secret, bound to both public keys and a context (model,
//! session, step), which is also the AEAD's associated data. Each key seals exactly one
//! message, so the all-zero nonce is never reused under a key.
//! Wire format: sender's ephemeral public key (32 bytes) ‖ ciphertext ‖ tag (16 bytes).

use anyhow::{Result, bail};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

const INFO: &[u8] = b"unfed-seal-v1";

fn cipher(shared: &[u8; 32], eph: &PublicKey, to: &PublicKey) -> ChaCha20Poly1305 {
    let mut salt = Vec::with_capacity(64);
    salt.extend_from_slice(eph.as_bytes());
    salt.extend_from_slice(to.as_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(INFO, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    ChaCha20Poly1305::new(&Key::from(key))
}

/// Seals `plaintext` to the X25519 public key `to` (32 bytes), bound to `context`.
pub fn seal(to: &[u8], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let Ok(to) = <[u8; 32]>::try_from(to) else {
        bail!(
            "the client's sealing key has {} bytes; an X25519 public key has 32",
            to.len()
        );
    };
    let to = PublicKey::from(to);
    let eph = StaticSecret::from(rand::random::<[u8; 32]>());
    let eph_pub = PublicKey::from(&eph);
    let shared = eph.diffie_hellman(&to);
    if !shared.was_contributory() {
        bail!("the client's sealing key is a low-order point; send a real X25519 key");
    }
    let sealed = cipher(shared.as_bytes(), &eph_pub, &to)
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: plaintext,
                aad: context,
            },
        )
        .map_err(|_| anyhow::anyhow!("sealing failed"))?;
    Ok([eph_pub.as_bytes().as_slice(), &sealed].concat())
}

/// A recipient's key pair.
pub struct Opener {
    secret: StaticSecret,
    public: PublicKey,
}

impl Opener {
    /// A fresh key pair from the OS's randomness.
    pub fn new() -> Self {
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Opens a message sealed to this key with `context`; fails on any tampering.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < 32 + 16 {
            bail!(
                "a sealed message has at least 48 bytes, got {}",
                sealed.len()
            );
        }
        let eph: [u8; 32] = sealed[..32].try_into().expect("checked length");
        let eph = PublicKey::from(eph);
        let shared = self.secret.diffie_hellman(&eph);
        cipher(shared.as_bytes(), &eph, &self.public)
            .decrypt(
                &Nonce::default(),
                Payload {
                    msg: &sealed[32..],
                    aad: context,
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "the sealed message does not open: it was altered, or sealed to another key or for another step"
                )
            })
    }
}

impl Default for Opener {
    fn default() -> Self {
        Self::new()
    }
}

/// The context a step's sealed logits are bound to.
pub fn logits_context(model: &str, session: &str, step: u32) -> Vec<u8> {
    format!("logits\0{model}\0{session}\0{step}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_recipient_opens_and_any_change_is_refused() {
        let me = Opener::new();
        let ctx = logits_context("m", "s", 3);
        let sealed = seal(&me.public_key(), &ctx, b"logits").unwrap();
        assert_eq!(me.open(&sealed, &ctx).unwrap(), b"logits");
        // Another key, another step, a flipped bit, a truncated message.
        assert!(Opener::new().open(&sealed, &ctx).is_err());
        assert!(me.open(&sealed, &logits_context("m", "s", 4)).is_err());
        let mut bad = sealed.clone();
        bad[40] ^= 1;
        assert!(me.open(&bad, &ctx).is_err());
        assert!(me.open(&sealed[..40], &ctx).is_err());
        // Two seals of the same message differ (fresh ephemeral keys).
        assert_ne!(seal(&me.public_key(), &ctx, b"logits").unwrap(), sealed);
        assert!(seal(&[0u8; 32], &ctx, b"x").is_err(), "low-order key");
        assert!(seal(&[1u8; 31], &ctx, b"x").is_err(), "short key");
    }
}
