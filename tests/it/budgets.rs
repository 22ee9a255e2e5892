//! Named inbound keys with daily budgets: each key is refused at its own budget while the
//! others go on, the upstream's day holds the sum, and neither a restart nor `kill -9` gives
//! a spent budget back. Every figure names the key, never shows it; the day's use and its
//! forecast follow the pace.

use crate::common;

use bytes::Bytes;
use common::{Answer, Harness, Setup};
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tollgate::quota::Clock;

const ETL: &str = "etl-key-0123456789abcdef";
const REPORTS: &str = "reports-key-0123456789abcdef";
const PLAIN: &str = "plain-key-0123456789abcdef";

fn setup() -> Setup {
    Setup {
        quota: "per_day = 20".into(),
        extra_tables: format!(
            "[upstream.inbound]\nkeys = [\n  {{ name = \"etl\", key = \"{ETL}\", per_day = 4 }},\n  {{ name = \"reports\", key = \"{REPORTS}\", share = \"25%\" }},\n  \"{PLAIN}\",\n]"
        ),
        admin: true,
        ..Setup::default()
    }
}

async fn get_as(url: String, key: &str) -> Answer {
    let request = Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    common::collect(common::client().request(request).await.unwrap()).await
}

/// Send `n` requests with `key`; returns how many were served (the others must be 429s).
async fn spend(url: impl Fn(usize) -> String, key: &str, n: usize) -> usize {
    let mut served = 0;
    for i in 0..n {
        served += usize::from(get_as(url(i), key).await.served());
    }
    served
}

#[tokio::test]
async fn each_key_is_held_to_its_budget_and_the_day_to_the_sum() {
    let mut h = Harness::start(setup()).await;
    let at = |h: &Harness| {
        let base = h.url("");
        move |i: usize| format!("{base}/item/{i}")
    };
    assert_eq!(spend(at(&h), ETL, 4).await, 4);
    let refused = get_as(h.url("/one-more"), ETL).await;
    assert_eq!(refused.status, 429);
    let problem = refused.json();
    assert_eq!(problem["type"], "urn:tollgate:problem:key-budget-exceeded");
    assert_eq!(problem["limit"], "key_budget");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("`etl` has spent its budget of 4"),
        "{detail}"
    );
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");

    // 25% of 20 is 5 for reports, which goes on while etl is refused.
    assert_eq!(spend(at(&h), REPORTS, 8).await, 5);
    // The plain key has no budget: the day's 11 left are its.
    assert_eq!(spend(at(&h), PLAIN, 15).await, 11);
    assert_eq!(h.api.counters().requests, 20);

    // Attribution by name: /status and /metrics; no key material anywhere.
    let status = common::get(h.admin_url("/status")).await.text();
    let metrics = common::get(h.admin_url("/metrics")).await.text();
    for text in [&status, &metrics] {
        for key in [ETL, REPORTS, PLAIN] {
            assert!(!text.contains(key), "a key leaked");
        }
    }
    assert!(
        metrics.contains("tollgate_requests_total{upstream=\"api\",key=\"etl\",status=\"200\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_requests_total{upstream=\"api\",key=\"etl\",status=\"429\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_requests_total{upstream=\"api\",key=\"#3\",status=\"200\"} 11"),
        "{metrics}"
    );
    // etl's one refusal and reports' three.
    assert!(
        metrics.contains("tollgate_rejected_total{upstream=\"api\",reason=\"key_budget\"} 4"),
        "{metrics}"
    );

    // The day, by key, for /status and `tollgate status` (the group's, read from the store).
    let status = common::get(h.admin_url("/status")).await.json();
    let day = &status["upstreams"][0]["day"];
    assert_eq!(day["used"], 20, "{day}");
    assert_eq!(day["limit"], 20);
    assert_eq!(day["forecast"], "the limit is reached");
    let keys: Vec<(String, u64, Option<u64>)> = day["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let name = k["name"].as_str().unwrap().to_owned();
            (
                name,
                k["used_today"].as_u64().unwrap(),
                k["budget"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("etl".into(), 4, Some(4)),
            ("reports".into(), 5, Some(5)),
            ("#3".into(), 11, None)
        ]
    );
    let metrics = common::get(h.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("tollgate_key_used_today{upstream=\"api\",key=\"reports\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_quota_exhausted_in_seconds{upstream=\"api\"} 0"),
        "{metrics}"
    );
    let printed = status_command(&h).await;
    assert!(
        printed.contains(
            "api today: 20 of 20; the limit is reached\n  keys: etl 4/4, reports 5/5, #3 11\n"
        ),
        "{printed}"
    );
    for key in [ETL, REPORTS, PLAIN] {
        assert!(!printed.contains(key), "a key leaked");
    }

    // A restart gives nothing back.
    h.stop_proxy().await;
    h.start_proxy().await;
    assert_eq!(spend(at(&h), ETL, 3).await, 0, "etl's budget holds");
    assert_eq!(spend(at(&h), REPORTS, 3).await, 0, "reports' budget holds");
    assert_eq!(h.api.counters().requests, 20);
}

