//! The generated credentials Secret: which keys it holds, what to write to
//! complete it, and the digests that roll the pods reading each key.

use super::{config::hash_of, meta, name};
use crate::crd::PushCluster;
use k8s_openapi::api::core::v1::Secret;
use std::collections::BTreeMap;

/// Key of the generated Secret: web's admin bearer token.
pub const ADMIN_TOKEN: &str = "admin-token";
/// Key of the generated Secret: the HMAC secret of subscriber tokens.
pub const SUBSCRIBER_SECRET: &str = "subscriber-secret";
/// Key of the generated Secret: the internal gRPC token.
pub const RPC_TOKEN: &str = "rpc-token";
/// Every key of the generated Secret.
pub const CREDENTIAL_KEYS: [&str; 3] = [ADMIN_TOKEN, SUBSCRIBER_SECRET, RPC_TOKEN];

/// Name of the generated credentials Secret: `<cluster>-credentials`.
pub fn credentials_name(pc: &PushCluster) -> String {
    name(pc, "credentials")
}

/// Whether the cluster runs with credentials (the default).
pub fn secure(pc: &PushCluster) -> bool {
    !pc.spec.auth.insecure
}

/// What the generated Secret holds, as digests: each component's pod
/// template carries the digests of the keys it reads, so rotating a key
/// (deleting it; the operator generates a new one) rolls exactly the pods
/// that use it. Empty when insecure or not read yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CredentialDigests(pub BTreeMap<String, String>);

impl CredentialDigests {
    /// Digests of the values in `secret`.
    pub fn of(secret: &Secret) -> Self {
        Self(
            secret
                .data
                .iter()
                .flatten()
                .filter(|(k, _)| CREDENTIAL_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), hash_of(&hex::encode(&v.0))))
                .collect(),
        )
    }

    /// The digests of `keys` only.
    pub(crate) fn pick(&self, keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter()
            .filter_map(|k| self.0.get(*k).map(|d| ((*k).to_owned(), d.clone())))
            .collect()
    }
}

/// The write that makes the credentials Secret complete, or `None` when
/// nothing is to be written (it has every key, or the cluster is insecure).
/// Only missing keys are generated (by `fresh`): an existing value is never
/// replaced, so deleting a key is how it is rotated. The Secret is owned by
/// the PushCluster when the operator creates it.
pub fn credentials_secret(
    pc: &PushCluster,
    live: Option<&Secret>,
    mut fresh: impl FnMut() -> String,
) -> Option<Secret> {
    if !secure(pc) {
        return None;
    }
    let have = live.and_then(|s| s.data.as_ref());
    let missing: BTreeMap<String, String> = CREDENTIAL_KEYS
        .iter()
        .filter(|k| have.is_none_or(|d| d.get(**k).is_none_or(|v| v.0.is_empty())))
        .map(|k| ((*k).to_owned(), fresh()))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(Secret {
        metadata: meta(pc, credentials_name(pc), None),
        type_: Some("Opaque".into()),
        string_data: Some(missing),
        ..Secret::default()
    })
}

/// A fresh credential: 256 random bits, hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}
