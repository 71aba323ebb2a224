//! Mutual TLS between nodes: a cluster CA signs every node's certificate; a node accepts pipe
//! connections only from certificates of that CA and dials only servers holding one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::wire::ALPN;
use crate::ids::{NodeId, RegionId};

/// Name every node certificate carries and every dialer checks: cluster membership is proven
/// by the CA's signature, the node's identity by its certificate's common name, which both
/// ends compare with the peer's `Hello` (see [`CertIdentity`]).
pub const CLUSTER_SERVER_NAME: &str = "node.meridian.internal";

/// Why TLS material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// PEM text of a certificate and its private key.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A cluster CA, able to issue node certificates.
pub struct ClusterCa {
    pub pair: CertPair,
}

impl ClusterCa {
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pair: CertPair {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
        })
    }

    /// A certificate for `node`, valid as TLS server and client. With a `region`, the
    /// certificate binds the node to it too (organizational unit): peers then refuse a
    /// `Hello` from this node that names another region.
    pub fn issue(&self, node: &NodeId, region: Option<&RegionId>) -> Result<CertPair, TlsError> {
        let ca_key = KeyPair::from_pem(&self.pair.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.pair.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, node.as_str());
        if let Some(region) = region {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, region.as_str());
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            pair: CertPair {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            },
        })
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a PEM file; private keys are made readable by the owner only.
pub fn write_pem(path: &Path, pem: &str, private: bool) -> Result<(), TlsError> {
    std::fs::write(path, pem).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Files of one node's pipe identity.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Creates a CA in `dir` (`ca.pem`, `ca.key`) and a certificate for each node
/// (`<node>.pem`, `<node>.key`): what `meridian dev` and the tests use.
pub fn write_cluster(dir: &Path, nodes: &[NodeId]) -> Result<Vec<NodeFiles>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca = ClusterCa::generate("Meridian cluster CA")?;
    let ca_file = dir.join("ca.pem");
    write_pem(&ca_file, &ca.pair.cert_pem, false)?;
    write_pem(&dir.join("ca.key"), &ca.pair.key_pem, true)?;
    nodes
        .iter()
        .map(|node| {
            let pair = ca.issue(node, None)?;
            let files = NodeFiles {
                ca_file: ca_file.clone(),
                cert_file: dir.join(format!("{node}.pem")),
                key_file: dir.join(format!("{node}.key")),
            };
            write_pem(&files.cert_file, &pair.cert_pem, false)?;
            write_pem(&files.key_file, &pair.key_pem, true)?;
            Ok(files)
        })
        .collect()
}

/// Who a node certificate vouches for: the node id (common name) and, when the certificate
/// was issued with one, the region (organizational unit). A pipe's `Hello` must match it, so
/// holding one cluster certificate does not let a node speak as another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub node: String,
    pub region: Option<String>,
}

impl CertIdentity {
    /// Reads the identity from a DER certificate; `None` if it is not one or names no node.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let node = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
        let region = subject
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .map(str::to_owned);
        Some(Self { node, region })
    }

    /// The identity a QUIC peer proved with its certificate during the handshake.
    pub fn of_peer(conn: &quinn::Connection) -> Option<Self> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        Self::from_der(certs.first()?.as_ref())
    }

    /// Whether a `Hello` naming `node` in `region` is what this certificate vouches for.
    pub fn admits(&self, node: &NodeId, region: &RegionId) -> bool {
        self.node == node.as_str() && self.region.as_deref().is_none_or(|r| r == region.as_str())
    }
}

/// What a node needs for pipes: the cluster CA certificate and its own pair.
#[derive(Clone)]
pub struct NodeTls {
    pub ca_cert_pem: String,
    pub node: CertPair,
}

impl NodeTls {
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca_cert_pem: read(ca_cert)?,
            node: CertPair {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            },
        })
    }

    /// The identity this node's own certificate vouches for.
    pub fn own_identity(&self) -> Result<CertIdentity, TlsError> {
        let (_, chain, _) = self.parts()?;
        chain
            .first()
            .and_then(|c| CertIdentity::from_der(c.as_ref()))
            .ok_or(TlsError::Pem {
                path: "node certificate".into(),
                what: "certificate with a common name",
            })
    }

    fn parts(
        &self,
    ) -> Result<
        (
            rustls::RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_cert_pem.as_bytes()) {
            let c = c.map_err(|_| TlsError::Pem {
                path: "ca certificate".into(),
                what: "certificate",
            })?;
            roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.node.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| TlsError::Pem {
                    path: "node certificate".into(),
                    what: "certificate",
                })?;
        let key = PrivateKeyDer::from_pem_slice(self.node.key_pem.as_bytes()).map_err(|_| {
            TlsError::Pem {
                path: "node key".into(),
                what: "private key",
            }
        })?;
        Ok((roots, chain, key))
    }

    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let (roots, chain, key) = self.parts()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let (roots, chain, key) = self.parts()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }
}

/// Pipe transport settings: room for full-size RTP in one datagram, quick failure detection.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // 1452 leaves 1414 bytes for a datagram: a 1200-byte RTP packet plus our header fits.
    t.initial_mtu(1452);
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    // A silent peer is declared gone after this long.
    t.max_idle_timeout(Some(
        Duration::from_secs(3)
            .try_into()
            .expect("3 s is a valid idle timeout"),
    ));
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    // Inter-region links lose packets at random; a loss-based controller (NewReno, Cubic)
    // reads that as congestion and queues media datagrams for seconds. BBR paces by measured
    // bandwidth and round-trip time instead.
    let mut bbr = quinn::congestion::BbrConfig::default();
    bbr.initial_window(256 * 1024);
    t.congestion_controller_factory(Arc::new(bbr));
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_certificate_names_its_node_and_optionally_its_region() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let node: NodeId = "us-1".parse().unwrap();
        let us: RegionId = "us".parse().unwrap();
        let india: RegionId = "india".parse().unwrap();
        let plain = CertIdentity::from_der(&der(&ca.issue(&node, None).unwrap().cert_pem)).unwrap();
        assert_eq!(plain.node, "us-1");
        assert!(plain.admits(&node, &india), "no region in the certificate");
        assert!(!plain.admits(&"us-2".parse().unwrap(), &us));
        let bound =
            CertIdentity::from_der(&der(&ca.issue(&node, Some(&us)).unwrap().cert_pem)).unwrap();
        assert_eq!(bound.region.as_deref(), Some("us"));
        assert!(bound.admits(&node, &us));
        assert!(!bound.admits(&node, &india));
        assert_eq!(CertIdentity::from_der(b"not a certificate"), None);
    }
}
