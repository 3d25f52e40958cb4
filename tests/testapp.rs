//! The application the L7 lab tests run inside pods.
//!
//! Servers: `serve` (HTTP/1.1 and h2c on one port, injected delays and failures, request counters
//! on a separate stats port, optional chaining to a next hop, optional gRPC echo), `banner` (the
//! server speaks first) and `echo` (raw TCP). Clients: `load`, `grpc-call` and `raw`, each printing
//! one JSON line on stdout and exiting 0 whatever the outcome, so the test decides what is a failure;
//! only usage errors (exit 2) and start-up errors exit non-zero.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::{ready, Future},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::{http1, http2},
    header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST, UPGRADE},
    service::service_fn,
    HeaderMap, Method, Request, Response, StatusCode, Uri,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Request headers a chained server copies to its next hop: deadline and tracing propagation.
const FORWARDED_HEADERS: [&str; 4] = [
    "x-weft-deadline",
    "traceparent",
    "grpc-timeout",
    "x-request-id",
];
/// How many distinct response bodies `load` reports; beyond that they are noise, not a split.
const MAX_BODIES: usize = 64;
const BODY_PREFIX: usize = 64;

#[derive(Parser)]
#[command(
    name = "weft-testapp",
    about = "Test servers and clients for the weft L7 lab tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP/1.1 + h2c server answering every path with its name
    Serve(ServeArgs),
    /// TCP server that writes TEXT\r\n on accept, then echoes until EOF
    Banner {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        text: String,
    },
    /// TCP echo server
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// HTTP load client; prints a JSON summary
    Load(LoadArgs),
    /// One unary gRPC call (POST /test.Echo/Say) over h2c; prints JSON
    GrpcCall {
        /// http://host:port (the path is always /test.Echo/Say)
        #[arg(long, value_parser = Target::parse)]
        url: Target,
        #[arg(long)]
        message: String,
        /// Also sent as the grpc-timeout header
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Sends N seeded pseudo-random bytes, reads N back; prints JSON
    Raw {
        /// host:port
        #[arg(long)]
        addr: String,
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// Body of successful answers, and the "name" in stats
    #[arg(long)]
    name: String,
    /// Percentage of requests answered with --fail-status: exactly P in every 100, spread evenly
    /// and counted from start or reset (50 alternates: 1st ok, 2nd fails, 3rd ok, ...)
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
    fail_percent: u64,
    #[arg(long, default_value = "503")]
    fail_status: StatusCode,
    /// Delay before answering each request, after its body is read
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Serves GET /_stats and POST /_reset here, apart from the counted traffic
    #[arg(long)]
    stats_listen: Option<SocketAddr>,
    /// Answers each request that is not an injected failure with the status and body of a GET to
    /// this URL (HTTP/1.1, keep-alive), copying the deadline and tracing headers
    #[arg(long, value_parser = Target::parse, conflicts_with = "grpc")]
    next: Option<Target>,
    /// Answers gRPC requests (content-type application/grpc) by echoing their message
    #[arg(long)]
    grpc: bool,
}

#[derive(Args)]
struct LoadArgs {
    #[arg(long, value_parser = Target::parse)]
    url: Target,
    #[arg(long)]
    requests: u64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// One HTTP/2 prior-knowledge connection shared by all workers
    #[arg(long, conflicts_with = "new_connections")]
    h2c: bool,
    #[arg(long, default_value = "GET")]
    method: Method,
    /// Request body size (bytes of 'x')
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Extra request header, repeatable
    #[arg(long = "header", value_name = "K:V", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Total requests per second: request i starts at i/R seconds (open loop), if a worker is free
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Per-request bound on connect, send and reading the whole response
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// A fresh TCP connection per request, sent with `Connection: close`
    #[arg(long)]
    new_connections: bool,
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text.split_once(':').ok_or("expected K:V")?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| e.to_string())?;
    Ok((name, value))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a positive number of requests per second".into()),
    }
}

