//! The request body on its way upstream, and whether it can be sent twice (the way back is
//! [`crate::response`]).
//!
//! A replay after a 401 needs the body again, so bodies up to `retry_body_limit` are buffered
//! (most are a few KiB, and GETs have none), while they fit in the upstream's [`budget`]. A
//! larger body, or one of unknown length that turns out larger, streams through untouched and
//! is not replayed: the client then gets the 401. Trailer fields are forwarded either way; a
//! buffered body keeps them for its replay. Every client body is read within its [`pace`].

mod budget;
mod pace;

pub use budget::{Budget, Held};
pub use pace::{BodyError, Pace, Paced, TooSlow, Verdict};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request body read whole: what is sent, and sent again by a replay.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    pub data: Bytes,
    /// Trailer fields that followed the data (chunked HTTP/1.1, HTTP/2); rare.
    pub trailers: Option<HeaderMap>,
}

/// A request body on its way upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Buffered whole; the frames not sent yet.
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// Streams from the client; `prefix` holds what was read while deciding, and `held` its
    /// bytes in the budget until it is sent.
    Stream {
        prefix: Option<Bytes>,
        rest: Paced,
        held: Option<Held>,
    },
}

impl RequestBody {
    /// Where a streamed body says it came too slowly; none for a body read whole or one
    /// already over (a GET's: nothing to wait for, nothing allocated).
    pub fn verdict(&mut self) -> Option<Verdict> {
        match self {
            RequestBody::Stream { rest, .. } if !rest.is_end_stream() => Some(rest.verdict()),
            _ => None,
        }
    }

    pub fn full(body: Buffered) -> Self {
        RequestBody::Full {
            data: Some(body.data).filter(|b| !b.is_empty()),
            trailers: body.trailers,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            RequestBody::Stream { prefix, rest, held } => match prefix.take() {
                Some(b) => {
                    *held = None;
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full { data, trailers } => data.is_none() && trailers.is_none(),
            RequestBody::Stream { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |b| b.len() as u64);
                if trailers.is_some() {
                    // Not exact: an HTTP/1.1 body with trailers must go chunked, not with a
                    // Content-Length that leaves no room for them.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            RequestBody::Stream { prefix, rest, .. } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// A body ready to send, with a copy for a replay when it was small enough to keep.
pub struct Prepared {
    pub body: RequestBody,
    pub replay: Option<Kept>,
}

/// A body kept for a replay, and the bytes of the budget it holds until dropped (none for an
/// empty body).
pub struct Kept {
    pub body: Buffered,
    pub held: Option<Held>,
}

/// Read up to `limit` bytes of `body` to decide whether it can be replayed: it can when it is
/// no larger and its bytes fit in `budget`, taken as they arrive (so a slow client holds only
/// what it sent).
pub async fn prepare(body: Paced, limit: u64, budget: &Budget) -> Result<Prepared, BodyError> {
    let mut body = body;
    if body.is_end_stream() {
        return Ok(Prepared {
            body: RequestBody::full(Buffered::default()),
            replay: Some(Kept {
                body: Buffered::default(),
                held: None,
            }),
        });
    }
    if body.size_hint().lower() > limit {
        return Ok(Prepared {
            body: RequestBody::Stream {
                prefix: None,
                rest: body,
                held: None,
            },
            replay: None,
        });
    }
    let mut held: Option<Held> = None;
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut read = 0u64;
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let data = match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers end the body.
                trailers = frame.into_trailers().ok();
                break;
            }
        };
        read += data.len() as u64;
        let n = data.len() as u64;
        let fits = match &mut held {
            Some(held) => held.grow(n),
            None => {
                held = budget.take(n);
                held.is_some()
            }
        };
        // One frame is kept as it is; only several frames are copied together.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
        if read > limit || !fits {
            // Not kept: what was read leaves the budget once it is sent.
            return Ok(Prepared {
                body: RequestBody::Stream {
                    prefix: Some(first.unwrap_or_else(|| buf.freeze())),
                    rest: body,
                    held,
                },
                replay: None,
            });
        }
    }
    let all = Buffered {
        data: first.unwrap_or_else(|| buf.freeze()),
        trailers,
    };
    Ok(Prepared {
        body: RequestBody::full(all.clone()),
        replay: Some(Kept { body: all, held }),
    })
}
