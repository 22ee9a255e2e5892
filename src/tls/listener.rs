//! The TLS listener (`[upstream.tls] cert, key`): rustls with ALPN `h2` and `http/1.1`, and a
//! certificate that can be re-read from its files while serving (SIGHUP) without dropping a
//! connection: new handshakes use the new certificate, open connections keep theirs.
//!
//! A reload that fails (a missing file, a key that does not match) keeps the certificate in
//! use and says why. A client that speaks plain HTTP to the listener is told to use https
//! ([`answer_plain_http`]).

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A certificate and key read from PEM files, swappable while serving.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl CertStore {
    /// Read `cert` (the chain, leaf first) and `key` (PKCS#8, PKCS#1 or SEC1), or say why not.
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<CertStore>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(cert, key, &provider)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(loaded),
            provider,
        }))
    }

    /// Read the files again; on error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = load(&self.cert, &self.key, &self.provider)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// The acceptor for a listener: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
    pub fn acceptor(self: &Arc<Self>) -> tokio_rustls::TlsAcceptor {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read tls.cert {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "tls.cert {} holds no CERTIFICATE block",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read a private key from tls.key {}: {e}",
            key.display()
        )
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!(
            "tls.key {} does not go with tls.cert {}: {e}",
            key.display(),
            cert.display()
        )
    })
}

/// A client that speaks plain HTTP to an HTTPS listener (its first byte is a letter, where a
/// TLS handshake starts with 0x16) gets a plain-text 400 saying to use https, which curl and a
/// browser can show, instead of bytes they cannot read; returns whether it was answered. The
/// request's head is read first (up to 16 KiB), so closing does not reset the connection
/// under the answer, and its `Host` makes the suggested URL.
pub async fn answer_plain_http(stream: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    if !matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase()) {
        return false;
    }
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let host = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("host")
                .then(|| value.trim().to_owned())
        })
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()));
    let at = match host {
        Some(host) => format!("https://{host}/"),
        None => stream
            .local_addr()
            .map_or_else(|_| "https://".to_owned(), |a| format!("https://{a}/")),
    };
    let body = format!("This tollgate listener speaks HTTPS: use {at} (https, not http).\n");
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    true
}
