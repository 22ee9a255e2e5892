//! `tollgate check`: the resolved settings, one per line, secrets shown as `[redacted]` (its
//! warnings are [`super::warnings`]).
//!
//! Must not: print a secret, or the value of a `${NAME}` (it may be one): a token URL's query
//! value that names a variable shows as `[redacted]` ([`shown_url`]).

use super::values::show_size;
use super::{AuthConfig, Config, Grant, QuotaConfig, StateConfig, StoreLocation};
use url::Url;

impl QuotaConfig {
    /// The effective limits, one per line, as `check` prints them.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(limit) = self.daily_limit() {
            let how = match (self.per_day, self.edition, self.licenses) {
                (None, Some(e), Some(l)) => format!(" ({} edition, {l} licenses)", e.as_str()),
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
        if let Some(l) = &self.per_identity {
            let each = describe_limits(l.per_minute, l.concurrency, l.queue);
            out.push((
                "quota.per_identity".into(),
                format!("{each} (each identity)"),
            ));
        }
        out
    }
}

/// An identity's own limits in words: `600/minute, 1 in flight, 5 waiting`.
fn describe_limits(
    per_minute: Option<u32>,
    concurrency: Option<u32>,
    queue: Option<u32>,
) -> String {
    let mut parts = Vec::new();
    if let Some(n) = per_minute {
        parts.push(format!("{n}/minute"));
    }
    if let Some(n) = concurrency {
        parts.push(format!("{n} in flight, {} waiting", queue.unwrap_or(0)));
    }
    parts.join(", ")
}

