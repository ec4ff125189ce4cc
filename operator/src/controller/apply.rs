//! Server-side apply of one child, skipped when the live object already is
//! what we want, so a no-op reconcile makes no write request at all.
//!
//! "What we want" has two halves. Every field we set must have its value in
//! the live object ([`contains`]: drift in managed fields is repaired, fields
//! of other managers and of the server are left alone). And a field we stop
//! setting leaves no trace that `contains` could see, so each applied object
//! carries [`APPLIED_HASH`], the hash of what was applied: a changed hash is
//! how a removed field (say, unset resources) still leads to an apply, which
//! server-side apply then removes because our manager no longer owns it.

use super::Context;
use crate::children::config::hash_of;
use crate::children::{Child, MANAGER};
use crate::Result;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;

/// Annotation with the hash of the object as last applied by the operator.
pub const APPLIED_HASH: &str = "pushcluster.io/applied-hash";

/// What an apply of `child` sends: the object and its [`APPLIED_HASH`].
pub fn apply_body(child: &Child) -> Result<Value> {
    let mut body = child.to_json()?;
    let hash = hash_of(&body);
    body["metadata"]["annotations"][APPLIED_HASH] = hash.into();
    Ok(body)
}

/// Whether every field of `want` has the same value in `have` (extra fields
/// in `have`, set by the server or other managers, are fine).
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| wv.is_null() || h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        (h, w) => h == w,
    }
}

/// Applies `child` unless the live object already has what `apply_body`
/// would send; says whether it wrote.
pub async fn apply_if_changed(ctx: &Context, ns: &str, child: &Child) -> Result<bool> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &child.resource());
    let name = child.name();
    let want = apply_body(child)?;
    if let Some(live) = api.get_opt(&name).await? {
        // apiVersion/kind are not echoed by every decoder; compare the rest.
        let mut bare = want.clone();
        if let Some(o) = bare.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
        if contains(&serde_json::to_value(&live)?, &bare) {
            return Ok(false);
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&want),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containment_ignores_what_the_server_adds() {
        let have = json!({"metadata": {"name": "a", "uid": "x", "labels": {"k": "v", "other": "1"}}, "spec": {"ports": [{"port": 1, "protocol": "TCP"}]}});
        assert!(contains(
            &have,
            &json!({"metadata": {"name": "a", "labels": {"k": "v"}}})
        ));
        assert!(contains(&have, &json!({"spec": {"ports": [{"port": 1}]}})));
        assert!(!contains(&have, &json!({"spec": {"ports": [{"port": 2}]}})));
        assert!(!contains(
            &have,
            &json!({"spec": {"ports": [{"port": 1}, {"port": 2}]}})
        ));
        assert!(!contains(
            &have,
            &json!({"metadata": {"labels": {"k": "changed"}}})
        ));
        assert!(contains(&have, &json!({"spec": {"missing": null}})));
    }

    #[test]
    fn a_removed_field_changes_the_applied_hash() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let cm = |data: &[(&str, &str)]| {
            Child::ConfigMap(ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some("c".into()),
                    ..Default::default()
                },
                data: Some(
                    data.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            })
        };
        let both = apply_body(&cm(&[("a", "1"), ("b", "2")])).unwrap();
        let one = apply_body(&cm(&[("a", "1")])).unwrap();
        // The live object still holds everything the smaller one names...
        assert!(contains(&both["data"], &one["data"]));
        // ...but not its hash, so the removal is applied.
        assert!(!contains(&both, &one));
        assert_eq!(one["kind"], "ConfigMap");
    }
}
