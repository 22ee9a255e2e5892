//! What the config file may say: the typed tables and keys, their defaults, and which keys
//! take durations, sizes and URLs ([`super::values`]). Unknown keys are errors
//! (`deny_unknown_fields` everywhere).
//!
//! Must not: check anything that spans several keys (that is [`super::validate`]), or print a
//! value (secrets are [`Secret`]s).

use super::keys::InboundKey;
use super::values::{de_day_starts, de_duration, de_http_url, de_size};
use super::AuthConfig;
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// The whole configuration, after interpolation and validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub state: StateConfig,
    pub admin: Option<AdminConfig>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// By upstream name, `auth.token_url` as the file wrote it when it names a variable
    /// (`?tenant=${TENANT}`), so that `check` can leave out what came from the environment.
    #[serde(skip)]
    pub token_urls_as_written: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `file:<dir>` (relative to the working directory), or `redis://…` / `rediss://…` for
    /// several replicas. A secret: a Redis URL may hold a password ([`StoreLocation::shown`]
    /// is what may be printed).
    #[serde(default = "default_store")]
    pub store: Secret<String>,
    /// The key namespace on a shared store, so several deployments can share one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long one operation on a shared store may take.
    #[serde(default = "default_store_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// PEM certificates of the CA that signed the Redis server's certificate, for `rediss://`
    /// with a private CA: then only they are trusted.
    pub ca_file: Option<PathBuf>,
    /// How often a replica shows itself on a shared store and looks whether the store lost
    /// its data; the replicas write back what they know within two of these.
    #[serde(default = "default_heartbeat", deserialize_with = "de_duration")]
    pub heartbeat: Duration,
    /// Seals the secrets of every token record (32 bytes, base64); see [`crate::seal`].
    pub key: Option<Secret<String>>,
    /// Keys that still open records, never used to seal: a rotation's old keys.
    #[serde(default)]
    pub previous_keys: Vec<Secret<String>>,
}

impl StateConfig {
    /// Where `store` points.
    pub fn location(&self) -> Result<StoreLocation, String> {
        StoreLocation::parse(self.store.expose())
    }

    /// The keys records are sealed and opened with.
    pub fn keys(&self) -> Result<crate::seal::Keys, String> {
        crate::seal::Keys::new(self.key.as_ref(), &self.previous_keys)
    }

    /// Whether `other` is the same store, whatever its keys (a reload may change those).
    pub fn same_store(&self, other: &StateConfig) -> bool {
        let keyless = |s: &StateConfig| StateConfig {
            key: None,
            previous_keys: Vec::new(),
            ..s.clone()
        };
        keyless(self) == keyless(other)
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            store: default_store(),
            prefix: default_prefix(),
            timeout: default_store_timeout(),
            ca_file: None,
            heartbeat: default_heartbeat(),
            key: None,
            previous_keys: Vec::new(),
        }
    }
}

/// `[admin]`: the listener of the status page, probes, `/status` and `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, every admin request but `GET /healthz` and `GET /readyz` must carry it, as
    /// `Authorization: Bearer KEY` or as the password of HTTP Basic.
    pub key: Option<Secret<String>>,
}

/// One API that tollgate fronts: a listener, the API's base URL, and how to get its tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// `beproduct` | `erpnet` | `winbooks` | `spring`: fills the keys below that are not set.
    pub preset: Option<String>,
    /// The keys the preset filled (for `check`).
    #[serde(skip)]
    pub preset_filled: Vec<String>,
    #[serde(deserialize_with = "de_http_url")]
    pub url: Url,
    /// Upstream statuses that mean "this token was refused": refresh once and replay once.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<u16>,
    /// Request bodies up to this size are kept for a replay after a `retry_on` status.
    #[serde(default = "default_retry_body_limit", deserialize_with = "de_size")]
    pub retry_body_limit: u64,
    /// Upstream response timeout (until the response head arrives).
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for the upstream and the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the certificate with this public key (`sha256//BASE64`) for the host of
    /// `url`, the token endpoint's too when it is on that host ([`crate::tls::upstream`]).
    pub pin_sha256: Option<String>,
    /// A client certificate (PEM, leaf first) and its key presented to the API (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub auth: AuthConfig,
    /// `[[upstream.identity]]`: other users the API is reached as (see [`super::identity`]).
    #[serde(default, rename = "identity")]
    pub identities: Vec<super::IdentityConfig>,
    pub login: Option<LoginConfig>,
    /// The organisation's request limits for this API; none when absent.
    pub quota: Option<QuotaConfig>,
    /// Keys clients must present; required when `listen` is not a loopback address.
    pub inbound: Option<InboundConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Serve HTTPS on `listen` with this certificate.
    pub tls: Option<TlsConfig>,
}

