//! The dashboard from an attacker's side, against a real `unfed-node web`: requests that
//! name another host (DNS rebinding) or come from another site's page are refused before
//! they change anything, the same requests from the dashboard's own page still work, and
//! HTTPS serves only TLS, with a certificate from the tests' CA.

mod common;

use std::time::{Duration, Instant};

use common::net::{Net, Node, ca_path, issue, s};
use common::web::Web;
use serde_json::json;
use unfed_chain::dev_signer;
use unfed_node::web::probe::{Probe, Reply};

/// `unfed-node web` on a free port beside `net`'s registry, with its own database.
fn web_args(net: &Net, db: &str, extra: &[&str]) -> Vec<String> {
    common::web::args(&net.registry.address, &net.dir.path().join(db), extra)
}

/// The headers of a WebSocket handshake from a page of `origin`.
fn ws_upgrade(origin: &str) -> [(&str, &str); 5] {
    [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", origin),
    ]
}

/// A refusal with the project's JSON error naming `header` and a fix.
fn assert_refused(r: &Reply, header: &str) {
    let v = r.json();
    assert_eq!((r.status, v["status"].as_u64()), (403, Some(403)), "{r:?}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{header} header")) && error.contains("Fix:"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rebinding_and_cross_site_requests_are_refused_and_own_page_requests_work() {
    let net = Net::registry(Net::prepare());
    let web = Web::start(
        web_args(&net, "web.db", &[]),
        &[],
        &net.dir.path().join("web.log"),
    );
    let addr = web.node.address.clone();
    let own_page = format!("http://{addr}");
    let http = Probe::plain();
    let me = dev_signer(5).unwrap();
    let ask = json!({ "address": me.address().to_string() }).to_string();
    let challenge = |headers: Vec<(&'static str, String)>| {
        let (http, addr, ask) = (http.clone(), addr.clone(), ask.clone());
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.send(&addr, "POST", "/api/auth/challenge", &h, &ask)
                .await
                .unwrap()
        }
    };

    // DNS rebinding: the attacker's name, with or without the dashboard's port.
    let port = web.node.port();
    for host in [s("evil.example"), format!("evil.example:{port}")] {
        let r = challenge(vec![("Host", host.clone())]).await;
        assert_refused(&r, "Host");
        assert!(r.json()["nonce"].is_null(), "no challenge issued: {r:?}");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("--public-host")
        );
        // Reads are refused too: a rebound page cannot read the API either.
        let r = http
            .send(&addr, "GET", "/api/config", &[("Host", &host)], "")
            .await
            .unwrap();
        assert_refused(&r, "Host");
    }
    // Another site's page posting here.
    let r = challenge(vec![("Origin", s("http://evil.example"))]).await;
    assert_refused(&r, "Origin");
    assert!(r.json()["nonce"].is_null(), "no challenge issued: {r:?}");
    // Control: the dashboard's own page, and a client that is not a browser.
    let r = challenge(vec![("Origin", own_page.clone())]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["nonce"].is_string());
    let r = challenge(vec![("Host", format!("localhost:{port}"))]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // A signed-in session is not ended by another site's page, only by its own.
    let token = web.sign_in(&me).await;
    let bearer = format!("Bearer {token}");
    let logout = |origin: String| {
        let (http, addr, bearer) = (http.clone(), addr.clone(), bearer.clone());
        async move {
            let h = [
                ("Authorization", bearer.as_str()),
                ("Origin", origin.as_str()),
            ];
            http.send(&addr, "POST", "/api/auth/logout", &h, "{}")
                .await
                .unwrap()
        }
    };
    assert_refused(&logout(s("http://evil.example")).await, "Origin");
    let (st, _) = web.get("/api/auth/session", Some(&token)).await;
    assert_eq!(st, 200, "the session survived the cross-site logout");
    assert_eq!(logout(own_page.clone()).await.status, 200);
    let (st, _) = web.get("/api/auth/session", Some(&token)).await;
    assert_eq!(st, 401);

    // The chat WebSocket: refused from another site, opened from the dashboard's page.
    let r = http
        .send(
            &addr,
            "GET",
            "/api/chat/ws",
            &ws_upgrade("http://evil.example"),
            "",
        )
        .await
        .unwrap();
    assert_refused(&r, "Origin");
    let r = http
        .send(&addr, "GET", "/api/chat/ws", &ws_upgrade(&own_page), "")
        .await
        .unwrap();
    assert_eq!(r.status, 101, "{r:?}");
    drop(web);

    // Behind a name: --public-host adds it, and only it.
    let named = Web::start(
        web_args(&net, "named.db", &["--public-host", "dash.example.org"]),
        &[],
        &net.dir.path().join("named.log"),
    );
    let addr = named.node.address.clone();
    let origin = [
        ("Host", "dash.example.org"),
        ("Origin", "https://dash.example.org"),
    ];
    let r = http
        .send(&addr, "POST", "/api/auth/challenge", &origin, &ask)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = http
        .send(
            &addr,
            "GET",
            "/api/config",
            &[("Host", "evil.example.org")],
            "",
        )
        .await
        .unwrap();
    assert_refused(&r, "Host");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_certificate_from_the_ca_and_nothing_in_the_clear() {
    let net = Net::registry(Net::prepare());
    let files = issue("web-https");
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let log = net.dir.path().join("web.log");
    let node = Node::start(
        &web_args(
            &net,
            "web.db",
            &["--https-cert", &cert, "--https-key", &key],
        ),
        log.clone(),
    );
    let addr = node.address.clone();
    let https = Probe::https(&ca_path()).unwrap();
    let r = https.get(&addr, "/api/config").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["registry"], json!(net.registry.address));
    // The sign-in message names the https site; the page's origin is https.
    let ask = json!({ "address": dev_signer(5).unwrap().address().to_string() }).to_string();
    let own_page = format!("https://{addr}");
    let r = https
        .send(
            &addr,
            "POST",
            "/api/auth/challenge",
            &[("Origin", &own_page)],
            &ask,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains(&format!("at {own_page}")), "{message}");
    let http_page = format!("http://{addr}");
    let r = https
        .send(
            &addr,
            "POST",
            "/api/auth/challenge",
            &[("Origin", &http_page)],
            &ask,
        )
        .await
        .unwrap();
    assert_refused(&r, "Origin");
    // Plain HTTP to the HTTPS port gets no answer.
    let plain = Probe::plain().get(&addr, "/api/config").await;
    assert!(plain.is_err(), "plaintext answered: {plain:?}");
    // A client that does not trust the tests' CA refuses the server.
    let other_ca = unfed_node::net::pki::Ca::generate("other").unwrap();
    let other = net.dir.path().join("other-ca.crt");
    std::fs::write(&other, &other_ca.cert_pem).unwrap();
    let untrusted = Probe::https(&other)
        .unwrap()
        .get(&addr, "/api/config")
        .await;
    assert!(untrusted.is_err(), "{untrusted:?}");
    drop(node);

    // Refused at start: half the HTTPS flags, and a key file others can read.
    let refused = |extra: &[&str]| {
        let out = std::process::Command::new(common::net::BIN)
            .args(web_args(&net, "refused.db", extra))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} must be refused");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--https-cert", &cert]);
    assert!(err.contains("--https-cert needs --https-key"), "{err}");
    let err = refused(&["--https-key", &key]);
    assert!(err.contains("--https-key needs --https-cert"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&["--https-cert", &cert, "--https-key", &key]);
    assert!(
        err.contains("--https-key") && err.contains("chmod 600"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_a_public_address_warns() {
    let net = Net::registry(Net::prepare());
    let log = net.dir.path().join("web.log");
    let node = Node::start(
        &web_args(&net, "web.db", &["--host", "0.0.0.0"]),
        log.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let warned = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("in the clear") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
    };
    assert!(warned.contains("--https-cert"), "{warned}");
    // It still serves; any address of this machine is a valid Host when bound to all.
    for addr in [format!("127.0.0.1:{}", node.port()), node.address.clone()] {
        let r = Probe::plain().get(&addr, "/api/config").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
}
