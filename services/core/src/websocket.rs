//! The server side of RFC 6455 WebSocket framing, as pure functions.
//!
//! The comet writes its own frames instead of going through a general
//! WebSocket library: an idle subscriber must cost as little memory as
//! possible, and a library connection carries read and write buffers, a
//! frame codec and a message assembler for every socket. What a push server
//! needs is small: encode unmasked server frames, and parse the few short,
//! masked frames a subscriber sends (heartbeats, pings, close).
//!
//! What a client may send is checked as RFC 6455 asks, and in the order
//! tungstenite checks it, so the two agree on every byte stream (a property
//! test drives both with arbitrary and adversarial streams): a reserved
//! opcode fails at once, an oversized frame from its header alone, the rest
//! once the frame is whole; fragments must continue a started message and
//! nothing else may interleave with them; text must be UTF-8 (1007); a close
//! frame must carry a valid code and a UTF-8 reason, and its code is echoed.

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
    /// A text message or close reason that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame or message above the server's limit.
    pub const TOO_BIG: u16 = 1009;

    /// Whether a peer may send `code` in a close frame (RFC 6455 §7.4:
    /// the defined codes a peer may use, and the registered 3000–4999).
    pub fn is_allowed(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
    }
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
    // A control frame holds at most 125 bytes: 2 for the code, the rest
    // reason, cut on a character boundary (a client fails a close whose
    // reason is not UTF-8, RFC 6455 §5.5.1).
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
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
    #[error("message of {0} bytes is above the limit")]
    MessageTooBig(usize),
    #[error("a continuation frame without a message to continue")]
    Continuation,
    #[error("a new data frame inside a fragmented message")]
    Interleaved,
    #[error("a close frame with a 1-byte body")]
    CloseBody,
    #[error("text is not UTF-8")]
    Utf8,
}

impl FrameError {
    /// The close status code to answer with.
    pub fn code(&self) -> u16 {
        match self {
            Self::TooBig(_) | Self::MessageTooBig(_) => close_code::TOO_BIG,
            Self::Utf8 => close_code::INVALID_PAYLOAD,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Parses one client frame from the front of `buf`, unmasking its payload in
/// place. `Ok(None)`: more bytes are needed. `Ok(Some((frame, used)))`: the
/// frame took the first `used` bytes. A reserved opcode is refused once the
/// header is in, a payload above `max_payload` from the header alone (before
/// it is buffered); everything else once the whole frame is in.
pub fn parse_client_frame(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let masked = b1 & 0x80 != 0;
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
    let head = at + if masked { 4 } else { 0 };
    if buf.len() < head {
        return Ok(None);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::Opcode(b0 & 0x0F))?;
    if len > max_payload as u64 {
        return Err(FrameError::TooBig(len));
    }
    // len <= max_payload, so it fits a usize.
    let len = len as usize;
    let end = head + len;
    if buf.len() < end {
        return Ok(None);
    }
    if !masked {
        return Err(FrameError::Unmasked);
    }
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    let (head_bytes, rest) = buf.split_at_mut(head);
    let mask = [
        head_bytes[at],
        head_bytes[at + 1],
        head_bytes[at + 2],
        head_bytes[at + 3],
    ];
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

/// What a client's frames amount to, one complete unit at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A whole text or binary message (text already checked to be UTF-8).
    Message {
        text: bool,
        payload: Vec<u8>,
    },
    /// A ping, answered with a pong of the same payload.
    Ping(Vec<u8>),
    Pong,
    /// The client closes; the server answers with this code (`None`: an
    /// empty close, as the client sent no code).
    Close(Option<u16>),
}

/// Puts a client's frames back into messages and checks the rules that
/// span frames (RFC 6455 §5.4, §5.5.1, §8.1). Idle, it holds no allocation.
#[derive(Debug, Default)]
pub struct Assembler {
    /// The message being assembled: whether it is text.
    text: Option<bool>,
    fragments: Vec<u8>,
}

impl Assembler {
    /// Whether no fragmented message is in progress.
    pub fn is_idle(&self) -> bool {
        self.text.is_none()
    }

    /// Takes one parsed frame; a whole unit when one completes.
    pub fn on_frame(
        &mut self,
        f: &Frame<'_>,
        max_message: usize,
    ) -> Result<Option<Inbound>, FrameError> {
        match f.opcode {
            Opcode::Ping => Ok(Some(Inbound::Ping(f.payload.to_vec()))),
            Opcode::Pong => Ok(Some(Inbound::Pong)),
            Opcode::Close => close_reply(f.payload).map(|c| Some(Inbound::Close(c))),
            Opcode::Text | Opcode::Binary if self.text.is_some() => Err(FrameError::Interleaved),
            Opcode::Continuation if self.text.is_none() => Err(FrameError::Continuation),
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                let text = *self.text.get_or_insert(f.opcode == Opcode::Text);
                let size = self.fragments.len() + f.payload.len();
                if size > max_message {
                    return Err(FrameError::MessageTooBig(size));
                }
                self.fragments.extend_from_slice(f.payload);
                if text {
                    // Checked as it arrives: a sequence that can no longer
                    // become valid fails now, an unfinished one may go on.
                    if let Err(e) = std::str::from_utf8(&self.fragments) {
                        if e.error_len().is_some() || f.fin {
                            return Err(FrameError::Utf8);
                        }
                    }
                }
                if !f.fin {
                    return Ok(None);
                }
                self.text = None;
                Ok(Some(Inbound::Message {
                    text,
                    payload: std::mem::take(&mut self.fragments),
                }))
            }
        }
    }
}

/// The code to echo for a client's close frame body: none for an empty body,
/// the client's code when a peer may send it, else 1002.
pub fn close_reply(body: &[u8]) -> Result<Option<u16>, FrameError> {
    match body {
        [] => Ok(None),
        [_] => Err(FrameError::CloseBody),
        [hi, lo, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| FrameError::Utf8)?;
            let code = u16::from_be_bytes([*hi, *lo]);
            Ok(Some(if close_code::is_allowed(code) {
                code
            } else {
                close_code::PROTOCOL_ERROR
            }))
        }
    }
}

/// How a client's byte stream ends, as far as the server is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes stop inside a frame or between frames.
    Open,
    /// The client closed; the server answers with this code.
    Closed(Option<u16>),
    /// The client broke the rules; the server fails the connection with this code.
    Failed(u16),
}

