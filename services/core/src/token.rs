//! Subscriber tokens: `<expiry>.<hmac>` where expiry is a Unix time in seconds
//! and hmac is the lowercase hex HMAC-SHA256, keyed by the shared secret, of
//! `<key>\n<expiry>`. A back end that knows the secret mints a token for one key;
//! a comet verifies it without any lookup.
//!
//! A token carries no issue time, so it cannot be revoked short of changing
//! the secret; what bounds the harm of a leaked one is its expiry. Verifiers
//! therefore refuse a token whose expiry lies further ahead than the
//! cluster's maximum lifetime ([`DEFAULT_MAX_LIFETIME_SECONDS`] unless
//! configured), so a back end cannot hand out tokens that stay good for
//! years.

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
    #[error("token is valid for {seconds} s from now, longer than the {max} s this cluster allows: mint shorter ones")]
    TooLong { seconds: u64, max: u64 },
}

/// How far ahead a token's expiry may lie when it is checked, unless the
/// cluster sets its own bound: a week, so a client that renews its token
/// at each start still can while the secret stays unchanged.
pub const DEFAULT_MAX_LIFETIME_SECONDS: u64 = 7 * 24 * 3600;

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

/// Verifies `token` for `key` at time `now` (Unix seconds), in constant time;
/// a token whose expiry lies more than `max_lifetime` seconds ahead is
/// refused (0: no bound).
pub fn verify(
    secret: &[u8],
    key: &str,
    token: &str,
    now: u64,
    max_lifetime: u64,
) -> Result<(), TokenError> {
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
        .map_err(|_| TokenError::BadSignature)?;
    let seconds = expiry - now;
    if max_lifetime > 0 && seconds > max_lifetime {
        return Err(TokenError::TooLong {
            seconds,
            max: max_lifetime,
        });
    }
    Ok(())
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
        assert_eq!(verify(b"s3cret", "alice", &t, 999, 0), Ok(()));
        assert_eq!(verify(b"s3cret", "alice", &t, 1000, 0), Ok(()));
        assert_eq!(
            verify(b"s3cret", "alice", &t, 1001, 0),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(b"s3cret", "bob", &t, 999, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"other", "alice", &t, 999, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"s3cret", "alice", "", 0, 0),
            Err(TokenError::Missing)
        );
        assert_eq!(
            verify(b"s3cret", "alice", "abc", 0, 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(b"s3cret", "alice", "1.zz", 0, 0),
            Err(TokenError::Malformed)
        );
        // The expiry is signed: moving it invalidates the token.
        let forged = t.replacen("1000", "9999", 1);
        assert_eq!(
            verify(b"s3cret", "alice", &forged, 999, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_token_valid_for_longer_than_the_bound_is_refused() {
        let t = mint(b"s3cret", "alice", 1000 + 3600);
        assert_eq!(verify(b"s3cret", "alice", &t, 1000, 3600), Ok(()));
        assert_eq!(
            verify(b"s3cret", "alice", &t, 999, 3600),
            Err(TokenError::TooLong {
                seconds: 3601,
                max: 3600
            })
        );
        assert_eq!(verify(b"s3cret", "alice", &t, 0, 0), Ok(()), "0: no bound");
        // A forged long token says it does not match, not that it is long.
        assert_eq!(
            verify(b"other", "alice", &t, 0, 60),
            Err(TokenError::BadSignature)
        );
    }
}
