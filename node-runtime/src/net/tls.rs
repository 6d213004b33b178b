//! rustls configurations: servers that ask for (but do not require) a client certificate
//! under the testnet CA, and clients that verify the server under the CA and, when
//! given one, against a pinned key.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use super::pki::Pin;

pub(super) struct Tls {
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
    server: Option<Arc<ServerConfig>>,
    /// Without a pin (the registry, a peer whose registration is not known yet).
    client_unpinned: Arc<ClientConfig>,
    pub(super) own_pin: Option<Pin>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

impl Tls {
    pub(super) fn new(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Self> {
        let roots = Arc::new(parse_roots(ca_pem)?);
        let identity = identity
            .map(|(cert, key)| parse_identity(cert, key))
            .transpose()?;
        let own_pin = match &identity {
            Some((chain, _)) => Some(Pin::of_cert(&chain[0])?),
            None => None,
        };
        let server = match &identity {
            Some((chain, key)) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                        .allow_unauthenticated()
                        .build()
                        .context("client certificate verifier")?;
                let mut cfg = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain.clone(), key.clone_key())
                    .context("the certificate and key do not form a usable server identity")?;
                cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
                Some(Arc::new(cfg))
            }
            None => None,
        };
        let client_unpinned = client_config(&roots, identity.as_ref(), None)?;
        Ok(Self {
            roots,
            identity,
            server,
            client_unpinned,
            own_pin,
        })
    }

    /// The server side, for a node with a certificate; a pure client has none.
    pub(super) fn server(&self) -> Option<Arc<ServerConfig>> {
        self.server.clone()
    }

    pub(super) fn client(&self, pin: Option<Pin>) -> Result<Arc<ClientConfig>> {
        match pin {
            None => Ok(self.client_unpinned.clone()),
            // Built per channel: channels are cached by their users.
            Some(pin) => client_config(&self.roots, self.identity.as_ref(), Some(pin)),
        }
    }
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn parse_roots(ca_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("the CA file is not PEM certificates: {e}"))?;
    if cas.is_empty() {
        bail!("the CA file holds no certificate");
    }
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| anyhow!("the CA certificate is not usable: {e}"))?;
    }
    Ok(roots)
}

/// A certificate chain and the key that belongs to its leaf.
fn parse_identity(cert: &str, key: &str) -> Result<Identity> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("the certificate file is not PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        bail!("the certificate file holds no certificate");
    };
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| anyhow!("the key file is not a PEM private key: {e}"))?;
    super::pki::check_key_matches(leaf, &key)?;
    Ok((chain, key))
}

/// The dashboard speaks HTTP/1.1 only (its WebSocket upgrade is an HTTP/1.1 mechanism).
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The dashboard's HTTPS server: its certificate, and no client certificates (browsers
/// have none; users sign in with their wallet).
pub(super) fn https_server(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let (chain, key) = parse_identity(cert_pem, key_pem)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not form a usable server identity")?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// A client of a dashboard whose certificate the CA in `ca_pem` issued.
pub(super) fn https_client(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(parse_roots(ca_pem)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

fn client_config(
    roots: &Arc<RootCertStore>,
    identity: Option<&Identity>,
    pin: Option<Pin>,
) -> Result<Arc<ClientConfig>> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .context("server certificate verifier")?;
    let verifier = Arc::new(PinnedVerifier { inner, pin });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .context("the certificate and key do not form a usable client identity")?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}
/// The CA's verdict, then the pin: a certificate valid under the testnet CA but not the
/// one a node registered is an impersonation.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pin: Option<Pin>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Some(want) = self.pin {
            let got = Pin::of_cert(end_entity)
                .map_err(|e| rustls::Error::General(format!("server certificate: {e:#}")))?;
            if got != want {
                return Err(rustls::Error::General(format!(
                    "the server's certificate key {} is not the one registered for this node ({}): impersonation refused",
                    got.short(),
                    want.short()
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
