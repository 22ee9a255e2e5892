//! Sending a request to the upstream API: where it goes ([`target`]), how its headers change
//! ([`headers`]), and the pooled HTTPS client that sends it.

mod headers;
mod target;

pub use headers::{remove_hop_by_hop, rewrite_request_headers};
pub use target::{check_path, Target, TargetError};

use crate::body::RequestBody;
use crate::config::UpstreamConfig;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

/// The pooled client to one upstream; a clone shares the pool.
#[derive(Clone)]
pub struct Upstream {
    pub target: Target,
    client: Client<HttpsConnector<HttpConnector>, RequestBody>,
    timeout: Duration,
}

/// What went wrong sending upstream.
#[derive(Debug)]
pub enum SendError {
    Unreachable(String),
    Timeout(Duration),
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, extra_roots: Option<&[u8]>) -> Result<Upstream, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(pem) = extra_roots {
            add_pem_roots(&mut roots, pem)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.limits.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Upstream {
            target: Target::new(&config.url)?,
            client,
            timeout: config.timeout,
        })
    }

    /// Send one request and wait for the response head.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // The pooled client picks HTTP/1.1 or h2 by ALPN; the client's version does not apply.
        *request.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(SendError::Unreachable(describe_client_error(&e))),
            Err(_) => Err(SendError::Timeout(self.timeout)),
        }
    }
}

fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    match certificate_hint(&text) {
        Some(hint) => format!("{text}. {hint}"),
        None => text,
    }
}

/// What to do about a certificate rustls refused, in words, from the error's text.
fn certificate_hint(text: &str) -> Option<&'static str> {
    if text.contains("CaUsedAsEndEntity") {
        Some("The API's certificate is a CA certificate used as its own server certificate (what `openssl req -x509` makes by default), which TLS clients refuse. Give the server a certificate signed by that CA (a leaf without CA:TRUE) and put the CA in the upstream's ca_file")
    } else if text.contains("UnknownIssuer") {
        Some("The API's certificate is not signed by a CA this machine trusts: put the CA that signed it (PEM) in the upstream's ca_file")
    } else if text.contains("NotValidForName") {
        Some("The API's certificate does not name the host in the upstream's url: use the name the certificate was issued for")
    } else if text.contains("certificate expired") || text.contains("Expired") {
        Some("The API's certificate has expired (or this machine's clock is wrong)")
    } else {
        None
    }
}

/// Parse PEM certificates into `roots`; an empty or unreadable file is an error.
pub fn add_pem_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("ca_file is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file holds a certificate rustls cannot use: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("ca_file holds no PEM certificate".into());
    }
    Ok(())
}
