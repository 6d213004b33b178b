//! Spending vouchers: what a client signs (EIP-712, with its escrow wallet) before a
//! session, so that nodes work for it and the daemon bills it only within terms it
//! agreed to: this session, this route, these caps, until this time.
//!
//! A wallet that cannot sign each session (a browser wallet behind the dashboard, an API
//! key) signs one [`Delegation`] instead (EIP-191, what `personal_sign` produces): a
//! delegate key may sign vouchers for it up to a total spend until a deadline.

use alloy::primitives::{Address, B256, Signature, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Eip712Domain, SolStruct, eip712_domain};
use anyhow::{Context, Result, bail, ensure};

alloy::sol! {
    /// The signed terms of one session.
    #[derive(Debug, PartialEq, Eq)]
    struct SpendingVoucher {
        /// The escrow deposit that pays.
        address client;
        string model;
        /// [`session_hash`] of the session id: nodes and the daemon see the id, the
        /// voucher commits to it.
        bytes32 session;
        /// Node id of every paid hop, in order (an MPC pair's parties first).
        string[] route;
        /// Prompt rows one hop may bill.
        uint32 maxInputTokens;
        /// Generated tokens one hop may bill.
        uint32 maxOutputTokens;
        /// Token units (wei) the whole route may bill.
        uint256 maxSpend;
        /// Unix seconds.
        uint64 expiry;
        uint64 nonce;
    }
}

/// The EIP-712 domain: a voucher is valid on one chain, for one escrow.
pub fn domain(chain_id: u64, escrow: Address) -> Eip712Domain {
    eip712_domain! {
        name: "UNFED",
        version: "1",
        chain_id: chain_id,
        verifying_contract: escrow,
    }
}

/// keccak256, for keys derived from secrets.
pub fn keccak(bytes: &[u8]) -> B256 {
    keccak256(bytes)
}

/// What a voucher commits to for `session_id`.
pub fn session_hash(session_id: &str) -> B256 {
    let mut b = b"unfed-session\0".to_vec();
    b.extend_from_slice(session_id.as_bytes());
    keccak256(b)
}

/// A wallet's permission for `delegate` to sign vouchers in its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    pub client: Address,
    pub delegate: Address,
    /// Total the delegate's vouchers may spend, in token units.
    pub max_spend: U256,
    /// Unix seconds.
    pub expiry: u64,
    /// Makes every delegation text unique (a sign-in challenge, a key id).
    pub nonce: String,
    pub signature: Vec<u8>,
}

impl Delegation {
    /// The text the wallet signs: readable in a wallet's signing prompt, and bound to
    /// one chain and escrow.
    pub fn text(&self, chain_id: u64, escrow: Address) -> String {
        format!(
            "UNFED spending delegation\n\
             I let {delegate} sign spending vouchers paid from my deposit.\n\
             client: {client}\n\
             chain: {chain_id}\n\
             escrow: {escrow}\n\
             max spend (token units): {max}\n\
             expires (unix): {expiry}\n\
             nonce: {nonce}",
            delegate = self.delegate,
            client = self.client,
            max = self.max_spend,
            expiry = self.expiry,
            nonce = self.nonce,
        )
    }

    /// Signs in `client`'s name.
    pub fn sign(
        client: &PrivateKeySigner,
        delegate: Address,
        (max_spend, expiry, nonce): (U256, u64, String),
        (chain_id, escrow): (u64, Address),
    ) -> Result<Self> {
        let mut d = Self {
            client: client.address(),
            delegate,
            max_spend,
            expiry,
            nonce,
            signature: Vec::new(),
        };
        d.signature = client
            .sign_message_sync(d.text(chain_id, escrow).as_bytes())
            .context("signing the delegation")?
            .as_bytes()
            .to_vec();
        Ok(d)
    }

    /// The client's signature over this delegation's text on (`chain_id`, `escrow`).
    pub fn verify(&self, chain_id: u64, escrow: Address) -> Result<()> {
        let sig = Signature::try_from(self.signature.as_slice())
            .context("the delegation's signature is not 65 bytes")?;
        let signer = sig
            .recover_address_from_msg(self.text(chain_id, escrow).as_bytes())
            .context("no signer can be recovered from the delegation")?;
        ensure!(
            signer == self.client,
            "the delegation is signed by {signer}, not by the client {}",
            self.client
        );
        Ok(())
    }

    /// Its identity: the hash of the signed text.
    pub fn id(&self, chain_id: u64, escrow: Address) -> B256 {
        keccak256(self.text(chain_id, escrow))
    }
}

/// A voucher with its domain and signature, as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedVoucher {
    pub voucher: SpendingVoucher,
    pub chain_id: u64,
    pub escrow: Address,
    /// 65 bytes (r, s, v) by the client, or by the delegate when `delegation` is set.
    pub signature: Vec<u8>,
    pub delegation: Option<Delegation>,
}

impl SignedVoucher {
    /// Signs `voucher` with `signer`: the client itself, or the delegate of `delegation`.
    pub fn sign(
        signer: &PrivateKeySigner,
        voucher: SpendingVoucher,
        (chain_id, escrow): (u64, Address),
        delegation: Option<Delegation>,
    ) -> Result<Self> {
        let mut v = Self {
            voucher,
            chain_id,
            escrow,
            signature: Vec::new(),
            delegation,
        };
        v.signature = signer
            .sign_hash_sync(&v.digest())
            .context("signing the spending voucher")?
            .as_bytes()
            .to_vec();
        Ok(v)
    }

