//! Reading requests: query parameters, bodies under a size limit, form
//! bodies.

use crate::reply::Reply;
use axum::body::Body;
use axum::extract::Query;
use axum::http::StatusCode;
use bytes::Bytes;
use std::collections::HashMap;

/// Query parameters.
pub(crate) type Params = Query<HashMap<String, String>>;

/// A parameter that is present and not empty.
pub(crate) fn param<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The body, or 413 when it is over `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, Reply> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        Reply::param(format!("request body is larger than {limit} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    })
}

/// An `application/x-www-form-urlencoded` body as a map (later names win).
pub(crate) fn url_form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body.trim_ascii())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies() {
        let f = url_form(b"key=a%2Cb&x=1+2\n");
        assert_eq!(f.get("key").map(String::as_str), Some("a,b"));
        assert_eq!(f.get("x").map(String::as_str), Some("1 2"));
        assert!(url_form(b"").is_empty());
    }

    #[test]
    fn empty_parameters_are_absent() {
        let q = HashMap::from([("a".to_owned(), String::new()), ("b".into(), "1".into())]);
        assert_eq!(param(&q, "a"), None);
        assert_eq!(param(&q, "b"), Some("1"));
        assert_eq!(param(&q, "c"), None);
    }
}
