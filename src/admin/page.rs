//! `GET /` on the admin listener: the [`Status`] as a small HTML page for a browser.
//!
//! One self-contained document: inline CSS, no script, no external assets, and a
//! `<meta http-equiv="refresh">` so an open tab stays current. Every string that comes from
//! the status (upstream names, unready reasons) goes through [`escape`]. What the status holds
//! as identifiers (refusal reasons such as `key_budget`) is shown in words, and a duration as
//! [`seconds`] prints it ("under 1s", never "0s"). The page is drawn from the same [`Status`]
//! as `/status`, so it can show no more than that: never a token.

use super::html::escape;
use super::seconds;
use super::status::{
    IdentityStatus, QuotaStatus, Status, TokenState, UpstreamStatus, WindowStatus,
};
use crate::quota::Reason;
use std::fmt::Write;
use std::time::SystemTime;

/// Seconds between reloads of an open page.
const REFRESH_S: u32 = 10;

const STYLE: &str = "\
body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:52em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin:0 0 .4em}
section{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25em .6em .25em 0;vertical-align:middle}
th{font-weight:600;color:#555;border-bottom:1px solid #ddd}
meter{width:14em;height:1.1em}
.ready{color:#176b2c;font-weight:600}.unready{color:#b00020;font-weight:600}
.note{color:#555}.warn{color:#8a5300}
footer{color:#777;font-size:.85em}
figure.day{margin:1em 0}figure.day>svg{display:block;height:auto;background:#fafafa;border:1px solid #eee}
figure.day figcaption{color:#555;font-size:.9em}figure.day figcaption p{margin:.4em 0}
ul.legend{list-style:none;margin:.3em 0;padding:0}ul.legend li{margin:.15em 0}
svg.swatch{vertical-align:middle;margin-right:.3em}
rect.slot{fill:#4a7fb5}line.pace{stroke:#b00020;stroke-dasharray:6 4;stroke-width:1.5}
line.now{stroke:#999;stroke-width:1}line.forecast{stroke:#8a5300;stroke-dasharray:3 3;stroke-width:1.5}
line.grid{stroke:#e4e4e4;stroke-width:1}polyline.frame{fill:none;stroke:#999;stroke-width:1}
text{font:15px system-ui,sans-serif;fill:#555}text.forecast{fill:#8a5300}
table.keys{margin-top:.6em}";

/// The whole page for `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::with_capacity(4096);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\n\
         <title>tollgate status</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>\n\
         <h1>tollgate status</h1>\n"
    );
    if status.upstreams.is_empty() {
        out.push_str("<p class=\"note\">No upstream is configured.</p>\n");
    }
    for upstream in &status.upstreams {
        section(&mut out, upstream);
    }
    if let Some(store) = &status.store {
        let _ = writeln!(
            out,
            "<section>\n<h2>Replicas</h2>\n<p>{} on {}, this one <code>{}</code>: {}</p>",
            store.replicas.len(),
            escape(&store.store),
            escape(&store.replica),
            store
                .replicas
                .iter()
                .map(|r| format!("<code>{}</code>", escape(r)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(problem) = &store.problem {
            let _ = writeln!(out, "<p class=\"warn\">{}</p>", escape(problem));
        }
        out.push_str("</section>\n");
    }
    let _ = write!(
        out,
        "<footer>{} &middot; reloads every {REFRESH_S} s &middot; \
         <a href=\"/status\">/status</a> (JSON) &middot; <a href=\"/metrics\">/metrics</a></footer>\n\
         </body>\n</html>\n",
        httpdate::fmt_http_date(SystemTime::now())
    );
    out
}

/// Each identity's token in one line: its state, and when a request last used it.
fn identities(out: &mut String, identities: &[IdentityStatus]) {
    if identities.is_empty() {
        return;
    }
    let each: Vec<String> = identities
        .iter()
        .map(|i| {
            let state = match &i.token {
                TokenState::Ready { generation, .. } => format!("ready, generation {generation}"),
                TokenState::Unready { reason } => format!(
                    "<span class=\"unready\">unready</span>: {}",
                    escape(reason.as_deref().unwrap_or("no usable token"))
                ),
                TokenState::Unused => "not used yet".to_owned(),
            };
            let used = match i.last_used_s {
                Some(s) => format!(", last used {} ago", seconds(s)),
                None => String::new(),
            };
            format!("{}: {state}{used}", escape(&i.name))
        })
        .collect();
    let _ = writeln!(out, "<p>Identities: {}</p>", each.join("; "));
}

fn section(out: &mut String, upstream: &UpstreamStatus) {
    let _ = writeln!(out, "<section>\n<h2>{}</h2>", escape(&upstream.name));
    match &upstream.token {
        TokenState::Ready {
            generation,
            expires_in_s,
        } => {
            let _ = writeln!(
                out,
                "<p>Token: <span class=\"ready\">ready</span>, generation {generation}, \
                 expires in {}</p>",
                seconds(*expires_in_s)
            );
        }
        TokenState::Unready { reason } => {
            let reason = reason.as_deref().unwrap_or("no usable token");
            let _ = writeln!(
                out,
                "<p>Token: <span class=\"unready\">unready</span>: {}</p>",
                escape(reason)
            );
        }
        TokenState::Unused => out.push_str("<p>Token: not used yet</p>\n"),
    }
    identities(out, &upstream.identities);
    quota(out, &upstream.quota);
    if let Some(day) = &upstream.day {
        super::chart::render(out, day);
    }
    out.push_str("</section>\n");
}

fn quota(out: &mut String, quota: &QuotaStatus) {
    if quota.windows.is_empty() {
        out.push_str("<p class=\"note\">No quota window is configured.</p>\n");
    } else {
        out.push_str(
            "<table>\n<tr><th>Window</th><th>Used</th><th></th><th>Remaining</th>\
             <th>Resets in</th></tr>\n",
        );
        for w in &quota.windows {
            window_row(out, w);
        }
        out.push_str("</table>\n");
    }
    let mut notes = Vec::new();
    if let (Some(in_flight), Some(waiting)) = (quota.in_flight, quota.waiting) {
        notes.push(format!("In flight: {in_flight}, waiting: {waiting}"));
    }
    if let Some(held) = quota.held_back_s {
        notes.push(format!(
            "<span class=\"warn\">Held back for {}: the API answered 429</span>",
            seconds(held)
        ));
    }
    if !quota.rejected.is_empty() {
        let refused: Vec<String> = quota
            .rejected
            .iter()
            .map(|(label, n)| format!("{n} {}", reason(label)))
            .collect();
        notes.push(format!("Refused by tollgate: {}", refused.join(", ")));
    }
    for note in notes {
        let _ = writeln!(out, "<p>{note}</p>");
    }
}

/// A refusal reason's label (`key_budget`) in words; one the page does not know, with spaces.
fn reason(label: &str) -> String {
    match Reason::of_label(label) {
        Some(reason) => reason.words().to_owned(),
        None => escape(&label.replace('_', " ")),
    }
}

/// One window: a `<meter>` that turns amber past 80% and red past 95% of the limit.
fn window_row(out: &mut String, w: &WindowStatus) {
    let name = escape(&w.window);
    let label = if w.window == "day" {
        "today".to_owned()
    } else {
        format!("this {name}")
    };
    let _ = writeln!(
        out,
        "<tr><td>{name}</td><td>{used} / {limit}</td>\
         <td><meter min=\"0\" max=\"{limit}\" low=\"{low}\" high=\"{high}\" optimum=\"0\" \
         value=\"{used}\" title=\"{used} of {limit} used {label}\">{used} of {limit}</meter></td>\
         <td>{remaining}</td><td>{resets}</td></tr>",
        used = w.used,
        limit = w.limit,
        low = w.limit * 8 / 10,
        high = w.limit * 95 / 100,
        remaining = w.remaining,
        resets = seconds(w.resets_in_s),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::html::{snake_case_words, visible_text};
    use crate::admin::status::UpstreamStatus;

    /// An unready reason with markup in it is shown as text, not as markup.
    #[test]
    fn an_unready_reason_is_escaped_on_the_page() {
        let status = Status {
            upstreams: vec![UpstreamStatus {
                identities: Vec::new(),
                name: "api".into(),
                token: TokenState::Unready {
                    reason: Some("identity server said <b>no</b> & \"bye\"".into()),
                },
                quota: QuotaStatus::default(),
                day: None,
            }],
            store: None,
        };
        let page = render(&status);
        assert!(
            page.contains("said &lt;b&gt;no&lt;/b&gt; &amp; &quot;bye&quot;"),
            "{page}"
        );
        assert!(!page.contains("<b>no</b>"));
    }

    /// The day's window is drawn as a meter of used against the limit.
    #[test]
    fn the_day_is_a_meter() {
        let status = Status {
            upstreams: vec![UpstreamStatus {
                identities: Vec::new(),
                name: "api".into(),
                token: TokenState::Ready {
                    generation: 2,
                    expires_in_s: 3_599,
                },
                quota: QuotaStatus {
                    windows: vec![WindowStatus {
                        window: "day".into(),
                        limit: 2000,
                        used: 1500,
                        remaining: 500,
                        resets_in_s: 7_200,
                    }],
                    held_back_s: Some(30),
                    ..QuotaStatus::default()
                },
                day: None,
            }],
            store: None,
        };
        let page = render(&status);
        assert!(
            page.contains("max=\"2000\" low=\"1600\" high=\"1900\" optimum=\"0\" value=\"1500\""),
            "{page}"
        );
        assert!(page.contains("used today"), "{page}");
        assert!(page.contains("expires in 59m 59s"), "{page}");
        assert!(page.contains("<td>500</td><td>2h</td>"), "{page}");
        assert!(page.contains("Held back for 30s"), "{page}");
    }

    /// What the status holds as labels is read in words, and a window in its last second
    /// resets in "under 1s", not in "0s".
    #[test]
    fn labels_are_words_and_no_duration_is_0s() {
        let status = Status {
            upstreams: vec![UpstreamStatus {
                identities: Vec::new(),
                name: "api".into(),
                token: TokenState::Ready {
                    generation: 1,
                    expires_in_s: 0,
                },
                quota: QuotaStatus {
                    windows: vec![WindowStatus {
                        window: "minute".into(),
                        limit: 100,
                        used: 100,
                        remaining: 0,
                        resets_in_s: 0,
                    }],
                    held_back_s: Some(0),
                    rejected: [("key_budget", 3), ("per_day", 2), ("some_new_reason", 1)]
                        .into_iter()
                        .map(|(r, n)| (r.to_owned(), n))
                        .collect(),
                    ..QuotaStatus::default()
                },
                day: None,
            }],
            store: None,
        };
        let page = render(&status);
        let text = visible_text(&page);
        assert!(
            text.contains(
                "Refused by tollgate: 3 over a key's daily budget, 2 at the daily limit, \
                 1 some new reason"
            ),
            "{text}"
        );
        assert!(text.contains("expires in under 1s"), "{text}");
        assert!(text.contains("Held back for under 1s"), "{text}");
        assert!(page.contains("<td>under 1s</td></tr>"), "{page}");
        assert_eq!(snake_case_words(&text), Vec::<String>::new(), "{text}");
        assert!(!text.contains(" 0s"), "{text}");
    }
}
