//! The admin listener (`[admin] listen`): `GET /healthz` (200 while running) and `GET /readyz`
//! (200 when every upstream has a usable token, else 503 naming the upstream and the reason).
//! It reports states, never a token.

use crate::error::{problem, ProxyBody};
use crate::server::Handler;
use crate::token::TokenCache;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::future::Future;
use std::sync::Arc;

pub struct Admin {
    tokens: Vec<Arc<TokenCache>>,
}

impl Admin {
    pub fn new(tokens: Vec<Arc<TokenCache>>) -> Admin {
        Admin { tokens }
    }

    fn readiness(&self) -> Response<ProxyBody> {
        let unready: Vec<String> = self
            .tokens
            .iter()
            .filter_map(|t| t.unready_reason().map(|r| format!("{}: {r}", t.name())))
            .collect();
        if unready.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &(unready.join("\n") + "\n"),
            )
        }
    }

    fn route(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "the admin endpoints answer GET only",
                "admin",
            );
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness(),
            _ => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "admin endpoints: /healthz, /readyz",
                "admin",
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_owned()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl Handler for Admin {
    fn call(&self, request: Request<Incoming>) -> impl Future<Output = Response<ProxyBody>> + Send {
        std::future::ready(self.route(&request))
    }
}
