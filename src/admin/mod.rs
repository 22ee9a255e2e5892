//! The admin listener (`[admin] listen`): `GET /` (an HTML status page for a browser),
//! `GET /healthz` (200 while running), `GET /readyz` (200 while every upstream can serve —
//! `degraded` and why when something is not well — else 503 naming the upstream and the
//! reason), `GET /status` (JSON: each upstream's token state and quota usage) and
//! `GET /metrics` (Prometheus text).
//!
//! `/` and `/status` show one [`Status`], gathered by [`status::gather`]; `tollgate status`
//! reads `/status` back ([`client`]) and prints it as a table ([`table`]). The admin endpoints
//! report states, never a token. With `[admin] key`, every endpoint but the probes asks for
//! the key ([`key`]).

mod chart;
pub mod client;
pub mod html;
pub mod key;
pub mod metrics;
pub mod page;
pub mod status;
pub mod table;

pub use key::AdminKey;
pub use status::Status;

use crate::counters::RequestStats;
use crate::error::problem;
use crate::inbound_keys::Denied;
use crate::quota::Quota;
use crate::response::ProxyBody;
use crate::server::Handler;
use crate::store::StateStore;
use crate::token::TokenCache;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

/// How long `/`, `/status` and `/metrics` wait for the day's use to be read.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What the admin endpoints report about one upstream.
pub struct Upstream {
    pub name: String,
    pub tokens: Arc<TokenCache>,
    /// Each `[[upstream.identity]]`'s token cache.
    pub identities: Vec<Arc<TokenCache>>,
    pub quota: Arc<Quota>,
    /// One per worker serving the upstream.
    pub stats: Vec<Arc<RequestStats>>,
    /// The day's use by key, for the group.
    pub usage: Arc<crate::usage::Usage>,
}

pub struct Admin {
    upstreams: Vec<Upstream>,
    store: Arc<dyn StateStore>,
    /// What every request but the probes must carry; none: the endpoints are open.
    key: Option<AdminKey>,
}

impl Admin {
    pub fn new(
        upstreams: Vec<Upstream>,
        store: Arc<dyn StateStore>,
        key: Option<AdminKey>,
    ) -> Admin {
        Admin {
            upstreams,
            store,
            key,
        }
    }

    /// Ready while every upstream can serve: a usable token, and counts in hand for its
    /// windows when the store fails. What serves but is not well — a shared store that fails,
    /// a rotated refresh token not saved yet — makes it `degraded`, still 200, so that a load
    /// balancer does not take every replica out at once while they can still serve.
    fn readiness(&self) -> Response<ProxyBody> {
        let health = self.store.health();
        let store_problem = health.as_ref().and_then(|h| {
            h.problem.clone().or_else(|| {
                h.recovering.map(|left| {
                    format!(
                        "it lost its data a moment ago; no count is reserved while the replicas write back what they know ({} more)",
                        humantime::format_duration(Duration::from_secs(left.as_secs() + 1))
                    )
                })
            })
        });
        let (mut unready, mut degraded) = (Vec::new(), Vec::new());
        for u in &self.upstreams {
            let reason = u.tokens.unready_reason();
            match (u.tokens.cached(), reason) {
                (None, reason) => unready.push(format!(
                    "{}: {}",
                    u.name,
                    reason.unwrap_or_else(|| "no token yet".into())
                )),
                (Some(_), Some(reason)) => degraded.push(format!("{}: {reason}", u.name)),
                (Some(_), None) => {}
            }
            // An identity never used yet has no token and is not a problem; one that failed is.
            for identity in &u.identities {
                let whose = format!("{} (identity {})", u.name, identity.identity());
                match (identity.cached(), identity.failure()) {
                    (None, Some(reason)) => unready.push(format!("{whose}: {reason}")),
                    (Some(_), Some(reason)) => degraded.push(format!("{whose}: {reason}")),
                    (_, None) => {}
                }
            }
            if let Some(problem) = &store_problem {
                if !u.quota.counts_in_hand() {
                    unready.push(format!(
                        "{}: the counts in hand are spent and the state store fails ({problem})",
                        u.name
                    ));
                }
            }
        }
        if let Some(problem) = store_problem {
            degraded.push(format!("state store: {problem}"));
        }
        if !unready.is_empty() {
            unready.extend(degraded);
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &(unready.join("\n") + "\n"),
            )
        } else if !degraded.is_empty() {
            text(
                StatusCode::OK,
                &format!("degraded\n{}\n", degraded.join("\n")),
            )
        } else {
            text(StatusCode::OK, "ready\n")
        }
    }

    /// Add every upstream's latest counts to the day's use first, so what `/`, `/status` and
    /// `/metrics` show of the day is current. All at once, and for [`FLUSH_WAIT`] at most: a
    /// store that fails or is slow leaves the last reading (the background flush goes on).
    async fn flush(&self) {
        // Each in a task of its own: one that outlasts the wait finishes all the same, so
        // what it added to the store is never added again.
        let flushes = self.upstreams.iter().map(|u| {
            let (usage, name) = (Arc::clone(&u.usage), u.name.clone());
            tokio::spawn(async move {
                if let Err(e) = usage.flush().await {
                    tracing::debug!(upstream = %name, error = %e, "could not read the day's use");
                }
            })
        });
        let _ = tokio::time::timeout(FLUSH_WAIT, futures_util::future::join_all(flushes)).await;
    }

    async fn route(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        let read = request.method() == Method::GET || request.method() == Method::HEAD;
        let probe = read && matches!(request.uri().path(), "/healthz" | "/readyz");
        if let Some(key) = self.key.as_ref().filter(|_| !probe) {
            if let Err(denied) = key.check(request.headers()) {
                return refused(denied);
            }
        }
        if !read {
            return problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "the admin endpoints answer GET only",
                "admin",
            );
        }
        let path = request.uri().path();
        if matches!(path, "/" | "/status" | "/metrics") {
            self.flush().await;
        }
        match path {
            "/" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::render(&status::gather(&self.upstreams, &*self.store)),
            ),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness(),
            "/status" => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&status::gather(&self.upstreams, &*self.store))
                    .expect("a Status serialises"),
            ),
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics(),
            ),
            _ => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "admin endpoints: / (status page), /healthz, /readyz, /status, /metrics",
                "admin",
            ),
        }
    }

    fn metrics(&self) -> String {
        metrics::render(&self.upstreams, &*self.store)
    }
}

/// Whole seconds as `1h 2m 3s`; `under 1s` for none (a window in its last second resets in
/// less than one, not in none).
pub(crate) fn seconds(s: u64) -> String {
    match s {
        0 => "under 1s".to_owned(),
        s => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    }
}

/// 401 for a request without the admin key: a Basic challenge, so that a browser asks for it.
fn refused(denied: Denied) -> Response<ProxyBody> {
    let detail = match denied {
        Denied::Missing => "this admin endpoint requires the key of [admin] key: send Authorization: Bearer KEY, or KEY as the password of HTTP Basic (any user name); /healthz and /readyz need none",
        Denied::Wrong => "the key sent is not the admin key ([admin] key)",
    };
    let mut response = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Admin key required",
        detail,
        "admin",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(key::CHALLENGE),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    respond(status, "text/plain; charset=utf-8", body.to_owned())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl Handler for Admin {
    async fn call(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        self.route(&request).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_window_in_its_last_second_resets_in_under_one() {
        assert_eq!(super::seconds(0), "under 1s");
        assert_eq!(super::seconds(3725), "1h 2m 5s");
    }
}