/// What a [`Reader`] made of the bytes fed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// Every whole unit was handed over: go on reading.
    More,
    /// The client closed: answer with this code (`None`: an empty close).
    Closed(Option<u16>),
}

/// A client's byte stream, fed in whatever pieces the socket gives: the
/// bytes of an unfinished frame and of an unfinished message are kept
/// between pieces (and nothing else: idle, it holds no allocation).
#[derive(Debug, Default)]
pub struct Reader {
    partial: Vec<u8>,
    asm: Assembler,
}

impl Reader {
    /// Whether nothing is kept between pieces.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.asm.is_idle()
    }

    /// Feeds the next piece; `unit` gets every complete unit in order.
    /// `Err`: the client broke the rules; fail with its code.
    /// `chunk` is unmasked in place.
    pub fn feed(
        &mut self,
        chunk: &mut [u8],
        max: usize,
        mut unit: impl FnMut(Inbound),
    ) -> Result<Fed, FrameError> {
        if self.partial.is_empty() {
            // Most pieces hold whole frames: parse them where they are.
            let (used, r) = Self::frames(&mut self.asm, chunk, max, &mut unit);
            if r == Ok(Fed::More) {
                self.partial.extend_from_slice(&chunk[used..]);
            }
            return r;
        }
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(chunk);
        let (used, r) = Self::frames(&mut self.asm, &mut buf, max, &mut unit);
        buf.drain(..used);
        if r == Ok(Fed::More) {
            self.partial = buf;
        }
        r
    }

    /// Handles the whole frames at the front of `buf`: bytes used, and why it stopped.
    fn frames(
        asm: &mut Assembler,
        buf: &mut [u8],
        max: usize,
        unit: &mut impl FnMut(Inbound),
    ) -> (usize, Result<Fed, FrameError>) {
        let mut used = 0;
        loop {
            let (frame, n) = match parse_client_frame(&mut buf[used..], max) {
                Ok(Some(f)) => f,
                Ok(None) => return (used, Ok(Fed::More)),
                Err(e) => return (used, Err(e)),
            };
            used += n;
            match asm.on_frame(&frame, max) {
                Ok(None) => {}
                Ok(Some(Inbound::Close(c))) => return (used, Ok(Fed::Closed(c))),
                Ok(Some(u)) => unit(u),
                Err(e) => return (used, Err(e)),
            }
        }
    }
}

/// Everything the server makes of `stream`, fed in pieces cut at `cuts`
/// (offsets, any order): the units in order, and how it ends. The comet's
/// connections run exactly this [`Reader`] on what their sockets give.
#[cfg(any(test, feature = "testing"))]
pub fn verdict_in_pieces(stream: &[u8], cuts: &[usize], max: usize) -> (Vec<Inbound>, Outcome) {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| (*c).min(stream.len())).collect();
    bounds.push(stream.len());
    bounds.sort_unstable();
    let mut reader = Reader::default();
    let mut units = Vec::new();
    let mut from = 0;
    for to in bounds {
        let mut piece = stream[from..to].to_vec();
        from = to;
        match reader.feed(&mut piece, max, |u| units.push(u)) {
            Ok(Fed::More) => {}
            Ok(Fed::Closed(c)) => return (units, Outcome::Closed(c)),
            Err(e) => return (units, Outcome::Failed(e.code())),
        }
    }
    (units, Outcome::Open)
}

/// [`verdict_in_pieces`] with the stream in one piece.
#[cfg(any(test, feature = "testing"))]
pub fn verdict(stream: &[u8], max: usize) -> (Vec<Inbound>, Outcome) {
    verdict_in_pieces(stream, &[], max)
}

/// A masked client frame, as a client library would send it (for tests).
#[cfg(any(test, feature = "testing"))]
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
    fn a_long_close_reason_is_cut_on_a_character_boundary() {
        // 61 two-byte characters: 122 bytes fit, the 62nd would straddle 123.
        let reason = "é".repeat(62);
        let mut out = Vec::new();
        put_close(&mut out, close_code::NORMAL, &reason);
        assert_eq!(out[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
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
        let mut huge = vec![0x82, 0xFF, 0, 0, 0, 0, 0x80, 0, 0, 0, 1, 2, 3, 4];
        let e = parse_client_frame(&mut huge, 1024).unwrap_err();
        assert_eq!(e, FrameError::TooBig(1 << 31));
        assert_eq!(e.code(), close_code::TOO_BIG);
    }
}
