//! The download pattern of the simulated API: a known byte sequence of any length, made one
//! chunk at a time as it streams (so multi-megabyte downloads cost no memory), and its
//! SHA-256, which tests compare with what came through the proxy.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::{hex, SimBody};

/// Size of download chunks.
const CHUNK: usize = 64 * 1024;

/// A 200 whose body is the first `size` bytes of the pattern.
pub fn download(size: u64) -> Response<SimBody> {
    Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, HeaderValue::from(size))
        .body(PatternBody { sent: 0, size }.boxed())
        .expect("static headers are valid")
}

/// SHA-256 (lower-case hex) of the first `n` bytes of the download pattern.
pub fn pattern_sha256(n: u64) -> String {
    let mut hasher = Sha256::new();
    let mut done = 0;
    while done < n {
        let len = (n - done).min(CHUNK as u64);
        hasher.update(pattern_chunk(done, len as usize));
        done += len;
    }
    hex(&hasher.finalize())
}

/// `len` bytes of the pattern starting at byte `start`: byte i is `i % 251`. 251 is prime,
/// so the pattern does not line up with any power-of-two buffer size and misplaced or
/// dropped chunks change the hash.
fn pattern_chunk(start: u64, len: usize) -> Bytes {
    (start..start + len as u64)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Generates the download pattern one chunk at a time.
struct PatternBody {
    sent: u64,
    size: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.size {
            return Poll::Ready(None);
        }
        let len = (self.size - self.sent).min(CHUNK as u64);
        let chunk = pattern_chunk(self.sent, len as usize);
        self.sent += len;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.size
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.size - self.sent)
    }
}
