//! The control host's join service: admits a `[[host]]` with the one-time token of its
//! bundle, issues its nodes' certificates, funds their wallets and submits their stakes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context as _, bail, ensure};
use rand::RngCore as _;
use tonic::{Request, Response, Status};
use unfed_chain::{Address, Chain, U256};
use unfed_node::net::pki::Ca;
use unfed_proto::join_server::{Join, JoinServer};
use unfed_proto::{IssuedCertificate, JoinReply, JoinRequest};

use super::{Bundle, BundleChain, JoinedHost};
use crate::launch::state::RunState;
use crate::launch::steps::{Context, wei};
use crate::plan::LaunchPlan;

/// A running join service; dropping it stops it.
pub struct JoinService {
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JoinService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tokens of one host: the one its current bundle carries, and those already spent.
#[derive(Default)]
struct Tokens {
    current: String,
    spent: Vec<String>,
}

struct Admission {
    plan: LaunchPlan,
    default_stake: crate::spec::TokenAmount,
    ca: Option<Ca>,
    /// Bundle template (token and host filled per host).
    bundle: Bundle,
    tokens: Mutex<HashMap<String, Tokens>>,
    /// The admin wallet (funds joining wallets) and the contracts.
    chain: Option<(Chain, unfed_chain::Deployment)>,
    /// One join at a time on the chain: the admin wallet's nonces are read per transaction.
    chain_turn: tokio::sync::Mutex<()>,
    run_dir: PathBuf,
}

fn fresh_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Tokens are compared in constant time: a timing difference must not leak a prefix.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Starts the join service on the control host and writes a bundle for every other
/// `[[host]]`; returns the service and the bundle paths.
pub async fn start(ctx: &Context, state: &RunState) -> anyhow::Result<(JoinService, Vec<PathBuf>)> {
    let registry = state
        .registry
        .clone()
        .context("the registry is not running")?;
    let model_id = state.model_id.clone().context("the model is not split")?;
    let ca = ctx.pki.as_ref().and_then(|p| p.ca()).cloned();
    let listener = tokio::net::TcpListener::bind((ctx.bind.as_str(), 0))
        .await
        .with_context(|| format!("cannot listen on {} for joining hosts", ctx.bind))?;
    let addr = listener.local_addr()?.to_string();
    let net = match &ca {
        Some(ca) => {
            let issued = ca.issue(
                "join",
                std::slice::from_ref(&ctx.bind),
                super::super::pki::NODE_CERT_DAYS,
            )?;
            unfed_node::net::Net::tls(&ca.cert_pem, Some((&issued.cert_pem, &issued.key_pem)))?
        }
        None => unfed_node::net::Net::plaintext(),
    };
    let chain = match &state.chain {
        Some(record) => Some((
            Chain::connect(&record.rpc_url, crate::launch::steps::operator(ctx)?)?,
            record.deployment()?,
        )),
        None => None,
    };
    let bundle = Bundle {
        testnet: ctx.plan.name.clone(),
        host: String::new(),
        join: addr.clone(),
        token: String::new(),
        ca_pem: ca.as_ref().map(|c| c.cert_pem.clone()).unwrap_or_default(),
        registry,
        model_id,
        model_digest: super::model_digest(&ctx.plan.shards_dir)?,
        chain: state.chain.as_ref().map(|c| BundleChain {
            chain_id: c.chain_id,
            token: c.token.clone().unwrap_or_default(),
            escrow: c.escrow.clone().unwrap_or_default(),
            rpc_url: (ctx.loaded.spec.chain.mode == crate::spec::ChainMode::External)
                .then(|| c.rpc_url.clone()),
        }),
    };
    let admission = Admission {
        plan: ctx.plan.clone(),
        default_stake: ctx.loaded.spec.nodes.stake,
        ca,
        bundle,
        tokens: Mutex::default(),
        chain,
        chain_turn: Default::default(),
        run_dir: ctx.plan.run_dir.clone(),
    };
    let _ = std::fs::remove_file(super::joined_path(&admission.run_dir));
    let mut paths = Vec::new();
    for host in ctx.plan.hosts.iter().filter(|h| !h.control) {
        paths.push(admission.new_bundle(&host.name)?);
    }
    let router = net.server().add_service(JoinServer::new(admission));
    let task = tokio::spawn(async move {
        if let Err(e) = net.serve(router, listener, std::future::pending()).await {
            eprintln!("the join service stopped: {e:#}");
        }
    });
    Ok((JoinService { addr, task }, paths))
}

impl Admission {
    /// Writes `host`'s bundle with a new token (the one before it stops admitting).
    fn new_bundle(&self, host: &str) -> anyhow::Result<PathBuf> {
        let token = fresh_token();
        let bundle = Bundle {
            host: host.to_string(),
            token: token.clone(),
            ..self.bundle.clone()
        };
        let path = super::bundle_path(&self.run_dir, host);
        bundle.write(&path)?;
        let mut tokens = self.tokens.lock().unwrap();
        let entry = tokens.entry(host.to_string()).or_default();
        let old = std::mem::replace(&mut entry.current, token);
        if !old.is_empty() {
            entry.spent.push(old);
        }
        Ok(path)
    }

