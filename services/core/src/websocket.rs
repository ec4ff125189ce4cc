//! The server side of RFC 6455 WebSocket framing, as pure functions.
//!
//! The comet writes its own frames instead of going through a general
//! WebSocket library: an idle subscriber must cost as little memory as
//! possible, and a library connection carries read and write buffers, a
//! frame codec and a message assembler for every socket. What a push server
//! needs is small: encode unmasked server frames, and parse the few short,
//! masked frames a subscriber sends (heartbeats, pings, close).

use sha1::{Digest, Sha1};

/// The GUID a server appends to the client's key (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }
    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }
    /// Close, ping and pong: never fragmented, at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close status codes the server sends (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown, key moved to another comet).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the framing rules.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame or message above the server's limit.
    pub const TOO_BIG: u16 = 1009;
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    use base64::Engine;
    let mut h = Sha1::new();
    h.update(client_key.trim().as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Appends the header of one final, unmasked server frame of `len` bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: Opcode, len: usize) {
    out.push(0x80 | opcode.bits());
    match len {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

/// Appends one final, unmasked server frame.
pub fn put_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    put_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a close frame with a status code and a short reason.
pub fn put_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    // A control frame holds at most 125 bytes: 2 for the code, the rest reason.
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    put_header(out, Opcode::Close, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// A frame from a client, its payload unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// False for every fragment but the last of a message.
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: &'a [u8],
}

/// Why a client's frame was refused; the connection closes with `code()`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("control frame fragmented or longer than 125 bytes")]
    Control,
    #[error("frame of {0} bytes is above the limit")]
    TooBig(u64),
}

impl FrameError {
    /// The close status code to answer with.
    pub fn code(&self) -> u16 {
        match self {
            Self::TooBig(_) => close_code::TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Parses one client frame from the front of `buf`, unmasking its payload in
/// place. `Ok(None)`: more bytes are needed. `Ok(Some((frame, used)))`: the
/// frame took the first `used` bytes. Payloads above `max_payload` are refused
/// from the header alone, before they are buffered.
pub fn parse_client_frame(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::Opcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooBig(len));
    }
    // len <= max_payload, so it fits a usize.
    let len = len as usize;
    let end = at + 4 + len;
    if buf.len() < end {
        return Ok(None);
    }
    let (head, rest) = buf.split_at_mut(at + 4);
    let mask = [head[at], head[at + 1], head[at + 2], head[at + 3]];
    let payload = &mut rest[..len];
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        end,
    )))
}

/// A masked client frame, as a client library would send it (for tests and
/// load generators).
pub fn client_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    put_header(&mut out, opcode, payload.len());
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn server_frames_use_the_right_length_form() {
        for (len, header) in [(5, 2), (126, 4), (70_000, 10)] {
            let mut out = Vec::new();
            put_frame(&mut out, Opcode::Text, &vec![b'x'; len]);
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x81);
        }
        let mut out = Vec::new();
        put_close(&mut out, close_code::GOING_AWAY, "bye");
        assert_eq!(out, [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
    }

    #[test]
    fn parses_and_unmasks_a_client_frame_and_waits_for_the_rest() {
        let wire = client_frame(Opcode::Text, b"h", [1, 2, 3, 4]);
        for cut in 0..wire.len() {
            let mut part = wire[..cut].to_vec();
            assert_eq!(parse_client_frame(&mut part, 16), Ok(None), "cut at {cut}");
        }
        let mut two = [wire.clone(), client_frame(Opcode::Ping, b"pp", [9; 4])].concat();
        let (f, used) = parse_client_frame(&mut two, 16).unwrap().unwrap();
        assert_eq!(
            (f.fin, f.opcode, f.payload),
            (true, Opcode::Text, &b"h"[..])
        );
        assert_eq!(used, wire.len());
        let (f, _) = parse_client_frame(&mut two[used..], 16).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (Opcode::Ping, &b"pp"[..]));
    }

    #[test]
    fn parses_16_bit_lengths() {
        let payload = vec![b'a'; 300];
        let mut wire = client_frame(Opcode::Binary, &payload, [7, 7, 7, 7]);
        let (f, used) = parse_client_frame(&mut wire, 1024).unwrap().unwrap();
        assert_eq!((f.payload, used), (&payload[..], 308));
    }

    #[test]
    fn refuses_what_breaks_the_rules() {
        let mut unmasked = vec![0x81, 1, b'h'];
        assert_eq!(
            parse_client_frame(&mut unmasked, 16),
            Err(FrameError::Unmasked)
        );
        let mut reserved = client_frame(Opcode::Text, b"h", [0; 4]);
        reserved[0] |= 0x40;
        assert_eq!(
            parse_client_frame(&mut reserved, 16),
            Err(FrameError::Reserved)
        );
        let mut unknown = client_frame(Opcode::Text, b"h", [0; 4]);
        unknown[0] = 0x83;
        assert_eq!(
            parse_client_frame(&mut unknown, 16),
            Err(FrameError::Opcode(3))
        );
        let mut fragmented_ping = client_frame(Opcode::Ping, b"h", [0; 4]);
        fragmented_ping[0] &= 0x7F;
        assert_eq!(
            parse_client_frame(&mut fragmented_ping, 16),
            Err(FrameError::Control)
        );
        // Refused from the header: the 2 GiB body never has to arrive.
        let mut huge = vec![0x82, 0xFF, 0, 0, 0, 0, 0x80, 0, 0, 0];
        let e = parse_client_frame(&mut huge, 1024).unwrap_err();
        assert_eq!(e, FrameError::TooBig(1 << 31));
        assert_eq!(e.code(), close_code::TOO_BIG);
    }
}
