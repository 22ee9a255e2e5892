//! What each command does: `check`, `serve`, `login`, `token`, `status`, `rekey` (the demo is
//! [`crate::demo`]). `main.rs` only parses the arguments, sets up logging and calls these; each
//! says what went wrong on stderr and returns the exit code: 0 done, 1 failed, 2 the config
//! (or the command line) is wrong.

use crate::config::Config;
use crate::proxy::{Proxy, StartError};
use crate::token::TokenCache;
use crate::{secret, store};
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// The exit code of a command whose config (or command line) is wrong.
const WRONG_CONFIG: u8 = 2;

/// The config at `path`, or none, the problem said on stderr.
fn load(path: &Path) -> Option<Config> {
    Config::load(path).map_err(|e| eprintln!("{e}")).ok()
}

/// `tollgate check`: the resolved settings on stdout, warnings on stderr.
pub fn check(path: &Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(WRONG_CONFIG);
    };
    if let Err(problem) = store::check(&config.state) {
        eprintln!("{}: {problem}", path.display());
        return ExitCode::FAILURE;
    }
    println!("{}: OK\n", path.display());
    print!("{}", config.describe());
    for w in config.warnings() {
        eprintln!("warning: {w}");
    }
    let records: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| {
            let identities = u.identities.iter().map(|i| Some(i.name.as_str()));
            std::iter::once(None)
                .chain(identities)
                .map(|identity| store::record_name(&u.name, identity))
        })
        .collect();
    for problem in store::record_problems(&config.state, records.iter().map(String::as_str)) {
        eprintln!("warning: {problem}");
    }
    ExitCode::SUCCESS
}

