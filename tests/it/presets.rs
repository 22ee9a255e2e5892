//! Every preset end to end against its simulator (docs/providers.md): across two token expiries
//! and a restart on the same state directory, every request reaches the API with a valid token
//! and no refresh token is redeemed twice. ERP.net and Spring use the token URL the preset
//! derives from `url`, as a real config would.

use crate::common;

use std::time::Duration;
use tollgate::config::Config;
use tollgate_sim::bind_loopback;
use tollgate_sim::provider::{SimProvider, PROVIDERS};

async fn get(proxy: &tollgate::Proxy, path: &str) -> common::Answer {
    common::get(format!("http://{}{path}", proxy.addr("p").unwrap())).await
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

/// The example file of each provider in config/ works against that provider's simulator,
/// with only the environment set — plus, for BeProduct and WinBooks, whose identity hosts the
/// preset fixes to the real ones, a `token_url` pointing at the simulator.
#[tokio::test]
async fn example_configs_work_against_their_simulators() {
    for preset in PROVIDERS {
        let sim =
            SimProvider::start(preset, Duration::from_secs(3600), bind_loopback().await).await;
        let ids = sim.identity.config().clone();
        let path = format!("{}/config/{preset}.toml", env!("CARGO_MANIFEST_DIR"));
        let state = tempfile::tempdir().unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replace("file:./state", &format!("file:{}", state.path().display()));
        text = with_free_listen(&text);
        if matches!(preset, "beproduct" | "winbooks") {
            text = text.replace(
                "[upstream.auth]\n",
                &format!(
                    "url = \"{}\"\n\n[upstream.auth]\ntoken_url = \"{}\"\n",
                    sim.url,
                    sim.identity.token_url()
                ),
            );
        }
        let seed = sim.identity.issue_refresh_token();
        let exchange = sim.identity.issue_exchange_token();
        let env = |name: &str| -> Option<String> {
            Some(match name {
                "ERPNET_URL" | "SPRING_URL" => sim.url.clone(),
                n if n.ends_with("CLIENT_ID") => ids.client_id.clone(),
                n if n.ends_with("CLIENT_SECRET") => ids.client_secret.clone(),
                n if n.ends_with("REFRESH_TOKEN") => seed.clone(),
                "WINBOOKS_EMAIL" => ids.client_id.clone(),
                "WINBOOKS_EXCHANGE_TOKEN" => exchange.clone(),
                "SPRING_USERNAME" => ids.users[0].0.clone(),
                "SPRING_PASSWORD" => ids.users[0].1.clone(),
                _ => return None,
            })
        };
        let config = Config::parse(&text, &path, env).unwrap_or_else(|e| panic!("{e}"));
        let proxy = tollgate::Proxy::start(&config).await.unwrap();
        let name = &config.upstreams[0].name;
        let url = format!("http://{}/example", proxy.addr(name).unwrap());
        let req = http::Request::get(url)
            .body(http_body_util::Full::default())
            .unwrap();
        let a = common::collect(common::client().request(req).await.unwrap()).await;
        assert_eq!(
            a.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            a.echoed_header("authorization")[0].starts_with("Bearer at_"),
            "{path}"
        );
        proxy.shutdown().await;
    }
}

/// Examples listen on fixed ports (8080...); tests use free ones.
fn with_free_listen(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                "listen = \"127.0.0.1:0\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
