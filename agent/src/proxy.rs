//! The outbound L4 proxy: accepts redirected connections on a pod's listener, recovers where they
//! were going, connects there from inside the pod and copies bytes both ways.
use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{config::PodId, datapath::Datapath, netns::PodNetns, stats::Stats};

const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// What every connection handler needs, shared by all pods.
pub struct ProxyContext {
    pub datapath: Arc<Datapath>,
    pub stats: Arc<Stats>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    /// Tracks open connections so shutdown can drain them.
    pub connections: TaskTracker,
    /// Cancelled when the drain period is over: open connections are then reset.
    pub abort: CancellationToken,
}

pub struct PodProxy {
    pub id: PodId,
    pub netns: PodNetns,
}

/// Accepts on `listener` until `stop` is cancelled. Open connections are not affected by `stop`.
pub async fn run_outbound(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    ctx: Arc<ProxyContext>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let (pod, ctx) = (Arc::clone(&pod), Arc::clone(&ctx));
                ctx.connections
                    .clone()
                    .spawn(async move { proxy_connection(&ctx, &pod, client, peer).await });
            }
            Err(err) => {
                // Usually fd exhaustion: back off instead of spinning, keep serving.
                warn!(pod = %pod.id, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    debug!(pod = %pod.id, "outbound listener closed");
}

async fn proxy_connection(ctx: &ProxyContext, pod: &PodProxy, client: TcpStream, peer: SocketAddr) {
    let SocketAddr::V4(peer) = peer else {
        warn!(pod = %pod.id, %peer, "unexpected IPv6 client on the IPv4 outbound listener");
        return;
    };
    let Some(destination) = ctx.datapath.original_destination(pod.netns.cookie(), peer) else {
        ctx.stats.unknown_origin.fetch_add(1, Relaxed);
        warn!(pod = %pod.id, client = %peer, "connection was not redirected by weft (no original destination); resetting");
        let _ = client.set_zero_linger();
        return;
    };
    let flow = ctx.stats.flow(&pod.id, destination);
    flow.opened.fetch_add(1, Relaxed);
    let upstream = match connect_upstream(ctx, pod, destination).await {
        Ok(upstream) => upstream,
        Err(err) => {
            flow.failed.fetch_add(1, Relaxed);
            warn!(pod = %pod.id, %destination, error = %err, "upstream connect failed");
            // A reset tells the client the destination failed, as a direct connect would have.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let mut client = Metered {
        inner: client,
        bytes_read: &flow.bytes_sent,
    };
    let mut upstream = Metered {
        inner: upstream,
        bytes_read: &flow.bytes_received,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER_BYTES,
        COPY_BUFFER_BYTES,
    );
    let result = tokio::select! {
        result = copy => result,
        () = ctx.abort.cancelled() => Err(io::Error::other("the agent's drain period is over")),
    };
    flow.closed.fetch_add(1, Relaxed);
    match result {
        Ok((sent, received)) => {
            debug!(pod = %pod.id, %destination, sent, received, "connection closed")
        }
        Err(err) => {
            info!(pod = %pod.id, %destination, error = %err, "connection ended with an error");
            // Pass an abort on as an abort (RST) to both ends, not as a clean end of stream.
            let _ = client.inner.set_zero_linger();
            let _ = upstream.inner.set_zero_linger();
        }
    }
}

async fn connect_upstream(
    ctx: &ProxyContext,
    pod: &PodProxy,
    destination: SocketAddrV4,
) -> io::Result<TcpStream> {
    let socket = pod.netns.upstream_socket(ctx.socket_mark).await?;
    tokio::time::timeout(ctx.connect_timeout, socket.connect(destination.into()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Counts the bytes read through a stream into a shared counter as they flow.
struct Metered<'a, S> {
    inner: S,
    bytes_read: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.bytes_read
            .fetch_add((buf.filled().len() - before) as u64, Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
