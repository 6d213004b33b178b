//! `unfed-node web` as a process, and an HTTP client for its JSON API.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::{Value, json};
use unfed_chain::{PrivateKeySigner, personal_sign};

use super::net::Node;

/// `unfed-node web` on a free port against `registry`, keeping its database at `db`.
pub fn args(registry: &str, db: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["web", "--port", "0", "--registry", registry, "--db"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    a.push(db.display().to_string());
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// A running dashboard and an HTTP client for it.
pub struct Web {
    pub node: Node,
    pub http: reqwest::Client,
}

impl Web {
    pub fn start(args: Vec<String>, env: &[(&str, &str)], log: &Path) -> Web {
        Web {
            node: Node::start_with_env(&args, log.to_path_buf(), env),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.address)
    }

    pub async fn call(
        &self,
        req: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.expect("the dashboard answers");
        let status = resp.status();
        (status, resp.json().await.expect("a JSON body"))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(self.http.get(self.url(path)), token).await
    }

    pub async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        self.call(self.http.post(self.url(path)).json(&body), token)
            .await
    }

    /// Signs in as `wallet` the way the page does; returns the session token.
    pub async fn sign_in(&self, wallet: &PrivateKeySigner) -> String {
        let (st, c) = self
            .post(
                "/api/auth/challenge",
                json!({"address": wallet.address().to_string()}),
                None,
            )
            .await;
        assert_eq!(st, 200, "{c}");
        let sig = personal_sign(wallet, c["message"].as_str().unwrap()).unwrap();
        let (st, v) = self
            .post(
                "/api/auth/verify",
                json!({"nonce": c["nonce"], "signature": sig}),
                None,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    }
}
