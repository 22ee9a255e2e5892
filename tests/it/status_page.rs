//! The status page in a real browser: headless Chromium loads `/` from the admin listener and
//! the DOM it dumps has the day's chart (bars, a labelled y-axis, the even pace, the forecast,
//! a legend in words) and the key table, with no identifier and no "0s" in its text; a
//! screenshot of it is rendered too. `.ci/run` installs Chromium when it is missing.

use crate::common;

use bytes::Bytes;
use common::{Harness, Setup};
use http::Request;
use http_body_util::Full;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ETL: &str = "etl-key-0123456789abcdef";
const REPORTS: &str = "reports-key-0123456789abcdef";
const NIGHTLY: &str = "nightly-key-0123456789abcdef";

/// The Chromium binary on PATH; fails the test, saying how to install it, when there is none.
fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if found.is_ok_and(|s| s.success()) {
            return name;
        }
    }
    panic!("this test needs a headless Chromium on PATH: install it with `apt-get install -y chromium`");
}

/// Run headless Chromium with `args` on `url`, killed if it takes more than a minute.
fn browse(args: &[&str], url: &str, profile: &Path) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_page_draws_the_day_and_the_keys_in_a_browser() {
    let h = Harness::start(Setup {
        quota: "per_day = 200".into(),
        extra_tables: format!(
            "[upstream.inbound]\nkeys = [\n  {{ name = \"etl\", key = \"{ETL}\", per_day = 50 }},\n  {{ name = \"reports\", key = \"{REPORTS}\", share = \"10%\" }},\n  {{ name = \"nightly\", key = \"{NIGHTLY}\", per_day = 1 }},\n]"
        ),
        admin: true,
        ..Setup::default()
    })
    .await;
    // The nightly key's second request is over its budget of 1: refused by tollgate.
    for (key, n, refused) in [(ETL, 12, 0), (REPORTS, 5, 0), (NIGHTLY, 2, 1)] {
        for i in 0..n {
            let request = Request::get(h.url(&format!("/page/{i}")))
                .header("authorization", format!("Bearer {key}"))
                .body(Full::<Bytes>::default())
                .unwrap();
            let expected = if i + refused >= n { 429 } else { 200 };
            assert_eq!(h.send(request).await.status, expected);
        }
    }
    let url = h.admin_url("/");
    let profile = tempfile::tempdir().unwrap();
    let shot = profile.path().join("status.png");
    let (dom, shot) = tokio::task::spawn_blocking({
        let (url, dir) = (url.clone(), profile.path().to_owned());
        move || {
            let dom = browse(&["--dump-dom"], &url, &dir.join("a"));
            let screenshot = format!("--screenshot={}", shot.display());
            browse(
                &[&screenshot, "--window-size=1000,1100"],
                &url,
                &dir.join("b"),
            );
            (dom, shot)
        }
    })
    .await
    .unwrap();

    // The chart: the slot in progress has 18 requests; the even pace of 200 a day.
    assert!(dom.contains("<svg"), "{dom}");
    assert_eq!(dom.matches("class=\"slot\"").count(), 1, "{dom}");
    assert!(dom.contains(" UTC: 18 requests</title>"), "{dom}");
    assert!(
        dom.contains("even pace: 2.1 requests per 15 minutes spend the day's 200"),
        "{dom}"
    );
    // The y-axis: 18 in a slot, over the pace of 2.1, is read on a scale of 0 to 20.
    let ticks: Vec<&str> = dom
        .split("<text class=\"tick\"")
        .skip(1)
        .map(|t| t.split('>').nth(1).unwrap().trim_end_matches("</text"))
        .collect();
    assert_eq!(ticks, ["20", "10", "0"], "{dom}");
    // The text a reader sees: the legend, the refusal in words, no identifier, no "0s".
    let text = common::readable_page_text(&dom);
    for words in [
        "18 of 200 used since 00:00 UTC on ",
        "Requests per 15 minutes, on this upstream's own scale (left axis, 0 to 20; times in UTC)",
        "Even pace: 2.1 requests per 15 minutes spend the day's quota of 200 by the day's end",
        "Refused by tollgate: 1 over a key's daily budget",
    ] {
        assert!(text.contains(words), "{words:?} in {text}");
    }
    // The key table, by name, with budgets (10% of 200 is 20).
    assert!(
        dom.contains("<td><code>etl</code></td><td>12</td><td>50</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<td><code>reports</code></td><td>5</td><td>20</td>"),
        "{dom}"
    );
    for key in [ETL, REPORTS, NIGHTLY] {
        assert!(!dom.contains(key), "a key leaked onto the page");
    }
    let png = std::fs::read(&shot).expect("chromium wrote a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("TOLLGATE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("status.png")).unwrap();
    }
}
