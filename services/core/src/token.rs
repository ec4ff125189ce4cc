//! Subscriber tokens: `<expiry>.<hmac>` where expiry is a Unix time in seconds
//! and hmac is the lowercase hex HMAC-SHA256, keyed by the shared secret, of
//! `<key>\n<expiry>`. A back end that knows the secret mints a token for one key;
//! a comet verifies it without any lookup.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is missing")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token does not match the key")]
    BadSignature,
}

fn mac(secret: &[u8], key: &str, expiry: u64) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(key.as_bytes());
    m.update(b"\n");
    m.update(expiry.to_string().as_bytes());
    m
}

/// Mints a token for `key` valid until `expiry` (Unix seconds).
pub fn mint(secret: &[u8], key: &str, expiry: u64) -> String {
    let tag = mac(secret, key, expiry).finalize().into_bytes();
    format!("{expiry}.{}", hex::encode(tag))
}

/// Mints a token for `key` valid for `seconds` from now.
pub fn mint_for(secret: &[u8], key: &str, seconds: u64) -> String {
    mint(secret, key, unix_now().saturating_add(seconds))
}

/// Verifies `token` for `key` at time `now` (Unix seconds), in constant time.
pub fn verify(secret: &[u8], key: &str, token: &str, now: u64) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    let (exp, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let expiry: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
    let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
    if expiry < now {
        return Err(TokenError::Expired);
    }
    mac(secret, key, expiry)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_failures() {
        let t = mint(b"s3cret", "alice", 1000);
        assert_eq!(verify(b"s3cret", "alice", &t, 999), Ok(()));
        assert_eq!(verify(b"s3cret", "alice", &t, 1000), Ok(()));
        assert_eq!(
            verify(b"s3cret", "alice", &t, 1001),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(b"s3cret", "bob", &t, 999),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"other", "alice", &t, 999),
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(b"s3cret", "alice", "", 0), Err(TokenError::Missing));
        assert_eq!(
            verify(b"s3cret", "alice", "abc", 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(b"s3cret", "alice", "1.zz", 0),
            Err(TokenError::Malformed)
        );
        // The expiry is signed: moving it invalidates the token.
        let forged = t.replacen("1000", "9999", 1);
        assert_eq!(
            verify(b"s3cret", "alice", &forged, 999),
            Err(TokenError::BadSignature)
        );
    }
}
