//! `[upstream.limits]`: a slow client is cut off at the header timeout while others are
//! served, an oversized head gets 431, the connection cap holds new connections back, and
//! past `max_upstream_connections` a request waits, then gets 503.

mod common;

use common::{Harness, Setup};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn harness(limits: &str) -> Harness {
    Harness::start(Setup {
        extra_tables: format!("[upstream.limits]\n{limits}"),
        ..Setup::default()
    })
    .await
}

async fn connect(h: &Harness) -> TcpStream {
    TcpStream::connect(h.proxy().addr("api").unwrap())
        .await
        .unwrap()
}

/// Send one keep-alive GET and read its response head (and small body).
async fn request(stream: &mut TcpStream, path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_slow_client_is_cut_off_at_the_header_timeout_while_others_are_served() {
    let h = harness("header_timeout = \"300ms\"").await;
    let mut slow = connect(&h).await;
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(h.get("/meanwhile").await.status, 200);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("closed within the timeout");
    let n = read.unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        h.api.counters().requests,
        1,
        "the slow request never went upstream"
    );

    // An idle keep-alive connection is closed after the same time.
    let mut idle = connect(&h).await;
    assert!(request(&mut idle, "/then-idle")
        .await
        .starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("idle connection closed");
    assert_eq!(closed.unwrap_or(0), 0);
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let h = harness("max_header_size = \"16KiB\"").await;
    let mut stream = connect(&h).await;
    let big = "x".repeat(40 * 1024);
    let head = format!("GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(h.api.counters().requests, 0);
    // A normal request is still fine.
    assert_eq!(h.get("/small").await.status, 200);
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let h = harness("max_connections = 2").await;
    let mut first = connect(&h).await;
    let mut second = connect(&h).await;
    assert!(request(&mut first, "/one")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(request(&mut second, "/two")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut third = connect(&h).await;
    third
        .write_all(b"GET /three HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let waited = tokio::time::timeout(Duration::from_millis(400), third.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the third connection is not served while two are open"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// A client that connects and says nothing loses its place at the header timeout, so silent
/// sockets cannot hold the connection cap.
#[tokio::test]
async fn a_silent_connection_is_closed_and_frees_its_place() {
    let h = harness("header_timeout = \"300ms\"\nmax_connections = 1").await;
    let mut silent = connect(&h).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed");
    assert_eq!(read.unwrap_or(0), 0);
    assert_eq!(h.get("/after").await.status, 200);
}

/// With two workers sharing a cap of one, connections arriving at either worker's socket are
/// served in turn: no worker sits on the only place while another has a client waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_is_shared_by_the_workers_without_stalling() {
    let mut h = harness("max_connections = 1").await;
    h.stop_proxy().await;
    let proxy = tollgate::Proxy::start_with_workers(&h.config(), 2)
        .await
        .unwrap();
    let addr = proxy.addr("api").unwrap();
    for i in 0..12 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET /c{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not served"))
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{i}");
    }
    proxy.shutdown().await;
}

/// An HTTP/2 connection with no stream open is closed after the header timeout, though its
/// client answers pings; one with a request in flight longer than that is not.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_not_one_with_a_request_in_flight() {
    use http_body_util::{BodyExt, Full};
    let h = harness("header_timeout = \"300ms\"").await;
    let stream = connect(&h).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let url = format!(
        "http://{}/api/v1/slow?sim_delay_ms=700",
        h.proxy().addr("api").unwrap()
    );
    let response = send
        .send_request(http::Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("a request longer than the idle time is answered");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    // The connection was not told to go away while the request was in flight.
    let url = format!("http://{}/api/v1/next", h.proxy().addr("api").unwrap());
    let next = send
        .send_request(http::Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("the connection is still open");
    assert_eq!(next.status(), 200);
    next.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle connection is closed");
    assert!(ended.unwrap().is_ok(), "closed cleanly (GOAWAY)");
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(250), "{idle:?}");
}

/// With `max_upstream_connections = 1`, a download whose client stops reading holds the
/// only upstream connection; the next request waits for it for the upstream's `timeout`,
/// then gets a 503 that names the limit. Once the download is read, requests flow again on
/// the same connection.
#[tokio::test]
async fn a_request_past_the_upstream_connections_waits_then_gets_503() {
    let h = Harness::start(Setup {
        extra_upstream: "timeout = \"500ms\"".into(),
        extra_tables: "[upstream.limits]\nmax_upstream_connections = 1".into(),
        ..Setup::default()
    })
    .await;
    let size = 64 * 1024 * 1024;
    let mut download = connect(&h).await;
    let head = format!("GET /file?sim_download={size} HTTP/1.1\r\nHost: t\r\n\r\n");
    download.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = download.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    let busy = h.get("/meanwhile").await;
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(
        busy.text().contains("limits.max_upstream_connections"),
        "{}",
        busy.text()
    );
    assert_eq!(busy.json()["type"], "urn:tollgate:problem:upstream-busy");
    assert_eq!(busy.header("retry-after"), "1");

    let mut read = n;
    while read < size {
        let n = download.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download ended early");
        read += n;
    }
    assert_eq!(h.get("/after").await.status, 200);
    assert_eq!(
        h.api.counters().requests,
        2,
        "the refused request never went upstream"
    );
}
