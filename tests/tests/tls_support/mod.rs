//! TLS clients of the kubelet API tests: a connection to 127.0.0.1 that trusts the agent's
//! (self-signed) serving certificate.

use std::sync::Arc;
use tokio_rustls::rustls;

/// A TLS stream to the agent.
pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A connector trusting the PEM certificates in `ca`.
pub fn connector(ca: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c.expect("ca pem")).expect("ca");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// TCP and a TLS handshake to 127.0.0.1:`port` (the certificate names 127.0.0.1).
pub async fn connect(c: &tokio_rustls::TlsConnector, port: u16) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    c.connect(name, tcp).await
}
