//! Wallet sign-in: the server issues a single-use challenge with a TTL, the wallet signs
//! it (EIP-191 `personal_sign`), the recovered address must be the one the challenge was
//! issued to, and the server answers with a session token that expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use unfed_chain::Address;

/// Why a sign-in step or a session was refused; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("`{0}` is not an EVM address (0x followed by 40 hex digits)")]
    BadAddress(String),
    #[error("unknown or already used challenge; ask for a new one")]
    UnknownChallenge,
    #[error("the challenge expired; ask for a new one")]
    ChallengeExpired,
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("the challenge was signed by {signer}, not by {expected}")]
    WrongSigner { signer: Address, expected: Address },
    #[error("sign in first (no session token)")]
    NoSession,
    #[error("the session expired or is unknown; sign in again")]
    SessionExpired,
    #[error(
        "too many sign-ins are in progress ({MAX_CHALLENGES} open challenges); try again in a few minutes"
    )]
    TooManyChallenges,
}

impl AuthError {
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::BadAddress(_) => 400,
            AuthError::TooManyChallenges => 429,
            _ => 401,
        }
    }
}

/// Open challenges at most. Anyone may ask for one without proof of anything, so the map
/// must not grow with an attacker's requests: a sign-in takes seconds and a challenge
/// lives 5 minutes, so 10,000 is far above honest use and a few MB at most.
pub const MAX_CHALLENGES: usize = 10_000;
/// Sessions at most; beyond it the oldest is evicted (its wallet signs in again). A
/// session costs a signature, which any throwaway wallet can make, so it is bounded too.
pub const MAX_SESSIONS: usize = 10_000;

struct Challenge {
    address: Address,
    message: String,
    expires: Instant,
    /// With a chain: the message is a spending delegation to this fresh key, which then
    /// signs the session's vouchers (the wallet signs once, at sign-in).
    delegate: Option<(unfed_chain::PrivateKeySigner, unfed_chain::Delegation)>,
}

/// What a sign-in may delegate: chain id, escrow, and the spend cap of one session.
pub type SpendTerms = (u64, Address, unfed_chain::U256);

struct Session {
    address: Address,
    /// Signs the session's spending vouchers; `None`: chats are not paid.
    payer: Option<crate::voucher::Payer>,
    expires: Instant,
    /// Order of opening, to evict the oldest beyond MAX_SESSIONS.
    serial: u64,
}

/// A signed-in wallet's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub token: String,
    pub address: Address,
    pub expires_in: Duration,
}

