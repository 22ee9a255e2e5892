//! Forwarding: what reaches the upstream, what is refused before it, and upstream failures.

use crate::common;

use bytes::Bytes;
use common::{Harness, Setup};
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The API sees tollgate's token instead of the client's, the base path and query are kept,
/// Host is the upstream's and Via is added.
#[tokio::test]
async fn injects_token_and_keeps_base_path_and_query() {
    let h = Harness::start(Setup::default()).await;
    let request = Request::get(h.url("/Style/Header/42?fields=name&x=%20y"))
        .header("authorization", "Bearer client-own-credential")
        .header("x-custom", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .body(Full::default())
        .unwrap();
    let a = h.send(request).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let echo = a.json();
    assert_eq!(echo["path"], "/api/v1/Style/Header/42");
    assert_eq!(echo["query"], "fields=name&x=%20y");
    let auth = a.echoed_header("authorization");
    assert_eq!(auth.len(), 1, "{auth:?}");
    assert!(auth[0].starts_with("Bearer at_"), "{auth:?}");
    assert!(h
        .identity
        .validate_access(auth[0].strip_prefix("Bearer ").unwrap())
        .is_ok());
    assert_eq!(a.echoed_header("host"), vec![h.api_server.addr.to_string()]);
    assert_eq!(a.echoed_header("via"), vec!["1.1 tollgate".to_owned()]);
    assert_eq!(a.echoed_header("x-custom"), vec!["kept".to_owned()]);
    assert!(a.echoed_header("x-hop").is_empty());
    assert!(a.echoed_header("connection").is_empty());
}

/// Requests and responses keep their method, status, and end-to-end headers both ways.
#[tokio::test]
async fn passes_status_and_headers_through() {
    let h = Harness::start(Setup::default()).await;
    let request = Request::put(h.url("/thing?sim_status=201"))
        .header("continuepath", "/app/next?page=2")
        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
        .unwrap();
    let a = h.send(request).await;
    assert_eq!(a.status, 201);
    assert_eq!(a.json()["method"], "PUT");
    assert_eq!(a.json()["body"], "{\"a\":1}");
    assert_eq!(
        a.echoed_header("continuepath"),
        vec!["/app/next?page=2".to_owned()]
    );
}

/// Send raw bytes to the proxy and read the whole answer (the proxy closes after it).
async fn raw(h: &Harness, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(h.proxy().addr("api").unwrap())
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("proxy answers in time")
            .unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n")
            && String::from_utf8_lossy(&out).contains("\"upstream\"")
        {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// TRACE and TRACK would come back from an upstream that reflects them (Apache does by
/// default) with the injected bearer token in the echoed headers: they get 405 with an `Allow`
/// that lists the methods forwarded, and never reach the upstream; those methods all do.
#[tokio::test]
async fn trace_and_track_get_405_and_never_reach_the_upstream() {
    let h = Harness::start(Setup::default()).await;
    let before = h.api.counters().requests;
    for method in ["TRACE", "TRACK", "DEBUG"] {
        let reply = raw(
            &h,
            &format!("{method} /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 405"), "{method}: {reply}");
        assert!(
            reply.contains("allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"),
            "{method}: {reply}"
        );
        assert!(reply.contains("application/problem+json"), "{reply}");
        assert!(!reply.to_lowercase().contains("bearer"), "{reply}");
    }
    assert_eq!(
        h.api.counters().requests,
        before,
        "nothing reached the upstream"
    );
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let reply = raw(
            &h,
            &format!("{method} /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(!reply.starts_with("HTTP/1.1 405"), "{method}: {reply}");
    }
    assert_eq!(
        h.api.counters().requests,
        before + 7,
        "every allowed method is forwarded"
    );
}

/// Path escapes, CONNECT and absolute-form requests for another host are refused with
/// problem+json, and none of them reaches the upstream.
#[tokio::test]
async fn refuses_escapes_connect_and_forward_proxy_requests_before_the_upstream() {
    let h = Harness::start(Setup::default()).await;
    let before = h.api.counters().requests;
    for path in [
        "/../secret",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a%2fb",
        "/a%5C..",
        "/a/./b",
    ] {
        let reply = raw(
            &h,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
        assert!(
            reply.contains("application/problem+json"),
            "{path}: {reply}"
        );
    }
    let reply = raw(
        &h,
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 405") || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );
    let reply = raw(
        &h,
        "GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("not a forward proxy"), "{reply}");
    assert_eq!(
        h.api.counters().requests,
        before,
        "nothing reached the upstream"
    );

    // An absolute-form request that names the proxy itself is fine.
    let addr = h.proxy().addr("api").unwrap();
    let reply = raw(
        &h,
        &format!("GET http://{addr}/ok HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// An upstream that is down gives 502, one that is too slow gives 504, both problem+json.
#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let h = Harness::start(Setup {
        extra_upstream: "timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let slow = h.get("/slow?sim_delay_ms=3000").await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.headers["content-type"], "application/problem+json");
    assert_eq!(slow.json()["status"], 504);

    // Point a second proxy at a port where nothing listens.
    let dead = format!("http://127.0.0.1:{}/api", common::free_port());
    let api_url = format!("{}/api/v1", h.api_server.url());
    let text = h.config_text.replace(&api_url, &dead);
    let other = common::replica(&text).await;
    let url = format!("http://{}/x", other.addr("api").unwrap());
    let a = common::collect(
        h.client
            .request(Request::get(url).body(Full::default()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 502);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    assert_eq!(
        a.json()["type"],
        "urn:tollgate:problem:upstream-unreachable"
    );
    other.shutdown().await;
}

/// HTTP/2 with prior knowledge (h2c) works on the same listener as HTTP/1.1.
#[tokio::test]
async fn serves_h2c() {
    let h = Harness::start(Setup::default()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = h2
        .request(
            Request::get(h.url("/h2?x=1"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let a = common::collect(response).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["path"], "/api/v1/h2");
    assert!(a.echoed_header("authorization")[0].starts_with("Bearer at_"));
}

/// A second `serve` cannot silently share a port with a running one through SO_REUSEPORT.
#[tokio::test]
async fn a_busy_port_is_an_error_not_a_shared_listener() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tollgate::server::bind(taken.local_addr().unwrap(), 2).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}

/// A `Location` on the upstream comes back pointing at the proxy; other hosts stay as they
/// are; and a redirect is passed on, never followed.
#[tokio::test]
async fn locations_are_rewritten_and_redirects_not_followed() {
    let h = Harness::start(Setup::default()).await;
    let upstream = format!("{}/api/v1", h.api_server.url());
    let proxy = format!("http://{}", h.proxy().addr("api").unwrap());
    for (sent, expected) in [
        (
            format!("{upstream}/items/2?x=1"),
            format!("{proxy}/items/2?x=1"),
        ),
        ("/api/v1/items/3".to_owned(), "/items/3".to_owned()),
        (
            "https://login.example/api/v1/x".to_owned(),
            "https://login.example/api/v1/x".to_owned(),
        ),
        (
            format!("{}/elsewhere", h.api_server.url()),
            format!("{}/elsewhere", h.api_server.url()),
        ),
    ] {
        let request = http::Request::get(h.url("/items?sim_status=302"))
            .header("x-sim-location", &sent)
            .body(http_body_util::Full::default())
            .unwrap();
        let answer = h.send(request).await;
        assert_eq!(answer.status, 302);
        assert_eq!(answer.header("location"), expected, "for {sent}");
    }
    assert_eq!(h.api.counters().requests, 4, "no redirect was followed");
}
