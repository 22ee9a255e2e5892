//! The HTTPS listener (`[upstream.tls]`): HTTP/1.1 and HTTP/2 by ALPN, and a certificate read
//! again on reload (SIGHUP) — new handshakes get the new one, a bad file keeps the old.

use crate::common;

use bytes::Bytes;
use common::certs::{make_ca, TestCa};
use common::{Harness, Setup};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsConnector;

fn write_certs(dir: &Path, ca: &TestCa) {
    std::fs::write(dir.join("cert.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &ca.key_pem).unwrap();
}

async fn harness(dir: &Path) -> Harness {
    Harness::start(Setup {
        extra_tables: format!(
            "[upstream.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"",
            dir.display()
        ),
        ..Setup::default()
    })
    .await
}

/// Connect over TLS trusting `ca`, offering `alpn`; returns the stream.
async fn connect(
    h: &Harness,
    ca: &TestCa,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    connect_to(h.proxy().addr("api").unwrap(), ca, alpn)
        .await
        .expect("TLS handshake")
}

async fn connect_to(
    addr: impl tokio::net::ToSocketAddrs,
    ca: &TestCa,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

use rustls_pki_types::pem::PemObject;

async fn get_over(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    h2: bool,
) -> (u16, serde_json::Value) {
    // HTTP/2 names the authority in the request; HTTP/1.1 sends the path and a Host.
    let target = if h2 {
        "https://localhost/items"
    } else {
        "/items"
    };
    let request = http::Request::get(target)
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        send.send_request(request).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test]
async fn https_with_http1_and_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca("first");
    write_certs(dir.path(), &ca);
    let h = harness(dir.path()).await;

    let stream = connect(&h, &ca, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, echo) = get_over(stream, false).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/api/v1/items");

    let stream = connect(&h, &ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, _) = get_over(stream, true).await;
    assert_eq!(status, 200);

    // Plain HTTP on the TLS port gets nowhere.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        common::client().request(
            http::Request::get(format!("http://{}/items", h.proxy().addr("api").unwrap()))
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    assert_eq!(h.api.counters().requests, 2);
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_and_a_bad_file_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_ca("first");
    write_certs(dir.path(), &first);
    let h = harness(dir.path()).await;
    let peer = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let open = connect(&h, &first, &[b"http/1.1"]).await;
    assert_eq!(peer(&open), first.cert_der);

    let second = make_ca("second");
    write_certs(dir.path(), &second);
    assert!(h.proxy().reload_tls().is_empty());
    let stream = connect(&h, &second, &[b"http/1.1"]).await;
    assert_eq!(peer(&stream), second.cert_der);
    assert_eq!(get_over(stream, false).await.0, 200);
    // The connection opened before the reload still works.
    assert_eq!(get_over(open, false).await.0, 200);

    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    let errors = h.proxy().reload_tls();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("cert.pem"), "{errors:?}");
    let stream = connect(&h, &second, &[b"http/1.1"]).await;
    assert_eq!(peer(&stream), second.cert_der, "the old certificate stays");
}

/// The binary reads its certificate again on SIGHUP, and keeps serving.
#[tokio::test]
async fn sighup_reloads_the_certificate_of_a_running_serve() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_ca("first");
    write_certs(dir.path(), &first);
    let mut h = harness(dir.path()).await;
    h.stop_proxy().await;
    let spawned = common::spawn_serve(&h.write_config("tollgate.toml", &h.config_text));
    let stream = connect_to(spawned.addr.as_str(), &first, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        first.cert_der
    );

    let second = make_ca("second");
    write_certs(dir.path(), &second);
    spawned.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Until the signal is handled, the old certificate fails the new CA's check.
    loop {
        match connect_to(spawned.addr.as_str(), &second, &[b"http/1.1"]).await {
            Ok(stream) => {
                assert_eq!(get_over(stream, false).await.0, 200);
                break;
            }
            Err(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no reload after SIGHUP"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A client that opens TCP and never starts its handshake does not hold a shutdown up.
#[tokio::test]
async fn a_silent_tls_client_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path(), &make_ca("silent"));
    let mut h = harness(dir.path()).await;
    let _silent = tokio::net::TcpStream::connect(h.proxy().addr("api").unwrap())
        .await
        .unwrap();
    // Let the listener accept it.
    tokio::task::yield_now().await;
    tokio::time::timeout(std::time::Duration::from_secs(5), h.stop_proxy())
        .await
        .expect("shut down without waiting out the header timeout (30 s)");
}

/// Plain HTTP sent to the HTTPS listener gets a plain-text 400 that says to use https,
/// which curl can show, instead of bytes it cannot read.
#[tokio::test]
async fn plain_http_to_the_https_listener_is_told_to_use_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca("plain");
    write_certs(dir.path(), &ca);
    let h = harness(dir.path()).await;
    let addr = h.proxy().addr("api").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /x HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", addr.port());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("content-type: text/plain"), "{answer}");
    let port = addr.port();
    assert!(
        answer.contains(&format!("use https://localhost:{port}/")),
        "{answer}"
    );
    // TLS clients are served as before.
    let stream = connect(&h, &ca, &[b"http/1.1"]).await;
    let (status, _) = get_over(stream, false).await;
    assert_eq!(status, 200);
}
