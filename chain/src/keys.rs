//! Wallet keys: local dev wallets derived from Anvil's well-known mnemonic, private key
//! files (created 0600, refused when group/other can read them), and the environment
//! variables nodes read their stake key from.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use alloy::signers::local::{MnemonicBuilder, PrivateKeySigner};
use anyhow::{Context, bail};

/// Anvil's default development mnemonic. Its keys are public knowledge: local use only.
pub const DEV_MNEMONIC: &str = "test test test test test test test test test test test junk";

/// Path of a file holding the node's stake wallet private key (preferred).
pub const STAKE_KEY_FILE_ENV: &str = "UNFED_STAKE_EVM_PRIVATE_KEY_FILE";
/// The node's stake wallet private key itself (hex), when no key file is used.
pub const STAKE_KEY_ENV: &str = "UNFED_STAKE_EVM_PRIVATE_KEY";

/// The signer at `m/44'/60'/0'/0/{index}` of Anvil's dev mnemonic; index 0 is the
/// account Anvil funds first (the deployer/operator in a local testnet).
pub fn dev_signer(index: u32) -> anyhow::Result<PrivateKeySigner> {
    MnemonicBuilder::from_phrase(DEV_MNEMONIC)
        .index(index)
        .context("invalid derivation index")?
        .build()
        .with_context(|| format!("deriving dev wallet #{index} from the Anvil mnemonic"))
}

/// The dev wallet a local testnet funds and deposits for as its client (`unfedctl up`
/// bills chats to it; the dashboard on a local Anvil offers one-click sign-in as it).
pub const DEV_CLIENT_INDEX: u32 = 1;

/// The testnet's dev client wallet (a public key: local Anvil only).
pub fn dev_client_signer() -> anyhow::Result<PrivateKeySigner> {
    dev_signer(DEV_CLIENT_INDEX)
}

/// Parses a hex private key (with or without `0x`, surrounding whitespace ignored).
/// The error never echoes the key.
pub fn parse_private_key(text: &str) -> anyhow::Result<PrivateKeySigner> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("not a private key: expected 64 hex digits (optionally 0x-prefixed)");
    }
    t.parse::<PrivateKeySigner>()
        .map_err(|_| anyhow::anyhow!("not a valid secp256k1 private key"))
}

/// Writes `signer`'s private key to `path`, creating the file with mode 0600 (the mode is
/// set at creation, never loosened-then-tightened). An existing file is accepted only if
/// it is private and holds the same key, so re-running a setup step is harmless.
pub fn write_key_file(path: &Path, signer: &PrivateKeySigner) -> anyhow::Result<()> {
    let encoded = format!("0x{}", hex::encode(signer.to_bytes()));
    match create_private_file(path, encoded.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing = read_key_file(path)?;
            if existing.address() != signer.address() {
                bail!(
                    "key file {} already exists and holds the key of {}, not {}; \
                     remove it or choose another run directory",
                    path.display(),
                    existing.address(),
                    signer.address()
                );
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("creating key file {}", path.display())),
    }
}

/// Creates `path` (which must not exist) with mode 0600 and writes `contents`; missing
/// parent directories are created 0700. The mode is set at creation, never
/// loosened-then-tightened.
pub fn create_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents)
}

/// Reads a file holding a secret, refusing one that group or others can read.
pub fn read_private_file(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key file {} is accessible by group or others (mode {mode:03o}); \
             a private key must be readable by its owner only. Fix: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))
}

/// Reads a private key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> anyhow::Result<PrivateKeySigner> {
    let text = read_private_file(path)?;
    parse_private_key(&text).with_context(|| format!("key file {}", path.display()))
}

