//! `[upstream.limits]`: a slow client is cut off at the header timeout while others are
//! served, an oversized head gets 431, the connection cap holds new connections back, and
//! past `max_upstream_connections` a request waits, then gets 503.

use crate::common;

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

/// The header timeout counts from the end of the connection's last request: a connection
/// asked again and again, each time within the timeout, stays open for longer than the
/// timeout, and closes once one passes without a head.
#[tokio::test]
async fn the_header_timeout_counts_from_the_last_request() {
    let h = harness("header_timeout = \"400ms\"").await;
    let mut stream = connect(&h).await;
    let first = Instant::now();
    for i in 0..6 {
        let answer = request(&mut stream, &format!("/again/{i}")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(first.elapsed() >= Duration::from_millis(1200));
    let last = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed after the timeout");
    assert_eq!(closed.unwrap_or(0), 0);
    // 200 ms of the timeout had passed at `last`.
    assert!(
        last.elapsed() >= Duration::from_millis(150),
        "{:?}",
        last.elapsed()
    );
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

/// Send a POST head announcing `length` bytes of body, then `sent` of them.
async fn start_upload(h: &Harness, length: usize, sent: &[u8]) -> TcpStream {
    let mut stream = connect(h).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    stream
}

/// Read what the proxy answers on `stream` until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A body trickled a byte every 300 ms averages far below `min_body_rate`: once the 5 s of
/// grace are over, it gets 408 and its connection is closed, although no pause between two
/// reads reached `body_timeout`. Other requests are served meanwhile, and nothing of the slow
/// one reaches the upstream. Both ways: a body kept for a replay, and one streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_below_the_minimum_rate_gets_408_after_the_grace() {
    for retry_on in ["[401]", "[]"] {
        let h = Harness::start(Setup {
            extra_upstream: format!("retry_on = {retry_on}"),
            extra_tables: "[upstream.limits]\nbody_timeout = \"10s\"\nmin_body_rate = \"240B\""
                .into(),
            ..Setup::default()
        })
        .await;
        let before = h.api.counters().requests;
        let started = Instant::now();
        let mut slow = start_upload(&h, 1000, b"x").await;
        let trickle = tokio::spawn(async move {
            // A byte every 300 ms, until the proxy answers (looked for before each write, so
            // no write meets a closed connection and loses the answer to a reset).
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut probe = [0u8; 1];
                let answered =
                    tokio::time::timeout(Duration::from_millis(1), slow.peek(&mut probe)).await;
                if answered.is_ok() || slow.write_all(b"x").await.is_err() {
                    return read_to_close(&mut slow).await;
                }
            }
        });
        // Others are served while it trickles.
        assert_eq!(h.get("/other").await.status, 200);
        let answer = trickle.await.unwrap();
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{retry_on}: {answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("limits.min_body_rate"), "{answer}");
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(7),
            "{retry_on}: ended after {took:?}"
        );
        // The streamed one reached the upstream with its head; the kept one never did.
        if retry_on == "[401]" {
            assert_eq!(h.api.counters().requests, before + 1, "only /other");
        }
    }
}

/// A body that stops arriving gets 408 after `body_timeout` (here with no minimum rate),
/// within a second of it.
#[tokio::test]
async fn a_body_that_stops_gets_408_after_the_body_timeout() {
    let h = harness("body_timeout = \"1s\"\nmin_body_rate = \"0B\"").await;
    let started = Instant::now();
    let mut slow = start_upload(&h, 100, b"half of it").await;
    let answer = read_to_close(&mut slow).await;
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("limits.body_timeout"), "{answer}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "ended after {took:?}"
    );
}

/// What `/proc/PID/status` says of `field` (`VmRSS`, `VmHWM`), in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The peak RSS growth, in MiB, of a tollgate process with `max_buffered` while 150 clients
/// send a 1 MiB body each at once to an upstream that takes 2 s to read them. The process
/// continues the harness's lineage in its state directory (the harness's proxy is stopped).
async fn peak_growth_with(h: &Harness, max_buffered: &str) -> u64 {
    let text = h.config_text.replace(
            "[upstream.auth]",
            &format!("retry_body_limit = \"2MiB\"\n\n[upstream.limits]\nmax_buffered = \"{max_buffered}\"\n\n[upstream.auth]"),
        );
    let spawned = common::spawn_serve(&h.write_config("limits.toml", &text));
    let url = format!("http://{}/upload?sim_delay_ms=2000", spawned.addr);
    assert_eq!(common::get(url.replace("2000", "0")).await.status, 200);
    let pid = spawned.child.id();
    let before = memory_kib(pid, "VmRSS");
    let body = bytes::Bytes::from(vec![7u8; 1024 * 1024]);
    let uploads: Vec<_> = (0..150)
        .map(|_| {
            let request = http::Request::post(&url)
                .body(http_body_util::Full::new(body.clone()))
                .unwrap();
            let client = h.client.clone();
            tokio::spawn(async move { client.request(request).await.unwrap().status() })
        })
        .collect();
    for upload in uploads {
        assert_eq!(upload.await.unwrap(), 200);
    }
    (memory_kib(pid, "VmHWM").saturating_sub(before)) / 1024
}

/// 150 bodies of 1 MiB at once on their way to a slow upstream: with `max_buffered` the
/// bodies kept for a replay stay within it, and the rest stream; the process's peak RSS grows
/// by about that much, where an unbounded budget holds every body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_for_a_replay_stay_within_max_buffered() {
    let mut h = Harness::start(Setup::default()).await;
    h.stop_proxy().await;
    let unbounded = peak_growth_with(&h, "1GiB").await;
    let bounded = peak_growth_with(&h, "8MiB").await;
    let default = peak_growth_with(&h, "64MiB").await;
    println!("peak RSS growth, 150 × 1 MiB bodies at once: {unbounded} MiB with max_buffered = 1GiB, {default} MiB with 64MiB (the default), {bounded} MiB with 8MiB");
    assert!(
        unbounded >= 100,
        "the unbounded run held the bodies: {unbounded} MiB"
    );
    // Besides the 8 MiB kept, the streamed bodies in transit: hyper buffers a few hundred KiB
    // of each on its way upstream.
    assert!(bounded <= 8 + 40, "{bounded} MiB");
}