/// `[upstream.tls]`: the listener's certificate chain and key, PEM files re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[upstream.limits]`: what one client connection may cost. The defaults are safe.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open client connections per listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// The request line and headers together; more gets 431.
    #[serde(deserialize_with = "de_size")]
    pub max_header_size: u64,
    /// How long a client has to send a request head; a connection with no request in flight
    /// is closed after one to two times this, in HTTP/1.1 and HTTP/2 (slowloris, idle clients).
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// Connecting to the upstream.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Requests in flight to the upstream at once, per process (each worker holds its share):
    /// over HTTP/1.1, the connections open to it. More wait for one to finish.
    pub max_upstream_connections: usize,
    /// Between two reads of a request body; then 408 and the connection is closed.
    #[serde(deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    /// Bytes per second a request body must average once it took 5 s (0: no minimum).
    #[serde(deserialize_with = "de_size")]
    pub min_body_rate: u64,
    /// This upstream's request bodies held for a replay at once, per process (each worker
    /// holds its share); past it a body streams without a replay.
    #[serde(deserialize_with = "de_size")]
    pub max_buffered: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1024,
            max_header_size: 64 * 1024,
            header_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_upstream_connections: 256,
            body_timeout: Duration::from_secs(60),
            min_body_rate: 240,
            max_buffered: 64 * 1024 * 1024,
        }
    }
}

/// `[upstream.inbound]`: who may use the listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Clients send `Authorization: Bearer KEY` (or `Proxy-Authorization`).
    pub keys: Vec<InboundKey>,
}

/// Inbound keys shorter than this are refused: they could be guessed.
pub const MIN_KEY_LEN: usize = 16;

/// `[upstream.quota]`: the limits tollgate enforces before a request reaches the API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Requests per calendar day; or derived from `edition` and `licenses`.
    pub per_day: Option<u64>,
    pub edition: Option<Edition>,
    pub licenses: Option<u64>,
    /// When the day starts, `HH:MM` UTC, in seconds after midnight.
    #[serde(default, deserialize_with = "de_day_starts")]
    pub day_starts: u32,
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
    /// Requests in flight at once; more wait in a FIFO line of `queue` places.
    pub concurrency: Option<u32>,
    pub queue: Option<u32>,
    #[serde(default = "default_queue_timeout", deserialize_with = "de_duration")]
    pub queue_timeout: Duration,
    /// The limits of each identity's own requests (config/identity.rs).
    pub per_identity: Option<super::IdentityLimits>,
}

/// BeProduct's editions, whose daily limit grows with the number of licenses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edition {
    Business,
    Enterprise,
}

impl Edition {
    /// Business: min(2000, 250 × licenses); Enterprise: min(25000, 500 × licenses).
    pub fn per_day(self, licenses: u64) -> u64 {
        match self {
            Edition::Business => (250 * licenses).min(2000),
            Edition::Enterprise => (500 * licenses).min(25000),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Edition::Business => "business",
            Edition::Enterprise => "enterprise",
        }
    }
}

impl QuotaConfig {
    /// A quota of short limits alone: an identity's own.
    pub fn limits(per_minute: Option<u32>, concurrency: Option<u32>, queue: Option<u32>) -> Self {
        QuotaConfig {
            per_day: None,
            edition: None,
            licenses: None,
            day_starts: 0,
            per_second: None,
            per_minute,
            per_hour: None,
            concurrency,
            queue,
            queue_timeout: default_queue_timeout(),
            per_identity: None,
        }
    }

