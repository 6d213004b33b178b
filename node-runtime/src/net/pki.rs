//! Certificates: the testnet CA `unfedctl up` makes, the node certificates it issues,
//! and the facts other code checks (the pinned key, validity, names).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// A node's identity on the wire: SHA-256 of its certificate's SubjectPublicKeyInfo.
/// Registered (signed by the stake key) next to the share key; clients and nodes refuse
/// a peer whose certificate carries another key, even one the CA signed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    pub fn of_cert(der: &CertificateDer<'_>) -> Result<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        Ok(Self::of_spki(cert.tbs_certificate.subject_pki.raw))
    }

    /// The pin of the first certificate in a PEM file's text.
    pub fn of_cert_pem(pem: &str) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
        Self::of_cert(&der)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Parses the registered form (64 hex digits); empty means "no TLS identity".
    pub fn parse(s: &str) -> Result<Option<Self>> {
        if s.is_empty() {
            return Ok(None);
        }
        let bytes = hex::decode(s).map_err(|_| anyhow!("certificate pin {s:?} is not hex"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow!("certificate pin {s:?} is not 32 bytes"))?;
        Ok(Some(Self(arr)))
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin({})", self.short())
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Refuses a key that does not belong to the certificate (a common mix-up of files).
pub(super) fn check_key_matches(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<()> {
    let pair = KeyPair::try_from(key.secret_der())
        .map_err(|e| anyhow!("the key file holds no usable private key: {e}"))?;
    if Pin::of_spki(&pair.subject_public_key_info()) != Pin::of_cert(cert)? {
        bail!("the key file does not belong to the certificate (their public keys differ)");
    }
    Ok(())
}

/// Whether the PEM private key `key_pem` belongs to the PEM certificate `cert_pem`.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow!("the key file is not a PEM private key: {e}"))?;
    check_key_matches(&cert, &key)
}

/// A certificate authority: its certificate and key, as PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate and its private key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub pin: Pin,
}

/// A new key and a signing request for it, both PEM: what a joining node sends the CA.
pub fn signing_request(name: &str) -> Result<(String, String)> {
    let key = key_pair()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .context("making a certificate signing request")?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn key_pair() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a key pair")
}

fn now_offset(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

impl Ca {
    /// A new CA named after the testnet, valid for ten years.
    pub fn generate(testnet: &str) -> Result<Self> {
        let key = key_pair()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("UNFED testnet CA ({testnet})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now_offset(-1);
        params.not_after = now_offset(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `name` valid for `hosts` (IP addresses or DNS names the
    /// node is dialled at), usable as server and as client, for `days` days.
    pub fn issue(&self, name: &str, hosts: &[String], days: i64) -> Result<Issued> {
        let key = key_pair()?;
        let cert_pem = self.sign(name, hosts, days, &key)?;
        Ok(Issued {
            pin: Pin::of_spki(&key.subject_public_key_info()),
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for the key of a signing request made elsewhere (a host
    /// joining the testnet keeps its keys): the CA decides the name and the hosts, the
    /// request contributes only its public key (its signature is checked).
    pub fn issue_for_request(
        &self,
        name: &str,
        hosts: &[String],
        days: i64,
        csr_pem: &str,
    ) -> Result<String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).context(
            "the certificate signing request is not a valid, self-signed PKCS#10 request",
        )?;
        self.sign(name, hosts, days, &csr.public_key)
    }

    fn sign(
        &self,
        name: &str,
        hosts: &[String],
        days: i64,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<String> {
        if hosts.is_empty() {
            bail!("a node certificate needs at least one host name or address");
        }
        let ca_key = KeyPair::from_pem(&self.key_pem).context("the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).context("the CA certificate")?;
        let mut params = CertificateParams::new(hosts.to_vec())
            .with_context(|| format!("host names {hosts:?}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now_offset(-1);
        params.not_after = now_offset(days);
        Ok(params.signed_by(key, &issuer)?.pem())
    }

    /// Loads the CA of a run directory (the key file must be private).
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        Ok(Self {
            cert_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: unfed_chain::keys::read_private_file(key)?,
        })
    }
}

/// What a certificate file says, for preflight.
#[derive(Debug, Clone)]
pub struct CertFacts {
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub pin: Pin,
}

impl CertFacts {
    pub fn of_pem(pem: &str) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        dns_names.push(d.to_string())
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            dns_names,
            ips,
            pin: Pin::of_spki(cert.tbs_certificate.subject_pki.raw),
        })
    }

    /// Whether `cert_pem`'s signature verifies under the key of the CA in `ca_pem`.
    pub fn signed_by(cert_pem: &str, ca_pem: &str) -> Result<()> {
        use rustls::pki_types::pem::PemObject;
        let der = |pem: &str, what: &str| {
            CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| anyhow!("the {what} is not a PEM certificate: {e}"))
        };
        let (cert, ca) = (der(cert_pem, "certificate")?, der(ca_pem, "CA file")?);
        let (_, cert) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| anyhow!("the certificate is not X.509: {e}"))?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca)
            .map_err(|e| anyhow!("the CA file is not X.509: {e}"))?;
        cert.verify_signature(Some(ca.public_key())).map_err(|_| {
            anyhow!(
                "the certificate was not signed by this CA ({})",
                ca.subject()
            )
        })
    }

    /// Whether the certificate names `host` (an IP address or a DNS name).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(host)),
        }
    }

    /// Every name the certificate covers, for messages.
    pub fn names(&self) -> String {
        let mut v: Vec<String> = self.dns_names.clone();
        v.extend(self.ips.iter().map(|i| i.to_string()));
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_pin_and_names() {
        let ca = Ca::generate("t").unwrap();
        let a = ca
            .issue("node-a", &["127.0.0.1".into(), "localhost".into()], 30)
            .unwrap();
        let facts = CertFacts::of_pem(&a.cert_pem).unwrap();
        assert_eq!(facts.pin, a.pin);
        assert_eq!(Pin::of_cert_pem(&a.cert_pem).unwrap(), a.pin);
        assert!(facts.covers("127.0.0.1") && facts.covers("LOCALHOST"));
        assert!(!facts.covers("10.0.0.1"));
        let b = ca.issue("node-b", &["127.0.0.1".into()], 30).unwrap();
        assert_ne!(a.pin, b.pin);
        assert_eq!(Pin::parse(&a.pin.hex()).unwrap(), Some(a.pin));
        assert!(Pin::parse("zz").is_err());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        use rustls::pki_types::pem::PemObject;
        let ca = Ca::generate("t").unwrap();
        let a = ca.issue("a", &["127.0.0.1".into()], 30).unwrap();
        let b = ca.issue("b", &["127.0.0.1".into()], 30).unwrap();
        let cert = CertificateDer::from_pem_slice(a.cert_pem.as_bytes()).unwrap();
        let key_b = PrivateKeyDer::from_pem_slice(b.key_pem.as_bytes()).unwrap();
        let err = check_key_matches(&cert, &key_b).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        let key_a = PrivateKeyDer::from_pem_slice(a.key_pem.as_bytes()).unwrap();
        check_key_matches(&cert, &key_a).unwrap();
    }

    /// A joining node's request gets a certificate for its own key, with the names the
    /// CA chose (not the request's), and a tampered request is refused.
    #[test]
    fn a_signing_request_gets_a_certificate_for_its_key_and_the_cas_names() {
        let ca = Ca::generate("t").unwrap();
        let (key_pem, csr_pem) = signing_request("compute-1").unwrap();
        let cert = ca
            .issue_for_request("compute-1", &["10.1.0.2".into()], 30, &csr_pem)
            .unwrap();
        key_matches(&cert, &key_pem).unwrap();
        CertFacts::signed_by(&cert, &ca.cert_pem).unwrap();
        let info = CertFacts::of_pem(&cert).unwrap();
        assert!(info.covers("10.1.0.2") && !info.covers("127.0.0.1"));
        // One base64 character of the signed body changed: the signature no longer holds.
        let mut tampered = csr_pem.clone().into_bytes();
        let at = csr_pem.find('\n').unwrap() + 60;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(
            ca.issue_for_request("x", &["10.1.0.2".into()], 30, &tampered)
                .is_err()
        );
    }
}
