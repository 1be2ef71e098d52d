//! What keeps web pages from driving an open server (one without service keys), which has no credential of its
//! own to protect it: any page its operator visits could otherwise create requests on it (and spend its upstream
//! key), by a simple form-like POST that needs no preflight, or by a DNS name of the attacker's own that resolves
//! to the server (DNS rebinding), under which the page is "same-origin" with it.
//!
//! While the server is open, [`refusal`] answers:
//! - only the names of this server: its public URL's host, its advertise URL's host (peers relay calls under
//!   it), `localhost`, `127.0.0.1` and `[::1]`, with any port, and what `--allowed-hosts` adds; any other `Host`
//!   is a 421 (a rebinding page's `Host` is its own name, so it never gets an answer);
//! - creates (the two create endpoints, `POST /v1/chat/completions`, `GET /v1/models`, and their preflights) only
//!   from this server's own pages or from the origins `--cors-origins` lists. A browser names the page that sent
//!   a call in `Origin` (every POST, simple or not, and every cross-origin call), else in `Sec-Fetch-Site`; a
//!   call from another site is a 403 without CORS headers, so the page reads nothing, not even the refusal.
//!
//! Calls from other programs (no `Origin`, no `Sec-Fetch-Site`) are not affected, and neither are the URLs of a
//! request (status, stream, raw, stop, DELETE): they are capabilities, and answer any origin, as OffloadGPT's
//! browser clients need. With service keys none of this applies: a create needs a key, which a page has only
//! if it was given one, and the server answers any name it is reached under.

use super::AppState;
use super::error::ApiError;
pub use crate::domain::host::{host_setting, origin_setting};
use crate::domain::host::{name_of, normal_origin};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The names every server answers to, with any port.
const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// The routes that create requests or spend the upstream key.
const CREATES: [&str; 5] =
    ["/v1/stream-chatgpt", "/v1/async-chatgpt", "/v1/chat/completions", "/v1/responses", "/v1/models"];

/// Which hosts an open server answers to, and which other origins may create on it.
#[derive(Debug, Clone, Default)]
pub struct WebPolicy {
    /// Host names (lowercase, IPv6 in brackets, no port) answered besides [`LOOPBACK`].
    hosts: Vec<String>,
    /// `--allowed-hosts *`: every host.
    any_host: bool,
    /// `--cors-origins`, each as `scheme://host[:port]` (lowercase, no default port).
    origins: Vec<String>,
    /// `--cors-origins *`: every origin (the server is then open to every page, as it was before).
    any_origin: bool,
    /// The public URL's origin: this server's own pages under the name clients use (behind a proxy, the `Host`
    /// of the call may be another).
    public_origin: Option<String>,
}

impl WebPolicy {
    /// `public_url` and `advertise_url` are base URLs of this server; `allowed_hosts` and `cors_origins` as
    /// checked by [`host_setting`] and [`origin_setting`].
    pub fn new(
        public_url: &str,
        advertise_url: Option<&str>,
        allowed_hosts: &[String],
        cors_origins: &[String],
    ) -> Self {
        let public = url::Url::parse(public_url).ok();
        let mut hosts: Vec<String> = [public.as_ref(), advertise_url.and_then(|u| url::Url::parse(u).ok()).as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|u| u.host_str().map(str::to_ascii_lowercase))
            .collect();
        hosts.extend(allowed_hosts.iter().filter(|h| *h != "*").cloned());
        Self {
            hosts,
            any_host: allowed_hosts.iter().any(|h| h == "*"),
            origins: cors_origins.iter().filter(|o| *o != "*").cloned().collect(),
            any_origin: cors_origins.iter().any(|o| o == "*"),
            public_origin: public.map(|u| u.origin().ascii_serialization()),
        }
    }

    /// `Err` names the host that is not served.
    fn check_host(&self, host: Option<&str>) -> Result<(), ApiError> {
        // A call without a name (HTTP/1.0) comes from no browser: a page always sends its URL's host.
        let Some(host) = host else { return Ok(()) };
        let name = name_of(host);
        if self.any_host || LOOPBACK.contains(&name.as_str()) || self.hosts.contains(&name) {
            return Ok(());
        }
        let public = self.hosts.first().map(String::as_str).unwrap_or("127.0.0.1");
        Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            format!(
                "This server does not answer to the name {}: while it has no service keys it answers only to its \
                 public URL's host ({public}) and to localhost, 127.0.0.1 and [::1], so that no web page can reach \
                 it under a DNS name of its own. If this is a name of the server, start it with \
                 --allowed-hosts {} (or create a service key).",
                shown(&name),
                shown(&name),
            ),
        )
        .with_param(Some("Host")))
    }

    /// Whether the page that sent this call (if a browser did) may create requests here.
    fn check_origin(&self, headers: &HeaderMap, host: Option<&str>) -> Result<(), ApiError> {
        if self.any_origin {
            return Ok(());
        }
        let refuse = |page: String| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "This server has no service keys, so it takes creates only from its own pages and from the \
                     origins its --cors-origins setting lists; {page} may not create requests here. If that page is \
                     yours, start the server with --cors-origins naming its origin (or create a service key and send \
                     it from the page)."
                ),
            )
            .with_param(Some("Origin"))
        };
        match headers.get(header::ORIGIN) {
            Some(origin) => {
                let Some(origin) = origin.to_str().ok().and_then(|o| normal_origin(o).ok()) else {
                    return Err(refuse("a page of an opaque origin (a sandbox, a file, or a redirect)".into()));
                };
                let same =
                    host.is_some_and(|h| origin.split_once("://").map(|(_, a)| a) == Some(&*h.to_ascii_lowercase()));
                if same || self.public_origin.as_deref() == Some(&*origin) || self.origins.contains(&origin) {
                    return Ok(());
                }
                Err(refuse(format!("a page at {}", shown(&origin))))
            }
            // A call without `Origin` (a GET) still says where it comes from in `Sec-Fetch-Site`, if the browser
            // sends it.
            None => match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
                Some(site) if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") => {
                    Err(refuse("a page of another site".into()))
                }
                _ => Ok(()),
            },
        }
    }
}

