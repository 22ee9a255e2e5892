//! Named inbound keys with daily budgets: each key is refused at its own budget while the
//! others go on, the upstream's day holds the sum, and neither a restart nor `kill -9` gives
//! a spent budget back. Every figure names the key, never shows it.

mod common;

use bytes::Bytes;
use common::{Answer, Harness, Setup};
use http::Request;
use http_body_util::Full;

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
        let a = get_as(url(i), key).await;
        match a.status {
            200 => served += 1,
            429 => {}
            other => panic!("unexpected {other}: {}", a.text()),
        }
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

    // A restart gives nothing back.
    h.stop_proxy().await;
    h.start_proxy().await;
    assert_eq!(spend(at(&h), ETL, 3).await, 0, "etl's budget holds");
    assert_eq!(spend(at(&h), REPORTS, 3).await, 0, "reports' budget holds");
    assert_eq!(h.api.counters().requests, 20);
}

/// A spawned tollgate killed with `kill -9` mid-budget: a tollgate started after it never
/// grants the key more than its budget (the dead one's lease is lost, not given twice).
#[tokio::test]
async fn kill_9_never_gives_a_budget_back() {
    let mut h = Harness::start(Setup {
        quota: "per_day = 1000".into(),
        extra_tables: format!(
            "[upstream.inbound]\nkeys = [{{ name = \"etl\", key = \"{ETL}\", per_day = 300 }}]"
        ),
        ..Setup::default()
    })
    .await;
    h.stop_proxy().await;
    let path = h.state_dir().join("budgets.toml");
    std::fs::write(&path, &h.config_text).unwrap();
    let spawned = common::spawn_serve(&path);
    let base = format!("http://{}", spawned.addr);
    assert_eq!(spend(|i| format!("{base}/a/{i}"), ETL, 100).await, 100);
    let line = spawned.wait_for_log("request");
    assert_eq!(line["fields"]["key"], "etl", "the access log names the key");
    drop(spawned); // SIGKILL, holding what is left of its lease (3, 1% of 300)

    h.start_proxy().await;
    let base = h.url("");
    let served = spend(|i| format!("{base}/b/{i}"), ETL, 250).await;
    assert!((197..=200).contains(&served), "served {served} after 100");
    assert!(h.api.counters().requests <= 300);
}
