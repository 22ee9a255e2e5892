//! The `tollgate` command: parse the arguments, set up logging, and call the command
//! ([`tollgate::commands`]).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

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
        use tollgate::commands;
        Ok(match cli.command {
            Command::Check(arg) => commands::check(&arg.config),
            Command::Serve {
                config: arg,
                workers,
            } => commands::serve(&arg.config, workers)
                .await
                .context("tollgate could not start")?,
            Command::Token { name, config: arg } => commands::token(&arg.config, &name).await,
            Command::Login {
                name,
                config: arg,
                no_browser,
                timeout,
            } => commands::login(&arg.config, &name, no_browser, timeout).await,
            Command::Status(arg) => commands::status(&arg.config).await,
            Command::Demo => {
                tollgate::demo::run(commands::shutdown_signal()).await?;
                ExitCode::SUCCESS
            }
        })
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
