//! `tollgate status` output: the [`Status`] as a plain-text table, one row per upstream.
//!
//! Rows stay on one line each so they can be grepped; a reason why a token is unready is
//! usually long, so it is printed under the table instead of in a column, and so is each
//! upstream's day: its use, the forecast, and its keys.

use super::seconds;
use super::status::{DayStatus, QuotaStatus, Status, TokenState};

const HEADER: [&str; 5] = ["UPSTREAM", "TOKEN", "EXPIRES IN", "GENERATION", "QUOTA"];

/// The token columns of a row (state, expires in, generation); an unready token's reason
/// goes to `reasons`, under the table.
fn token(name: &str, token: &TokenState, reasons: &mut Vec<String>) -> [String; 3] {
    match token {
        TokenState::Ready {
            generation,
            expires_in_s,
        } => [
            "ready".to_owned(),
            seconds(*expires_in_s),
            generation.to_string(),
        ],
        TokenState::Unready { reason } => {
            let reason = reason.as_deref().unwrap_or("no usable token");
            reasons.push(format!("{name}: unready: {reason}"));
            ["unready".to_owned(), "-".to_owned(), "-".to_owned()]
        }
        TokenState::Unused => ["unused".to_owned(), "-".to_owned(), "-".to_owned()],
    }
}

/// The table, ending with a newline.
pub fn render(status: &Status) -> String {
    if status.upstreams.is_empty() {
        return "no upstream is configured\n".to_owned();
    }
    let mut rows = vec![HEADER.map(str::to_owned)];
    let mut reasons = Vec::new();
    let days: Vec<String> = status
        .upstreams
        .iter()
        .filter_map(|u| Some(day(&u.name, u.day.as_ref()?)))
        .collect();
    for u in &status.upstreams {
        let [state, expires, generation] = token(&u.name, &u.token, &mut reasons);
        rows.push([u.name.clone(), state, expires, generation, quota(&u.quota)]);
        // An identity's row: its token, and in the quota column when it was last used (the
        // quota is the upstream's, shared).
        for i in &u.identities {
            let name = format!("{} as {}", u.name, i.name);
            let [state, expires, generation] = token(&name, &i.token, &mut reasons);
            let used = match i.last_used_s {
                Some(s) => format!("last used {} ago", seconds(s)),
                None => "not used yet".to_owned(),
            };
            rows.push([name, state, expires, generation, used]);
        }
    }
    let mut widths = [0; HEADER.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !days.is_empty() {
        out.push('\n');
        for line in days {
            out.push_str(&line);
        }
    }
    if let Some(store) = &status.store {
        out.push_str(&format!(
            "\n{} replica(s) on {} (this one {}): {}\n",
            store.replicas.len(),
            store.store,
            store.replica,
            store.replicas.join(", ")
        ));
        if let Some(problem) = &store.problem {
            reasons.push(format!("state store: {problem}"));
        }
    }
    if !reasons.is_empty() {
        out.push('\n');
        for reason in reasons {
            out.push_str(&reason);
            out.push('\n');
        }
    }
    out
}

/// `day 3/10 (resets in 12h), minute 1/100 (resets in 1s); 0 in flight, 0 waiting`.
fn quota(quota: &QuotaStatus) -> String {
    let mut parts = Vec::new();
    let windows: Vec<String> = quota
        .windows
        .iter()
        .map(|w| {
            format!(
                "{} {}/{} (resets in {})",
                w.window,
                w.used,
                w.limit,
                seconds(w.resets_in_s)
            )
        })
        .collect();
    if !windows.is_empty() {
        parts.push(windows.join(", "));
    }
    if let (Some(in_flight), Some(waiting)) = (quota.in_flight, quota.waiting) {
        parts.push(format!("{in_flight} in flight, {waiting} waiting"));
    }
    if let Some(held) = quota.held_back_s {
        parts.push(format!("held back {} after a 429", seconds(held)));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

/// `beproduct today: 1500 of 2000; at this pace the limit is reached at 16:40 UTC` and a line
/// of its keys: `  keys: etl 400/500, reports 120, - 3`.
fn day(name: &str, day: &DayStatus) -> String {
    let limit = day.limit.map_or(String::new(), |l| format!(" of {l}"));
    let mut out = format!("{name} today: {}{limit}; {}\n", day.used, day.forecast);
    if !day.keys.is_empty() {
        let keys: Vec<String> = day
            .keys
            .iter()
            .map(|k| match k.budget {
                Some(b) => format!("{} {}/{b}", k.name, k.used_today),
                None => format!("{} {}", k.name, k.used_today),
            })
            .collect();
        out.push_str(&format!("  keys: {}\n", keys.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::{KeyStatus, UpstreamStatus, WindowStatus};

    fn window(name: &str, used: u64, limit: u64, resets_in_s: u64) -> WindowStatus {
        WindowStatus {
            window: name.into(),
            limit,
            used,
            remaining: limit - used,
            resets_in_s,
        }
    }

    /// Columns line up, each upstream is one row, and an unready reason follows the table.
    #[test]
    fn one_row_per_upstream_and_reasons_below() {
        let status = Status {
            upstreams: vec![
                UpstreamStatus {
                    identities: Vec::new(),
                    name: "beproduct".into(),
                    token: TokenState::Ready {
                        generation: 12,
                        expires_in_s: 3_300,
                    },
                    quota: QuotaStatus {
                        windows: vec![
                            window("minute", 4, 600, 1),
                            window("day", 1500, 2000, 7_260),
                        ],
                        in_flight: Some(1),
                        waiting: Some(0),
                        held_back_s: Some(30),
                        ..QuotaStatus::default()
                    },
                    day: Some(DayStatus {
                        started: "2026-12-02T00:00:00Z".into(),
                        elapsed_s: 36_000,
                        slot_s: 900,
                        slots: vec![],
                        used: 1500,
                        limit: Some(2000),
                        forecast: "at this pace the limit is reached at 16:40 UTC".into(),
                        exhausted_in_s: Some(24_000),
                        keys: vec![
                            KeyStatus {
                                name: "etl".into(),
                                used_today: 400,
                                budget: Some(500),
                            },
                            KeyStatus {
                                name: "-".into(),
                                used_today: 3,
                                budget: None,
                            },
                        ],
                    }),
                },
                UpstreamStatus {
                    identities: Vec::new(),
                    name: "erp".into(),
                    token: TokenState::Unready {
                        reason: Some("invalid_grant: run `tollgate login erp`".into()),
                    },
                    quota: QuotaStatus::default(),
                    day: None,
                },
            ],
            store: None,
        };
        assert_eq!(
            render(&status),
            "\
UPSTREAM   TOKEN    EXPIRES IN  GENERATION  QUOTA
beproduct  ready    55m         12          minute 4/600 (resets in 1s), day 1500/2000 (resets in 2h 1m); 1 in flight, 0 waiting; held back 30s after a 429
erp        unready  -           -           -

beproduct today: 1500 of 2000; at this pace the limit is reached at 16:40 UTC
  keys: etl 400/500, - 3

erp: unready: invalid_grant: run `tollgate login erp`
"
        );
    }

    #[test]
    fn no_upstreams() {
        let status = Status {
            upstreams: vec![],
            store: None,
        };
        assert_eq!(render(&status), "no upstream is configured\n");
    }
}
