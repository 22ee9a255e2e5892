//! criterion benches of the per-request pieces of the proxy: the URI rewrite, the header
//! rewrite, the token read from the cache, and the quota's admit decision.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate::config::Config;
use tollgate::config::QuotaConfig;
use tollgate::forward::{self, Target};
use tollgate::quota::{Clock, Quota};
use tollgate::store::{FileStore, StateStore};
use tollgate::token::TokenCache;
use tollgate_sim::identity::{IdentityConfig, IdentitySim};

fn uri_rewrite(c: &mut Criterion) {
    let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let uri: Uri = "/api/acme/Style/Header/42?fields=name&x=1".parse().unwrap();
    let at_root = Target::new(&"https://developers.beproduct.com".parse().unwrap()).unwrap();
    let with_base = Target::new(&"https://erp.example/api/domain/odata".parse().unwrap()).unwrap();
    c.bench_function("uri_rewrite/no_base_path", |b| {
        b.iter(|| {
            at_root
                .rewrite(&Method::GET, black_box(&uri), Version::HTTP_11, local)
                .unwrap()
        })
    });
    c.bench_function("uri_rewrite/base_path", |b| {
        b.iter(|| {
            with_base
                .rewrite(&Method::GET, black_box(&uri), Version::HTTP_11, local)
                .unwrap()
        })
    });
    let dotted: Uri = "/api/acme/files/report.v2.pdf?x=%20y".parse().unwrap();
    c.bench_function("uri_rewrite/path_with_dots_and_escapes", |b| {
        b.iter(|| {
            at_root
                .rewrite(&Method::GET, black_box(&dotted), Version::HTTP_11, local)
                .unwrap()
        })
    });
}

fn header_rewrite(c: &mut Criterion) {
    let target = Target::new(&"https://developers.beproduct.com".parse().unwrap()).unwrap();
    let mut token =
        HeaderValue::from_static("Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.payload.signature");
    token.set_sensitive(true);
    let mut template = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "curl/8.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("authorization", "Bearer client-own"),
        ("connection", "keep-alive"),
    ] {
        template.insert(k, v.parse().unwrap());
    }
    c.bench_function("header_rewrite/typical_request", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| forward::rewrite_request_headers(h, Version::HTTP_11, &target, &token),
            criterion::BatchSize::SmallInput,
        )
    });
}

fn token_read(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (cache, _identity, _server, _state) = runtime.block_on(async {
        let (identity, server) = IdentitySim::start(IdentityConfig::default()).await;
        let state = tempfile::tempdir().unwrap();
        let text = format!(
            "[state]\nstore = \"file:{}\"\n[[upstream]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1:1\"\n[upstream.auth]\ngrant = \"client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"tollgate-test\"\nclient_secret = \"s3cret\"\n",
            state.path().display(),
            identity.token_url()
        );
        let config = Config::parse(&text, "bench", |_| None).unwrap();
        let store = tollgate::store::open(&config.state).unwrap();
        let cache = Arc::new(TokenCache::new(&config.upstreams[0], store, &Default::default()).unwrap());
        cache.get().await.unwrap();
        (cache, identity, server, state)
    });
    c.bench_function("token_read/cached_one_thread", |b| {
        b.iter(|| black_box(cache.cached()).unwrap())
    });
    // Two threads reading at once: the read takes no lock, so it must not collapse.
    c.bench_function("token_read/cached_two_threads", |b| {
        b.iter_custom(|iters| {
            let other = Arc::clone(&cache);
            let handle = std::thread::spawn(move || {
                for _ in 0..iters {
                    black_box(other.cached()).unwrap();
                }
            });
            let start = std::time::Instant::now();
            for _ in 0..iters {
                black_box(cache.cached()).unwrap();
            }
            let elapsed = start.elapsed();
            handle.join().unwrap();
            elapsed
        })
    });
}

/// One admit decision, polled once: the fast path never waits, so it is ready at once; a
/// pending one (the lease being topped up) is finished on the runtime.
fn admit(quota: &Quota, runtime: &tokio::runtime::Handle) {
    let mut spend = std::pin::pin!(quota.spend(None, "-"));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match spend.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => {
            black_box(r.unwrap());
        }
        std::task::Poll::Pending => {
            black_box(runtime.block_on(spend).unwrap());
        }
    }
}

fn quota_admit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let _entered = runtime.enter();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(FileStore::open(state.path()).unwrap());
    let none = Quota::new(
        "b",
        None,
        Default::default(),
        Arc::clone(&store),
        Clock::system(),
    );
    // Limits far above what the bench spends, so every decision is an admit.
    let config: QuotaConfig =
        toml::from_str("per_day = 4000000000\nper_minute = 4000000000").unwrap();
    let quota = Arc::new(Quota::new(
        "b",
        Some(&config),
        Default::default(),
        store,
        Clock::system(),
    ));
    c.bench_function("quota_admit/no_quota", |b| b.iter(|| admit(&none, &handle)));
    let window = quota.windows()[0];
    c.bench_function("quota_headers/add_five", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::with_capacity(8);
            tollgate::quota::add_headers(&mut headers, black_box(&window));
            headers
        })
    });
    c.bench_function("quota_admit/day_and_minute_one_thread", |b| {
        b.iter(|| admit(&quota, &handle))
    });
    // Two threads admitting at once share the counters: it must not collapse.
    c.bench_function("quota_admit/day_and_minute_two_threads", |b| {
        b.iter_custom(|iters| {
            let (other, other_handle) = (Arc::clone(&quota), handle.clone());
            let thread = std::thread::spawn(move || {
                let _entered = other_handle.enter();
                for _ in 0..iters {
                    admit(&other, &other_handle);
                }
            });
            let start = std::time::Instant::now();
            for _ in 0..iters {
                admit(&quota, &handle);
            }
            let elapsed = start.elapsed();
            thread.join().unwrap();
            elapsed
        })
    });
}

criterion_group!(
    benches,
    uri_rewrite,
    header_rewrite,
    token_read,
    quota_admit
);
criterion_main!(benches);
