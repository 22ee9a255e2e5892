//! `tollgate status` output: the [`Status`] as a plain-text table, one row per upstream.
//!
//! Rows stay on one line each so they can be grepped; a reason why a token is unready is
//! usually long, so it is printed under the table instead of in a column.

use super::status::{QuotaStatus, Status, TokenState};
use std::time::Duration;

const HEADER: [&str; 5] = ["UPSTREAM", "TOKEN", "EXPIRES IN", "GENERATION", "QUOTA"];

/// The table, ending with a newline.
pub fn render(status: &Status) -> String {
    if status.upstreams.is_empty() {
        return "no upstream is configured\n".to_owned();
    }
    let mut rows = vec![HEADER.map(str::to_owned)];
    let mut reasons = Vec::new();
    for u in &status.upstreams {
        let (state, expires, generation) = match &u.token {
            TokenState::Ready {
                generation,
                expires_in_s,
            } => (
                "ready".to_owned(),
                seconds(*expires_in_s),
                generation.to_string(),
            ),
            TokenState::Unready { reason } => {
                let reason = reason.as_deref().unwrap_or("no usable token");
                reasons.push(format!("{}: unready: {reason}", u.name));
                ("unready".to_owned(), "-".to_owned(), "-".to_owned())
            }
        };
        rows.push([u.name.clone(), state, expires, generation, quota(&u.quota)]);
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

/// Whole seconds as `1h 2m 3s`.
fn seconds(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::{UpstreamStatus, WindowStatus};

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
                },
                UpstreamStatus {
                    name: "erp".into(),
                    token: TokenState::Unready {
                        reason: Some("invalid_grant: run `tollgate login erp`".into()),
                    },
                    quota: QuotaStatus::default(),
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
