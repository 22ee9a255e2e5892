//! Large bodies stream through the proxy both ways without being buffered whole.
//! (One test in this binary, so the process's peak memory is this test's alone.)

use crate::common;

use bytes::Bytes;
use common::{Harness, Setup};
use http_body_util::BodyExt;
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use std::convert::Infallible;

const SIZE: u64 = 20 * 1024 * 1024;

/// Peak resident memory of this process, in KiB (VmHWM).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn pattern(offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A 20 MB upload and a 20 MB download arrive byte-identical, and the peak memory of the
/// whole process (client, proxy and simulated API together) grows far less than 20 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_each_way_stream_with_flat_memory() {
    let h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let baseline = peak_rss_kib();

    // Upload: the body is produced chunk by chunk, never held whole.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(h.url("/upload"))
        .body(PatternBody { sent: 0 })
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body_len"], SIZE);
    assert_eq!(echo["body_sha256"], tollgate_sim::api::pattern_sha256(SIZE));

    // Download: hashed as it arrives.
    let response = h
        .client
        .request(
            http::Request::get(h.url(&format!("/download?sim_download={SIZE}")))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    assert_eq!(len, SIZE);
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, tollgate_sim::api::pattern_sha256(SIZE));

    let grown_mib = (peak_rss_kib().saturating_sub(baseline)) / 1024;
    assert!(
        grown_mib < 8,
        "peak memory grew by {grown_mib} MiB while moving 2 x 20 MiB"
    );
}

/// A request body that generates the test pattern 64 KiB at a time.
struct PatternBody {
    sent: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = SIZE - self.sent;
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = left.min(64 * 1024);
        let chunk = pattern(self.sent, len as usize);
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}
