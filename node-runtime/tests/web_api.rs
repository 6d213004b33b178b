//! The dashboard's HTTP API against real processes: `unfed-node web` beside a real
//! registry, compute node and Anvil chain. Every sign-in and faucet refusal, the chat's
//! error messages (model INCOMPLETE, deposit empty, node down), and a paid chat.

mod common;

use common::net::{Net, anvil_with_escrow, s, split_into};
use common::web::Web;
use serde_json::{Value, json};
use unfed_chain::{Address, U256, dev_signer, personal_sign};

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_faucet_and_chat_refusals_over_http() {
    let (anvil, operator, d) = anvil_with_escrow(60).await;
    let dir = Net::prepare();
    let tiny = dir.path().join("tiny-src");
    unfed_model::builtin::write_tiny(&tiny).unwrap();
    split_into(&tiny, &dir.path().join("splits"), "tiny", 1);
    let mut net = Net::registry(dir);
    let key = net.dir.path().join("operator.key");
    unfed_chain::write_key_file(&key, &dev_signer(0).unwrap()).unwrap();
    let db = net.dir.path().join("web.db");
    let registry = net.registry.address.clone();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            s("web"),
            s("--port"),
            s("0"),
            s("--registry"),
            registry.clone(),
            s("--chain-rpc"),
            anvil.endpoint(),
            s("--escrow"),
            d.escrow.to_string(),
            s("--token"),
            d.token.to_string(),
            s("--db"),
            db.display().to_string(),
            s("--faucet-amount"),
            s("5"),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let key_arg = key.display().to_string();
    let faucet_on = [("UNFED_FAUCET_ENABLED", "1")];
    let web = Web::start(
        args(&["--operator-key-file", &key_arg]),
        &faucet_on,
        &net.dir.path().join("web.log"),
    );
    let (me, other) = (dev_signer(5).unwrap(), dev_signer(6).unwrap());
    let my = me.address().to_string();

    // Sign-in refusals, each with its status.
    let (st, v) = web
        .post("/api/auth/challenge", json!({"address": "0x12"}), None)
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = web
        .post(
            "/api/auth/verify",
            json!({"nonce": "nope", "signature": "0x00"}),
            None,
        )
        .await;
    assert_eq!(
        (st.as_u16(), error_of(&v).contains("unknown")),
        (401, true),
        "{v}"
    );
    let (_, c) = web
        .post("/api/auth/challenge", json!({"address": my}), None)
        .await;
    let forged = personal_sign(&other, c["message"].as_str().unwrap()).unwrap();
    let verify = json!({"nonce": c["nonce"], "signature": forged});
    let (st, v) = web.post("/api/auth/verify", verify.clone(), None).await;
    assert_eq!(st, 401, "{v}");
    assert!(error_of(&v).contains("signed by"), "{v}");
    // The challenge was used up by the failed attempt.
    let (st, _) = web.post("/api/auth/verify", verify, None).await;
    assert_eq!(st, 401);
    let (st, _) = web.get("/api/auth/session", None).await;
    assert_eq!(st, 401);
    let (st, _) = web.get("/api/auth/session", Some("made-up")).await;
    assert_eq!(st, 401);
    let (st, v) = web.post("/api/auth/demo", json!({}), None).await;
    assert_eq!(st, 403, "demo sign-in is off by default: {v}");

    let token = web.sign_in(&me).await;
    let (st, v) = web.get("/api/auth/session", Some(&token)).await;
    assert_eq!(
        (st.as_u16(), v["address"].as_str()),
        (200, Some(my.as_str()))
    );

    // Chat: no session; model INCOMPLETE (no compute node yet).
    let chat = json!({"prompt": "Hello", "max_tokens": 4});
    let (st, v) = web.post("/api/chat", chat.clone(), None).await;
    assert_eq!(st, 401, "{v}");
    let (st, v) = web.post("/api/chat", chat.clone(), Some(&token)).await;
    assert_eq!(st, 503, "{v}");
    assert!(error_of(&v).contains("INCOMPLETE"), "{v}");
    net.compute("tiny", 0);
    net.wait_ready("tiny", 1).await;
    let (st, v) = web
        .post(
            "/api/chat",
            json!({"prompt": " ", "max_tokens": 4}),
            Some(&token),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = web
        .post(
            "/api/chat",
            json!({"prompt": "Hi", "max_tokens": 0}),
            Some(&token),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    // Deposit empty.
    let (st, v) = web.post("/api/chat", chat.clone(), Some(&token)).await;
    assert_eq!(st, 402, "{v}");
    assert!(error_of(&v).contains("deposit"), "{v}");

    // Faucet refusals, in the original's order, then a grant.
    let (st, v) = web.post("/api/faucet", json!({"address": my}), None).await;
    assert_eq!(st, 401, "no session: {v}");
    let other_token = web.sign_in(&other).await;
    let (st, v) = web
        .post("/api/faucet", json!({"address": my}), Some(&other_token))
        .await;
    assert_eq!(st, 401, "another wallet's session: {v}");
    let (st, v) = web
        .post("/api/faucet", json!({"address": "0xnope"}), Some(&token))
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = web
        .post("/api/faucet", json!({"address": my}), Some(&token))
        .await;
    assert_eq!(st, 200, "{v}");
    let five = U256::from(5u64) * U256::from(10u64).pow(U256::from(18u64));
    assert_eq!(
        operator.client_balance(&d, me.address()).await.unwrap(),
        five
    );
    let (st, v) = web
        .post("/api/faucet", json!({"address": my}), Some(&token))
        .await;
    assert_eq!(st, 429, "{v}");
    assert!(error_of(&v).contains("try again in"), "{v}");

    // A paid chat: billed to the signed-in wallet, at the configured prices.
    let (st, v) = web.post("/api/chat", chat.clone(), Some(&token)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["payer"].as_str(), Some(my.as_str()));
    assert_eq!(v["tokens"], 4);
    let prompt_tokens = v["prompt_tokens"].as_u64().unwrap();
    // 0.0001 per prompt token, 0.001 per generated token (the defaults).
    let expected = U256::from(prompt_tokens) * U256::from(100_000_000_000_000u64)
        + U256::from(4u64) * U256::from(1_000_000_000_000_000u64);
    assert_eq!(
        v["cost"]["wei"].as_str(),
        Some(expected.to_string().as_str())
    );
    assert_eq!(v["route"].as_array().unwrap().len(), 1);
    let (st, b) = web.get(&format!("/api/balance/{my}"), None).await;
    assert_eq!(
        (st.as_u16(), b["deposit"]["wei"].as_str()),
        (200, Some(five.to_string().as_str()))
    );

    // An image for a text-only model; an image that is not base64.
    let png = std::fs::read(common::fixtures_root().join("../vision/square.png")).unwrap();
    let image = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png);
    let (st, v) = web
        .post(
            "/api/chat",
            json!({"prompt": "Hi", "image": image}),
            Some(&token),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(error_of(&v).contains("text-only"), "{v}");
    let (st, v) = web
        .post(
            "/api/chat",
            json!({"prompt": "Hi", "image": "%%%"}),
            Some(&token),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(error_of(&v).contains("base64"), "{v}");

    // Node down: the chat fails with a message naming the node, not silence.
    net.computes[0].kill();
    let (st, v) = web.post("/api/chat", chat.clone(), Some(&token)).await;
    assert!(st == 502 || st == 503, "{st} {v}");
    assert!(
        error_of(&v).contains("node") || error_of(&v).contains("INCOMPLETE"),
        "{v}"
    );

    // Sign-out ends the session.
    let (st, _) = web.post("/api/auth/logout", json!({}), Some(&token)).await;
    assert_eq!(st, 200);
    let (st, _) = web.get("/api/auth/session", Some(&token)).await;
    assert_eq!(st, 401);

    // The cooldown survives a restart of the dashboard (same database).
    drop(web);
    let web = Web::start(
        args(&["--operator-key-file", &key_arg]),
        &faucet_on,
        &net.dir.path().join("web2.log"),
    );
    let token = web.sign_in(&me).await;
    let (st, v) = web
        .post("/api/faucet", json!({"address": my}), Some(&token))
        .await;
    assert_eq!(st, 429, "{v}");
    drop(web);

    // Faucet off (the default): 403. No paying wallet: 503.
    let off = Web::start(args(&[]), &[], &net.dir.path().join("web-off.log"));
    let token = off.sign_in(&me).await;
    let (st, v) = off
        .post("/api/faucet", json!({"address": my}), Some(&token))
        .await;
    assert_eq!(st, 403, "{v}");
    drop(off);
    let unpaid = Web::start(args(&[]), &faucet_on, &net.dir.path().join("web-503.log"));
    let token = unpaid.sign_in(&me).await;
    let (st, v) = unpaid
        .post("/api/faucet", json!({"address": my}), Some(&token))
        .await;
    assert_eq!(st, 503, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bypasses_work_only_on_loopback() {
    let net = Net::registry(Net::prepare());
    let db = net.dir.path().join("web.db").display().to_string();
    let demo_wallet: Address = dev_signer(3).unwrap().address();
    let args = |host: &str| {
        vec![
            s("web"),
            s("--port"),
            s("0"),
            s("--host"),
            s(host),
            s("--registry"),
            net.registry.address.clone(),
            s("--db"),
            db.clone(),
            s("--demo-wallet"),
            demo_wallet.to_string(),
        ]
    };
    for var in ["UNFED_DEV_AUTH_BYPASS", "UNFED_DEMO_AUTH"] {
        let out = std::process::Command::new(common::net::BIN)
            .args(args("0.0.0.0"))
            .env(var, "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var} on 0.0.0.0 must be refused");
        assert!(err.contains("not loopback") && err.contains(var), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
    let web = Web::start(
        args("127.0.0.1"),
        &[("UNFED_DEV_AUTH_BYPASS", "1"), ("UNFED_DEMO_AUTH", "1")],
        &net.dir.path().join("web.log"),
    );
    // Dev bypass: a challenge is accepted without a signature.
    let who = dev_signer(4).unwrap().address().to_string();
    let (_, c) = web
        .post("/api/auth/challenge", json!({"address": who}), None)
        .await;
    let (st, v) = web
        .post("/api/auth/verify", json!({"nonce": c["nonce"]}), None)
        .await;
    assert_eq!(
        (st.as_u16(), v["address"].as_str()),
        (200, Some(who.as_str()))
    );
    // Demo: one click, as the demo wallet.
    let (st, v) = web.post("/api/auth/demo", json!({}), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["address"].as_str(),
        Some(demo_wallet.to_string().as_str())
    );
    let (st, cfg) = web.get("/api/config", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        (
            cfg["auth"]["dev_bypass"].as_bool(),
            cfg["auth"]["demo"].as_bool()
        ),
        (Some(true), Some(true))
    );
    // The page and its assets are embedded.
    let page = web.http.get(web.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let (st, _) = web.get("/api/nope", None).await;
    assert_eq!(st, 404);
}

/// One-click dev-wallet sign-in: offered only by a loopback dashboard on a local Anvil
/// (chain 31337 on loopback, whose keys are public); refused otherwise, and no session
/// is opened by a refused request.
#[tokio::test(flavor = "multi_thread")]
async fn dev_wallet_sign_in_only_on_loopback_and_a_local_anvil() {
    use unfed_chain::{Anvil, AnvilOptions};
    use unfed_node::web::dev_wallet::offer;
    let anvil = Anvil::start(&AnvilOptions::default()).await.unwrap();
    let other = Anvil::start(&AnvilOptions {
        chain_id: Some(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = dev_signer(unfed_chain::keys::DEV_CLIENT_INDEX)
        .unwrap()
        .address();
    assert_eq!(
        offer("127.0.0.1", Some(&anvil.endpoint())).await,
        Ok(client)
    );
    let refused = |r: Result<Address, String>, why: &str| {
        let err = r.expect_err("dev sign-in must be off");
        assert!(err.contains(why), "{err}");
    };
    refused(
        offer("0.0.0.0", Some(&anvil.endpoint())).await,
        "not loopback",
    );
    refused(
        offer("127.0.0.1", Some(&other.endpoint())).await,
        "is chain 1, not a local Anvil",
    );
    refused(offer("127.0.0.1", None).await, "no chain");

    // Over HTTP: on with the local Anvil, off without a chain.
    let net = Net::registry(Net::prepare());
    let db = |n: &str| net.dir.path().join(n).display().to_string();
    let base = |db: String| {
        vec![
            s("web"),
            s("--port"),
            s("0"),
            s("--registry"),
            net.registry.address.clone(),
            s("--db"),
            db,
        ]
    };
    let mut on_args = base(db("on.db"));
    on_args.extend([
        s("--chain-rpc"),
        anvil.endpoint(),
        s("--escrow"),
        Address::ZERO.to_string(),
    ]);
    let on = Web::start(on_args, &[], &net.dir.path().join("on.log"));
    let (st, cfg) = on.get("/api/config", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        cfg["auth"]["dev_wallet"].as_str(),
        Some(client.to_string().as_str())
    );
    // A page of another site cannot sign in behind the user's back.
    let cross = on
        .http
        .post(on.url("/api/auth/dev-wallet"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let (st, v) = on.post("/api/auth/dev-wallet", json!({}), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["address"].as_str(), Some(client.to_string().as_str()));
    let token = v["token"].as_str().unwrap();
    let (st, v) = on.get("/api/auth/session", Some(token)).await;
    assert_eq!(
        (st.as_u16(), v["address"].as_str()),
        (200, Some(client.to_string().as_str()))
    );

    let off = Web::start(base(db("off.db")), &[], &net.dir.path().join("off.log"));
    let (_, cfg) = off.get("/api/config", None).await;
    assert!(cfg["auth"]["dev_wallet"].is_null(), "{cfg}");
    assert!(
        cfg["auth"]["dev_wallet_off"]
            .as_str()
            .unwrap()
            .contains("no chain"),
        "{cfg}"
    );
    let (st, v) = off.post("/api/auth/dev-wallet", json!({}), None).await;
    assert_eq!(st, 403, "{v}");
    assert!(error_of(&v).contains("sign in with a wallet"), "{v}");
    assert!(v.get("token").is_none());
}
