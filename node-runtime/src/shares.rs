//! Compute shares: the record of one served hop, its canonical bytes, its hash and its
//! Ed25519 signature. Compute nodes sign them; the daemon verifies them.

use anyhow::{Context, Result, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use unfed_proto::ComputeShare;

/// Domain separator: a share signature can never be replayed as another message.
const DOMAIN: &[u8] = b"unfed.v1.compute-share\0";

/// The hash nodes anchor to before the first block exists.
pub const GENESIS: [u8; 32] = [0; 32];

/// Canonical bytes of every signed field: fixed-width big-endian integers and
/// length-prefixed strings/bytes, in field order. Independent of protobuf encoding.
pub fn canonical_bytes(s: &ComputeShare) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(DOMAIN);
    let mut put = |field: &[u8]| {
        b.extend_from_slice(&(field.len() as u32).to_be_bytes());
        b.extend_from_slice(field);
    };
    put(s.node_id.as_bytes());
    put(s.model.as_bytes());
    put(&s.shard_index.to_be_bytes());
    put(&s.shards_total.to_be_bytes());
    put(s.session_id.as_bytes());
    put(&s.step.to_be_bytes());
    put(&s.input_tokens.to_be_bytes());
    put(&s.output_tokens.to_be_bytes());
    put(&s.activation_hash);
    put(&s.timestamp_ms.to_be_bytes());
    put(&s.nonce.to_be_bytes());
    put(&s.prev_share_hash);
    put(&s.chain_tip);
    put(s.client.as_bytes());
    b
}

/// The share's identity: sha256 of its canonical bytes (the signature is excluded, so
/// a re-signed copy is the same share).
pub fn share_hash(s: &ComputeShare) -> [u8; 32] {
    Sha256::digest(canonical_bytes(s)).into()
}

/// Signs `share` in place.
pub fn sign(key: &SigningKey, share: &mut ComputeShare) {
    share.signature = key.sign(&canonical_bytes(share)).to_bytes().to_vec();
}

/// Checks the share's signature against `key`.
pub fn verify(key: &VerifyingKey, share: &ComputeShare) -> Result<()> {
    let sig = Signature::from_slice(&share.signature).context("the signature is not 64 bytes")?;
    key.verify(&canonical_bytes(share), &sig)
        .context("the Ed25519 signature does not match the share")
}

/// Parses a hex Ed25519 public key as the registry stores it.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey> {
    let bytes = hex::decode(hex_key.trim_start_matches("0x"))
        .with_context(|| format!("share key {hex_key:?} is not hex"))?;
    let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!(
            "share key {hex_key:?} is {} bytes, an Ed25519 public key is 32",
            bytes.len()
        );
    };
    VerifyingKey::from_bytes(&arr)
        .with_context(|| format!("share key {hex_key:?} is not a valid Ed25519 point"))
}

/// A fresh share-signing key from the OS random generator.
pub fn generate_key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

/// Hex of the public half, as registered with the registry.
pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ComputeShare {
        ComputeShare {
            node_id: "0xabc".into(),
            model: "m".into(),
            shard_index: 1,
            shards_total: 2,
            session_id: "s".into(),
            step: 3,
            input_tokens: 0,
            output_tokens: 1,
            activation_hash: vec![7; 32],
            timestamp_ms: 1,
            nonce: 9,
            prev_share_hash: vec![1; 32],
            chain_tip: GENESIS.to_vec(),
            client: String::new(),
            signature: Vec::new(),
        }
    }

    #[test]
    fn signature_covers_every_field() {
        let key = generate_key();
        let mut s = sample();
        sign(&key, &mut s);
        verify(&key.verifying_key(), &s).unwrap();
        let h = share_hash(&s);
        let mut t = s.clone();
        t.step += 1;
        assert!(verify(&key.verifying_key(), &t).is_err());
        assert_ne!(share_hash(&t), h);
        let mut t = s.clone();
        t.client = "0xdef".into();
        assert!(verify(&key.verifying_key(), &t).is_err());
        // Length prefixes: moving bytes between adjacent fields changes the bytes.
        let (mut a, mut b) = (sample(), sample());
        a.node_id = "ab".into();
        a.model = "c".into();
        b.node_id = "a".into();
        b.model = "bc".into();
        assert_ne!(canonical_bytes(&a), canonical_bytes(&b));
        let other = generate_key();
        assert!(verify(&other.verifying_key(), &s).is_err());
        assert_eq!(
            parse_public_key(&public_key_hex(&key)).unwrap(),
            key.verifying_key()
        );
    }
}
