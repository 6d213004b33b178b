//! Same-origin checks against DNS rebinding and cross-site requests.
//!
//! A page on a name the attacker controls can re-point that name at 127.0.0.1 and then
//! read the dashboard as its own origin; it cannot change the `Host` header its browser
//! sends, so every request must name this dashboard in `Host`. A page on another origin
//! can still send POSTs and open WebSockets here (the browser only hides the answers), so
//! a request that changes state and carries an `Origin` must come from the dashboard's
//! own page. Clients that are not browsers (unfedctl, curl) send no `Origin`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::server::ApiError;

/// A `--public-host` entry: a name this dashboard is also reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicHost {
    name: String,
    /// None: any port (a proxy in front may listen on 443 while the dashboard binds 8080).
    port: Option<u16>,
}

impl PublicHost {
    /// `NAME` or `NAME:PORT` (the flag's value parser).
    pub fn parse(value: &str) -> Result<Self, String> {
        match split_authority(value) {
            Some((name, port)) if !value.contains("://") => Ok(Self { name, port }),
            _ => Err(format!(
                "{value:?} is not a host name: give the name browsers use, such as dashboard.example.org or dashboard.example.org:8443 (no scheme, no path)"
            )),
        }
    }
}

/// The names and origins this dashboard answers to.
#[derive(Debug, Clone)]
pub struct SameOrigin {
    /// "http" or "https": what this server speaks.
    scheme: &'static str,
    port: u16,
    /// Hosts on `port` that are this machine: loopback names and the bound address.
    local: Vec<String>,
    /// Bound to every interface: any IP literal on `port` is this server (only a name
    /// can be rebound, and the attacker's name is not an IP literal).
    any_ip: bool,
    public: Vec<PublicHost>,
}

/// A `Host` value or an origin's authority, split: lowercase host (IPv6 in brackets) and
/// its port if written.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let a = authority.trim().to_ascii_lowercase();
    if a.is_empty() || a.contains(['/', '@', ' ']) {
        return None;
    }
    let (host, port) = match a.rfind(']') {
        // [v6] or [v6]:port
        Some(end) if a.starts_with('[') => (&a[..=end], a[end + 1..].strip_prefix(':')),
        Some(_) => return None,
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a.as_str(), None),
        },
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

/// How an IP is written in a `Host` header.
fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

impl SameOrigin {
    /// The rules of a server speaking `scheme` on `bound`, also reached at `public`.
    pub fn new(scheme: &'static str, bound: SocketAddr, public: Vec<PublicHost>) -> Self {
        let mut local: Vec<String> = ["127.0.0.1", "localhost", "[::1]"].map(String::from).into();
        let ip = host_of(bound.ip());
        if !local.contains(&ip) && !bound.ip().is_unspecified() {
            local.push(ip);
        }
        Self {
            scheme,
            port: bound.port(),
            local,
            any_ip: bound.ip().is_unspecified(),
            public,
        }
    }

    fn is_public(&self, host: &str, port: Option<u16>) -> bool {
        self.public
            .iter()
            .any(|p| p.name == host && (p.port.is_none() || p.port == port))
    }

    /// Whether `authority` (a `Host` value) names this dashboard.
    fn allows_host(&self, authority: &str) -> bool {
        let Some((host, port)) = split_authority(authority) else {
            return false;
        };
        if self.is_public(&host, port) {
            return true;
        }
        port.unwrap_or(default_port(self.scheme)) == self.port
            && (self.local.contains(&host) || (self.any_ip && is_ip_literal(&host)))
    }

    /// What `Host` may say, for the refusal.
    fn hosts(&self) -> String {
        let mut names: Vec<String> = self
            .local
            .iter()
            .map(|h| format!("{h}:{}", self.port))
            .collect();
        if self.any_ip {
            names.push(format!("any IP address of this machine:{}", self.port));
        }
        names.extend(self.public.iter().map(|p| match p.port {
            Some(port) => format!("{}:{port}", p.name),
            None => p.name.clone(),
        }));
        names.join(", ")
    }

    /// Whether `origin` is the page of `host` (a `Host` already allowed) on this server.
    fn allows_origin(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, authority)) = origin.trim().split_once("://") else {
            return false; // "null": a sandboxed frame or a file
        };
        let scheme = scheme.to_ascii_lowercase();
        let (Some((o_host, o_port)), Some((h_host, h_port))) =
            (split_authority(authority), split_authority(host))
        else {
            return false;
        };
        // Behind a proxy that terminates TLS the page is https while this server is not.
        let scheme_ok =
            scheme == self.scheme || (scheme == "https" && self.is_public(&h_host, h_port));
        let port = |p: Option<u16>| p.unwrap_or(default_port(&scheme));
        scheme_ok && o_host == h_host && port(o_port) == port(h_port)
    }

    /// Checks one request: `Host` always; `Origin` when the request changes state.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        let fix =
            "if you reach the dashboard through another name, start it with --public-host NAME";
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let Some(host) = host.filter(|h| self.allows_host(h)) else {
            let what = match host {
                Some(h) => format!("the Host header {h:?} is not a name of this dashboard"),
                None => "the request has no readable Host header".to_string(),
            };
            return Err(ApiError::new(
                403,
                format!(
                    "{what} (it answers to {}); a page on another name may be a DNS-rebinding attack. Fix: {fix}",
                    self.hosts()
                ),
            ));
        };
        let changes_state = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
            || headers.contains_key(header::UPGRADE);
        if !changes_state {
            return Ok(());
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("(not text)");
        if self.allows_origin(origin, host) {
            return Ok(());
        }
        Err(ApiError::new(
            403,
            format!(
                "the Origin header {origin:?} is not this dashboard's page ({}://{host}): sign-in, chats and the faucet are accepted only from it, not from another site. Fix: open the dashboard at {}://{host}/, or {fix}",
                self.scheme, self.scheme
            ),
        ))
    }
}

