//! The testnet's certificates: `up` makes a CA and issues every node a certificate for
//! the host it is dialled at, under run_dir/keys/tls (private keys 0600). A host that
//! joined a testnet holds only the CA's certificate and what the control host issued
//! for its nodes' own keys.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use unfed_node::net::pki::Ca;
use unfed_node::net::{Net, TlsFiles};

/// How long node certificates issued by `up` are valid.
pub const NODE_CERT_DAYS: i64 = 90;

pub struct TestnetPki {
    /// `None` on a joined host: the CA key stays with the control host.
    ca: Option<Ca>,
    dir: PathBuf,
}

/// Where a run directory keeps its TLS material.
pub fn tls_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("keys").join("tls")
}

/// Writes `contents` to `path`, replacing an earlier file (a new `up` issues anew).
pub(crate) fn replace_file(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    if private {
        unfed_chain::keys::create_private_file(path, contents.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    } else {
        std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
    }
}

impl TestnetPki {
    /// A fresh CA for this launch of testnet `name`.
    pub fn create(run_dir: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = tls_dir(run_dir);
        let ca = Ca::generate(name)?;
        let files = TlsFiles::in_dir(&dir, "ca");
        replace_file(&files.key, &ca.key_pem, true)?;
        replace_file(&files.ca, &ca.cert_pem, false)?;
        Ok(Self { ca: Some(ca), dir })
    }

    /// A joined host's: the testnet CA's certificate (no key) under `run_dir`.
    pub fn joined(run_dir: &Path, ca_pem: &str) -> anyhow::Result<Self> {
        let dir = tls_dir(run_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        replace_file(&TlsFiles::in_dir(&dir, "ca").ca, ca_pem, false)?;
        Ok(Self { ca: None, dir })
    }

    /// The CA, on the control host.
    pub fn ca(&self) -> Option<&Ca> {
        self.ca.as_ref()
    }

    /// Where `node`'s certificate and key are kept.
    pub fn files(&self, node: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir, node)
    }

    /// The CA certificate clients and nodes trust.
    pub fn ca_path(&self) -> PathBuf {
        TlsFiles::in_dir(&self.dir, "ca").ca
    }

    /// Issues `node` a certificate for `hosts` and writes it with its key; on a joined
    /// host, the certificate the control host issued at the join.
    pub fn issue(&self, node: &str, hosts: &[&str]) -> anyhow::Result<TlsFiles> {
        let files = self.files(node);
        let Some(ca) = &self.ca else {
            anyhow::ensure!(
                files.cert.is_file() && files.key.is_file(),
                "{node} has no certificate from the control host ({} is missing): join again",
                files.cert.display()
            );
            return Ok(files);
        };
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let issued = ca.issue(node, &hosts, NODE_CERT_DAYS)?;
        replace_file(&files.key, &issued.key_pem, true)?;
        replace_file(&files.cert, &issued.cert_pem, false)?;
        Ok(files)
    }

    /// The launcher's own transport: trusts the CA, presents no certificate.
    pub fn client_net(&self) -> anyhow::Result<Net> {
        Net::client_from_ca(&self.ca_path())
    }
}
