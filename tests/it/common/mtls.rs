//! A TLS terminator that asks every client for a certificate signed by a given CA, as an API
//! or identity server behind an mTLS front does, and passes each request on to a plain-HTTP
//! simulator with the verified certificate's SHA-256 in `x-client-cert-sha256` (whatever the
//! client sent under that name is dropped). A client without a certificate fails the
//! handshake.

use super::certs::TestCa;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_sim::identity::CLIENT_CERT_HEADER;

/// The base64url SHA-256 of a certificate's DER: how the front names it.
pub fn thumbprint(der: &[u8]) -> String {
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// Serve `server`'s certificate on a loopback port, requiring a client certificate that
/// `client_ca_pem` signed, and pass requests on to `backend`.
pub async fn front(server: &TestCa, client_ca_pem: &str, backend: SocketAddr) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.cert_der.clone().into()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(server.key_der.clone().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                let Some(presented) = leaf.map(|c| thumbprint(c)) else {
                    return;
                };
                let service =
                    service_fn(move |request| pass_on(request, backend, presented.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

async fn pass_on(
    request: http::Request<hyper::body::Incoming>,
    backend: SocketAddr,
    presented: String,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let (mut parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    parts.headers.remove(CLIENT_CERT_HEADER);
    parts
        .headers
        .insert(CLIENT_CERT_HEADER, presented.parse().unwrap());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{backend}{path}").parse().unwrap();
    let request = http::Request::from_parts(parts, Full::new(body));
    let answer = super::collect(super::client().request(request).await.unwrap()).await;
    let mut response = http::Response::new(Full::new(answer.body));
    *response.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
    *response.headers_mut() = answer.headers;
    response
        .headers_mut()
        .remove(http::header::TRANSFER_ENCODING);
    Ok(response)
}