/// Where an `http://host[:port][/path]` URL points.
#[derive(Clone)]
struct Target {
    /// host:port to connect to
    addr: String,
    /// The whole URL: HTTP/2 requests carry it as :scheme, :authority and :path.
    absolute: Uri,
    /// Path and query: the HTTP/1.1 request target.
    origin: Uri,
    host: HeaderValue,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let absolute: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        if absolute.scheme_str() != Some("http") {
            return Err(format!("{url}: only http:// URLs are supported"));
        }
        let authority = absolute.authority().ok_or(format!("{url}: no host"))?;
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let origin = absolute
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(Self {
            addr,
            absolute,
            origin,
            host,
        })
    }

    fn request(&self, method: Method, h2: bool, body: Full<Bytes>) -> Request<Full<Bytes>> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        if h2 {
            *request.uri_mut() = self.absolute.clone();
        } else {
            *request.uri_mut() = self.origin.clone();
            request.headers_mut().insert(HOST, self.host.clone());
        }
        request
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Banner { listen, text } => tcp_server(listen, Some(text)).await,
        Command::Echo { listen } => tcp_server(listen, None).await,
        Command::Load(args) => load(args).await,
        Command::GrpcCall {
            url,
            message,
            timeout_ms,
        } => grpc_call(url, message, timeout_ms).await,
        Command::Raw {
            addr,
            bytes,
            seed,
            timeout_ms,
        } => raw(addr, bytes, seed, timeout_ms).await,
    }
}

// ---------------------------------------------------------------------------------------------
// serve

type Body = BoxBody<Bytes, Infallible>;

struct App {
    name: String,
    fail_percent: u64,
    fail_status: StatusCode,
    delay: Duration,
    next: Option<Http1Pool>,
    grpc: bool,
    counters: Mutex<Counters>,
}

#[derive(Default, Clone)]
struct Counters {
    requests: u64,
    /// Injected failures, plus any other non-2xx answer (a chain's 502 or its next hop's failure).
    failed: u64,
    /// Requests whose x-weft-deadline had passed when they arrived.
    late: u64,
    request_body_bytes: u64,
    by_method: BTreeMap<String, u64>,
}

