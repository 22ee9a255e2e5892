//! Shared test harness: simulated identity server and API, a proxy in front, a client.
#![allow(dead_code)]

pub mod binary;
pub mod certs;
pub mod mtls;
pub mod redis_server;

pub use binary::{spawn_serve, spawn_serve_with, status_command, Output, Tollgate};
use redis_server::RedisServer;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tollgate::config::{Config, StateConfig, StoreLocation};
pub use tollgate::quota::Clock;
use tollgate::store::RedisStore;
use tollgate::Proxy;
use tollgate_sim::api::ApiSim;
use tollgate_sim::identity::{IdentityConfig, IdentitySim};
use tollgate_sim::{bind_loopback, SimServer};

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A loopback port nothing listens on now, for a test to bind later or to find closed. Taken
/// below the kernel's ephemeral range (32768 and up by default), so servers other tests
/// start on port 0 meanwhile cannot be given it.
pub fn free_port() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Wait (up to 10 s) until `done` holds.
pub async fn until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, collected.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text; panics when it is missing.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    /// Served (200) rather than refused by a quota (429); any other status fails the test.
    pub fn served(&self) -> bool {
        match self.status {
            200 => true,
            429 => false,
            other => panic!("unexpected {other}: {}", self.text()),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The echoed request header `name` (the API sim echoes what it received).
    pub fn echoed_header(&self, name: &str) -> Vec<String> {
        self.json()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pair| pair[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|pair| pair[1].as_str().unwrap().to_owned())
            .collect()
    }
}

pub async fn collect(response: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.expect("response body").to_bytes(),
    }
}

/// GET `url` with a fresh client and collect the answer.
pub async fn get(url: String) -> Answer {
    let request = Request::get(url).body(Full::default()).unwrap();
    collect(client().request(request).await.expect("server answers")).await
}

/// Knobs of a test setup; `extra_upstream` and `extra_auth` are TOML lines.
pub struct Setup {
    pub identity: IdentityConfig,
    /// `auth.grant`; the seed is configured only for `refresh_token`.
    pub grant: &'static str,
    pub base_path: &'static str,
    pub extra_upstream: String,
    pub extra_auth: String,
    /// The lines of `[upstream.quota]`; no quota when empty.
    pub quota: String,
    /// More TOML after everything else (tables of the upstream such as `[upstream.inbound]`).
    pub extra_tables: String,
    /// What the proxy's quotas read as the time.
    pub clock: Clock,
    /// Start the admin listener too, on `127.0.0.1:0`.
    pub admin: bool,
    /// More lines of `[state]` (a `key`).
    pub extra_state: String,
}

impl Setup {
    /// The default setup with the `[upstream.quota]` lines `quota`.
    pub fn with_quota(quota: &str) -> Setup {
        Setup {
            quota: quota.into(),
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            identity: IdentityConfig::default(),
            grant: "refresh_token",
            base_path: "/api/v1",
            extra_upstream: String::new(),
            extra_auth: String::new(),
            quota: String::new(),
            extra_tables: String::new(),
            clock: Clock::system(),
            admin: false,
            extra_state: String::new(),
        }
    }
}

/// Simulators plus a proxy; the state directory lives as long as the harness.
pub struct Harness {
    pub identity: IdentitySim,
    pub identity_server: Option<SimServer>,
    pub api: ApiSim,
    pub api_server: SimServer,
    pub proxy: Option<Proxy>,
    pub state: tempfile::TempDir,
    pub seed: String,
    pub config_text: String,
    pub client: TestClient,
    pub clock: Clock,
}

impl Harness {
    pub async fn start(setup: Setup) -> Harness {
        let identity = IdentitySim::new(setup.identity.clone());
        let identity_server = identity.serve(bind_loopback().await).await;
        let api = ApiSim::new(identity.clone());
        let api_server = api.serve(bind_loopback().await).await;
        let state = tempfile::tempdir().unwrap();
        let seed = identity.issue_refresh_token();
        let config_text = config_text(
            &setup,
            &state.path().join("state"),
            &identity.token_url(),
            &format!("{}{}", api_server.url(), setup.base_path),
            &seed,
        );
        let mut harness = Harness {
            identity,
            identity_server: Some(identity_server),
            api,
            api_server,
            proxy: None,
            state,
            seed,
            config_text,
            client: client(),
            clock: setup.clock.clone(),
        };
        harness.start_proxy().await;
        harness
    }

