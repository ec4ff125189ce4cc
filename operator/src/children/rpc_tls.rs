//! TLS on the internal gRPC ports: the cluster's own CA and the one
//! certificate every pod shows (Secret `<name>-rpc-tls`), the steps that
//! switch a running cluster on or off, and what each step puts in the
//! services' configs and pods.
//!
//! Why steps: pods of two templates run side by side in every rollout, and
//! a client dialing TLS to a server that takes only plaintext (or the
//! reverse) fails its calls. So servers first take both
//! ([`RpcTlsStep::Accepting`]), then clients dial TLS
//! ([`RpcTlsStep::Connecting`]), then servers drop plaintext
//! ([`RpcTlsStep::Required`]); a step is taken only when every rollout of
//! the one before completed and no pod of it is still terminating. Turning
//! TLS off walks the same steps back. A new cluster starts at its target.
//!
//! Why a CA of its own rather than cert-manager: nothing has to be
//! installed, the CA's key never leaves the operator's Secret (the pods
//! mount only the CA's certificate and their own pair), and renewing the
//! pods' certificate (every [`LEAF_DAYS`], a third before it expires) keeps
//! the CA, so old and new pods trust each other while the renewal rolls.

use super::{meta, name, secure};
use crate::crd::{PushCluster, RpcTlsStep};
use k8s_openapi::api::core::v1::{KeyToPath, Secret, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::ByteString;
use kube::ResourceExt;
use pushcluster_proto::tls::RpcTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::BTreeMap;
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// Where the pods mount the CA's certificate and their own pair.
pub const RPC_TLS_DIR: &str = "/etc/pushcluster-rpc";
/// Key of the Secret: the CA's certificate (mounted).
pub const CA_CERT: &str = "ca.crt";
/// Key of the Secret: the CA's private key (never mounted).
pub const CA_KEY: &str = "ca.key";
/// Key of the Secret: the pods' certificate (mounted).
pub const TLS_CERT: &str = "tls.crt";
/// Key of the Secret: the pods' private key (mounted).
pub const TLS_KEY: &str = "tls.key";
/// Annotation of the Secret: when the pods' certificate expires (Unix seconds).
pub const NOT_AFTER: &str = "pushcluster.io/rpc-tls-not-after";
/// How long the CA is valid.
pub const CA_DAYS: i64 = 3650;
/// How long the pods' certificate is valid; renewed a third before its end.
pub const LEAF_DAYS: i64 = 365;

/// Name of the Secret: `<cluster>-rpc-tls`.
pub fn rpc_tls_name(pc: &PushCluster) -> String {
    name(pc, "rpc-tls")
}

/// The name the pods' certificate carries and clients ask for (pods are
/// dialed by IP, which no certificate could name in advance).
pub fn server_name(pc: &PushCluster) -> String {
    format!(
        "rpc.{}.{}.pushcluster.internal",
        pc.name_any(),
        pc.namespace().unwrap_or_default()
    )
}

/// Where the cluster is headed: TLS only, unless it runs without
/// credentials or the spec asks for plaintext.
pub fn target(pc: &PushCluster) -> Option<RpcTlsStep> {
    (secure(pc) && !pc.spec.auth.plaintext_rpc).then_some(RpcTlsStep::Required)
}

/// The step the pods are to run now: the one the status records; a new
/// cluster (never reconciled) starts at its target; one whose status
/// predates the steps ran plaintext.
pub fn current(pc: &PushCluster) -> Option<RpcTlsStep> {
    match pc.status.as_ref() {
        Some(s) if s.observed_generation.is_some() => s.rpc_tls,
        _ => target(pc),
    }
}

/// The step after `now` on the way to `target`, once `settled` (every pod
/// runs `now`'s templates); `now` otherwise.
pub fn step_toward(
    now: Option<RpcTlsStep>,
    target: Option<RpcTlsStep>,
    settled: bool,
) -> Option<RpcTlsStep> {
    use RpcTlsStep::*;
    if now == target || !settled {
        return now;
    }
    if now < target {
        // None < Some(_): up from plaintext.
        Some(match now {
            None => Accepting,
            Some(Accepting) => Connecting,
            Some(Connecting | Required) => Required,
        })
    } else {
        match now {
            Some(Required) => Some(Connecting),
            Some(Connecting) => Some(Accepting),
            Some(Accepting) | None => None,
        }
    }
}

/// The `rpc_tls` section of every service's config at `step`.
pub fn config(pc: &PushCluster, step: Option<RpcTlsStep>) -> Option<RpcTls> {
    let step = step?;
    let dir = Path::new(RPC_TLS_DIR);
    Some(RpcTls {
        ca_file: dir.join(CA_CERT),
        cert_file: dir.join(TLS_CERT),
        key_file: dir.join(TLS_KEY),
        server_name: server_name(pc),
        connect: step >= RpcTlsStep::Connecting,
        accept_plaintext: step < RpcTlsStep::Required,
    })
}

/// The volume and mount of the Secret's three public-facing keys (not the
/// CA's key), when the pods run TLS at all.
pub fn volume(pc: &PushCluster, step: Option<RpcTlsStep>) -> Option<(Volume, VolumeMount)> {
    step?;
    let item = |k: &str| KeyToPath {
        key: k.into(),
        path: k.into(),
        mode: None,
    };
    Some((
        Volume {
            name: "rpc-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(rpc_tls_name(pc)),
                items: Some(vec![item(CA_CERT), item(TLS_CERT), item(TLS_KEY)]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "rpc-tls".into(),
            mount_path: RPC_TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ))
}

/// Why the Secret's material could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("generating the RPC certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the Secret's {0} is missing or not PEM")]
    Unreadable(&'static str),
}

/// The CA's parameters: the same every time, so a CA rebuilt from its key
/// issues certificates that chain to the one made first (issuer name and
/// key identifier come from these and the key).
fn ca_params(pc: &PushCluster) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(
        DnType::CommonName,
        format!("pushcluster RPC CA {}", server_name(pc)),
    );
    Ok(p)
}

/// Valid from a minute before `now` (clocks of nodes differ a little) for `days`.
fn validity(p: &mut CertificateParams, now: OffsetDateTime, days: i64) {
    p.not_before = now - Duration::minutes(1);
    p.not_after = now + Duration::days(days);
}

/// The pods' certificate and key, PEM, signed by `issuer`, and when it expires.
fn leaf(
    pc: &PushCluster,
    issuer: &Issuer<'_, KeyPair>,
    now: OffsetDateTime,
) -> Result<(String, String, OffsetDateTime), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![server_name(pc)])?;
    p.distinguished_name
        .push(DnType::CommonName, server_name(pc));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, now, LEAF_DAYS);
    let not_after = p.not_after;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

