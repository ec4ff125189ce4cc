//! Naming a push: the id storage dedupes it by. A back end that sends an
//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header) can repeat
//! a push whose answer it lost; without one every request is a push of its
//! own, and only web's own retries of it dedupe.

use crate::reply::Reply;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

/// The header a back end names a push with, to repeat it safely
/// (draft-ietf-httpapi-idempotency-key-header).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A handler's view of the request's `Idempotency-Key` (see
/// `idempotency_key`); a bad one is answered with 400 before the handler
/// runs. Reads the one header rather than taking a copy of them all.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        idempotency_key(&parts.headers).map(|k| Self(k.map(str::to_owned)))
    }
}

/// The request's `Idempotency-Key`, when it has one: 1 to 255 printable
/// ASCII characters (a UUID, say), given once. A push repeated with the same
/// key and body within the dedupe window is stored once (see
/// [`push_id`]).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Reply> {
    let mut given = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = given.next() else {
        return Ok(None);
    };
    if given.next().is_some() {
        return Err(Reply::param("Idempotency-Key given more than once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(Reply::param(
            "Idempotency-Key must be 1 to 255 printable ASCII characters",
        ));
    }
    // Printable ASCII is UTF-8: cannot fail.
    Ok(value.to_str().ok())
}

/// The id a push is stored under. Without an `Idempotency-Key` it is fresh
/// (128 random bits, hex), so only web's own retries of one request dedupe.
/// With one it follows from the key and the request's body, so a back end
/// that repeats a request (its answer was lost) within the dedupe window
/// gets the first mid back and nothing is stored twice; the same key with
/// another body is another push, never a silently dropped one. Hashed: the
/// id becomes part of a storage key, so it must be short and plain
/// ([`pushcluster_core::key::check_push_id`]), and a prefix that random ids
/// never have keeps the two kinds apart.
pub fn push_id(idempotency_key: Option<&str>, body: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    match idempotency_key {
        None => format!("{:032x}", rand::random::<u128>()),
        Some(k) => {
            let mut h = Sha1::new();
            h.update(b"pushcluster idempotency key\0");
            h.update(k.as_bytes());
            h.update(b"\0");
            h.update(body);
            format!("i{}", hex::encode(h.finalize()))
        }
    }
}

/// Whether web made `push_id` itself (no `Idempotency-Key`): such an id is
/// new with its request, so no store holds anything under it before web's
/// first attempt to store that request.
pub fn made_here(push_id: &str) -> bool {
    !push_id.is_empty() && !push_id.starts_with('i')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys() {
        let with = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    IDEMPOTENCY_KEY,
                    axum::http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            h
        };
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            idempotency_key(&with(&[b"order 1"])).unwrap(),
            Some("order 1")
        );
        assert!(idempotency_key(&with(&[&[b'k'; 255]])).is_ok());
        assert!(idempotency_key(&with(&[&[b'k'; 256]])).is_err());
        assert!(idempotency_key(&with(&[b""])).is_err());
        assert!(idempotency_key(&with(&[b"caf\xc3\xa9"])).is_err());
        assert!(idempotency_key(&with(&[b"a", b"b"])).is_err());
        // Same key and body: the same plain id, which storage accepts.
        let id = push_id(Some("k"), b"{}");
        assert_eq!(id, push_id(Some("k"), b"{}"));
        assert!(pushcluster_core::key::check_push_id(&id).is_ok());
        assert_ne!(id, push_id(Some("k"), b"{ }"));
        assert_ne!(id, push_id(Some("k2"), b"{}"));
        assert_ne!(push_id(None, b"{}"), push_id(None, b"{}"));
        // Only the ids web makes itself are new with their request.
        assert!(!made_here(&id));
        assert!((0..100).all(|_| made_here(&push_id(None, b"{}"))));
        assert!(!made_here(""));
    }
}