impl Config {
    /// The resolved settings as `check` prints them; secrets show as `[redacted]`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = describe_state(&self.state);
        if let Some(admin) = &self.admin {
            let _ = writeln!(out, "admin.listen = {}", admin.listen);
            if admin.key.is_some() {
                let _ = writeln!(out, "admin.key = [redacted]");
            }
        }
        for up in &self.upstreams {
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
            line("retry_body_limit", show_size(up.retry_body_limit));
            line(
                "timeout",
                humantime::format_duration(up.timeout).to_string(),
            );
            let l = &up.limits;
            line(
                "limits",
                format!(
                    "{} connections, {} of headers within {}, upstream connect {}, {} upstream connections; bodies: {} between reads, at least {}/s after 5s, {} held for replays",
                    l.max_connections,
                    show_size(l.max_header_size),
                    humantime::format_duration(l.header_timeout),
                    humantime::format_duration(l.connect_timeout),
                    l.max_upstream_connections,
                    humantime::format_duration(l.body_timeout),
                    show_size(l.min_body_rate),
                    show_size(l.max_buffered),
                ),
            );
            if let (Some(cert), Some(_)) = (&up.client_cert, &up.client_key) {
                line(
                    "client_cert",
                    format!("{} (with its key; contents not shown)", cert.display()),
                );
            }
            if let Some(ca) = &up.ca_file {
                line("ca_file", ca.display().to_string());
            }
            if let Some(pin) = &up.pin_sha256 {
                let host = up.url.host_str().unwrap_or_default();
                line(
                    "pin_sha256",
                    format!("{pin} (only this key is trusted for {host})"),
                );
            }
            let token_url = shown_url(
                &up.auth.token_url,
                self.token_urls_as_written.get(&up.name).map(String::as_str),
            );
            describe_auth(&up.auth, &up.name, &token_url, &mut line);
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
            let each = up.identity_limits();
            for identity in &up.identities {
                let keys = up.inbound.iter().flat_map(|i| i.keys.iter());
                let reached: Vec<String> = keys
                    .enumerate()
                    .filter(|(_, k)| k.identity.as_ref() == Some(&identity.name))
                    .map(|(i, k)| k.label(i).to_string())
                    .collect();
                let by = match reached.is_empty() {
                    true => "no key reaches the API as it".to_owned(),
                    false => format!("keys {}", reached.join(", ")),
                };
                let limits = match each.iter().find(|(n, _)| *n == identity.name) {
                    Some((_, q)) => format!(
                        "; limits of its own: {}",
                        describe_limits(q.per_minute, q.concurrency, q.queue)
                    ),
                    None => String::new(),
                };
                line(
                    &format!("identity {}", identity.name),
                    format!(
                        "{} credentials of its own; {by}{limits}",
                        identity_fields(identity)
                    ),
                );
            }
            if let Some(inbound) = &up.inbound {
                let daily = up.quota.as_ref().and_then(|q| q.daily_limit());
                let keys: Vec<String> = inbound
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let label = k.label(i);
                        let budget = match k.budget {
                            Some(b @ crate::config::Budget::Share(_)) => match b.per_day(daily) {
                                Some(n) => format!("budget {b}: {n} a day"),
                                None => format!("budget {b}"),
                            },
                            Some(b) => format!("budget {b}"),
                            None => "no budget".into(),
                        };
                        match &k.identity {
                            Some(id) => format!("{label} ({budget}, as identity {id})"),
                            None => format!("{label} ({budget})"),
                        }
                    })
                    .collect();
                line(
                    "inbound.keys",
                    format!("{} [keys redacted]", keys.join(", ")),
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
}

/// Which credentials an identity gives, by name (never their values).
fn identity_fields(identity: &crate::config::IdentityConfig) -> String {
    let given = [
        ("client_id", identity.client_id.is_some()),
        ("client_secret", identity.client_secret.is_some()),
        ("refresh_token", identity.refresh_token.is_some()),
        ("username", identity.username.is_some()),
        ("password", identity.password.is_some()),
        ("exchange_token", identity.exchange_token.is_some()),
        ("params", !identity.params.is_empty()),
    ];
    let names: Vec<&str> = given
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
    match names.is_empty() {
        true => "no".into(),
        false => names.join(", "),
    }
}

fn redacted(set: bool) -> String {
    if set {
        "[redacted]".into()
    } else {
        "(not set)".into()
    }
}

/// An extra token-request field as `check` shows it: the value of a field known to name
/// something (an audience, a resource, a tenant…), `[redacted]` for any other, which may be a
/// credential (a client assertion, a key, a signature).
fn param(name: &str, value: &str) -> String {
    const SHOWN: [&str; 10] = [
        "audience",
        "resource",
        "tenant",
        "tenant_id",
        "organization",
        "realm",
        "prompt",
        "acr_values",
        "ui_locales",
        "login_hint",
    ];
    if SHOWN.contains(&name.to_ascii_lowercase().as_str()) {
        value.to_owned()
    } else {
        "[redacted]".into()
    }
}

/// The `state.*` lines: the store (a Redis password as `[redacted]`), and for Redis its keys.
fn describe_state(state: &StateConfig) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Ok(location) = state.location() else {
        return out;
    };
    let _ = writeln!(out, "state.store = {}", location.shown());
    if let Ok(keys) = state.keys() {
        let sealed = match keys.fingerprint() {
            Some(id) => format!("sealed with key {id} (AES-256-GCM)"),
            None => "plain: no [state] key, the token records are not sealed".into(),
        };
        let _ = writeln!(out, "state.key = {sealed}");
        let previous: Vec<&str> = keys.previous_fingerprints().collect();
        if !previous.is_empty() {
            let _ = writeln!(
                out,
                "state.previous_keys = {} (open only)",
                previous.join(", ")
            );
        }
    }
    if let StoreLocation::Redis(_) = location {
        let _ = writeln!(out, "state.prefix = {}", state.prefix);
        let timeout = humantime::format_duration(state.timeout);
        let _ = writeln!(out, "state.timeout = {timeout}");
        let heartbeat = humantime::format_duration(state.heartbeat);
        let _ = writeln!(out, "state.heartbeat = {heartbeat}");
        if let Some(ca) = &state.ca_file {
            let _ = writeln!(out, "state.ca_file = {}", ca.display());
        }
    }
    out
}

