//! Checks that span several keys, or that types alone cannot express: unique names and
//! ports, keys a grant requires, inbound keys on a listener others can reach, an admin key
//! that cannot be guessed, limits in range.
//! Every problem is reported, not only the first.

use super::auth::{check_auth, check_cert_pair};
use super::StoreLocation;
use super::{AdminConfig, Config, Problem, QuotaConfig, StateConfig};
use super::{Budget, UpstreamConfig, MIN_KEY_LEN};
use std::collections::HashSet;
use std::time::Duration;

impl Config {
    /// Checks that span several keys or that types alone cannot express.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                line: None,
                message,
            })
        };
        check_state(&self.state, &mut report);
        if let Some(admin) = &self.admin {
            check_admin(admin, &mut report);
        }
        if self.upstreams.is_empty() {
            report(
                "upstream",
                "no [[upstream]] is configured; add one with name, listen, url and [upstream.auth]"
                    .into(),
            );
        }
        let mut names = HashSet::new();
        // Each listen address, and who has it, for a clash to name both.
        let mut listens = std::collections::HashMap::new();
        if let Some(admin) = &self.admin {
            listens.insert(admin.listen, "[admin] listen".to_owned());
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            let mut report = Report {
                problems: &mut problems,
                upstream: i,
            };
            check_name(up, &mut report);
            if !names.insert(up.name.as_str()) {
                report.at(
                    "name",
                    format!(
                        "`{}` is used by two upstreams; names must be unique",
                        up.name
                    ),
                );
            }
            check_inbound_and_tls(up, &mut report);
            check_limits(up, &mut report);
            // Port 0 asks the system for a free port: two of them never clash.
            if up.listen.port() != 0 {
                let this = format!("the listen of upstream `{}`", up.name);
                if let Some(other) = listens.insert(up.listen, this) {
                    report.at(
                        "listen",
                        format!("{} is already {other}; give each its own port", up.listen),
                    );
                }
            }
            check_target(up, &mut report);
            check_auth(&up.auth, &mut report);
            super::identity::check(up, &mut |key, message| report.at(key, message));
            if let Some(quota) = &up.quota {
                for (k, message) in quota.problems() {
                    report.at(&format!("quota.{k}"), message);
                }
            }
        }
        problems
    }
}

/// `[state]`: a store tollgate can open, and what a Redis store needs.
fn check_state(state: &StateConfig, report: &mut impl FnMut(&str, String)) {
    if let Some(Err(e)) = state.key.as_ref().map(crate::seal::check_key) {
        report("state.key", e);
    }
    for (i, key) in state.previous_keys.iter().enumerate() {
        if let Err(e) = crate::seal::check_key(key) {
            report(&format!("state.previous_keys[{i}]"), e);
        }
    }
    if !state.previous_keys.is_empty() && state.key.is_none() {
        report(
            "state.previous_keys",
            "open records only; set [state] key too, which seals them from now on".into(),
        );
    }
    let redis = match state.location() {
        Err(message) => return report("state.store", message),
        Ok(StoreLocation::File(_)) => return,
        Ok(StoreLocation::Redis(redis)) => redis,
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"-_.:".contains(&b);
    if state.prefix.is_empty() || !state.prefix.bytes().all(valid) {
        report(
            "state.prefix",
            "must be letters, digits and `-_.:`, e.g. \"tollgate\"".into(),
        );
    }
    if state.timeout.is_zero() {
        report("state.timeout", "must be more than 0s".into());
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&state.heartbeat) {
        report(
            "state.heartbeat",
            "must be between 100ms and 60s, e.g. \"5s\"".into(),
        );
    }
    match &state.ca_file {
        Some(_) if !redis.shown.starts_with("rediss://") => report(
            "state.ca_file",
            "is only used with rediss:// (Redis over TLS)".into(),
        ),
        Some(ca) if !ca.is_file() => report(
            "state.ca_file",
            format!("{} does not exist or is not a file", ca.display()),
        ),
        _ => {}
    }
}

/// `[admin] key`: long enough not to be guessed, and sendable in a header.
fn check_admin(admin: &AdminConfig, report: &mut impl FnMut(&str, String)) {
    let Some(key) = &admin.key else { return };
    let key = key.expose();
    if key.chars().count() < MIN_KEY_LEN || key.bytes().any(|b| !b.is_ascii_graphic()) {
        report(
            "admin.key",
            format!("must be at least {MIN_KEY_LEN} visible ASCII characters without spaces; make one with `openssl rand -hex 32`"),
        );
    }
}

/// The problems of one upstream, under `upstream[i].`.
pub(super) struct Report<'a> {
    problems: &'a mut Vec<Problem>,
    upstream: usize,
}

