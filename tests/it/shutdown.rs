//! Graceful shutdown: in-flight requests finish, new connections are refused.

use crate::common;

use common::{Harness, Setup};
use std::time::Duration;

/// A slow request in flight when shutdown starts still completes with 200, and the listener
/// is closed afterwards.
#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut h = Harness::start(Setup::default()).await;
    assert_eq!(h.get("/warm").await.status, 200);
    let addr = h.proxy().addr("api").unwrap();
    let url = h.url("/slow?sim_delay_ms=700");
    let client = h.client.clone();
    let slow = tokio::spawn(async move {
        let req = http::Request::get(url)
            .body(http_body_util::Full::default())
            .unwrap();
        common::collect(client.request(req).await.unwrap()).await
    });
    // Wait until the slow request is at the API before shutting down.
    while h.api.counters().requests < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.stop_proxy().await;
    let a = slow.await.unwrap();
    assert_eq!(a.status, 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}
