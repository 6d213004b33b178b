//! The joining host's side: check the bundle against the spec and the local split, make
//! this host's keys (TLS and wallets, which never leave it), and ask the control host to
//! admit them.

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use unfed_chain::PrivateKeySigner;
use unfed_proto::join_client::JoinClient;
use unfed_proto::{JoinRequest, JoiningNode};

use super::{Bundle, Joined};
use crate::launch::pki::TestnetPki;
use crate::launch::state::{ChainRecord, WalletRecord};
use crate::plan::LaunchPlan;
use crate::spec::LoadedSpec;

/// Joins the testnet as `host` with the bundle at `bundle_path`; `plan` is already the
/// host's own (`LaunchPlan::joined_as`).
pub async fn join(
    loaded: &LoadedSpec,
    plan: &LaunchPlan,
    host: &str,
    bundle_path: &Path,
) -> anyhow::Result<Joined> {
    let bundle = Bundle::read(bundle_path)?;
    ensure!(
        bundle.testnet == plan.name,
        "the bundle {} is for testnet '{}', but the spec is testnet '{}'",
        bundle_path.display(),
        bundle.testnet,
        plan.name
    );
    ensure!(
        bundle.host == host,
        "the bundle {} admits host '{}', not '{host}': use the bundle the control host wrote for '{host}' (<run_dir>/join/{host}.json)",
        bundle_path.display(),
        bundle.host
    );
    let digest = split_here(loaded, plan).await?;
    ensure!(
        digest == bundle.model_digest,
        "the model here splits to digest {digest}, but the bundle is for {} (digest {}): this host's model files differ from the control host's (check model.path)",
        bundle.model_id,
        bundle.model_digest
    );
    let pki = if bundle.ca_pem.is_empty() {
        None
    } else {
        Some(TestnetPki::joined(&plan.run_dir, &bundle.ca_pem)?)
    };
    let stake_default = loaded.spec.nodes.stake;
    let mut nodes = Vec::new();
    let mut wallets = Vec::new();
    for step in plan.steps.iter().filter(|s| plan.runs_on(s, Some(host))) {
        let mut node = JoiningNode {
            name: step.name.clone(),
            ..Default::default()
        };
        if let Some(pki) = &pki {
            let (key_pem, csr_pem) = unfed_node::net::pki::signing_request(&step.name)?;
            crate::launch::pki::replace_file(&pki.files(&step.name).key, &key_pem, true)?;
            node.csr_pem = csr_pem;
        }
        if let Some(chain) = &bundle.chain {
            let key_file = plan.run_dir.join("keys").join(format!("{}.key", step.name));
            let signer = own_wallet(&key_file)?;
            let stake = step.stake.unwrap_or(stake_default);
            let d = unfed_chain::Deployment {
                token: chain.token.parse().context("the bundle's token address")?,
                escrow: chain
                    .escrow
                    .parse()
                    .context("the bundle's escrow address")?,
            };
            node.stake_transactions = unfed_chain::presigned::signed_stake(
                &signer,
                &d,
                chain.chain_id,
                crate::launch::steps::wei(stake),
            )?
            .into_iter()
            .map(|b| b.to_vec())
            .collect();
            node.wallet = signer.address().to_string();
            wallets.push(WalletRecord {
                node: step.name.clone(),
                address: node.wallet.clone(),
                stake: stake.to_string(),
                key_file,
            });
        }
        nodes.push(node);
    }
    ensure!(
        !nodes.is_empty(),
        "the spec places no node on host '{host}' (set host = \"{host}\" on a [[node]])"
    );
    let net = match &pki {
        Some(_) => unfed_node::net::Net::tls(&bundle.ca_pem, None)?,
        None => unfed_node::net::Net::plaintext(),
    };
    println!(
        "joining testnet '{}' at {} as host '{host}'",
        plan.name, bundle.join
    );
    let channel = net
        .connect(&bundle.join, std::time::Duration::from_secs(120), None)
        .await
        .context("cannot reach the control host's join service")?;
    let reply = JoinClient::new(channel)
        .join(JoinRequest {
            testnet: plan.name.clone(),
            host: host.to_string(),
            token: bundle.token.clone(),
            model_digest: digest,
            nodes,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("the control host refused the join")?
        .into_inner();
    if let Some(pki) = &pki {
        for cert in &reply.certificates {
            let files = pki.files(&cert.name);
            ensure!(
                plan.runs_on(
                    plan.step(&cert.name)
                        .context("a certificate for no node of this host")?,
                    Some(host)
                ),
                "the control host issued a certificate for {}, which does not run here",
                cert.name
            );
            unfed_node::net::pki::key_matches(
                &cert.cert_pem,
                &unfed_chain::keys::read_private_file(&files.key)?,
            )?;
            crate::launch::pki::replace_file(&files.cert, &cert.cert_pem, false)?;
        }
    }
    let chain = bundle.chain.as_ref().map(|c| ChainRecord {
        chain_id: c.chain_id,
        token: Some(c.token.clone()),
        escrow: Some(c.escrow.clone()),
        wallets,
        // Empty: this host never dials the control host's Anvil.
        ..ChainRecord::at(c.rpc_url.clone().unwrap_or_default())
    });
    Ok(Joined {
        host: host.to_string(),
        pki,
        registry: reply.registry,
        chain,
    })
}

/// This host's split (cached), and its digest.
async fn split_here(loaded: &LoadedSpec, plan: &LaunchPlan) -> anyhow::Result<String> {
    let (loaded, dir) = (loaded.clone(), plan.shards_dir.clone());
    let source = crate::launch::steps::model_source_dir(&loaded, plan);
    tokio::task::spawn_blocking(move || {
        crate::launch::steps::split_cached(&loaded, &source, &dir)?;
        super::model_digest(&dir)
    })
    .await?
}

/// The node's wallet: kept from an earlier join of this host, else a new one (written
/// 0600; the key never leaves this host).
fn own_wallet(key_file: &Path) -> anyhow::Result<PrivateKeySigner> {
    if key_file.exists() {
        return unfed_chain::read_key_file(key_file);
    }
    let signer = PrivateKeySigner::random();
    unfed_chain::write_key_file(key_file, &signer)?;
    Ok(signer)
}

/// Refuses a joined host whose name the spec does not have.
pub fn check_host(plan: &LaunchPlan, host: &str) -> anyhow::Result<()> {
    match plan.hosts.iter().find(|h| h.name == host) {
        None if plan.hosts.is_empty() => bail!(
            "the spec declares no [[host]], so no host joins it; add [[host]] entries (see README \"Running across machines\")"
        ),
        None => {
            let names: Vec<&str> = plan.hosts.iter().map(|h| h.name.as_str()).collect();
            bail!(
                "the spec has no host named '{host}' (its hosts: {})",
                names.join(", ")
            )
        }
        Some(h) if h.control => {
            bail!("'{host}' is the control host: run `unfedctl up` there without --host/--join")
        }
        Some(_) => Ok(()),
    }
}
