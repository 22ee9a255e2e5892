//! The configuration file: TOML schema, `${ENV}` interpolation, and `validate()`.
//!
//! Loading goes text → TOML value → `${NAME}` replaced in every string → typed structs (unknown
//! keys are errors) → `validate()`. Every error carries the key path (`upstream[0].auth.grant`),
//! and the loader turns that path into the line of the file where the key is written, so a
//! message reads `tollgate.toml:14: upstream[0].auth.grant: unknown variant ...`.
//! This module never logs or prints the values it loads: they hold secrets.

use crate::secret::Secret;
use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Where the config is read from when `-c` is not given and `$TOLLGATE_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "tollgate.toml";

/// The whole configuration, after interpolation and validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub state: StateConfig,
    pub admin: Option<AdminConfig>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `file:<dir>`; the directory is relative to the working directory.
    #[serde(default = "default_store")]
    pub store: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            store: default_store(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
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
    pub auth: AuthConfig,
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1024,
            max_header_size: 64 * 1024,
            header_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// `[upstream.inbound]`: who may use the listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Clients send `Authorization: Bearer KEY` (or `Proxy-Authorization`).
    pub keys: Vec<Secret<String>>,
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
}

/// BeProduct's editions, whose daily limit grows with the number of licences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edition {
    Business,
    Enterprise,
}

impl Edition {
    /// Business: min(2000, 250 × licences); Enterprise: min(25000, 500 × licences).
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

fn de_day_starts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    parse_day_starts(&text).map_err(serde::de::Error::custom)
}

/// `HH:MM` (UTC) as seconds after midnight.
pub fn parse_day_starts(text: &str) -> Result<u32, String> {
    let bad = || format!("`{text}` is not a time of day; write it as HH:MM in UTC, e.g. \"00:00\"");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

/// Where a login sends the browser (authorization code + PKCE). The `login` command that uses
/// it is not built yet; presets fill it so `check` shows the provider's URLs.
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

/// How tokens are obtained from the identity server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub grant: Grant,
    #[serde(deserialize_with = "de_http_url")]
    pub token_url: Url,
    /// The client id; for `winbooks_exchange` it is not used (the e-mail authenticates).
    #[serde(default)]
    pub client_id: String,
    pub client_secret: Option<Secret<String>>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// The seed refresh token (grant = refresh_token). The state store keeps its descendants.
    pub refresh_token: Option<Secret<String>>,
    /// The user for `password`; the e-mail for `winbooks_exchange`.
    pub username: Option<String>,
    /// The password for `password`.
    pub password: Option<Secret<String>>,
    /// The long-lived exchange token for `winbooks_exchange`.
    pub exchange_token: Option<Secret<String>>,
    pub scope: Option<String>,
    /// Refresh this long before expiry, if that comes before 80% of the lifetime.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub refresh_before: Option<Duration>,
    /// Extra form fields sent on every token request (`resource`, `audience`, ...).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Lifetime assumed when a token response has no `expires_in`.
    #[serde(default = "default_expires_in", deserialize_with = "de_duration")]
    pub default_expires_in: Duration,
    /// How long a request waits for a token while the identity server fails, before 503.
    #[serde(default = "default_refresh_wait", deserialize_with = "de_duration")]
    pub refresh_wait: Duration,
    /// Timeout of one token request.
    #[serde(default = "default_token_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
    /// Resource-owner password; refreshes while the refresh token works, then logs in again.
    Password,
    /// WinBooks on Web: an exchange token traded for tokens, Basic(e-mail) client auth.
    WinbooksExchange,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::WinbooksExchange => "winbooks_exchange",
        }
    }
}

/// RFC 6749 §2.3.1 client authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (client_secret_post).
    #[default]
    Post,
    /// HTTP Basic with form-encoded id and secret (client_secret_basic).
    Basic,
    /// A public client: only `client_id` in the form body.
    None,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Post => "post",
            ClientAuth::Basic => "basic",
            ClientAuth::None => "none",
        }
    }
}

fn default_store() -> String {
    "file:./state".to_owned()
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
fn default_expires_in() -> Duration {
    Duration::from_secs(3600)
}
fn default_refresh_wait() -> Duration {
    Duration::from_secs(10)
}
fn default_token_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Form fields that tollgate sets itself; `params` may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "scope",
    "code",
    "username",
    "password",
];

/// What went wrong in a config file, with where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `upstream[0].auth.token_url`; empty for the file as a whole.
    pub key: String,
    /// 1-based line of the key in the file, when it could be found.
    pub line: Option<usize>,
    pub message: String,
}

/// A config that could not be loaded; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if !p.key.is_empty() {
                write!(f, ": {}", p.key)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Read, interpolate and validate the file at `path`, with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, file) = read(path)?;
        Config::parse(&text, &file, |name| std::env::var(name).ok())
    }

    /// Only the `[admin]` table of the file at `path`, for `tollgate status`. The rest of the
    /// file is neither checked nor interpolated, so the variables it names (secrets) need not be
    /// set in this shell.
    pub fn load_admin(path: &Path) -> Result<Option<AdminConfig>, ConfigError> {
        let (text, file) = read(path)?;
        Config::parse_admin(&text, &file, |name| std::env::var(name).ok())
    }

    /// Parse config text; `file` names it in errors, `env` looks up `${NAME}`.
    pub fn parse(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<Problem>| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let mut value = parse_toml(text).map_err(|p| fail(vec![p]))?;
        let secrets = interpolated(&mut value, &env).map_err(|p| fail(locate(text, p)))?;

        let mut problems = Vec::new();
        let filled = apply_presets(&mut value, &mut problems);
        if !problems.is_empty() {
            return Err(fail(locate(text, problems)));
        }

        let mut config: Config = typed(value, &secrets).map_err(|p| fail(locate(text, vec![p])))?;
        for (up, filled) in config.upstreams.iter_mut().zip(filled) {
            up.preset_filled = filled;
        }
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(locate(text, problems)))
        }
    }

    /// [`Config::load_admin`] on config text.
    pub fn parse_admin(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<AdminConfig>, ConfigError> {
        /// The file as `tollgate status` sees it.
        #[derive(Deserialize)]
        struct AdminOnly {
            admin: Option<AdminConfig>,
        }
        let fail = |problems: Vec<Problem>| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let value = parse_toml(text).map_err(|p| fail(vec![p]))?;
        let mut only_admin = toml::Table::new();
        if let Some(admin) = value.get("admin") {
            only_admin.insert("admin".to_owned(), admin.clone());
        }
        let mut only_admin = toml::Value::Table(only_admin);
        let secrets = interpolated(&mut only_admin, &env).map_err(|p| fail(locate(text, p)))?;
        let parsed: AdminOnly =
            typed(only_admin, &secrets).map_err(|p| fail(locate(text, vec![p])))?;
        Ok(parsed.admin)
    }

    /// Checks that span several keys or that types alone cannot express.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |key: String, message: String| {
            problems.push(Problem {
                key,
                line: None,
                message,
            })
        };
        if let Err(message) = StoreLocation::parse(&self.state.store) {
            report("state.store".into(), message);
        }
        if self.upstreams.is_empty() {
            report(
                "upstream".into(),
                "no [[upstream]] is configured; add one with name, listen, url and [upstream.auth]"
                    .into(),
            );
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        if let Some(admin) = &self.admin {
            listens.insert(admin.listen);
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if up.name.is_empty()
                || !up
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                report(
                    key("name"),
                    format!(
                        "`{}` is not a valid name: use lowercase letters, digits and '-'",
                        up.name
                    ),
                );
            }
            if !names.insert(up.name.as_str()) {
                report(
                    key("name"),
                    format!(
                        "`{}` is used by two upstreams; names must be unique",
                        up.name
                    ),
                );
            }
            let keys = up.inbound.as_ref().map_or(&[][..], |i| &i.keys[..]);
            if !up.listen.ip().is_loopback() && keys.is_empty() {
                report(
                    key("listen"),
                    format!(
                        "{} is reachable from other machines, and anyone who reaches it would call the API with your token; listen on 127.0.0.1, or require keys: [upstream.inbound] keys = [\"${{TOOL_KEY}}\"]",
                        up.listen
                    ),
                );
            }
            if up.inbound.is_some() && keys.is_empty() {
                report(
                    key("inbound.keys"),
                    "is empty: list at least one key, or remove [upstream.inbound]".into(),
                );
            }
            for (j, k) in keys.iter().enumerate() {
                if k.expose().chars().count() < MIN_KEY_LEN
                    || k.expose().bytes().any(|b| !b.is_ascii_graphic())
                {
                    report(
                        format!("upstream[{i}].inbound.keys[{j}]"),
                        format!("must be at least {MIN_KEY_LEN} visible ASCII characters without spaces; make one with `openssl rand -hex 32`"),
                    );
                }
            }
            if let Some(tls) = &up.tls {
                for (k, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                    if !path.is_file() {
                        report(
                            key(k),
                            format!("{} does not exist or is not a file", path.display()),
                        );
                    }
                }
            }
            let limits = &up.limits;
            if !(1..=1_000_000).contains(&limits.max_connections) {
                report(
                    key("limits.max_connections"),
                    "must be between 1 and 1000000".into(),
                );
            }
            if !(8 * 1024..=16 * 1024 * 1024).contains(&limits.max_header_size) {
                report(
                    key("limits.max_header_size"),
                    "must be between 8KiB and 16MiB".into(),
                );
            }
            for (k, d) in [
                ("limits.header_timeout", limits.header_timeout),
                ("limits.connect_timeout", limits.connect_timeout),
            ] {
                if d.is_zero() {
                    report(key(k), "must be more than 0s".into());
                }
            }
            if up.timeout.is_zero() || up.auth.timeout.is_zero() {
                let k = if up.timeout.is_zero() {
                    "timeout"
                } else {
                    "auth.timeout"
                };
                report(key(k), "must be more than 0s".into());
            }
            // Port 0 asks the system for a free port: two of them never clash.
            if up.listen.port() != 0 && !listens.insert(up.listen) {
                report(
                    key("listen"),
                    format!(
                        "{} is already used by another listener; give each its own port",
                        up.listen
                    ),
                );
            }
            if up.url.query().is_some() || up.url.fragment().is_some() {
                report(
                    key("url"),
                    "must not have a query or fragment: the client's path and query are appended to it"
                        .into(),
                );
            }
            for (j, status) in up.retry_on.iter().enumerate() {
                if !(400..=599).contains(status) {
                    report(
                        format!("upstream[{i}].retry_on[{j}]"),
                        format!("{status} is not an error status; use 400-599, usually 401"),
                    );
                }
            }
            if let Some(ca) = &up.ca_file {
                if !ca.is_file() {
                    report(
                        key("ca_file"),
                        format!("{} does not exist or is not a file", ca.display()),
                    );
                }
            }
            let auth = &up.auth;
            let has_secret = auth
                .client_secret
                .as_ref()
                .is_some_and(|s| !s.expose().is_empty());
            let mut require = |set: bool, k: &str, why: &str| {
                if !set {
                    report(
                        key(k),
                        format!(
                            "is required with grant = \"{}\"; {why}",
                            auth.grant.as_str()
                        ),
                    );
                }
            };
            match auth.grant {
                Grant::WinbooksExchange => {
                    require(
                        auth.username.is_some(),
                        "auth.username",
                        "set it to the e-mail of the WinBooks account",
                    );
                    require(
                        auth.exchange_token.is_some(),
                        "auth.exchange_token",
                        "set it to the exchange token from WinBooks on Web",
                    );
                }
                Grant::Password => {
                    require(
                        auth.username.is_some(),
                        "auth.username",
                        "set the user to log in as",
                    );
                    require(
                        auth.password.is_some(),
                        "auth.password",
                        "set it, from the environment: password = \"${VAR}\"",
                    );
                }
                Grant::ClientCredentials | Grant::RefreshToken => {}
            }
            if auth.grant != Grant::WinbooksExchange {
                match auth.client_auth {
                    ClientAuth::Post | ClientAuth::Basic if !has_secret => report(
                        key("auth.client_secret"),
                        format!(
                            "is required with client_auth = \"{}\"; set it, or use client_auth = \"none\" for a public client",
                            auth.client_auth.as_str()
                        ),
                    ),
                    ClientAuth::None if auth.client_secret.is_some() => report(
                        key("auth.client_secret"),
                        "is set but client_auth = \"none\" would not send it; use \"post\" or \"basic\""
                            .into(),
                    ),
                    _ => {}
                }
                if auth.client_id.is_empty() {
                    report(
                        key("auth.client_id"),
                        "is required: the client id the identity server issued".into(),
                    );
                }
            }
            if auth.grant == Grant::ClientCredentials {
                if auth.client_auth == ClientAuth::None {
                    report(
                        key("auth.client_auth"),
                        "client_credentials needs a client secret: use \"post\" or \"basic\""
                            .into(),
                    );
                }
                if auth.refresh_token.is_some() {
                    report(
                        key("auth.refresh_token"),
                        "is not used by grant = \"client_credentials\"; remove it".into(),
                    );
                }
            }
            for name in auth.params.keys() {
                if RESERVED_PARAMS.contains(&name.as_str()) {
                    report(
                        format!("upstream[{i}].auth.params.{name}"),
                        format!("`{name}` is set by tollgate itself; use the auth key instead"),
                    );
                }
            }
            if auth.default_expires_in.is_zero() {
                report(
                    key("auth.default_expires_in"),
                    "must be more than 0s".into(),
                );
            }
            if let Some(quota) = &up.quota {
                for (k, message) in quota.problems() {
                    report(key(&format!("quota.{k}")), message);
                }
            }
        }
        problems
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

impl QuotaConfig {
    /// What is wrong with this table, as (key, message).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (self.per_day, self.edition, self.licenses) {
            (Some(_), Some(_), _) => out.push((
                "edition",
                "set either per_day or edition with licenses, not both".into(),
            )),
            (_, Some(_), None) => out.push((
                "licenses",
                "is required with edition: the number of licences the organisation holds".into(),
            )),
            (_, None, Some(_)) => out.push((
                "licenses",
                "is only used with edition = \"business\" or \"enterprise\"; add edition, or set per_day".into(),
            )),
            _ => {}
        }
        let counts = [
            ("per_day", self.per_day),
            ("licenses", self.licenses),
            ("per_second", self.per_second.map(u64::from)),
            ("per_minute", self.per_minute.map(u64::from)),
            ("per_hour", self.per_hour.map(u64::from)),
            ("concurrency", self.concurrency.map(u64::from)),
        ];
        for (k, v) in counts {
            if v == Some(0) {
                out.push((k, "must be at least 1; remove the key for no limit".into()));
            }
        }
        if self.queue.is_some() && self.concurrency.is_none() {
            out.push((
                "queue",
                "is the wait line of `concurrency`; set concurrency too".into(),
            ));
        }
        if self.queue.unwrap_or(0) > 0 && self.queue_timeout.is_zero() {
            out.push(("queue_timeout", "must be more than 0s".into()));
        }
        out
    }

    /// The effective limits, one per line, as `check` prints them.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(limit) = self.daily_limit() {
            let how = match (self.per_day, self.edition, self.licenses) {
                (None, Some(e), Some(l)) => format!(" ({} edition, {l} licences)", e.as_str()),
                _ => String::new(),
            };
            let h = self.day_starts / 3600;
            let m = self.day_starts % 3600 / 60;
            out.push((
                "quota.per_day".into(),
                format!("{limit}{how}, the day starts at {h:02}:{m:02} UTC"),
            ));
        }
        for (k, v) in [
            ("per_second", self.per_second),
            ("per_minute", self.per_minute),
            ("per_hour", self.per_hour),
        ] {
            if let Some(n) = v {
                out.push((format!("quota.{k}"), format!("{n} (burst {n})")));
            }
        }
        if let Some(n) = self.concurrency {
            out.push((
                "quota.concurrency".into(),
                format!(
                    "{n} in flight, {} waiting at most {}",
                    self.queue.unwrap_or(0),
                    humantime::format_duration(self.queue_timeout)
                ),
            ));
        }
        out
    }
}

impl Config {
    /// The resolved settings as `check` prints them; secrets show as `[redacted]`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "state.store = {}", self.state.store);
        if let Some(admin) = &self.admin {
            let _ = writeln!(out, "admin.listen = {}", admin.listen);
        }
        for up in &self.upstreams {
            let a = &up.auth;
            let _ = writeln!(out, "\n[upstream \"{}\"]", up.name);
            let mut line = |k: &str, v: String| {
                let _ = writeln!(out, "  {k:<24} {v}");
            };
            if let Some(preset) = &up.preset {
                line(
                    "preset",
                    format!(
                        "{preset} (filled: {})",
                        if up.preset_filled.is_empty() {
                            "nothing".into()
                        } else {
                            up.preset_filled.join(", ")
                        }
                    ),
                );
            }
            line("listen", up.listen.to_string());
            line("url", up.url.to_string());
            line("retry_on", format!("{:?}", up.retry_on));
            line(
                "retry_body_limit",
                ByteSize(up.retry_body_limit).to_string(),
            );
            line(
                "timeout",
                humantime::format_duration(up.timeout).to_string(),
            );
            let l = &up.limits;
            line(
                "limits",
                format!(
                    "{} connections, {} of headers within {}, upstream connect {}",
                    l.max_connections,
                    ByteSize(l.max_header_size),
                    humantime::format_duration(l.header_timeout),
                    humantime::format_duration(l.connect_timeout)
                ),
            );
            if let Some(ca) = &up.ca_file {
                line("ca_file", ca.display().to_string());
            }
            line("auth.grant", a.grant.as_str().into());
            line("auth.token_url", a.token_url.to_string());
            if a.grant == Grant::WinbooksExchange {
                line("auth.username", a.username.clone().unwrap_or_default());
                line("auth.exchange_token", redacted(a.exchange_token.is_some()));
            } else {
                line("auth.client_id", a.client_id.clone());
                line("auth.client_auth", a.client_auth.as_str().into());
                line("auth.client_secret", redacted(a.client_secret.is_some()));
            }
            if a.grant == Grant::Password {
                line("auth.username", a.username.clone().unwrap_or_default());
                line("auth.password", redacted(a.password.is_some()));
            }
            if a.grant == Grant::RefreshToken {
                line(
                    "auth.refresh_token",
                    match &a.refresh_token {
                        Some(_) => "[redacted]".into(),
                        None => format!(
                            "(none: the state store must hold one for upstream `{}`)",
                            up.name
                        ),
                    },
                );
            }
            if let Some(scope) = &a.scope {
                line("auth.scope", scope.clone());
            }
            for k in a.params.keys() {
                // Values may be credentials (client assertions and the like).
                line(&format!("auth.params.{k}"), "[redacted]".into());
            }
            let refresh = match a.refresh_before {
                Some(d) => format!(
                    "at 80% of the lifetime or {} before expiry",
                    humantime::format_duration(d)
                ),
                None => "at 80% of the lifetime".into(),
            };
            line("refresh", refresh);
            line(
                "auth.refresh_wait",
                humantime::format_duration(a.refresh_wait).to_string(),
            );
            line(
                "auth.timeout",
                humantime::format_duration(a.timeout).to_string(),
            );
            if let Some(tls) = &up.tls {
                line(
                    "tls",
                    format!(
                        "HTTPS on listen: cert {}, key {}",
                        tls.cert.display(),
                        tls.key.display()
                    ),
                );
            }
            if let Some(inbound) = &up.inbound {
                line(
                    "inbound.keys",
                    format!("{} key(s) [redacted]", inbound.keys.len()),
                );
            }
            match &up.quota {
                Some(quota) => {
                    for (k, v) in quota.describe() {
                        line(&k, v);
                    }
                }
                None => line("quota", "(none: no limits enforced)".into()),
            }
        }
        out
    }

    /// Settings that work but deserve a second look.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for up in &self.upstreams {
            if !up.listen.ip().is_loopback() && up.tls.is_none() {
                out.push(format!(
                    "upstream `{}` listens on {} over plain HTTP: inbound keys cross the network unencrypted; put it behind TLS or a trusted network",
                    up.name, up.listen
                ));
            }
            for (key, url) in [("url", &up.url), ("auth.token_url", &up.auth.token_url)] {
                if url.scheme() == "http" && !is_loopback_host(url) {
                    out.push(format!(
                        "upstream `{}` {key} uses plain http to a remote host: credentials cross the network unencrypted",
                        up.name
                    ));
                }
            }
        }
        out
    }
}

fn redacted(set: bool) -> String {
    if set {
        "[redacted]".into()
    } else {
        "(not set)".into()
    }
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Where token records live, parsed from `state.store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    File(PathBuf),
}