    /// The daily limit: `per_day`, else the edition's formula.
    pub fn daily_limit(&self) -> Option<u64> {
        match (self.per_day, self.edition, self.licenses) {
            (Some(n), _, _) => Some(n),
            (None, Some(edition), Some(licenses)) => Some(edition.per_day(licenses)),
            _ => None,
        }
    }
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Where `tollgate login` sends the browser (authorization code + PKCE).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    #[serde(deserialize_with = "de_http_url")]
    pub authorize_url: Url,
    #[serde(default = "default_redirect_uri", deserialize_with = "de_http_url")]
    pub redirect_uri: Url,
    /// Extra authorize-URL parameters (`prompt`, ...).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

fn default_redirect_uri() -> Url {
    Url::parse("http://127.0.0.1:8765/callback").expect("a valid URL")
}

fn default_store() -> Secret<String> {
    Secret::from("file:./state")
}
fn default_prefix() -> String {
    "tollgate".to_owned()
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_retry_on() -> Vec<u16> {
    vec![401]
}
fn default_retry_body_limit() -> u64 {
    1024 * 1024
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Where token records live, parsed from `state.store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    File(PathBuf),
    /// A Redis (or Valkey) server that several replicas share.
    Redis(RedisUrl),
}

/// A `redis://` or `rediss://` URL: the secret whole, and what may be shown of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub url: Secret<String>,
    /// The URL with its password, if any, as `[redacted]`.
    pub shown: String,
}

impl StoreLocation {
    /// Parse `state.store`. A message never quotes a Redis URL whole: it may hold a password.
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        if let Some(dir) = text.strip_prefix("file:") {
            if dir.is_empty() {
                return Err("`file:` needs a directory, e.g. \"file:./state\"".into());
            }
            Ok(StoreLocation::File(PathBuf::from(dir)))
        } else if ["redis://", "rediss://"].iter().any(|s| {
            text.get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s))
        }) {
            RedisUrl::parse(text).map(StoreLocation::Redis)
        } else {
            // A URL may carry a password: quote the value only when it cannot.
            let shown = if text.contains('@') {
                "the value"
            } else {
                text
            };
            Err(format!(
                "`{shown}` is not a store; use \"file:DIR\" (for example \"file:./state\") or \"redis://HOST:PORT/DB\""
            ))
        }
    }

    /// The location as messages and `check` show it.
    pub fn shown(&self) -> String {
        match self {
            StoreLocation::File(dir) => format!("file:{}", dir.display()),
            StoreLocation::Redis(redis) => redis.shown.clone(),
        }
    }
}

impl RedisUrl {
    fn parse(text: &str) -> Result<RedisUrl, String> {
        let help = "write it as redis://[USER:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)";
        let url = Url::parse(text).map_err(|e| format!("not a Redis URL ({e}); {help}"))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("the Redis URL has no host; {help}"))?;
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(format!("the Redis database must be a number; {help}"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("the Redis URL takes no query or fragment; {help}"));
        }
        let user = match (url.username(), url.password()) {
            ("", None) => String::new(),
            (user, None) => format!("{user}@"),
            (user, Some(_)) => format!("{user}:[redacted]@"),
        };
        let port = url.port().unwrap_or(6379);
        let db = if db.is_empty() { "0" } else { db };
        Ok(RedisUrl {
            url: Secret::from(text),
            shown: format!("{}://{user}{host}:{port}/{db}", url.scheme()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_url_is_shown_without_its_password() {
        let shown = |text: &str| StoreLocation::parse(text).map(|l| l.shown());
        assert_eq!(
            shown("redis://:s3cret@redis.internal:6380/2").unwrap(),
            "redis://:[redacted]@redis.internal:6380/2"
        );
        assert_eq!(
            shown("rediss://app:s3cret@r.example").unwrap(),
            "rediss://app:[redacted]@r.example:6379/0"
        );
        assert_eq!(
            shown("redis://127.0.0.1").unwrap(),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(shown("REDIS://h").unwrap(), "redis://h:6379/0");
        for bad in [
            "redis://:s3cret@/0",
            "redis://:s3cret@h/zero",
            "redis://:s3cret@h/0?x=1",
            "valkey://:s3cret@h",
            "redis:/:s3cret@h",
        ] {
            let message = shown(bad).unwrap_err();
            assert!(!message.contains("s3cret"), "{message}");
        }
    }

    #[test]
    fn edition_formula_is_capped() {
        let limit = |edition: Edition, licenses| edition.per_day(licenses);
        assert_eq!(limit(Edition::Business, 4), 1000);
        assert_eq!(limit(Edition::Business, 8), 2000);
        assert_eq!(limit(Edition::Business, 10), 2000, "not 2500");
        assert_eq!(limit(Edition::Enterprise, 10), 5000);
        assert_eq!(limit(Edition::Enterprise, 60), 25_000, "not 30000");
    }
}
