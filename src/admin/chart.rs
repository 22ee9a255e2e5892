//! The day drawn for the status page: an inline SVG of requests per 15 minutes against a
//! labelled y-axis, the even pace that spends the daily limit exactly by the day's end, and
//! where the forecast says the limit is reached; a legend in words under it; then a table of
//! the keys with their use and budget. No script, no external asset: the page stays one
//! self-contained document.
//!
//! Each upstream's chart has its own vertical scale — a shared one would flatten an upstream
//! with a small quota next to one with a large quota — so the y-axis is labelled (0, half,
//! top, in requests per 15 minutes) and the legend says the scale is this upstream's own.

use super::html::escape;
use super::status::{DayStatus, KeyStatus};
use crate::inbound_keys::NO_KEY;
use std::fmt::Write;

/// Width of one slot's bar, in SVG units; a day of 96 slots is 960 wide.
const BAR: u64 = 10;
/// Height of the plot, in SVG units, from the top of the y-axis to 0.
const HEIGHT: u64 = 160;
/// Room left of the plot for the y-axis labels, in SVG units.
const LEFT: u64 = 52;
/// Room above the plot for the forecast's label, and below it for the times of day.
const ABOVE: u64 = 18;
const BELOW: u64 = 22;

/// The chart, its legend and the key table of `day`.
pub fn render(out: &mut String, day: &DayStatus) {
    let slots_in_day = (86_400 / day.slot_s.max(1)).max(1);
    let width = slots_in_day * BAR;
    let even = day.limit.map(|l| l as f64 / slots_in_day as f64);
    let tallest = day.slots.iter().copied().max().unwrap_or(0) as f64;
    let top = scale_top(tallest.max(even.unwrap_or(0.0)));
    let y = |n: f64| HEIGHT as f64 - n / top as f64 * HEIGHT as f64;
    let x_of = |seconds: u64| seconds as f64 / day.slot_s.max(1) as f64 * BAR as f64;
    let since = since(&day.started);
    let _ = writeln!(
        out,
        "<figure class=\"day\">\n<svg role=\"img\" viewBox=\"-{LEFT} -{ABOVE} {w} {h}\" \
         width=\"100%\" aria-label=\"requests per 15 minutes since {since}, on a scale of 0 to {top}\">\n\
         <title>Requests per 15 minutes since {since}</title>",
        w = LEFT + width + 4,
        h = ABOVE + HEIGHT + BELOW,
    );
    y_axis(out, top, width);
    for (i, n) in day.slots.iter().enumerate().filter(|(_, n)| **n > 0) {
        let top_y = y(*n as f64);
        let _ = writeln!(
            out,
            "<rect class=\"slot\" x=\"{x}\" y=\"{top_y:.1}\" width=\"{w}\" height=\"{h:.1}\">\
             <title>{start}–{end} UTC: {n} request{s}</title></rect>",
            x = i as u64 * BAR,
            w = BAR - 1,
            h = HEIGHT as f64 - top_y,
            start = clock(&day.started, i as u64 * day.slot_s),
            end = clock(&day.started, (i as u64 + 1) * day.slot_s),
            s = if *n == 1 { "" } else { "s" },
        );
    }
    if let (Some(even), Some(limit)) = (even, day.limit) {
        let _ = writeln!(
            out,
            "<line class=\"pace\" x1=\"0\" x2=\"{width}\" y1=\"{py:.1}\" y2=\"{py:.1}\">\
             <title>even pace: {even} requests per 15 minutes spend the day's {limit} by its end</title></line>",
            py = y(even),
            even = per_slot(even),
        );
    }
    let now_x = x_of(day.elapsed_s);
    let _ = writeln!(
        out,
        "<line class=\"now\" x1=\"{now_x:.1}\" x2=\"{now_x:.1}\" y1=\"0\" y2=\"{HEIGHT}\">\
         <title>now, {now} UTC</title></line>",
        now = clock(&day.started, day.elapsed_s),
    );
    let reached = day.exhausted_in_s.map(|left| day.elapsed_s + left);
    if let Some(at_s) = reached {
        let at = x_of(at_s).min(width as f64);
        let anchor = if at > width as f64 * 0.85 {
            "end"
        } else if at < width as f64 * 0.1 {
            "start"
        } else {
            "middle"
        };
        let _ = writeln!(
            out,
            "<line class=\"forecast\" x1=\"{now_x:.1}\" y1=\"{HEIGHT}\" x2=\"{at:.1}\" y2=\"0\"></line>\n\
             <line class=\"forecast\" x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"0\" y2=\"{HEIGHT}\">\
             <title>{forecast}</title></line>\n\
             <text class=\"forecast\" x=\"{at:.1}\" y=\"-5\" text-anchor=\"{anchor}\">limit at {time}</text>",
            forecast = escape(&day.forecast),
            time = clock(&day.started, at_s),
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
            ty = HEIGHT + 17,
            time = clock(&day.started, hour * 3600),
        );
    }
    let limit = day.limit.map_or(String::new(), |l| format!(" of {l}"));
    let _ = writeln!(
        out,
        "</svg>\n<figcaption>\n<p>{used}{limit} used since {since}; {forecast}.</p>",
        used = day.used,
        forecast = escape(&day.forecast),
    );
    legend(out, day, top, even, reached);
    out.push_str("</figcaption>\n</figure>\n");
    keys(out, day);
}

