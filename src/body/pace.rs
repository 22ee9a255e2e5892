//! How slowly a client may send a request body: `[upstream.limits] body_timeout` between two
//! reads, and `min_body_rate` on average once [`GRACE`] has passed (nginx's
//! `client_body_timeout`, Kestrel's `MinRequestBodyDataRate`). A timeout between reads alone
//! would let a client send a byte a second for ever.
//!
//! Only the time spent waiting for the client counts: while the upstream is slow to take the
//! body, the body is not read, and that is not the client's doing. (Over HTTP/2 a stream can
//! also wait for the connection's flow-control window, held by other streams' unread bodies:
//! the listener gives the connection four streams' worth, so that takes several at once.) A body that breaks a limit
//! ends with [`TooSlow`]; the request gets 408 and its connection is closed.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How long a body may take before `min_body_rate` applies.
pub const GRACE: Duration = Duration::from_secs(5);

/// The limits on a client's body: `body_timeout`, and `min_body_rate` in bytes per second
/// (0: none).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub between_reads: Duration,
    pub min_rate: u64,
}

/// Where a streamed body leaves its [`TooSlow`] for the request to find: the upstream
/// connection reports only that sending failed (HTTP/2 resets the stream without passing the
/// body's error on).
pub type Verdict = Arc<OnceLock<TooSlow>>;

/// A body that arrived too slowly: which limit it broke, in words.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TooSlow(String);

/// Why a client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Client(#[from] hyper::Error),
    #[error(transparent)]
    TooSlow(#[from] TooSlow),
}

/// A client's body, read within its [`Pace`].
#[derive(Debug)]
pub struct Paced {
    inner: Incoming,
    pace: Pace,
    received: u64,
    /// Time spent waiting for the client before the current wait.
    waited: Duration,
    /// When the current wait began, if the last poll found nothing.
    waiting_since: Option<Instant>,
    /// Wakes the task when a limit would be broken; made on the first wait only.
    timer: Option<Pin<Box<Sleep>>>,
    /// Made when the request asks for it ([`Paced::verdict`]).
    verdict: Option<Verdict>,
}

impl Paced {
    pub fn new(inner: Incoming, pace: Pace) -> Self {
        Paced {
            inner,
            pace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
            verdict: None,
        }
    }

    /// Where this body's [`TooSlow`] will be, for a request whose upstream may not say.
    pub fn verdict(&mut self) -> Verdict {
        Arc::clone(self.verdict.get_or_insert_with(Verdict::default))
    }

    /// When the wait that began at `since` breaks a limit: `body_timeout` after it began, or
    /// when the average over the time waited falls below `min_body_rate` (not before [`GRACE`]).
    fn deadline(&self, since: Instant) -> Instant {
        let mut deadline = since + self.pace.between_reads;
        if self.pace.min_rate > 0 {
            let earned = Duration::from_secs_f64(self.received as f64 / self.pace.min_rate as f64);
            let allowed = earned.max(GRACE).saturating_sub(self.waited);
            deadline = deadline.min(since + allowed);
        }
        deadline
    }

    /// The [`TooSlow`] of a wait that began at `since`, left in the verdict too.
    fn broken(&self, since: Instant, now: Instant) -> BodyError {
        let slow = self.which_limit(since, now);
        if let Some(verdict) = &self.verdict {
            let _ = verdict.set(slow.clone());
        }
        BodyError::TooSlow(slow)
    }

    fn which_limit(&self, since: Instant, now: Instant) -> TooSlow {
        let waited = self.waited + (now - since);
        if now - since >= self.pace.between_reads {
            TooSlow(format!(
                "the client sent nothing of the request body for {} (limits.body_timeout)",
                humantime::format_duration(self.pace.between_reads)
            ))
        } else {
            TooSlow(format!(
                "the client sent {} bytes of the request body in {} s, less than {} B/s (limits.min_body_rate)",
                self.received,
                waited.as_secs(),
                self.pace.min_rate
            ))
        }
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                    this.received += data.len() as u64;
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Client)))
            }
            Poll::Pending => {
                let now = Instant::now();
                let since = *this.waiting_since.get_or_insert(now);
                let deadline = this.deadline(since);
                if now >= deadline {
                    return Poll::Ready(Some(Err(this.broken(since, now))));
                }
                // Set again only when the deadline came closer: one that moved away (bytes
                // arrived) is found when the timer fires early, and set then.
                let timer = match &mut this.timer {
                    Some(timer) => timer,
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
                loop {
                    match timer.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        // The timer was set for an earlier deadline: set it again.
                        Poll::Ready(()) if Instant::now() < deadline => {
                            timer.as_mut().reset(deadline)
                        }
                        Poll::Ready(()) => {
                            return Poll::Ready(Some(Err(this.broken(since, Instant::now()))))
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
