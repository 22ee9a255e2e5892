//! Fault injection on the token endpoint.
//!
//! Owns: the switches tests set ([`IdentitySim::fail_next`], [`IdentitySim::delay_next`],
//! [`IdentitySim::answer_late`], [`IdentitySim::hang_up_next`],
//! [`IdentitySim::garbage_next`], [`IdentitySim::echo_next`]), deciding under one lock which of them apply to a request,
//! and the answers that replace one.
//!
//! Must not: process a request whose answer it replaces. Injected faults answer *instead of*
//! processing the request, so a failed or garbled refresh never rotates the refresh token;
//! only [`IdentitySim::answer_late`] and a processed [`IdentitySim::hang_up_next`] process it
//! and then hold the answer back or drop it. Faults apply to the token endpoint only, never
//! to the authorization endpoint.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Response, StatusCode};

use super::wire::OAuthError;
use super::IdentitySim;
use crate::{full_body, SimBody};

#[derive(Debug, Default)]
pub(super) struct Faults {
    fail_left: u32,
    fail_status: u16,
    delay_left: u32,
    delay: Duration,
    late_left: u32,
    late: Duration,
    garbage_left: u32,
    hang_up_left: u32,
    hang_up_processed: bool,
    echo_left: u32,
    echo_code: Option<&'static str>,
}

pub(super) enum Fault {
    Fail(u16),
    Garbage,
    /// Answer 400 with the request echoed in the error (see [`IdentitySim::echo_next`]).
    Echo(Option<&'static str>),
    /// Close the connection without an answer, after processing the request or not.
    HangUp {
        processed: bool,
    },
}

/// The connection was closed without an answer (see [`IdentitySim::hang_up_next`]).
#[derive(Debug)]
pub struct HangUp;

impl std::fmt::Display for HangUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the simulated identity server hung up")
    }
}

impl std::error::Error for HangUp {}

impl IdentitySim {
    /// The next `n` token requests answer `status` (JSON `temporarily_unavailable` for 4xx,
    /// plain text for anything else) without being processed. Replaces an earlier call.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut state = self.state();
        state.faults.fail_left = n;
        state.faults.fail_status = status;
    }

    /// The next `n` token requests wait `delay` before being handled.
    pub fn delay_next(&self, n: u32, delay: Duration) {
        let mut state = self.state();
        state.faults.delay_left = n;
        state.faults.delay = delay;
    }

    /// The next `n` token requests are processed at once (a refresh token is rotated, a code
    /// used up) and their answer is held back for `delay`: the client that gives up meanwhile
    /// never learns what it was issued. Counters move when the request is processed.
    pub fn answer_late(&self, n: u32, delay: Duration) {
        let mut state = self.state();
        state.faults.late_left = n;
        state.faults.late = delay;
    }

    /// The next `n` token requests are read whole and answered by closing the connection;
    /// when `processed`, they are processed first (a refresh token is rotated, a code used
    /// up), so the client that sent one never learns what it was issued.
    pub fn hang_up_next(&self, n: u32, processed: bool) {
        let mut state = self.state();
        state.faults.hang_up_left = n;
        state.faults.hang_up_processed = processed;
    }

    /// The next `n` token requests get 200 with an HTML body instead of JSON. A pending
    /// `fail_next` goes first.
    pub fn garbage_next(&self, n: u32) {
        self.state().faults.garbage_left = n;
    }

    /// The next `n` token requests are read whole and answered 400 with what they carried
    /// echoed back, as servers and gateways do: with `code` = `None` the form itself is the
    /// `error` and, URL-encoded, the `error_description`; with `Some(code)` the error is that
    /// code and the description holds the form raw, URL-encoded, decoded field by field, and
    /// the `Authorization` header. Never processed.
    pub fn echo_next(&self, n: u32, code: Option<&'static str>) {
        let mut state = self.state();
        state.faults.echo_left = n;
        state.faults.echo_code = code;
    }

    /// Counts the request and decides, under one lock, which injected faults apply to it: a
    /// delay before it is handled, an answer instead of handling it, a delay after.
    pub(super) fn take_faults(&self) -> (Option<Duration>, Option<Fault>, Option<Duration>) {
        let mut state = self.state();
        state.counters.token_requests += 1;
        let faults = &mut state.faults;
        let delay = take_one(&mut faults.delay_left).then_some(faults.delay);
        let late = take_one(&mut faults.late_left).then_some(faults.late);
        let fault = if take_one(&mut faults.fail_left) {
            Some(Fault::Fail(faults.fail_status))
        } else if take_one(&mut faults.hang_up_left) {
            Some(Fault::HangUp {
                processed: faults.hang_up_processed,
            })
        } else if take_one(&mut faults.garbage_left) {
            Some(Fault::Garbage)
        } else if take_one(&mut faults.echo_left) {
            Some(Fault::Echo(faults.echo_code))
        } else {
            None
        };
        if fault.is_some() {
            state.counters.failures_injected += 1;
        }
        (delay, fault, late)
    }
}