impl Report<'_> {
    pub(super) fn at(&mut self, key: &str, message: String) {
        self.problems.push(Problem {
            key: format!("upstream[{}].{key}", self.upstream),
            line: None,
            message,
        });
    }
}

fn check_name(up: &UpstreamConfig, report: &mut Report<'_>) {
    let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if up.name.is_empty() || !up.name.bytes().all(valid) {
        report.at(
            "name",
            format!(
                "`{}` is not a valid name: use lowercase letters, digits and '-'",
                up.name
            ),
        );
    }
}

/// Who may reach the listener: inbound keys where others can, and the HTTPS files.
fn check_inbound_and_tls(up: &UpstreamConfig, report: &mut Report<'_>) {
    let keys = up.inbound.as_ref().map_or(&[][..], |i| &i.keys[..]);
    if !up.listen.ip().is_loopback() && keys.is_empty() {
        report.at(
            "listen",
            format!(
                "{} is reachable from other machines, and anyone who reaches it would call the API with your token; listen on 127.0.0.1, or require keys: [upstream.inbound] keys = [\"${{TOOL_KEY}}\"]",
                up.listen
            ),
        );
    }
    if up.inbound.is_some() && keys.is_empty() {
        report.at(
            "inbound.keys",
            "is empty: list at least one key, or remove [upstream.inbound]".into(),
        );
    }
    let daily = up.quota.as_ref().and_then(|q| q.daily_limit());
    for (j, k) in keys.iter().enumerate() {
        let at = format!("inbound.keys[{j}]");
        let key = k.key.expose();
        if key.chars().count() < MIN_KEY_LEN || key.bytes().any(|b| !b.is_ascii_graphic()) {
            report.at(
                &at,
                format!("must be at least {MIN_KEY_LEN} visible ASCII characters without spaces; make one with `openssl rand -hex 32`"),
            );
        }
        if let Some(name) = &k.name {
            let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if name.is_empty() || name.len() > 64 || !name.chars().all(fine) || name == "-" {
                report.at(
                    &format!("{at}.name"),
                    "must be 1 to 64 letters, digits, `-`, `_` or `.`, and not `-` alone (it names the key in logs and metrics; `-` counts requests without a key)".into(),
                );
            }
            if keys[..j]
                .iter()
                .any(|other| other.name.as_ref() == Some(name))
            {
                report.at(
                    &format!("{at}.name"),
                    format!("`{name}` names two keys: give each its own name"),
                );
            }
        }
        match k.budget {
            Some(Budget::PerDay(0)) => report.at(
                &format!("{at}.per_day"),
                "must be at least 1 (remove the key to shut it out)".into(),
            ),
            Some(Budget::Share(_)) if daily.is_none() => report.at(
                &format!("{at}.share"),
                "is a share of the upstream's daily limit, and this upstream has none: set [upstream.quota] per_day, or give the key per_day = N".into(),
            ),
            Some(b @ Budget::Share(_)) if b.per_day(daily) == Some(0) => report.at(
                &format!("{at}.share"),
                format!("{b} of {} is less than one request: give a larger share, or per_day = N", daily.unwrap_or(0)),
            ),
            _ => {}
        }
        if keys[..j].iter().any(|other| other.key.expose() == key) {
            report.at(
                &at,
                "is the same key as an earlier one: give each tool its own".into(),
            );
        }
    }
    if let Some(tls) = &up.tls {
        for (k, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
            if !path.is_file() {
                report.at(
                    k,
                    format!("{} does not exist or is not a file", path.display()),
                );
            }
        }
    }
}

