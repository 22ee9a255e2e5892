//! Hostile input: no request target, however it is spelled, reaches a path outside the
//! upstream's base path; garbage on the wire gets 400 and the server stays up.

use crate::common;

use common::{Harness, Setup};
use http::{Method, Uri, Version};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::forward::Target;

/// Decode `%xx` escapes (what a lenient server on the other side might do).
fn decode(path: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(path).collect()
}

/// Resolve dot segments as RFC 3986 §5.2.4 does, splitting on `/` and `\` (as some servers
/// do), and return the segments.
fn resolve(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for segment in path.split(|b| *b == b'/' || *b == b'\\') {
        // `;params` do not make a segment something else for a server that strips them.
        let name = segment.split(|b| *b == b';').next().unwrap_or_default();
        match name {
            b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(segment.to_vec()),
        }
    }
    out
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2E.".to_owned()),
        Just(".%2e".to_owned()),
        Just("%2f".to_owned()),
        Just("%5c".to_owned()),
        Just("..;x".to_owned()),
        Just("%00".to_owned()),
        Just("%".to_owned()),
        "[a-z0-9._~-]{0,6}",
        "[a-z%.;]{0,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..8).prop_map(|segments| format!("/{}", segments.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn no_path_leaves_the_base_path(path in path(), query in prop::option::of("[a-z=&%.]{0,8}")) {
        let target = Target::new(&"https://api.example/base/v1".parse().unwrap()).unwrap();
        let local = "127.0.0.1:8080".parse().unwrap();
        let text = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let Ok(uri) = text.parse::<Uri>() else { return Ok(()) };
        if let Ok(rewritten) = target.rewrite(&Method::GET, &uri, Version::HTTP_11, local) {
            prop_assert!(rewritten.authority().is_none(), "{} is not origin-form", rewritten);
            let absolute = target.absolute(&rewritten);
            prop_assert_eq!(absolute.authority().unwrap().as_str(), "api.example");
            let sent = rewritten.path();
            prop_assert!(sent == "/base/v1" || sent.starts_with("/base/v1/"), "{}", sent);
            // However the upstream decodes and resolves it, it stays under the base path.
            let resolved = resolve(&decode(sent));
            prop_assert!(resolved.len() >= 3, "{} resolves above the base", sent);
            prop_assert_eq!(&resolved[1], b"base");
            prop_assert_eq!(&resolved[2], b"v1");
        }
    }
}

#[tokio::test]
async fn garbage_gets_400_and_the_server_stays_up() {
    let h = Harness::start(Setup::default()).await;
    let garbage: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
    ];
    for bytes in garbage {
        let mut stream = tokio::net::TcpStream::connect(h.proxy().addr("api").unwrap())
            .await
            .unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 400")
                || answer.starts_with("HTTP/1.1 505"),
            "{:?}: {answer}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(h.api.counters().requests, 0);
    assert_eq!(h.get("/still-up").await.status, 200);
}
