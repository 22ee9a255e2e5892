//! `tollgate demo`: the four providers of PROVIDERS.md as simulators — each an identity server
//! and an API that accepts only its tokens — with one tollgate in front (a listener per
//! provider, presets in the config), on loopback with a temporary state directory. Access
//! tokens live one minute, so refreshes (and strict rotation) happen while you watch.
//! Prints `curl` lines that work as pasted.

use crate::config::Config;
use crate::sim::bind_loopback;
use crate::sim::provider::{SimProvider, PROVIDERS};
use crate::{Proxy, StartError};
use std::future::Future;
use std::time::Duration;

/// Listener ports the demo prefers (8080–8083), so the printed lines are the same every run.
const FIRST_PORT: u16 = 8080;

/// A path to try on each provider, as a tool would send it.
fn example_path(preset: &str) -> &'static str {
    match preset {
        "beproduct" => "/api/acme/Style/Header/42?fields=name",
        "erpnet" => "/General_Products_Products?$top=5",
        "winbooks" => "/app/Customer/ACME/Folder/2026",
        _ => "/users/me",
    }
}

fn config(state: &str, sims: &[SimProvider], first_port: Option<u16>) -> Config {
    let mut text = format!("[state]\nstore = \"file:{state}\"\n\n");
    for (i, sim) in sims.iter().enumerate() {
        let port = first_port.map_or(0, |p| p + i as u16);
        text.push_str(&sim.upstream_toml(sim.preset, &format!("127.0.0.1:{port}")));
        text.push('\n');
    }
    Config::parse(&text, "demo", |_| None).expect("the demo config is valid")
}

/// Run the demo until `shutdown` resolves.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let mut sims = Vec::new();
    for preset in PROVIDERS {
        sims.push(SimProvider::start(preset, Duration::from_secs(60), bind_loopback().await).await);
    }
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-demo-")
        .tempdir()
        .map_err(|e| {
            StartError::StoreLocation(format!("cannot create a temporary directory: {e}"))
        })?;
    // A subdirectory, so the file store creates it with mode 0700 itself.
    let state = tmp.path().join("state").display().to_string();
    let proxy = match Proxy::start(&config(&state, &sims, Some(FIRST_PORT))).await {
        Ok(p) => p,
        Err(StartError::Bind { .. }) => Proxy::start(&config(&state, &sims, None)).await?,
        Err(e) => return Err(e),
    };

    println!("\ntollgate demo: four simulated providers, each with tollgate in front.\n");
    println!(
        "Access tokens live 60 s; tollgate refreshes them ahead of time (ERP.net and BeProduct"
    );
    println!("rotate refresh tokens strictly). State: {state} (deleted when the demo stops).\n");
    for sim in &sims {
        let addr = proxy
            .addr(sim.preset)
            .expect("every provider has a listener");
        println!(
            "  {:<10} simulated API {}   tollgate http://{addr}",
            sim.preset, sim.url
        );
    }
    println!("\nTry (the APIs echo the request they got, Authorization header included):\n");
    for sim in &sims {
        let addr = proxy
            .addr(sim.preset)
            .expect("every provider has a listener");
        println!("  curl -s 'http://{addr}{}'", example_path(sim.preset));
    }
    let erp = proxy.addr("erpnet").expect("erpnet listener");
    println!(
        "\nA POST is replayed intact if the API refuses the token (1 MiB and smaller):\n\n  curl -s -X POST -H 'Content-Type: application/json' -d '{{\"filters\":[]}}' 'http://{erp}/Items'"
    );
    println!(
        "\nWithout tollgate the APIs refuse you:\n\n  curl -si '{}{}'",
        sims[1].url,
        example_path("erpnet")
    );
    println!(
        "\nPaths that would leave the API's base path are refused before anything is sent:\n\n  curl -si --path-as-is 'http://{erp}/../../etc/passwd'"
    );
    println!("\nPress Ctrl-C to stop.");
    shutdown.await;
    println!("stopping the demo");
    proxy.shutdown().await;
    drop(sims);
    drop(tmp);
    Ok(())
}
