//! `tollgate check`'s warnings (also logged by `serve` at start): settings that work but deserve
//! a second look — an admin listener others can reach without a key, a Redis store that is
//! remote without TLS or a password or holds unsealed tokens, a listener on the network over
//! plain HTTP, credentials sent over plain HTTP, a refresh token still to be had.
//!
//! Must not: print a secret (a Redis URL shows as its `shown` form).

use super::{Config, RedisUrl, StoreLocation};
use url::Url;

impl Config {
    /// Settings that work but deserve a second look.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(admin) = self.admin.as_ref().filter(|a| a.key.is_none()) {
            if !admin.listen.ip().is_loopback() {
                out.push(format!(
                    "[admin] listens on {} without a key: anyone who reaches it can read the status page, /status and /metrics (upstreams, quotas, inbound key names); listen on 127.0.0.1, or set [admin] key = \"${{ADMIN_KEY}}\"",
                    admin.listen
                ));
            }
        }
        if let Ok(StoreLocation::Redis(redis)) = self.state.location() {
            out.extend(redis_warnings(&redis));
            if self.state.key.is_none() {
                out.push(format!(
                    "state.store {} holds the refresh tokens unsealed: anyone with the Redis password, and every backup or replica of it, can read and redeem them; set [state] key (see docs/security.md, \"Sealed token records\")",
                    redis.shown
                ));
            }
        }
        for up in &self.upstreams {
            if !up.listen.ip().is_loopback() && up.tls.is_none() {
                out.push(format!(
                    "upstream `{}` listens on {} over plain HTTP: inbound keys cross the network unencrypted; put it behind TLS or a trusted network",
                    up.name, up.listen
                ));
            }
            if up.auth.grant == crate::config::Grant::RefreshToken
                && up.auth.refresh_token.is_none()
            {
                out.push(format!(
                    "upstream `{0}` has no refresh token in the config (auth.refresh_token is unset or empty): unless `tollgate login {0}` has stored one, run it before `serve` can call the API",
                    up.name
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

/// A Redis store on another machine without TLS, or without a password.
fn redis_warnings(redis: &RedisUrl) -> Vec<String> {
    let Ok(url) = Url::parse(redis.url.expose()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // A redis:// host is opaque to `url` (not a special scheme): its IP is parsed here.
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        return out;
    }
    if url.scheme() == "redis" {
        out.push(format!(
            "state.store {} uses redis:// (no TLS) to a remote host: access tokens and refresh tokens cross the network readable; use rediss:// (Redis with TLS)",
            redis.shown
        ));
    }
    if url.password().is_none_or(str::is_empty) {
        out.push(format!(
            "state.store {} has no password: anyone who reaches that port can read the refresh tokens and redeem them; give Redis a password (requirepass) and write it as redis://:${{REDIS_PASSWORD}}@HOST:PORT/DB",
            redis.shown
        ));
    }
    out
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