impl App {
    fn stats(&self, counters: &Counters) -> Value {
        json!({
            "name": self.name,
            "requests": counters.requests,
            "failed": counters.failed,
            "late": counters.late,
            "request_body_bytes": counters.request_body_bytes,
            "by_method": counters.by_method,
        })
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A panic while holding the lock leaves plain counters, still fine to read.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let app = Arc::new(App {
        name: args.name,
        fail_percent: args.fail_percent,
        fail_status: args.fail_status,
        delay: Duration::from_millis(args.delay_ms),
        next: args.next.map(|target| Http1Pool::new(target, true)),
        grpc: args.grpc,
        counters: Mutex::default(),
    });
    // Bind both before serving so a bad address fails start-up rather than half of it.
    let listener = bind(args.listen).await?;
    if let Some(addr) = args.stats_listen {
        let stats = bind(addr).await?;
        let app = Arc::clone(&app);
        tokio::spawn(serve_http(stats, move |req| {
            stats_request(Arc::clone(&app), req)
        }));
    }
    serve_http(listener, move |req| request(Arc::clone(&app), req)).await;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Small request/response writes must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return stream;
            }
            // Out of descriptors and the like pass; keep serving rather than exit mid-test.
            Err(err) => {
                eprintln!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 prior knowledge (told apart by the connection preface) forever.
async fn serve_http<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let stream = accept(&listener).await;
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            // Connection errors (resets, garbage) concern only that client.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

async fn stats_request(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let counters = match (req.method(), req.uri().path()) {
        (&Method::GET, "/_stats") => app.counters().clone(),
        // Answers with the counters it cleared, so a test can read and reset in one step.
        (&Method::POST, "/_reset") => std::mem::take(&mut *app.counters()),
        _ => return text(StatusCode::NOT_FOUND, "GET /_stats or POST /_reset\n"),
    };
    let mut response = text(StatusCode::OK, app.stats(&counters).to_string());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn request(app: Arc<App>, mut req: Request<Incoming>) -> Response<Body> {
    let late = deadline_passed(req.headers());
    let grpc = app.grpc && is_grpc(req.headers());
    let sequence = {
        let mut counters = app.counters();
        counters.requests += 1;
        counters.late += u64::from(late);
        *counters
            .by_method
            .entry(req.method().to_string())
            .or_default() += 1;
        counters.requests - 1
    };
    // `Upgrade: echo` switches the connection to echoing bytes, as a WebSocket-like protocol.
    if req.headers().get(UPGRADE).is_some_and(|v| v == "echo") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut response = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        let headers = response.headers_mut();
        headers.remove(CONTENT_TYPE);
        headers.insert(UPGRADE, HeaderValue::from_static("echo"));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        return response;
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => return text(StatusCode::BAD_REQUEST, format!("reading body: {err}\n")),
    };
    app.counters().request_body_bytes += body.len() as u64;
    tokio::time::sleep(app.delay).await;

    let fail = injected_failure(sequence, app.fail_percent);
    let response = if grpc {
        grpc_reply(&app.name, &body, fail)
    } else if fail {
        text(app.fail_status, format!("{}: injected failure\n", app.name))
    } else if let Some(next) = &app.next {
        forward(&app.name, next, &parts.headers).await
    } else {
        text(StatusCode::OK, app.name.clone())
    };
    if fail || !response.status().is_success() {
        app.counters().failed += 1;
    }
    response
}

/// Whether the `n`th request (0-based) fails: exactly `percent` in every 100, spread evenly, so a
/// test can predict each outcome (50 alternates ok, fail, ok, ...; 100 fails all).
fn injected_failure(n: u64, percent: u64) -> bool {
    (n + 1) * percent / 100 > n * percent / 100
}

fn deadline_passed(headers: &HeaderMap) -> bool {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    headers
        .get("x-weft-deadline")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u128>().ok())
        .is_some_and(|deadline| now_ms > deadline)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The downstream status and body of a GET to `next`; 502 when it cannot be had.
async fn forward(name: &str, next: &Http1Pool, incoming: &HeaderMap) -> Response<Body> {
    let mut req = next.target.request(Method::GET, false, Full::default());
    for (header, value) in incoming {
        if FORWARDED_HEADERS.contains(&header.as_str()) {
            req.headers_mut().append(header, value.clone());
        }
    }
    match next.send(req).await {
        Ok(downstream) => {
            let (parts, body) = downstream.into_parts();
            let mut response = Response::new(Full::new(body).boxed());
            *response.status_mut() = parts.status;
            if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, content_type.clone());
            }
            response
        }
        Err(failure) => text(StatusCode::BAD_GATEWAY, format!("{name}: {failure}\n")),
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC framing: a 1-byte compressed flag, a 4-byte big-endian length, the message.

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// The first uncompressed message of a gRPC body.
fn grpc_unframe(body: &[u8]) -> Option<&[u8]> {
    let (&[0, a, b, c, d], rest) = body.split_first_chunk::<5>()? else {
        return None;
    };
    rest.get(..u32::from_be_bytes([a, b, c, d]) as usize)
}

fn grpc_reply(name: &str, request: &[u8], fail: bool) -> Response<Body> {
    let mut response = match grpc_unframe(request) {
        _ if fail => grpc_trailers_only("14", &format!("{name}: injected failure")),
        None => grpc_trailers_only("13", "malformed request message"),
        Some(message) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            Response::new(
                Full::new(grpc_frame(message))
                    .with_trailers(ready(Some(Ok(trailers))))
                    .boxed(),
            )
        }
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// An error answer carried in the headers alone, as gRPC servers send when there is no message.
fn grpc_trailers_only(status: &'static str, message: &str) -> Response<Body> {
    let mut response = Response::new(Full::default().boxed());
    let headers = response.headers_mut();
    headers.insert("grpc-status", HeaderValue::from_static(status));
    if let Ok(message) = HeaderValue::from_str(message) {
        headers.insert("grpc-message", message);
    }
    response
}

// ---------------------------------------------------------------------------------------------
// HTTP clients

/// Why a request got no response.
enum Failure {
    Timeout,
    Connect(anyhow::Error),
    Other(anyhow::Error),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect(_) => "connect",
            Failure::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Connect(err) => write!(f, "connect: {err:#}"),
            Failure::Other(err) => write!(f, "{err:#}"),
        }
    }
}

async fn connect(addr: &str) -> Result<TokioIo<TcpStream>, Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))
        .map_err(Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

async fn connect_h2(addr: &str) -> Result<http2::SendRequest<Full<Bytes>>, Failure> {
    let (sender, connection) = http2::handshake(TokioExecutor::new(), connect(addr).await?)
        .await
        .context("HTTP/2 handshake")
        .map_err(Failure::Connect)?;
    // Its errors surface on the requests sent through `sender`.
    tokio::spawn(connection);
    Ok(sender)
}

/// Reads the whole response, so an HTTP/1.1 connection is free for the next request.
async fn collect(response: Response<Incoming>) -> Result<Response<Bytes>, Failure> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the response body")
        .map_err(Failure::Other)?;
    Ok(Response::from_parts(parts, body.to_bytes()))
}

/// HTTP/1.1 connections to one target, reused when `keep_alive`.
struct Http1Pool {
    target: Target,
    keep_alive: bool,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
}