/// What `tollgate status -c config` prints against the harness's admin listener.
async fn status_command(h: &Harness) -> String {
    let out = common::status_command(&h.config_for_status()).await;
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// `tollgate_key_used_today` of key `etl` on upstream `api`, from `/metrics`.
async fn etl_used_today(h: &Harness) -> u64 {
    let metrics = common::get(h.admin_url("/metrics")).await.text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_key_used_today{upstream=\"api\",key=\"etl\"}"))
        .unwrap_or_else(|| panic!("no etl line in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A spawned tollgate killed with `kill -9` mid-budget: a tollgate started after it never
/// grants the key more than its budget (the dead one's lease is lost, not given twice), and
/// never reports the key below what its budget counted (the dead one's last use of the day
/// had not reached the tally).
#[tokio::test]
async fn kill_9_never_gives_a_budget_back() {
    let mut h = Harness::start(Setup {
        quota: "per_day = 1000".into(),
        extra_tables: format!(
            "[upstream.inbound]\nkeys = [{{ name = \"etl\", key = \"{ETL}\", per_day = 300 }}]"
        ),
        admin: true,
        ..Setup::default()
    })
    .await;
    h.stop_proxy().await;
    let spawned = common::spawn_serve(&h.write_config("budgets.toml", &h.config_text));
    let base = format!("http://{}", spawned.addr);
    assert_eq!(spend(|i| format!("{base}/a/{i}"), ETL, 100).await, 100);
    let line = spawned.wait_for_log("request");
    assert_eq!(line["fields"]["key"], "etl", "the access log names the key");
    drop(spawned); // SIGKILL, holding what is left of its lease (3, 1% of 300)

    h.start_proxy().await;
    let reported = etl_used_today(&h).await;
    assert!(
        (100..=103).contains(&reported),
        "reported {reported} after 100"
    );
    let base = h.url("");
    let served = spend(|i| format!("{base}/b/{i}"), ETL, 250).await;
    assert!((197..=200).contains(&served), "served {served} after 100");
    assert!(h.api.counters().requests <= 300);
    assert_eq!(etl_used_today(&h).await, 300, "the budget is spent");
}

/// The forecast follows the pace of the last hour, on a manual clock: 10 requests every 15
/// minutes from 08:00 is 40 an hour; at 09:00, the 60 left of 100 last until 10:30.
#[tokio::test]
async fn the_forecast_follows_the_pace() {
    let eight = (20_416 * 86_400 + 8 * 3600) * 1000;
    let clock = Clock::manual(eight);
    let h = Harness::start(Setup {
        quota: "per_day = 100".into(),
        admin: true,
        clock: clock.clone(),
        ..Setup::default()
    })
    .await;
    let forecast = || async {
        let status = common::get(h.admin_url("/status")).await.json();
        status["upstreams"][0]["day"]["forecast"].clone()
    };
    assert_eq!(
        forecast().await,
        "at this pace the limit is not reached today"
    );
    for quarter in 0..4 {
        for i in 0..10 {
            assert_eq!(h.get(&format!("/q{quarter}/{i}")).await.status, 200);
        }
        // Reading /status adds each quarter's requests to their slot before the clock moves.
        let _ = forecast().await;
        clock.advance(Duration::from_secs(15 * 60));
    }
    assert_eq!(
        forecast().await,
        "at this pace the limit is reached at 10:30 UTC"
    );
    let status = common::get(h.admin_url("/status")).await.json();
    assert_eq!(status["upstreams"][0]["day"]["exhausted_in_s"], 5400);
    // An idle hour after: not today.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        forecast().await,
        "at this pace the limit is not reached today"
    );
}

/// A reload changes a key's budget in place: raised, the key goes on from what it spent;
/// lowered below that, it is refused at once.
#[tokio::test]
async fn a_reload_changes_a_budget_in_place() {
    let mut h = Harness::start(setup()).await;
    let base = h.url("");
    let at = |i: usize| format!("{base}/r/{i}");
    assert_eq!(spend(at, ETL, 3).await, 3);
    let raised = h.config_text.replace("per_day = 4 }", "per_day = 6 }");
    assert_ne!(raised, h.config_text);
    h.reload(&raised).await.unwrap();
    assert_eq!(
        spend(at, ETL, 5).await,
        3,
        "6 a day, 3 spent before the reload"
    );
    let lowered = raised.replace("per_day = 6 }", "per_day = 2 }");
    h.reload(&lowered).await.unwrap();
    let refused = get_as(h.url("/lowered"), ETL).await;
    assert_eq!(refused.status, 429);
    assert!(refused.text().contains("budget of 2"), "{}", refused.text());
    assert_eq!(h.api.counters().requests, 6);
}