impl StoreLocation {
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        if let Some(dir) = text.strip_prefix("file:") {
            if dir.is_empty() {
                return Err("`file:` needs a directory, e.g. \"file:./state\"".into());
            }
            Ok(StoreLocation::File(PathBuf::from(dir)))
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            Err("the Redis store is not available in this version; use \"file:DIR\"".into())
        } else {
            Err(format!(
                "`{text}` is not a store; use \"file:DIR\" (for example \"file:./state\")"
            ))
        }
    }
}

/// The text of the config file at `path`, and its name for messages.
fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(e) => Err(ConfigError {
            file,
            problems: vec![Problem {
                key: String::new(),
                line: None,
                message: format!(
                    "cannot read the config file: {e} (pass -c FILE or set TOLLGATE_CONFIG)"
                ),
            }],
        }),
    }
}

fn parse_toml(text: &str) -> Result<toml::Value, Problem> {
    toml::from_str(text).map_err(|e| Problem {
        key: String::new(),
        line: e.span().map(|s| line_of_offset(text, s.start)),
        message: format!("not valid TOML: {}", e.message()),
    })
}

/// Apply each upstream's `preset`; returns, per upstream, the keys it filled.
/// Replace every `${NAME}` in `value`; returns the values taken from the environment (to be
/// kept out of error messages), or every variable that is missing.
fn interpolated(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, Vec<Problem>> {
    let mut secrets = Vec::new();
    let mut problems = Vec::new();
    interpolate(value, &mut Vec::new(), env, &mut secrets, &mut problems);
    if problems.is_empty() {
        Ok(secrets)
    } else {
        Err(problems)
    }
}

/// `value` as the typed `T`, or the key that does not fit, with `secrets` cut out of serde's
/// message.
fn typed<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    secrets: &[String],
) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| Problem {
        key: render_path(e.path()),
        line: None,
        message: redact(&e.inner().to_string(), secrets),
    })
}

