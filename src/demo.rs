//! `tollgate demo`: the four providers of docs/providers.md as simulators — each an identity server
//! and an API that accepts only its tokens — with one tollgate in front (a listener per
//! provider, presets in the config), on loopback with a temporary state directory. Access
//! tokens live one minute, so refreshes (and strict rotation) happen while you watch.
//! BeProduct gets a daily quota and two named inbound keys with budgets, and the admin
//! listener serves the status page, so the day's use by key and its forecast can be watched.
//! A fifth upstream, `signed`, is an OAuth2 API whose identity server takes no client secret,
//! only a JWT signed with the client's key (`private_key_jwt`, as Entra ID, Okta and Keycloak
//! offer): the demo makes the key, registers its public half with the simulator and gives
//! tollgate the key file. Prints `curl` lines that work as pasted.

use crate::config::Config;
use crate::{Proxy, StartError};
use std::future::Future;
use std::time::Duration;
use tollgate_sim::api::ApiSim;
use tollgate_sim::identity::assertion::JwtKey;
use tollgate_sim::identity::{ClientAuthRule, IdentityConfig, IdentitySim};
use tollgate_sim::provider::{SimProvider, PROVIDERS};
use tollgate_sim::{bind_loopback, serve_together, SimServer};

/// Listener ports the demo prefers (8080–8083, the admin listener 9901), so the printed lines
/// are the same every run.
const FIRST_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;

/// BeProduct's inbound keys in the demo: (name, key, budget).
pub const KEYS: [(&str, &str, &str); 2] = [
    ("etl", "demo-etl-key-0123456789", "per_day = 50"),
    ("reports", "demo-reports-key-0123456789", "share = \"1%\""),
];

/// BeProduct's daily limit in the demo (reports' 1% is 20 of it).
const PER_DAY: u64 = 2000;

/// A path to try on each provider, as a tool would send it.
fn example_path(preset: &str) -> &'static str {
    match preset {
        "beproduct" => "/api/acme/Style/Header/42?fields=name",
        "erpnet" => "/General_Products_Products?$top=5",
        "winbooks" => "/app/Customer/ACME/Folder/2026",
        _ => "/users/me",
    }
}

/// The upstream whose identity server wants a signed client assertion.
pub struct Signed {
    pub identity: IdentitySim,
    pub api: ApiSim,
    pub server: SimServer,
    /// The client's private key (PKCS#8 PEM), in the demo's directory.
    pub key_file: std::path::PathBuf,
}

impl Signed {
    /// A new EC P-256 key written to `dir`, its public half registered with a simulated
    /// identity server that takes `private_key_jwt` alone, and an API in front of it.
    pub async fn start(dir: &std::path::Path) -> Result<Signed, String> {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as P256};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &rng).map_err(|e| e.to_string())?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&P256, pkcs8.as_ref(), &rng).map_err(|e| e.to_string())?;
        let key_file = dir.join("signed-client-key.pem");
        let pem = crate::secret::Secret::new(pem("PRIVATE KEY", pkcs8.as_ref()));
        let written = {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true).mode(0o600);
            options
                .open(&key_file)
                .and_then(|mut f| f.write_all(pem.expose().as_bytes()))
        };
        written.map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
        let identity = IdentitySim::new(IdentityConfig {
            client_id: "signed-client".into(),
            client_auth: ClientAuthRule::PrivateKeyJwt,
            jwt_keys: vec![JwtKey {
                kid: Some("demo-key".into()),
                alg: "ES256",
                public_key: pair.public_key().as_ref().to_vec(),
                x5t_s256: None,
                x5t: None,
            }],
            access_lifetime: Duration::from_secs(60),
            ..IdentityConfig::default()
        });
        let api = ApiSim::new(identity.clone());
        let server = serve_together(&identity, &api, bind_loopback().await).await;
        Ok(Signed {
            identity,
            api,
            server,
            key_file,
        })
    }

    fn upstream_toml(&self, listen: &str) -> String {
        format!(
            "[[upstream]]
name = \"signed\"
listen = \"{listen}\"
url = \"{}/api\"

[upstream.auth]
grant = \"client_credentials\"
token_url = \"{}\"
client_id = \"signed-client\"
client_auth = \"private_key_jwt\"
private_key_file = \"{}\"
key_id = \"demo-key\"
",
            self.server.url(),
            self.identity.token_url(),
            self.key_file.display()
        )
    }
}