    pub fn config(&self) -> Config {
        parse(&self.config_text)
    }

    pub async fn start_proxy(&mut self) {
        assert!(self.proxy.is_none());
        let config = self.config();
        let proxy = Proxy::start_with_clock(&config, self.clock.clone()).await;
        self.proxy = Some(proxy.expect("proxy starts"));
    }

    pub async fn stop_proxy(&mut self) {
        self.proxy.take().expect("proxy running").shutdown().await;
    }

    /// Put the config `text` in force on the running proxy (SIGHUP).
    pub async fn reload(&mut self, text: &str) -> Result<tollgate::Reloaded, tollgate::StartError> {
        let config = parse(text);
        self.proxy
            .as_mut()
            .expect("proxy running")
            .reload(&config)
            .await
    }

    /// The strict identity server never saw a refresh token twice, nor revoked a grant.
    pub fn assert_lineage_intact(&self) {
        let ids = self.identity.counters();
        assert_eq!(
            (ids.reuse_detected, ids.grants_revoked),
            (0, 0),
            "a refresh token was redeemed twice"
        );
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy().addr("api").unwrap(), path)
    }

    /// A URL on the admin listener (the setup must ask for one).
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.proxy().admin_addr().expect("Setup { admin: true }");
        format!("http://{addr}{path}")
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Request::get(self.url(path)).body(Full::default()).unwrap())
            .await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        let request = Request::post(self.url(path))
            .header("content-type", "application/octet-stream")
            .body(Full::new(body.into()))
            .unwrap();
        self.send(request).await
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        collect(self.client.request(request).await.expect("proxy answers")).await
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// The harness's config written to a file, with the admin listener's real address (the
    /// setup must ask for one), for `tollgate status -c`.
    pub fn config_for_status(&self) -> PathBuf {
        let admin = self.proxy().admin_addr().expect("Setup { admin: true }");
        let config = self.config_text.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        );
        assert_ne!(config, self.config_text);
        self.write_config("tollgate.toml", &config)
    }

    /// `text` written to `name` in the harness's temp dir, for the binary's `-c`.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.state.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `tollgate check` on the config `text`, written to `name` in the harness's temp dir.
    pub async fn check_config(&self, name: &str, text: &str) -> Output {
        let path = self.write_config(name, text);
        Tollgate::new(&["check"])
            .config_file(&path)
            .run_async()
            .await
    }

    /// The stored token record of upstream `api`.
    pub fn stored(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_dir().join("api.token.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

pub fn config_text(
    setup: &Setup,
    state: &Path,
    token_url: &str,
    api_url: &str,
    seed: &str,
) -> String {
    format!(
        r#"
[state]
store = "file:{state}"
{extra_state}
{admin}

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{api_url}"
{extra_upstream}

[upstream.auth]
grant = "{grant}"
token_url = "{token_url}"
client_id = "{client_id}"
{client_secret}
{seed}
{extra_auth}
{quota}
{extra_tables}
"#,
        state = state.display(),
        grant = setup.grant,
        seed = match setup.grant {
            "refresh_token" => format!("refresh_token = \"{seed}\""),
            _ => String::new(),
        },
        client_id = setup.identity.client_id,
        // A client registered with a key has no secret to configure.
        client_secret = match setup.identity.client_auth {
            tollgate_sim::identity::ClientAuthRule::PrivateKeyJwt => String::new(),
            _ => format!("client_secret = \"{}\"", setup.identity.client_secret),
        },
        admin = if setup.admin {
            "\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        },
        extra_state = setup.extra_state,
        extra_upstream = setup.extra_upstream,
        extra_auth = setup.extra_auth,
        extra_tables = setup.extra_tables,
        quota = if setup.quota.is_empty() {
            String::new()
        } else {
            format!("[upstream.quota]\n{}", setup.quota)
        },
    )
}

/// A log writer for a process-wide subscriber: everything written, kept.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Every log line of the test binary from the first call on, at trace level for every crate:
/// the process-wide subscriber, installed once, for the tests that search the log for secrets
/// (what they search for is their own, so the other tests' lines do not get in the way).
pub fn logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        logs
    })
}

