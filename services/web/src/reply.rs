//! gopush-cluster style replies: `{"ret":N,"msg":"…","data":…}`, optionally
//! wrapped for JSONP.
//!
//! `ret` codes: 0 ok, 1001 no comet serves the key, 65533 unauthorized,
//! 65534 parameter error, 65535 internal error. The HTTP status matches
//! (200, 503, 401, 400 or 413, 500) except for JSONP, which is always 200:
//! a browser never runs a script that came with an error status, so the
//! callback could not see the error.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

pub use pushcluster_core::ret::{INTERNAL, NO_NODE, OK, PARAM, UNAUTHORIZED};

/// The `ret` of a response, for the request metrics (a response extension).
#[derive(Debug, Clone, Copy)]
pub struct Ret(pub u32);

/// A reply on its way out.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    ret: u32,
    msg: String,
    data: Option<Value>,
    callback: Option<String>,
}

impl Reply {
    /// `{"ret":0,"msg":"ok"}`, with `data` when there is something to return.
    pub fn ok(data: Option<Value>) -> Self {
        Self {
            status: StatusCode::OK,
            ret: OK,
            msg: "ok".into(),
            data,
            callback: None,
        }
    }
    /// An error with a clear message.
    pub fn err(ret: u32, msg: impl Into<String>) -> Self {
        let status = match ret {
            PARAM => StatusCode::BAD_REQUEST,
            UNAUTHORIZED => StatusCode::UNAUTHORIZED,
            NO_NODE => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            ret,
            msg: msg.into(),
            data: None,
            callback: None,
        }
    }
    /// A parameter error.
    pub fn param(msg: impl Into<String>) -> Self {
        Self::err(PARAM, msg)
    }
    /// Overrides the HTTP status (e.g. 413 for a body over the limit).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
    /// Wraps the reply as `callback(...)` when a valid callback name is given.
    pub fn jsonp(mut self, callback: Option<&str>) -> Self {
        match callback.filter(|c| !c.is_empty()) {
            None => self,
            Some(c) if valid_callback(c) => {
                self.callback = Some(c.to_owned());
                self
            }
            Some(_) => {
                Self::param("callback must be a JavaScript identifier path ([A-Za-z0-9_$.])")
            }
        }
    }
    /// The `ret` code.
    pub fn ret(&self) -> u32 {
        self.ret
    }
}

/// A JSONP callback may only name a function, so it cannot inject script.
pub fn valid_callback(c: &str) -> bool {
    c.len() <= 128
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '$' || ch == '.')
        && !c.starts_with('.')
}

/// The body of every reply, written straight from the [`Reply`]: building
/// it as a `serde_json::Value` first cost every push a map of three owned
/// entries (issue 29).
#[derive(Serialize)]
struct Envelope<'a> {
    ret: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

impl Envelope<'_> {
    fn to_json(&self) -> String {
        // Serializing a struct of a number, a string and a Value cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|_| format!(r#"{{"ret":{INTERNAL},"msg":"unencodable reply"}}"#))
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let body = Envelope {
            ret: self.ret,
            msg: &self.msg,
            data: self.data.as_ref(),
        }
        .to_json();
        let ret = Ret(self.ret);
        let mut res = match self.callback {
            None => (
                self.status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                body,
            )
                .into_response(),
            Some(cb) => (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    "application/javascript; charset=utf-8",
                )],
                format!("{cb}({body})"),
            )
                .into_response(),
        };
        res.extensions_mut().insert(ret);
        res
    }
}

/// Maps a failed call to the message service or a comet to a reply.
pub fn status_reply(s: tonic::Status) -> Reply {
    match s.code() {
        tonic::Code::InvalidArgument => Reply::param(s.message().to_owned()),
        tonic::Code::DeadlineExceeded => Reply::err(
            INTERNAL,
            "timed out: the message may or may not be stored; retry and dedupe by content",
        ),
        _ => Reply::err(INTERNAL, s.message().to_owned()),
    }
}

/// Unknown paths get a JSON error too.
pub async fn not_found() -> Reply {
    Reply::param("no such endpoint; see /openapi.json").with_status(StatusCode::NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks() {
        assert!(valid_callback("cb"));
        assert!(valid_callback("jQuery_123.done$"));
        assert!(!valid_callback("alert(1)//"));
        assert!(!valid_callback("a b"));
        assert!(!valid_callback(".x"));
        assert_eq!(Reply::ok(None).jsonp(Some("x;alert(1)")).ret(), PARAM);
    }

    #[test]
    fn envelopes_are_gopush_cluster_replies() {
        let data = serde_json::json!({"mid": 5});
        let ok = Envelope {
            ret: OK,
            msg: "ok",
            data: Some(&data),
        };
        assert_eq!(ok.to_json(), r#"{"ret":0,"msg":"ok","data":{"mid":5}}"#);
        let err = Envelope {
            ret: PARAM,
            msg: "key \"a\" is too long",
            data: None,
        };
        assert_eq!(
            err.to_json(),
            r#"{"ret":65534,"msg":"key \"a\" is too long"}"#
        );
    }
}
