//! The comet's WebSocket frame handling against tungstenite as the reference:
//! arbitrary and adversarial client byte streams, each judged by both; the
//! units they make of it (messages, pings, pongs) and how it ends (still
//! open, closed with which answer, failed with which code) must agree. A
//! sample runs in `make test`; `cargo test --release -p pushcluster-core
//! --test websocket_conformance -- --ignored` runs a million cases.

use pushcluster_core::fuzz::{tally, Rng};
use pushcluster_core::websocket::{
    client_frame, verdict, verdict_in_pieces, Inbound, Opcode, Outcome,
};
use std::io::{Cursor, Read, Write};
use tungstenite::error::{Error, ProtocolError};
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

/// The comet's limit on what a subscriber may send.
const MAX: usize = 1024;

struct Pipe {
    input: Cursor<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What tungstenite, as a server with the same limits, makes of `stream`.
fn reference(stream: &[u8]) -> (Vec<Inbound>, Outcome) {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX))
        .max_frame_size(Some(MAX));
    let pipe = Pipe {
        input: Cursor::new(stream.to_vec()),
    };
    let mut ws = WebSocket::from_raw_socket(pipe, Role::Server, Some(cfg));
    let mut units = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => units.push(Inbound::Message {
                text: true,
                payload: t.as_bytes().to_vec(),
            }),
            Ok(Message::Binary(b)) => units.push(Inbound::Message {
                text: false,
                payload: b.to_vec(),
            }),
            Ok(Message::Ping(p)) => units.push(Inbound::Ping(p.to_vec())),
            Ok(Message::Pong(_)) => units.push(Inbound::Pong),
            Ok(Message::Close(c)) => {
                let reply = c.map(|f| {
                    if f.code.is_allowed() {
                        u16::from(f.code)
                    } else {
                        1002
                    }
                });
                return (units, Outcome::Closed(reply));
            }
            Ok(Message::Frame(_)) => unreachable!("raw frames are not read"),
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return (units, Outcome::Open)
            }
            Err(Error::Protocol(_)) => return (units, Outcome::Failed(1002)),
            Err(Error::Capacity(_)) => return (units, Outcome::Failed(1009)),
            Err(Error::Utf8(_)) => return (units, Outcome::Failed(1007)),
            Err(e) => panic!("unexpected reference error {e:?} on {stream:02x?}"),
        }
    }
}

/// Payload bytes: random, valid UTF-8 (with multi-byte characters that
/// fragments may split), or a close body with an arbitrary code.
fn payload(r: &mut Rng, op: u8, len: usize) -> Vec<u8> {
    if op == 0x8 && r.chance(80) {
        let codes = [
            1000u16, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1013, 1014, 1015, 1016,
            2999, 3000, 4999, 5000, 0, 999,
        ];
        let code = if r.chance(80) {
            codes[r.below(codes.len() as u64) as usize]
        } else {
            r.next_u64() as u16
        };
        let mut body = code.to_be_bytes().to_vec();
        if r.chance(30) {
            if r.chance(70) {
                body.extend_from_slice("bye ü".as_bytes());
            } else {
                body.extend_from_slice(&[0xC3, 0x28]);
            }
        }
        if r.chance(10) {
            body.truncate(r.below(2) as usize);
        }
        return body;
    }
    if r.chance(50) {
        let text = "hé€𝄞x".repeat(len / 10 + 1);
        let mut b = text.into_bytes();
        b.truncate(len);
        if r.chance(5) && !b.is_empty() {
            let i = r.below(b.len() as u64) as usize;
            b[i] = 0xFF;
        }
        b
    } else {
        r.bytes(len)
    }
}