/// `[upstream.auth]` lines for a test where Redis loses its data: a refresh lock lives 11 s
/// (`timeout` + 10 s), so none is granted for 11 s after the loss, and clients wait through it.
pub const THROUGH_A_LOSS: &str = "timeout = \"1s\"\nrefresh_wait = \"20s\"";

/// A Redis of its own, and [`on_redis`] on it.
pub async fn redis_harness(setup: Setup) -> (RedisServer, Harness, String) {
    let redis = RedisServer::start();
    let (h, text) = on_redis(setup, &redis).await;
    (redis, h, text)
}

/// The harness's simulators, with the config moved to `redis` (operations bounded by 500 ms,
/// heartbeats every 200 ms) and a seed of its own; the harness's own proxy, on a file store,
/// is stopped first.
pub async fn on_redis(setup: Setup, redis: &RedisServer) -> (Harness, String) {
    let redis_url = redis.url();
    let mut h = Harness::start(setup).await;
    h.stop_proxy().await;
    let store = format!("store = \"file:{}\"", h.state_dir().display());
    let text = h
        .config_text
        .replace(
            &store,
            &format!("store = \"{redis_url}\"\ntimeout = \"500ms\"\nheartbeat = \"200ms\""),
        )
        .replace(&h.seed, &h.identity.issue_refresh_token());
    (h, text)
}

/// A config of the tests, parsed.
pub fn parse(text: &str) -> Config {
    Config::parse(text, "test.toml", |_| None).unwrap_or_else(|e| panic!("test config: {e}"))
}

/// A proxy started on the config `text`.
pub async fn replica(text: &str) -> Proxy {
    Proxy::start(&parse(text)).await.expect("replica starts")
}

/// `n` proxies started on the config `text`: replicas, when its store is shared.
pub async fn replicas(text: &str, n: usize) -> Vec<Proxy> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(replica(text).await);
    }
    out
}

/// [`replicas`], each served a first request (`/warm`), so each holds a token.
pub async fn warm_replicas(text: &str, n: usize) -> Vec<Proxy> {
    let group = replicas(text, n).await;
    for proxy in &group {
        assert_eq!(get(url_of(proxy, "/warm")).await.status, 200);
    }
    group
}

/// Shut each proxy of `group` down.
pub async fn shut_down(group: Vec<Proxy>) {
    for proxy in group {
        proxy.shutdown().await;
    }
}

/// A store on the Redis of `state` (a `redis://` or `rediss://` store).
pub fn redis_store(state: &StateConfig) -> RedisStore {
    let Ok(StoreLocation::Redis(url)) = state.location() else {
        panic!("a redis:// location")
    };
    RedisStore::open(&url, state).unwrap()
}

/// `path` on the listener of upstream `api` of `proxy`.
pub fn url_of(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.addr("api").unwrap())
}

/// What a reader sees of the status page `html`, checked for what should not be there: an
/// identifier joined by `_` (`key_budget`) or a duration of `0s`. Returns the text, without
/// the `<style>` and the tags, entities decoded.
pub fn readable_page_text(html: &str) -> String {
    use tollgate::admin::html::{snake_case_words, visible_text};
    let text = visible_text(html);
    assert_eq!(
        snake_case_words(&text),
        Vec::<String>::new(),
        "an identifier on the page: {text}"
    );
    let words = text.split(|c: char| !(c.is_alphanumeric() || c == '_'));
    assert!(
        !words.into_iter().any(|w| w == "0s"),
        "a duration of 0s on the page: {text}"
    );
    text
}
