//! EIP-191 `personal_sign` messages, as browser wallets sign them: how the dashboard
//! learns which wallet a person controls.

use alloy::primitives::{Address, Signature};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};

/// Signs `message` the way a wallet's `personal_sign` does; 0x-prefixed hex (65 bytes).
pub fn personal_sign(signer: &PrivateKeySigner, message: &str) -> anyhow::Result<String> {
    let sig = signer
        .sign_message_sync(message.as_bytes())
        .context("signing the message")?;
    Ok(format!("0x{}", hex::encode(sig.as_bytes())))
}

/// The address whose key produced `signature_hex` over `message` (EIP-191).
pub fn recover_personal_signer(message: &str, signature_hex: &str) -> anyhow::Result<Address> {
    let bytes = hex::decode(signature_hex.trim().trim_start_matches("0x"))
        .context("the signature is not hex")?;
    if bytes.len() != 65 {
        bail!("the signature is {} bytes, not 65", bytes.len());
    }
    let sig = Signature::try_from(bytes.as_slice()).context("malformed signature")?;
    sig.recover_address_from_msg(message.as_bytes())
        .context("no signer can be recovered from the signature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_recovers_its_signer_and_only_for_its_message() {
        let w = crate::dev_signer(3).unwrap();
        let sig = personal_sign(&w, "sign in: nonce 1").unwrap();
        assert_eq!(
            recover_personal_signer("sign in: nonce 1", &sig).unwrap(),
            w.address()
        );
        let other = recover_personal_signer("sign in: nonce 2", &sig).unwrap();
        assert_ne!(other, w.address());
        assert!(recover_personal_signer("x", "0x1234").is_err());
    }
}
