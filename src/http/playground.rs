//! The playground: `GET /` for a browser (an `Accept` that prefers `text/html`) is a page that creates
//! requests, follows their reply live through the browser's own `EventSource`, stops and continues them, and
//! shows their status document, raw response and event log. API clients keep the JSON answer of `GET /`.
//!
//! The page, its script and its style sheet are in `playground/` beside this file, embedded at build time: the
//! binary serves them with no network fetch of any kind. The page only talks to this server, through the public
//! API, and its Content-Security-Policy says so (scripts and styles from this origin only, no inline code,
//! connections to this origin and to the public base URL, which is this server under the name clients use).

use super::AppState;
use crate::keys::Refusal;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("playground/index.html");
const SCRIPT: &str = include_str!("playground/app.js");
const STYLE: &str = include_str!("playground/style.css");

/// The attribute the script reads to ask for a service key at once, as written in `index.html`.
const KEY_NOT_REQUIRED: &str = "data-key-required=\"false\"";

/// Whether `Accept` asks for HTML: `text/html` listed with a higher preference than `application/json`. A
/// browser's navigation sends `text/html,...,*/*;q=0.8`; API clients send nothing, `*/*` or `application/json`.
pub fn wants_html(headers: &HeaderMap) -> bool {
    let (mut html, mut json) = (0.0_f32, 0.0_f32);
    for accept in headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()) {
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "text/html" => html = html.max(q),
                "application/json" => json = json.max(q),
                _ => {}
            }
        }
    }
    html > 0.0 && html > json
}

/// The page itself, telling the script whether the server requires a service key.
pub async fn page(app: &AppState) -> Response {
    let keys_required = matches!(app.gate.authenticate(None).await, Err(Refusal::Missing));
    let body =
        if keys_required { PAGE.replacen(KEY_NOT_REQUIRED, "data-key-required=\"true\"", 1) } else { PAGE.to_owned() };
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, policy(&app.engine.urls().base));
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    secure(headers);
    response
}

/// `GET /playground/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /playground/style.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    secure(response.headers_mut());
    response
}

/// Headers of every playground answer: no sniffing, and revalidated on each load so that an upgraded server's
/// page never runs with an old script.
fn secure(headers: &mut HeaderMap) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// The page's Content-Security-Policy: nothing but this server. `connect-src` names the public base URL's
/// origin too, since the URLs of a request are built from it (it differs from the page's origin when the
/// server is reached under another name than the one it was told).
fn policy(public_base: &str) -> HeaderValue {
    let mut connect = String::from("'self'");
    if let Some(origin) = origin_of(public_base) {
        connect.push(' ');
        connect.push_str(origin);
    }
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| {
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
    })
}

/// `scheme://host[:port]` of an http(s) URL, when it is plain enough to name in a policy.
fn origin_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let end = url.len() - rest.len() + rest.find('/').unwrap_or(rest.len());
    let origin = &url[..end];
    let host = &url[url.len() - rest.len()..end];
    let plain =
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    plain.then_some(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")));
        headers
    }

    #[test]
    fn a_browser_navigation_wants_html_and_api_clients_do_not() {
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
        assert!(wants_html(&accept(chromium)));
        assert!(wants_html(&accept("text/html")));
        assert!(!wants_html(&HeaderMap::new()));
        assert!(!wants_html(&accept("*/*")));
        assert!(!wants_html(&accept("application/json")));
        assert!(!wants_html(&accept("application/json, text/html;q=0.5")));
        assert!(!wants_html(&accept("text/html, application/json")));
        assert!(!wants_html(&accept("text/html;q=0")));
        assert!(wants_html(&accept("application/json;q=0.5, text/html")));
    }

    #[test]
    fn the_policy_names_the_public_origin_only_when_it_is_plain() {
        assert_eq!(origin_of("http://127.0.0.1:8080"), Some("http://127.0.0.1:8080"));
        assert_eq!(origin_of("https://api.example.com/offload"), Some("https://api.example.com"));
        assert_eq!(origin_of("https://a b/"), None);
        assert_eq!(origin_of("ftp://x"), None);
        let value = policy("https://x.example; script-src *");
        let text = value.to_str().unwrap_or_default();
        assert!(text.contains("connect-src 'self';"), "{text}");
        assert!(!text.contains('*'), "{text}");
    }
}
