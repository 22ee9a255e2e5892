//! HTTPS upstreams: a private CA given through `ca_file` is trusted, and without it the
//! upstream's certificate is refused (502), so tokens never go to an unverified host.

use crate::common;

use common::certs::{make_ca, make_self_signed_ca, TestCa};
use common::{Harness, Setup};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Terminate TLS on a loopback port and pass the plain bytes to `backend`.
async fn tls_front(
    ca: &TestCa,
    backend: std::net::SocketAddr,
    alpn: &[u8],
) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ca.cert_der.clone().into()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(ca.key_der.clone().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// The harness config pointed at `front` over HTTPS, trusting the test CA when `trust` is set.
fn https_config(
    h: &Harness,
    ca: &TestCa,
    front: std::net::SocketAddr,
    trust: bool,
) -> tollgate::config::Config {
    let plain_url = format!("{}/api/v1", h.api_server.url());
    let https_url = format!("https://localhost:{}/api/v1", front.port());
    let mut text = h.config_text.replace(&plain_url, &https_url);
    if trust {
        let ca_path = h.state.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.ca_pem).unwrap();
        let ca_line = format!("ca_file = \"{}\"\n\n[upstream.auth]", ca_path.display());
        text = text.replace("[upstream.auth]", &ca_line);
    }
    common::parse(&text)
}

/// With the test CA in `ca_file`, requests reach the HTTPS upstream with the token; without
/// it, the certificate is not trusted and the client gets 502.
#[tokio::test]
async fn https_upstream_with_private_ca() {
    let ca = make_ca("upstream");
    let h = Harness::start(Setup::default()).await;
    let front = tls_front(&ca, h.api_server.addr, b"http/1.1").await;
    for (trust, expect) in [(true, 200), (false, 502)] {
        let config = https_config(&h, &ca, front, trust);
        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        let url = format!("http://{}/secure?x=1", proxy.addr("api").unwrap());
        let req = http::Request::get(url)
            .body(http_body_util::Full::default())
            .unwrap();
        let a = common::collect(h.client.request(req).await.unwrap()).await;
        assert_eq!(a.status, expect, "{}", String::from_utf8_lossy(&a.body));
        if expect == 200 {
            assert_eq!(a.json()["path"], "/api/v1/secure");
            assert_eq!(
                a.echoed_header("host"),
                vec![format!("localhost:{}", front.port())]
            );
            assert!(a.echoed_header("authorization")[0].starts_with("Bearer at_"));
        } else {
            assert!(
                a.json()["detail"].as_str().unwrap().contains("certificate"),
                "{:?}",
                a.json()
            );
        }
        proxy.shutdown().await;
    }
}

/// An upstream that offers only h2 by ALPN is spoken to in HTTP/2.
#[tokio::test]
async fn https_upstream_over_http2() {
    let ca = make_ca("upstream");
    let h = Harness::start(Setup::default()).await;
    let front = tls_front(&ca, h.api_server.addr, b"h2").await;
    let config = https_config(&h, &ca, front, true);
    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let a = common::get(format!("http://{}/over-h2", proxy.addr("api").unwrap())).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["path"], "/api/v1/over-h2");
    assert!(a.echoed_header("authorization")[0].starts_with("Bearer at_"));
    proxy.shutdown().await;
}

/// A body that stops on its way to an HTTP/2 upstream gets 408 too, although HTTP/2 resets
/// the upstream stream without passing the body's error on.
#[tokio::test]
async fn a_body_that_stops_on_its_way_to_an_http2_upstream_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = make_ca("upstream");
    let h = Harness::start(Setup {
        extra_upstream: "retry_on = []".into(),
        extra_tables: "[upstream.limits]\nbody_timeout = \"1s\"\nmin_body_rate = \"0B\"".into(),
        ..Setup::default()
    })
    .await;
    let front = tls_front(&ca, h.api_server.addr, b"h2").await;
    let config = https_config(&h, &ca, front, true);
    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.addr("api").unwrap())
        .await
        .unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nten bytes!")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("limits.body_timeout"), "{answer}");
    proxy.shutdown().await;
}

/// An API whose certificate is a self-signed CA used as its own server certificate: the 502
/// says in words what is wrong and what to do; an untrusted one says to set ca_file.
#[tokio::test]
async fn a_ca_used_as_its_own_server_certificate_is_explained() {
    let h = Harness::start(Setup::default()).await;
    for (ca, trust, expected) in [
        (
            make_self_signed_ca(),
            true,
            "a CA certificate used as its own server certificate",
        ),
        (
            make_ca("upstream"),
            false,
            "not signed by a CA this machine trusts",
        ),
    ] {
        let front = tls_front(&ca, h.api_server.addr, b"http/1.1").await;
        let config = https_config(&h, &ca, front, trust);
        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        let a = common::get(format!("http://{}/x", proxy.addr("api").unwrap())).await;
        assert_eq!(a.status, 502, "{}", String::from_utf8_lossy(&a.body));
        let detail = a.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(expected), "{detail}");
        assert!(detail.contains("ca_file"), "{detail}");
        proxy.shutdown().await;
    }
}