/// `der` as PEM with `label`.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// The demo's config, as text and parsed: `fixed` puts the listeners on the ports above, else
/// on any free port.
pub fn config(state: &str, sims: &[SimProvider], signed: &Signed, fixed: bool) -> (String, Config) {
    let admin = if fixed { ADMIN_PORT } else { 0 };
    let mut text =
        format!("[state]\nstore = \"file:{state}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n");
    for (i, sim) in sims.iter().enumerate() {
        let port = if fixed { FIRST_PORT + i as u16 } else { 0 };
        text.push_str(&sim.upstream_toml(sim.preset, &format!("127.0.0.1:{port}")));
        if matches!(sim.preset, "beproduct" | "erpnet") {
            // `tollgate login` against the simulated identity server, which signs you in
            // without asking (the redirect URI is the one it has registered).
            text.push_str(&format!(
                "\n[upstream.login]\nauthorize_url = \"{}\"\nredirect_uri = \"{}\"\n",
                sim.identity.authorize_url(),
                crate::config::presets::DEFAULT_REDIRECT_URI
            ));
        }
        if sim.preset == "beproduct" {
            let keys: Vec<String> = KEYS
                .iter()
                .map(|(name, key, budget)| {
                    format!("  {{ name = \"{name}\", key = \"{key}\", {budget} }},")
                })
                .collect();
            text.push_str(&format!(
                "\n[upstream.quota]\nper_day = {PER_DAY}\n\n[upstream.inbound]\nkeys = [\n{}\n]\n",
                keys.join("\n")
            ));
        }
        text.push('\n');
    }
    let port = if fixed {
        FIRST_PORT + sims.len() as u16
    } else {
        0
    };
    text.push_str(&signed.upstream_toml(&format!("127.0.0.1:{port}")));
    let config = Config::parse(&text, "demo", |_| None).expect("the demo config is valid");
    (text, config)
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
    let signed = Signed::start(tmp.path())
        .await
        .map_err(StartError::StoreLocation)?;
    // A subdirectory, so the file store creates it with mode 0700 itself.
    let state = tmp.path().join("state").display().to_string();
    let (mut text, fixed) = config(&state, &sims, &signed, true);
    let proxy = match Proxy::start(&fixed).await {
        Ok(p) => p,
        Err(StartError::Bind { .. }) => {
            let (free, config) = config(&state, &sims, &signed, false);
            let proxy = Proxy::start(&config).await?;
            // The file shows the ports the listeners took: the admin listener's first, then
            // the upstreams', in the order the text lists them.
            text = free;
            let admin = proxy
                .admin_addr()
                .expect("the demo serves the admin listener");
            let names = sims.iter().map(|sim| sim.preset).chain(["signed"]);
            let upstreams = names.map(|name| proxy.addr(name));
            for addr in [Some(admin)].into_iter().chain(upstreams).flatten() {
                text = text.replacen("127.0.0.1:0\"", &format!("{addr}\""), 1);
            }
            proxy
        }
        Err(e) => return Err(e),
    };
    let file = tmp.path().join("tollgate.toml");
    std::fs::write(&file, &text)
        .map_err(|e| StartError::StoreLocation(format!("cannot write {}: {e}", file.display())))?;
    let file = file.display();
    // The lines below name this very binary, so they work from `cargo run` as well.
    let exe =
        std::env::current_exe().map_or_else(|_| "tollgate".to_owned(), |p| p.display().to_string());

    println!("\ntollgate demo: four simulated providers and a signed-client API, each with tollgate in front.\n");
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
    if let Some(addr) = proxy.addr("signed") {
        println!(
            "  {:<10} simulated API {}/api   tollgate http://{addr}",
            "signed",
            signed.server.url()
        );
    }
    println!("\nTry (the APIs echo the request they got, Authorization header included):\n");
    let (etl, reports) = (KEYS[0].1, KEYS[1].1);
    for sim in &sims {
        let addr = proxy
            .addr(sim.preset)
            .expect("every provider has a listener");
        // BeProduct's listener wants one of its inbound keys.
        let key = if sim.preset == "beproduct" {
            format!("-H 'Authorization: Bearer {etl}' ")
        } else {
            String::new()
        };
        println!("  curl -s {key}'http://{addr}{}'", example_path(sim.preset));
    }
    let beproduct = proxy.addr("beproduct").expect("beproduct listener");
    let path = example_path("beproduct");
    let admin = proxy
        .admin_addr()
        .expect("the demo serves the admin listener");
    println!(
        "\nBeProduct counts {PER_DAY} requests a day for the organisation; two named keys have budgets of their own:\n\
         `etl` 50 a day, `reports` 1% of the day (20). Spend from each, then past reports' budget:\n\n\
         \x20 for i in $(seq 5); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'Authorization: Bearer {etl}' 'http://{beproduct}{path}'; done; echo\n\
         \x20 for i in $(seq 25); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'Authorization: Bearer {reports}' 'http://{beproduct}{path}'; done; echo\n\
         \x20 curl -s -H 'Authorization: Bearer {reports}' 'http://{beproduct}{path}'\n\n\
         The status page shows the day per 15 minutes, the forecast and the keys: http://{admin}/\n\
         (as JSON: curl -s http://{admin}/status; for Prometheus: curl -s http://{admin}/metrics)"
    );
    let erp = proxy.addr("erpnet").expect("erpnet listener");
    println!(
        "\nA POST is replayed intact when the API refuses the token (1 MiB and smaller). Here the\n\
         simulated API refuses the first attempt (sim_refuse_once); the log above shows\n\
         \"upstream refused the token; refreshing and replaying once\", and the answer is the\n\
         API's echo of the replayed POST:\n\n\
         \x20 curl -s -X POST -H 'Content-Type: application/json' -d '{{\"filters\":[]}}' \"http://{erp}/Items?sim_refuse_once=$RANDOM\""
    );
    let signed_addr = proxy.addr("signed").expect("signed listener");
    println!(
        "\n`signed` is an OAuth2 API whose identity server takes no client secret, only a JWT the\n\
         client signs with its own key (private_key_jwt); tollgate signs a fresh one for every token\n\
         request with {}:\n\n\
         \x20 curl -s 'http://{signed_addr}/orders?status=open'",
        signed.key_file.display()
    );
    println!(
        "\nThe simulated APIs take switches on any path, to try quotas and holds:\n\
         \x20 ?sim_status=429&sim_retry_after=30   answer that status (and Retry-After)\n\
         \x20 ?sim_delay_ms=2000                    answer two seconds late\n\
         \x20 ?sim_download=1048576                 answer with that many bytes\n\
         \x20 ?sim_refuse_once=ID                   refuse the token the first time ID is seen"
    );
    println!(
        "\nThe config the demo runs (with the simulated clients' credentials) is {file};\n\
         the other commands work against it while the demo runs:\n\n\
         \x20 {exe} status -c {file}\n\
         \x20 {exe} token erpnet -c {file}\n\
         \x20 {exe} login beproduct --no-browser -c {file}\n\n\
         (login prints a URL to open; the simulated identity server signs you in.)"
    );
    let clients: Vec<String> = sims
        .iter()
        .map(|sim| {
            let id = tollgate_sim::provider::identity_config(sim.preset, Duration::ZERO).client_id;
            format!("{} {id}", sim.preset)
        })
        .collect();
    println!(
        "\nThe simulated clients (their secrets and seeds are in the config): {}",
        clients.join(", ")
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
    drop(signed);
    drop(tmp);
    Ok(())
}
