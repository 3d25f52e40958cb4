//! Protocol detection on a freshly accepted connection: HTTP/2 with prior knowledge, HTTP/1.x, or
//! anything else (opaque TCP). Detection consumes bytes from the stream; they are handed back so
//! the caller can replay them, e.g. through [`Prefixed`].
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The longest HTTP/1 request line accepted, its line ending included.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;

/// The most bytes [`detect`] reads. [`classify`] always decides by then, since a longer request
/// line is opaque and the HTTP/2 preface is shorter.
pub const MAX_DETECT_BYTES: usize = MAX_REQUEST_LINE_BYTES;

/// What the client sends first on an HTTP/2 connection with prior knowledge (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest method accepted; real ones are far shorter, so a longer token is not HTTP.
const MAX_METHOD_BYTES: usize = 20;

/// How a request line may end, from the version on.
const HTTP1_LINE_ENDS: [&[u8]; 4] = [
    b"HTTP/1.1\r\n",
    b"HTTP/1.0\r\n",
    b"HTTP/1.1\n",
    b"HTTP/1.0\n",
];

/// How much the detection buffer grows by at a time: a request line usually fits in the first
/// read, and a connection that turns out opaque should not have cost the whole allowance.
const READ_CHUNK_BYTES: usize = 1024;

/// The protocol a client speaks, as far as the proxy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1: the bytes begin with a request line.
    Http1,
    /// HTTP/2 with prior knowledge: the bytes begin with the connection preface.
    Http2,
    /// Anything else, proxied as plain TCP.
    Opaque,
}

/// Decides the protocol from the first bytes a client sent. `None` means the bytes could still
/// become either HTTP form, so more are needed.
///
/// HTTP/2 is the full connection preface. HTTP/1 is a complete request line: a method of 1 to 20
/// uppercase ASCII letters, one space, a request-target of visible ASCII, one space, `HTTP/1.0` or
/// `HTTP/1.1`, and `\r\n` or `\n`, at most [`MAX_REQUEST_LINE_BYTES`] in all. Bytes that can no
/// longer become either are opaque at once.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    // The preface is itself shaped like a request line ("PRI * HTTP/2.0"), so it is ruled out
    // before the bytes are judged as HTTP/1.
    if H2_PREFACE.starts_with(prefix) {
        return None;
    }
    let line = &prefix[..prefix.len().min(MAX_REQUEST_LINE_BYTES)];
    match classify_request_line(line) {
        // Still undecided with the whole allowance seen: the line would be too long.
        None if line.len() == MAX_REQUEST_LINE_BYTES => Some(Protocol::Opaque),
        decision => decision,
    }
}

