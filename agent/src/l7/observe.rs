//! What one HTTP request leaves behind: its metric series (Istio's `istio_requests_total` and
//! friends) and its access-log line. Both are written once the response body has been sent to
//! the client, so the duration and the response size are the whole exchange's; a response whose
//! body the client stopped reading is recorded too, flagged `DC`.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{body::ReceivedBytes, http::ProxyBody};
use crate::{
    access_log::{AccessEntry, EntryKind, Party, Policy},
    proxy::ProxyContext,
    stats::{Peer, Reporter, RequestKey, Transport},
};

/// Response flags (Envoy's short names) of requests the agent answered or cut short.
pub mod flags {
    /// Answered by the app (or the endpoint's agent) as it is.
    pub const NONE: &str = "-";
    /// No route rule matched.
    pub const NO_ROUTE: &str = "NR";
    /// No endpoint could take the request.
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// The endpoint could not be connected to.
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    /// The endpoint reset the request before answering.
    pub const UPSTREAM_RESET: &str = "UC";
    /// The endpoint did not answer within the route's (or the try's) timeout.
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    /// The request's propagated deadline had passed.
    pub const DEADLINE_EXCEEDED: &str = "DT";
    /// A failure the agent stopped retrying (attempts or retry budget spent).
    pub const RETRIES_EXHAUSTED: &str = "URX";
    /// A malformed request (e.g. an unreadable deadline header).
    pub const BAD_REQUEST: &str = "DPE";
    /// The client went away before the response was complete.
    pub const CLIENT_DISCONNECTED: &str = "DC";

    /// `flag` of a failure the agent would have retried but could not (Envoy joins flags so).
    pub fn with_retries_exhausted(flag: &'static str) -> &'static str {
        match flag {
            UPSTREAM_CONNECT_FAILURE => "UF,URX",
            UPSTREAM_RESET => "UC,URX",
            UPSTREAM_TIMEOUT => "UT,URX",
            _ => RETRIES_EXHAUSTED,
        }
    }
}

/// How many request body bytes came from the client.
pub enum RequestBytes {
    /// The body was never read (the agent answered first).
    Unread,
    /// Counted by the body the source agent records for replay.
    Recorded(ReceivedBytes),
    /// Counted by [`CountedBody`].
    Counted(Arc<AtomicU64>),
}

impl RequestBytes {
    fn get(&self) -> u64 {
        match self {
            Self::Unread => 0,
            Self::Recorded(received) => received.get(),
            Self::Counted(count) => count.load(Relaxed),
        }
    }
}

/// One request as it is being served, until its response has been sent.
pub struct RequestRecord {
    pub ctx: Arc<ProxyContext>,
    pub reporter: Reporter,
    pub source: Peer,
    pub source_address: Option<SocketAddr>,
    pub destination: Peer,
    pub destination_address: Option<SocketAddr>,
    pub service: Arc<str>,
    pub transport: Transport,
    pub grpc: bool,
    pub version: Version,
    pub method: Method,
    pub uri: Uri,
    /// The `Host` header, where HTTP/1.1 keeps the authority.
    pub host: Option<HeaderValue>,
    pub trace_id: Option<u128>,
    pub started: Instant,
    pub start_time: SystemTime,
    pub request_bytes: RequestBytes,
    /// Filled in once the response is known: 0 until then.
    pub status: u16,
    /// `grpc-status` of a gRPC answer (from its headers or trailers), else empty.
    pub grpc_status: &'static str,
    pub flags: &'static str,
    pub retries: u32,
}

impl RequestRecord {
    /// The response as sent to the client, recorded when its body ends or is dropped.
    fn observe(mut self, response: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
        self.status = response.status().as_u16();
        if let Some(code) = response.headers().get(GRPC_STATUS) {
            self.grpc_status = grpc_code(code);
        }
        response.map(|body| {
            ObservedBody {
                inner: body,
                sent: 0,
                record: Some(self),
            }
            .boxed()
        })
    }

