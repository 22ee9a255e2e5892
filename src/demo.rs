//! `tollgate demo`: a simulated identity server (strict refresh-token rotation, one-minute
//! access tokens) and a simulated API that accepts only its tokens, with a real tollgate in
//! front, on loopback with a temporary state directory. Prints `curl` lines that work as pasted.

use crate::config::Config;
use crate::sim::api::ApiSim;
use crate::sim::bind_loopback;
use crate::sim::identity::{IdentityConfig, IdentitySim, Rotation};
use crate::{Proxy, StartError};
use std::future::Future;
use std::time::Duration;

/// The port the demo proxy prefers, so the printed lines are the same every time.
const DEMO_PORT: u16 = 8080;

fn demo_config(
    listen_port: u16,
    state: &str,
    token_url: &str,
    api_url: &str,
    seed: &str,
    id: &IdentityConfig,
) -> Config {
    let text = format!(
        r#"
[state]
store = "file:{state}"

[[upstream]]
name = "demo"
listen = "127.0.0.1:{listen_port}"
url = "{api_url}"

[upstream.auth]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
client_auth = "post"
refresh_token = "{seed}"
"#,
        client_id = id.client_id,
        client_secret = id.client_secret,
    );
    Config::parse(&text, "demo", |_| None).expect("the demo config is valid")
}

/// Run the demo until `shutdown` resolves.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let identity_config = IdentityConfig {
        access_lifetime: Duration::from_secs(60),
        rotation: Rotation::Strict,
        ..IdentityConfig::default()
    };
    let identity = IdentitySim::new(identity_config.clone());
    let identity_server = identity.serve(bind_loopback().await).await;
    let api = ApiSim::new(identity.clone());
    let api_server = api.serve(bind_loopback().await).await;
    let state = tempfile::Builder::new()
        .prefix("tollgate-demo-")
        .tempdir()
        .map_err(|e| {
            StartError::StoreLocation(format!("cannot create a temporary directory: {e}"))
        })?;
    // A subdirectory, so the file store creates it with mode 0700 itself.
    let state_dir = state.path().join("state").display().to_string();
    let seed = identity.issue_refresh_token();
    let token_url = identity.token_url();
    let api_url = api_server.url();

    let config = demo_config(
        DEMO_PORT,
        &state_dir,
        &token_url,
        &api_url,
        &seed,
        &identity_config,
    );
    let proxy = match Proxy::start(&config).await {
        Ok(p) => p,
        Err(StartError::Bind { .. }) => {
            let config = demo_config(0, &state_dir, &token_url, &api_url, &seed, &identity_config);
            Proxy::start(&config).await?
        }
        Err(e) => return Err(e),
    };
    let proxy_url = format!(
        "http://{}",
        proxy.addr("demo").expect("demo upstream is bound")
    );

    println!(
        r#"
tollgate demo: a simulated OAuth2 identity server and API, with tollgate in front.

  identity server  {token_url}
                   access tokens live 60 s; every refresh rotates the refresh token, and
                   reusing an old one revokes the whole grant
  API              {api_url}
                   accepts only that server's tokens and echoes what it received
  tollgate         {proxy_url}
                   state in {state_dir} (deleted when the demo stops)

Try (tollgate adds the token; the API echoes the Authorization header it got):

  curl -s '{proxy_url}/api/acme/Style/Header/42?fields=name'
  curl -s -X POST -H 'Content-Type: application/json' -d '{{"filters":[]}}' '{proxy_url}/api/acme/Style/List?pageSize=10&pageNumber=0'

Without tollgate the API refuses you:

  curl -si '{api_url}/api/acme/Style/Header/42'

Paths that would leave the API's base path are refused before anything is sent:

  curl -si --path-as-is '{proxy_url}/api/../../etc/passwd'

Leave it running past a minute: tollgate refreshes the token ahead of expiry and the
requests keep working. Press Ctrl-C to stop.
"#
    );
    shutdown.await;
    println!("stopping the demo");
    proxy.shutdown().await;
    drop(api_server);
    drop(identity_server);
    drop(state);
    Ok(())
}
