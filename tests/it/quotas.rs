//! Quotas end to end: the daily window across restarts and SIGKILL, the short windows, the
//! concurrency line, the hold after an upstream 429, what counts, the headers, and what the
//! admin listener shows. Time is a manual clock; nothing sleeps a window out.

use crate::common;

use common::{Clock, Harness, Setup};
use std::time::{Duration, Instant};

/// 2026-11-24T23:59:00Z.
const LATE: u64 = 1_795_564_740_000;

async fn harness(quota: &str, clock: Clock) -> Harness {
    Harness::start(Setup {
        quota: quota.into(),
        clock,
        ..Setup::default()
    })
    .await
}

/// Send `n` requests one after another; returns how many were answered 200.
async fn send(h: &Harness, n: usize) -> usize {
    let mut ok = 0;
    for i in 0..n {
        ok += usize::from(h.get(&format!("/r{i}")).await.served());
    }
    ok
}

#[tokio::test]
async fn per_day_admits_exactly_the_limit_across_a_restart_and_rolls_over() {
    let clock = Clock::manual(LATE);
    let mut h = harness("per_day = 20", clock.clone()).await;
    let first = h.get("/first").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit"), "20");
    assert_eq!(first.header("x-ratelimit-remaining"), "19");
    assert_eq!(first.header("x-ratelimit-reset"), "60");
    assert_eq!(first.header("ratelimit-policy"), "\"day\";q=20;w=86400");
    assert_eq!(first.header("ratelimit"), "\"day\";r=19;t=60");

    assert_eq!(send(&h, 24).await, 19);
    assert_eq!(h.api.counters().requests, 20, "exactly 20 reached the API");
    let refused = h.get("/refused").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), "60");
    assert_eq!(refused.header("content-type"), "application/problem+json");
    assert_eq!(refused.header("x-ratelimit-remaining"), "0");
    let problem = refused.json();
    assert_eq!(problem["type"], "urn:tollgate:problem:quota-exceeded");
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["limit"], "per_day");
    assert_eq!(problem["retry_after"], 60);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("daily quota of 20"), "{detail}");
    assert!(detail.contains("25 Nov 2026 00:00:00 GMT"), "{detail}");

    // A restart finds the day spent in the store.
    h.stop_proxy().await;
    h.start_proxy().await;
    assert_eq!(send(&h, 3).await, 0);
    assert_eq!(h.api.counters().requests, 20);

    // At day_starts a new day begins.
    clock.advance(Duration::from_secs(60));
    let next = h.get("/tomorrow").await;
    assert_eq!(next.status, 200);
    assert_eq!(next.header("x-ratelimit-remaining"), "19");
    assert_eq!(next.header("x-ratelimit-reset"), "86400");
}

#[tokio::test]
async fn the_day_starts_at_day_starts_utc() {
    // 06:29:30 UTC on the 24th: the day that started at 06:30 on the 23rd has 30 s left.
    let clock = Clock::manual(LATE - 17 * 3600 * 1000 - 29 * 60 * 1000 - 30 * 1000);
    let h = harness("per_day = 2\nday_starts = \"06:30\"", clock.clone()).await;
    assert_eq!(send(&h, 3).await, 2);
    let refused = h.get("/late").await;
    assert_eq!(refused.header("retry-after"), "30");
    clock.advance(Duration::from_secs(30));
    assert_eq!(send(&h, 3).await, 2);
}

/// `day_starts` moved from 00:00 to 07:00 at 03:00 by a reload, and back at 03:00 the next
/// day by a restart: the day in progress keeps what it spent, so nothing is over-admitted, and
/// lasts until the new schedule's next start, where a whole day begins.
#[tokio::test]
async fn a_changed_day_starts_carries_the_day_in_progress() {
    const HOUR: Duration = Duration::from_secs(3600);
    // 03:00 UTC on the 25th.
    let clock = Clock::manual(LATE + 60_000 + 3 * 3_600_000);
    let mut h = harness("per_day = 10", clock.clone()).await;
    let midnight = h.config_text.clone();
    assert_eq!(send(&h, 6).await, 6);

    let seven = midnight.replace("per_day = 10", "per_day = 10\nday_starts = \"07:00\"");
    h.reload(&seven).await.unwrap();
    assert_eq!(
        send(&h, 6).await,
        4,
        "the 6 spent since midnight still count"
    );
    assert_eq!(
        h.get("/refused").await.header("retry-after"),
        "14400",
        "until 07:00"
    );
    clock.advance(4 * HOUR);
    assert_eq!(send(&h, 12).await, 10, "a whole day from 07:00");

    // 03:00 on the 26th, back to midnight by a restart: the 10 spent since 07:00 yesterday
    // count until the next midnight, not from zero.
    clock.advance(20 * HOUR);
    h.stop_proxy().await;
    h.config_text = midnight;
    h.start_proxy().await;
    assert_eq!(send(&h, 3).await, 0);
    assert_eq!(
        h.get("/refused").await.header("retry-after"),
        "75600",
        "until midnight"
    );
    clock.advance(21 * HOUR);
    assert_eq!(send(&h, 12).await, 10, "a whole day from midnight");
    assert_eq!(h.api.counters().requests, 30);
}

