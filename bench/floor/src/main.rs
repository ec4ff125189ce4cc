//! push-floor: the floor every push server is compared with in
//! `bench/compare`. One thread, one epoll loop (mio), no framework: it
//! upgrades `GET /sub?key=K` to WebSocket, and on `POST /pub?key=K` or
//! `POST /broadcast` encodes the body once as a text frame and writes it to
//! each subscriber, one write per delivery. Nothing is stored, nothing is
//! retried; a subscriber whose socket buffer is full gets the rest later, and
//! is dropped when more than `--max-pending` bytes wait. Whatever a real
//! server costs above this is its own overhead: the rest is the kernel's.

use anyhow::Context;
use clap::Parser;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use pushcluster_core::websocket;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

/// Minimal epoll WebSocket fan-out server (the benchmark floor).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Address to listen on (subscribers and publishers alike).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Bytes that may wait for one slow subscriber before it is dropped.
    #[arg(long, default_value_t = 1 << 20)]
    max_pending: usize,
}

const LISTENER: Token = Token(usize::MAX);
/// Largest HTTP request (headers and body) a publisher may send.
const MAX_REQUEST: usize = 1 << 20;

enum Role {
    /// Reading an HTTP request; the bytes so far.
    Http(Vec<u8>),
    /// An upgraded subscriber of `key`.
    Subscriber { key: String },
}

struct Conn {
    stream: TcpStream,
    role: Role,
    /// Bytes accepted for this connection that the socket has not taken yet.
    pending: Vec<u8>,
}

/// One parsed HTTP request: what the loop needs and nothing else.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    key: Option<&'a str>,
    ws_key: Option<&'a str>,
    body: &'a [u8],
}

/// Parses a complete request from `buf`, or returns `Ok(None)` if more bytes
/// are needed. The `usize` is how many bytes the request used.
fn parse(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, &'static str> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_REQUEST {
            Err("request too large")
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or_default(),
    );
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let key = query.split('&').find_map(|kv| kv.strip_prefix("key="));
    let (mut ws_key, mut length) = (None, 0usize);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = Some(value);
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| "bad content-length")?;
        }
    }
    let total = head_end + 4 + length;
    if total > MAX_REQUEST {
        return Err("request too large");
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[head_end + 4..total];
    Ok(Some((
        Request {
            method,
            path,
            key,
            ws_key,
            body,
        },
        total,
    )))
}

/// One unmasked WebSocket text frame holding `payload`.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    websocket::put_frame(&mut f, websocket::Opcode::Text, payload);
    f
}

struct Server {
    poll: Poll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_key: HashMap<String, Vec<usize>>,
    max_pending: usize,
}