fn secret(pc: &PushCluster, data: BTreeMap<&str, String>, not_after: OffsetDateTime) -> Secret {
    let mut metadata = meta(pc, rpc_tls_name(pc), None);
    metadata.annotations = Some(BTreeMap::from([(
        NOT_AFTER.to_owned(),
        not_after.unix_timestamp().to_string(),
    )]));
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// A new Secret: a CA and the pods' certificate it signed.
pub fn mint(pc: &PushCluster, now: OffsetDateTime) -> Result<Secret, MintError> {
    let ca_key = KeyPair::generate()?;
    let mut params = ca_params(pc)?;
    validity(&mut params, now, CA_DAYS);
    let ca = params.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(params, ca_key);
    let (cert, key, not_after) = leaf(pc, &issuer, now)?;
    Ok(secret(
        pc,
        BTreeMap::from([
            (CA_CERT, ca.pem()),
            (CA_KEY, ca_key_pem),
            (TLS_CERT, cert),
            (TLS_KEY, key),
        ]),
        not_after,
    ))
}

fn text<'a>(s: &'a Secret, key: &'static str) -> Result<&'a str, MintError> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .filter(|t| t.contains("-----BEGIN"))
        .ok_or(MintError::Unreadable(key))
}

/// What to write to `live` at `now`: nothing while its certificate has more
/// than a third of its life left; else a new certificate from the same CA.
/// A Secret without a usable CA is made anew (its pods roll to it).
pub fn renewal(
    pc: &PushCluster,
    live: &Secret,
    now: OffsetDateTime,
) -> Result<Option<Secret>, MintError> {
    let due = now + Duration::days(LEAF_DAYS / 3);
    let not_after = live
        .annotations()
        .get(NOT_AFTER)
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    let whole = text(live, CA_CERT)
        .and(text(live, TLS_CERT))
        .and(text(live, TLS_KEY));
    if whole.is_ok() && not_after.is_some_and(|t| t > due) {
        return Ok(None);
    }
    let (Ok(ca_cert), Ok(ca_key)) = (text(live, CA_CERT), text(live, CA_KEY)) else {
        return mint(pc, now).map(Some);
    };
    let Ok(key) = KeyPair::from_pem(ca_key) else {
        return mint(pc, now).map(Some);
    };
    let issuer = Issuer::new(ca_params(pc)?, key);
    let (cert, key, not_after) = leaf(pc, &issuer, now)?;
    Ok(Some(secret(
        pc,
        BTreeMap::from([
            (CA_CERT, ca_cert.to_owned()),
            (CA_KEY, ca_key.to_owned()),
            (TLS_CERT, cert),
            (TLS_KEY, key),
        ]),
        not_after,
    )))
}

