//! Keeps the internal RPC's TLS Secret (`<name>-rpc-tls`) there while the
//! cluster runs or heads for TLS: creates it, renews the pods' certificate
//! from the same CA a third before it expires, and hands back the digest
//! that rolls the pods onto a new one.

use super::{publish, Context};
use crate::children::rpc_tls::{self, digest, mint, renewal, rpc_tls_name};
use crate::crd::PushCluster;
use crate::{Error, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::json;

/// Makes the Secret current and returns the digest of what the pods mount;
/// `None` while they mount nothing (plaintext, also on the way to TLS: the
/// Secret is made then, for the next step's pods, but rolling these for it
/// would be a rollout for nothing).
pub async fn ensure_rpc_tls(pc: &PushCluster, ctx: &Context, ns: &str) -> Result<Option<String>> {
    let mounted = rpc_tls::current(pc).is_some();
    if !mounted && rpc_tls::target(pc).is_none() {
        return Ok(None);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = rpc_tls_name(pc);
    let now = time::OffsetDateTime::now_utc();
    let live = api.get_opt(&name).await?;
    let (write, what) = match &live {
        None => (
            mint(pc, now).map_err(Error::RpcTls)?,
            "generated a CA and the pods' certificate",
        ),
        Some(s) => match renewal(pc, s, now).map_err(Error::RpcTls)? {
            None => return Ok(mounted.then(|| digest(s))),
            Some(w) => (w, "renewed the pods' certificate"),
        },
    };
    let written = match live {
        // Create, not apply: a concurrent creator makes this fail (409) and
        // the next reconcile reads what won.
        None => api.create(&PostParams::default(), &write).await?,
        // A merge patch that names the version read: a concurrent writer
        // makes it fail (409) rather than be overwritten.
        Some(old) => {
            let patch = json!({
                "metadata": {
                    "resourceVersion": old.metadata.resource_version,
                    "annotations": write.metadata.annotations,
                },
                "data": write.data,
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?
        }
    };
    publish(
        ctx,
        pc,
        EventType::Normal,
        "RpcTlsCertificate",
        &format!("{what} in Secret {name}"),
    )
    .await;
    Ok(mounted.then(|| digest(&written)))
}
