//! The configuration file (`tollgate.toml`): what it may say and how it is read.
//!
//! Loading is a pipeline, one file per stage, each returning every problem it finds:
//!
//! ```text
//! text ─► TOML ─► ${NAME} replaced ─► presets filled in ─► typed, unknown keys refused
//!   (load.rs)     (interpolate.rs)     (load.rs)           (schema.rs, keys.rs, values.rs)
//!      ─► checks across keys ─► each problem placed on its line
//!         (validate.rs)          (locate.rs)
//! ```
//!
//! so a message reads `tollgate.toml:14: upstream[0].auth.grant: unknown variant ...`.
//! [`check`] describes the result for `tollgate check`, secrets redacted. Nothing here logs or
//! prints the values it loads: they hold secrets.

mod auth;
mod check;
mod files;
mod hints;
mod identity;
mod interpolate;
mod keys;
mod load;
mod locate;
pub mod presets;
mod schema;
mod validate;
mod values;
mod warnings;

pub use auth::{AuthConfig, ClientAuth, Grant};
pub use files::{ClientCert, UpstreamFiles};
pub use identity::{IdentityConfig, IdentityLimits};
pub use keys::{Budget, InboundKey};
pub use schema::{
    AdminConfig, Config, Edition, InboundConfig, LimitsConfig, LoginConfig, QuotaConfig, RedisUrl,
    StateConfig, StoreLocation, TlsConfig, UpstreamConfig, MIN_KEY_LEN,
};
pub use values::{parse_day_starts, parse_duration, parse_http_url, parse_size};

use std::fmt;

/// Where the config is read from when `-c` is not given and `$TOLLGATE_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "tollgate.toml";

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
    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The upstream called `name`, or a message listing the names there are (for the
    /// commands that take a NAME).
    pub fn upstream_named(&self, name: &str) -> Result<&UpstreamConfig, String> {
        self.upstream(name).ok_or_else(|| {
            let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
            format!(
                "no upstream named `{name}`; the config has: {}",
                names.join(", ")
            )
        })
    }
}

impl UpstreamConfig {
    /// The daily budgets of the named inbound keys that have one: (name, requests a day).
    pub fn budgets(&self) -> Vec<(String, u64)> {
        let daily = self.quota.as_ref().and_then(|q| q.daily_limit());
        let keys = self.inbound.iter().flat_map(|i| &i.keys);
        keys.filter_map(|k| Some((k.name.clone()?, k.budget?.per_day(daily)?)))
            .collect()
    }

    /// The TLS client settings for one of this upstream's sides, the API's or the token
    /// endpoint's: the public roots and `files.ca`, `pin_sha256` for the host of `url`, and
    /// `certificate` presented when the server asks for one.
    pub fn tls_client(
        &self,
        files: &UpstreamFiles,
        certificate: Option<&ClientCert>,
    ) -> Result<rustls::ClientConfig, String> {
        let pin = match &self.pin_sha256 {
            Some(text) => Some(crate::tls::upstream::Pin::parse(text)?),
            None => None,
        };
        let host = self.url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        crate::tls::upstream::client_config(files.ca.as_deref(), host, pin, certificate)
    }
}

/// What the tests of every stage load.
#[cfg(test)]
mod test_support {
    use super::Config;

    pub const GOOD: &str = r#"
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

    pub fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t-value".into()),
            "SEED" => Some("seed-token-value".into()),
            _ => None,
        }
    }

    pub fn error_of(text: &str) -> String {
        Config::parse(text, "t.toml", env).unwrap_err().to_string()
    }
}
