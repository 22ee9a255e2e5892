//! A counted window of a quota ([`Policy`]: name, limit, length) and its state now
//! ([`Window`]), and how a response tells it: `RateLimit-Policy` and `RateLimit` of the IETF
//! httpapi draft, and the `X-RateLimit-*` trio older clients read. Header values that never
//! change are made once, when the proxy starts.

use super::ceil_secs;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// A counted window of a quota: its name, size and length, with its header values made once.
#[derive(Debug)]
pub struct Policy {
    /// `day`, `second`, `minute` or `hour`.
    pub name: &'static str,
    pub limit: u64,
    /// The window's length.
    pub seconds: u64,
    /// `RateLimit-Policy` and `X-RateLimit-Limit`, which never change.
    policy_header: HeaderValue,
    limit_header: HeaderValue,
}

impl Policy {
    /// Made once per window when the proxy starts, and kept for the life of the process, so
    /// every response can carry its headers without building them again.
    pub fn leak(name: &'static str, limit: u64, seconds: u64) -> &'static Policy {
        let text: &'static str = Box::leak(format!("\"{name}\";q={limit};w={seconds}").into());
        Box::leak(Box::new(Policy {
            name,
            limit,
            seconds,
            policy_header: HeaderValue::from_static(text),
            limit_header: HeaderValue::from(limit),
        }))
    }
}

/// One window's state, as the rate-limit headers and `/status` report it.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub policy: &'static Policy,
    pub remaining: u64,
    /// Until the window is whole again.
    pub reset: Duration,
}

/// The window with fewer requests left; on a tie, the one that takes longer to come back.
pub(super) fn tighter(a: Option<Window>, b: Window) -> Window {
    match a {
        Some(a)
            if (a.remaining, std::cmp::Reverse(a.reset))
                <= (b.remaining, std::cmp::Reverse(b.reset)) =>
        {
            a
        }
        _ => b,
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Whether `headers` already carry rate-limit headers (the upstream's own).
pub fn has_headers(headers: &HeaderMap) -> bool {
    [
        &RATELIMIT_POLICY,
        &RATELIMIT,
        &X_LIMIT,
        &X_REMAINING,
        &X_RESET,
    ]
    .into_iter()
    .any(|name| headers.contains_key(name))
}

/// Describe `window` in the response headers: `RateLimit-Policy` and `RateLimit` of the IETF
/// httpapi draft, and the `X-RateLimit-*` trio that older clients read.
pub fn add_headers(headers: &mut HeaderMap, window: &Window) {
    // One buffer, `"day";r=1500;t=3600`, whose two numbers are also the values of
    // X-RateLimit-Remaining and X-RateLimit-Reset: one allocation for three headers.
    let (mut remaining, mut reset) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (remaining, reset) = (
        remaining.format(window.remaining),
        reset.format(ceil_secs(window.reset)),
    );
    let name = window.policy.name;
    let mut buf = BytesMut::with_capacity(name.len() + remaining.len() + reset.len() + 8);
    buf.extend_from_slice(b"\"");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\";r=");
    let r = buf.len();
    buf.extend_from_slice(remaining.as_bytes());
    let r_end = buf.len();
    buf.extend_from_slice(b";t=");
    let t = buf.len();
    buf.extend_from_slice(reset.as_bytes());
    let state = buf.freeze();
    let value = |bytes: Bytes| HeaderValue::from_maybe_shared(bytes).expect("visible ASCII");
    headers.insert(X_REMAINING.clone(), value(state.slice(r..r_end)));
    headers.insert(X_RESET.clone(), value(state.slice(t..)));
    headers.insert(RATELIMIT.clone(), value(state));
    headers.insert(
        RATELIMIT_POLICY.clone(),
        window.policy.policy_header.clone(),
    );
    headers.insert(X_LIMIT.clone(), window.policy.limit_header.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_draft() {
        let mut h = HeaderMap::new();
        add_headers(
            &mut h,
            &Window {
                policy: Policy::leak("day", 2000, 86_400),
                remaining: 1500,
                reset: Duration::from_millis(3_599_100),
            },
        );
        assert_eq!(h["ratelimit-policy"], "\"day\";q=2000;w=86400");
        assert_eq!(h["ratelimit"], "\"day\";r=1500;t=3600");
        assert_eq!(h["x-ratelimit-limit"], "2000");
        assert_eq!(h["x-ratelimit-remaining"], "1500");
        assert_eq!(h["x-ratelimit-reset"], "3600");
    }
}
