//! Subscribers for the comet transports.

use crate::{parse_text_frame, Error, Frame, Result};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// What a subscription asks for.
#[derive(Debug, Clone)]
pub struct Params {
    pub key: String,
    /// Seconds between heartbeats the client promises to send.
    pub heartbeat: u64,
    pub token: Option<String>,
    /// Ask for the JSON message format (`ver`); without it, the legacy one.
    pub versioned: bool,
}

/// A live subscription over one transport.
pub enum Subscriber {
    /// WebSocket `/sub`.
    Ws(Box<WsStream>),
    /// gopush-cluster TCP protocol.
    Tcp { stream: TcpStream, buf: Vec<u8> },
    /// Server-sent events `/sub/sse`.
    Sse {
        body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
        buf: String,
    },
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Encodes a RESP array of bulk strings.
pub fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one TCP frame from the start of `buf`: `+h`, `-x` or a RESP bulk string.
pub fn parse_tcp_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|e| Error::Frame(e.to_string()))?;
    match line.as_bytes().first() {
        Some(b'+') => Ok(Some((Frame::Heartbeat, end + 2))),
        Some(b'-') if line == "-r" => Ok(Some((Frame::Reconnect, end + 2))),
        Some(b'-') => Ok(Some((Frame::Error(line.to_owned()), end + 2))),
        Some(b'$') => {
            let len: usize = line[1..]
                .parse()
                .map_err(|_| Error::Frame(line.to_owned()))?;
            let start = end + 2;
            if buf.len() < start + len + 2 {
                return Ok(None);
            }
            let json = std::str::from_utf8(&buf[start..start + len])
                .map_err(|e| Error::Frame(e.to_string()))?;
            Ok(Some((parse_text_frame(json)?, start + len + 2)))
        }
        _ => Err(Error::Frame(format!("unexpected line {line:?}"))),
    }
}

/// The `/sub` URL of `addr` for `p`.
fn ws_url(scheme: &str, addr: &str, p: &Params) -> String {
    let mut url = format!(
        "{scheme}://{addr}/sub?key={}&heartbeat={}",
        encode(&p.key),
        p.heartbeat
    );
    if let Some(t) = &p.token {
        url.push_str(&format!("&token={}", encode(t)));
    }
    if p.versioned {
        url.push_str("&ver=1");
    }
    url
}

impl Subscriber {
    /// Connects over WebSocket to `addr` (`host:port`).
    pub async fn websocket(addr: &str, p: &Params) -> Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url("ws", addr, p)).await?;
        Ok(Self::Ws(Box::new(ws)))
    }

    /// Connects over WebSocket behind TLS (`wss://`) to `addr`
    /// (`host:port`, the host being the name the certificate must carry),
    /// trusting what `tls` trusts: `None`, the system's roots.
    pub async fn websocket_tls(
        addr: &str,
        p: &Params,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            ws_url("wss", addr, p),
            None,
            true,
            tls.map(tokio_tungstenite::Connector::Rustls),
        )
        .await?;
        Ok(Self::Ws(Box::new(ws)))
    }

    /// [`Subscriber::websocket_tls`] to the address `connect`, naming
    /// `host` (`host:port`) in the handshake and the request: for a client
    /// that resolved the name itself, or reaches a pod behind a name that
    /// only resolves elsewhere.
    pub async fn websocket_tls_via(
        connect: std::net::SocketAddr,
        host: &str,
        p: &Params,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Self> {
        let stream = TcpStream::connect(connect).await?;
        stream.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            ws_url("wss", host, p),
            stream,
            None,
            tls.map(tokio_tungstenite::Connector::Rustls),
        )
        .await?;
        Ok(Self::Ws(Box::new(ws)))
    }

    /// The certificate the server showed (DER), on a TLS connection.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Self::Ws(ws) => match ws.get_ref() {
                tokio_tungstenite::MaybeTlsStream::Rustls(tls) => tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Connects over the TCP protocol to `addr` (`host:port`).
    pub async fn tcp(addr: &str, p: &Params) -> Result<Self> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let hb = p.heartbeat.to_string();
        let token = p.token.clone().unwrap_or_default();
        let mut args = vec!["sub", p.key.as_str(), hb.as_str(), token.as_str()];
        if p.versioned {
            args.push("1");
        }
        stream.write_all(&resp_command(&args)).await?;
        Ok(Self::Tcp {
            stream,
            buf: Vec::new(),
        })
    }

    /// Connects over SSE to `addr` (`host:port`), resuming after `last_mid`.
    pub async fn sse(addr: &str, p: &Params, last_mid: Option<i64>) -> Result<Self> {
        Self::sse_from(addr, p, last_mid, None).await
    }

    /// [`Subscriber::sse`] resuming after `last_mid` seen under `epoch`
    /// (0: none seen yet): the comet then sends the key's epoch first
    /// ([`Frame::Epoch`]), and `reset` when the sequence started again.
    pub async fn sse_from(
        addr: &str,
        p: &Params,
        last_mid: Option<i64>,
        epoch: Option<u64>,
    ) -> Result<Self> {
        let mut url = format!("http://{addr}/sub/sse?key={}", encode(&p.key));
        if let Some(t) = &p.token {
            url.push_str(&format!("&token={}", encode(t)));
        }
        if let Some(e) = epoch {
            url.push_str(&format!("&epoch={e}"));
        }
        let mut req = reqwest::Client::new().get(url);
        if let Some(m) = last_mid {
            req = req.header("Last-Event-ID", m.to_string());
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            return Err(Error::Api {
                ret: v
                    .get("ret")
                    .and_then(|r| r.as_i64())
                    .unwrap_or(status.as_u16() as i64),
                msg: v
                    .get("msg")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
        Ok(Self::Sse {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        })
    }

    /// Sends a heartbeat (`h`); SSE has none to send.
    pub async fn heartbeat(&mut self) -> Result<()> {
        match self {
            Self::Ws(ws) => ws.send(WsMessage::Text("h".into())).await?,
            Self::Tcp { stream, .. } => stream.write_all(b"h").await?,
            Self::Sse { .. } => {}
        }
        Ok(())
    }

    /// The next frame, waiting at most `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Frame> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// The next frame; `Err(Closed)` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Frame> {
        match self {
            Self::Ws(ws) => loop {
                match ws.next().await {
                    None => return Err(Error::Closed),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(WsMessage::Text(t))) => return parse_text_frame(t.as_str()),
                    Some(Ok(WsMessage::Close(_))) => return Err(Error::Closed),
                    Some(Ok(_)) => continue,
                }
            },
            Self::Tcp { stream, buf } => loop {
                if let Some((frame, used)) = parse_tcp_frame(buf)? {
                    buf.drain(..used);
                    return Ok(frame);
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(Error::Closed);
                }
                buf.extend_from_slice(&chunk[..n]);
            },
            Self::Sse { body, buf } => loop {
                if let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    if let Some(frame) = parse_sse_event(&event)? {
                        return Ok(frame);
                    }
                    continue;
                }
                match body.next().await {
                    None => return Err(Error::Closed),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(b)) => buf.push_str(&String::from_utf8_lossy(&b)),
                }
            },
        }
    }
}