fn apply_presets(value: &mut toml::Value, problems: &mut Vec<Problem>) -> Vec<Vec<String>> {
    let Some(upstreams) = value.get_mut("upstream").and_then(|u| u.as_array_mut()) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for (i, up) in upstreams.iter_mut().enumerate() {
        let filled = match up.as_table_mut() {
            Some(table) => crate::provider::apply(table).unwrap_or_else(|message| {
                problems.push(Problem {
                    key: format!("upstream[{i}].preset"),
                    line: None,
                    message,
                });
                Vec::new()
            }),
            None => Vec::new(),
        };
        all.push(filled);
    }
    all
}

/// Replace `${NAME}` in every string of the document, recording where it failed.
fn interpolate(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &impl Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        toml::Value::String(s) => match expand(s, env, secrets) {
            Ok(expanded) => *s = expanded,
            Err(message) => problems.push(Problem {
                key: join_path(path),
                line: None,
                message,
            }),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                interpolate(item, path, env, secrets, problems);
                path.pop();
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                path.push(k.clone());
                interpolate(item, path, env, secrets, problems);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Expand `${NAME}` references in one string. `$$` stands for a literal `$`.
fn expand(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or("`${` without a closing `}`; write `$${` for a literal `${`")?;
            let name = &tail[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid variable name (letters, digits and '_')"
                ));
            }
            let found = env(name).ok_or_else(|| {
                format!("environment variable {name} is not set; export it or remove `${{{name}}}`")
            })?;
            if !found.is_empty() {
                secrets.push(found.clone());
            }
            out.push_str(&found);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Serde messages quote the offending value; a value that came from the environment may be a
/// secret, so it is cut out.
fn redact(message: &str, secrets: &[String]) -> String {
    let mut out = message.to_owned();
    for s in secrets {
        out = out.replace(s.as_str(), "[redacted]");
    }
    out
}

fn join_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if !seg.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
    }
    out
}

fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let segs: Vec<String> = path
        .iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Map { key } => Some(if key == "upstreams" {
                "upstream".to_owned()
            } else {
                key.clone()
            }),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    join_path(&segs)
}

/// Fill in the line of each problem from the key path.
fn locate(text: &str, mut problems: Vec<Problem>) -> Vec<Problem> {
    let doc = toml_edit::ImDocument::parse(text).ok();
    for p in &mut problems {
        if p.line.is_none() {
            p.line = doc
                .as_ref()
                .and_then(|d| key_offset(d.as_table(), &split_path(&p.key)))
                .map(|off| line_of_offset(text, off));
        }
    }
    problems
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                segs.push(Seg::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    segs
}

/// Byte offset of the deepest key of `path` that exists in the document.
fn key_offset(table: &dyn toml_edit::TableLike, path: &[Seg<'_>]) -> Option<usize> {
    let Some((Seg::Key(name), rest)) = path.split_first() else {
        return None;
    };
    let (key, item) = table.get_key_value(name)?;
    let here = key.span().map(|s| s.start);
    let deeper = match rest.first() {
        None => None,
        Some(Seg::Index(i)) => {
            let tail = &rest[1..];
            if let Some(aot) = item.as_array_of_tables() {
                aot.get(*i)
                    .and_then(|t| key_offset(t, tail).or_else(|| t.span().map(|s| s.start)))
            } else if let Some(arr) = item.as_array() {
                arr.get(*i).and_then(|v| {
                    v.as_inline_table()
                        .and_then(|t| key_offset(t, tail))
                        .or_else(|| v.span().map(|s| s.start))
                })
            } else {
                None
            }
        }
        Some(Seg::Key(_)) => item.as_table_like().and_then(|t| key_offset(t, rest)),
    };
    deeper.or(here)
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    parse_size(&text).map_err(serde::de::Error::custom)
}

fn de_http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    parse_http_url(&text).map_err(serde::de::Error::custom)
}

/// `"30s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write a number and a unit, like \"30s\", \"5m\" or \"1h\"")
    })
}