/// `[upstream.limits]` in the ranges hyper enforces, and timeouts above zero.
fn check_limits(up: &UpstreamConfig, report: &mut Report<'_>) {
    let limits = &up.limits;
    if !(1..=1_000_000).contains(&limits.max_connections) {
        report.at(
            "limits.max_connections",
            "must be between 1 and 1000000".into(),
        );
    }
    if !(1..=1_000_000).contains(&limits.max_upstream_connections) {
        report.at(
            "limits.max_upstream_connections",
            "must be between 1 and 1000000".into(),
        );
    }
    if !(8 * 1024..=16 * 1024 * 1024).contains(&limits.max_header_size) {
        report.at(
            "limits.max_header_size",
            "must be between 8KiB and 16MiB".into(),
        );
    }
    for (k, d) in [
        ("limits.header_timeout", limits.header_timeout),
        ("limits.connect_timeout", limits.connect_timeout),
        ("limits.body_timeout", limits.body_timeout),
    ] {
        if d.is_zero() {
            report.at(k, "must be more than 0s".into());
        }
    }
    for (k, d) in [
        ("timeout", up.timeout),
        ("auth.timeout", up.auth.timeout),
        ("auth.answer_timeout", up.auth.answer_timeout),
    ] {
        if d.is_zero() {
            report.at(k, "must be more than 0s".into());
        }
    }
}

/// The API's URL, the statuses that trigger a replay, the CA file, the pin.
fn check_target(up: &UpstreamConfig, report: &mut Report<'_>) {
    if up.url.query().is_some() || up.url.fragment().is_some() {
        report.at(
            "url",
            "must not have a query or fragment: the client's path and query are appended to it"
                .into(),
        );
    }
    for (j, status) in up.retry_on.iter().enumerate() {
        if !(400..=599).contains(status) {
            report.at(
                &format!("retry_on[{j}]"),
                format!("{status} is not an error status; use 400-599, usually 401"),
            );
        }
    }
    if let Some(ca) = &up.ca_file {
        if !ca.is_file() {
            report.at(
                "ca_file",
                format!("{} does not exist or is not a file", ca.display()),
            );
        }
    }
    check_cert_pair(
        "",
        up.client_cert.as_deref(),
        up.client_key.as_deref(),
        report,
    );
    if let Some(pin) = &up.pin_sha256 {
        if let Err(e) = crate::tls::upstream::Pin::parse(pin) {
            report.at("pin_sha256", e);
        } else if up.url.scheme() != "https" {
            report.at(
                "pin_sha256",
                "pins the certificate of an https url; this url is plain http".into(),
            );
        }
    }
}