/// `tollgate serve`: run until SIGTERM or SIGINT, reading the config at `path` again on SIGHUP.
pub async fn serve(path: &Path, workers: Option<usize>) -> Result<ExitCode, StartError> {
    let Some(config) = load(path) else {
        return Ok(ExitCode::from(WRONG_CONFIG));
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let reload = || Config::load(path).map_err(|e| e.to_string());
    run(&config, reload, workers, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `tollgate token`: a valid access token of upstream `name` (or of its `identity`) on
/// stdout, nothing else.
pub async fn token(path: &Path, name: &str, identity: Option<&str>) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(WRONG_CONFIG);
    };
    match access_token(&config, name, identity).await {
        Ok(token) => {
            println!("{}", token.expose());
            if config.upstream_named(name).is_ok_and(|up| up.auth.dpop) {
                eprintln!("note: upstream `{name}` binds its tokens to tollgate's DPoP key (auth.dpop): the API takes this token only with a proof that key signs; send requests through tollgate instead");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `tollgate login`: the authorization-code login for upstream `name`, its refresh token
/// stored.
pub async fn login(
    path: &Path,
    name: &str,
    identity: Option<&str>,
    no_browser: bool,
    timeout: Duration,
) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(WRONG_CONFIG);
    };
    sign_in(&config, name, identity, no_browser, timeout).await
}

async fn sign_in(
    config: &Config,
    name: &str,
    identity: Option<&str>,
    no_browser: bool,
    timeout: Duration,
) -> ExitCode {
    use crate::token::login::Login;
    let login = match Login::prepare(config, name, identity).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "Open this URL in a browser and log in:\n\n  {}\n",
        login.authorize_url
    );
    if !no_browser {
        let opened = std::process::Command::new("xdg-open")
            .arg(login.authorize_url.as_str())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .or_else(|_| {
                std::process::Command::new("open")
                    .arg(login.authorize_url.as_str())
                    .spawn()
            });
        if opened.is_err() {
            eprintln!("(no browser could be opened; copy the URL)");
        }
    }
    eprintln!(
        "Waiting for the browser (up to {})...",
        humantime::format_duration(timeout)
    );
    match login.finish(timeout).await {
        Ok(()) => {
            let whose = store::record_name(name, identity);
            eprintln!("Logged in: the refresh token of `{whose}` is in the state store. A running serve picks it up at its next refresh.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate status`: 0 with the table on stdout, 2 when the config has no usable `[admin]`,
/// 1 when the admin listener cannot be reached, refuses the key, or does not answer with a
/// status.
pub async fn status(path: &Path) -> ExitCode {
    use crate::admin::{client, table};
    let admin = match Config::load_admin(path) {
        Ok(Some(admin)) => admin,
        Ok(None) => {
            eprintln!(
                "{}: there is no [admin] section, so tollgate serve has no status to ask. Add\n\n\
                 [admin]\nlisten = \"127.0.0.1:9901\"\n\nto the config and restart tollgate serve.",
                path.display()
            );
            return ExitCode::from(WRONG_CONFIG);
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(WRONG_CONFIG);
        }
    };
    if admin.listen.port() == 0 {
        eprintln!(
            "{}: [admin] listen = \"{}\" lets serve pick any free port, so tollgate status \
             cannot know it; set a fixed port, e.g. \"127.0.0.1:9901\", and restart tollgate serve.",
            path.display(),
            admin.listen
        );
        return ExitCode::from(WRONG_CONFIG);
    }
    match client::fetch_status(admin.listen, admin.key.as_ref(), client::TIMEOUT).await {
        Ok(status) => {
            print!("{}", table::render(&status));
            ExitCode::SUCCESS
        }
        Err(e) if e.is_about_the_key() => {
            eprintln!("error: {}: {e}", path.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate rekey`: every upstream's token record sealed with `[state] key` now, one line
/// each on stdout; 1 when one could not be.
pub async fn rekey(path: &Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(WRONG_CONFIG);
    };
    let keys = match config.state.keys() {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(WRONG_CONFIG);
        }
    };
    let Some(key) = keys.fingerprint().map(str::to_owned) else {
        eprintln!(
            "{}: no [state] key is set: tollgate rekey seals the token records with it. Set [state] key = \"${{file:/path/to/key}}\" ({})",
            path.display(),
            crate::seal::HOW_TO_MAKE_A_KEY
        );
        return ExitCode::from(WRONG_CONFIG);
    };
    let store = match store::open(&config.state) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for up in &config.upstreams {
        let identities = up.identities.iter().map(|i| Some(i.name.as_str()));
        for identity in std::iter::once(None).chain(identities) {
            let name = store::record_name(&up.name, identity);
            match reseal(&*store, up, &name).await {
                Ok(true) => println!("{name}: sealed with key {key}"),
                Ok(false) => println!("{name}: no token record"),
                Err(e) => {
                    failed = true;
                    println!("{name}: not sealed: {e}");
                }
            }
        }
    }
    store.flush().await;
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The token record kept under `name` (`up`'s own, or one of its identities') read and
/// written back sealed, under its refresh lock; false when there is none.
async fn reseal(
    store: &dyn store::StateStore,
    up: &crate::config::UpstreamConfig,
    name: &str,
) -> Result<bool, store::StoreError> {
    let hold = up.auth.timeout + crate::token::LOCK_MARGIN;
    let wait = up.auth.timeout + up.auth.answer_timeout + crate::token::LOCK_MARGIN;
    let until = std::time::Instant::now() + wait;
    store.lock_life(hold);
    let lock = loop {
        match store.lock_refresh(name, wait, hold).await {
            // A shared store just connected to, or writing back what it lost, grants no lock
            // for a moment.
            Err(store::StoreError::Recovering { left, .. })
                if std::time::Instant::now() + left < until =>
            {
                tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            }
            taken => break taken?,
        }
    };
    let Some(record) = store.load_token(name).await? else {
        return Ok(false);
    };
    store.reseal_token(name, &record, &lock).await?;
    Ok(true)
}

/// How long `tollgate token` keeps retrying to save a rotated refresh token before it gives up.
const TOKEN_SAVE_WAIT: Duration = Duration::from_secs(30);

/// A valid access token for upstream `name`: the stored one while it is fresh, else a new one,
/// redeemed under the store's refresh lock — safe beside a running `serve`.
pub async fn access_token(
    config: &Config,
    name: &str,
    identity: Option<&str>,
) -> Result<secret::Secret<String>, String> {
    let up = config.upstream_named(name)?;
    let identity = match identity {
        None => None,
        Some(id) => Some(up.identity(id).ok_or_else(|| {
            format!("upstream `{name}` has no identity `{id}`: add [[upstream.identity]] name = \"{id}\"")
        })?),
    };
    let store = store::open(&config.state).map_err(|e| e.to_string())?;
    let files = up.read_files()?;
    let cache = TokenCache::of(up, identity, store.clone(), &files, None)?;
    let cache = std::sync::Arc::new(cache);
    // As long as a token request can take: an answer that comes late is still one to save.
    let token = cache.get_within(cache.longest_request()).await;
    // A refresh token rotated on the way, even by a refresh that failed after, must be saved
    // before the process ends, and the refresh lock let go.
    let settled = cache.settle(TOKEN_SAVE_WAIT).await;
    store.flush().await;
    if !settled {
        return Err(format!(
            "a new refresh token of upstream `{name}` could not be saved to the state store; it is lost when this command ends, so the next refresh redeems the one before it, which an identity server that rotates refuses: fix the store, then run `{}`",
            store::login_command(&store::record_name(name, identity.map(|i| i.name.as_str())))
        ));
    }
    Ok(token.map_err(|e| e.to_string())?.bearer())
}

/// Run the proxy on `workers` threads (default: one per CPU) until `shutdown` resolves, then
/// shut down gracefully. On SIGHUP, `reload` reads the config again and it is put in force
/// (see [`Proxy::reload`]), and every TLS certificate is read again; a config that cannot be
/// read or put in force is logged and the running one stays.
pub async fn run(
    config: &Config,
    reload: impl Fn() -> Result<Config, String>,
    workers: Option<usize>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Before starting, so that a SIGHUP during the start does not end the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| StartError::Upstream {
            upstream: "*".into(),
            reason: format!("cannot listen for SIGHUP: {e}"),
        })?;
    let mut proxy = Proxy::start_with_workers(config, workers).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reading the config and the TLS certificates again");
                reload_config(&mut proxy, &reload).await;
                proxy.reload_tls();
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    proxy.shutdown().await;
    Ok(())
}

async fn reload_config(proxy: &mut Proxy, reload: impl Fn() -> Result<Config, String>) {
    let refused = |error: &dyn std::fmt::Display| {
        tracing::error!(%error, "config not reloaded; the running config stays in force");
    };
    let config = match reload() {
        Ok(config) => config,
        Err(e) => return refused(&e),
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    match proxy.reload(&config).await {
        Ok(changes) => tracing::info!(
            added = ?changes.added,
            removed = ?changes.removed,
            changed = ?changes.changed,
            "config reloaded"
        ),
        Err(e) => refused(&e),
    }
}
