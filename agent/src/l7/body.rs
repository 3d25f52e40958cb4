//! Request bodies kept for replay: a retry or a mirror sends the same bytes again, so a body up
//! to the configured bound is read whole before the first try; a larger one streams through
//! once and its request is never retried.
use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A request body read up to a bound.
pub struct BufferedBody<B = Incoming> {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    /// The unread rest of a body larger than the bound.
    rest: Option<B>,
}

impl<B: Body<Data = Bytes> + Unpin> BufferedBody<B> {
    /// Reads `body` until it ends or more than `limit` bytes have arrived. A declared length
    /// above `limit` is not read at all: it could never be replayed.
    pub async fn read(mut body: B, limit: usize) -> Result<Self, B::Error> {
        let mut buffered = Self {
            chunks: Vec::new(),
            trailers: None,
            rest: None,
        };
        if body.size_hint().lower() > limit as u64 {
            buffered.rest = Some(body);
            return Ok(buffered);
        }
        let mut length = 0;
        while !body.is_end_stream() {
            let Some(frame) = body.frame().await else {
                break;
            };
            match frame?.into_data() {
                Ok(data) => {
                    length += data.len();
                    buffered.chunks.push(data);
                    if length > limit {
                        buffered.rest = Some(body);
                        break;
                    }
                }
                Err(frame) => {
                    buffered.trailers = frame.into_trailers().ok();
                    break;
                }
            }
        }
        Ok(buffered)
    }

    /// A copy to send, if the whole body is held.
    pub fn replay(&self) -> Option<ReplayBody<B>> {
        if self.rest.is_some() {
            return None;
        }
        Some(ReplayBody {
            chunks: self.chunks.iter().cloned().collect(),
            trailers: self.trailers.clone(),
            rest: None,
        })
    }

    /// The body to send once: what was read, then the rest as it arrives.
    pub fn into_stream(self) -> ReplayBody<B> {
        ReplayBody {
            chunks: self.chunks.into(),
            trailers: self.trailers,
            rest: self.rest,
        }
    }
}

/// A request body as sent upstream.
pub struct ReplayBody<B = Incoming> {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<B>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        match &self.rest {
            None => SizeHint::with_exact(held),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(held + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(held + upper);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A body made of given frames, with an optional declared length.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        declared: Option<u64>,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.frames.pop_front().map(Ok))
        }

        fn size_hint(&self) -> SizeHint {
            self.declared.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn frames(chunks: &[&'static str], trailer: bool, declared: Option<u64>) -> Frames {
        let mut frames: VecDeque<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailer {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            frames.push_back(Frame::trailers(trailers));
        }
        Frames { frames, declared }
    }

    async fn collect(body: ReplayBody<Frames>) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_small_body_replays_whole_with_its_trailers() {
        let body = BufferedBody::read(frames(&["ab", "cd"], true, None), 10)
            .await
            .unwrap();
        for _ in 0..2 {
            let replay = body.replay().unwrap();
            assert_eq!(replay.size_hint().exact(), Some(4));
            let (bytes, trailers) = collect(replay).await;
            assert_eq!(bytes, b"abcd");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
    }

    #[tokio::test]
    async fn a_large_body_streams_once_with_nothing_lost() {
        let body = BufferedBody::read(frames(&["abcdef", "ghij", "kl"], false, None), 8)
            .await
            .unwrap();
        assert!(body.replay().is_none());
        assert_eq!(collect(body.into_stream()).await.0, b"abcdefghijkl");
        // A declared length over the bound is not read before sending.
        let declared = BufferedBody::read(frames(&["abcdefghijkl"], false, Some(12)), 8)
            .await
            .unwrap();
        assert!(declared.chunks.is_empty() && declared.replay().is_none());
        assert_eq!(collect(declared.into_stream()).await.0, b"abcdefghijkl");
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_bound_is_replayable() {
        let body = BufferedBody::read(frames(&["abcd", "efgh"], false, Some(8)), 8)
            .await
            .unwrap();
        assert_eq!(collect(body.replay().unwrap()).await.0, b"abcdefgh");
    }
}