/// The spawned binary, killed with SIGKILL halfway through the day's quota and at its end:
/// the API never sees more than the limit, and a kill costs at most one lease (1 request).
#[tokio::test]
async fn sigkill_never_over_admits() {
    let mut h = harness("per_day = 20", Clock::system()).await;
    h.stop_proxy().await;
    let path = h.write_config("tollgate.toml", &h.config_text);
    let ok = |n: usize, base: String| async move {
        let mut ok = 0;
        for i in 0..n {
            ok += usize::from(common::get(format!("{base}/k{i}")).await.served());
        }
        ok
    };

    let spawned = common::spawn_serve(&path);
    assert_eq!(ok(10, format!("http://{}", spawned.addr)).await, 10);
    drop(spawned); // SIGKILL
    let spawned = common::spawn_serve(&path);
    let second = ok(15, format!("http://{}", spawned.addr)).await;
    assert!(
        (9..=10).contains(&second),
        "{second} admitted after the kill"
    );
    drop(spawned);
    let spawned = common::spawn_serve(&path);
    assert_eq!(ok(5, format!("http://{}", spawned.addr)).await, 0);
    drop(spawned);
    let reached = h.api.counters().requests;
    assert!((19..=20).contains(&reached), "{reached} reached the API");
}

#[tokio::test]
async fn edition_and_licences_set_the_daily_limit() {
    let h = harness("edition = \"business\"\nlicenses = 10", Clock::manual(LATE)).await;
    let a = h.get("/x").await;
    assert_eq!(a.header("x-ratelimit-limit"), "2000", "capped, not 2500");
}

