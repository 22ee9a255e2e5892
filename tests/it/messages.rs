//! What a newcomer reads when something is wrong: each message says what happened once, and
//! what to do. The binary is run as a user would run it.

use crate::common::Tollgate;
use std::net::TcpListener;

fn config(store: &str, listen: &str) -> String {
    format!(
        "[state]\nstore = \"{store}\"\n\n[[upstream]]\nname = \"api\"\nurl = \"https://api.example.com/v1\"\nlisten = \"{listen}\"\n\n[upstream.auth]\ngrant = \"refresh_token\"\ntoken_url = \"https://id.example.com/token\"\nclient_id = \"tool\"\nclient_secret = \"a-client-secret\"\nrefresh_token = \"a-refresh-token\"\n"
    )
}

/// A port already taken: the cause is printed once.
#[test]
fn a_taken_port_is_named_once() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    let store = format!("file:{}", state.path().join("state").display());
    let out = Tollgate::new(&["serve"])
        .config(&config(&store, &listen))
        .run();
    let err = &out.stderr;
    assert_ne!(out.code(), Some(0));
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}

/// A state directory that cannot be made: the cause is printed once.
#[test]
fn a_state_directory_that_cannot_be_made_is_named_once() {
    let out = Tollgate::new(&["serve"])
        .config(&config("file:/proc/nope/state", "127.0.0.1:0"))
        .run();
    let err = &out.stderr;
    assert_ne!(out.code(), Some(0));
    assert!(err.contains("/proc/nope/state"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `check` refuses a state directory `serve` could not make or write, and says what to do.
#[test]
fn check_refuses_a_state_directory_serve_could_not_use() {
    let out = Tollgate::new(&["check"])
        .config(&config("file:/proc/nope/state", "127.0.0.1:0"))
        .run();
    let err = &out.stderr;
    assert_ne!(out.code(), Some(0));
    assert!(err.contains("state.store: tollgate cannot write in the directory the state directory would be made in, /proc"), "{err}");
    assert!(err.contains("create /proc/nope/state"), "{err}");
    let fine = tempfile::tempdir().unwrap();
    let store = format!("file:{}", fine.path().join("state").display());
    let out = Tollgate::new(&["check"])
        .config(&config(&store, "127.0.0.1:0"))
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains(": OK"), "{}", out.stdout);
}

/// Logs written to a file or a pipe carry no colour codes.
#[test]
fn logs_into_a_pipe_have_no_colours() {
    // A listener others can reach over plain HTTP is logged as a warning before the bind
    // (which fails: the port is taken, so nothing is served).
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let listen = format!("0.0.0.0:{}", taken.local_addr().unwrap().port());
    let state = tempfile::tempdir().unwrap();
    let store = format!("file:{}", state.path().join("state").display());
    let keys = "\n[upstream.inbound]\nkeys = [\"an-inbound-key-0123456789\"]\n";
    let out = Tollgate::new(&["serve"])
        .config(&(config(&store, &listen) + keys))
        .env("RUST_LOG", "info")
        .run();
    let err = &out.stderr;
    assert!(err.contains("WARN") && err.contains("plain HTTP"), "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in {err:?}");
}

/// `demo --help` says what the demo runs.
#[cfg(feature = "demo")]
#[test]
fn demo_help_describes_the_tour() {
    let help = Tollgate::new(&["demo", "--help"]).run().stdout;
    assert!(help.contains("four providers"), "{help}");
    assert!(help.contains("status page"), "{help}");
}

/// An identity server that cannot be reached: the message names the URL, the cause and what
/// to check.
#[test]
fn an_unreachable_identity_server_is_named_with_its_cause() {
    // The discard port: nothing listens there, and no test binds it (a port bound and let go
    // here could be taken by another test's server before it is asked).
    let port = 9;
    let state = tempfile::tempdir().unwrap();
    let store = format!("file:{}", state.path().join("state").display());
    let text = config(&store, "127.0.0.1:0").replace(
        "https://id.example.com/token",
        &format!("http://127.0.0.1:{port}/token"),
    );
    let out = Tollgate::new(&["token", "api"]).config(&text).run();
    let err = &out.stderr;
    assert_ne!(out.code(), Some(0));
    assert!(
        err.contains(&format!("cannot reach the token endpoint http://127.0.0.1:{port}/token: the connection was refused; check the port in auth.token_url")),
        "{err}"
    );
}

/// An empty refresh token (`export X_REFRESH_TOKEN=`) with nothing stored: no refresh request
/// is sent; the message and `check` say to run `tollgate login`.
#[test]
fn an_empty_refresh_token_says_to_log_in() {
    let state = tempfile::tempdir().unwrap();
    let store = format!("file:{}", state.path().join("state").display());
    let text = config(&store, "127.0.0.1:0").replace(
        "refresh_token = \"a-refresh-token\"",
        "refresh_token = \"${SEED}\"",
    );
    let run = |args: &[&str]| {
        let out = Tollgate::new(args).config(&text).env("SEED", "").run();
        (out.code(), out.stderr)
    };
    let (code, err) = run(&["token", "api"]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("has no refresh token: run `tollgate login api`"),
        "{err}"
    );
    assert!(!err.contains("refused the client"), "{err}");
    let (code, err) = run(&["check"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: upstream `api` has no refresh token in the config"),
        "{err}"
    );
}