/// Decrements `left` and says whether there was one to take.
fn take_one(left: &mut u32) -> bool {
    let had_one = *left > 0;
    *left = left.saturating_sub(1);
    had_one
}

/// The 400 of [`IdentitySim::echo_next`] for a request with `authorization` and `form`.
pub(super) fn echo_response(
    code: Option<&str>,
    authorization: Option<&str>,
    form: &str,
) -> Response<SimBody> {
    let encoded: String = form_urlencoded::byte_serialize(form.as_bytes()).collect();
    let body = match code {
        None => serde_json::json!({"error": form, "error_description": encoded}),
        Some(code) => {
            let fields: Vec<String> = form_urlencoded::parse(form.as_bytes())
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let description = format!(
                "could not process {form} ({encoded}); fields {}; Authorization: {}",
                fields.join(", "),
                authorization.unwrap_or("none")
            );
            serde_json::json!({"error": code, "error_description": description})
        }
    };
    super::wire::json_response(StatusCode::BAD_REQUEST, &body)
}

pub(super) fn fault_response(fault: Fault) -> Response<SimBody> {
    match fault {
        Fault::HangUp { .. } => unreachable!("a hang-up has no response"),
        Fault::Echo(_) => unreachable!("an echo is answered from the request"),
        Fault::Garbage => Response::builder()
            .header(CONTENT_TYPE, "text/html")
            .body(full_body(
                "<html><body>Service temporarily unavailable</body></html>",
            ))
            .expect("static headers are valid"),
        Fault::Fail(status) => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| !s.is_informational())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_client_error() {
                let error = OAuthError::new(status, "temporarily_unavailable", "injected failure");
                return error.into_response();
            }
            // Gateways in front of identity servers answer 5xx with text or HTML, not JSON.
            Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "text/plain")
                .body(full_body("injected failure\n"))
                .expect("static headers are valid")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::identity::test_support::*;
    use crate::identity::IdentityConfig;

    /// fail_next answers the given status n times without touching the grant, then recovers.
    #[tokio::test]
    async fn fail_next_then_recovers() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        sim.fail_next(2, 503);
        for _ in 0..2 {
            let answer = refresh(&sim, &seed).await;
            assert_eq!(answer.status, 503);
            assert_eq!(answer.headers[CONTENT_TYPE], "text/plain");
        }
        sim.fail_next(1, 429);
        let answer = refresh(&sim, &seed).await;
        assert_eq!(answer.status, 429);
        assert_eq!(answer.json["error"], "temporarily_unavailable");
        // The seed was never consumed, so it still works.
        assert_eq!(refresh(&sim, &seed).await.status, 200);
        assert_eq!(sim.counters().failures_injected, 3);
    }

    /// garbage_next answers 200 with a body that is not JSON.
    #[tokio::test]
    async fn garbage_next_is_not_json() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        sim.garbage_next(1);
        let answer = post(&sim, "grant_type=client_credentials").await;
        assert_eq!(answer.status, 200);
        assert!(answer.json.is_null());
        assert!(answer.text.starts_with("<html>"));
        assert_eq!(
            post(&sim, "grant_type=client_credentials").await.status,
            200
        );
    }

    /// delay_next holds the answer back for the given time.
    #[tokio::test]
    async fn delay_next_delays() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        sim.delay_next(1, Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(
            post(&sim, "grant_type=client_credentials").await.status,
            200
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    /// answer_late rotates the refresh token at once and holds the answer back: a client
    /// that gave up has lost the new token, and the one it presented is spent.
    #[tokio::test]
    async fn answer_late_rotates_before_it_answers() {
        let (sim, _server) = start(IdentityConfig::default()).await;
        let seed = sim.issue_refresh_token();
        sim.answer_late(1, Duration::from_secs(5));
        let gave_up = tokio::time::timeout(Duration::from_millis(200), refresh(&sim, &seed)).await;
        assert!(gave_up.is_err(), "the answer is held back");
        assert_eq!(sim.counters().refreshes, 1, "processed before the answer");
        let again = refresh(&sim, &seed).await;
        assert_eq!(again.json["error"], "invalid_grant");
        assert_eq!(sim.counters().reuse_detected, 1);
    }
}
