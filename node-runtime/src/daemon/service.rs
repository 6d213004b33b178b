//! The daemon's gRPC service: share submission (validate + store in one transaction),
//! the chain tip, and the chain status. Share keys come from the registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use tonic::{Request, Response, Status};
use unfed_proto::daemon_server::Daemon;
use unfed_proto::*;

use super::now_ms;
use super::store::Store;
use super::validate::{self, Limits, Reject};
use crate::shares;

/// Node id → share key, as registered; refreshed from the registry on a miss or a
/// signature mismatch (the node may have restarted with a new key), rate-limited.
struct KeyCache {
    registry: crate::membership::RegistryAddr,
    keys: tokio::sync::Mutex<(HashMap<String, VerifyingKey>, Option<Instant>)>,
}

const REFRESH_EVERY: Duration = Duration::from_millis(500);

impl KeyCache {
    async fn get(&self, node: &str, refresh: bool) -> Option<VerifyingKey> {
        let mut g = self.keys.lock().await;
        let cached = g.0.get(node).copied();
        let stale = g.1.is_none_or(|t| t.elapsed() >= REFRESH_EVERY);
        if (cached.is_some() && !refresh) || !stale {
            return cached;
        }
        match self.fetch().await {
            Ok(keys) => {
                g.0 = keys;
                g.1 = Some(Instant::now());
            }
            Err(e) => tracing::warn!(registry = %self.registry, "cannot refresh share keys: {e:#}"),
        }
        g.0.get(node).copied()
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, VerifyingKey>> {
        let mut c = self.registry.client()?;
        let nodes = c
            .discover(DiscoverRequest {
                model: String::new(),
            })
            .await?
            .into_inner()
            .nodes;
        Ok(nodes
            .into_iter()
            .filter(|n| !n.share_key.is_empty())
            .filter_map(|n| match shares::parse_public_key(&n.share_key) {
                Ok(k) => Some((n.node_id, k)),
                Err(e) => {
                    tracing::warn!(node = %n.node_id, "registered share key unusable: {e:#}");
                    None
                }
            })
            .collect())
    }
}

pub struct DaemonService {
    store: Arc<Mutex<Store>>,
    limits: Limits,
    keys: KeyCache,
    /// What vouchers must name (`None`: no chain, no voucher is accepted).
    terms: Option<crate::voucher::Terms>,
    /// Reads client deposits for CheckVoucher (`None`: no chain to ask).
    escrow: Option<(unfed_chain::Chain, unfed_chain::Deployment)>,
}

impl DaemonService {
    pub fn new(
        store: Arc<Mutex<Store>>,
        limits: Limits,
        registry: crate::membership::RegistryAddr,
        terms: Option<crate::voucher::Terms>,
        escrow: Option<(unfed_chain::Chain, unfed_chain::Deployment)>,
    ) -> Self {
        Self {
            store,
            limits,
            keys: KeyCache {
                registry,
                keys: tokio::sync::Mutex::new((HashMap::new(), None)),
            },
            terms,
            escrow,
        }
    }

    fn terms(&self) -> Result<&crate::voucher::Terms, Status> {
        self.terms.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this daemon settles on no chain: it accepts no spending voucher, so no work is paid",
            )
        })
    }

    /// Signature check with one key refresh on failure.
    async fn check_key(&self, s: &ComputeShare) -> validate::Verdict {
        let Some(key) = self.keys.get(&s.node_id, false).await else {
            return Err((
                Reject::UnknownNode,
                format!(
                    "the registry has no share key for node {:?}; is it registered?",
                    s.node_id
                ),
            ));
        };
        if validate::check_signature(&key, s).is_ok() {
            return Ok(());
        }
        match self.keys.get(&s.node_id, true).await {
            Some(fresh) if fresh != key => validate::check_signature(&fresh, s),
            _ => validate::check_signature(&key, s),
        }
    }

    fn tip(&self) -> Result<([u8; 32], u64), Status> {
        self.store
            .lock()
            .expect("store poisoned")
            .tip()
            .map_err(internal)
    }
}

