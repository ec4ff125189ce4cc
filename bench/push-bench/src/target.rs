//! How a subscriber connects: URL template, the first frame the server sends
//! (pushcluster's `+h`), and the heartbeat it keeps.

use anyhow::bail;
use futures::StreamExt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A subscriber's WebSocket connection.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// How subscribers subscribe (defaults: pushcluster's protocol).
#[derive(clap::Args, Debug, Clone)]
pub struct Sub {
    /// Subscribe URL; `{addr}` and `{key}` are filled in.
    #[arg(long, default_value = "ws://{addr}/sub?key={key}&heartbeat=300&ver=1")]
    pub sub_url: String,
    /// First frame the server sends after subscribing ("" when it sends none).
    #[arg(long, default_value = "+h\r\n")]
    pub hello: String,
    /// Heartbeat frame the subscriber sends ("" for none).
    #[arg(long, default_value = "h")]
    pub heartbeat_frame: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30)]
    pub heartbeat: u64,
}

/// A TCP connection to `addr` from `source` (any port).
async fn dial(addr: SocketAddr, source: IpAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Sub {
    /// The subscribe URL for `key` at `addr`.
    fn url(&self, addr: SocketAddr, key: &str) -> String {
        self.sub_url
            .replace("{addr}", &addr.to_string())
            .replace("{key}", key)
    }

    /// Connects from `source` and, when the server greets, waits for it.
    pub async fn connect(&self, addr: SocketAddr, source: IpAddr, key: &str) -> anyhow::Result<Ws> {
        let stream = dial(addr, source).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(self.url(addr, key), stream).await?;
        if self.hello.is_empty() {
            return Ok(ws);
        }
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == self.hello => Ok(ws),
            other => bail!("subscribe {key}: unexpected first frame {other:?}"),
        }
    }

    /// Subscribes over pushcluster's TCP protocol (gopush-cluster's `sub`
    /// command) from `source` and waits for the `+h` greeting.
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
        source: IpAddr,
        key: &str,
    ) -> anyhow::Result<tokio::net::TcpStream> {
        let mut stream = dial(addr, source).await?;
        // 300 s, as the default WebSocket URL declares; heartbeats go every
        // --heartbeat seconds.
        let command = format!(
            "*3\r\n$3\r\nsub\r\n${}\r\n{key}\r\n$3\r\n300\r\n",
            key.len()
        );
        stream.write_all(command.as_bytes()).await?;
        let mut hello = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut hello)).await {
            Ok(Ok(_)) if &hello == b"+h\r\n" => Ok(stream),
            other => bail!("subscribe {key} over TCP: unexpected answer {hello:?} ({other:?})"),
        }
    }

    /// Connects a [`RawSub`]: the same handshake and greeting, read by hand.
    pub async fn connect_raw(
        &self,
        addr: SocketAddr,
        source: IpAddr,
        key: &str,
    ) -> anyhow::Result<RawSub> {
        let mut stream = dial(addr, source).await?;
        let url = self.url(addr, key);
        let path = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut sub = RawSub {
            stream,
            buf: vec![0; 8192],
            start: 0,
            end: 0,
        };
        let head_end = loop {
            if let Some(i) = sub.buf[..sub.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if sub.end == sub.buf.len() || sub.fill().await? == 0 {
                bail!("subscribe {key}: no HTTP response");
            }
        };
        if !sub.buf.starts_with(b"HTTP/1.1 101") {
            bail!(
                "subscribe {key}: upgrade refused: {}",
                String::from_utf8_lossy(&sub.buf[..head_end])
            );
        }
        sub.start = head_end;
        if !self.hello.is_empty() {
            let first = tokio::time::timeout(Duration::from_secs(10), sub.next_frame()).await;
            match first {
                Ok(Ok(Some((1, r)))) if &sub.buf[r.clone()] == self.hello.as_bytes() => {}
                _ => bail!("subscribe {key}: no greeting"),
            }
        }
        Ok(sub)
    }
}