/// The y-axis: the plot's frame and a labelled tick at 0, half the top and the top, with a
/// faint line across at each.
fn y_axis(out: &mut String, top: u64, width: u64) {
    for (value, ty) in [(top, 0), (top / 2, HEIGHT / 2)] {
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"0\" x2=\"{width}\" y1=\"{ty}\" y2=\"{ty}\"></line>"
        );
        tick(out, value, ty);
    }
    tick(out, 0, HEIGHT);
    let _ = writeln!(
        out,
        "<polyline class=\"frame\" points=\"0,0 0,{HEIGHT} {width},{HEIGHT}\"></polyline>"
    );
}

fn tick(out: &mut String, value: u64, ty: u64) {
    let _ = writeln!(
        out,
        "<text class=\"tick\" x=\"-6\" y=\"{y}\" text-anchor=\"end\">{label}</text>",
        y = ty + 4,
        label = short(value),
    );
}

/// What each mark of the chart means, in words, each with a swatch drawn as the chart draws it
/// (class `mark` besides the chart's own, so that the chart's marks can be told apart).
fn legend(out: &mut String, day: &DayStatus, top: u64, even: Option<f64>, reached: Option<u64>) {
    let item = |out: &mut String, mark: &str, words: String| {
        let _ = writeln!(
            out,
            "<li><svg class=\"swatch\" viewBox=\"0 0 28 12\" width=\"28\" height=\"12\" \
             aria-hidden=\"true\">{mark}</svg> {words}</li>"
        );
    };
    out.push_str("<ul class=\"legend\">\n");
    item(
        out,
        "<rect class=\"slot mark\" x=\"6\" y=\"1\" width=\"16\" height=\"11\"></rect>",
        format!(
            "Requests per 15 minutes, on this upstream's own scale (left axis, 0 to {}; \
             times in UTC)",
            short(top)
        ),
    );
    if let (Some(even), Some(limit)) = (even, day.limit) {
        item(
            out,
            "<line class=\"pace mark\" x1=\"0\" x2=\"28\" y1=\"6\" y2=\"6\"></line>",
            format!(
                "Even pace: {} requests per 15 minutes spend the day's quota of {limit} \
                 by the day's end",
                per_slot(even)
            ),
        );
    }
    item(
        out,
        "<line class=\"now mark\" x1=\"14\" x2=\"14\" y1=\"0\" y2=\"12\"></line>",
        format!("Now, {} UTC", clock(&day.started, day.elapsed_s)),
    );
    if let Some(at_s) = reached {
        item(
            out,
            "<line class=\"forecast mark\" x1=\"2\" x2=\"26\" y1=\"12\" y2=\"0\"></line>",
            format!(
                "At this pace, the limit is reached at {} UTC",
                clock(&day.started, at_s)
            ),
        );
    }
    out.push_str("</ul>\n");
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
            None => ("no budget".to_owned(), String::new()),
        };
        let _ = writeln!(
            out,
            "<tr class=\"key\"><td>{}</td><td>{}</td><td>{budget}</td><td>{meter}</td></tr>",
            key_name(key),
            key.used_today,
        );
    }
    out.push_str("</table>\n");
}

