//! The cluster's internal RPC token: every gRPC call between web, comets and
//! the message service carries `authorization: Bearer <token>`, and every
//! server refuses a call without the right one (`UNAUTHENTICATED`).
//!
//! The token is what keeps a pod of another cluster or namespace out even
//! where the internal RPC runs in plaintext (`auth.plaintextRpc`, or while a
//! switch to TLS rolls out, see `crate::tls`); with TLS it is checked as
//! well as the certificate. It rotates by deleting its key in the operator's
//! Secret (pods roll and pick the new value up). Streams are checked once,
//! when they open, so the cost on the push path is one header per batch
//! stream, not per push.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A channel whose calls carry the RPC token.
pub type AuthChannel = InterceptedService<Channel, RpcToken>;

/// The token is not usable as a header value.
#[derive(Debug, thiserror::Error)]
#[error("the RPC token must be visible ASCII without spaces")]
pub struct InvalidToken;

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, InvalidToken> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidToken);
    }
    format!("Bearer {token}").parse().map_err(|_| InvalidToken)
}

/// Client side: adds the token to every call (nothing when there is none).
#[derive(Clone, Default)]
pub struct RpcToken(Option<MetadataValue<Ascii>>);

impl RpcToken {
    /// The token to send; `None` or empty sends none (auth off).
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => bearer(t).map(|v| Self(Some(v))),
        }
    }

    /// `channel` with this token on every call.
    pub fn on(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for RpcToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the token (accepts all when there is none).
#[derive(Clone, Default)]
pub struct RequireToken(Option<std::sync::Arc<[u8]>>);

impl RequireToken {
    /// Requires `token`; `None` or empty requires nothing (auth off).
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => {
                bearer(t)?;
                Ok(Self(Some(format!("Bearer {t}").into_bytes().into())))
            }
        }
    }

    /// Whether calls are checked at all.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, want) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong RPC token: calls between pushcluster services need the cluster's rpc-token",
            ))
        }
    }
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(server: Option<&str>, client: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(c) = client {
            req = RpcToken::new(Some(c)).unwrap().call(req).unwrap();
        }
        RequireToken::new(server)
            .unwrap()
            .call(req)
            .map(|_| ())
            .map_err(|s| s.code())
    }

    #[test]
    fn only_the_right_token_passes_when_one_is_required() {
        assert_eq!(check(Some("s3cret"), Some("s3cret")), Ok(()));
        assert_eq!(
            check(Some("s3cret"), Some("s3cres")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            check(Some("s3cret"), Some("s3cret2")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            check(Some("s3cret"), None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(check(None, None), Ok(()));
        assert_eq!(check(None, Some("anything")), Ok(()));
    }

    #[test]
    fn tokens_that_cannot_be_a_header_are_refused_up_front() {
        assert!(RpcToken::new(Some("two words")).is_err());
        assert!(RequireToken::new(Some("line\nbreak")).is_err());
        assert!(!RequireToken::new(Some("")).unwrap().enabled());
    }
}