pub struct Auth {
    challenge_ttl: Duration,
    session_ttl: Duration,
    challenges: Mutex<HashMap<String, Challenge>>,
    sessions: Mutex<HashMap<String, Session>>,
    opened: std::sync::atomic::AtomicU64,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Auth {
    pub fn new(challenge_ttl: Duration, session_ttl: Duration) -> Self {
        Self {
            challenge_ttl,
            session_ttl,
            challenges: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            opened: Default::default(),
        }
    }

    /// A challenge for `address` to sign: `(nonce, message)`. With `spend`, the message
    /// is a spending delegation (capped, expiring with the session) to a key the
    /// dashboard holds for this session only.
    pub fn challenge(
        &self,
        address: &str,
        site: &str,
        spend: Option<SpendTerms>,
    ) -> Result<(String, String), AuthError> {
        let addr: Address = address
            .trim()
            .parse()
            .map_err(|_| AuthError::BadAddress(address.to_string()))?;
        let nonce = random_hex();
        let issued = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut delegate = None;
        let message = match spend {
            None => format!(
                "Sign in to the UNFED dashboard at {site}\n\nWallet: {addr}\nNonce: {nonce}\nIssued at: {issued}\n\nSigning proves you hold this wallet; it costs nothing."
            ),
            Some((chain_id, escrow, cap)) => {
                let key = unfed_chain::PrivateKeySigner::random();
                let d = unfed_chain::Delegation {
                    client: addr,
                    delegate: key.address(),
                    max_spend: cap,
                    expiry: issued + self.session_ttl.as_secs(),
                    nonce: format!("{nonce} (sign-in to the UNFED dashboard at {site})"),
                    signature: Vec::new(),
                };
                let text = d.text(chain_id, escrow);
                delegate = Some((key, d));
                text
            }
        };
        let mut challenges = self.challenges.lock().expect("challenges poisoned");
        let now = Instant::now();
        challenges.retain(|_, c| c.expires > now);
        // Refused rather than evicting: evicting would let a flood cancel sign-ins that
        // are in progress.
        if challenges.len() >= MAX_CHALLENGES {
            return Err(AuthError::TooManyChallenges);
        }
        challenges.insert(
            nonce.clone(),
            Challenge {
                address: addr,
                message: message.clone(),
                expires: now + self.challenge_ttl,
                delegate,
            },
        );
        Ok((nonce, message))
    }

    /// Checks the wallet's signature of challenge `nonce`; the challenge is used up
    /// whatever the outcome, so a signature cannot be tried twice.
    pub fn verify(&self, nonce: &str, signature: &str) -> Result<SignedIn, AuthError> {
        self.verify_as(nonce, Some(signature))
    }

    /// `verify` with the signature check skipped (`None`): the dev auth bypass, which
    /// the server allows only on a loopback address.
    pub fn verify_as(&self, nonce: &str, signature: Option<&str>) -> Result<SignedIn, AuthError> {
        let c = self
            .challenges
            .lock()
            .expect("challenges poisoned")
            .remove(nonce)
            .ok_or(AuthError::UnknownChallenge)?;
        if c.expires <= Instant::now() {
            return Err(AuthError::ChallengeExpired);
        }
        let mut payer = None;
        if let Some(signature) = signature {
            let signer = unfed_chain::recover_personal_signer(&c.message, signature)
                .map_err(|e| AuthError::BadSignature(format!("{e:#}")))?;
            if signer != c.address {
                return Err(AuthError::WrongSigner {
                    signer,
                    expected: c.address,
                });
            }
            payer = c.delegate.map(|(key, mut d)| {
                d.signature =
                    hex::decode(signature.trim().trim_start_matches("0x")).unwrap_or_default();
                crate::voucher::Payer {
                    signer: key,
                    delegation: Some(d),
                }
            });
        }
        Ok(self.open_session(c.address, payer))
    }

    /// A session for `address` (after a checked signature, or demo sign-in), paying
    /// through `payer` when it can sign vouchers.
    pub fn open_session(&self, address: Address, payer: Option<crate::voucher::Payer>) -> SignedIn {
        let token = random_hex();
        let mut sessions = self.sessions.lock().expect("sessions poisoned");
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.serial)
                .map(|(t, _)| t.clone());
            if let Some(t) = oldest {
                sessions.remove(&t);
            }
        }
        sessions.insert(
            token.clone(),
            Session {
                address,
                payer,
                expires: now + self.session_ttl,
                serial: self
                    .opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            },
        );
        SignedIn {
            token,
            address,
            expires_in: self.session_ttl,
        }
    }

    /// The wallet signed in with `token`.
    pub fn session(&self, token: Option<&str>) -> Result<Address, AuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NoSession)?;
        let sessions = self.sessions.lock().expect("sessions poisoned");
        match sessions.get(token) {
            Some(s) if s.expires > Instant::now() => Ok(s.address),
            _ => Err(AuthError::SessionExpired),
        }
    }

    /// Who signs the vouchers of `token`'s chats (`None`: they are not paid).
    pub fn payer(&self, token: Option<&str>) -> Option<crate::voucher::Payer> {
        let sessions = self.sessions.lock().expect("sessions poisoned");
        let s = sessions.get(token?)?;
        (s.expires > Instant::now())
            .then(|| s.payer.clone())
            .flatten()
    }

    /// Ends a session (sign out).
    pub fn end(&self, token: &str) {
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wallet(i: u32) -> unfed_chain::PrivateKeySigner {
        unfed_chain::dev_signer(i).unwrap()
    }

    fn sign(i: u32, message: &str) -> String {
        unfed_chain::personal_sign(&wallet(i), message).unwrap()
    }

    #[test]
    fn a_signed_challenge_opens_a_session_once() {
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        let me = wallet(1).address().to_string();
        let (nonce, message) = auth.challenge(&me, "http://127.0.0.1:8080", None).unwrap();
        assert!(message.contains(&me) && message.contains(&nonce));
        let signed = auth.verify(&nonce, &sign(1, &message)).unwrap();
        assert_eq!(signed.address.to_string(), me);
        assert_eq!(auth.session(Some(&signed.token)).unwrap(), signed.address);
        // Single use: the same signature cannot open a second session.
        assert_eq!(
            auth.verify(&nonce, &sign(1, &message)),
            Err(AuthError::UnknownChallenge)
        );
        auth.end(&signed.token);
        assert_eq!(
            auth.session(Some(&signed.token)),
            Err(AuthError::SessionExpired)
        );
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        let err = auth.challenge("0x12", "site", None).unwrap_err();
        assert_eq!(
            (err.http_status(), &err),
            (400, &AuthError::BadAddress("0x12".into()))
        );
        let me = wallet(1).address().to_string();
        // Another wallet signs my challenge.
        let (nonce, message) = auth.challenge(&me, "site", None).unwrap();
        let err = auth.verify(&nonce, &sign(2, &message)).unwrap_err();
        assert!(matches!(err, AuthError::WrongSigner { .. }), "{err}");
        assert_eq!(err.http_status(), 401);
        // A signature of another message.
        let (nonce, _) = auth.challenge(&me, "site", None).unwrap();
        let err = auth.verify(&nonce, &sign(1, "something else")).unwrap_err();
        assert!(matches!(err, AuthError::WrongSigner { .. }), "{err}");
        // Garbage.
        let (nonce, _) = auth.challenge(&me, "site", None).unwrap();
        assert!(matches!(
            auth.verify(&nonce, "0xzz"),
            Err(AuthError::BadSignature(_))
        ));
        assert_eq!(auth.session(None), Err(AuthError::NoSession));
        assert_eq!(auth.session(Some("nope")), Err(AuthError::SessionExpired));
    }

    #[test]
    fn challenges_and_sessions_expire() {
        let auth = Auth::new(Duration::ZERO, Duration::ZERO);
        let me = wallet(1).address().to_string();
        let (nonce, message) = auth.challenge(&me, "site", None).unwrap();
        assert_eq!(
            auth.verify(&nonce, &sign(1, &message)),
            Err(AuthError::ChallengeExpired)
        );
        let auth = Auth::new(Duration::from_secs(60), Duration::ZERO);
        let (nonce, message) = auth.challenge(&me, "site", None).unwrap();
        let signed = auth.verify(&nonce, &sign(1, &message)).unwrap();
        assert_eq!(
            auth.session(Some(&signed.token)),
            Err(AuthError::SessionExpired)
        );
    }

    #[test]
    fn open_challenges_are_capped_and_expired_ones_swept() {
        let me = wallet(1).address().to_string();
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        for _ in 0..MAX_CHALLENGES {
            auth.challenge(&me, "site", None).unwrap();
        }
        let err = auth.challenge(&me, "site", None).unwrap_err();
        assert_eq!(
            (err.http_status(), &err),
            (429, &AuthError::TooManyChallenges)
        );
        assert!(err.to_string().contains("try again"), "{err}");
        // Using one up frees its slot.
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut last = String::new();
        for _ in 0..MAX_CHALLENGES {
            last = auth.challenge(&me, "site", None).unwrap().0;
        }
        let _ = auth.verify(&last, "0x00");
        assert!(auth.challenge(&me, "site", None).is_ok());
        // Expired challenges do not count: they are swept on the next insert.
        let expiring = Auth::new(Duration::ZERO, Duration::from_secs(60));
        for _ in 0..MAX_CHALLENGES + 10 {
            expiring.challenge(&me, "site", None).unwrap();
        }
        assert_eq!(expiring.challenges.lock().unwrap().len(), 1);
    }

    #[test]
    fn sessions_beyond_the_cap_evict_the_oldest() {
        let who = wallet(1).address();
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        let first = auth.open_session(who, None).token;
        let second = auth.open_session(who, None).token;
        for _ in 2..MAX_SESSIONS {
            auth.open_session(who, None);
        }
        assert!(
            auth.session(Some(&first)).is_ok(),
            "at the cap, nothing is evicted"
        );
        let newest = auth.open_session(who, None).token;
        assert_eq!(auth.sessions.lock().unwrap().len(), MAX_SESSIONS);
        assert_eq!(auth.session(Some(&first)), Err(AuthError::SessionExpired));
        assert!(auth.session(Some(&second)).is_ok());
        assert!(auth.session(Some(&newest)).is_ok());
        // Expired sessions are swept on insert, not evicted in place of live ones.
        let expiring = Auth::new(Duration::from_secs(60), Duration::ZERO);
        for _ in 0..MAX_SESSIONS + 10 {
            expiring.open_session(who, None);
        }
        assert_eq!(expiring.sessions.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_sign_in_with_a_chain_delegates_voucher_signing_within_its_cap() {
        let auth = Auth::new(Duration::from_secs(60), Duration::from_secs(60));
        let me = wallet(1).address().to_string();
        let escrow = Address::repeat_byte(0xee);
        let cap = unfed_chain::U256::from(5000);
        let (nonce, message) = auth
            .challenge(&me, "site", Some((31337, escrow, cap)))
            .unwrap();
        assert!(message.starts_with("UNFED spending delegation"));
        let signed = auth.verify(&nonce, &sign(1, &message)).unwrap();
        let payer = auth.payer(Some(&signed.token)).expect("a paying session");
        assert_eq!(payer.client(), wallet(1).address());
        let terms = crate::voucher::Terms {
            chain_id: 31337,
            escrow,
            prices: crate::daemon::Prices {
                input: unfed_chain::U256::from(1),
                output: unfed_chain::U256::from(1),
            },
        };
        let (v, _) = payer
            .issue(&terms, ("m", "s"), vec!["n".into()], (10, 10))
            .unwrap();
        crate::voucher::from_proto(&v).unwrap().verify().unwrap();
        // A sign-in without chain terms proves the wallet but pays nothing.
        let (nonce, message) = auth.challenge(&me, "site", None).unwrap();
        let plain = auth.verify(&nonce, &sign(1, &message)).unwrap();
        assert!(auth.payer(Some(&plain.token)).is_none());
    }
}
