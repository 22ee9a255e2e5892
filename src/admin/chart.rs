//! The day drawn for the status page: an inline SVG of requests per 15 minutes, the even pace
//! that spends the daily limit exactly by the day's end, and where the forecast says the limit
//! is reached; then a table of the keys with their use and budget. No script, no external
//! asset: the page stays one self-contained document.

use super::html::escape;
use super::status::DayStatus;
use std::fmt::Write;

/// Width of one slot's bar, in SVG units; a day of 96 slots is 960 wide.
const BAR: u64 = 10;
const HEIGHT: u64 = 120;

/// The chart and the key table of `day`.
pub fn render(out: &mut String, day: &DayStatus) {
    let slots_in_day = (86_400 / day.slot_s.max(1)).max(1);
    let width = slots_in_day * BAR;
    let even = day.limit.map(|l| l as f64 / slots_in_day as f64);
    let tallest = day.slots.iter().copied().max().unwrap_or(0) as f64;
    let top = tallest.max(even.unwrap_or(0.0)).max(1.0) * 1.15;
    let y = |n: f64| HEIGHT as f64 - n / top * HEIGHT as f64;
    let x_of = |seconds: u64| seconds as f64 / day.slot_s as f64 * BAR as f64;
    let _ = writeln!(
        out,
        "<figure class=\"day\">\n<svg role=\"img\" viewBox=\"0 -14 {width} {h}\" \
         width=\"100%\" preserveAspectRatio=\"none\" aria-label=\"requests per 15 minutes today\">\n\
         <title>Requests per 15 minutes since {started}</title>",
        h = HEIGHT + 30,
        started = escape(&day.started),
    );
    for (i, n) in day.slots.iter().enumerate().filter(|(_, n)| **n > 0) {
        let top_y = y(*n as f64);
        let _ = writeln!(
            out,
            "<rect class=\"slot\" x=\"{x}\" y=\"{top_y:.1}\" width=\"{w}\" height=\"{h:.1}\">\
             <title>{start}–{end}: {n}</title></rect>",
            x = i as u64 * BAR,
            w = BAR - 1,
            h = HEIGHT as f64 - top_y,
            start = clock(&day.started, i as u64 * day.slot_s),
            end = clock(&day.started, (i as u64 + 1) * day.slot_s),
        );
    }
    if let (Some(even), Some(limit)) = (even, day.limit) {
        let _ = writeln!(
            out,
            "<line class=\"pace\" x1=\"0\" x2=\"{width}\" y1=\"{py:.1}\" y2=\"{py:.1}\">\
             <title>the even pace: {even:.0} per 15 minutes spends {limit} by the day's end</title></line>",
            py = y(even),
        );
    }
    let now_x = x_of(day.elapsed_s);
    let _ = writeln!(
        out,
        "<line class=\"now\" x1=\"{now_x:.1}\" x2=\"{now_x:.1}\" y1=\"0\" y2=\"{HEIGHT}\"><title>now</title></line>"
    );
    if let Some(left) = day.exhausted_in_s {
        let at = x_of(day.elapsed_s + left).min(width as f64);
        let _ = writeln!(
            out,
            "<line class=\"forecast\" x1=\"{now_x:.1}\" y1=\"{HEIGHT}\" x2=\"{at:.1}\" y2=\"0\"></line>\n\
             <line class=\"forecast\" x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"0\" y2=\"{HEIGHT}\">\
             <title>{forecast}</title></line>\n\
             <text class=\"forecast\" x=\"{tx:.1}\" y=\"-3\" text-anchor=\"{anchor}\">limit at {time}</text>",
            forecast = escape(&day.forecast),
            tx = at,
            anchor = if at > width as f64 * 0.85 { "end" } else { "middle" },
            time = clock(&day.started, day.elapsed_s + left),
        );
    }
    for hour in (0..=24).step_by(6) {
        let hx = x_of(hour * 3600);
        let anchor = match hour {
            0 => "start",
            24 => "end",
            _ => "middle",
        };
        let _ = writeln!(
            out,
            "<text class=\"axis\" x=\"{hx:.1}\" y=\"{ty}\" text-anchor=\"{anchor}\">{time}</text>",
            ty = HEIGHT + 14,
            time = clock(&day.started, hour * 3600),
        );
    }
    let limit = day.limit.map_or(String::new(), |l| format!(" of {l}"));
    let _ = writeln!(
        out,
        "</svg>\n<figcaption>{used}{limit} used since {started}; {forecast}.</figcaption>\n</figure>",
        used = day.used,
        started = escape(&day.started),
        forecast = escape(&day.forecast),
    );
    keys(out, day);
}

