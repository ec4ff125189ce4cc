//! How a subscriber connects: URL template, the first frame the server sends
//! (pushcluster's `+h`), and the heartbeat it keeps.

use anyhow::bail;
use futures::StreamExt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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

impl Sub {
    /// Connects from `source` and, when the server greets, waits for it.
    pub async fn connect(&self, addr: SocketAddr, source: IpAddr, key: &str) -> anyhow::Result<Ws> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source, 0))?;
        let stream = sock.connect(addr).await?;
        stream.set_nodelay(true)?;
        let url = self
            .sub_url
            .replace("{addr}", &addr.to_string())
            .replace("{key}", key);
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        if self.hello.is_empty() {
            return Ok(ws);
        }
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == self.hello => Ok(ws),
            other => bail!("subscribe {key}: unexpected first frame {other:?}"),
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The send time a message carries as `"t":<ns>`, however the server wraps it
/// (pushcluster: `{"msg":{"t":…},…}`; the others deliver the body as is).
pub fn sent_at(text: &str) -> Option<u64> {
    text.split("\"t\":")
        .nth(1)?
        .split([',', '}'])
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::sent_at;

    #[test]
    fn finds_the_send_time_wrapped_or_not() {
        assert_eq!(
            sent_at(r#"{"msg":{"t":42,"p":"x"},"mid":1,"gid":1}"#),
            Some(42)
        );
        assert_eq!(sent_at(r#"{"t":7}"#), Some(7));
        assert_eq!(sent_at("+h\r\n"), None);
    }
}
