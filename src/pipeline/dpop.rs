//! DPoP on API requests (RFC 9449 §7): a fresh proof beside every DPoP-bound token — its
//! method, URL without query, the token's hash, and the API's nonce when it gave one — and the
//! API's nonce challenge (401 `error="use_dpop_nonce"` with `DPoP-Nonce`), answered by sending
//! the request once more with the nonce and the same token: no refresh. A 401 that is not a
//! challenge may still get the 401 replay after it; a second challenge is passed on as it is.
//! Each worker keeps the nonce it learnt last.
//!
//! Must not: refresh a token, or resend a request whose body was not kept.

use super::{Pipeline, Replay, Trace};
use crate::error::ProxyError;
use crate::forward::UpstreamBody;
use crate::quota::Window;
use crate::token::{DpopBinding, TokenError};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use std::time::Duration;

impl Pipeline {
    /// Put a fresh proof for a request with `method` to `uri` in `headers`.
    pub(super) fn prove(
        &self,
        headers: &mut HeaderMap,
        method: &Method,
        uri: &Uri,
        binding: &DpopBinding,
    ) -> Result<(), ProxyError> {
        let htu = self.upstream.target.htu(uri);
        let nonce = crate::token::lock(&self.dpop_nonce).clone();
        let now = crate::token::assertion::unix_now();
        let proof = binding
            .key
            .proof(
                method.as_str(),
                &htu,
                Some(&binding.ath),
                nonce.as_deref(),
                now,
            )
            .and_then(|p| HeaderValue::from_str(&p).map_err(|e| e.to_string()))
            .map_err(|reason| {
                ProxyError::Token(TokenError::Unavailable {
                    reason,
                    retry_after: Duration::from_secs(1),
                })
            })?;
        headers.insert("dpop", proof);
        Ok(())
    }

    /// The API asked for its nonce: send the `kept` request once more with it and the same
    /// token (a request like any other for the quota).
    pub(super) async fn resend_with_nonce(
        &self,
        kept: &Replay,
        binding: &DpopBinding,
        key: Option<usize>,
        window: &mut Option<Window>,
        trace: &mut Option<Trace>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        tracing::debug!(upstream = %self.name, "the API asked for a DPoP nonce; sending once more with it");
        let mut headers = kept.headers.clone();
        self.prove(&mut headers, &kept.method, &kept.uri, binding)?;
        let mut request = Request::new(crate::body::RequestBody::full(kept.body.clone()));
        *request.method_mut() = kept.method.clone();
        *request.uri_mut() = kept.uri.clone();
        *request.headers_mut() = headers;
        let identity = self.tokens_for(key).identity();
        *window = self.quota.spend(self.key_name(key), identity).await?;
        self.counts(key).sent();
        self.send(request, None, trace).await
    }

    /// Keep the `DPoP-Nonce` of `response`; whether it is a nonce challenge.
    pub(super) fn learn_nonce(&self, response: &Response<UpstreamBody>) -> bool {
        let Some(nonce) = response
            .headers()
            .get("dpop-nonce")
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        *crate::token::lock(&self.dpop_nonce) = Some(nonce.to_owned());
        response.status() == StatusCode::UNAUTHORIZED
            && response
                .headers()
                .get_all(http::header::WWW_AUTHENTICATE)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("use_dpop_nonce")))
    }
}