/// A URL as `check` shows it. When the file wrote it with a `${NAME}` (`written`), the query
/// is the one written, each value that names a variable as `[redacted]`
/// (`?tenant=[redacted]&region=eu`): what came from the environment may be a secret.
fn shown_url(url: &Url, written: Option<&str>) -> String {
    let Some(written) = written.filter(|w| w.contains("${")) else {
        return url.to_string();
    };
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let mut out = shown.to_string();
    if let Some((_, query)) = written.split_once('?') {
        let query = query.split('#').next().unwrap_or_default();
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !name.contains("${") && value.contains("${") => {
                    format!("{name}=[redacted]")
                }
                _ if pair.contains("${") => "[redacted]".into(),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// The `auth.*` lines of one upstream; `token_url` as [`shown_url`] shows it.
fn describe_auth(
    a: &AuthConfig,
    upstream: &str,
    token_url: &str,
    line: &mut impl FnMut(&str, String),
) {
    line("auth.grant", a.grant.as_str().into());
    line("auth.token_url", token_url.to_owned());
    if a.grant == Grant::WinbooksExchange {
        line("auth.username", a.username.clone().unwrap_or_default());
        line("auth.exchange_token", redacted(a.exchange_token.is_some()));
    } else {
        line("auth.client_id", a.client_id.clone());
        line("auth.client_auth", a.client_auth.as_str().into());
        use crate::config::ClientAuth;
        if !matches!(a.client_auth, ClientAuth::PrivateKeyJwt | ClientAuth::Tls) {
            line("auth.client_secret", redacted(a.client_secret.is_some()));
        }
        let files = [
            ("auth.private_key_file", &a.private_key_file),
            ("auth.certificate_file", &a.certificate_file),
            ("auth.client_cert", &a.client_cert),
            ("auth.client_key", &a.client_key),
        ];
        for (key, path) in files {
            if let Some(path) = path {
                line(key, format!("{} [contents not shown]", path.display()));
            }
        }
        if let Some(kid) = &a.key_id {
            line("auth.key_id", kid.clone());
        }
        if let Some(alg) = &a.assertion_alg {
            line("auth.assertion_alg", alg.clone());
        }
        if let Some(audience) = &a.assertion_audience {
            line("auth.assertion_audience", audience.clone());
        }
        if a.dpop {
            line(
                "auth.dpop",
                "true (tokens bound to a key of each lineage, kept in its record; a proof with every request)".into(),
            );
        }
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
                    upstream
                ),
            },
        );
    }
    if let Some(scope) = &a.scope {
        line("auth.scope", scope.clone());
    }
    for (k, v) in &a.params {
        line(&format!("auth.params.{k}"), param(k, v));
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
    line(
        "auth.answer_timeout",
        humantime::format_duration(a.answer_timeout).to_string(),
    );
}

#[cfg(test)]
mod tests {
    use super::super::test_support::GOOD;
    use super::*;

    /// `check` shows a token URL's query value that came from `${NAME}` as `[redacted]`, and
    /// the rest of the URL as it is.
    #[test]
    fn a_token_url_query_value_from_the_environment_is_redacted() {
        let text = GOOD.replace(
            "https://id.example.com/connect/token",
            "https://id.example.com/token?tenant=${TG_TEST_TENANT}&region=eu",
        );
        let env = |name: &str| match name {
            "TG_TEST_TENANT" => Some("tenant-s3cr3t-42".to_owned()),
            _ => super::super::test_support::env(name),
        };
        let config = Config::parse(&text, "t.toml", env).unwrap();
        assert_eq!(
            config.upstreams[0].auth.token_url.query(),
            Some("tenant=tenant-s3cr3t-42&region=eu"),
            "the token request still goes to the real URL"
        );
        let described = config.describe();
        assert!(
            described.contains("https://id.example.com/token?tenant=[redacted]&region=eu"),
            "{described}"
        );
        assert!(!described.contains("s3cr3t"), "{described}");
    }

    #[test]
    fn shown_url_redacts_every_part_of_the_query_that_names_a_variable() {
        let shown =
            |real: &str, written: &str| shown_url(&Url::parse(real).unwrap(), Some(written));
        assert_eq!(
            shown("https://h/t?a=1&b=x", "https://h/t?a=1&b=x"),
            "https://h/t?a=1&b=x",
            "nothing interpolated"
        );
        assert_eq!(
            shown("https://h/t?a=1&b=x&c=y", "https://h/t?a=1&b=${B}"),
            "https://h/t?a=1&b=[redacted]",
            "a value holding `&` does not add parameters"
        );
        assert_eq!(
            shown("https://h/t?s=v&a=1", "https://h/t?${QUERY}&a=1"),
            "https://h/t?[redacted]&a=1"
        );
        assert_eq!(
            shown("https://h/t?k=pre-v", "https://h/t?k=pre-${V}"),
            "https://h/t?k=[redacted]"
        );
        assert_eq!(
            shown("https://h/x?s=1", "https://h/${P}"),
            "https://h/x",
            "a query that came with a variable elsewhere is left out"
        );
        assert_eq!(
            shown_url(&Url::parse("https://h/t?a=1").unwrap(), None),
            "https://h/t?a=1"
        );
    }
}