    /// Who may join: the testnet's own hosts, with their current token, splitting the
    /// same model. Spends the token (a second join with it is refused).
    fn admit(&self, r: &JoinRequest) -> anyhow::Result<()> {
        ensure!(
            r.testnet == self.plan.name,
            "this is testnet '{}', not '{}': use a bundle of this testnet",
            self.plan.name,
            r.testnet
        );
        let Some(host) = self.plan.hosts.iter().find(|h| h.name == r.host) else {
            let names: Vec<&str> = self.plan.hosts.iter().map(|h| h.name.as_str()).collect();
            bail!(
                "the spec has no host named '{}' (its hosts: {})",
                r.host,
                names.join(", ")
            );
        };
        ensure!(
            !host.control,
            "'{}' is the control host; it runs `unfedctl up` without --join",
            host.name
        );
        let mut expected: Vec<&str> = self
            .plan
            .steps
            .iter()
            .filter(|s| s.host.as_deref() == Some(host.name.as_str()))
            .map(|s| s.name.as_str())
            .collect();
        let mut asked: Vec<&str> = r.nodes.iter().map(|n| n.name.as_str()).collect();
        asked.sort();
        expected.sort();
        ensure!(
            asked == expected,
            "host '{}' runs {}, but the join asked for {}",
            host.name,
            expected.join(", "),
            asked.join(", ")
        );
        {
            let mut tokens = self.tokens.lock().unwrap();
            let entry = tokens.entry(host.name.clone()).or_default();
            if entry.spent.iter().any(|t| same_token(t, &r.token)) {
                bail!(
                    "this join token of host '{}' was already used: a token admits one join; the control host wrote a new bundle to {}",
                    host.name,
                    super::bundle_path(&self.run_dir, &host.name).display()
                );
            }
            ensure!(
                !entry.current.is_empty() && same_token(&entry.current, &r.token),
                "wrong join token for host '{}': use the bundle the control host wrote to {}",
                host.name,
                super::bundle_path(&self.run_dir, &host.name).display()
            );
            ensure!(
                r.model_digest == self.bundle.model_digest,
                "host '{}' split a model with digest {}, but this testnet serves {} (digest {}): its model files differ from the control host's",
                host.name,
                r.model_digest,
                self.bundle.model_id,
                self.bundle.model_digest
            );
            let spent = std::mem::take(&mut entry.current);
            entry.spent.push(spent);
        }
        Ok(())
    }

    /// Certificates for the nodes' keys; wallets funded and staked.
    async fn serve(&self, r: &JoinRequest) -> anyhow::Result<JoinReply> {
        let host = self
            .plan
            .hosts
            .iter()
            .find(|h| h.name == r.host)
            .context("admitted host")?;
        let mut certificates = Vec::new();
        let _turn = self.chain_turn.lock().await;
        for node in &r.nodes {
            if let Some(ca) = &self.ca {
                let cert_pem = ca
                    .issue_for_request(
                        &node.name,
                        std::slice::from_ref(&host.address),
                        super::super::pki::NODE_CERT_DAYS,
                        &node.csr_pem,
                    )
                    .with_context(|| format!("{}'s certificate request", node.name))?;
                certificates.push(IssuedCertificate {
                    name: node.name.clone(),
                    cert_pem,
                });
            }
            if let Some((chain, deployment)) = &self.chain {
                let step = self.plan.step(&node.name).context("planned node")?;
                let stake = wei(step.stake.unwrap_or(self.default_stake));
                self.stake(chain, deployment, node, stake)
                    .await
                    .with_context(|| format!("staking for {}", node.name))?;
            }
        }
        Ok(JoinReply {
            certificates,
            registry: self.bundle.registry.clone(),
        })
    }

    /// Funds `node`'s new wallet and submits the approve + stake it signed, unless it
    /// already holds the stake (a host joining again keeps its wallets).
    async fn stake(
        &self,
        chain: &Chain,
        d: &unfed_chain::Deployment,
        node: &unfed_proto::JoiningNode,
        stake: U256,
    ) -> anyhow::Result<()> {
        let wallet: Address = node
            .wallet
            .parse()
            .with_context(|| format!("wallet {:?} is not an EVM address", node.wallet))?;
        if chain.stake_info(d, wallet).await?.active >= stake {
            return Ok(());
        }
        ensure!(
            !node.stake_transactions.is_empty(),
            "wallet {wallet} has not staked {}: on an external chain the joining host stakes from its own funded key",
            unfed_chain::format_amount(stake)
        );
        let raw: Vec<unfed_chain::Bytes> = node
            .stake_transactions
            .iter()
            .map(|t| unfed_chain::Bytes::copy_from_slice(t))
            .collect();
        for tx in &raw {
            unfed_chain::presigned::check_stake_transaction(tx, wallet, d)?;
        }
        chain
            .fund(d, wallet, stake, unfed_chain::presigned::stake_gas_wei())
            .await?;
        chain.submit_signed(&raw).await
    }

    fn record(&self, r: &JoinRequest) -> anyhow::Result<()> {
        let mut joined = super::read_joined(&self.run_dir);
        joined.retain(|h| h.name != r.host);
        let host = self.plan.hosts.iter().find(|h| h.name == r.host);
        joined.push(JoinedHost {
            name: r.host.clone(),
            address: host.map(|h| h.address.clone()).unwrap_or_default(),
            joined_at: super::now(),
            nodes: r
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.wallet.clone()))
                .collect(),
        });
        let path = super::joined_path(&self.run_dir);
        std::fs::write(&path, serde_json::to_vec_pretty(&joined)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[tonic::async_trait]
impl Join for Admission {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = request.into_inner();
        self.admit(&r)
            .map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        let result = self.serve(&r).await;
        // A spent token is replaced by a new bundle either way: after a failure the
        // host joins again with it, after a success the next join of this host does.
        let renewed = self.new_bundle(&r.host);
        let reply = result.map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        renewed.map_err(|e| Status::internal(format!("{e:#}")))?;
        self.record(&r)
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        eprintln!("host '{}' joined with {} node(s)", r.host, r.nodes.len());
        Ok(Response::new(reply))
    }
}
