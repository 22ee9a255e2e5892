//! An identity server that echoes what it was sent — the form in `error`, URL-encoded in
//! `error_description`, the fields one by one, the `Authorization` header — never gets a
//! secret of the token request into anything tollgate shows: the 503 a client gets, the log,
//! `/readyz`, `/status`, the status page, `tollgate status`.
//! The log is the test binary's own ([`common::logs`]).

use crate::common;

use base64::Engine;
use common::{status_command, Harness, Setup};
use tollgate_sim::identity::{ClientAuthRule, IdentityConfig};

/// A client secret and a password with every character form encoding changes.
const CLIENT_SECRET: &str = "Cs9/+=&Xk% Secret";
const PASSWORD: &str = "Pw7/+=&Qz% Word";

/// Every form a secret may be echoed in, and the pieces that would betray half of one.
fn forms(secret: &str, client_id: &str) -> Vec<String> {
    let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent = secret
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect::<String>();
    let engine = base64::engine::general_purpose::STANDARD;
    let id_form: String = form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
    vec![
        secret.to_owned(),
        form.clone(),
        percent.to_lowercase(),
        percent,
        form_urlencoded::byte_serialize(form.as_bytes()).collect(),
        engine.encode(format!("{id_form}:{form}")),
        engine.encode(format!("{client_id}:{secret}")),
        secret[..4].to_owned(),
        secret[secret.len() - 6..].to_owned(),
    ]
}

struct Case {
    name: &'static str,
    grant: &'static str,
    client_auth: &'static str,
    rule: ClientAuthRule,
    /// `None`: the form is the error code; else the code with the echo in the description.
    code: Option<&'static str>,
}

/// Each grant and client authentication, answered with each kind of echo: nothing the
/// request carried comes back out, and the error still says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_identity_server_gets_no_secret_out() {
    let logs = common::logs();

    let cases = [
        Case {
            name: "refresh, post, form as the code",
            grant: "refresh_token",
            client_auth: "post",
            rule: ClientAuthRule::Post,
            code: None,
        },
        Case {
            name: "refresh, post, invalid_grant with the echo",
            grant: "refresh_token",
            client_auth: "post",
            rule: ClientAuthRule::Post,
            code: Some("invalid_grant"),
        },
        Case {
            name: "client_credentials, basic, invalid_client with the echo",
            grant: "client_credentials",
            client_auth: "basic",
            rule: ClientAuthRule::Basic,
            code: Some("invalid_client"),
        },
        Case {
            name: "password, basic, form as the code",
            grant: "password",
            client_auth: "basic",
            rule: ClientAuthRule::Basic,
            code: None,
        },
        Case {
            name: "password, post, invalid_grant with the echo",
            grant: "password",
            client_auth: "post",
            rule: ClientAuthRule::Post,
            code: Some("invalid_grant"),
        },
    ];
    let mut secrets = Vec::new();
    let mut shown = String::new();
    for case in cases {
        let client_id = "my app/1";
        let mut h = Harness::start(Setup {
            identity: IdentityConfig {
                client_id: client_id.into(),
                client_secret: CLIENT_SECRET.into(),
                client_auth: case.rule,
                users: vec![("ann@example.com".into(), PASSWORD.into())],
                ..IdentityConfig::default()
            },
            grant: case.grant,
            extra_auth: format!(
                "client_auth = \"{}\"\nusername = \"ann@example.com\"\npassword = \"{PASSWORD}\"\nrefresh_wait = \"500ms\"",
                case.client_auth
            ),
            admin: true,
            ..Setup::default()
        })
        .await;
        // The proxy may have fetched a token at its start: start it again without one, with
        // every token request echoed (never processed, so the seed is not spent).
        h.stop_proxy().await;
        h.identity.echo_next(1000, case.code);
        let _ = std::fs::remove_file(h.state_dir().join("api.token.json"));
        h.start_proxy().await;
        let answer = h.get("/x").await;
        assert_eq!(answer.status, 503, "{}: {}", case.name, answer.text());
        let readyz = common::get(h.admin_url("/readyz")).await;
        assert_eq!(readyz.status, 503, "{}", case.name);
        let status = common::get(h.admin_url("/status")).await.text();
        let page = common::get(h.admin_url("/")).await.text();
        let command = status_command(&h.config_for_status()).await;
        let everything = format!(
            "{}\n{}\n{status}\n{page}\n{}\n{}",
            answer.text(),
            readyz.text(),
            command.stdout,
            command.stderr,
        );
        assert!(
            h.identity.counters().failures_injected > 0,
            "{}: the echo was sent",
            case.name
        );
        // The error made it through, cut where a secret was.
        assert!(
            everything.contains("[redacted]"),
            "{}: {everything}",
            case.name
        );
        shown.push_str(&everything);
        secrets.extend(forms(CLIENT_SECRET, client_id));
        secrets.extend(forms(PASSWORD, client_id));
        secrets.push(h.seed.clone());
        secrets.push(h.seed[..12].to_owned());
    }
    let log_text = logs.text();
    assert!(log_text.contains("[redacted]"), "the log was captured");
    for secret in &secrets {
        assert!(
            !shown.contains(secret.as_str()),
            "`{secret}` was shown: {shown}"
        );
        assert!(
            !log_text.contains(secret.as_str()),
            "`{secret}` was logged: {log_text}"
        );
    }
}

/// A client_credentials client refused with `invalid_grant` is told to check its client, not
/// to run `tollgate login`, which it cannot use.
#[tokio::test]
async fn client_credentials_refused_is_not_told_to_log_in() {
    let mut h = Harness::start(Setup {
        grant: "client_credentials",
        admin: true,
        ..Setup::default()
    })
    .await;
    h.stop_proxy().await;
    h.identity.echo_next(10, Some("invalid_grant"));
    let _ = std::fs::remove_file(h.state_dir().join("api.token.json"));
    h.start_proxy().await;
    let answer = h.get("/x").await;
    assert_eq!(answer.status, 503);
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(!detail.contains("tollgate login"), "{detail}");
    assert!(
        detail.contains("refused the client_credentials grant of upstream `api`"),
        "{detail}"
    );
    assert!(detail.contains("auth.client_secret"), "{detail}");
}