#[tokio::test]
async fn short_windows_burst_then_refuse_until_an_interval_passes() {
    let clock = Clock::manual(LATE);
    let h = harness("per_minute = 5\nper_day = 1000", clock.clone()).await;
    for left in (0..5).rev() {
        let a = h.get("/burst").await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("ratelimit"),
            format!("\"minute\";r={left};t={}", 12 * (5 - left))
        );
        assert_eq!(a.header("ratelimit-policy"), "\"minute\";q=5;w=60");
    }
    let refused = h.get("/sixth").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), "12");
    assert_eq!(refused.header("x-ratelimit-reset"), "12");
    assert_eq!(refused.header("ratelimit"), "\"minute\";r=0;t=12");
    assert!(refused.text().contains("5 requests per minute"));
    assert_eq!(refused.json()["limit"], "per_minute");
    clock.advance(Duration::from_secs(12));
    assert_eq!(h.get("/again").await.status, 200);
    assert_eq!(h.get("/again").await.status, 429);
    assert_eq!(h.api.counters().requests, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_one_with_a_queue_of_five() {
    let h = harness("concurrency = 1\nqueue = 5", Clock::system()).await;
    let url = h.url("/slow?sim_delay_ms=300");
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(common::get(url.clone())))
        .collect();
    // Wait until one is in flight and five wait in line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.api.counters().requests == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let seventh = h.get("/seventh").await;
    assert_eq!(seventh.status, 429);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "refused at once"
    );
    assert_eq!(
        seventh.json()["type"],
        "urn:tollgate:problem:concurrency-limit"
    );
    for c in calls {
        assert_eq!(c.await.unwrap().status, 200);
    }
    assert_eq!(h.api.counters().in_flight_max, 1);
    assert_eq!(h.api.counters().requests, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_queue_timeout_gets_429() {
    let h = harness(
        "concurrency = 1\nqueue = 1\nqueue_timeout = \"200ms\"",
        Clock::system(),
    )
    .await;
    let slow = tokio::spawn(common::get(h.url("/slow?sim_delay_ms=1500")));
    while h.api.counters().requests == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let waited = h.get("/waits").await;
    assert_eq!(waited.status, 429);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(waited.text().contains("queue_timeout"));
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(h.api.counters().requests, 1);
}

#[tokio::test]
async fn an_upstream_429_is_passed_on_then_held_back_for_its_retry_after() {
    let clock = Clock::manual(LATE);
    let h = harness("per_minute = 600", clock.clone()).await;
    let throttled = h.get("/x?sim_status=429&sim_retry_after=5").await;
    assert_eq!(throttled.status, 429, "the upstream's own 429");
    assert_eq!(throttled.header("retry-after"), "5");
    assert!(
        throttled.headers.get("x-ratelimit-remaining").is_none(),
        "the upstream's 429 passes as it is"
    );
    let held = h.get("/held").await;
    assert_eq!(held.status, 429);
    assert_eq!(held.header("retry-after"), "5");
    assert_eq!(
        held.json()["type"],
        "urn:tollgate:problem:upstream-throttled"
    );
    assert_eq!(h.api.counters().requests, 1, "not contacted while held");
    clock.advance(Duration::from_secs(5));
    assert_eq!(h.get("/after").await.status, 200);

    // An HTTP date, two minutes ahead.
    let date = tollgate::quota::http_date(clock.unix_ms(), Duration::from_secs(120));
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("sim_status", "429")
        .append_pair("sim_retry_after", &date)
        .finish();
    assert_eq!(h.get(&format!("/x?{query}")).await.status, 429);
    assert_eq!(h.get("/held").await.header("retry-after"), "120");
    clock.advance(Duration::from_secs(120));
    assert_eq!(h.get("/after").await.status, 200);

    // Without Retry-After: 1 s, then 2 s.
    assert_eq!(h.get("/x?sim_status=429").await.status, 429);
    assert_eq!(h.get("/held").await.header("retry-after"), "1");
    clock.advance(Duration::from_secs(1));
    assert_eq!(h.get("/x?sim_status=429").await.status, 429);
    assert_eq!(h.get("/held").await.header("retry-after"), "2");
    assert_eq!(h.api.counters().requests, 6);
}

#[tokio::test]
async fn the_replay_after_a_401_counts() {
    let h = harness("per_day = 10", Clock::manual(LATE)).await;
    assert_eq!(h.get("/one").await.header("x-ratelimit-remaining"), "9");
    h.api.reject_next(1);
    let replayed = h.get("/two").await;
    assert_eq!(replayed.status, 200);
    assert_eq!(replayed.header("x-ratelimit-remaining"), "7");
    assert_eq!(h.api.counters().requests, 3);
}

#[tokio::test]
async fn admin_status_and_metrics_show_usage_and_refusals() {
    let clock = Clock::manual(LATE);
    let h = harness("per_day = 3\nper_minute = 100", clock).await;
    let mut config = h.config();
    config.admin = Some(tollgate::config::AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        key: None,
    });
    let mut h = h;
    h.stop_proxy().await;
    let proxy = tollgate::Proxy::start_with_clock(&config, h.clock.clone())
        .await
        .unwrap();
    let base = format!("http://{}", proxy.addr("api").unwrap());
    for _ in 0..4 {
        common::get(format!("{base}/x")).await;
    }
    let admin = format!("http://{}", proxy.admin_addr().unwrap());
    let status = common::get(format!("{admin}/status")).await.json();
    let api = &status["upstreams"][0];
    assert_eq!(api["name"], "api");
    assert_eq!(api["token"]["state"], "ready");
    let day = api["quota"]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "day")
        .unwrap();
    assert_eq!(
        (day["limit"].as_u64(), day["used"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(api["quota"]["rejected"]["per_day"], 1);

    let metrics = common::get(format!("{admin}/metrics")).await.text();
    assert!(
        metrics.contains("tollgate_quota_remaining{upstream=\"api\",window=\"day\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_quota_remaining{upstream=\"api\",window=\"minute\"} 96"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_rejected_total{upstream=\"api\",reason=\"per_day\"} 1"),
        "{metrics}"
    );
    for text in [status.to_string(), metrics] {
        for token in h.identity.issued_tokens() {
            assert!(!text.contains(&token), "a token leaked into admin output");
        }
    }
    proxy.shutdown().await;
}
