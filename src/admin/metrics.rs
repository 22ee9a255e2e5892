//! `GET /metrics`: the Prometheus text exposition (format 0.0.4) of every upstream's
//! counters, read when scraped: answers by status, the upstream's response time, token
//! refreshes by result, quota windows and refusals, the day's use by key and the forecast.
//! Label values are upstream and key names (`[A-Za-z0-9._-]`, `#N`, `-`) and fixed words,
//! escaped all the same; nothing secret is shown.

use super::Upstream;
use crate::counters::{self, BUCKETS};
use crate::store::StateStore;
use std::fmt::Write;

/// One metric family: its HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
            return;
        }
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// A label value as the exposition format wants it: `\\`, `"` and newlines escaped.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

pub fn render(upstreams: &[Upstream], store: &dyn StateStore) -> String {
    let mut out = String::new();
    let totals: Vec<counters::Totals> = upstreams
        .iter()
        .map(|u| counters::totals(u.stats.iter().map(|s| &**s)))
        .collect();
    requests(&mut out, upstreams, &totals);
    refreshes(&mut out, upstreams);
    quotas(&mut out, upstreams);
    day(&mut out, upstreams);
    if let Some(health) = store.health() {
        let name = "tollgate_state_store_errors_total";
        let help = "Operations on the shared state store that failed or timed out.";
        let mut f = Family::new(&mut out, name, "counter", help);
        f.sample(name, &[], health.errors);
        let name = "tollgate_state_store_losses_total";
        let help = "Times this replica found that the shared state store had lost its data.";
        let mut f = Family::new(&mut out, name, "counter", help);
        f.sample(name, &[], health.losses);
        let name = "tollgate_replicas";
        let help = "Replicas seen on the shared state store in the last six heartbeats.";
        let mut f = Family::new(&mut out, name, "gauge", help);
        f.sample(name, &[], health.replicas.len());
    }
    out
}

/// Answers by status and the upstream's response time.
fn requests(out: &mut String, upstreams: &[Upstream], totals: &[counters::Totals]) {
    let name = "tollgate_requests_total";
    let help = "Answers to clients, by inbound key (its name; - for none) and status.";
    let mut f = Family::new(out, name, "counter", help);
    for (u, t) in upstreams.iter().zip(totals) {
        for (key, status, n) in &t.by_status {
            let status = status.to_string();
            let labels = [("upstream", &*u.name), ("key", key), ("status", &status)];
            f.sample(name, &labels, n);
        }
    }

    let name = "tollgate_upstream_duration_seconds";
    let mut f = Family::new(
        out,
        name,
        "histogram",
        "Time from sending a request upstream to its response head.",
    );
    for (u, t) in upstreams.iter().zip(totals) {
        for (le, n) in BUCKETS.iter().zip(&t.cumulative) {
            let le = le.to_string();
            f.sample(
                &format!("{name}_bucket"),
                &[("upstream", &u.name), ("le", &le)],
                n,
            );
        }
        f.sample(
            &format!("{name}_bucket"),
            &[("upstream", &u.name), ("le", "+Inf")],
            t.count,
        );
        f.sample(
            &format!("{name}_sum"),
            &[("upstream", &u.name)],
            t.sum.as_secs_f64(),
        );
        f.sample(&format!("{name}_count"), &[("upstream", &u.name)], t.count);
    }
}

fn refreshes(out: &mut String, upstreams: &[Upstream]) {
    let name = "tollgate_token_refreshes_total";
    let mut f = Family::new(
        out,
        name,
        "counter",
        "Token refresh attempts, by identity (- for the upstream's own) and result (ok, error: retried, refused: needs a new grant).",
    );
    for u in upstreams {
        for tokens in std::iter::once(&u.tokens).chain(&u.identities) {
            let identity = tokens.identity();
            for (result, n) in tokens.refreshes() {
                let labels = [
                    ("upstream", u.name.as_str()),
                    ("identity", identity),
                    ("result", result),
                ];
                f.sample(name, &labels, n);
            }
        }
    }
}

/// The day's use by key, for the group, and when the daily limit will be reached.
fn day(out: &mut String, upstreams: &[Upstream]) {
    let days: Vec<_> = upstreams
        .iter()
        .filter_map(|u| Some((u, u.usage.day()?)))
        .collect();
    let name = "tollgate_key_used_today";
    let help = "Requests sent upstream today by inbound key, by every replica (- for none).";
    let mut f = Family::new(out, name, "gauge", help);
    for (u, day) in &days {
        for (key, used) in u.usage.by_key(day) {
            f.sample(name, &[("upstream", &u.name), ("key", &key)], used);
        }
    }
    let name = "tollgate_quota_exhausted_in_seconds";
    let help = "Seconds until the daily limit is reached at the pace of the last hour; +Inf when not today.";
    let mut f = Family::new(out, name, "gauge", help);
    for (u, day) in &days {
        if day.limit.is_none() {
            continue;
        }
        let seconds = day
            .exhausted_in_s()
            .map_or("+Inf".to_owned(), |s| s.to_string());
        f.sample(name, &[("upstream", &u.name)], seconds);
    }
}

/// What is left of each window, and the refusals by the limit that made them.
fn quotas(out: &mut String, upstreams: &[Upstream]) {
    let name = "tollgate_quota_remaining";
    let mut f = Family::new(out, name, "gauge", "Requests left in the quota window.");
    for u in upstreams {
        for w in u.quota.windows() {
            f.sample(
                name,
                &[("upstream", &u.name), ("window", w.policy.name)],
                w.remaining,
            );
        }
    }

    let name = "tollgate_rejected_total";
    let mut f = Family::new(
        out,
        name,
        "counter",
        "Requests tollgate answered with 429 itself, by the limit that refused them.",
    );
    for u in upstreams {
        for (reason, n) in u.quota.rejected() {
            f.sample(
                name,
                &[("upstream", &u.name), ("reason", reason.as_str())],
                n,
            );
        }
    }
}
