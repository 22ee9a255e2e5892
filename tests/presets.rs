//! Every preset end to end against its simulator (PROVIDERS.md): across two token expiries
//! and a restart on the same state directory, every request reaches the API with a valid token
//! and no refresh token is redeemed twice. ERP.net and Spring use the token URL the preset
//! derives from `url`, as a real config would.

mod common;

use std::time::Duration;
use tollgate::config::Config;
use tollgate::sim::bind_loopback;
use tollgate::sim::provider::{SimProvider, PROVIDERS};

async fn get(proxy: &tollgate::Proxy, path: &str) -> common::Answer {
    let url = format!("http://{}{path}", proxy.addr("p").unwrap());
    let req = http::Request::get(url)
        .body(http_body_util::Full::default())
        .unwrap();
    common::collect(common::client().request(req).await.unwrap()).await
}

#[tokio::test]
async fn every_preset_survives_expiries_and_a_restart() {
    for preset in PROVIDERS {
        let sim =
            SimProvider::start(preset, Duration::from_secs(3600), bind_loopback().await).await;
        let state = tempfile::tempdir().unwrap();
        let text = format!(
            "[state]\nstore = \"file:{}\"\n\n{}",
            state.path().join("state").display(),
            sim.upstream_toml("p", "127.0.0.1:0")
        );
        let config =
            Config::parse(&text, preset, |_| None).unwrap_or_else(|e| panic!("{preset}: {e}"));
        if matches!(preset, "erpnet" | "spring") {
            assert!(
                !text.contains("token_url"),
                "{preset}: the preset derives token_url"
            );
            assert!(config.upstreams[0]
                .preset_filled
                .contains(&"auth.token_url".to_owned()));
        }

        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        let first = get(&proxy, "/Items?top=1").await;
        assert_eq!(
            first.status,
            200,
            "{preset}: {}",
            String::from_utf8_lossy(&first.body)
        );
        for round in 0..2 {
            sim.identity.expire_access_tokens();
            let a = get(&proxy, &format!("/Items/{round}")).await;
            assert_eq!(
                a.status,
                200,
                "{preset} expiry {round}: {}",
                String::from_utf8_lossy(&a.body)
            );
        }
        proxy.shutdown().await;

        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        sim.identity.expire_access_tokens();
        let a = get(&proxy, "/after-restart").await;
        assert_eq!(
            a.status,
            200,
            "{preset} after restart: {}",
            String::from_utf8_lossy(&a.body)
        );
        proxy.shutdown().await;

        let ids = sim.identity.counters();
        assert_eq!(ids.reuse_detected, 0, "{preset}");
        assert_eq!(ids.grants_revoked, 0, "{preset}");
        assert!(ids.issued >= 4, "{preset}: {ids:?}");
    }
}
