//! Wire encoding of delivered messages, pure functions shared by the comet
//! transports and the HTTP API.
//!
//! gopush-cluster has two message formats, chosen per connection: clients that
//! subscribed without `ver` get `{"msg":"<message as a JSON string>",...}`, clients
//! with `ver` get the message itself, `{"msg":<message>,...}`.

/// Which message format a connection asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `msg` holds the message as a JSON string (clients that sent no `ver`).
    Legacy,
    /// `msg` holds the message's JSON itself (clients that sent `ver`).
    Json,
}

/// The heartbeat reply, also the first frame after a successful subscribe.
pub const HEARTBEAT_REPLY: &[u8] = b"+h\r\n";
/// Protocol error: a parameter is wrong.
pub const ERR_PARAM: &[u8] = b"-p\r\n";
/// Protocol error: authentication failed.
pub const ERR_AUTH: &[u8] = b"-a\r\n";
/// Protocol error: the key cannot take this connection (limit reached, not owned here).
pub const ERR_CHANNEL: &[u8] = b"-c\r\n";
/// Sent before the comet closes a connection so that the client re-resolves its
/// comet and reconnects (shutdown, shard moved). gopush clients treat any
/// close as "reconnect"; newer clients can act on this frame at once.
pub const RECONNECT: &[u8] = b"-r\r\n";

/// Encodes one message as the JSON object clients receive.
///
/// `payload` is the JSON the back end pushed; it was validated when pushed.
pub fn encode_json(payload: &[u8], mid: i64, gid: i32, format: Format) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 40);
    out.extend_from_slice(b"{\"msg\":");
    match format {
        Format::Json => out.extend_from_slice(payload),
        Format::Legacy => {
            let text = String::from_utf8_lossy(payload);
            // Serialising a str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, text.as_ref());
        }
    }
    out.extend_from_slice(b",\"mid\":");
    out.extend_from_slice(mid.to_string().as_bytes());
    out.extend_from_slice(b",\"gid\":");
    out.extend_from_slice(gid.to_string().as_bytes());
    out.push(b'}');
    out
}

/// Wraps a JSON message as a RESP bulk string, the TCP transport's frame.
pub fn encode_resp_bulk(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    out.push(b'$');
    out.extend_from_slice(json.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_format_embeds_the_message() {
        let f = encode_json(br#"{"hi":1}"#, 7, 0, Format::Json);
        assert_eq!(f, br#"{"msg":{"hi":1},"mid":7,"gid":0}"#);
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["msg"]["hi"], 1);
    }

    #[test]
    fn legacy_format_quotes_the_message() {
        let f = encode_json(br#"{"hi":"a\"b"}"#, 9007199254740993, 1, Format::Legacy);
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["msg"], r#"{"hi":"a\"b"}"#);
        // Parsed as an integer, the mid stays exact beyond 2^53.
        assert_eq!(v["mid"].as_i64(), Some(9007199254740993));
        assert_eq!(v["gid"], 1);
    }

    #[test]
    fn resp_bulk() {
        assert_eq!(encode_resp_bulk(b"{}"), b"$2\r\n{}\r\n");
        let body = "é".repeat(3);
        let f = encode_resp_bulk(body.as_bytes());
        assert!(f.starts_with(b"$6\r\n"));
    }
}
