//! The dashboard's HTTP server: shared state, the `/api/` routes, the embedded page, and
//! the JSON error every handler answers with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use unfed_chain::{Address, Chain, Deployment, U256};

use super::auth::{Auth, AuthError};
use super::faucet::{Faucet, FaucetRefusal};
use super::https::HttpsListener;
use super::origin::SameOrigin;
use crate::client::TextCodec;
use crate::daemon::Prices;

/// The chain the dashboard reads balances and stakes from, and the faucet pays on.
pub struct ChainAccess {
    pub rpc_url: String,
    pub deployment: Deployment,
    /// Read-only calls.
    pub reader: Chain,
    /// The faucet's paying wallet (its own token wallet, no escrow role), if given.
    pub payer: Option<Chain>,
}

/// Auth switches from the environment (the same variables `unfedctl preflight web` reads).
#[derive(Debug, Clone, Default)]
pub struct Switches {
    /// UNFED_DEV_AUTH_BYPASS: sign-in without checking the signature.
    pub dev_bypass: bool,
    /// UNFED_DEMO_AUTH: a one-click session as `demo_wallet`, and chat without sign-in.
    pub demo: bool,
    pub demo_wallet: Option<Address>,
    /// Signs the demo sessions' spending vouchers (`None`: demo chats are unpaid).
    pub demo_payer: Option<crate::voucher::Payer>,
}

pub struct WebState {
    pub registry: String,
    /// How the dashboard dials the registry and the nodes (TLS with the testnet CA).
    pub net: crate::net::Net,
    /// The share-chain daemon; None = the one the registry lists.
    pub daemon: Option<String>,
    pub chain: Option<ChainAccess>,
    pub prices: Prices,
    pub auth: Auth,
    pub faucet: Faucet,
    pub faucet_amount: U256,
    pub(super) faucet_lock: tokio::sync::Mutex<()>,
    pub switches: Switches,
    /// What the sign-in message names.
    pub site: String,
    pub(super) codecs: Mutex<HashMap<String, (Arc<TextCodec>, usize)>>,
    /// The public parameters of MPC pairs (chats of a model with a pair go through it).
    pub(super) private: crate::client::private::PublicParams,
    /// Chats sample here from logits the last shard seals to this server.
    pub(super) decode_client_sample: bool,
    /// One-click sign-in as the testnet's dev client: its address, or why it is off.
    pub dev_wallet: Result<Address, String>,
    /// The OpenAI-compatible API's keys and generation slots.
    pub api: super::openai::ApiState,
}

impl WebState {
    /// The signed-in wallet of a request (Authorization: Bearer TOKEN).
    pub fn session(&self, headers: &HeaderMap) -> Result<Address, AuthError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        self.auth.session(token)
    }
}

/// Every handler's error: a status and a message that says what to do, as
/// `{"error": "...", "status": N}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }

    /// A service the dashboard depends on (registry, daemon, chain) failed.
    pub fn upstream(e: anyhow::Error) -> Self {
        Self::new(502, format!("{e:#}"))
    }

    /// A failed generation: 402 when the daemon refused the voucher for the deposit,
    /// else a node's failure (502).
    pub fn generation(e: anyhow::Error) -> Self {
        let text = format!("{e:#}");
        let status = if text.contains("insufficient deposit") {
            402
        } else {
            502
        };
        Self::new(status, text)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        (self.status, Json(body)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(e.http_status(), e.to_string())
    }
}

impl From<FaucetRefusal> for ApiError {
    fn from(e: FaucetRefusal) -> Self {
        Self::new(e.http_status(), e.to_string())
    }
}

pub type ApiResult<T> = Result<Json<T>, ApiError>;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        404,
        "no such endpoint; the API is listed in the README (Web dashboard)",
    )
}

/// Every route, behind the Host/Origin guard (it also covers the fallback).
pub fn router(state: Arc<WebState>, same_origin: SameOrigin) -> Router {
    use super::{chat, views, wallet};
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        // No icon: answer without an error so the browser console stays clean.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/config", get(views::config))
        .route("/api/models", get(views::models))
        .route("/api/network", get(views::network))
        .route("/api/chain", get(views::chain))
        .route("/api/balance/{address}", get(views::balance))
        .route("/api/auth/challenge", post(wallet::challenge))
        .route("/api/auth/verify", post(wallet::verify))
        .route("/api/auth/demo", post(wallet::demo))
        .route("/api/auth/dev-wallet", post(wallet::dev_wallet))
        .route("/api/auth/session", get(wallet::session))
        .route("/api/auth/logout", post(wallet::logout))
        .route("/api/faucet", post(wallet::faucet))
        .route("/api/chat", post(chat::chat))
        .route("/api/chat/ws", get(chat::chat_ws))
        .merge(super::openai::routes())
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(same_origin),
            super::origin::guard,
        ))
}

/// Serve on `listener`, over HTTPS with `https`, until `shutdown` resolves.
pub async fn run(
    state: Arc<WebState>,
    same_origin: SameOrigin,
    listener: TcpListener,
    https: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = router(state, same_origin);
    match https {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        Some(config) => {
            axum::serve(HttpsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    Ok(())
}