/// A key's name as the page shows it: a name from the config as code, the placeholders for a
/// key without a name (`#2`) and for requests without a key (`-`) in words.
fn key_name(key: &KeyStatus) -> String {
    let plain = key
        .name
        .strip_prefix('#')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match plain {
        Some(n) => format!("<span class=\"note\">unnamed key #{n}</span>"),
        None if key.name == NO_KEY => "<span class=\"note\">requests without a key</span>".into(),
        None => format!("<code>{}</code>", escape(&key.name)),
    }
}

/// The top of the y-axis for a tallest value of `need`: the least of 2, 4, 6, 8, 10, 20, 40,
/// 50, 60, 80, 100, 200, … at or above it, so that the half-way tick is a whole number too.
fn scale_top(need: f64) -> u64 {
    let mut unit: u64 = 1;
    loop {
        for m in [1, 2, 4, 5, 6, 8] {
            let Some(top) = unit.checked_mul(m) else {
                return u64::MAX - 1;
            };
            if top >= 2 && top.is_multiple_of(2) && top as f64 >= need {
                return top;
            }
        }
        unit = match unit.checked_mul(10) {
            Some(next) => next,
            None => return u64::MAX - 1,
        };
    }
}

/// A tick's value, short: `800`, `4000`, `20k`, `1500k`, `2M`.
fn short(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 10_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// Requests per slot: whole from 10 on, with one decimal under it (`2.1`, `0.4`, `3`).
fn per_slot(n: f64) -> String {
    if n >= 10.0 {
        format!("{n:.0}")
    } else {
        let one = format!("{n:.1}");
        one.strip_suffix(".0")
            .map_or_else(|| one.clone(), str::to_owned)
    }
}

/// When the day started, in words: `00:00 UTC on 2026-12-02`.
fn since(started: &str) -> String {
    match started.get(..10) {
        Some(date) => format!("{} UTC on {}", clock(started, 0), escape(date)),
        None => escape(started),
    }
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
    use crate::admin::html::{snake_case_words, visible_text};

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
                    used_today: 30,
                    budget: None,
                },
                KeyStatus {
                    name: "#2".into(),
                    used_today: 15,
                    budget: None,
                },
                KeyStatus {
                    name: "-".into(),
                    used_today: 5,
                    budget: None,
                },
            ],
        }
    }

    fn drawn(day: &DayStatus) -> String {
        let mut out = String::new();
        render(&mut out, day);
        out
    }

    /// The labels of the y-axis, top first.
    fn ticks(out: &str) -> Vec<&str> {
        out.split("<text class=\"tick\"")
            .skip(1)
            .map(|t| t.split('>').nth(1).unwrap().trim_end_matches("</text"))
            .collect()
    }

    #[test]
    fn the_day_has_bars_a_pace_line_a_forecast_and_the_keys() {
        let out = drawn(&day());
        assert_eq!(out.matches("<rect class=\"slot\"").count(), 5, "{out}");
        assert!(
            out.contains("<title>07:00–07:15 UTC: 40 requests</title>"),
            "{out}"
        );
        assert!(
            out.contains("even pace: 21 requests per 15 minutes spend the day's 2000"),
            "{out}"
        );
        assert!(out.contains(">limit at 19:10</text>"), "{out}");
        assert!(
            out.contains(">12:00</text>"),
            "the axis shows the time of day"
        );
        assert!(
            out.contains("<p>200 of 2000 used since 00:00 UTC on 2026-12-02; at this pace"),
            "{out}"
        );
        assert!(
            out.contains("<td><code>etl</code></td><td>150</td><td>500</td>"),
            "{out}"
        );
        assert!(out.contains("<code>&lt;b&gt;</code>"), "names are escaped");
        assert!(out.contains(">unnamed key #2</span>"), "{out}");
        assert!(out.contains(">requests without a key</span>"), "{out}");
        assert!(out.contains("<td>no budget</td>"), "{out}");
        // No forecast, no limit: bars only, and a legend for them alone.
        let quiet = DayStatus {
            limit: None,
            exhausted_in_s: None,
            ..day()
        };
        let out = drawn(&quiet);
        assert!(!out.contains("class=\"pace\"") && !out.contains("class=\"forecast\""));
        assert!(!out.contains("Even pace"), "{out}");
        assert_eq!(ticks(&out), ["40", "20", "0"], "{out}");
    }

    /// The y-axis is labelled at its top, half-way and 0, on a round scale above the tallest
    /// bar and the even pace; the legend says what the scale and each line are.
    #[test]
    fn the_y_axis_and_the_legend_say_what_is_drawn() {
        // 40 at most in a slot, and 2000 a day (21 per slot): 0 to 40.
        let out = drawn(&day());
        assert_eq!(ticks(&out), ["40", "20", "0"], "{out}");
        let text = visible_text(&out);
        for words in [
            "Requests per 15 minutes, on this upstream's own scale (left axis, 0 to 40; \
             times in UTC)",
            "Even pace: 21 requests per 15 minutes spend the day's quota of 2000 by the day's end",
            "Now, 08:10 UTC",
            "At this pace, the limit is reached at 19:10 UTC",
        ] {
            assert!(text.contains(words), "{words:?} in {text}");
        }
        // The legend draws the pace as the chart does.
        assert!(out.contains("<line class=\"pace mark\""), "{out}");
        assert_eq!(snake_case_words(&text), Vec::<String>::new());

        // A pace above every bar sets the scale: 9,600 a day is 100 per slot.
        let paced = DayStatus {
            limit: Some(9600),
            slots: vec![3],
            ..day()
        };
        let out = drawn(&paced);
        assert_eq!(ticks(&out), ["100", "50", "0"], "{out}");
        assert!(out.contains("y1=\"0.0\" y2=\"0.0\"><title>even pace: 100 "));
        // 200 a day is 2.1 per slot, under 17 in a slot: 0 to 20.
        let small = DayStatus {
            limit: Some(200),
            slots: vec![17],
            ..day()
        };
        let out = drawn(&small);
        assert_eq!(ticks(&out), ["20", "10", "0"], "{out}");
        assert!(
            out.contains("Even pace: 2.1 requests per 15 minutes"),
            "{out}"
        );
        // Nothing sent, no limit: still a scale to read.
        let empty = DayStatus {
            limit: None,
            exhausted_in_s: None,
            slots: vec![],
            ..day()
        };
        assert_eq!(ticks(&drawn(&empty)), ["2", "1", "0"]);
    }

    #[test]
    fn the_scale_is_round_and_its_half_whole() {
        for (need, top) in [
            (0.0, 2),
            (1.0, 2),
            (2.0, 2),
            (2.1, 4),
            (5.0, 6),
            (9.5, 10),
            (17.0, 20),
            (40.0, 40),
            (41.0, 50),
            (51.0, 60),
            (90.0, 100),
            (101.0, 200),
            (250.0, 400),
            (20_001.0, 40_000),
        ] {
            assert_eq!(scale_top(need), top, "{need}");
        }
        assert_eq!(short(4000), "4000");
        assert_eq!(short(20_000), "20k");
        assert_eq!(short(1_500_000), "1500k");
        assert_eq!(short(2_000_000), "2M");
        assert_eq!(per_slot(20.83), "21");
        assert_eq!(per_slot(2.083), "2.1");
        assert_eq!(per_slot(3.0), "3");
    }
}
