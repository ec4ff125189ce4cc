//! Connections to Redis over TLS: the `rediss` schemes, which certificate
//! authorities a server's certificate may chain to, and the certificate
//! this side shows a Redis that asks for one.
//!
//! Managed Redis services often take TLS connections only, a Redis in the
//! cluster may use a private CA, and `redis-server` with TLS asks clients
//! for a certificate unless told otherwise (`tls-auth-clients`). A process
//! uses one [`TlsSettings`] for every Redis connection it makes
//! ([`TlsSettings::install`], from `PUSH_REDIS_CA_FILE` and
//! `PUSH_REDIS_CLIENT_CERT_FILE`/`_KEY_FILE` in the binaries), the way
//! OpenSSL's `SSL_CERT_FILE` works, rather than threading paths through the
//! store's, the message service's and the leases' configs; without CAs, the
//! system's roots (and `SSL_CERT_FILE`) are used. Certificates are always
//! verified, host names included: there is no insecure mode.

use crate::Error;
use redis::{
    ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult,
    TlsCertificates,
};
use rustls::pki_types::pem::PemObject;
use std::path::Path;
use std::sync::OnceLock;

/// The settings of every target parsed after [`TlsSettings::install`].
static INSTALLED: OnceLock<TlsSettings> = OnceLock::new();

/// What Redis TLS connections trust and show: CAs and a client
/// certificate, each PEM and checked when read.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// CAs the servers' certificates must chain to; none: the system's.
    ca: Option<Vec<u8>>,
    /// Certificate and key shown to a server that asks for one.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl TlsSettings {
    /// Reads the files given: a CA bundle, and a client certificate with
    /// its key (both or neither).
    pub fn from_files(
        ca: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self, Error> {
        let ca = ca.map(|p| read(p, check_certificates)).transpose()?;
        let client = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some((read(c, check_certificates)?, read(k, check_key)?)),
            (None, None) => None,
            (Some(p), None) | (None, Some(p)) => {
                return Err(Error::TlsFile {
                    path: p.display().to_string(),
                    why: "a Redis client certificate needs its key, and a key its certificate"
                        .into(),
                })
            }
        };
        Ok(Self { ca, client })
    }

    /// Trusting the CAs in `pem` (not checked: test and operator use).
    pub fn trusting(pem: Vec<u8>) -> Self {
        Self {
            ca: Some(pem),
            client: None,
        }
    }

    /// These settings, showing `cert` and `key` (PEM) when asked.
    pub fn showing(mut self, cert: Vec<u8>, key: Vec<u8>) -> Self {
        self.client = Some((cert, key));
        self
    }

    /// Whether anything is set (CAs or a client certificate).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// Makes these the settings of every Redis target this process parses
    /// from now on. Called once, at start-up; a second call keeps the first.
    pub fn install(self) {
        let _ = INSTALLED.set(self);
    }

    /// What redis-rs takes, when anything is set.
    fn certificates(&self) -> Option<TlsCertificates> {
        self.is_set().then(|| TlsCertificates {
            client_tls: self.client.clone().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert,
                client_key: key,
            }),
            root_cert: self.ca.clone(),
        })
    }
}

/// Reads `path` and checks it with `check`.
fn read(path: &Path, check: fn(&[u8]) -> Result<(), String>) -> Result<Vec<u8>, Error> {
    let bad = |why: String| Error::TlsFile {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    check(&pem).map_err(bad)?;
    Ok(pem)
}

/// Whether `pem` holds at least one certificate and nothing unreadable.
fn check_certificates(pem: &[u8]) -> Result<(), String> {
    let mut n = 0;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        n += 1;
    }
    if n == 0 {
        return Err("no certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(())
}

/// Whether `pem` holds a private key.
fn check_key(pem: &[u8]) -> Result<(), String> {
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| format!("no PEM private key in it: {e}"))
}

/// How a target's connections are made: plain TCP or TLS, with settings.
#[derive(Clone, Default)]
pub(crate) struct Tls {
    /// Connections use TLS (a `rediss` scheme).
    pub(crate) on: bool,
    settings: TlsSettings,
}

impl Tls {
    /// TLS on or off, with `settings` or else the installed ones.
    pub(crate) fn new(on: bool, settings: Option<TlsSettings>) -> Self {
        let settings = settings
            .or_else(|| INSTALLED.get().cloned())
            .unwrap_or_default();
        if !on && settings.is_set() {
            tracing::warn!(
                "Redis TLS files are set but the Redis URL is not TLS (rediss://): \
                 connecting without TLS"
            );
        }
        Self { on, settings }
    }

    /// The certificates for redis-rs, when TLS is on and anything is set.
    pub(crate) fn certs(&self) -> Option<TlsCertificates> {
        self.settings.certificates().filter(|_| self.on)
    }

    /// A client of `host:port` with `settings` (credentials, database).
    pub(crate) fn client(
        &self,
        host: String,
        port: u16,
        settings: RedisConnectionInfo,
    ) -> RedisResult<redis::Client> {
        let addr = if self.on {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        let info = addr.into_connection_info()?.set_redis_settings(settings);
        self.open(info)
    }

    /// A client of a parsed URL or connection info.
    pub(crate) fn open(&self, info: impl IntoConnectionInfo) -> RedisResult<redis::Client> {
        match self.certs() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
    }

    /// A client of a `host:port` address (`[v6]:port` too), without
    /// credentials: a Sentinel.
    pub(crate) fn client_of_addr(&self, addr: &str) -> RedisResult<redis::Client> {
        let (host, port) = crate::sentinel::host_port(addr).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "not a host:port address",
                addr.to_owned(),
            ))
        })?;
        self.client(host, port, RedisConnectionInfo::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_checked_when_read() {
        let dir = std::env::temp_dir().join(format!("pc-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = TlsSettings::from_files(Some(&empty), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let absent = dir.join("absent.pem");
        let e = TlsSettings::from_files(Some(&absent), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.pem"), "{e}");

        let ca = pushcluster_core::tls::testing::TestCa::new("test CA");
        let good = dir.join("ca.pem");
        std::fs::write(&good, &ca.pem).unwrap();
        let leaf = ca.leaf(&["client"]);
        leaf.write_to(&dir);
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let s = TlsSettings::from_files(Some(&good), Some(&cert), Some(&key)).unwrap();
        assert!(s.ca.is_some() && s.client.is_some());
        let e = TlsSettings::from_files(None, Some(&cert), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its key"), "{e}");
        let e = TlsSettings::from_files(None, Some(&cert), Some(&good))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
