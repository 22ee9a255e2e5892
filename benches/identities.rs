//! What identities cost: one upstream started with 0 and with N `[[upstream.identity]]`
//! tables (N = 1,000 unless `IDENTITIES` says otherwise), each with a seed and a named inbound
//! key of its own (`NO_KEYS=1`: identities alone, no keys; `LIMITS=1`: each identity with limits
//! of its own, ERP.net's 600 a minute, 1 in flight and 5 waiting). Prints the start time and the heap
//! each identity holds (a counting allocator; resident memory beside it), then sends one request
//! as each of the first 100 identities through the simulated identity server and API, and
//! prints what a used identity adds. `cargo bench --bench identities`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tollgate::config::Config;
use tollgate::Proxy;
use tollgate_sim::api::ApiSim;
use tollgate_sim::identity::{IdentityConfig, IdentitySim};

/// The system allocator, counting the bytes allocated and not yet freed: what is live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes live now, in KiB.
fn live_kib() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / 1024.0
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn config(n: usize, identity: &IdentitySim, api_url: &str, state: &std::path::Path) -> String {
    let mut text = format!(
        "[state]\nstore = \"file:{}\"\n\n[[upstream]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nurl = \"{api_url}\"\n\n[upstream.auth]\ngrant = \"refresh_token\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\n",
        state.display(),
        identity.token_url(),
        identity.config().client_id,
        identity.config().client_secret,
        identity.issue_refresh_token(),
    );
    if std::env::var_os("LIMITS").is_some() {
        text.push_str(
            "\n[upstream.quota.per_identity]\nper_minute = 600\nconcurrency = 1\nqueue = 5\n",
        );
    }
    if n > 0 && std::env::var_os("NO_KEYS").is_none() {
        text.push_str("\n[upstream.inbound]\nkeys = [\n");
        for i in 0..n {
            text.push_str(&format!(
                "  {{ name = \"k{i}\", key = \"key-of-identity-{i:06}\", identity = \"user-{i}\" }},\n"
            ));
        }
        text.push_str("]\n");
    }
    for i in 0..n {
        text.push_str(&format!(
            "\n[[upstream.identity]]\nname = \"user-{i}\"\nrefresh_token = \"{}\"\n",
            identity.issue_refresh_token()
        ));
    }
    text
}

/// A proxy with `n` identities: how long its start took, and the heap it holds beyond the
/// parsed config (KiB).
async fn start(
    n: usize,
    identity: &IdentitySim,
    api_url: &str,
) -> (Proxy, Duration, f64, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let text = config(n, identity, api_url, &state.path().join("state"));
    let config = Config::parse(&text, "bench.toml", |_| None).unwrap();
    drop(text);
    let before = live_kib();
    let started = Instant::now();
    let proxy = Proxy::start(&config).await.unwrap();
    let took = started.elapsed();
    drop(config);
    (proxy, took, live_kib() - before, state)
}

fn main() {
    let n: usize = std::env::var("IDENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (identity, _id_server) = IdentitySim::start(IdentityConfig::default()).await;
        let api = ApiSim::new(identity.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_server = api.serve(listener).await;
        let api_url = api_server.url();

        // Warm the allocator and the runtime with a start of the same shape.
        let (warm, _, _, _w) = start(10, &identity, &api_url).await;
        warm.shutdown().await;

        let asked_before = identity.counters().token_requests;
        let rss_before = rss_kib();
        let (none, none_took, none_heap, _s0) = start(0, &identity, &api_url).await;
        let rss_none = rss_kib();
        let (many, many_took, many_heap, _s1) = start(n, &identity, &api_url).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss_many = rss_kib();
        let asked = identity.counters().token_requests - asked_before;
        println!("identities: {n} on one upstream");
        println!(
            "  start with 0 identities:    {:>7.1} ms, heap held {:>8.1} KiB (resident +{} KiB)",
            none_took.as_secs_f64() * 1e3,
            none_heap,
            rss_none.saturating_sub(rss_before)
        );
        println!(
            "  start with {n} identities: {:>7.1} ms, heap held {:>8.1} KiB (resident +{} KiB)",
            many_took.as_secs_f64() * 1e3,
            many_heap,
            rss_many.saturating_sub(rss_none)
        );
        println!(
            "  per identity, unused:       {:>7.2} KiB of heap; token requests at the two starts: {} (the upstreams' own)",
            (many_heap - none_heap) / n as f64,
            asked
        );

        // One request as each of the first 100 identities: each fetches its first token (a
        // token request, and a record saved with fsync). Without keys no request reaches an
        // identity.
        let used = if std::env::var_os("NO_KEYS").is_some() { 0 } else { n.min(100) };
        let client = reqwest::Client::new();
        let addr = many.addr("api").unwrap();
        let before_use = live_kib();
        let sent = Instant::now();
        for i in 0..used {
            let answer = client
                .get(format!("http://{addr}/as/{i}"))
                .bearer_auth(format!("key-of-identity-{i:06}"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
        let took = sent.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if used == 0 {
            many.shutdown().await;
            none.shutdown().await;
            return;
        }
        println!(
            "  first request as {used} identities: {:>7.1} ms in all, {:.2} ms each (a token request each)",
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3 / used as f64
        );
        println!(
            "  per identity, used:         {:>7.2} KiB more heap (its token, record, refresh-ahead loop)",
            (live_kib() - before_use) / used as f64
        );
        many.shutdown().await;
        none.shutdown().await;
    });
}
