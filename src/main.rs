//! The `tollgate` command: parse arguments, set up logging, call into the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tollgate::config::Config;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An authenticating reverse proxy for OAuth2 APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(short, long, env = "TOLLGATE_CONFIG", default_value = tollgate::config::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Worker threads serving requests (default: one per CPU).
        #[arg(long, env = "TOLLGATE_WORKERS")]
        workers: Option<usize>,
    },
    /// Validate the config and print the resolved settings (secrets redacted).
    Check(ConfigArg),
    /// Try tollgate on this machine: the four providers it has presets for (BeProduct,
    /// ERP.net, WinBooks, a Spring backend) as simulated identity servers and APIs, tollgate in
    /// front of each, and the status page; prints curl lines to paste. Ctrl-C stops it.
    Demo,
    /// Log in once (authorization code + PKCE) and store the refresh token for upstream NAME.
    Login {
        /// The upstream's `name` in the config.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the URL only; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// How long to wait for the browser to come back.
        #[arg(long, default_value = "5m", value_parser = tollgate::config::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a valid access token of upstream NAME to stdout (for scripts).
    Token {
        /// The upstream's `name` in the config.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask a running serve (its [admin] listener) for tokens and quotas; print them as a table.
    Status(ConfigArg),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a file or a journal.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(&arg.config).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn login(
    config: &Config,
    name: &str,
    no_browser: bool,
    timeout: std::time::Duration,
) -> ExitCode {
    use tollgate::token::login::Login;
    let login = match Login::prepare(config, name).await {
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
            eprintln!("Logged in: the refresh token of `{name}` is in the state store. A running serve picks it up at its next refresh.");
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
async fn status(arg: &ConfigArg) -> ExitCode {
    use tollgate::admin::{client, table};
    let admin = match Config::load_admin(&arg.config) {
        Ok(Some(admin)) => admin,
        Ok(None) => {
            eprintln!(
                "{}: there is no [admin] section, so tollgate serve has no status to ask. Add\n\n\
                 [admin]\nlisten = \"127.0.0.1:9901\"\n\nto the config and restart tollgate serve.",
                arg.config.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if admin.listen.port() == 0 {
        eprintln!(
            "{}: [admin] listen = \"{}\" lets serve pick any free port, so tollgate status \
             cannot know it; set a fixed port, e.g. \"127.0.0.1:9901\", and restart tollgate serve.",
            arg.config.display(),
            admin.listen
        );
        return ExitCode::from(2);
    }
    match client::fetch_status(admin.listen, admin.key.as_ref(), client::TIMEOUT).await {
        Ok(status) => {
            print!("{}", table::render(&status));
            ExitCode::SUCCESS
        }
        Err(e) if e.is_about_the_key() => {
            eprintln!("error: {}: {e}", arg.config.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Requests are served on worker threads of their own (see `tollgate::run`); this runtime
    // only runs signals, refresh-ahead tasks and the admin listener.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Check(arg) => {
                let config = match load(&arg) {
                    Ok(c) => c,
                    Err(code) => return Ok(code),
                };
                if let Err(problem) = tollgate::store::check(&config.state) {
                    eprintln!("{}: {problem}", arg.config.display());
                    return Ok(ExitCode::FAILURE);
                }
                println!("{}: OK\n", arg.config.display());
                print!("{}", config.describe());
                for w in config.warnings() {
                    eprintln!("warning: {w}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Serve {
                config: arg,
                workers,
            } => {
                let config = match load(&arg) {
                    Ok(c) => c,
                    Err(code) => return Ok(code),
                };
                for w in config.warnings() {
                    tracing::warn!("{w}");
                }
                let reload = || Config::load(&arg.config).map_err(|e| e.to_string());
                tollgate::run(&config, reload, workers, shutdown_signal())
                    .await
                    .context("tollgate could not start")?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Token { name, config: arg } => {
                let config = match load(&arg) {
                    Ok(c) => c,
                    Err(code) => return Ok(code),
                };
                match tollgate::access_token(&config, &name).await {
                    Ok(token) => {
                        println!("{}", token.expose());
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
            Command::Login {
                name,
                config: arg,
                no_browser,
                timeout,
            } => {
                let config = match load(&arg) {
                    Ok(c) => c,
                    Err(code) => return Ok(code),
                };
                Ok(login(&config, &name, no_browser, timeout).await)
            }
            Command::Status(arg) => Ok(status(&arg).await),
            Command::Demo => {
                tollgate::demo::run(shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    result.unwrap_or_else(|e: anyhow::Error| {
        eprintln!("error: {}", causes(&e));
        ExitCode::FAILURE
    })
}

/// An error and its causes, each said once: most of our messages end with their cause, which
/// the chain then names again.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A message that ends with its cause's text already said it.
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