/// The keys, with their use today and their budget.
fn keys(out: &mut String, day: &DayStatus) {
    if day.keys.is_empty() {
        return;
    }
    out.push_str("<table class=\"keys\">\n<tr><th>Key</th><th>Used today</th><th>Budget</th><th></th></tr>\n");
    for key in &day.keys {
        let (budget, meter) = match key.budget {
            Some(b) => (
                b.to_string(),
                format!(
                    "<meter min=\"0\" max=\"{b}\" low=\"{low}\" high=\"{high}\" optimum=\"0\" value=\"{used}\">{used} of {b}</meter>",
                    low = b * 8 / 10,
                    high = b * 95 / 100,
                    used = key.used_today,
                ),
            ),
            None => ("none".to_owned(), String::new()),
        };
        let _ = writeln!(
            out,
            "<tr class=\"key\"><td><code>{}</code></td><td>{}</td><td>{budget}</td><td>{meter}</td></tr>",
            escape(&key.name),
            key.used_today,
        );
    }
    out.push_str("</table>\n");
}

/// `seconds` into the day that started at `started` (RFC 3339, UTC) as `HH:MM` UTC.
fn clock(started: &str, seconds: u64) -> String {
    let part = |range: std::ops::Range<usize>| {
        started
            .get(range)
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let at = (part(11..13) * 3600 + part(14..16) * 60 + seconds) % 86_400;
    format!("{:02}:{:02}", at / 3600, at / 60 % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::KeyStatus;

    fn day() -> DayStatus {
        DayStatus {
            started: "2026-12-02T00:00:00Z".into(),
            elapsed_s: 8 * 3600 + 600,
            slot_s: 900,
            slots: [vec![0; 28], vec![40; 5]].concat(),
            used: 200,
            limit: Some(2000),
            forecast: "at this pace the limit is reached at 19:10 UTC".into(),
            exhausted_in_s: Some(11 * 3600),
            keys: vec![
                KeyStatus {
                    name: "etl".into(),
                    used_today: 150,
                    budget: Some(500),
                },
                KeyStatus {
                    name: "<b>".into(),
                    used_today: 50,
                    budget: None,
                },
            ],
        }
    }

    #[test]
    fn the_day_has_bars_a_pace_line_a_forecast_and_the_keys() {
        let mut out = String::new();
        render(&mut out, &day());
        assert_eq!(out.matches("<rect class=\"slot\"").count(), 5, "{out}");
        assert!(out.contains("<title>07:00–07:15: 40</title>"), "{out}");
        assert!(
            out.contains("the even pace: 21 per 15 minutes spends 2000"),
            "{out}"
        );
        assert!(out.contains(">limit at 19:10</text>"), "{out}");
        assert!(
            out.contains(">12:00</text>"),
            "the axis shows the time of day"
        );
        assert!(out.contains("200 of 2000 used since 2026-12-02T00:00:00Z; at this pace"));
        assert!(
            out.contains("<td><code>etl</code></td><td>150</td><td>500</td>"),
            "{out}"
        );
        assert!(out.contains("<code>&lt;b&gt;</code>"), "names are escaped");
        // No forecast, no limit: bars only.
        let quiet = DayStatus {
            limit: None,
            exhausted_in_s: None,
            ..day()
        };
        let mut out = String::new();
        render(&mut out, &quiet);
        assert!(!out.contains("class=\"pace\"") && !out.contains("class=\"forecast\""));
    }
}