/// [`classify`]'s HTTP/1 rule, without the length limit.
fn classify_request_line(bytes: &[u8]) -> Option<Protocol> {
    // Counting one past the limit is enough to reject a long token without scanning all of it.
    let method_len = bytes
        .iter()
        .take(MAX_METHOD_BYTES + 1)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if method_len > MAX_METHOD_BYTES {
        return Some(Protocol::Opaque);
    }
    let rest = match space_after(method_len, &bytes[method_len..]) {
        Ok(rest) => rest,
        Err(decision) => return decision,
    };
    let target_len = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    let version = match space_after(target_len, &rest[target_len..]) {
        Ok(version) => version,
        Err(decision) => return decision,
    };
    if HTTP1_LINE_ENDS.iter().any(|end| version.starts_with(end)) {
        Some(Protocol::Http1)
    } else if HTTP1_LINE_ENDS.iter().any(|end| end.starts_with(version)) {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// The bytes after the single space that must follow a field of `field_len` bytes (0: the field
/// is missing). `Err` holds the decision when the bytes there are not such a space.
fn space_after(field_len: usize, rest: &[u8]) -> Result<&[u8], Option<Protocol>> {
    match rest.split_first() {
        // The field may still grow.
        None => Err(None),
        Some((b' ', after)) if field_len > 0 => Ok(after),
        Some(_) => Err(Some(Protocol::Opaque)),
    }
}

/// Reads from `stream` until [`classify`] decides, the peer sends EOF, `timeout` passes, or
/// [`MAX_DETECT_BYTES`] have been read, and returns the protocol with every byte read. Undecided
/// ends as [`Protocol::Opaque`]: the client of a server-speaks-first protocol sends nothing, so
/// `timeout` bounds the whole detection, not each read. I/O errors are returned as they are.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::new();
    let protocol = match tokio::time::timeout(timeout, read_until_decided(stream, &mut buf)).await {
        Ok(decided) => decided?,
        // `read_buf` is cancel safe: a read cut off by the deadline took nothing from the stream,
        // so `buf` holds every byte read.
        Err(_elapsed) => Protocol::Opaque,
    };
    Ok((protocol, buf.freeze()))
}

/// [`detect`] without the deadline, appending what it reads to `buf`.
async fn read_until_decided<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> io::Result<Protocol> {
    while buf.len() < MAX_DETECT_BYTES {
        let room = MAX_DETECT_BYTES - buf.len();
        buf.reserve(room.min(READ_CHUNK_BYTES));
        if stream.read_buf(&mut (&mut *buf).limit(room)).await? == 0 {
            return Ok(Protocol::Opaque);
        }
        if let Some(protocol) = classify(buf) {
            return Ok(protocol);
        }
    }
    Ok(Protocol::Opaque)
}

/// A stream that first yields `prefix`, then reads from the inner stream; writes go to the inner
/// stream. It puts the bytes [`detect`] consumed back in front of the connection.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// A stream yielding `prefix` before what `inner` yields.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The part of the prefix not read yet, and the inner stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        if n == this.prefix.len() {
            // Taking the whole prefix frees the detection buffer instead of keeping an empty view
            // of it, and with it the allocation, for the connection's lifetime.
            buf.put_slice(&std::mem::take(&mut this.prefix));
        } else {
            buf.put_slice(&this.prefix.split_to(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{duplex, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::oneshot,
        time::sleep,
    };

    use super::*;

    /// An empty SETTINGS frame, which follows the preface.
    const SETTINGS_FRAME: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

    /// The start of a TLS 1.2/1.3 ClientHello record.
    const CLIENT_HELLO: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];

    #[test]
    fn empty_input_is_undecided() {
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn preface_is_undecided_until_complete() {
        for len in 0..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..len]), None, "{len} bytes");
        }
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        let mut with_frame = H2_PREFACE.to_vec();
        with_frame.extend_from_slice(SETTINGS_FRAME);
        assert_eq!(classify(&with_frame), Some(Protocol::Http2));
    }

    #[test]
    fn bytes_leaving_the_preface_are_judged_as_http1() {
        // The preface's own request line, with a different continuation, is HTTP/2.0: not HTTP/1.
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"PRI * HTTP/2.0\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRIX / HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/1."), None);
    }

    #[test]
    fn request_line_is_undecided_until_complete() {
        let lines: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"GET /index.html?q=a%20b&x=1#frag HTTP/1.1\r\n",
            b"POST /api HTTP/1.0\r\n",
            b"GET / HTTP/1.1\n",
            b"HEAD / HTTP/1.0\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"GET http://example.com/x HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
        ];
        for line in lines {
            for len in 1..line.len() {
                assert_eq!(
                    classify(&line[..len]),
                    None,
                    "{:?}",
                    String::from_utf8_lossy(&line[..len])
                );
            }
            assert_eq!(classify(line), Some(Protocol::Http1));
            let mut request = line.to_vec();
            request.extend_from_slice(b"Host: example.com\r\n\r\n");
            assert_eq!(classify(&request), Some(Protocol::Http1));
        }
    }

    #[test]
    fn any_uppercase_method_is_accepted() {
        for method in [
            "PROPFIND",
            "MKCOL",
            "PATCH",
            "A",
            &"X".repeat(MAX_METHOD_BYTES),
        ] {
            let line = format!("{method} /x HTTP/1.1\r\n");
            assert_eq!(classify(line.as_bytes()), Some(Protocol::Http1), "{method}");
        }
        let too_long = "X".repeat(MAX_METHOD_BYTES + 1);
        assert_eq!(classify(too_long.as_bytes()), Some(Protocol::Opaque));
        let line = format!("{too_long} /x HTTP/1.1\r\n");
        assert_eq!(classify(line.as_bytes()), Some(Protocol::Opaque));
    }

    #[test]
    fn non_http_is_opaque_at_once() {
        let cases: &[&[u8]] = &[
            CLIENT_HELLO,
            &CLIENT_HELLO[..1],
            &[0],
            &[0xff, 0xfe],
            b"get / HTTP/1.1\r\n",
            b"g",
            b"Get",
            b"GET  /",
            b"GET  HTTP/1.1\r\n",
            b" GET",
            b"\r\nGET / HTTP/1.1\r\n",
            b"GET\r\n",
            b"GET\t/",
            b"M-SEARCH",
            b"GET /\x7f",
            b"GET /\x01",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\n",
            b"GET /\t",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/2",
            b"GET / HTTP/1.2",
            b"GET / http/1.1\r\n",
            b"GET / HTTPS",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTP/1.1\r\r",
            b"GET / HTTP/1.1\rX",
            b"GET / HTTP/1.1x",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"*1\r\n$4\r\nPING\r\n",
        ];
        for case in cases {
            assert_eq!(
                classify(case),
                Some(Protocol::Opaque),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn request_line_length_is_limited() {
        let line_of = |len: usize| {
            let fixed = b"GET / HTTP/1.1\r\n".len();
            format!("GET /{} HTTP/1.1\r\n", "a".repeat(len - fixed)).into_bytes()
        };
        let longest = line_of(MAX_REQUEST_LINE_BYTES);
        assert_eq!(longest.len(), MAX_REQUEST_LINE_BYTES);
        assert_eq!(classify(&longest), Some(Protocol::Http1));

        let too_long = line_of(MAX_REQUEST_LINE_BYTES + 1);
        assert_eq!(classify(&too_long[..MAX_REQUEST_LINE_BYTES - 1]), None);
        assert_eq!(
            classify(&too_long[..MAX_REQUEST_LINE_BYTES]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(&too_long), Some(Protocol::Opaque));

        let mut bare_lf = longest.clone();
        bare_lf.remove(bare_lf.len() - 2);
        bare_lf.insert(5, b'a');
        assert_eq!(bare_lf.len(), MAX_REQUEST_LINE_BYTES);
        assert_eq!(classify(&bare_lf), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn detects_http1_sent_in_pieces_and_replays_it() {
        let (mut client, mut server) = duplex(1024);
        let (more_tx, more_rx) = oneshot::channel::<()>();
        let pieces: &[&[u8]] = &[b"G", b"ET /pa", b"th?x=1 HT", b"TP/1", b".1\r", b"\n"];
        let writer = tokio::spawn(async move {
            for piece in pieces {
                client.write_all(piece).await?;
                sleep(Duration::from_millis(20)).await;
            }
            // The rest of the request only comes once detection is over, so what detection read
            // is exactly the request line.
            let _ = more_rx.await;
            client.write_all(b"Host: a\r\n\r\n").await
        });

        let (protocol, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(&read[..], b"GET /path?x=1 HTTP/1.1\r\n");

        more_tx.send(()).unwrap();
        writer.await.unwrap().unwrap();
        let mut replayed = Vec::new();
        Prefixed::new(read, server)
            .read_to_end(&mut replayed)
            .await
            .unwrap();
        assert_eq!(&replayed[..], b"GET /path?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn detects_h2_preface_and_replays_it() {
        let mut sent = H2_PREFACE.to_vec();
        sent.extend_from_slice(SETTINGS_FRAME);
        let (mut client, mut server) = duplex(1024);
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&to_send[..10]).await?;
            sleep(Duration::from_millis(20)).await;
            client.write_all(&to_send[10..]).await
        });

        let (protocol, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert!(read.starts_with(H2_PREFACE));

        writer.await.unwrap().unwrap();
        let mut replayed = Vec::new();
        Prefixed::new(read, server)
            .read_to_end(&mut replayed)
            .await
            .unwrap();
        assert_eq!(replayed, sent);
    }

    #[tokio::test]
    async fn binary_is_opaque_without_waiting() {
        let timeout = Duration::from_secs(10);
        let (mut client, mut server) = duplex(1024);
        // The client stays connected and quiet after its first bytes, as a TLS client would.
        client.write_all(CLIENT_HELLO).await.unwrap();
        let start = Instant::now();
        let (protocol, read) = detect(&mut server, timeout).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert_eq!(&read[..], CLIENT_HELLO);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        drop(client);
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_the_timeout() {
        let timeout = Duration::from_millis(50);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();

        let start = Instant::now();
        let (protocol, read) = detect(&mut server, timeout).await.unwrap();
        let elapsed = start.elapsed();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(read.is_empty());
        assert!(elapsed >= timeout, "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        drop(client);
    }

    #[tokio::test]
    async fn one_deadline_bounds_the_whole_detection() {
        // One byte every 30 ms never leaves a read waiting 100 ms, but the line takes over a
        // second to complete: only a deadline for the whole detection stops it early.
        let line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(30)).into_bytes();
        let (mut client, mut server) = duplex(1024);
        let to_send = line.clone();
        let writer = tokio::spawn(async move {
            for byte in to_send {
                if client.write_all(&[byte]).await.is_err() {
                    break;
                }
                sleep(Duration::from_millis(30)).await;
            }
        });

        let start = Instant::now();
        let (protocol, read) = detect(&mut server, Duration::from_millis(100))
            .await
            .unwrap();
        let elapsed = start.elapsed();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
        assert!(!read.is_empty());
        assert!(read.len() < line.len());
        assert!(line.starts_with(&read));
        drop(server);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn eof_before_a_decision_is_opaque() {
        let (mut client, mut server) = duplex(1024);
        client.write_all(b"GET /").await.unwrap();
        drop(client);
        let (protocol, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert_eq!(&read[..], b"GET /");

        let (client, mut server) = duplex(1024);
        drop(client);
        let (protocol, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(read.is_empty());
    }

    /// A stream whose reads fail.
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn read_errors_are_returned() {
        let err = detect(&mut Failing, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn reads_are_bounded() {
        let mut sent = b"GET /".to_vec();
        sent.resize(4 * MAX_DETECT_BYTES, b'a');
        let (mut client, mut server) = duplex(sent.len());
        client.write_all(&sent).await.unwrap();

        let (protocol, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(read.len() >= MAX_REQUEST_LINE_BYTES);
        assert!(read.len() <= MAX_DETECT_BYTES, "{}", read.len());
        assert_eq!(&read[..], &sent[..read.len()]);
        drop(client);
    }

    #[tokio::test]
    async fn prefixed_replays_through_small_reads() {
        let prefix = Bytes::from_static(b"GET / HTTP/1.1\r\n");
        let rest: &[u8] = b"Host: a\r\n\r\nbody";
        let mut stream = Prefixed::new(prefix, rest);
        let mut replayed = Vec::new();
        let mut chunk = [0u8; 3];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            replayed.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(&replayed[..], b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody");
    }

    #[tokio::test]
    async fn prefixed_gives_back_the_unread_prefix() {
        let inner: &[u8] = b"inner";
        let mut stream = Prefixed::new(Bytes::from_static(b"prefix"), inner);
        let mut chunk = [0u8; 2];
        stream.read_exact(&mut chunk).await.unwrap();
        assert_eq!(&chunk, b"pr");
        assert_eq!(*stream.get_ref(), b"inner");
        let (prefix, inner) = stream.into_parts();
        assert_eq!(&prefix[..], b"efix");
        assert_eq!(inner, b"inner");
    }

    #[tokio::test]
    async fn prefixed_forwards_writes() {
        let (inner, mut peer) = duplex(1024);
        let mut stream = Prefixed::new(Bytes::from_static(b"early "), inner);
        stream.write_all(b"response").await.unwrap();
        stream.flush().await.unwrap();
        // The peer only sees EOF if the shutdown reached the inner stream.
        stream.shutdown().await.unwrap();
        let mut received = Vec::new();
        peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(&received[..], b"response");

        peer.write_all(b"late").await.unwrap();
        drop(peer);
        let mut read = Vec::new();
        stream.read_to_end(&mut read).await.unwrap();
        assert_eq!(&read[..], b"early late");
    }

    /// A sink that takes vectored writes whole and counts them.
    #[derive(Default)]
    struct VectoredSink {
        vectored: bool,
        written: Vec<u8>,
        vectored_calls: usize,
    }

    impl AsyncWrite for VectoredSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.vectored_calls += 1;
            let before = this.written.len();
            for buf in bufs {
                this.written.extend_from_slice(buf);
            }
            Poll::Ready(Ok(this.written.len() - before))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
    }

    #[tokio::test]
    async fn prefixed_forwards_vectored_writes() {
        let sink = VectoredSink {
            vectored: true,
            ..VectoredSink::default()
        };
        let mut stream = Prefixed::new(Bytes::new(), sink);
        assert!(stream.is_write_vectored());
        let bufs = [IoSlice::new(b"head"), IoSlice::new(b"er")];
        let n = stream.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 6);
        assert_eq!(stream.get_ref().vectored_calls, 1);
        assert_eq!(&stream.get_ref().written[..], b"header");

        let plain = Prefixed::new(Bytes::new(), VectoredSink::default());
        assert!(!plain.is_write_vectored());
    }
}