impl Http1Pool {
    fn new(target: Target, keep_alive: bool) -> Self {
        Self {
            target,
            keep_alive,
            idle: Mutex::default(),
        }
    }

    async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Response<Bytes>, Failure> {
        if !self.keep_alive {
            req.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        loop {
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => {
                    let (sender, connection) = http1::handshake(connect(&self.target.addr).await?)
                        .await
                        .context("HTTP/1.1 handshake")
                        .map_err(Failure::Connect)?;
                    tokio::spawn(connection);
                    sender
                }
            };
            // An idle connection the server closed meanwhile is dropped, not counted as an error.
            if reused && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let response = collect(response).await?;
                    if self.keep_alive {
                        self.idle
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(sender);
                    }
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // Never written on a reused connection that just closed: safe to send again.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(Failure::Other(err.into_error().into())),
                },
            }
        }
    }
}

/// One HTTP/2 connection shared by every request, made again if it closes.
struct H2Client {
    addr: String,
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

impl H2Client {
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, Failure> {
        let mut sender = {
            // Held across the connect so concurrent workers make one connection, not many.
            let mut shared = self.sender.lock().await;
            match shared.as_ref().filter(|s| !s.is_closed()) {
                Some(sender) => sender.clone(),
                None => shared.insert(connect_h2(&self.addr).await?).clone(),
            }
        };
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Other(e.into()))?;
        collect(response).await
    }
}

// ---------------------------------------------------------------------------------------------
// load

enum Client {
    Http1(Http1Pool),
    H2(H2Client),
}