/// `"1MiB"`, `"512KiB"`, `"100000"` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<ByteSize>()
        .map(|s| s.as_u64())
        .map_err(|e| {
            format!("`{text}` is not a size ({e}); write a number and a unit, like \"1MiB\" or \"512KiB\"")
        })
}

/// An absolute `http` or `https` URL with a host.
pub fn parse_http_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| {
        format!(
            "`{text}` is not a URL ({e}); write it in full, like \"https://api.example.com/base\""
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "`{text}` has scheme `{}`; only http and https are supported",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}` has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs, in `check` output and in Host headers.
        return Err("must not contain user:password@; use the auth keys for credentials".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[state]
store = "file:/tmp/tollgate-test"

[[upstream]]
name = "api"
listen = "127.0.0.1:8080"
url = "https://api.example.com/v1"
timeout = "30s"
retry_body_limit = "2MiB"

[upstream.auth]
grant = "refresh_token"
token_url = "https://id.example.com/connect/token"
client_id = "my.app/first"
client_secret = "${SECRET}"
refresh_token = "${SEED}"
params = { resource = "urn:x" }
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t-value".into()),
            "SEED" => Some("seed-token-value".into()),
            _ => None,
        }
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, "t.toml", env).unwrap_err().to_string()
    }

    #[test]
    fn loads_a_good_file_with_env_and_defaults() {
        let c = Config::parse(GOOD, "t.toml", env).unwrap();
        let up = &c.upstreams[0];
        assert_eq!(up.timeout, Duration::from_secs(30));
        assert_eq!(up.retry_body_limit, 2 * 1024 * 1024);
        assert_eq!(up.retry_on, vec![401]);
        assert_eq!(
            up.auth.client_secret.as_ref().unwrap().expose(),
            "s3cr3t-value"
        );
        assert_eq!(up.auth.client_auth, ClientAuth::Post);
        assert_eq!(up.auth.params["resource"], "urn:x");
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert!(!format!("{c:?}").contains("seed-token-value"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("timeout = \"30s\"", "timeout = \"30s\"\ncolour = \"red\"");
        let err = error_of(&text);
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.starts_with("t.toml:"), "{err}");
        assert!(err.contains("upstream[0]"), "{err}");
    }

    #[test]
    fn missing_env_var_names_variable_key_and_line() {
        let text = GOOD.replace("${SEED}", "${NOT_SET_ANYWHERE}");
        let err = error_of(&text);
        assert!(err.contains("NOT_SET_ANYWHERE"), "{err}");
        assert!(err.contains("upstream[0].auth.refresh_token"), "{err}");
        let line = GOOD.lines().position(|l| l.contains("${SEED}")).unwrap() + 1;
        assert!(err.starts_with(&format!("t.toml:{line}:")), "{err}");
    }

    #[test]
    fn bad_duration_names_key() {
        let err = error_of(&GOOD.replace("\"30s\"", "\"thirty seconds\""));
        assert!(err.contains("upstream[0].timeout"), "{err}");
        assert!(err.contains("not a duration"), "{err}");
        let line = GOOD.lines().position(|l| l.starts_with("timeout")).unwrap() + 1;
        assert!(err.starts_with(&format!("t.toml:{line}:")), "{err}");
    }

    #[test]
    fn bad_url_names_key() {
        let err = error_of(&GOOD.replace("https://id.example.com/connect/token", "id.example.com"));
        assert!(err.contains("upstream[0].auth.token_url"), "{err}");
        assert!(err.contains("not a URL"), "{err}");
        let err = error_of(&GOOD.replace("https://api.example.com/v1", "ftp://x/"));
        assert!(err.contains("upstream[0].url"), "{err}");
    }

    #[test]
    fn wrong_type_never_echoes_an_env_secret() {
        let text = GOOD.replace(
            "timeout = \"30s\"",
            "timeout = \"30s\"\nretry_on = \"${SECRET}\"",
        );
        let err = error_of(&text);
        assert!(err.contains("retry_on"), "{err}");
        assert!(!err.contains("s3cr3t-value"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let text = GOOD
            .replace("name = \"api\"", "name = \"API!\"")
            .replace("client_secret = \"${SECRET}\"\n", "");
        let err = error_of(&text);
        assert!(err.contains("upstream[0].name"), "{err}");
        assert!(err.contains("upstream[0].auth.client_secret"), "{err}");
        assert_eq!(err.lines().count(), 2, "{err}");
    }

    #[test]
    fn reserved_params_and_unknown_grant_are_refused() {
        let err = error_of(&GOOD.replace("resource = \"urn:x\"", "grant_type = \"x\""));
        assert!(err.contains("auth.params.grant_type"), "{err}");
        let err = error_of(&GOOD.replace("\"refresh_token\"\n", "\"magic\"\n"));
        assert!(err.contains("upstream[0].auth.grant"), "{err}");
        assert!(err.contains("client_credentials"), "{err}");
    }

    #[test]
    fn remote_listen_and_url_credentials_are_refused() {
        let err = error_of(&GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080"));
        assert!(
            err.contains("upstream[0].listen") && err.contains("reachable from other machines"),
            "{err}"
        );
        let err = error_of(&GOOD.replace(
            "https://api.example.com/v1",
            "https://u:${SECRET}@api.example.com/v1",
        ));
        assert!(
            err.contains("upstream[0].url") && err.contains("user:password"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t-value"), "{err}");
    }

    /// `tollgate status` reads `[admin]` alone: variables named elsewhere need not be set.
    #[test]
    fn admin_alone_ignores_the_rest_of_the_file() {
        let text = "[admin]\nlisten = \"127.0.0.1:${PORT}\"\n\n[[upstream]]\n\
                    name = \"api\"\nsecret = \"${NOT_SET}\"\n";
        let env = |name: &str| (name == "PORT").then(|| "9901".to_owned());
        let admin = Config::parse_admin(text, "t.toml", env).unwrap().unwrap();
        assert_eq!(admin.listen, "127.0.0.1:9901".parse().unwrap());

        let none = Config::parse_admin("[state]\nstore = \"file:x\"\n", "t.toml", |_| None);
        assert!(none.unwrap().is_none());

        let bad = Config::parse_admin("\n[admin]\nlisten = \"here\"\n", "t.toml", |_| None);
        let err = bad.unwrap_err().to_string();
        assert!(err.starts_with("t.toml:3: admin.listen: "), "{err}");
    }

    #[test]
    fn a_remote_listen_needs_inbound_keys_that_are_long_enough() {
        let remote = GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080");
        let with_keys = |keys: &str| format!("{remote}\n[upstream.inbound]\nkeys = {keys}\n");
        let config =
            Config::parse(&with_keys("[\"${SECRET}-and-then-some\"]"), "t.toml", env).unwrap();
        let described = config.describe();
        assert!(described.contains("1 key(s) [redacted]"), "{described}");
        assert!(!described.contains("s3cr3t"), "{described}");
        assert!(config.warnings().iter().any(|w| w.contains("plain HTTP")));
        for (keys, expected) in [
            ("[]", "upstream[0].inbound.keys: is empty"),
            ("[\"short\"]", "inbound.keys[0]: must be at least 16"),
            (
                "[\"has a space in the middle\"]",
                "inbound.keys[0]: must be at least 16",
            ),
        ] {
            let err = Config::parse(&with_keys(keys), "t.toml", env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{keys}: {err}");
        }
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = error_of("[state]\nstore = \n");
        assert!(err.starts_with("t.toml:2"), "{err}");
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

    #[test]
    fn quota_keys_are_checked_and_described() {
        let with_quota = |lines: &str| format!("{GOOD}\n[upstream.quota]\n{lines}\n");
        let config = Config::parse(
            &with_quota(
                "edition = \"enterprise\"\nlicenses = 7\nday_starts = \"06:30\"\nper_minute = 600",
            ),
            "t.toml",
            env,
        )
        .unwrap();
        let described = config.describe();
        assert!(
            described
                .contains("3500 (enterprise edition, 7 licences), the day starts at 06:30 UTC"),
            "{described}"
        );
        assert!(described.contains("600 (burst 600)"), "{described}");
        for (lines, expected) in [
            (
                "per_day = 10\nedition = \"business\"\nlicenses = 2",
                "quota.edition: set either per_day",
            ),
            (
                "edition = \"business\"",
                "quota.licenses: is required with edition",
            ),
            ("per_minute = 0", "quota.per_minute: must be at least 1"),
            (
                "queue = 5",
                "quota.queue: is the wait line of `concurrency`",
            ),
            ("day_starts = \"25:00\"", "is not a time of day"),
            ("edition = \"gold\"", "edition"),
            ("per_week = 3", "per_week"),
        ] {
            let error = Config::parse(&with_quota(lines), "t.toml", env)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{lines}: {error}");
        }
    }

    #[test]
    fn dollar_escapes() {
        let mut s = Vec::new();
        assert_eq!(expand("a$$b$c", &env, &mut s).unwrap(), "a$b$c");
        assert!(expand("${OPEN", &env, &mut s).is_err());
    }
}
