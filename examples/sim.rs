//! Run the simulated identity server (and optionally the simulated API) on fixed loopback
//! ports, for load scripts such as `benches/compare.sh`.
//!
//! ```sh
//! cargo run --release --example sim -- --identity 127.0.0.1:9400 [--api 127.0.0.1:9401] [--lifetime 3600] [--dpop]
//! ```
//!
//! Prints one line per server with its URL, then a seed refresh token, and runs until killed.
//! `--dpop`: the identity server issues DPoP-bound tokens (RFC 9449) and wants a proof with
//! every token request.

use std::time::Duration;
use tollgate_sim::api::ApiSim;
use tollgate_sim::identity::{IdentityConfig, IdentitySim};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let identity_addr = value("--identity").unwrap_or_else(|| "127.0.0.1:0".into());
    let lifetime: u64 =
        value("--lifetime").map_or(3600, |v| v.parse().expect("--lifetime SECONDS"));
    let identity = IdentitySim::new(IdentityConfig {
        access_lifetime: Duration::from_secs(lifetime),
        dpop: args.iter().any(|a| a == "--dpop"),
        ..IdentityConfig::default()
    });
    let listener = tokio::net::TcpListener::bind(&identity_addr)
        .await
        .expect("bind --identity");
    let _identity_server = identity.serve(listener).await;
    println!("token_url {}", identity.token_url());
    let _api_server = match value("--api") {
        Some(addr) => {
            let api = ApiSim::new(identity.clone());
            let server = api
                .serve(
                    tokio::net::TcpListener::bind(&addr)
                        .await
                        .expect("bind --api"),
                )
                .await;
            println!("api_url {}", server.url());
            Some(server)
        }
        None => None,
    };
    let config = identity.config();
    println!("client_id {}", config.client_id);
    println!("client_secret {}", config.client_secret);
    println!("seed {}", identity.issue_refresh_token());
    std::future::pending::<()>().await;
}
