//! TCP transport, gopush-cluster compatible.
//!
//! The client sends one RESP array `sub <key> <heartbeat> [token] [ver]` within
//! 5 s of connecting; the comet answers `+h\r\n` (or `-p`/`-a`/`-c` and closes),
//! answers every `h` byte with `+h\r\n`, and sends each message as a RESP bulk
//! string `$<len>\r\n<json>\r\n`.

use crate::protocol::{parse_command, subscribe_params};
use crate::registry::{Close, Next, Subscription};
use crate::Comet;
use prometheus_client::metrics::gauge::Gauge;
use pushcluster_core::frame::{self, Format};
use pushcluster_core::serve::Slot;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The first command must arrive within this long (as in gopush-cluster).
const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts TCP subscribers until `stop` fires; connection tasks are tracked by
/// `conns` so shutdown can wait for them to flush.
pub async fn serve(
    comet: Arc<Comet>,
    listener: TcpListener,
    caps: pushcluster_core::serve::Caps,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match caps.admit(peer.ip()) {
                    Ok(slot) => {
                        conns.spawn(handle(comet.clone(), stream, slot, conns.clone()));
                    }
                    // Over a cap: the channel error frame, then close.
                    Err(_) => {
                        let (_, w) = stream.into_split();
                        tokio::spawn(tokio::time::timeout(
                            Duration::from_secs(1),
                            refuse(w, frame::ERR_CHANNEL),
                        ));
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn read_command(
    r: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> Result<Vec<String>, &'static [u8]> {
    loop {
        match parse_command(buf) {
            Ok(Some((args, used))) => {
                buf.drain(..used);
                return Ok(args);
            }
            Ok(None) => {}
            Err(_) => return Err(frame::ERR_PARAM),
        }
        // Into the buffer's spare room: a chunk array here would sit in
        // every connection's task for its whole life (the future's size is
        // that of its largest state).
        buf.reserve(512);
        let n = r.read_buf(buf).await.map_err(|_| frame::ERR_PARAM)?;
        if n == 0 {
            return Err(frame::ERR_PARAM);
        }
    }
}

/// Reads the subscribe command and admits the connection, which then
/// runs as a task of its own ([`drive`], tracked by `conns`): the
/// handshake's state (its timer, the admission) is not carried by every
/// idle subscriber's task for its whole life.
async fn handle(comet: Arc<Comet>, stream: TcpStream, slot: Slot, conns: TaskTracker) {
    let _ = stream.set_nodelay(true);
    let (mut r, w) = stream.into_split();
    let mut buf = Vec::with_capacity(128);
    let args =
        match tokio::time::timeout(FIRST_PACKET_TIMEOUT, read_command(&mut r, &mut buf)).await {
            Ok(Ok(args)) => args,
            Ok(Err(reply)) => return refuse(w, reply).await,
            Err(_) => return,
        };
    let arg = |i: usize| args.get(i).map(String::as_str);
    if arg(0) != Some("sub") {
        return refuse(w, frame::ERR_PARAM).await;
    }
    let Some(sub) = subscribe_params(arg(1), arg(2), arg(3), arg(4), comet.heartbeat_bounds())
    else {
        return refuse(w, frame::ERR_PARAM).await;
    };
    drop(args);
    let silence = comet.read_deadline(sub.heartbeat);
    let s = match comet.admit(&sub, Some(silence)).await {
        Ok(s) => s,
        Err(refusal) => return refuse(w, refusal.frame()).await,
    };
    let mut out = frame::HEARTBEAT_REPLY.to_vec();
    if !heartbeats(&mut out, &buf) {
        return;
    }
    drop(buf);
    let open = Open::new(&comet, slot);
    conns.spawn(drive(comet, r, w, out, s, sub.format, silence, open));
}

/// An admitted connection's place under the listener's caps and in the
/// connections gauge, given back when the connection ends.
struct Open {
    gauge: Gauge,
    _slot: Slot,
}

impl Open {
    fn new(comet: &Comet, slot: Slot) -> Self {
        let gauge = comet.metrics.conn_gauge("tcp");
        gauge.inc();
        Self { gauge, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn refuse(mut w: OwnedWriteHalf, reply: &[u8]) {
    let _ = w.write_all(reply).await;
    let _ = w.shutdown().await;
}

/// Queues a reply to every heartbeat in `bytes`; false when something else
/// arrived.
fn heartbeats(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    for &b in bytes {
        match b {
            b'h' => out.extend_from_slice(frame::HEARTBEAT_REPLY),
            // Tolerate clients that end their heartbeat with a newline.
            b'\r' | b'\n' => {}
            _ => return false,
        }
    }
    true
}

/// Writes what `out` holds with one call and lets its buffer go: an idle
/// connection keeps no buffer (a 4 KB `BufWriter` per connection was most of
/// an idle TCP subscriber's memory).
async fn send(w: &mut OwnedWriteHalf, out: &mut Vec<u8>) -> std::io::Result<()> {
    let bytes = std::mem::take(out);
    write_bounded(w, &bytes).await
}

/// How long a client may leave what it was sent unread before it is
/// dropped as a slow consumer: no write waits forever.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Writes `bytes`: at once when the socket takes them (no timer on the
/// common path), else within STALL_LIMIT or not at all.
async fn write_bounded(w: &mut OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    let done = match w.try_write(bytes) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if done == bytes.len() {
        return Ok(());
    }
    // Boxed: inline, the timer and the write would sit in every idle
    // connection's task (a future is as large as its largest state).
    Box::pin(tokio::time::timeout(
        STALL_LIMIT,
        w.write_all(&bytes[done..]),
    ))
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow consumer"))?
}

/// Serves an admitted connection until it ends; its first write is `out`
/// (the subscribe reply and one to each heartbeat that came with the
/// command). Whatever this holds across an await, every idle subscriber
/// holds, so the rare paths (a write that has to wait, closing) are boxed.
// Not an async fn (clippy's manual_async_fn): see the comment inside.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn drive(
    comet: Arc<Comet>,
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    mut out: Vec<u8>,
    s: Subscription,
    format: Format,
    silence: Duration,
    open: Open,
) -> impl std::future::Future<Output = ()> {
    // A block, not an `async fn`: an async fn moves each argument into a
    // local of its own, which keeps a second copy of them all in the task.
    async move {
        // Moved in with the block, given back when it ends.
        let _open = &open;
        if send(&mut w, &mut out).await.is_err() {
            return;
        }
        // Heartbeats are a byte or three: more than this is read in passes.
        let mut chunk = [0u8; 16];
        loop {
            tokio::select! {
                biased;
                next = s.next() => match next {
                    Next::Message(d) => {
                        // A lone frame is written as it is; several queued ones
                        // are gathered into one write.
                        comet.metrics.delivered(&d);
                        let written = match s.try_message() {
                            None => write_bounded(&mut w, d.resp(format)).await,
                            Some(next) => {
                                comet.metrics.delivered(&next);
                                out.extend_from_slice(d.resp(format));
                                out.extend_from_slice(next.resp(format));
                                while let Some(d) = s.try_message() {
                                    comet.metrics.delivered(&d);
                                    out.extend_from_slice(d.resp(format));
                                }
                                send(&mut w, &mut out).await
                            }
                        };
                        if let Err(e) = written {
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                tracing::debug!("TCP subscriber left its writes unread, dropping it");
                                comet.metrics.slow_consumer();
                            }
                            return;
                        }
                    }
                    Next::Close(Close::Reconnect) => {
                        // The queue is flushed already (messages come first).
                        if format == Format::Json {
                            out.extend_from_slice(frame::RECONNECT);
                            comet.reconnect_sent();
                        }
                        // Bounded: the sweeper aborts a close that cannot flush,
                        // and the abort ends this select.
                        Box::pin(close_flushed(&mut w, &mut out, &s)).await;
                        return;
                    }
                    Next::Close(Close::Timeout) => {
                        tracing::debug!("heartbeat timeout, closing");
                        return;
                    }
                    Next::Close(Close::Abort) => return,
                },
                n = r.read(&mut chunk) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if !heartbeats(&mut out, &chunk[..n]) {
                            tracing::debug!("unknown bytes from TCP subscriber, closing");
                            return;
                        }
                        if send(&mut w, &mut out).await.is_err() {
                            return;
                        }
                        s.heartbeat(silence);
                    }
                },
            }
        }
    }
}

/// Writes what is left and ends the connection, unless the comet aborts
/// the close first (the sweeper does when it cannot flush).
async fn close_flushed(w: &mut OwnedWriteHalf, out: &mut Vec<u8>, s: &Subscription) {
    tokio::select! {
        _ = async { let _ = send(w, out).await; let _ = w.shutdown().await; } => {}
        _ = wait_abort(s) => {}
    }
}

/// Resolves once the comet aborts this connection's close.
async fn wait_abort(s: &Subscription) {
    // A closing mailbox keeps the waker, so this is woken by the abort.
    std::future::poll_fn(|cx| match s.poll_next(cx) {
        std::task::Poll::Ready(Next::Close(Close::Abort)) => std::task::Poll::Ready(()),
        _ => std::task::Poll::Pending,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_heartbeat_gets_a_reply_and_anything_else_ends_the_connection() {
        let mut out = Vec::new();
        assert!(heartbeats(&mut out, b"h\r\nhh\n"));
        assert_eq!(out, b"+h\r\n+h\r\n+h\r\n");
        let mut out = Vec::new();
        assert!(!heartbeats(&mut out, b"hx"));
        assert!(heartbeats(&mut Vec::new(), b""));
    }
}