    /// Records the request; `ended` says how its response body ended.
    fn finish(self, response_bytes: u64, ended: Ending) {
        let flags = match ended {
            _ if self.flags != flags::NONE => self.flags,
            Ending::Complete => flags::NONE,
            Ending::UpstreamFailed => flags::UPSTREAM_RESET,
            Ending::ClientGone => flags::CLIENT_DISCONNECTED,
        };
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.get();
        if self.ctx.access_log.wants(false) {
            self.ctx.access_log.log(AccessEntry {
                kind: EntryKind::Request,
                reporter: self.reporter,
                start_time: self.start_time,
                duration_ms: duration.as_secs_f64() * 1000.0,
                source: Party::of(&self.source, self.source_address),
                destination: Party::of(&self.destination, self.destination_address),
                destination_service: Some(Arc::clone(&self.service)),
                protocol: match (self.grpc, self.version) {
                    (true, _) => "grpc",
                    (false, Version::HTTP_2) => "http/2",
                    (false, Version::HTTP_10) => "http/1.0",
                    (false, _) => "http/1.1",
                },
                method: Some(self.method.to_string()),
                path: self.uri.path_and_query().map(|p| p.as_str().to_owned()),
                authority: self
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .or_else(|| self.host.and_then(|h| h.to_str().ok().map(str::to_owned))),
                status: Some(self.status),
                response_flags: flags,
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
                retries: self.retries,
                policy: Policy::allowed(),
                connection_security_policy: self.transport.security_policy(),
                trace_id: self.trace_id,
            });
        }
        let key = RequestKey {
            reporter: self.reporter,
            source: self.source,
            destination: self.destination,
            service: self.service,
            protocol: if self.grpc { "grpc" } else { "http" },
            response_code: self.status,
            grpc_status: self.grpc_status,
            response_flags: flags,
            transport: self.transport,
        };
        self.ctx
            .stats
            .request(&key)
            .record(duration, request_bytes, response_bytes);
    }
}

/// How a response body ended.
#[derive(Clone, Copy)]
enum Ending {
    Complete,
    /// The endpoint's body failed part-way.
    UpstreamFailed,
    /// The client stopped reading (or never got an answer).
    ClientGone,
}

/// A request until its response is known: if it is dropped first (the client went away), the
/// request is recorded with status 0.
pub struct PendingRecord(Option<RequestRecord>);

impl PendingRecord {
    pub fn new(record: RequestRecord) -> Self {
        Self(Some(record))
    }

    pub fn record_mut(&mut self) -> Option<&mut RequestRecord> {
        self.0.as_mut()
    }

    /// The response as sent to the client, recorded once its body has been sent.
    pub fn respond(mut self, response: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
        match self.0.take() {
            Some(record) => record.observe(response),
            None => response,
        }
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record.finish(0, Ending::ClientGone);
        }
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// A `grpc-status` value as a label: its code, or `unknown` when it is not one.
fn grpc_code(value: &HeaderValue) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    value
        .to_str()
        .ok()
        .and_then(|code| code.parse::<usize>().ok())
        .and_then(|code| CODES.get(code).copied())
        .unwrap_or(crate::stats::UNKNOWN)
}

/// A response body on its way to the client, counting what it sends.
struct ObservedBody {
    inner: ProxyBody,
    sent: u64,
    record: Option<RequestRecord>,
}

impl ObservedBody {
    fn finish(&mut self, ended: Ending) {
        if let Some(record) = self.record.take() {
            record.finish(self.sent, ended);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                self.sent += frame.data_ref().map_or(0, |data| data.len() as u64);
                // gRPC's status usually comes last, in the trailers.
                let code = frame.trailers_ref().and_then(|t| t.get(GRPC_STATUS));
                if let (Some(code), Some(record)) = (code, self.record.as_mut()) {
                    record.grpc_status = grpc_code(code);
                }
                // Senders stop polling once a body says it has ended.
                if self.inner.is_end_stream() {
                    self.finish(Ending::Complete);
                }
            }
            Poll::Ready(None) => self.finish(Ending::Complete),
            Poll::Ready(Some(Err(_))) => self.finish(Ending::UpstreamFailed),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // An empty body is never polled: it is complete as it is.
        let ended = if self.inner.is_end_stream() {
            Ending::Complete
        } else {
            Ending::ClientGone
        };
        self.finish(ended);
    }
}

/// A request body counting the bytes that pass through it.
pub struct CountedBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    pub fn new(inner: B) -> (Self, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        (
            Self {
                inner,
                count: Arc::clone(&count),
            },
            count,
        )
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Relaxed);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
