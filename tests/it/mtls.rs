//! Client certificates (mTLS): one presented to an API that requires it, and RFC 8705's
//! `tls_client_auth` at the token endpoint, whose tokens the API accepts only with the same
//! certificate. Both servers sit behind a TLS front that refuses a client without a
//! certificate of its CA.

use crate::common;

use common::certs::{make_ca, TestCa};
use common::mtls::{front, thumbprint};
use common::{Harness, Setup};
use tollgate_sim::identity::{ClientAuthRule, IdentityConfig};

/// Files in `dir`: the server CA (to trust), and a client certificate and key.
struct Files {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn write(dir: &std::path::Path, server: &TestCa, client: &TestCa, name: &str) -> Files {
    let files = Files {
        ca: dir.join(format!("{name}-server-ca.pem")),
        cert: dir.join(format!("{name}-client.pem")),
        key: dir.join(format!("{name}-client-key.pem")),
    };
    std::fs::write(&files.ca, &server.ca_pem).unwrap();
    std::fs::write(&files.cert, &client.cert_pem).unwrap();
    std::fs::write(&files.key, &client.key_pem).unwrap();
    files
}

/// The API requires a client certificate: with `[upstream] client_cert` the request goes
/// through; without it the handshake fails and the client gets 502; `check` names the files
/// and never their contents, and refuses a key that is not the certificate's.
#[tokio::test]
async fn an_api_that_requires_a_certificate() {
    let h = Harness::start(Setup::default()).await;
    let (server, client) = (make_ca("api"), make_ca("tollgate client"));
    let api = front(&server, &client.ca_pem, h.api_server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &server, &client, "api");
    let plain_url = format!("{}/api/v1", h.api_server.url());
    let https = h.config_text.replace(
        &plain_url,
        &format!("https://localhost:{}/api/v1", api.port()),
    );
    let with_cert = https.replace(
        "[upstream.auth]",
        &format!(
            "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n\n[upstream.auth]",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        ),
    );
    let without = https.replace(
        "[upstream.auth]",
        &format!("ca_file = \"{}\"\n\n[upstream.auth]", files.ca.display()),
    );
    for (text, expected) in [(&with_cert, 200), (&without, 502)] {
        let proxy = tollgate::Proxy::start(&common::parse(text)).await.unwrap();
        let answer = common::get(common::url_of(&proxy, "/mtls")).await;
        assert_eq!(answer.status, expected, "{}", answer.text());
        proxy.shutdown().await;
    }
    let out = h.check_config("mtls.toml", &with_cert).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("client_cert"), "{}", out.stdout);
    let key_body = client.key_pem.lines().nth(1).unwrap();
    assert!(!out.stdout.contains(key_body), "{}", out.stdout);

    let other = make_ca("someone else");
    let wrong_key = dir.path().join("other-key.pem");
    std::fs::write(&wrong_key, &other.key_pem).unwrap();
    let mismatched = with_cert.replace(
        &files.key.display().to_string(),
        &wrong_key.display().to_string(),
    );
    let out = h.check_config("mismatched.toml", &mismatched).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("is not the key of"), "{}", out.stderr);
    assert!(
        !out.stderr.contains(other.key_pem.lines().nth(1).unwrap()),
        "{}",
        out.stderr
    );
}

/// `client_auth = "tls"`: the token endpoint knows the client by its certificate (no secret
/// is sent), and binds the tokens to it; the API takes them only with that certificate, which
/// tollgate presents there too by default. A different certificate for the API gets the
/// bound token refused: 401 after one refresh and replay.
#[tokio::test]
async fn tls_client_auth_with_certificate_bound_tokens() {
    let (server, client) = (make_ca("localhost"), make_ca("tollgate client"));
    let bound = thumbprint(&client.cert_der);
    let mut h = Harness::start(Setup {
        identity: IdentityConfig {
            client_auth: ClientAuthRule::Tls,
            tls_client_s256: Some(bound.clone()),
            ..IdentityConfig::default()
        },
        ..Setup::default()
    })
    .await;
    h.stop_proxy().await;
    let api = front(&server, &client.ca_pem, h.api_server.addr).await;
    let id_addr = h.identity_server.as_ref().unwrap().addr;
    let id = front(&server, &client.ca_pem, id_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &server, &client, "tls");
    let plain_api = format!("{}/api/v1", h.api_server.url());
    let text = h
        .config_text
        .replace(&plain_api, &format!("https://localhost:{}/api/v1", api.port()))
        .replace(
            &h.identity.token_url(),
            &format!("https://localhost:{}/token", id.port()),
        )
        .replace(
            &format!("client_secret = \"{}\"\n", IdentityConfig::default().client_secret),
            "",
        )
        .replace(
            "[upstream.auth]",
            &format!(
                "ca_file = \"{}\"\n\n[upstream.auth]\nclient_auth = \"tls\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ),
        );
    h.config_text = text.clone();
    h.start_proxy().await;
    for round in 0..2 {
        let answer = h.get(&format!("/bound/{round}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        h.identity.expire_access_tokens();
    }
    h.assert_lineage_intact();

    // Another certificate for the API (same CA, so the handshake passes): the token is bound
    // to the first, and the API refuses it.
    h.stop_proxy().await;
    let second = make_ca("second client");
    let second_ca = {
        let mut both = client.ca_pem.clone();
        both.push_str(&second.ca_pem);
        both
    };
    let api2 = front(&server, &second_ca, h.api_server.addr).await;
    let other = write(dir.path(), &server, &second, "other");
    h.config_text = text
        .replace(
            &format!("localhost:{}", api.port()),
            &format!("localhost:{}", api2.port()),
        )
        .replace(
            "\n\n[upstream.auth]",
            &format!(
                "\nclient_cert = \"{}\"\nclient_key = \"{}\"\n\n[upstream.auth]",
                other.cert.display(),
                other.key.display()
            ),
        );
    h.start_proxy().await;
    let answer = h.get("/other-cert").await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    h.assert_lineage_intact();
}
