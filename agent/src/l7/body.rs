//! Request bodies that may be sent again: a retry or a mirror needs the same bytes. The first try
//! sends the body as it arrives — waiting for its end first would hold back a stream whose client
//! waits for an answer before sending more, such as a gRPC bidirectional stream — and records it
//! on the way, up to a bound. Only a body recorded whole can be sent again; a larger one, or one
//! still streaming when its first try fails, is never retried.
use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::lock;

/// What the first try has seen of the body so far.
#[derive(Default)]
pub struct Record {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    length: usize,
    /// The body's end was seen.
    complete: bool,
    /// More than the bound went by: the chunks were dropped and will not be replayed.
    overflowed: bool,
}

/// A request body from a client, sent once as it arrives and replayed if recorded whole.
pub struct RecordedBody<B = Incoming> {
    body: Option<B>,
    record: Arc<Mutex<Record>>,
    limit: usize,
}

impl<B: Body<Data = Bytes> + Unpin> RecordedBody<B> {
    /// Records up to `limit` bytes of `body`. A declared length above it is not recorded at all.
    pub fn new(body: B, limit: usize) -> Self {
        let record = Record {
            complete: body.is_end_stream(),
            overflowed: body.size_hint().lower() > limit as u64,
            ..Record::default()
        };
        Self {
            body: Some(body),
            record: Arc::new(Mutex::new(record)),
            limit,
        }
    }

    /// The body for the first try, sent as it arrives and recorded on the way; `None` once taken.
    pub fn first(&mut self) -> Option<UpstreamBody<B>> {
        let inner = self.body.take()?;
        Some(UpstreamBody::Recording {
            inner,
            record: Arc::clone(&self.record),
            limit: self.limit,
        })
    }

    /// Counts the bytes the client sends, as they are read.
    pub fn received_bytes(&self) -> ReceivedBytes {
        ReceivedBytes(Arc::clone(&self.record))
    }

    /// Whether the whole body has been recorded, so [`replay`](Self::replay) has a copy.
    pub fn is_replayable(&self) -> bool {
        let record = lock(&self.record);
        record.complete && !record.overflowed
    }

    /// Another copy of the body, if the whole of it has been recorded.
    pub fn replay(&self) -> Option<UpstreamBody<B>> {
        let record = lock(&self.record);
        if !record.complete || record.overflowed {
            return None;
        }
        Some(UpstreamBody::Replay {
            chunks: record.chunks.iter().cloned().collect(),
            trailers: record.trailers.clone(),
        })
    }
}

/// How many bytes of a [`RecordedBody`] the client has sent so far.
pub struct ReceivedBytes(Arc<Mutex<Record>>);

impl ReceivedBytes {
    pub fn get(&self) -> u64 {
        lock(&self.0).length as u64
    }
}

/// A request body as sent to an endpoint.
pub enum UpstreamBody<B = Incoming> {
    /// The client's body as it arrives, recorded for later tries.
    Recording {
        inner: B,
        record: Arc<Mutex<Record>>,
        limit: usize,
    },
    /// A recorded body sent again.
    Replay {
        chunks: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl<B: Body<Data = Bytes> + Unpin> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Self::Recording {
                inner,
                record,
                limit,
            } => {
                let poll = Pin::new(&mut *inner).poll_frame(cx);
                let mut record = lock(record);
                // Senders stop polling once a body says it has ended, so its final `None` may
                // never be seen.
                if inner.is_end_stream() {
                    record.complete = true;
                }
                match &poll {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            record.length += data.len();
                            if record.length > *limit {
                                record.overflowed = true;
                                record.chunks = Vec::new();
                            } else if !record.overflowed {
                                record.chunks.push(data.clone());
                            }
                        } else if let Some(trailers) = frame.trailers_ref() {
                            record.trailers = Some(trailers.clone());
                        }
                    }
                    Poll::Ready(None) => record.complete = true,
                    Poll::Ready(Some(Err(_))) | Poll::Pending => {}
                }
                poll
            }
            Self::Replay { chunks, trailers } => match chunks.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Recording { inner, .. } => inner.is_end_stream(),
            Self::Replay { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Recording { inner, .. } => inner.size_hint(),
            Self::Replay { chunks, .. } => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;

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

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty()
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

    async fn collect(body: UpstreamBody<Frames>) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_small_body_is_sent_then_replayed_whole_with_its_trailers() {
        let mut body = RecordedBody::new(frames(&["ab", "cd"], true, None), 10);
        assert!(
            body.replay().is_none(),
            "nothing recorded before the first try"
        );
        let (bytes, _) = collect(body.first().unwrap()).await;
        assert_eq!(bytes, b"abcd");
        assert!(body.first().is_none());
        for _ in 0..2 {
            let replay = body.replay().unwrap();
            assert_eq!(replay.size_hint().exact(), Some(4));
            let (bytes, trailers) = collect(replay).await;
            assert_eq!(bytes, b"abcd");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
    }

    #[tokio::test]
    async fn a_body_is_recorded_whole_once_its_last_frame_is_read() {
        let mut body = RecordedBody::new(frames(&["ab", "cd"], false, None), 8);
        let mut first = body.first().unwrap();
        // As an HTTP/2 sender does: stop polling when the body says it has ended.
        while !first.is_end_stream() {
            first.frame().await.unwrap().unwrap();
        }
        assert_eq!(collect(body.replay().unwrap()).await.0, b"abcd");
    }

    #[tokio::test]
    async fn a_large_body_streams_once_with_nothing_lost_and_is_not_replayed() {
        let mut body = RecordedBody::new(frames(&["abcdef", "ghij", "kl"], false, None), 8);
        assert_eq!(collect(body.first().unwrap()).await.0, b"abcdefghijkl");
        assert!(body.replay().is_none());
        let mut declared = RecordedBody::new(frames(&["abcdefghijkl"], false, Some(12)), 8);
        assert_eq!(collect(declared.first().unwrap()).await.0, b"abcdefghijkl");
        assert!(declared.replay().is_none());
    }

    #[tokio::test]
    async fn a_body_still_streaming_is_not_replayed_but_an_empty_one_is() {
        let mut body = RecordedBody::new(frames(&["ab", "cd"], false, None), 8);
        let mut first = body.first().unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert!(
            body.replay().is_none(),
            "half a body must not be sent again"
        );
        let empty = RecordedBody::new(frames(&[], false, Some(0)), 8);
        assert_eq!(collect(empty.replay().unwrap()).await.0, b"");
    }
}