/// The node's stake key from `UNFED_STAKE_EVM_PRIVATE_KEY_FILE` (preferred) or
/// `UNFED_STAKE_EVM_PRIVATE_KEY`; `None` when neither is set (unstaked operation).
pub fn load_stake_key_from_env() -> anyhow::Result<Option<PrivateKeySigner>> {
    if let Some(path) = std::env::var_os(STAKE_KEY_FILE_ENV).filter(|p| !p.is_empty()) {
        return read_key_file(Path::new(&path))
            .with_context(|| format!("loading the stake key named by {STAKE_KEY_FILE_ENV}"))
            .map(Some);
    }
    match std::env::var(STAKE_KEY_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_private_key(&v)
            .with_context(|| format!("{STAKE_KEY_ENV} does not hold a usable key"))
            .map(Some),
        _ => Ok(None),
    }
}

/// Checks that the stake key belongs to the `--eth-address` the node was started with.
pub fn ensure_key_matches(signer: &PrivateKeySigner, eth_address: &str) -> anyhow::Result<()> {
    let claimed: alloy::primitives::Address = eth_address
        .trim()
        .parse()
        .with_context(|| format!("--eth-address {eth_address:?} is not an EVM address"))?;
    if claimed != signer.address() {
        bail!(
            "--eth-address {claimed} does not match the stake key, which belongs to {}; \
             pass --eth-address {} or point {STAKE_KEY_FILE_ENV} at the key of {claimed}",
            signer.address(),
            signer.address()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_wallets_match_anvil_defaults() {
        let a0 = dev_signer(0).unwrap().address();
        assert_eq!(a0.to_string(), "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        let a1 = dev_signer(1).unwrap().address();
        assert_eq!(a1.to_string(), "0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
    }

    #[test]
    fn key_file_is_created_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node-0.key");
        let s = dev_signer(3).unwrap();
        write_key_file(&path, &s).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(read_key_file(&path).unwrap().address(), s.address());
        // Same key again is fine; a different key is refused.
        write_key_file(&path, &s).unwrap();
        let err = write_key_file(&path, &dev_signer(4).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }

    #[test]
    fn key_file_readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        std::fs::write(
            &path,
            format!("0x{}", hex::encode(dev_signer(1).unwrap().to_bytes())),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", read_key_file(&path).unwrap_err());
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        assert!(err.contains("644"), "{err}");
    }

    // The only test that touches these variables (they are process-wide).
    #[test]
    fn stake_key_comes_from_the_file_first_then_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/stake.key");
        write_key_file(&path, &dev_signer(5).unwrap()).unwrap();
        let raw = format!("0x{}", hex::encode(dev_signer(6).unwrap().to_bytes()));
        // SAFETY: no other test in this binary reads or writes these variables.
        unsafe {
            std::env::remove_var(STAKE_KEY_FILE_ENV);
            std::env::remove_var(STAKE_KEY_ENV);
        }
        assert!(load_stake_key_from_env().unwrap().is_none());
        unsafe { std::env::set_var(STAKE_KEY_ENV, &raw) };
        let got = load_stake_key_from_env().unwrap().unwrap();
        assert_eq!(got.address(), dev_signer(6).unwrap().address());
        unsafe { std::env::set_var(STAKE_KEY_FILE_ENV, &path) };
        let got = load_stake_key_from_env().unwrap().unwrap();
        assert_eq!(got.address(), dev_signer(5).unwrap().address());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", load_stake_key_from_env().unwrap_err());
        assert!(
            err.contains(STAKE_KEY_FILE_ENV) && err.contains("chmod 600"),
            "{err}"
        );
        unsafe {
            std::env::remove_var(STAKE_KEY_FILE_ENV);
            std::env::remove_var(STAKE_KEY_ENV);
        }
    }

    #[test]
    fn malformed_key_error_does_not_echo_the_text() {
        let err = parse_private_key("0xdeadbeefsecret")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("deadbeef"), "{err}");
    }

    #[test]
    fn eth_address_mismatch_names_both_addresses() {
        let s = dev_signer(1).unwrap();
        ensure_key_matches(&s, "0x70997970c51812dc3a010c7d01b50e0d17dc79c8").unwrap();
        let other = dev_signer(2).unwrap().address().to_string();
        let err = ensure_key_matches(&s, &other).unwrap_err().to_string();
        assert!(
            err.contains(&other) && err.contains(&s.address().to_string()),
            "{err}"
        );
    }
}
