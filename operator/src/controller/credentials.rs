//! Keeps the generated credentials Secret complete: creates it, or adds the
//! keys deleted to rotate them. Values that exist are never rewritten.

use super::{publish, Context};
use crate::children::credentials::{credentials_secret, random_token};
use crate::children::{credentials_name, secure, CredentialDigests};
use crate::crd::PushCluster;
use crate::Result;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::json;

/// Makes the credentials Secret complete and returns its digests.
pub async fn ensure_credentials(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
) -> Result<CredentialDigests> {
    if !secure(pc) {
        return Ok(CredentialDigests::default());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = credentials_name(pc);
    let live = api.get_opt(&name).await?;
    let Some(write) = credentials_secret(pc, live.as_ref(), random_token) else {
        return Ok(live.as_ref().map(CredentialDigests::of).unwrap_or_default());
    };
    let keys: Vec<String> = write
        .string_data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    let written = match live {
        // Create, not apply: a concurrent creator makes this fail (409) and
        // the next reconcile reads what won, so a value is never replaced.
        None => api.create(&PostParams::default(), &write).await?,
        Some(_) => {
            let patch = json!({"stringData": write.string_data});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?
        }
    };
    publish(
        ctx,
        pc,
        EventType::Normal,
        "CredentialsGenerated",
        &format!("generated {} in Secret {name}", keys.join(", ")),
    )
    .await;
    Ok(CredentialDigests::of(&written))
}
