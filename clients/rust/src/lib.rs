//! Rust client for pushcluster: the HTTP API (resolve, offline messages,
//! push) and subscribers for the comet transports (WebSocket, TCP, SSE).
//!
//! Never miss a message: subscribe first, then fetch what was stored after
//! your last mid, and drop anything whose mid you have already seen.

pub mod backoff;
pub mod follow;
pub mod http;
pub mod sub;

use serde_json::Value;

/// A message as delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Message id within its group.
    pub mid: i64,
    /// 0 private, 1 public (broadcast).
    pub gid: i32,
    /// The JSON message as pushed.
    pub msg: Value,
}

/// One frame from a comet.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `+h`: subscribed, or a heartbeat answered.
    Heartbeat,
    /// A message.
    Message(Message),
    /// `-r`: the comet asks the client to resolve again and reconnect.
    Reconnect,
    /// SSE `event: reset`: the key's sequence started again (storage lost
    /// its data); forget the mids seen, the messages that follow are new.
    Reset,
    /// SSE `event: epoch`: the epoch of the key's sequence, which the mids
    /// that follow belong to (asked for with an epoch on connecting).
    Epoch(u64),
    /// `-p`, `-a`, `-c`: a refusal; the connection closes.
    Error(String),
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("server answered ret={ret}: {msg}")]
    Api { ret: i64, msg: String },
    #[error("bad frame: {0}")]
    Frame(String),
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses a message object `{"msg":…,"mid":…,"gid":…}`; in the legacy format
/// `msg` is a string holding the JSON, which is decoded too.
pub fn parse_message(v: &Value) -> Result<Message> {
    let mid = v
        .get("mid")
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::Frame(format!("no integer mid in {v}")))?;
    let gid = v.get("gid").and_then(Value::as_i64).unwrap_or(0) as i32;
    let msg = match v.get("msg") {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(other) => other.clone(),
        None => return Err(Error::Frame(format!("no msg in {v}"))),
    };
    Ok(Message { mid, gid, msg })
}

/// Parses one text frame as the WebSocket transport sends it.
pub fn parse_text_frame(text: &str) -> Result<Frame> {
    match text {
        "+h\r\n" => Ok(Frame::Heartbeat),
        "-r\r\n" => Ok(Frame::Reconnect),
        t if t.starts_with('-') => Ok(Frame::Error(t.trim().to_owned())),
        t => {
            let v: Value =
                serde_json::from_str(t).map_err(|e| Error::Frame(format!("{e}: {t}")))?;
            parse_message(&v).map(Frame::Message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(parse_text_frame("+h\r\n").unwrap(), Frame::Heartbeat);
        assert_eq!(
            parse_text_frame("-a\r\n").unwrap(),
            Frame::Error("-a".into())
        );
        let Frame::Message(m) = parse_text_frame(r#"{"msg":"{\"a\":1}","mid":3,"gid":0}"#).unwrap()
        else {
            panic!("not a message")
        };
        assert_eq!((m.mid, m.gid, m.msg["a"].as_i64()), (3, 0, Some(1)));
        let Frame::Message(m) =
            parse_text_frame(r#"{"msg":{"a":2},"mid":9007199254740993,"gid":1}"#).unwrap()
        else {
            panic!("not a message")
        };
        assert_eq!((m.mid, m.gid), (9007199254740993, 1));
        assert!(parse_text_frame("garbage").is_err());
    }
}