/// `config` with `pin_sha256 = pin` on its upstream.
fn pinned(config: &tollgate::config::Config, pin: &str) -> tollgate::config::Config {
    let mut config = config.clone();
    config.upstreams[0].pin_sha256 = Some(pin.to_owned());
    config
}

/// With pin_sha256, the one certificate whose key it names is trusted for the upstream's host
/// whatever its issuer and names: a self-signed CA serving as its own server certificate, or
/// a certificate for another host. The token still reaches the API.
#[tokio::test]
async fn a_pinned_certificate_is_trusted_whatever_its_issuer_and_name() {
    let h = Harness::start(Setup::default()).await;
    let self_signed = make_self_signed_ca();
    let other_name = common::certs::make_ca_for("upstream", &["api.elsewhere.example"]);
    for ca in [&self_signed, &other_name] {
        let front = tls_front(ca, h.api_server.addr, b"http/1.1").await;
        let config = pinned(&https_config(&h, ca, front, false), &ca.pin());
        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        let a = common::get(format!("http://{}/pinned", proxy.addr("api").unwrap())).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["path"], "/api/v1/pinned");
        assert!(a.echoed_header("authorization")[0].starts_with("Bearer at_"));
        proxy.shutdown().await;
    }
}

/// Another key than the pinned one is refused, even one a trusted CA signed for the right
/// name: the 502 names the key presented and the pin expected. Without a pin, a certificate
/// rustls refuses is explained with the pin that would trust it.
#[tokio::test]
async fn a_key_that_is_not_the_pinned_one_is_refused_and_named() {
    let h = Harness::start(Setup::default()).await;
    let served = make_ca("upstream");
    let front = tls_front(&served, h.api_server.addr, b"http/1.1").await;
    let other = make_ca("another");
    // ca_file trusts the served certificate; the pin names another key: the pin wins.
    let config = pinned(&https_config(&h, &served, front, true), &other.pin());
    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let a = common::get(format!("http://{}/x", proxy.addr("api").unwrap())).await;
    assert_eq!(a.status, 502, "{}", String::from_utf8_lossy(&a.body));
    let detail = a.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("not the pinned one"), "{detail}");
    assert!(detail.contains(&served.pin()), "{detail}");
    assert!(detail.contains(&other.pin()), "{detail}");
    assert_eq!(h.api.counters().requests, 0, "nothing reached the API");
    proxy.shutdown().await;

    let self_signed = make_self_signed_ca();
    let front = tls_front(&self_signed, h.api_server.addr, b"http/1.1").await;
    let proxy = tollgate::Proxy::start(&https_config(&h, &self_signed, front, false))
        .await
        .unwrap();
    let a = common::get(format!("http://{}/x", proxy.addr("api").unwrap())).await;
    assert_eq!(a.status, 502);
    let detail = a.json()["detail"].as_str().unwrap().to_owned();
    let offer = format!("pin_sha256 = \"{}\"", self_signed.pin());
    assert!(detail.contains(&offer), "{detail}");
    proxy.shutdown().await;
}

/// An on-premise server whose identity server shares its host and its self-signed
/// certificate: the pin covers the token endpoint too.
#[tokio::test]
async fn the_pin_covers_a_token_endpoint_on_the_same_host() {
    let mut h = Harness::start(Setup::default()).await;
    h.stop_proxy().await;
    let ca = make_self_signed_ca();
    let api = tls_front(&ca, h.api_server.addr, b"http/1.1").await;
    let identity_addr: std::net::SocketAddr = h
        .identity
        .token_url()
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let identity = tls_front(&ca, identity_addr, b"http/1.1").await;
    let mut unpinned = https_config(&h, &ca, api, false);
    let token_url = format!("https://localhost:{}/token", identity.port());
    unpinned.upstreams[0].auth.token_url = token_url.parse().unwrap();
    unpinned.upstreams[0].auth.refresh_wait = std::time::Duration::from_millis(500);

    // Without the pin, the token endpoint's certificate is refused, and the 503 says how
    // to trust it.
    let proxy = tollgate::Proxy::start(&unpinned).await.unwrap();
    let a = common::get(format!("http://{}/no-token", proxy.addr("api").unwrap())).await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    let detail = a.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains(&format!("pin_sha256 = \"{}\"", ca.pin())),
        "{detail}"
    );
    proxy.shutdown().await;

    let config = pinned(&unpinned, &ca.pin());
    let proxy = tollgate::Proxy::start(&config).await.unwrap();
    let a = common::get(format!("http://{}/with-token", proxy.addr("api").unwrap())).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(h.identity.counters().token_requests >= 1);
    proxy.shutdown().await;
}