    /// The EIP-712 signing hash: the voucher's identity (domain included).
    pub fn digest(&self) -> B256 {
        self.voucher
            .eip712_signing_hash(&domain(self.chain_id, self.escrow))
    }

    /// Who signed the voucher.
    pub fn signer(&self) -> Result<Address> {
        let sig = Signature::try_from(self.signature.as_slice())
            .context("the voucher's signature is not 65 bytes")?;
        sig.recover_address_from_prehash(&self.digest())
            .context("no signer can be recovered from the voucher")
    }

    /// The signature chain: the client signed the voucher, or signed a delegation whose
    /// delegate signed it within the delegation's terms. Caps that span several
    /// vouchers (a delegation's total) are the daemon's to count.
    pub fn verify(&self) -> Result<()> {
        let signer = self.signer()?;
        let client = self.voucher.client;
        match &self.delegation {
            None => ensure!(
                signer == client,
                "the voucher is signed by {signer}, not by its client {client}"
            ),
            Some(d) => {
                ensure!(
                    d.client == client,
                    "the voucher's delegation is from {}, not from its client {client}",
                    d.client
                );
                d.verify(self.chain_id, self.escrow)?;
                ensure!(
                    signer == d.delegate,
                    "the voucher is signed by {signer}, not by the delegate {}",
                    d.delegate
                );
                ensure!(
                    self.voucher.expiry <= d.expiry,
                    "the voucher outlives its delegation"
                );
                ensure!(
                    self.voucher.maxSpend <= d.max_spend,
                    "the voucher's spend cap exceeds its delegation's"
                );
            }
        }
        Ok(())
    }

    /// Checks what every holder of a voucher checks before working for it: signatures,
    /// the session, the hop (`node` at `index` in the route, when given), and time.
    pub fn check_for(&self, session_id: &str, node: &str, now_secs: u64) -> Result<usize> {
        self.verify()?;
        let v = &self.voucher;
        if v.session != session_hash(session_id) {
            bail!("the voucher is for another session");
        }
        if now_secs > v.expiry {
            bail!("the voucher expired {} s ago", now_secs - v.expiry);
        }
        v.route
            .iter()
            .position(|n| n == node)
            .with_context(|| format!("the voucher's route does not name node {node}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voucher(client: Address) -> SpendingVoucher {
        SpendingVoucher {
            client,
            model: "m".into(),
            session: session_hash("s1"),
            route: vec!["a".into(), "b".into()],
            maxInputTokens: 10,
            maxOutputTokens: 5,
            maxSpend: U256::from(1000),
            expiry: 2_000_000_000,
            nonce: 7,
        }
    }

    const DOMAIN: (u64, Address) = (31337, Address::repeat_byte(0xee));

    #[test]
    fn a_client_signed_voucher_verifies_and_names_its_hops() {
        let client = crate::dev_signer(3).unwrap();
        let v = SignedVoucher::sign(&client, voucher(client.address()), DOMAIN, None).unwrap();
        assert_eq!(v.check_for("s1", "b", 1_000).unwrap(), 1);
        assert!(v.check_for("s2", "b", 1_000).is_err(), "another session");
        assert!(
            v.check_for("s1", "c", 1_000).is_err(),
            "a node off the route"
        );
        assert!(v.check_for("s1", "a", 2_000_000_001).is_err(), "expired");
    }

    #[test]
    fn any_changed_field_or_domain_breaks_the_signature() {
        let client = crate::dev_signer(3).unwrap();
        let v = SignedVoucher::sign(&client, voucher(client.address()), DOMAIN, None).unwrap();
        let mut more = v.clone();
        more.voucher.maxSpend = U256::from(10_000);
        assert!(more.verify().is_err());
        let mut other_chain = v.clone();
        other_chain.chain_id = 1;
        assert!(other_chain.verify().is_err());
        let mut spoofed = v.clone();
        spoofed.voucher.client = crate::dev_signer(4).unwrap().address();
        assert!(spoofed.verify().is_err());
        // Someone else's key naming this client.
        let thief = crate::dev_signer(5).unwrap();
        let forged = SignedVoucher::sign(&thief, voucher(client.address()), DOMAIN, None).unwrap();
        assert!(forged.verify().is_err());
    }

    #[test]
    fn a_delegate_signs_within_its_delegation_only() {
        let client = crate::dev_signer(3).unwrap();
        let delegate = PrivateKeySigner::random();
        let d = Delegation::sign(
            &client,
            delegate.address(),
            (U256::from(5000), 2_000_000_000, "n1".into()),
            DOMAIN,
        )
        .unwrap();
        let v = SignedVoucher::sign(
            &delegate,
            voucher(client.address()),
            DOMAIN,
            Some(d.clone()),
        )
        .unwrap();
        v.verify().unwrap();
        let mut greedy = voucher(client.address());
        greedy.maxSpend = U256::from(6000);
        let over = SignedVoucher::sign(&delegate, greedy, DOMAIN, Some(d.clone())).unwrap();
        assert!(over.verify().is_err(), "spend cap above the delegation's");
        let stranger = PrivateKeySigner::random();
        let by_stranger = SignedVoucher::sign(
            &stranger,
            voucher(client.address()),
            DOMAIN,
            Some(d.clone()),
        )
        .unwrap();
        assert!(by_stranger.verify().is_err(), "not the delegate");
        let mut widened = d;
        widened.max_spend = U256::from(1_000_000);
        let self_granted =
            SignedVoucher::sign(&delegate, voucher(client.address()), DOMAIN, Some(widened))
                .unwrap();
        assert!(self_granted.verify().is_err(), "delegation text changed");
    }
}