/// Parses one SSE event block; comments (keep-alives) give `None`.
pub fn parse_sse_event(block: &str) -> Result<Option<Frame>> {
    let mut event = "message";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    match event {
        "reconnect" => Ok(Some(Frame::Reconnect)),
        "reset" => Ok(Some(Frame::Reset)),
        "epoch" => serde_json::from_str::<serde_json::Value>(&data)
            .ok()
            .and_then(|v| v.get("epoch").and_then(serde_json::Value::as_u64))
            .map(|e| Some(Frame::Epoch(e)))
            .ok_or_else(|| Error::Frame(format!("epoch event {data:?}"))),
        _ if data.is_empty() => Ok(None),
        _ => parse_text_frame(&data).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_frames() {
        let json = r#"{"msg":{"a":1},"mid":1,"gid":0}"#;
        let mut buf = format!("+h\r\n${}\r\n{json}\r\n-c\r\n", json.len()).into_bytes();
        let (f, n) = parse_tcp_frame(&buf).unwrap().unwrap();
        assert_eq!(f, Frame::Heartbeat);
        buf.drain(..n);
        let (f, n) = parse_tcp_frame(&buf).unwrap().unwrap();
        assert!(matches!(f, Frame::Message(m) if m.mid == 1));
        buf.drain(..n);
        assert_eq!(
            parse_tcp_frame(&buf).unwrap().unwrap().0,
            Frame::Error("-c".into())
        );
        assert!(parse_tcp_frame(b"$31\r\n{\"msg\"").unwrap().is_none());
    }

    #[test]
    fn sse_events() {
        assert!(parse_sse_event(":h\n\n").unwrap().is_none());
        let f = parse_sse_event("id: 4\ndata: {\"msg\":1,\"mid\":4,\"gid\":0}\n\n").unwrap();
        assert!(matches!(f, Some(Frame::Message(m)) if m.mid == 4));
        assert_eq!(
            parse_sse_event("event: reset\ndata: {\"mid\":0}\n\n").unwrap(),
            Some(Frame::Reset)
        );
        assert_eq!(
            parse_sse_event("event: reconnect\ndata: x\n\n").unwrap(),
            Some(Frame::Reconnect)
        );
        assert_eq!(
            parse_sse_event("event: epoch\ndata: {\"epoch\":1764900000123}\n\n").unwrap(),
            Some(Frame::Epoch(1_764_900_000_123))
        );
        assert!(parse_sse_event("event: epoch\ndata: {}\n\n").is_err());
    }
}
