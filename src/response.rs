//! What a client gets back: the upstream's response body, holding the request's concurrency
//! slot until it ends, or tollgate's own answer ([`crate::error`]'s problem+json).

use crate::forward::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Every response body tollgate sends: the upstream's, or one of its own.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The upstream's response body, streamed to the client. With `concurrency` set it holds the
/// request's slot, freed when the last frame has passed (or the client went away): the API
/// counts the request in flight until then.
#[derive(Debug)]
pub struct ResponseBody {
    inner: UpstreamBody,
    slot: Option<crate::quota::Slot>,
}

impl ResponseBody {
    pub fn new(inner: UpstreamBody, slot: Option<crate::quota::Slot>) -> Self {
        ResponseBody { inner, slot }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &frame {
            this.slot = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
