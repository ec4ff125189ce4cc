//! Connections to Redis over TLS: the `rediss` schemes, and which
//! certificate authorities a server's certificate may chain to.
//!
//! Managed Redis services often take TLS connections only, and a Redis in
//! the cluster may use a private CA. A process trusts one set of CAs for
//! every Redis connection it makes ([`trust_ca_file`], from
//! `PUSH_REDIS_CA_FILE` in the binaries), the way OpenSSL's `SSL_CERT_FILE`
//! works, rather than threading a path through the store's, the message
//! service's and the leases' configs; without one, the system's roots (and
//! `SSL_CERT_FILE`) are used. Certificates are always verified, host names
//! included: there is no insecure mode.

use crate::Error;
use redis::{
    ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult, TlsCertificates,
};
use std::path::Path;
use std::sync::OnceLock;

/// CAs trusted by every target parsed after [`trust_ca_file`] (PEM).
static TRUSTED: OnceLock<Vec<u8>> = OnceLock::new();

/// Makes the PEM certificates in `path` the CAs that every Redis TLS
/// connection of this process trusts (in place of the system's roots).
/// Called once, at start-up; a second call keeps the first file.
pub fn trust_ca_file(path: &Path) -> Result<(), Error> {
    let pem = read_ca_file(path)?;
    let _ = TRUSTED.set(pem);
    Ok(())
}

/// Reads and checks a PEM file of CA certificates.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, Error> {
    let bad = |why: String| Error::Ca {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    check_pem(&pem).map_err(bad)?;
    Ok(pem)
}

/// Whether `pem` holds at least one certificate and nothing unreadable.
fn check_pem(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
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

/// How a target's connections are made: plain TCP or TLS, and the CAs.
#[derive(Clone, Default)]
pub(crate) struct Tls {
    /// Connections use TLS (a `rediss` scheme).
    pub(crate) on: bool,
    /// CAs in PEM; none: the system's roots.
    roots: Option<Vec<u8>>,
}

impl Tls {
    /// TLS on or off, trusting `roots` or else what [`trust_ca_file`] set.
    pub(crate) fn new(on: bool, roots: Option<Vec<u8>>) -> Self {
        let roots = roots.or_else(|| TRUSTED.get().cloned());
        if !on && roots.is_some() {
            tracing::warn!(
                "a Redis CA file is set but the Redis URL is not TLS (rediss://): \
                 connecting without TLS"
            );
        }
        Self { on, roots }
    }

    /// The certificates for redis-rs, when CAs are given.
    pub(crate) fn certs(&self) -> Option<TlsCertificates> {
        self.roots.clone().map(|root| TlsCertificates {
            client_tls: None,
            root_cert: Some(root),
        })
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
        match self.certs().filter(|_| self.on) {
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
    fn ca_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("pc-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err().to_string();
        assert!(
            e.contains("no certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let e = read_ca_file(&dir.join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.pem"), "{e}");
        let ca = pushcluster_core::tls::testing::TestCa::new("test CA");
        let good = dir.join("ca.pem");
        std::fs::write(&good, &ca.pem).unwrap();
        assert!(read_ca_file(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