impl Server {
    /// Queues `bytes` for connection `id` and writes what the socket takes now.
    /// Returns false when the connection must be closed.
    fn send(&mut self, id: usize, bytes: &[u8]) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return false;
        };
        if c.pending.is_empty() {
            match c.stream.write(bytes) {
                Ok(n) if n == bytes.len() => return true,
                Ok(n) => c.pending.extend_from_slice(&bytes[n..]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.pending.extend_from_slice(bytes),
                Err(_) => return false,
            }
            let _ = self.poll.registry().reregister(
                &mut c.stream,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            );
            true
        } else {
            c.pending.extend_from_slice(bytes);
            c.pending.len() <= self.max_pending
        }
    }

    fn flush(&mut self, id: usize) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return false;
        };
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        c.pending = Vec::new();
        self.poll
            .registry()
            .reregister(&mut c.stream, Token(id), Interest::READABLE)
            .is_ok()
    }

    fn close(&mut self, id: usize) {
        if let Some(Some(mut c)) = self.conns.get_mut(id).map(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Role::Subscriber { key } = c.role {
                if let Some(ids) = self.by_key.get_mut(&key) {
                    ids.retain(|&i| i != id);
                    if ids.is_empty() {
                        self.by_key.remove(&key);
                    }
                }
            }
            self.free.push(id);
        }
    }

    /// Reads what is there; handles complete requests. False: close it.
    fn readable(&mut self, id: usize, scratch: &mut [u8]) -> bool {
        loop {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                return false;
            };
            let n = match c.stream.read(scratch) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            match &mut c.role {
                // Subscribers only send heartbeats and close frames; a close
                // (opcode 8, masked) ends the connection.
                Role::Subscriber { .. } => {
                    if scratch[..n].first().is_some_and(|b| b & 0x0f == 8) {
                        return false;
                    }
                }
                Role::Http(buf) => {
                    buf.extend_from_slice(&scratch[..n]);
                    if !self.handle_requests(id) {
                        return false;
                    }
                }
            }
        }
    }

    fn handle_requests(&mut self, id: usize) -> bool {
        loop {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                return false;
            };
            let Role::Http(buf) = &mut c.role else {
                return true;
            };
            let mut buf = std::mem::take(buf);
            let (reply, deliver, upgrade, used) = match parse(&buf) {
                Ok(None) => {
                    c.role = Role::Http(buf);
                    return true;
                }
                Err(_) => return false,
                Ok(Some((req, used))) => match (req.method, req.path, req.ws_key) {
                    ("GET", _, Some(ws_key)) => {
                        let reply = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n", websocket::accept_key(ws_key));
                        (
                            reply,
                            None,
                            Some(req.key.unwrap_or_default().to_string()),
                            used,
                        )
                    }
                    ("POST", "/broadcast", _) => {
                        (ok(), Some((None, text_frame(req.body))), None, used)
                    }
                    ("POST", "/pub", _) => match req.key {
                        Some(k) => (
                            ok(),
                            Some((Some(k.to_string()), text_frame(req.body))),
                            None,
                            used,
                        ),
                        None => (status(400), None, None, used),
                    },
                    _ => (status(404), None, None, used),
                },
            };
            buf.drain(..used);
            if let Some(key) = upgrade {
                self.by_key.entry(key.clone()).or_default().push(id);
                c.role = Role::Subscriber { key };
            } else {
                c.role = Role::Http(buf);
            }
            if let Some((key, frame)) = deliver {
                let targets: Vec<usize> = match key {
                    Some(k) => self.by_key.get(&k).cloned().unwrap_or_default(),
                    None => self.by_key.values().flatten().copied().collect(),
                };
                for t in targets {
                    if !self.send(t, &frame) {
                        self.close(t);
                    }
                }
            }
            if !self.send(id, reply.as_bytes()) {
                return false;
            }
        }
    }
}

fn ok() -> String {
    status(200)
}

fn status(code: u16) -> String {
    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut listener = TcpListener::bind(cli.listen).context("bind")?;
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut s = Server {
        poll,
        conns: Vec::new(),
        free: Vec::new(),
        by_key: HashMap::new(),
        max_pending: cli.max_pending,
    };
    eprintln!("push-floor listening on {}", cli.listen);
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = s.poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    let _ = stream.set_nodelay(true);
                    let id = s.free.pop().unwrap_or(s.conns.len());
                    if s.poll
                        .registry()
                        .register(&mut stream, Token(id), Interest::READABLE)
                        .is_err()
                    {
                        s.free.push(id);
                        continue;
                    }
                    let conn = Conn {
                        stream,
                        role: Role::Http(Vec::new()),
                        pending: Vec::new(),
                    };
                    if id == s.conns.len() {
                        s.conns.push(Some(conn));
                    } else {
                        s.conns[id] = Some(conn);
                    }
                }
                continue;
            }
            let id = ev.token().0;
            let mut alive = true;
            if ev.is_writable() {
                alive = s.flush(id);
            }
            if alive && (ev.is_readable() || ev.is_read_closed()) {
                alive = s.readable(id, &mut scratch);
            }
            if !alive {
                s.close(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_waits_for_the_whole_body() {
        let req = b"POST /pub?key=a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel";
        assert!(matches!(parse(req), Ok(None)));
        let req = b"POST /pub?key=a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET";
        let (r, used) = parse(req).ok().flatten().expect("complete");
        assert_eq!(
            (r.method, r.path, r.key, r.body, used),
            ("POST", "/pub", Some("a"), &b"hello"[..], req.len() - 3)
        );
    }
}