/// Caller-supplied text as it is quoted back: at most 100 characters.
fn shown(text: &str) -> String {
    text.chars().take(100).collect()
}

/// The host a call was sent to: `Host`, or the URI's authority (HTTP/2).
fn host_of(request: &Request) -> Option<String> {
    match request.headers().get(header::HOST) {
        Some(host) => Some(host.to_str().unwrap_or("(not text)").to_owned()),
        None => request.uri().authority().map(|a| a.as_str().to_owned()),
    }
}

/// Whether the server is open (no service key), so that [`refusal`] applies. Every call asks, `/healthz` and the
/// reads of running requests included: while the store does not answer, the last answer serves, so that no call
/// waits on it.
pub async fn is_open(app: &AppState) -> bool {
    if app.engine.store_answers() { app.gate.is_open().await } else { app.gate.was_open() }
}

/// The answer refusing a call to an open server (see the module's comment), if it is refused.
pub fn refusal(app: &AppState, request: &Request) -> Option<Response> {
    let host = host_of(request);
    if let Err(refused) = app.web.check_host(host.as_deref()) {
        return Some(refused.into_response());
    }
    // Every method: the preflight too, so that the browser does not even send the call.
    if CREATES.contains(&request.uri().path())
        && let Err(refused) = app.web.check_origin(request.headers(), host.as_deref())
    {
        return Some(refused.into_response());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn policy() -> WebPolicy {
        WebPolicy::new(
            "https://offload.example.com",
            Some("http://10.0.0.5:8080"),
            &["lan-box".into()],
            &["https://app.example.com".into()],
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")));
        }
        headers
    }

    #[test]
    fn an_open_server_answers_its_own_names_with_any_port_and_no_other() {
        let p = policy();
        for host in [
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.1:1",
            "[::1]:8080",
            "offload.example.com",
            "10.0.0.5:8080",
            "lan-box:9",
            "localhost.",
        ] {
            assert!(p.check_host(Some(host)).is_ok(), "{host}");
        }
        for host in ["attacker.example", "127.0.0.2", "localhost.attacker.example", "[::2]:8080", "(not text)"] {
            let refused = p.check_host(Some(host)).err();
            assert_eq!(refused.map(|e| e.status), Some(StatusCode::MISDIRECTED_REQUEST), "{host}");
        }
        assert!(p.check_host(None).is_ok());
        let any = WebPolicy::new("http://127.0.0.1:8080", None, &["*".into()], &[]);
        assert!(any.check_host(Some("anything.example")).is_ok());
    }

    #[test]
    fn creates_come_from_this_servers_pages_or_the_listed_origins_only() {
        let p = policy();
        let host = Some("127.0.0.1:8080");
        for ok in [
            headers(&[]),
            headers(&[("origin", "http://127.0.0.1:8080")]),
            headers(&[("origin", "https://offload.example.com")]),
            headers(&[("origin", "https://APP.example.com:443")]),
            headers(&[("sec-fetch-site", "same-origin")]),
            headers(&[("sec-fetch-site", "none")]),
            headers(&[("origin", "https://app.example.com"), ("sec-fetch-site", "cross-site")]),
        ] {
            assert!(p.check_origin(&ok, host).is_ok(), "{ok:?}");
        }
        for refused in [
            headers(&[("origin", "http://localhost:8080")]),
            headers(&[("origin", "http://127.0.0.1:8081")]),
            headers(&[("origin", "null")]),
            headers(&[("origin", "https://evil.example")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
        ] {
            let error = p.check_origin(&refused, host).err();
            assert_eq!(error.as_ref().map(|e| e.status), Some(StatusCode::FORBIDDEN), "{refused:?}");
            assert!(error.is_some_and(|e| e.message.contains("--cors-origins")));
        }
        let any = WebPolicy::new("http://127.0.0.1:8080", None, &[], &["*".into()]);
        assert!(any.check_origin(&headers(&[("origin", "https://evil.example")]), host).is_ok());
    }
}
