//! Cross-origin reads for browser clients: web's public API and the comets'
//! SSE are called from pages of other origins (`app.example.com` reading
//! `push.example.com`). Credentials are tokens in a parameter or an
//! `Authorization` header, never cookies, so no `Allow-Credentials`: a page
//! of any allowed origin can read only what its token opens.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Which page origins may read the API (`*`: any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowedOrigins(pub Vec<String>);

impl Default for AllowedOrigins {
    /// Any origin: the public API answers anyone who holds a key's token
    /// (or anyone, without tokens), so a browser's origin check adds nothing
    /// by default; a deployment may narrow it.
    fn default() -> Self {
        Self(vec!["*".into()])
    }
}

impl AllowedOrigins {
    /// Whether this is the default (any origin): configs leave it out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`,
    /// or `None` when that origin is not allowed.
    pub fn allow(&self, origin: &str) -> Option<HeaderValue> {
        if self.0.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        self.0
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
            .then(|| HeaderValue::from_str(origin).ok())
            .flatten()
    }
}

/// Request headers a cross-origin page may send: the token as a bearer, and
/// SSE's resume point.
const ALLOW_HEADERS: &str = "authorization, last-event-id, content-type";

/// Middleware: answers preflights and marks responses readable by allowed
/// origins (`axum::middleware::from_fn_with_state(origins, cors)`).
pub async fn cors(
    State(origins): State<Arc<AllowedOrigins>>,
    req: Request,
    next: Next,
) -> Response {
    let allowed = origin(req.headers()).and_then(|o| origins.allow(o));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if allowed.is_some() {
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(v) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    resp
}

fn origin(h: &HeaderMap) -> Option<&str> {
    h.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// The token of a request without a `token` parameter: `Authorization:
/// Bearer <token>` (kept out of URLs, so out of proxy logs).
pub fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_any_or_the_listed_origins() {
        let any = AllowedOrigins::default();
        assert_eq!(any.allow("https://a.example").unwrap(), "*");
        let some = AllowedOrigins(vec!["https://app.example.com".into()]);
        assert_eq!(
            some.allow("https://APP.example.com").unwrap(),
            "https://APP.example.com"
        );
        assert!(some.allow("https://evil.example").is_none());
        assert!(AllowedOrigins(vec![]).allow("https://a.example").is_none());
    }

    #[test]
    fn reads_a_bearer_token() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 12.ab"),
        );
        assert_eq!(bearer(&h), Some("12.ab"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        assert_eq!(bearer(&h), None);
    }
}
