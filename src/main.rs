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
    about = "An authenticating reverse proxy for OAuth2 APIs",
    after_help = "\
Examples:
  tollgate demo                          try it: simulated providers, curl lines to paste
  tollgate check -c tollgate.toml        validate a config, print what it resolves to
  tollgate serve -c tollgate.toml        run the proxy (SIGHUP reloads, SIGTERM stops)
  tollgate login beproduct               log in once, store the refresh token
  curl -H \"Authorization: Bearer $(tollgate token beproduct)\" https://…

Logs go to stderr; RUST_LOG sets what is shown (default: info; `tollgate token`: errors only),
e.g. RUST_LOG=debug or RUST_LOG=info,tollgate::access=off.

Exit codes: 0 done; 1 failed (the identity server, the store, the admin listener); 2 the
config or the command line is wrong."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(
        short,
        long,
        env = "TOLLGATE_CONFIG",
        hide_env_values = true,
        default_value = tollgate::config::DEFAULT_PATH
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Worker threads serving requests (default: one per CPU).
        #[arg(long, env = "TOLLGATE_WORKERS", hide_env_values = true)]
        workers: Option<usize>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "pretty")]
        log_format: LogFormat,
    },
    /// Validate the config and print the resolved settings (secrets redacted).
    Check(ConfigArg),
    /// Try tollgate on this machine, with nothing to configure.
    ///
    /// The four providers it has presets for (BeProduct, ERP.net, WinBooks, a Spring backend)
    /// run as simulated identity servers and APIs, tollgate in front of each, with the status
    /// page, beside an API whose identity server takes only a signed client assertion
    /// (private_key_jwt); it prints curl lines to paste. Ctrl-C stops it.
    #[cfg(feature = "demo")]
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
        /// Log in as this [[upstream.identity]] instead of the upstream's own user.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
    /// Print a valid access token of upstream NAME to stdout (for scripts).
    Token {
        /// The upstream's `name` in the config.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        /// The token of this [[upstream.identity]] instead of the upstream's own.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
    },
    /// Ask a running serve (its [admin] listener) for tokens and quotas; print them as a table.
    Status(ConfigArg),
    /// Seal every token record with [state] key now (after a key rotation).
    ///
    /// Each record is read (opened with [state] key or one of previous_keys) and written back
    /// sealed with [state] key, under its refresh lock: safe beside a running serve. A record
    /// no configured key opens is left as it is, and said.
    Rekey(ConfigArg),
}

/// Logs on stderr in `format`, filtered by `RUST_LOG`, else showing `default` and up.
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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
    match &cli.command {
        Command::Serve { log_format, .. } => init_logging(*log_format, "info"),
        // Scripts read what it prints: only errors, unless RUST_LOG asks for more.
        Command::Token { .. } => init_logging(LogFormat::Pretty, "error"),
        _ => init_logging(LogFormat::Pretty, "info"),
    }
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
                ..
            } => commands::serve(&arg.config, workers)
                .await
                .context("tollgate could not start")?,
            Command::Token {
                name,
                config: arg,
                identity,
            } => commands::token(&arg.config, &name, identity.as_deref()).await,
            Command::Login {
                name,
                config: arg,
                no_browser,
                timeout,
                identity,
            } => {
                let id = identity.as_deref();
                commands::login(&arg.config, &name, id, no_browser, timeout).await
            }
            Command::Status(arg) => commands::status(&arg.config).await,
            Command::Rekey(arg) => commands::rekey(&arg.config).await,
            #[cfg(feature = "demo")]
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
    for cause in tollgate::error::causes(e.as_ref()) {
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