/// One frame with random header bits, usually masked, any length form.
fn frame(r: &mut Rng) -> Vec<u8> {
    let ops = [
        0x0, 0x1, 0x1, 0x1, 0x2, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB, 0x0, 0x0,
    ];
    let op = ops[r.below(ops.len() as u64) as usize];
    let len = match r.below(10) {
        0..=5 => r.below(12) as usize,
        6 => 120 + r.below(10) as usize,
        7 => 500 + r.below(100) as usize,
        8 => MAX - 4 + r.below(8) as usize,
        _ => r.below(300) as usize,
    };
    let body = payload(r, op, len);
    let mut b0 = op;
    if r.chance(75) {
        b0 |= 0x80;
    }
    if r.chance(4) {
        b0 |= (r.below(7) as u8 + 1) << 4;
    }
    let masked = r.chance(96);
    let mut out = vec![b0];
    let n = body.len();
    let form = r.below(20);
    if n < 126 && form > 1 {
        out.push(n as u8);
    } else if n <= 0xFFFF && form != 0 {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    if masked {
        out[1] |= 0x80;
        let mask = [
            r.next_u64() as u8,
            r.next_u64() as u8,
            r.next_u64() as u8,
            r.next_u64() as u8,
        ];
        out.extend_from_slice(&mask);
        out.extend(body.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    } else {
        out.extend_from_slice(&body);
    }
    out
}

fn client_frame_with(op: Opcode, payload: &[u8], fin: bool) -> Vec<u8> {
    let mut f = client_frame(op, payload, [9, 8, 7, 6]);
    if !fin {
        f[0] &= 0x7F;
    }
    f
}

/// A client stream: well-formed sequences, random frames, noise, mutations,
/// huge declared lengths, cut anywhere.
fn stream(r: &mut Rng) -> Vec<u8> {
    let mut s = Vec::new();
    match r.below(10) {
        // Pure noise.
        0 => {
            let n = r.below(40) as usize;
            s = r.bytes(n);
        }
        // A huge declared length, then nothing.
        1 => {
            s = vec![0x81 | ((r.below(2) as u8) << 3), 0xFF];
            s.extend_from_slice(&(r.next_u64() | 1 << 40).to_be_bytes());
            s.extend_from_slice(&[1, 2, 3, 4]);
        }
        // A fragmented text message, maybe interrupted by control frames
        // or, against the rules, by a whole data frame.
        2 => {
            let text = "fragmented ü€𝄞 message".as_bytes();
            let cut = r.below(text.len() as u64) as usize;
            s.extend(client_frame_with(Opcode::Text, &text[..cut], false));
            if r.chance(50) {
                s.extend(client_frame(Opcode::Ping, b"p", [1, 2, 3, 4]));
            }
            if r.chance(20) {
                s.extend(client_frame(Opcode::Text, b"h", [5, 6, 7, 8]));
            }
            s.extend(client_frame_with(Opcode::Continuation, &text[cut..], true));
        }
        _ => {
            for _ in 0..1 + r.below(6) {
                s.extend(frame(r));
            }
        }
    }
    if r.chance(15) && !s.is_empty() {
        let i = r.below(s.len() as u64) as usize;
        s[i] ^= 1 << r.below(8);
    }
    if r.chance(25) {
        s.truncate(r.below(s.len() as u64 + 1) as usize);
    }
    s
}

/// Runs `cases` streams from `seed` through both; returns how many of each
/// outcome kind were seen (so a run shows it covered every branch).
/// What [`compare`] counts, in its order.
const BRANCHES: [&str; 4] = [
    "open",
    "closed",
    "protocol errors",
    "other failures (1007/1009)",
];

fn compare(seed: u64, cases: u64) -> [u64; 4] {
    let mut r = Rng::new(seed);
    let mut seen = [0u64; 4];
    for case in 0..cases {
        let s = stream(&mut r);
        let ours = verdict(&s, MAX);
        let theirs = reference(&s);
        assert_eq!(
            ours, theirs,
            "case {case} (seed {seed}) differs on {s:02x?}"
        );
        // The same stream in pieces cut anywhere, as a socket delivers it.
        let cuts: Vec<usize> = (0..r.below(6))
            .map(|_| r.below(s.len() as u64 + 1) as usize)
            .collect();
        assert_eq!(
            verdict_in_pieces(&s, &cuts, MAX),
            ours,
            "case {case} (seed {seed}) cut at {cuts:?} differs on {s:02x?}"
        );
        seen[match ours.1 {
            Outcome::Open => 0,
            Outcome::Closed(_) => 1,
            Outcome::Failed(1002) => 2,
            Outcome::Failed(_) => 3,
        }] += 1;
    }
    seen
}

#[test]
fn a_sample_of_streams_gets_the_same_verdict_as_tungstenite() {
    tally(20_000, &BRANCHES, &compare(0x5EED, 20_000), Some(100));
}

#[test]
#[ignore = "a million cases: run with --release -- --ignored"]
fn a_million_streams_get_the_same_verdict_as_tungstenite() {
    tally(1_000_000, &BRANCHES, &compare(0xC0FFEE, 1_000_000), None);
}

#[test]
fn the_rfc_cases_one_by_one() {
    let f = |op, p: &[u8]| client_frame(op, p, [1, 2, 3, 4]);
    let huge = [
        vec![0x82, 0xFF],
        (1u64 << 31).to_be_bytes().to_vec(),
        vec![1, 2, 3, 4],
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        (
            "a whole data frame inside a fragmented message",
            [
                client_frame_with(Opcode::Text, b"a", false),
                f(Opcode::Text, b"h"),
            ]
            .concat(),
            Outcome::Failed(1002),
        ),
        (
            "a continuation without a message",
            f(Opcode::Continuation, b"x"),
            Outcome::Failed(1002),
        ),
        (
            "text that is not UTF-8",
            f(Opcode::Text, &[0xC3, 0x28]),
            Outcome::Failed(1007),
        ),
        (
            "a close with a 1-byte body",
            f(Opcode::Close, &[3]),
            Outcome::Failed(1002),
        ),
        (
            "a close whose reason is not UTF-8",
            f(Opcode::Close, &[3, 0xE8, 0xFF]),
            Outcome::Failed(1007),
        ),
        (
            "a close with code 1001 is echoed",
            f(Opcode::Close, &[3, 0xE9]),
            Outcome::Closed(Some(1001)),
        ),
        (
            "a close with reserved code 1005 is answered 1002",
            f(Opcode::Close, &[3, 0xED]),
            Outcome::Closed(Some(1002)),
        ),
        (
            "an empty close gets an empty close",
            f(Opcode::Close, b""),
            Outcome::Closed(None),
        ),
        (
            "a 2 GiB frame, from its header",
            huge,
            Outcome::Failed(1009),
        ),
        (
            "fragments over the limit together",
            [
                client_frame_with(Opcode::Binary, &[0; 1000], false),
                f(Opcode::Continuation, &[0; 100]),
            ]
            .concat(),
            Outcome::Failed(1009),
        ),
    ];
    for (what, s, want) in cases {
        let ours = verdict(&s, MAX);
        assert_eq!(ours.1, want, "{what}");
        assert_eq!(ours, reference(&s), "{what}: tungstenite differs");
    }
}
