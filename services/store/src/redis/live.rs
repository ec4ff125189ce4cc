//! The live channels: where each newly stored private message is published.
//!
//! A published message is `"<mid> <payload>"`, or, signed,
//! `"<mid> s<40 hex> <payload>"`: JSON never starts with `s`, so the two
//! cannot be confused. Anyone who can reach Redis can PUBLISH, but only
//! a writer that knows the cluster's secret can sign; a comet given the
//! secret delivers a live message only when its signature holds, and
//! reads the key's stored messages instead when it does not.
use bytes::Bytes;
use sha1::{Digest, Sha1};

/// The secret live messages are signed with, derived from a secret the
/// cluster's writers and comets share (its internal RPC token).
///
/// The signature is `sha1(outer ‖ hex(sha1(inner ‖ channel ‖ " " ‖ mid ‖ " " ‖ payload)))`,
/// hex-encoded: an HMAC-like nesting that Redis's Lua computes with
/// `redis.sha1hex` (no HMAC there), and that a length extension cannot
/// forge. Channel and mid are inside it, so a signed message replayed on
/// another key, or with another mid, fails.
#[derive(Clone, PartialEq, Eq)]
pub struct LiveKey {
    pub(crate) inner: String,
    pub(crate) outer: String,
}

impl std::fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveKey(..)")
    }
}

impl LiveKey {
    /// The key for `secret`; distinct labels keep it apart from any
    /// other use of the same secret.
    pub fn derive(secret: &str) -> Self {
        let part = |label: &str| {
            let mut h = Sha1::new();
            h.update(label.as_bytes());
            h.update(secret.as_bytes());
            hex::encode(h.finalize())
        };
        Self {
            inner: part("pushcluster live inner\0"),
            outer: part("pushcluster live outer\0"),
        }
    }

    /// The signature of `payload` as `mid` on `channel`, as the store's
    /// script computes it.
    pub fn sign(&self, channel: &str, mid: i64, payload: &[u8]) -> [u8; 40] {
        // On every live message a comet receives: no allocation.
        use std::io::Write as _;
        let mut mid_text = [0u8; 24];
        let mut cursor = std::io::Cursor::new(&mut mid_text[..]);
        // Cannot fail: an i64 and two spaces fit 24 bytes.
        let _ = write!(cursor, " {mid} ");
        let used = cursor.position() as usize;
        let mut h = Sha1::new();
        h.update(self.inner.as_bytes());
        h.update(channel.as_bytes());
        h.update(&mid_text[..used]);
        h.update(payload);
        let mut inner = [0u8; 40];
        // Cannot fail: 20 bytes always fit 40 hex digits.
        let _ = hex::encode_to_slice(h.finalize(), &mut inner);
        let mut h = Sha1::new();
        h.update(self.outer.as_bytes());
        h.update(inner);
        let mut out = [0u8; 40];
        let _ = hex::encode_to_slice(h.finalize(), &mut out);
        out
    }

    /// Whether `m`, received on `channel`, carries a signature that holds.
    pub fn verify(&self, channel: &str, m: &Live) -> bool {
        m.signature.as_ref().is_some_and(|s| {
            let want = self.sign(channel, m.mid, &m.payload);
            // Constant time: a forger learns nothing from timing.
            want.iter()
                .zip(s.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }
}

/// A message read from a live channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// The mid it claims.
    pub mid: i64,
    /// Its signature, when signed.
    pub signature: Option<[u8; 40]>,
    /// The message.
    pub payload: Bytes,
}

/// The channel of `key`'s messages under namespace `ns`, in the format
/// above; it shares the key's hash tag, so a sharded-pubsub Redis
/// Cluster keeps it in the key's slot.
pub fn channel(ns: &str, key: &str) -> String {
    format!("{ns}:k:{{{key}}}:lv")
}

/// The key a live channel of namespace `ns` belongs to. Releases before
/// 2026-12-06 also published an unsigned twin of each message on
/// `…:{<key>}:live` for comets older than signing; that channel is gone
/// (upgrades go through the signing release, whose comets read `…:lv`).
pub fn key_of<'a>(ns: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(ns)?
        .strip_prefix(":k:{")?
        .strip_suffix("}:lv")
}

/// A message as published on `channel`: `"<mid> <payload>"`, signed with
/// `key` when given, exactly as the store's script writes it.
pub fn encode(key: Option<&LiveKey>, channel: &str, mid: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    out.extend_from_slice(mid.to_string().as_bytes());
    out.push(b' ');
    if let Some(k) = key {
        out.push(b's');
        out.extend_from_slice(&k.sign(channel, mid, payload));
        out.push(b' ');
    }
    out.extend_from_slice(payload);
    out
}

/// Splits a published message into its parts.
pub fn decode(message: &[u8]) -> Option<Live> {
    let space = message.iter().position(|&b| b == b' ')?;
    let mid = std::str::from_utf8(&message[..space]).ok()?.parse().ok()?;
    let rest = &message[space + 1..];
    let signed = rest.len() > 42
        && rest[0] == b's'
        && rest[41] == b' '
        && rest[1..41]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let (signature, payload) = if signed {
        let mut sig = [0u8; 40];
        sig.copy_from_slice(&rest[1..41]);
        (Some(sig), &rest[42..])
    } else {
        (None, rest)
    };
    Some(Live {
        mid,
        signature,
        payload: Bytes::copy_from_slice(payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_channels_name_their_key_and_carry_mid_and_payload() {
        let ch = channel("pc", "user:{7} x");
        assert_eq!(ch, "pc:k:{user:{7} x}:lv");
        assert_eq!(key_of("pc", &ch), Some("user:{7} x"));
        assert_eq!(key_of("pc", "pc:k:{user:{7} x}:live"), None);
        assert_eq!(key_of("other", &ch), None);
        assert_eq!(key_of("pc", "pc:k:{a}:s"), None);
        let m = decode(b"42 {\"a\": \"b c\"}").unwrap();
        assert_eq!((m.mid, m.payload.as_ref()), (42, &b"{\"a\": \"b c\"}"[..]));
        assert_eq!(m.signature, None);
        assert_eq!(decode(b"42"), None);
        assert_eq!(decode(b"x {}"), None);
    }
}