/// A WebSocket subscriber that parses frames in place: no allocation per
/// message, so in fan-out runs the generator costs as little as it can next
/// to the server it measures. It only reads (no pongs, no heartbeats).
pub struct RawSub {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawSub {
    async fn fill(&mut self) -> std::io::Result<usize> {
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next frame's opcode and where its payload is in [`Self::payload`];
    /// `None` at the end of the stream. Cancel-safe: a frame is consumed only
    /// when it is returned.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<(u8, std::ops::Range<usize>)>> {
        loop {
            if let Some((op, header, len)) = frame_header(&self.buf[self.start..self.end]) {
                let total = header + len;
                if self.end - self.start >= total {
                    let payload = self.start + header..self.start + total;
                    self.start += total;
                    return Ok(Some((op, payload)));
                }
                if total > self.buf.len() {
                    self.buf.resize(total, 0);
                }
            }
            // Make room at the end: move the partial frame to the front.
            if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Bytes of a payload range returned by [`Self::next_frame`], valid
    /// until the next call.
    pub fn payload(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }
}

/// Opcode, header length and payload length of the frame at the start of
/// `b`, when its header is complete.
fn frame_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (b0, b1) = (*b.first()?, *b.get(1)?);
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (len, n) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => {
            let bytes: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        l => (l as usize, 2),
    };
    Some((b0 & 0x0f, n + mask, len))
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A publish request's body from a template: `{msg}` is the message as is,
/// `{msg-json}` the message as a JSON string, `{key}` the key it goes to
/// (pushpin's publish API takes `{"items":[{"channel":…,"formats":…}]}`).
pub fn publish_body(template: &str, key: &str, msg: String) -> String {
    if template == "{msg}" {
        return msg;
    }
    template
        .replace("{key}", key)
        .replace(
            "{msg-json}",
            &serde_json::Value::String(msg.clone()).to_string(),
        )
        .replace("{msg}", &msg)
}

/// The send time a message carries as `"t":<ns>`, however the server wraps it
/// (pushcluster: `{"msg":{"t":…},…}`; the others deliver the body as is).
pub fn sent_at_bytes(b: &[u8]) -> Option<u64> {
    let at = b.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&b[at..at + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{publish_body, sent_at_bytes};
    fn sent_at(s: &str) -> Option<u64> {
        sent_at_bytes(s.as_bytes())
    }

    #[test]
    fn frame_headers_in_every_length_form() {
        use super::frame_header;
        assert_eq!(frame_header(&[0x81, 5]), Some((1, 2, 5)));
        assert_eq!(frame_header(&[0x81, 126, 1, 0]), Some((1, 4, 256)));
        assert_eq!(frame_header(&[0x88, 0x82, 0, 0, 0, 0]), Some((8, 6, 2)));
        assert_eq!(frame_header(&[0x81, 127, 0, 0]), None);
        assert_eq!(frame_header(&[0x81]), None);
    }

    #[test]
    fn finds_the_send_time_wrapped_or_not() {
        assert_eq!(
            sent_at(r#"{"msg":{"t":42,"p":"x"},"mid":1,"gid":1}"#),
            Some(42)
        );
        assert_eq!(sent_at(r#"{"t":7}"#), Some(7));
        assert_eq!(sent_at("+h\r\n"), None);
    }

    #[test]
    fn publish_bodies_wrap_the_message_as_the_server_wants_it() {
        let msg = r#"{"t":7,"i":1}"#.to_owned();
        assert_eq!(publish_body("{msg}", "k", msg.clone()), msg);
        let pushpin =
            r#"{"items":[{"channel":"{key}","formats":{"ws-message":{"content":{msg-json}}}}]}"#;
        let body = publish_body(pushpin, "lat-3", msg);
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["items"][0]["channel"], "lat-3");
        let content = v["items"][0]["formats"]["ws-message"]["content"]
            .as_str()
            .expect("string");
        assert_eq!(sent_at(content), Some(7));
    }
}