/// Digest of what the pods mount, so a renewed certificate rolls them.
pub fn digest(s: &Secret) -> String {
    let d = s.data.clone().unwrap_or_default();
    let part = |k: &str| d.get(k).map(|v| hex::encode(&v.0)).unwrap_or_default();
    super::config::hash_of(&(part(CA_CERT), part(TLS_CERT), part(TLS_KEY)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PushClusterStatus;
    use RpcTlsStep::*;

    fn pc(plaintext: bool) -> PushCluster {
        let mut pc: PushCluster = serde_yaml::from_str(
            "apiVersion: pushcluster.io/v1alpha1\nkind: PushCluster\nmetadata: {name: push, namespace: apps, uid: u1}\nspec: {image: pushcluster:1}\n",
        )
        .unwrap();
        pc.spec.auth.plaintext_rpc = plaintext;
        pc
    }

    fn reconciled(mut pc: PushCluster, step: Option<RpcTlsStep>) -> PushCluster {
        pc.status = Some(PushClusterStatus {
            observed_generation: Some(1),
            rpc_tls: step,
            ..PushClusterStatus::default()
        });
        pc
    }

    #[test]
    fn a_new_cluster_starts_at_tls_only_and_an_older_one_at_plaintext() {
        assert_eq!(current(&pc(false)), Some(Required));
        assert_eq!(current(&pc(true)), None);
        assert_eq!(
            current(&reconciled(pc(false), None)),
            None,
            "status from before the steps"
        );
        assert_eq!(
            current(&reconciled(pc(false), Some(Connecting))),
            Some(Connecting)
        );
        let mut insecure = pc(false);
        insecure.spec.auth.insecure = true;
        assert_eq!(target(&insecure), None);
    }

    #[test]
    fn steps_go_one_at_a_time_and_only_when_settled() {
        let up: Vec<_> = std::iter::successors(Some(None), |s| {
            let n = step_toward(*s, Some(Required), true);
            (n != *s).then_some(n)
        })
        .collect();
        assert_eq!(
            up,
            [None, Some(Accepting), Some(Connecting), Some(Required)]
        );
        let down: Vec<_> = std::iter::successors(Some(Some(Required)), |s| {
            let n = step_toward(*s, None, true);
            (n != *s).then_some(n)
        })
        .collect();
        assert_eq!(
            down,
            [Some(Required), Some(Connecting), Some(Accepting), None]
        );
        assert_eq!(
            step_toward(Some(Accepting), Some(Required), false),
            Some(Accepting)
        );
        assert_eq!(step_toward(None, None, true), None);
    }

    #[test]
    fn each_step_configures_servers_before_clients() {
        let p = pc(false);
        assert_eq!(config(&p, None), None);
        let at = |s| {
            let c = config(&p, Some(s)).unwrap();
            (c.accept_plaintext, c.connect)
        };
        assert_eq!(at(Accepting), (true, false));
        assert_eq!(at(Connecting), (true, true));
        assert_eq!(at(Required), (false, true));
        let c = config(&p, Some(Required)).unwrap();
        assert_eq!(c.server_name, "rpc.push.apps.pushcluster.internal");
        assert_eq!(c.ca_file, Path::new("/etc/pushcluster-rpc/ca.crt"));
        let (v, m) = volume(&p, Some(Accepting)).unwrap();
        let keys: Vec<_> = v
            .secret
            .unwrap()
            .items
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(
            keys,
            [CA_CERT, TLS_CERT, TLS_KEY],
            "the CA's key is not mounted"
        );
        assert_eq!(m.mount_path, RPC_TLS_DIR);
        assert!(volume(&p, None).is_none());
    }

    /// Whether `leaf_pem` verifies as `name` against the CA `ca_pem`, as the
    /// services' TLS (rustls) checks it.
    fn chains(ca_pem: &str, leaf_pem: &str, name: &str, at: OffsetDateTime) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
        v.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.unix_timestamp() as u64)),
        )
        .is_ok()
    }

    fn get(s: &Secret, k: &str) -> String {
        String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap()
    }

    #[test]
    fn the_pods_certificate_chains_to_the_ca_and_is_renewed_from_it() {
        let p = pc(false);
        let now = OffsetDateTime::now_utc();
        let s = mint(&p, now).unwrap();
        let name = server_name(&p);
        assert!(chains(&get(&s, CA_CERT), &get(&s, TLS_CERT), &name, now));
        assert!(!chains(
            &get(&s, CA_CERT),
            &get(&s, TLS_CERT),
            "other.name",
            now
        ));
        assert!(
            !chains(
                &get(&s, CA_CERT),
                &get(&s, TLS_CERT),
                &name,
                now + Duration::days(LEAF_DAYS + 1)
            ),
            "expired after LEAF_DAYS"
        );
        assert_eq!(renewal(&p, &s, now).unwrap(), None, "fresh: nothing to do");
        assert_eq!(
            renewal(&p, &s, now + Duration::days(LEAF_DAYS / 2)).unwrap(),
            None,
            "half its life left"
        );
        let later = now + Duration::days(LEAF_DAYS - 100);
        let renewed = renewal(&p, &s, later)
            .unwrap()
            .expect("renewed with 100 days left");
        assert_eq!(get(&renewed, CA_CERT), get(&s, CA_CERT), "the CA stays");
        assert_eq!(get(&renewed, CA_KEY), get(&s, CA_KEY));
        assert_ne!(get(&renewed, TLS_CERT), get(&s, TLS_CERT));
        assert!(
            chains(&get(&s, CA_CERT), &get(&renewed, TLS_CERT), &name, later),
            "old pods trust the renewed certificate"
        );
        assert_ne!(digest(&renewed), digest(&s), "the renewal rolls the pods");
        let not_after: i64 = renewed.annotations()[NOT_AFTER].parse().unwrap();
        assert!(not_after > (later + Duration::days(LEAF_DAYS - 1)).unix_timestamp());
    }

    #[test]
    fn a_secret_without_a_usable_ca_is_made_anew() {
        let p = pc(false);
        let now = OffsetDateTime::now_utc();
        let mut s = mint(&p, now).unwrap();
        s.data.as_mut().unwrap().remove(CA_KEY);
        s.data.as_mut().unwrap().remove(TLS_CERT);
        let fresh = renewal(&p, &s, now).unwrap().expect("made anew");
        assert_ne!(get(&fresh, CA_CERT), get(&s, CA_CERT));
        assert!(chains(
            &get(&fresh, CA_CERT),
            &get(&fresh, TLS_CERT),
            &server_name(&p),
            now
        ));
    }
}
