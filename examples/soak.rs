//! Soak benchmark: tollgate under steady load for a long time while its identity server and its
//! API misbehave on a timer. Not run in CI.
//!
//! ```sh
//! benches/soak.sh                              # 600 s, 16 clients
//! benches/soak.sh 30                           # a quick check
//! cargo run --release --example soak -- SECONDS [CLIENTS]
//! ```
//!
//! One process hosts everything, all on loopback:
//! - an [`IdentitySim`] whose access tokens live 5 s and whose refresh tokens rotate strictly
//!   (presenting a rotated-away refresh token revokes the whole grant);
//! - an [`ApiSim`] that accepts only those access tokens;
//! - tollgate in front of the API (`Proxy::start_with_workers`, 2 workers), grant
//!   `refresh_token` seeded by the identity sim, state in a temporary directory;
//! - CLIENTS tasks sharing one pooled, keep-alive hyper-util client, each sending GETs and
//!   small POSTs through tollgate back to back for SECONDS. A POST's echo must carry its body.
//!
//! Faults, on timers:
//! - every 7 s the API refuses the next 1–3 requests with 401 whatever token they carry:
//!   tollgate must drop that token, refresh, and replay the request;
//! - every 11 s the token endpoint spoils the next token request, in turn: 503, a 2 s delay,
//!   an HTML 200, 503, an HTML 200 (a 30 s run sees the 503 and the delay). A failed refresh-ahead
//!   is retried while the old token is still good; the delayed one outlives the old token, so
//!   requests wait for it.
//!
//! Every fault is one tollgate can hide, so the targets, checked at the end (exit status 1 when
//! one is missed), are:
//! - non-2xx answers, transport errors, POST echoes without their body: 0;
//! - `reuse_detected` and `grants_revoked` at the identity server: 0 (no refresh token was
//!   ever redeemed twice).
//!
//! RSS is reported, not checked: `VmRSS` of this process after the warm-up and at the end
//! (target: flat). It covers the simulators and the clients as well as the proxy.
//!
//! A progress line is printed every 30 s; `RUST_LOG` (default `warn`) shows tollgate's logs on
//! stderr, among them each refresh that a fault made fail.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{interval_at, sleep_until, Instant};
use tollgate::config::Config;
use tollgate::Proxy;
use tollgate_sim::api::ApiSim;
use tollgate_sim::bind_loopback;
use tollgate_sim::identity::{IdentityConfig, IdentitySim, Rotation};