fn internal(e: anyhow::Error) -> Status {
    tracing::error!("chain db error: {e:#}");
    Status::internal(format!("the daemon's chain db failed: {e:#}"))
}

fn result(hash: [u8; 32], v: validate::Verdict) -> ShareResult {
    match v {
        Ok(()) => ShareResult {
            share_hash: hash.to_vec(),
            accepted: true,
            ..Default::default()
        },
        Err((r, message)) => ShareResult {
            share_hash: hash.to_vec(),
            accepted: false,
            reason: r.as_str().to_string(),
            message,
        },
    }
}

#[tonic::async_trait]
impl Daemon for DaemonService {
    async fn submit_shares(
        &self,
        req: Request<SubmitSharesRequest>,
    ) -> Result<Response<SubmitSharesResponse>, Status> {
        let req = req.into_inner();
        let now = now_ms();
        // Stateless checks and signatures first (they may call the registry), then
        // the chain checks and inserts for the whole batch in one transaction.
        let mut verdicts = Vec::with_capacity(req.shares.len());
        for s in &req.shares {
            let mut v = validate::check_stateless(&req.submitter, s, &self.limits, now);
            if v.is_ok() {
                v = self.check_key(s).await;
            }
            verdicts.push((shares::share_hash(s), v));
        }
        let store = self.store.clone();
        let limits = self.limits.clone();
        let shares_in = req.shares;
        let terms = self.terms;
        // The vouchers the batch brings, by digest (malformed ones are simply not found).
        let submitted: HashMap<[u8; 32], SpendingVoucher> = req
            .vouchers
            .into_iter()
            .filter_map(|v| Some((crate::voucher::digest(&v).ok()?, v)))
            .collect();
        let (results, tip) = tokio::task::spawn_blocking(move || {
            let st = store.lock().expect("store poisoned");
            let results = st.transaction(|st| {
                let mut out = Vec::with_capacity(verdicts.len());
                for ((hash, v), s) in verdicts.into_iter().zip(&shares_in) {
                    let v = match v {
                        Ok(()) => validate::check_chain(st, &hash, s, &limits, now)?,
                        e => e,
                    };
                    let v = match v {
                        Ok(()) => match super::vouchers::check(st, s, &submitted, terms.as_ref())? {
                            Ok(at) => {
                                st.insert_share(&hash, s, now, &at)?;
                                Ok(())
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    if let Err((r, m)) = &v {
                        tracing::warn!(node = %s.node_id, session = %s.session_id, step = s.step, reason = r.as_str(), "share rejected: {m}");
                    }
                    out.push(result(hash, v));
                }
                Ok(out)
            })?;
            Ok::<_, anyhow::Error>((results, st.tip()?))
        })
        .await
        .map_err(|e| Status::internal(format!("share validation task failed: {e}")))?
        .map_err(internal)?;
        Ok(Response::new(SubmitSharesResponse {
            results,
            tip_hash: tip.0.to_vec(),
            tip_height: tip.1,
        }))
    }

    async fn get_terms(
        &self,
        _: Request<GetTermsRequest>,
    ) -> Result<Response<GetTermsResponse>, Status> {
        Ok(Response::new(self.terms()?.to_proto()))
    }

    async fn check_voucher(
        &self,
        req: Request<CheckVoucherRequest>,
    ) -> Result<Response<CheckVoucherResponse>, Status> {
        let terms = self.terms()?;
        let wire = req
            .into_inner()
            .voucher
            .ok_or_else(|| Status::invalid_argument("no voucher to check"))?;
        let v = crate::voucher::from_proto(&wire)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        super::vouchers::check_terms(&v, terms)
            .map_err(|e| Status::permission_denied(format!("spending voucher refused: {e}")))?;
        let now = crate::voucher::now_secs();
        if now > v.voucher.expiry {
            return Err(Status::permission_denied(
                "spending voucher refused: it has expired",
            ));
        }
        let client = v.voucher.client;
        let (used, owed) = {
            let st = self.store.lock().expect("store poisoned");
            (
                st.voucher_used(v.digest().as_slice()).map_err(internal)?,
                st.owed(&client.to_string()).map_err(internal)?,
            )
        };
        if used {
            return Err(Status::permission_denied(
                "spending voucher refused: it was already used for a session",
            ));
        }
        let cap = v.voucher.maxSpend;
        let Some((chain, d)) = &self.escrow else {
            // Nothing to debit: the daemon only records settlements.
            return Ok(Response::new(CheckVoucherResponse {
                deposit: String::new(),
                owed: owed.to_string(),
                cap: cap.to_string(),
            }));
        };
        let unavailable = |e: unfed_chain::ChainError| {
            Status::unavailable(format!("reading the deposit of {client}: {e}"))
        };
        // Money on its way out is not there to pay: a pending withdrawal request counts
        // as gone.
        let deposit = chain
            .client_balance(d, client)
            .await
            .map_err(unavailable)?
            .saturating_sub(
                chain
                    .withdrawal_request(d, client)
                    .await
                    .map_err(unavailable)?
                    .amount,
            );
        if deposit < owed + cap {
            return Err(Status::failed_precondition(format!(
                "insufficient deposit: {client} has {} in the escrow, owes {} for work not yet settled, and this session may cost up to {}; deposit at least {} more (unfedctl deposit)",
                unfed_chain::format_amount(deposit),
                unfed_chain::format_amount(owed),
                unfed_chain::format_amount(cap),
                unfed_chain::format_amount(owed + cap - deposit),
            )));
        }
        Ok(Response::new(CheckVoucherResponse {
            deposit: deposit.to_string(),
            owed: owed.to_string(),
            cap: cap.to_string(),
        }))
    }

    async fn get_tip(&self, _: Request<GetTipRequest>) -> Result<Response<GetTipResponse>, Status> {
        let (hash, height) = self.tip()?;
        Ok(Response::new(GetTipResponse {
            tip_hash: hash.to_vec(),
            tip_height: height,
        }))
    }

    async fn get_chain_status(
        &self,
        _: Request<GetChainStatusRequest>,
    ) -> Result<Response<GetChainStatusResponse>, Status> {
        let st = self.store.lock().expect("store poisoned");
        let ((hash, height), (shares, pending)) = (
            st.tip().map_err(internal)?,
            st.share_counts().map_err(internal)?,
        );
        let nodes = st
            .node_totals()
            .map_err(internal)?
            .into_iter()
            .map(|n| NodeShares {
                node_id: n.node_id,
                shares: n.shares,
                input_tokens: n.input_tokens,
                output_tokens: n.output_tokens,
            })
            .collect();
        let settlements = st
            .settlements()
            .map_err(internal)?
            .into_iter()
            .map(|s| SettlementRecord {
                hash: s.hash.to_vec(),
                from_height: s.from_height,
                to_height: s.to_height,
                client: s.client,
                total: s.total,
                status: s.status,
                last_error: s.last_error,
                attempts: s.attempts,
                nodes: s.nodes,
                amounts: s.amounts,
            })
            .collect();
        let recent_blocks = st
            .recent_blocks(20)
            .map_err(internal)?
            .into_iter()
            .map(|b| BlockSummary {
                height: b.height,
                hash: b.hash.to_vec(),
                prev_hash: b.prev_hash.to_vec(),
                share_count: b.share_count,
                timestamp_ms: b.timestamp_ms,
            })
            .collect();
        let vouchers = st
            .voucher_earnings(100)
            .map_err(internal)?
            .into_iter()
            .map(|e| VoucherEarnings {
                voucher: e.voucher,
                client: e.client,
                node_id: e.node_id,
                shares: e.shares,
                paid: e.paid.to_string(),
                pending: e.pending.to_string(),
                withheld: e.withheld.to_string(),
            })
            .collect();
        Ok(Response::new(GetChainStatusResponse {
            height,
            vouchers,
            tip_hash: hash.to_vec(),
            shares,
            pending_shares: pending,
            nodes,
            settlements,
            recent_blocks,
        }))
    }
}
