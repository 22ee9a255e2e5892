//! Heap allocations per proxied request, counted by a counting allocator: a client sends N GETs
//! on one keep-alive connection straight to a plain HTTP upstream (in this process), then N
//! through tollgate (client_credentials from the simulated identity server) to the same
//! upstream; the difference, divided by N, is what tollgate allocates for one request (client
//! and upstream cost the same in both runs). Bytes likewise.
//!
//! `cargo bench --bench allocations` (`N=…` for another count than 5,000).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use tollgate::config::Config;
use tollgate::Proxy;
use tollgate_sim::identity::{IdentityConfig, IdentitySim};

/// The system allocator, counting allocations (a realloc counts as one) and their bytes.
struct Counting;

static CALLS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn counted() -> (u64, u64) {
    (CALLS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed))
}

/// A plain HTTP/1.1 upstream answering every request with a small 200.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"{\"ok\":true}\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// One GET, its body read to the end.
async fn one(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, addr: SocketAddr) {
    send.ready().await.unwrap();
    let request = http::Request::get("/api/items?id=1")
        .header(http::header::HOST, addr.to_string())
        .body(Full::default())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

/// `n` GETs of `/api/items?id=1` on one keep-alive connection to `addr`: the allocations and
/// bytes they took, in all of this process.
async fn requests(addr: SocketAddr, n: u64) -> (u64, u64) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    // Warm: connections, pools and the token in place.
    for _ in 0..200 {
        one(&mut send, addr).await;
    }
    let (calls, bytes) = counted();
    for _ in 0..n {
        one(&mut send, addr).await;
    }
    let (calls_after, bytes_after) = counted();
    (calls_after - calls, bytes_after - bytes)
}

fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (identity, _id_server) = IdentitySim::start(IdentityConfig::default()).await;
        let upstream = upstream().await;
        let state = tempfile::tempdir().unwrap();
        let config = format!(
            "[state]\nstore = \"file:{}\"\n\n[[upstream]]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\nurl = \"http://{upstream}/api\"\n\n[upstream.auth]\ngrant = \"client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n",
            state.path().join("state").display(),
            identity.token_url(),
            identity.config().client_id,
            identity.config().client_secret,
        );
        let config = Config::parse(&config, "bench.toml", |_| None).unwrap();
        let proxy = Proxy::start(&config).await.unwrap();
        let listener = proxy.addr("bench").unwrap();

        let direct = requests(upstream, n).await;
        let proxied = requests(listener, n).await;
        let per = |total: u64| total as f64 / n as f64;
        println!("allocations per request, {n} GETs on one keep-alive connection:");
        println!(
            "  straight to the upstream:  {:>7.1} allocations, {:>8.0} bytes (client and upstream)",
            per(direct.0),
            per(direct.1)
        );
        println!(
            "  through tollgate:          {:>7.1} allocations, {:>8.0} bytes",
            per(proxied.0),
            per(proxied.1)
        );
        println!(
            "  tollgate's own:            {:>7.1} allocations, {:>8.0} bytes",
            per(proxied.0.saturating_sub(direct.0)),
            per(proxied.1.saturating_sub(direct.1))
        );
        proxy.shutdown().await;
    });
}