impl QuotaConfig {
    /// What is wrong with this table, as (key, message).
    pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (self.per_day, self.edition, self.licenses) {
            (Some(_), Some(_), _) => out.push((
                "edition",
                "set either per_day or edition with licenses, not both".into(),
            )),
            (_, Some(_), None) => out.push((
                "licenses",
                "is required with edition: the number of licenses the organisation holds".into(),
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, error_of, GOOD};
    use crate::config::Config;

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

    /// A pin must be a SHA-256 in one of the forms written, for an https url; `check` shows
    /// it with the host it applies to; the upstream connection cap is at least 1.
    #[test]
    fn pins_and_the_upstream_connection_cap_are_checked() {
        let with = |line: &str| {
            GOOD.replace(
                "timeout = \"30s\"\n",
                &format!("timeout = \"30s\"\n{line}\n"),
            )
        };
        let pin = "sha256//AXOFDzot2hoxc+GD6qi2OETrbbVAzib2/uKiK4v7LEo=";
        let config =
            Config::parse(&with(&format!("pin_sha256 = \"{pin}\"")), "t.toml", env).unwrap();
        let described = config.describe();
        assert!(
            described.contains(&format!(
                "{pin} (only this key is trusted for api.example.com)"
            )),
            "{described}"
        );
        let err = error_of(&with("pin_sha256 = \"sha256//short\""));
        assert!(
            err.contains("upstream[0].pin_sha256") && err.contains("openssl"),
            "{err}"
        );
        let plain = with(&format!("pin_sha256 = \"{pin}\"")).replace("https://api", "http://api");
        let err = error_of(&plain);
        assert!(
            err.contains("upstream[0].pin_sha256") && err.contains("plain http"),
            "{err}"
        );
        let err = error_of(&format!(
            "{GOOD}\n[upstream.limits]\nmax_upstream_connections = 0\n"
        ));
        assert!(err.contains("limits.max_upstream_connections"), "{err}");
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

    #[test]
    fn a_listen_address_taken_twice_names_both_places() {
        let text = format!("[admin]\nlisten = \"127.0.0.1:8080\"\n{GOOD}");
        let err = error_of(&text);
        assert!(
            err.contains("upstream[0].listen: 127.0.0.1:8080 is already [admin] listen; give each its own port"),
            "{err}"
        );
    }

    #[test]
    fn a_remote_listen_needs_inbound_keys_that_are_long_enough() {
        let remote = GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080");
        let with_keys = |keys: &str| format!("{remote}\n[upstream.inbound]\nkeys = {keys}\n");
        let config =
            Config::parse(&with_keys("[\"${SECRET}-and-then-some\"]"), "t.toml", env).unwrap();
        let described = config.describe();
        assert!(
            described.contains("#1 (no budget) [keys redacted]"),
            "{described}"
        );
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

    /// An admin listener others can reach is warned about until it has a key; the key is
    /// redacted and must be long enough.
    #[test]
    fn an_admin_listener_beyond_loopback_without_a_key_is_warned_about() {
        let with_admin = |lines: &str| format!("{GOOD}\n[admin]\n{lines}\n");
        let warnings = |lines: &str| {
            Config::parse(&with_admin(lines), "t.toml", env)
                .unwrap()
                .warnings()
        };
        let open = warnings("listen = \"0.0.0.0:9901\"");
        assert!(
            open.iter().any(
                |w| w.contains("[admin] listens on 0.0.0.0:9901 without a key")
                    && w.contains("set [admin] key")
            ),
            "{open:?}"
        );
        let admin_warning = |w: &Vec<String>| w.iter().any(|w| w.contains("[admin]"));
        assert!(!admin_warning(&warnings("listen = \"127.0.0.1:9901\"")));
        let keyed = "listen = \"0.0.0.0:9901\"\nkey = \"${SECRET}-admin\"";
        assert!(!admin_warning(&warnings(keyed)));
        let described = Config::parse(&with_admin(keyed), "t.toml", env)
            .unwrap()
            .describe();
        assert!(described.contains("admin.key = [redacted]"), "{described}");
        assert!(!described.contains("s3cr3t"), "{described}");
        let err = error_of(&with_admin("listen = \"0.0.0.0:9901\"\nkey = \"short\""));
        assert!(err.contains("admin.key: must be at least 16"), "{err}");
    }

    /// A Redis store on another machine is warned about without TLS and without a password,
    /// each on its own, and never with the password.
    #[test]
    fn a_remote_redis_without_tls_or_password_is_warned_about() {
        let warnings = |store: &str| {
            let text = GOOD.replace("file:/tmp/tollgate-test", store);
            Config::parse(&text, "t.toml", env).unwrap().warnings()
        };
        let no_tls = |w: &Vec<String>| w.iter().any(|w| w.contains("(no TLS) to a remote host"));
        let no_password = |w: &Vec<String>| w.iter().any(|w| w.contains("has no password"));

        let open = warnings("redis://redis.internal:6379/0");
        assert!(no_tls(&open) && no_password(&open), "{open:?}");
        assert!(
            open.iter()
                .any(|w| w.contains("tokens cross the network readable")
                    && w.contains("use rediss://")),
            "{open:?}"
        );
        assert!(
            open.iter()
                .any(|w| w.contains("read the refresh tokens and redeem them")
                    && w.contains("requirepass")),
            "{open:?}"
        );
        let clear = warnings("redis://:${SECRET}@redis.internal:6379/0");
        assert!(no_tls(&clear) && !no_password(&clear), "{clear:?}");
        assert!(clear.iter().all(|w| !w.contains("s3cr3t")), "{clear:?}");
        let unlocked = warnings("rediss://app@redis.internal:6380/0");
        assert!(!no_tls(&unlocked) && no_password(&unlocked), "{unlocked:?}");
        for fine in [
            "rediss://:${SECRET}@redis.internal:6380/0",
            "redis://127.0.0.1:6379/0",
            "redis://localhost",
            "redis://[::1]:6379",
        ] {
            let w = warnings(fine);
            assert!(!no_tls(&w) && !no_password(&w), "{fine}: {w:?}");
        }
    }

    /// Several problems are listed in the order of their lines in the file.
    #[test]
    fn problems_are_listed_in_line_order() {
        let text = GOOD
            .replace("127.0.0.1:8080", "0.0.0.0:8080")
            .replace("\"file:/tmp/tollgate-test\"", "\"nowhere:x\"")
            .replace(
                "grant = \"refresh_token\"",
                "grant = \"client_credentials\"",
            );
        let err = Config::parse(&text, "t.toml", env).unwrap_err().to_string();
        let lines: Vec<usize> = err
            .lines()
            .filter_map(|l| l.strip_prefix("t.toml:")?.split(':').next()?.parse().ok())
            .collect();
        assert!(lines.len() >= 3, "{err}");
        assert!(
            lines.windows(2).all(|w| w[0] <= w[1]),
            "{lines:?} in\n{err}"
        );
    }

    /// `check` shows an extra token-request field's value, unless it may be a credential.
    #[test]
    fn params_are_shown_unless_they_may_be_credentials() {
        let text = GOOD.replace(
            "resource = \"urn:x\"",
            "resource = \"urn:x\", audience = \"https://api.example.com\", client_assertion = \"${SECRET}\"",
        );
        let described = Config::parse(&text, "t.toml", env).unwrap().describe();
        assert!(described.contains("urn:x"), "{described}");
        assert!(described.contains("https://api.example.com"), "{described}");
        assert!(!described.contains("s3cr3t"), "{described}");
        assert!(
            described
                .lines()
                .any(|l| l.contains("auth.params.client_assertion") && l.contains("[redacted]")),
            "{described}"
        );
    }

    #[test]
    fn named_keys_have_budgets_that_are_checked_and_described() {
        let text = |keys: &str, quota: &str| {
            format!("{GOOD}\n[upstream.inbound]\nkeys = [{keys}]\n[upstream.quota]\n{quota}\n")
        };
        let etl = "{ name = \"etl\", key = \"${SECRET}-etl-key\", per_day = 500 }";
        let reports = "{ name = \"reports\", key = \"${SECRET}-reports\", share = \"20%\" }";
        let plain = "\"${SECRET}-plain-key\"";
        let both = format!("{etl}, {reports}, {plain}");
        let config = Config::parse(&text(&both, "per_day = 2000"), "t.toml", env).unwrap();
        let text_of = |keys: &str| text(keys, "per_day = 2000");
        let keys = &config.upstreams[0].inbound.as_ref().unwrap().keys;
        assert_eq!(keys[0].budget, Some(super::Budget::PerDay(500)));
        assert_eq!(keys[1].budget, Some(super::Budget::Share(2000)));
        assert_eq!(keys[1].budget.unwrap().per_day(Some(2000)), Some(400));
        // Shares are computed in integers: 32.3% of 1,000 is 323, not 322.
        let share = |text: &str| {
            let keys =
                format!("{{ name = \"r\", key = \"${{SECRET}}-reports\", share = \"{text}\" }}");
            let config = Config::parse(&text_of(&keys), "t.toml", env).unwrap();
            config.upstreams[0].inbound.as_ref().unwrap().keys[0]
                .budget
                .unwrap()
        };
        assert_eq!(share("32.3%").per_day(Some(1000)), Some(323));
        assert_eq!(share("2.5%").to_string(), "2.5% of the day");
        assert_eq!(share("100%").per_day(Some(1000)), Some(1000));
        let described = config.describe();
        assert!(
            described.contains("etl (budget 500 a day), reports (budget 20% of the day: 400 a day), #3 (no budget) [keys redacted]"),
            "{described}"
        );
        assert!(!described.contains("s3cr3t"), "{described}");
        for (keys, quota, expected) in [
            (reports, "per_minute = 5", "inbound.keys[0].share: is a share of the upstream's daily limit, and this upstream has none"),
            (&format!("{etl}, {}", etl.replace("-etl-key", "-other")), "per_day = 9", "inbound.keys[1].name: `etl` names two keys"),
            (&etl.replace("500", "0"), "per_day = 9", "inbound.keys[0].per_day: must be at least 1"),
            (&etl.replace("etl\"", "e t l\""), "per_day = 9", "inbound.keys[0].name: must be 1 to 64"),
            (&etl.replace("per_day = 500", "per_day = 5, share = \"1%\""), "per_day = 9", "has both per_day and share"),
            (&reports.replace("20%", "120%"), "per_day = 9", "write a percentage"),
            (&reports.replace("20%", "2.555%"), "per_day = 9", "at most two decimals"),
            (&reports.replace("20%", "0.5%"), "per_day = 9", "0.5% of the day of 9 is less than one request"),
            (&etl.replace("\"etl\"", "\"-\""), "per_day = 9", "not `-` alone"),
            (&etl.replace("per_day", "budget"), "per_day = 9", "a key is a string, or a table"),
        ] {
            let err = Config::parse(&text(keys, quota), "t.toml", env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{keys}: {err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
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
                .contains("3500 (enterprise edition, 7 licenses), the day starts at 06:30 UTC"),
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
}