impl Client {
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, Failure> {
        match self {
            Client::Http1(pool) => pool.send(req).await,
            Client::H2(h2) => h2.send(req).await,
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    status: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    first_errors: BTreeMap<&'static str, String>,
    /// Bodies of 2xx responses, cut to BODY_PREFIX bytes.
    bodies: HashMap<String, u64>,
    /// Of requests that got a response, from sending to the end of its body.
    latencies_us: Vec<u64>,
}

impl Tally {
    fn record(&mut self, outcome: Result<Response<Bytes>, Failure>, latency: Duration) {
        match outcome {
            Ok(response) => {
                self.latencies_us.push(latency.as_micros() as u64);
                *self
                    .status
                    .entry(response.status().as_u16().to_string())
                    .or_default() += 1;
                if response.status().is_success() {
                    self.ok += 1;
                    let body = response.body();
                    let body = String::from_utf8_lossy(&body[..body.len().min(BODY_PREFIX)]);
                    *self.bodies.entry(body.into_owned()).or_default() += 1;
                }
            }
            Err(failure) => {
                *self.errors.entry(failure.kind()).or_default() += 1;
                self.first_errors
                    .entry(failure.kind())
                    .or_insert_with(|| failure.to_string());
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (status, n) in other.status {
            *self.status.entry(status).or_default() += n;
        }
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        for (kind, message) in other.first_errors {
            self.first_errors.entry(kind).or_insert(message);
        }
        for (body, n) in other.bodies {
            *self.bodies.entry(body).or_default() += n;
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

/// Sends requests until all `args.requests` are taken; `next` hands out their indexes.
async fn worker(
    client: Arc<Client>,
    args: Arc<LoadArgs>,
    body: Bytes,
    next: Arc<AtomicU64>,
    start: Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.requests {
            return tally;
        }
        if let Some(rate) = args.rate {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
        }
        let mut req = (args.url).request(args.method.clone(), args.h2c, Full::new(body.clone()));
        for (name, value) in &args.headers {
            req.headers_mut().append(name, value.clone());
        }
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_millis(args.timeout_ms), client.send(req))
                .await
                .unwrap_or(Err(Failure::Timeout));
        tally.record(outcome, sent.elapsed());
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn load(args: LoadArgs) -> Result<()> {
    let client = Arc::new(if args.h2c {
        Client::H2(H2Client {
            addr: args.url.addr.clone(),
            sender: tokio::sync::Mutex::default(),
        })
    } else {
        Client::Http1(Http1Pool::new(args.url.clone(), !args.new_connections))
    });
    let args = Arc::new(args);
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();

    let workers: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            tokio::spawn(worker(
                Arc::clone(&client),
                Arc::clone(&args),
                body.clone(),
                Arc::clone(&next),
                start,
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for worker in workers {
        tally.merge(worker.await.context("load worker panicked")?);
    }
    let seconds = start.elapsed().as_secs_f64();

    for (kind, message) in &tally.first_errors {
        eprintln!("first {kind} error: {message}");
    }
    tally.latencies_us.sort_unstable();
    let latencies = &tally.latencies_us;
    let mut summary = json!({
        "requests": args.requests,
        "ok": tally.ok,
        "status": tally.status,
        "errors": {
            "timeout": tally.errors.get("timeout").copied().unwrap_or(0),
            "connect": tally.errors.get("connect").copied().unwrap_or(0),
            "other": tally.errors.get("other").copied().unwrap_or(0),
        },
        "latency_us": {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999),
            "max": latencies.last().copied().unwrap_or(0),
        },
        "seconds": seconds,
    });
    if tally.bodies.len() <= MAX_BODIES {
        summary["bodies"] = json!(tally.bodies);
    }
    println!("{summary}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// grpc-call

async fn grpc_call(url: Target, message: String, timeout_ms: u64) -> Result<()> {
    let mut req = Request::new(Full::new(grpc_frame(message.as_bytes())));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(url.host.as_bytes())
        .path_and_query("/test.Echo/Say")
        .build()
        .context("building the request URI")?;
    let headers = req.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", format!("{timeout_ms}m").try_into()?);

    let outcome = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let response = connect_h2(&url.addr)
            .await?
            .send_request(req)
            .await
            .map_err(|e| Failure::Other(e.into()))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .context("reading the response")
            .map_err(Failure::Other)?;
        Ok::<_, Failure>((parts, body))
    })
    .await
    .unwrap_or(Err(Failure::Timeout));

    let result = match outcome {
        Ok((parts, body)) => {
            let trailers = body.trailers().cloned().unwrap_or_default();
            let data = body.to_bytes();
            // Trailers-only answers carry the status in the headers.
            let field = |name: &str| {
                trailers
                    .get(name)
                    .or_else(|| parts.headers.get(name))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            json!({
                "http_status": parts.status.as_u16(),
                "grpc_status": field("grpc-status").and_then(|s| s.parse::<u32>().ok()),
                "grpc_message": field("grpc-message"),
                "message": grpc_unframe(&data).map(|m| String::from_utf8_lossy(m).into_owned()),
                "error": null,
            })
        }
        Err(failure) => json!({
            "http_status": null,
            "grpc_status": null,
            "grpc_message": null,
            "message": null,
            "error": failure.to_string(),
        }),
    };
    println!("{result}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// raw TCP

async fn tcp_server(listen: SocketAddr, banner: Option<String>) -> Result<()> {
    let listener = bind(listen).await?;
    loop {
        let mut stream = accept(&listener).await;
        let banner = banner.clone();
        tokio::spawn(async move {
            let echo = async {
                if let Some(text) = banner {
                    stream.write_all(format!("{text}\r\n").as_bytes()).await?;
                }
                let (mut reader, mut writer) = stream.split();
                tokio::io::copy(&mut reader, &mut writer).await?;
                writer.shutdown().await
            };
            // A reset only ends this connection.
            let _ = echo.await;
        });
    }
}

async fn raw(addr: String, bytes: usize, seed: u64, timeout_ms: u64) -> Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let data: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(bytes).collect();
    let mut sent = 0;
    let mut received = Vec::with_capacity(bytes);
    let outcome = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let mut stream = connect(&addr).await?.into_inner();
        let (mut reader, mut writer) = stream.split();
        // Written and read at once: an echo of a large payload would otherwise fill both buffers.
        let write = async {
            for chunk in data.chunks(64 * 1024) {
                writer.write_all(chunk).await?;
                sent += chunk.len();
            }
            // The half-close tells an echo server the payload is complete.
            writer.shutdown().await
        };
        let read = async {
            let mut buf = vec![0; 64 * 1024];
            while received.len() < bytes {
                let want = (bytes - received.len()).min(buf.len());
                match reader.read(&mut buf[..want]).await? {
                    0 => break,
                    n => received.extend_from_slice(&buf[..n]),
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let (written, read) = tokio::join!(write, read);
        written.context("writing").map_err(Failure::Other)?;
        read.context("reading").map_err(Failure::Other)
    })
    .await
    .unwrap_or(Err(Failure::Timeout));
    println!(
        "{}",
        json!({
            "sent": sent,
            "received": received.len(),
            "equal": received == data,
            "error": outcome.err().map(|f| f.to_string()),
        })
    );
    Ok(())
}