const ACCESS_LIFETIME: Duration = Duration::from_secs(5);
const WORKERS: usize = 2;
const API_FAULT_EVERY: Duration = Duration::from_secs(7);
const IDENTITY_FAULT_EVERY: Duration = Duration::from_secs(11);
const IDENTITY_DELAY: Duration = Duration::from_secs(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Every this many requests a client sends a POST instead of a GET.
const POST_EVERY: u64 = 4;
/// Non-2xx answers and errors printed as they happen (the rest are only counted).
const SHOW_FIRST: u64 = 10;

type LoadClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(600, |s| s.parse().expect("SECONDS"));
    let clients: usize = args.next().map_or(16, |s| s.parse().expect("CLIENTS"));
    let duration = Duration::from_secs(seconds.max(1));
    // Long enough for the first connections, pools and buffers to exist; short runs get less.
    let warm_up = (duration / 6).min(Duration::from_secs(10));

    let identity = IdentitySim::new(IdentityConfig {
        access_lifetime: ACCESS_LIFETIME,
        rotation: Rotation::Strict,
        ..IdentityConfig::default()
    });
    let _identity_server = identity.serve(bind_loopback().await).await;
    let api = ApiSim::new(identity.clone());
    let api_server = api.serve(bind_loopback().await).await;
    let state = tempfile::tempdir().expect("temporary state directory");
    let config_text = config_text(
        identity.config(),
        &state.path().join("state").display().to_string(),
        &identity.token_url(),
        &format!("{}/api/v1", api_server.url()),
        &identity.issue_refresh_token(),
    );
    let config = Config::parse(&config_text, "soak.toml", |_| None).expect("soak config is valid");
    let proxy = Proxy::start_with_workers(&config, WORKERS)
        .await
        .expect("proxy starts");
    let base = format!("http://{}", proxy.addr("api").expect("upstream `api`"));

    println!(
        "soak: {seconds} s, {clients} clients, {WORKERS} proxy workers, access tokens live {} s, strict rotation",
        ACCESS_LIFETIME.as_secs()
    );
    let started = Instant::now();
    let deadline = started + duration;
    let tally = Arc::new(Tally::default());
    let faults = Arc::new(FaultLog::default());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: LoadClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut load = tokio::task::JoinSet::new();
    for id in 0..clients {
        let (client, base, tally) = (client.clone(), base.clone(), Arc::clone(&tally));
        load.spawn(run_client(id, client, base, deadline, tally));
    }
    drop(client);
    let injector = tokio::spawn(inject_faults(
        identity.clone(),
        api.clone(),
        deadline,
        Arc::clone(&faults),
    ));

    sleep_until(started + warm_up).await;
    let rss_start = proc_status_kib("VmRSS");
    let mut last = (started, 0);
    let mut next_progress = started + PROGRESS_EVERY;
    while next_progress < deadline {
        sleep_until(next_progress).await;
        let requests = tally.requests();
        let rate = (requests - last.1) as f64 / last.0.elapsed().as_secs_f64();
        println!(
            "[{:>4} s] {requests} requests, {rate:.0} req/s in the last {} s, non-2xx {}, token requests {}, RSS {}",
            started.elapsed().as_secs(),
            PROGRESS_EVERY.as_secs(),
            tally.non_2xx(),
            identity.counters().token_requests,
            mib(proc_status_kib("VmRSS")),
        );
        last = (Instant::now(), requests);
        next_progress += PROGRESS_EVERY;
    }
    while load.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let _ = injector.await;
    let rss_end = proc_status_kib("VmRSS");

    let pass = report(&Report {
        elapsed,
        tally: &tally,
        faults: &faults,
        identity: &identity,
        api: &api,
        rss_start,
        rss_end,
    });
    if tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .is_err()
    {
        eprintln!("the proxy did not shut down within 10 s");
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The proxy's config, as `tests/it/common` writes it: one upstream `api` on `127.0.0.1:0`.
fn config_text(
    identity: &IdentityConfig,
    state: &str,
    token_url: &str,
    api_url: &str,
    seed: &str,
) -> String {
    format!(
        r#"
[state]
store = "file:{state}"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{api_url}"

[upstream.auth]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
refresh_token = "{seed}"
"#,
        client_id = identity.client_id,
        client_secret = identity.client_secret,
    )
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    gets: AtomicU64,
    posts: AtomicU64,
    /// Non-2xx answers by status.
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// No answer at all: connection refused or reset, or a body cut short.
    transport_errors: AtomicU64,
    /// A POST answered 2xx whose echo did not carry the body sent (a replay that lost it).
    echo_mismatches: AtomicU64,
    slowest_us: AtomicU64,
}

impl Tally {
    fn requests(&self) -> u64 {
        self.gets.load(Relaxed) + self.posts.load(Relaxed)
    }

    fn non_2xx(&self) -> u64 {
        self.statuses.lock().unwrap().values().sum()
    }

    fn failures(&self) -> u64 {
        self.non_2xx() + self.transport_errors.load(Relaxed) + self.echo_mismatches.load(Relaxed)
    }
}

/// One client: requests back to back until `deadline`, every fourth a POST.
async fn run_client(
    id: usize,
    client: LoadClient,
    base: String,
    deadline: Instant,
    tally: Arc<Tally>,
) {
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let sent = Instant::now();
        let (request, form) = if seq.is_multiple_of(POST_EVERY) {
            tally.posts.fetch_add(1, Relaxed);
            let form = format!("client={id}&seq={seq}&note=soak");
            let request = Request::post(format!("{base}/items"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form.clone())))
                .unwrap();
            (request, Some(form))
        } else {
            tally.gets.fetch_add(1, Relaxed);
            let request = Request::get(format!("{base}/items/{}?page={}", seq % 1000, id))
                .header("accept", "application/json")
                .body(Full::default())
                .unwrap();
            (request, None)
        };
        let answer = match client.request(request).await {
            Ok(response) => {
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map(|body| (status, body.to_bytes()))
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let took = sent.elapsed();
        tally.slowest_us.fetch_max(took.as_micros() as u64, Relaxed);
        match answer {
            Err(error) => {
                let n = tally.transport_errors.fetch_add(1, Relaxed);
                if n < SHOW_FIRST {
                    eprintln!("transport error after {took:?}: {error}");
                }
            }
            Ok((status, body)) if !status.is_success() => {
                let n = tally.non_2xx();
                *tally
                    .statuses
                    .lock()
                    .unwrap()
                    .entry(status.as_u16())
                    .or_default() += 1;
                if n < SHOW_FIRST {
                    show_non_2xx(status, took, &body);
                }
            }
            Ok((_, body)) => {
                if let Some(form) = form {
                    if !echo_carries(&body, &form) {
                        let n = tally.echo_mismatches.fetch_add(1, Relaxed);
                        if n < SHOW_FIRST {
                            eprintln!("POST echo without its body `{form}`");
                        }
                    }
                }
            }
        }
    }
}

fn show_non_2xx(status: StatusCode, took: Duration, body: &[u8]) {
    eprintln!(
        "non-2xx {} after {took:?}: {}",
        status.as_u16(),
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
}

/// Whether the API's echo says it received `form` as the body.
fn echo_carries(echo: &[u8], form: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(echo)
        .is_ok_and(|v| v["body"].as_str() == Some(form))
}

/// The faults armed so far.
#[derive(Default)]
struct FaultLog {
    /// Requests the API was told to refuse (sum of `reject_next` counts).
    api_rejects: AtomicU64,
    identity_503: AtomicU64,
    identity_garbage: AtomicU64,
    identity_delay: AtomicU64,
}

/// Arm faults on the API and the token endpoint on their timers until `deadline`.
async fn inject_faults(identity: IdentitySim, api: ApiSim, deadline: Instant, log: Arc<FaultLog>) {
    let now = Instant::now();
    let mut api_timer = interval_at(now + API_FAULT_EVERY, API_FAULT_EVERY);
    let mut identity_timer = interval_at(now + IDENTITY_FAULT_EVERY, IDENTITY_FAULT_EVERY);
    let mut turn = 0u64;
    loop {
        tokio::select! {
            _ = sleep_until(deadline) => return,
            _ = api_timer.tick() => {
                let n = rand::thread_rng().gen_range(1..=3);
                api.reject_next(n);
                log.api_rejects.fetch_add(u64::from(n), Relaxed);
            }
            _ = identity_timer.tick() => {
                match turn % 5 {
                    0 | 3 => {
                        identity.fail_next(1, 503);
                        log.identity_503.fetch_add(1, Relaxed);
                    }
                    1 => {
                        identity.delay_next(1, IDENTITY_DELAY);
                        log.identity_delay.fetch_add(1, Relaxed);
                    }
                    _ => {
                        identity.garbage_next(1);
                        log.identity_garbage.fetch_add(1, Relaxed);
                    }
                }
                turn += 1;
            }
        }
    }
}

struct Report<'a> {
    elapsed: Duration,
    tally: &'a Tally,
    faults: &'a FaultLog,
    identity: &'a IdentitySim,
    api: &'a ApiSim,
    rss_start: u64,
    rss_end: u64,
}

/// Print the figures; true when every target is met.
fn report(r: &Report) -> bool {
    let t = r.tally;
    let requests = t.requests();
    let ids = r.identity.counters();
    let api = r.api.counters();
    let statuses = t.statuses.lock().unwrap().clone();
    let by_status = if statuses.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        format!("  ({})", parts.join(", "))
    };
    let secs = r.elapsed.as_secs_f64();
    let growth = r.rss_end as i64 - r.rss_start as i64;

    println!();
    println!("duration               {secs:.1} s");
    println!(
        "requests               {requests} ({} GET, {} POST)",
        t.gets.load(Relaxed),
        t.posts.load(Relaxed)
    );
    println!("requests/s             {:.0}", requests as f64 / secs);
    println!(
        "non-2xx                {}{by_status}  (target 0)",
        t.non_2xx()
    );
    println!(
        "transport errors       {}  (target 0)",
        t.transport_errors.load(Relaxed)
    );
    println!(
        "POST echo mismatches   {}  (target 0)",
        t.echo_mismatches.load(Relaxed)
    );
    println!(
        "slowest request        {:.3} s",
        t.slowest_us.load(Relaxed) as f64 / 1e6
    );
    println!(
        "API 401s               {}  (forced by reject_next: {}; tollgate refreshes and replays each)",
        api.rejected,
        r.faults.api_rejects.load(Relaxed)
    );
    println!(
        "identity faults armed  {} × 503, {} × HTML 200, {} × {} s delay",
        r.faults.identity_503.load(Relaxed),
        r.faults.identity_garbage.load(Relaxed),
        r.faults.identity_delay.load(Relaxed),
        IDENTITY_DELAY.as_secs()
    );
    println!(
        "refreshes              {} token requests ({} refreshed, {} failed by a fault)",
        ids.token_requests, ids.refreshes, ids.failures_injected
    );
    println!("reuse_detected         {}  (target 0)", ids.reuse_detected);
    println!("grants_revoked         {}  (target 0)", ids.grants_revoked);
    println!("RSS of this process (proxy + identity and API simulators + load clients):");
    println!("  after warm-up        {}", mib(r.rss_start));
    println!("  at the end           {}", mib(r.rss_end));
    println!(
        "  difference           {:+.1} MiB  (target: flat)",
        growth as f64 / 1024.0
    );
    println!("  peak (VmHWM)         {}", mib(proc_status_kib("VmHWM")));

    let pass = t.failures() == 0 && ids.reuse_detected == 0 && ids.grants_revoked == 0;
    println!(
        "verdict                {}",
        if pass { "PASS" } else { "FAIL" }
    );
    pass
}

/// A `kB` field of `/proc/self/status` (0 where there is no such file).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
