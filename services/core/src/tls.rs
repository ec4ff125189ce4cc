//! TLS where the pod is the edge: a listener's certificate and key come
//! from PEM files (a mounted Secret), are looked at again every few seconds
//! and swapped in when they change. Only new handshakes use the new
//! certificate; connections already open keep theirs, so a rotation drops
//! nothing. A file that does not parse keeps the old certificate (and says
//! so in the log) instead of taking the listener down.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A TLS listener: where it listens and where its certificate is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsListen {
    /// Listen address of the TLS port.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first (a Secret's `tls.crt`).
    pub cert_file: PathBuf,
    /// PEM private key (a Secret's `tls.key`).
    pub key_file: PathBuf,
    /// Seconds between looks at the two files for a new certificate.
    #[serde(default = "default_reload_seconds")]
    pub reload_seconds: u64,
}

fn default_reload_seconds() -> u64 {
    5
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{path}: no usable PEM private key in it: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate a TLS listener serves now, swapped when its files change.
pub struct Certificates {
    files: TlsListen,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// Digest of the two files' bytes, to see a change.
    digest: [u8; 32],
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Loads the certificate of `files`; an error when it cannot be used.
    pub fn load(files: &TlsListen) -> Result<Arc<Self>, TlsError> {
        let (bytes, digest) = read_pair(files)?;
        let config = server_config(&files.cert_file, &files.key_file, &bytes)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            current: RwLock::new(Loaded { config, digest }),
        }))
    }

    /// An acceptor with the certificate of the moment.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(current.config.clone())
    }

    /// Looks at the files again; says whether a new certificate was taken.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (bytes, digest) = read_pair(&self.files)?;
        if self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .digest
            == digest
        {
            return Ok(false);
        }
        let config = server_config(&self.files.cert_file, &self.files.key_file, &bytes)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Loaded { config, digest };
        Ok(true)
    }

    /// Reloads every `reload_seconds` until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let period = Duration::from_secs(self.files.reload_seconds.max(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            match self.reload() {
                Ok(true) => tracing::info!(
                    cert = %self.files.cert_file.display(),
                    "TLS certificate changed on disk: new connections get it"
                ),
                Ok(false) => {}
                // A Secret being rewritten can be seen half done; the next
                // look gets the whole of it.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; serving the previous one")
                }
            }
        }
    }
}

/// The PEM bytes of a certificate file and a key file.
type PemPair = (Vec<u8>, Vec<u8>);

/// The bytes of the certificate and key files, and their digest.
fn read_pair(files: &TlsListen) -> Result<(PemPair, [u8; 32]), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert = read(&files.cert_file)?;
    let key = read(&files.key_file)?;
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_le_bytes());
    h.update(&cert);
    h.update(&key);
    Ok(((cert, key), h.finalize().into()))
}

/// A server configuration (HTTP/1.1 only: WebSocket upgrades need it) from
/// PEM bytes.
fn server_config(
    cert_path: &Path,
    key_path: &Path,
    (cert, key): &PemPair,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A certificate authority for tests: issues leaf certificates for names,
/// and a client configuration that trusts it.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::CertificateDer;
    use std::sync::Arc;

    /// A test CA.
    pub struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        /// The CA's certificate, PEM.
        pub pem: String,
        der: CertificateDer<'static>,
    }

    /// A leaf certificate and its key, PEM, and the certificate's DER.
    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
        pub der: Vec<u8>,
    }

    impl TestCa {
        /// A new CA named `name`.
        pub fn new(name: &str) -> Self {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("CA certificate");
            Self {
                pem: cert.pem(),
                der: cert.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf for `names` (DNS names or IP addresses), signed by this CA.
        pub fn leaf(&self, names: &[&str]) -> Leaf {
            let key = KeyPair::generate().expect("leaf key");
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let cert = CertificateParams::new(names)
                .expect("leaf params")
                .signed_by(&key, &self.issuer)
                .expect("leaf certificate");
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().to_vec(),
            }
        }

        /// A client configuration that trusts this CA only.
        pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.der.clone()).expect("CA root");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("protocol versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    }

    impl Leaf {
        /// Writes `tls.crt` and `tls.key` into `dir` as a Secret volume
        /// update does: each file replaced whole, never seen half written.
        pub fn write_to(&self, dir: &std::path::Path) {
            for (name, text) in [("tls.crt", &self.cert_pem), ("tls.key", &self.key_pem)] {
                let tmp = dir.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, text).expect("write certificate");
                std::fs::rename(&tmp, dir.join(name)).expect("replace certificate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str) {
        testing::TestCa::new("test CA").leaf(&[name]).write_to(dir);
    }

    fn files(dir: &Path) -> TlsListen {
        TlsListen {
            listen: ([127, 0, 0, 1], 0).into(),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            reload_seconds: 1,
        }
    }

    #[test]
    fn a_changed_certificate_is_taken_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "one.test");
        let certs = Certificates::load(&files(dir.path())).unwrap();
        assert!(!certs.reload().unwrap(), "same files: nothing new");
        write_cert(dir.path(), "two.test");
        assert!(certs.reload().unwrap(), "new files are taken");
        std::fs::write(dir.path().join("tls.crt"), b"not a certificate").unwrap();
        let err = certs.reload().unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate(_)), "{err}");
        std::fs::write(dir.path().join("tls.key"), b"").unwrap();
        assert!(Certificates::load(&files(dir.path())).is_err());
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Certificates::load(&files(dir.path())).unwrap_err();
        assert!(err.to_string().contains("tls.crt"), "{err}");
    }
}