/// The middleware: refuses with 403 and the JSON error before any handler runs.
pub async fn guard(State(rules): State<Arc<SameOrigin>>, req: Request, next: Next) -> Response {
    match rules.check(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::debug!(method = %req.method(), path = %req.uri().path(), "refused: {}", e.message);
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn rules(scheme: &'static str, bound: &str, public: &[&str]) -> SameOrigin {
        let public = public
            .iter()
            .map(|s| PublicHost::parse(s).unwrap())
            .collect();
        SameOrigin::new(scheme, bound.parse().unwrap(), public)
    }

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn post(r: &SameOrigin, host: Option<&str>, origin: Option<&str>) -> Result<(), String> {
        r.check(&Method::POST, &headers(host, origin))
            .map_err(|e| e.message)
    }

    #[test]
    fn host_must_name_this_dashboard() {
        let r = rules("http", "127.0.0.1:8080", &[]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
        ] {
            assert_eq!(post(&r, Some(ok), None), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1:9999",
            "127.0.0.1",
            "localhost.evil.example:8080",
            "10.0.0.5:8080",
            "user@127.0.0.1:8080",
        ] {
            let err = post(&r, Some(bad), None).unwrap_err();
            assert!(
                err.contains("Host header") && err.contains("--public-host"),
                "{bad}: {err}"
            );
        }
        let err = post(&r, None, None).unwrap_err();
        assert!(err.contains("no readable Host"), "{err}");
        // Reads are checked too: that is what stops a rebound page reading the API.
        let get = r.check(&Method::GET, &headers(Some("evil.example:8080"), None));
        assert_eq!(get.unwrap_err().status, 403);
    }

    #[test]
    fn bound_addresses_and_public_names() {
        let r = rules(
            "https",
            "0.0.0.0:8443",
            &["Dash.Example.org", "other.example:9000"],
        );
        assert_eq!(post(&r, Some("192.168.1.7:8443"), None), Ok(()));
        assert!(post(&r, Some("192.168.1.7:8080"), None).is_err());
        // A public name without a port is accepted on any port (a proxy in front).
        assert_eq!(post(&r, Some("dash.example.org"), None), Ok(()));
        assert_eq!(post(&r, Some("dash.example.org:8443"), None), Ok(()));
        assert_eq!(post(&r, Some("other.example:9000"), None), Ok(()));
        assert!(post(&r, Some("other.example:9001"), None).is_err());
        let r = rules("http", "10.1.2.3:80", &[]);
        assert_eq!(post(&r, Some("10.1.2.3"), None), Ok(()), "default port");
        assert!(post(&r, Some("10.1.2.4"), None).is_err());
        for bad in ["https://x.org", "x.org/path", "x.org:port", ""] {
            let err = PublicHost::parse(bad).unwrap_err();
            assert!(err.contains("not a host name"), "{bad}: {err}");
        }
    }

    #[test]
    fn state_changes_must_come_from_the_dashboards_own_page() {
        let r = rules("http", "127.0.0.1:8080", &[]);
        let host = Some("127.0.0.1:8080");
        assert_eq!(post(&r, host, Some("http://127.0.0.1:8080")), Ok(()));
        for bad in [
            "http://evil.example",
            "http://evil.example:8080",
            "https://127.0.0.1:8080",
            "http://localhost:8080",
            "http://127.0.0.1:8081",
            "null",
        ] {
            let err = post(&r, host, Some(bad)).unwrap_err();
            assert!(err.contains("Origin header"), "{bad}: {err}");
        }
        // Reads skip the Origin check; a WebSocket upgrade does not.
        let cross = headers(host, Some("http://evil.example"));
        assert_eq!(r.check(&Method::GET, &cross).map_err(|e| e.message), Ok(()));
        let mut upgrade = cross.clone();
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(r.check(&Method::GET, &upgrade).unwrap_err().status, 403);
        // HTTPS: the page's origin is https, on the default port without one.
        let r = rules("https", "127.0.0.1:443", &[]);
        assert_eq!(
            post(&r, Some("localhost"), Some("https://localhost")),
            Ok(())
        );
        assert_eq!(
            post(&r, Some("localhost"), Some("https://localhost:443")),
            Ok(())
        );
        assert!(post(&r, Some("localhost"), Some("http://localhost")).is_err());
        // Behind a TLS-terminating proxy under a public name, the page is https.
        let r = rules("http", "127.0.0.1:8080", &["dash.example.org"]);
        let ok = post(
            &r,
            Some("dash.example.org"),
            Some("https://dash.example.org"),
        );
        assert_eq!(ok, Ok(()));
    }
}
