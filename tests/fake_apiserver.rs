//! A fake Kubernetes API server for tests: the list/watch protocol of the real one, over plain
//! HTTP/1.1, for the resources the agent watches, with the real server's failure modes on demand.
//!
//! What it serves, as the real server does: lists with label and field selectors, `limit` +
//! `continue` pages that stay consistent at the first page's resourceVersion (410 Expired once that
//! version is compacted), GETs of single objects, and watches (newline-delimited JSON events in a
//! chunked response) that resume from a resourceVersion by replaying the remembered history, send
//! `ERROR` 410 "too old resource version" when the history no longer reaches back that far, turn
//! selector transitions into ADDED/DELETED, send BOOKMARKs, and honour `timeoutSeconds` and
//! `sendInitialEvents` (streaming lists). Malformed queries get 400/422 `Status` answers.
//!
//! The server runs on its own tokio runtime in a background thread, so synchronous tests can use
//! it; the tests drive it through [`FakeApiServer`]: `apply`/`delete` objects, `compact` the
//! history, `drop_watches`, `pause`/`resume` (an API server restart) and read the request log.
//! Objects are `serde_json::Value`s shaped as the API serves them; [`pod`], [`service`],
//! [`endpoint_slice`] and [`namespace`] build real-shaped ones.
use std::{
    borrow::Cow,
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc as std_mpsc, Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll},
    thread,
    time::Duration,
};

use hyper::{
    body::{Bytes, Frame, Incoming, SizeHint},
    header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
    time::{sleep_until, Instant},
};

/// Events remembered per resource type for resuming watches (the real watch cache's window).
const HISTORY_LIMIT: usize = 1000;
/// Changes in flight to every open watch; a watch that falls this far behind is closed, as the
/// real server closes watchers that cannot keep up.
const CHANGE_BUFFER: usize = 4096;
/// Events buffered per watch connection ahead of the client.
const WATCH_BUFFER: usize = 128;

/// The resource types served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    HttpRoutes,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 6] = [
        ResourceKind::Namespaces,
        ResourceKind::Pods,
        ResourceKind::Services,
        ResourceKind::EndpointSlices,
        ResourceKind::AuthorizationPolicies,
        ResourceKind::HttpRoutes,
    ];

    /// (API path prefix, apiVersion, kind, plural, namespaced)
    fn info(self) -> (&'static str, &'static str, &'static str, &'static str, bool) {
        match self {
            Self::Namespaces => ("/api/v1", "v1", "Namespace", "namespaces", false),
            Self::Pods => ("/api/v1", "v1", "Pod", "pods", true),
            Self::Services => ("/api/v1", "v1", "Service", "services", true),
            Self::EndpointSlices => (
                "/apis/discovery.k8s.io/v1",
                "discovery.k8s.io/v1",
                "EndpointSlice",
                "endpointslices",
                true,
            ),
            Self::AuthorizationPolicies => (
                "/apis/weft.dev/v1alpha1",
                "weft.dev/v1alpha1",
                "AuthorizationPolicy",
                "authorizationpolicies",
                true,
            ),
            Self::HttpRoutes => (
                "/apis/weft.dev/v1alpha1",
                "weft.dev/v1alpha1",
                "HTTPRoute",
                "httproutes",
                true,
            ),
        }
    }

    pub fn api_version(self) -> &'static str {
        self.info().1
    }

    pub fn kind(self) -> &'static str {
        self.info().2
    }

    pub fn namespaced(self) -> bool {
        self.info().4
    }

    /// The collection path across all namespaces, e.g. `/api/v1/pods`.
    pub fn path(self) -> String {
        let (prefix, _, _, plural, _) = self.info();
        format!("{prefix}/{plural}")
    }

    /// The collection path in one namespace, e.g. `/api/v1/namespaces/lab/pods`.
    pub fn namespaced_path(self, namespace: &str) -> String {
        let (prefix, _, _, plural, _) = self.info();
        format!("{prefix}/namespaces/{namespace}/{plural}")
    }

    /// The type of an object by its `apiVersion` and `kind`.
    pub fn of(object: &Value) -> Option<Self> {
        let api_version = object["apiVersion"].as_str()?;
        let kind = object["kind"].as_str()?;
        Self::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a request asked for, for the request log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    List,
    Watch,
    Get,
    /// Anything else: an unknown path or a method other than GET.
    Other,
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub verb: Verb,
    pub path: String,
    /// The decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

impl RequestRecord {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A running fake API server. Dropping it stops the server and closes every connection.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    control: Option<mpsc::UnboundedSender<Control>>,
    thread: Option<thread::JoinHandle<()>>,
    paused: AtomicBool,
    /// The listener's network namespace, to re-bind in it on `resume` (None: the current one).
    netns: Option<OwnedFd>,
}

impl FakeApiServer {
    /// Serves on `listener`, which may have been bound inside another network namespace.
    pub fn start(listener: std::net::TcpListener) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        // Connections the server closes first linger in TIME_WAIT; they inherit SO_REUSEADDR from
        // the listener, and only then can `resume` bind the address again at once.
        set_reuse_addr(&listener)?;
        let netns = socket_netns(&listener);
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared::new());
        let (control, control_rx) = mpsc::unbounded_channel();
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("fake-apiserver".into())
                .spawn(move || runtime.block_on(run(shared, listener, control_rx)))?
        };
        Ok(Self {
            addr,
            shared,
            control: Some(control),
            thread: Some(thread),
            paused: AtomicBool::new(false),
            netns,
        })
    }

    /// Serves on a tokio listener (from any runtime: it moves to the server's own).
    pub fn start_tokio(listener: TcpListener) -> io::Result<Self> {
        Self::start(listener.into_std()?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server without authentication, for kube's `Kubeconfig::from_yaml`
    /// or a file named by `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
users:
- name: fake
  user: {{}}
",
            self.url()
        )
    }

    /// Creates or replaces the object with the same type, namespace and name; returns its new
    /// resourceVersion. The type comes from `apiVersion` and `kind`; a namespaced object without
    /// a namespace goes to "default". A missing `metadata.uid` and `creationTimestamp` are filled
    /// in (kept from the object replaced). Replacing an object with an identical one changes
    /// nothing, as an update without changes does on the real server.
    ///
    /// Panics on an object of a type the server does not serve or without a name: a test's bug.
    pub fn apply(&self, object: Value) -> String {
        let Some(resource) = ResourceKind::of(&object) else {
            panic!(
                "fake API server: no resource for apiVersion {} kind {}",
                object["apiVersion"], object["kind"]
            );
        };
        let mut object = object;
        let Some(meta) = object["metadata"].as_object_mut() else {
            panic!("fake API server: object without metadata: {object}");
        };
        let Some(name) = meta.get("name").and_then(Value::as_str).map(str::to_owned) else {
            panic!("fake API server: object without metadata.name: {object}");
        };
        let namespace = if resource.namespaced() {
            let namespace = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(namespace));
            namespace
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (namespace, name);
        let mut store = self.shared.lock();
        let next_rv = store.rv + 1;
        let table = &mut store.tables[resource.index()];
        let old = table.objects.get(&key).cloned();
        let kept = |field: &str| old.as_ref().map(|old| old["metadata"][field].clone());
        let meta = &mut object["metadata"];
        if meta["uid"].is_null() {
            meta["uid"] = kept("uid").unwrap_or_else(|| json!(uuid()));
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = kept("creationTimestamp").unwrap_or_else(|| json!(now()));
        }
        if let Some(old) = &old {
            meta["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            if *old == object {
                return rv_string(&object);
            }
        }
        object["metadata"]["resourceVersion"] = json!(next_rv.to_string());
        let change = Change {
            resource,
            rv: next_rv,
            kind: if old.is_some() {
                ChangeKind::Modified
            } else {
                ChangeKind::Added
            },
            old,
            new: object.clone(),
        };
        table.objects.insert(key, object);
        store.record(change);
        next_rv.to_string()
    }

    /// Deletes an object; returns the resourceVersion of the deletion, or None if it did not
    /// exist. `namespace` is ignored for cluster-scoped types.
    pub fn delete(&self, resource: ResourceKind, namespace: &str, name: &str) -> Option<String> {
        let key = object_key(resource, namespace, name);
        let mut store = self.shared.lock();
        let rv = store.rv + 1;
        let old = store.tables[resource.index()].objects.remove(&key)?;
        let mut new = old.clone();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.record(Change {
            resource,
            rv,
            kind: ChangeKind::Deleted,
            old: Some(old),
            new,
        });
        Some(rv.to_string())
    }

    pub fn get(&self, resource: ResourceKind, namespace: &str, name: &str) -> Option<Value> {
        let key = object_key(resource, namespace, name);
        self.shared.lock().tables[resource.index()]
            .objects
            .get(&key)
            .cloned()
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.lock().rv.to_string()
    }

    /// Forgets every type's history, as an etcd compaction does: a watch or a `continue` from any
    /// resourceVersion seen so far gets 410 Gone. The resourceVersion moves on by one (as writes
    /// elsewhere in a cluster move it), so a fresh list gives one that can be watched from.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.rv += 1;
        let rv = store.rv;
        for table in &mut store.tables {
            table.history.clear();
            table.history_start = rv;
        }
    }

    /// Closes every connection with a watch open, abruptly: the client sees the connection end
    /// in the middle of the chunked response.
    pub fn drop_watches(&self) {
        self.shared
            .drop_watches
            .send_modify(|generation| *generation += 1);
    }

    /// Stops the server as a restart does: closes the listener (connecting is refused) and every
    /// connection. Objects and history stay; `compact` too for a restart that loses the history.
    pub fn pause(&self) {
        if self.paused.swap(true, Ordering::SeqCst) {
            return;
        }
        let (done, wait) = std_mpsc::sync_channel(1);
        if self.send(Control::Pause(done)) {
            let _ = wait.recv();
        }
    }

    /// Listens again on the same address (in the same network namespace) after `pause`.
    pub fn resume(&self) -> io::Result<()> {
        if !self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let listener = bind_in(self.addr, self.netns.as_ref())?;
        listener.set_nonblocking(true)?;
        let (done, wait) = std_mpsc::sync_channel(1);
        if !self.send(Control::Resume(listener, done)) {
            return Err(io::Error::other("the fake API server has stopped"));
        }
        let result = wait
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the fake API server has stopped")));
        if result.is_ok() {
            self.paused.store(false, Ordering::SeqCst);
        }
        result
    }

    /// How often open watches that asked for bookmarks get one (1 s unless set).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared
            .bookmark_interval_ms
            .store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests of `verb` were made to exactly `path`.
    pub fn count(&self, verb: Verb, path: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.verb == verb && r.path == path)
            .count()
    }

    fn send(&self, control: Control) -> bool {
        self.control
            .as_ref()
            .is_some_and(|sender| sender.send(control).is_ok())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // The control loop ends when its sender goes; the runtime then drops every connection.
        self.control = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Control {
    Pause(std_mpsc::SyncSender<()>),
    Resume(std::net::TcpListener, std_mpsc::SyncSender<io::Result<()>>),
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped by `drop_watches`.
    drop_watches: watch::Sender<u64>,
    bookmark_interval_ms: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            store: Mutex::new(Store {
                rv: 0,
                tables: ResourceKind::ALL.map(|_| Table::default()),
                changes: broadcast::channel(CHANGE_BUFFER).0,
            }),
            drop_watches: watch::channel(0).0,
            bookmark_interval_ms: AtomicU64::new(1000),
            requests: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed))
    }
}

/// A poisoned lock only means a test thread panicked while holding it; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Key = (String, String);

fn object_key(resource: ResourceKind, namespace: &str, name: &str) -> Key {
    let namespace = if resource.namespaced() { namespace } else { "" };
    (namespace.to_owned(), name.to_owned())
}

fn key_of(object: &Value) -> Key {
    let meta = &object["metadata"];
    let field = |name: &str| meta[name].as_str().unwrap_or_default().to_owned();
    (field("namespace"), field("name"))
}

fn rv_string(object: &Value) -> String {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

struct Store {
    /// The global resourceVersion: the latest change's.
    rv: u64,
    tables: [Table; 6],
    /// Every change of every type, in resourceVersion order, to the open watches.
    changes: broadcast::Sender<Arc<Change>>,
}

impl Store {
    fn record(&mut self, change: Change) {
        self.rv = change.rv;
        let change = Arc::new(change);
        let table = &mut self.tables[change.resource.index()];
        table.history.push_back(change.clone());
        if table.history.len() > HISTORY_LIMIT {
            if let Some(evicted) = table.history.pop_front() {
                table.history_start = evicted.rv;
            }
        }
        // Sent under the store's lock, so a watch that subscribes under it sees each change
        // exactly once: in the history it replays or on the channel.
        let _ = self.changes.send(change);
    }
}

#[derive(Default)]
struct Table {
    /// Ordered by (namespace, name), as etcd orders the keys a list pages through.
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this resourceVersion is in `history`.
    history_start: u64,
}

impl Table {
    /// The objects as they were at `rv`, rolled back through the history; None if compacted.
    fn objects_at(&self, rv: u64) -> Option<Cow<'_, BTreeMap<Key, Value>>> {
        if rv < self.history_start {
            return None;
        }
        let mut newer = self
            .history
            .iter()
            .rev()
            .take_while(|c| c.rv > rv)
            .peekable();
        if newer.peek().is_none() {
            return Some(Cow::Borrowed(&self.objects));
        }
        let mut objects = self.objects.clone();
        for change in newer {
            let key = key_of(&change.new);
            match &change.old {
                Some(old) => objects.insert(key, old.clone()),
                None => objects.remove(&key),
            };
        }
        Some(Cow::Owned(objects))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

struct Change {
    resource: ResourceKind,
    rv: u64,
    kind: ChangeKind,
    /// The object before the change (None for an addition).
    old: Option<Value>,
    /// The object after the change; for a deletion, the last state stamped with the deletion's
    /// resourceVersion.
    new: Value,
}

async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    // Bumped to close every connection on `pause`; dropped (closing them too) when the server stops.
    let (restart, _) = watch::channel(0u64);
    let spawn_accept = |listener| -> JoinHandle<()> {
        tokio::spawn(accept(listener, shared.clone(), restart.subscribe()))
    };
    let mut accepting = Some(spawn_accept(listener));
    while let Some(command) = control.recv().await {
        match command {
            Control::Pause(done) => {
                if let Some(task) = accepting.take() {
                    task.abort();
                    // The listener is closed once the aborted task is gone.
                    let _ = task.await;
                }
                restart.send_modify(|generation| *generation += 1);
                let _ = done.send(());
            }
            Control::Resume(listener, done) => {
                let result = TcpListener::from_std(listener)
                    .map(|listener| accepting = Some(spawn_accept(listener)));
                let _ = done.send(result);
            }
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, restart: watch::Receiver<u64>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Events go out as soon as they happen, not when a segment fills.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, shared.clone(), restart.clone()));
            }
            // Out of descriptors and the like: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    mut restart: watch::Receiver<u64>,
) {
    let open_watches = Arc::new(AtomicUsize::new(0));
    let mut dropped = shared.drop_watches.subscribe();
    let service = {
        let open_watches = open_watches.clone();
        service_fn(move |request| {
            let response = handle(&shared, &open_watches, &request);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    // Dropping the connection closes the socket, mid-response if need be.
    tokio::select! {
        _ = connection => {}
        _ = restart.changed() => {}
        _ = watch_dropped(&mut dropped, &open_watches) => {}
    }
}

/// Resolves when `drop_watches` is called while the connection has a watch open.
async fn watch_dropped(dropped: &mut watch::Receiver<u64>, open_watches: &AtomicUsize) {
    loop {
        if dropped.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if open_watches.load(Ordering::SeqCst) > 0 {
            return;
        }
    }
}

/// Counts a connection's open watch for as long as its response body lives.
struct OpenWatch(Arc<AtomicUsize>);

impl OpenWatch {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum ResponseBody {
    Full(Option<Bytes>),
    /// A watch: lines as the watch's task produces them, sent chunked.
    Watch {
        events: mpsc::Receiver<Bytes>,
        _open: OpenWatch,
    },
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Watch { events, .. } => events
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Watch { .. } => SizeHint::default(),
        }
    }
}

fn response(status: StatusCode, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    response(
        status,
        ResponseBody::Full(Some(Bytes::from(value.to_string()))),
    )
}

/// A failure, answered as the API server does: a `Status` object with the HTTP status as `code`.
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: Value::Null,
        }
    }

    fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(message: String) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }

    fn expired(message: String) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    fn too_old(rv: u64, history_start: u64) -> Self {
        Self::expired(format!("too old resource version: {rv} ({history_start})"))
    }

    /// A resourceVersion from the future, e.g. of another server: the real one waits 3 s for it
    /// to turn up, then answers this.
    fn too_large(rv: u64, current: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Too large resource version: {rv}, current: {current}"),
        )
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }

    fn response(&self) -> Response<ResponseBody> {
        json_response(self.code, &self.status())
    }
}

/// What a path names: a collection (all namespaces or one) or one object.
struct Route {
    resource: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        ResourceKind::ALL.into_iter().find_map(|resource| {
            let (prefix, _, _, plural, namespaced) = resource.info();
            let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
            let segments: Vec<&str> = rest.split('/').collect();
            if segments.iter().any(|s| s.is_empty()) {
                return None;
            }
            let route = |namespace: Option<&str>, name: Option<&str>| Route {
                resource,
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
            };
            match segments[..] {
                [p] if p == plural => Some(route(None, None)),
                [p, name] if p == plural && !namespaced => Some(route(None, Some(name))),
                ["namespaces", ns, p] if p == plural && namespaced => Some(route(Some(ns), None)),
                ["namespaces", ns, p, name] if p == plural && namespaced => {
                    Some(route(Some(ns), Some(name)))
                }
                _ => None,
            }
        })
    }
}

/// A boolean query parameter as the API server reads one: anything but "0", "false" and "f".
fn query_bool(value: &str) -> bool {
    !(value == "0" || value.eq_ignore_ascii_case("false") || value.eq_ignore_ascii_case("f"))
}

fn handle(
    shared: &Arc<Shared>,
    open_watches: &Arc<AtomicUsize>,
    request: &Request<Incoming>,
) -> Response<ResponseBody> {
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let route = Route::parse(&path);
    let verb = match &route {
        Some(route) if request.method() == Method::GET => {
            if route.name.is_some() {
                Verb::Get
            } else if query.iter().any(|(k, v)| k == "watch" && query_bool(v)) {
                Verb::Watch
            } else {
                Verb::List
            }
        }
        _ => Verb::Other,
    };
    lock(&shared.requests).push(RequestRecord {
        verb,
        path,
        query: query.clone(),
    });
    let result = match route {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        )),
        Some(_) if request.method() != Method::GET => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
        )),
        Some(route) => Params::parse(route.resource, &query).and_then(|params| match verb {
            Verb::Get => get(shared, &route),
            Verb::Watch => watch(shared, open_watches, &route, params),
            _ => list(shared, &route, params),
        }),
    };
    result.unwrap_or_else(|error| error.response())
}

#[derive(Default)]
struct Params {
    /// None: unset or "0", the latest.
    resource_version: Option<u64>,
    exact: bool,
    not_older_than: bool,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
    limit: Option<usize>,
    continue_token: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    send_initial_events: bool,
}

impl Params {
    fn parse(resource: ResourceKind, query: &[(String, String)]) -> Result<Self, ApiError> {
        let mut params = Params::default();
        let integer = |key: &str, value: &str| {
            value.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("invalid value {value:?} for {key}: not an integer"))
            })
        };
        for (key, value) in query {
            match key.as_str() {
                "resourceVersion" if value.is_empty() || value == "0" => {}
                "resourceVersion" => {
                    params.resource_version = Some(value.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid resource version: {value:?}"))
                    })?)
                }
                "resourceVersionMatch" => match value.as_str() {
                    "" => {}
                    "Exact" => params.exact = true,
                    "NotOlderThan" => params.not_older_than = true,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "resourceVersionMatch: Unsupported value: {value:?}: supported values: \"Exact\", \"NotOlderThan\""
                        )))
                    }
                },
                "labelSelector" => params.labels = parse_label_selector(value)?,
                "fieldSelector" => params.fields = parse_field_selector(resource, value)?,
                "limit" => {
                    params.limit = usize::try_from(integer(key, value)?).ok().filter(|&l| l > 0)
                }
                "continue" if !value.is_empty() => params.continue_token = Some(value.clone()),
                "allowWatchBookmarks" => params.bookmarks = query_bool(value),
                "timeoutSeconds" => {
                    params.timeout = u64::try_from(integer(key, value)?)
                        .ok()
                        .filter(|&t| t > 0)
                        .map(Duration::from_secs)
                }
                "sendInitialEvents" => params.send_initial_events = query_bool(value),
                // watch is the verb; pretty, timeout and the like change nothing here.
                _ => {}
            }
        }
        if params.exact && params.resource_version.is_none() {
            return Err(ApiError::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"".into(),
            ));
        }
        Ok(params)
    }

    fn filter(&self, route: &Route) -> Filter {
        Filter {
            namespace: route.namespace.clone(),
            labels: self.labels.clone(),
            fields: self.fields.clone(),
        }
    }
}

fn get(shared: &Shared, route: &Route) -> Result<Response<ResponseBody>, ApiError> {
    let name = route.name.as_deref().unwrap_or_default();
    let key = object_key(
        route.resource,
        route.namespace.as_deref().unwrap_or_default(),
        name,
    );
    let store = shared.lock();
    match store.tables[route.resource.index()].objects.get(&key) {
        Some(object) => Ok(json_response(StatusCode::OK, object)),
        None => {
            let plural = route.resource.info().3;
            let mut error = ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{plural} {name:?} not found"),
            );
            error.details = json!({"name": name, "kind": plural});
            Err(error)
        }
    }
}

fn continue_token(rv: u64, (namespace, name): &Key) -> String {
    format!("{rv}:{namespace}/{name}")
}

fn parse_continue_token(token: &str) -> Option<(u64, Key)> {
    let (rv, key) = token.split_once(':')?;
    let (namespace, name) = key.split_once('/')?;
    Some((rv.parse().ok()?, (namespace.to_owned(), name.to_owned())))
}

fn list(
    shared: &Shared,
    route: &Route,
    params: Params,
) -> Result<Response<ResponseBody>, ApiError> {
    let store = shared.lock();
    let table = &store.tables[route.resource.index()];
    let (rv, after) = match &params.continue_token {
        Some(token) => {
            let (rv, after) = parse_continue_token(token).ok_or_else(|| {
                ApiError::bad_request(format!("continue key is not valid: {token:?}"))
            })?;
            (rv, Some(after))
        }
        None => match params.resource_version {
            Some(rv) if params.exact => (rv, None),
            _ => (store.rv, None),
        },
    };
    if rv > store.rv {
        return Err(ApiError::too_large(rv, store.rv));
    }
    let objects = table.objects_at(rv).ok_or_else(|| match after {
        Some(_) => ApiError::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter."
                .into(),
        ),
        None => ApiError::too_old(rv, table.history_start),
    })?;
    let filter = params.filter(route);
    let matching: Vec<(&Key, &Value)> = match &after {
        Some(after) => objects
            .range::<Key, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .filter(|(_, object)| filter.matches(object))
            .collect(),
        None => objects
            .iter()
            .filter(|(_, object)| filter.matches(object))
            .collect(),
    };
    let page_len = params.limit.unwrap_or(usize::MAX).min(matching.len());
    let (page, rest) = matching.split_at(page_len);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some((last, _)) = page.last().filter(|_| !rest.is_empty()) {
        metadata["continue"] = json!(continue_token(rv, last));
        // The real server counts the rest only when it need not filter them.
        if filter.labels.is_empty() && filter.fields.is_empty() {
            metadata["remainingItemCount"] = json!(rest.len());
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": route.resource.api_version(),
            "kind": format!("{}List", route.resource.kind()),
            "metadata": metadata,
            "items": page.iter().map(|(_, object)| *object).collect::<Vec<_>>(),
        }),
    ))
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    Bytes::from(format!(
        "{}\n",
        json!({"type": event_type, "object": object})
    ))
}

/// A BOOKMARK: an object of the watched kind with only its resourceVersion; with the annotation
/// that ends a streaming list's initial events if `initial_events_end`.
fn bookmark_line(resource: ResourceKind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": resource.kind(), "apiVersion": resource.api_version(), "metadata": metadata}),
    )
}

fn watch(
    shared: &Arc<Shared>,
    open_watches: &Arc<AtomicUsize>,
    route: &Route,
    params: Params,
) -> Result<Response<ResponseBody>, ApiError> {
    if params.send_initial_events && !(params.bookmarks && params.not_older_than) {
        return Err(ApiError::invalid(
            "sendInitialEvents: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true and resourceVersionMatch to NotOlderThan".into(),
        ));
    }
    // Counted from the start, so `drop_watches` cannot miss a watch being opened.
    let open = OpenWatch::new(open_watches);
    let filter = params.filter(route);
    let resource = route.resource;
    let store = shared.lock();
    let table = &store.tables[resource.index()];
    let mut initial = Vec::new();
    let from = params
        .resource_version
        .filter(|_| !params.send_initial_events);
    match from {
        Some(rv) if rv > store.rv => return Err(ApiError::too_large(rv, store.rv)),
        Some(rv) if rv < table.history_start => {
            // The watch cache's answer: 200, one ERROR event, and the end of the stream.
            let status = ApiError::too_old(rv, table.history_start).status();
            return Ok(response(
                StatusCode::OK,
                ResponseBody::Full(Some(event_line("ERROR", &status))),
            ));
        }
        Some(rv) => initial.extend(
            table
                .history
                .iter()
                .filter(|change| change.rv > rv)
                .filter_map(|change| filter.event(change))
                .map(|(event_type, object)| event_line(event_type, &object)),
        ),
        // The latest state as synthetic ADDED events, as for a watch without resourceVersion.
        None => {
            initial.extend(
                table
                    .objects
                    .values()
                    .filter(|object| filter.matches(object))
                    .map(|object| event_line("ADDED", object)),
            );
            if params.send_initial_events {
                initial.push(bookmark_line(resource, store.rv, true));
            }
        }
    }
    let task = WatchTask {
        resource,
        filter,
        bookmarks: params.bookmarks,
        timeout: params.timeout,
        progress: store.rv,
        changes: store.changes.subscribe(),
    };
    drop(store);
    let (events, lines) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(task.run(shared.clone(), initial, events));
    Ok(response(
        StatusCode::OK,
        ResponseBody::Watch {
            events: lines,
            _open: open,
        },
    ))
}

struct WatchTask {
    resource: ResourceKind,
    filter: Filter,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// The resourceVersion up to which every change has been seen: what a bookmark carries.
    progress: u64,
    changes: broadcast::Receiver<Arc<Change>>,
}

impl WatchTask {
    async fn run(mut self, shared: Arc<Shared>, initial: Vec<Bytes>, events: mpsc::Sender<Bytes>) {
        for line in initial {
            if events.send(line).await.is_err() {
                return;
            }
        }
        let deadline = Instant::now() + self.timeout.unwrap_or(Duration::from_secs(86400 * 365));
        let mut next_bookmark = Instant::now() + shared.bookmark_interval();
        loop {
            let line = tokio::select! {
                change = self.changes.recv() => match change {
                    Ok(change) => {
                        self.progress = change.rv;
                        let event = (change.resource == self.resource)
                            .then(|| self.filter.event(&change))
                            .flatten();
                        match event {
                            Some((event_type, object)) => event_line(event_type, &object),
                            None => continue,
                        }
                    }
                    // Fallen behind: the watch ends and the client resumes it.
                    Err(_) => return,
                },
                _ = sleep_until(next_bookmark), if self.bookmarks => {
                    next_bookmark = Instant::now() + shared.bookmark_interval();
                    bookmark_line(self.resource, self.progress, false)
                }
                _ = sleep_until(deadline) => return,
                _ = events.closed() => return,
            };
            if events.send(line).await.is_err() {
                return;
            }
        }
    }
}

/// Which objects a request sees: its namespace and selectors.
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
            && self.labels.iter().all(|r| r.matches(&meta["labels"]))
            && self.fields.iter().all(|r| r.matches(object))
    }

    /// The event a watch with this filter sees for a change: an object that starts matching is
    /// ADDED, one that stops matching is DELETED (its previous state at the change's
    /// resourceVersion), as the real server's watch cache does.
    fn event<'a>(&self, change: &'a Change) -> Option<(&'static str, Cow<'a, Value>)> {
        let now = self.matches(&change.new);
        let new = Cow::Borrowed(&change.new);
        match change.kind {
            ChangeKind::Added => now.then_some(("ADDED", new)),
            ChangeKind::Deleted => now.then_some(("DELETED", new)),
            ChangeKind::Modified => {
                let before = change.old.as_ref().is_some_and(|old| self.matches(old));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", new)),
                    (false, true) => Some(("ADDED", new)),
                    (true, false) => {
                        let mut old = change.old.clone()?;
                        old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                        Some(("DELETED", Cow::Owned(old)))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: &Value) -> bool {
        let value = |key: &str| labels[key].as_str();
        match self {
            Self::Equals(k, v) => value(k) == Some(v),
            Self::NotEquals(k, v) => value(k) != Some(v),
            Self::Exists(k) => value(k).is_some(),
            Self::NotExists(k) => value(k).is_none(),
            Self::In(k, vs) => value(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Self::NotIn(k, vs) => value(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        }
    }
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    // Commas separate requirements except inside a set's parentheses.
    let mut terms = vec![String::new()];
    let mut depth = 0usize;
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        match terms.last_mut() {
            Some(term) if c != ',' || depth > 0 => term.push(c),
            _ => terms.push(String::new()),
        }
    }
    terms
        .iter()
        .map(|term| {
            parse_label_requirement(term.trim()).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {term:?} in label selector {selector:?}"
                ))
            })
        })
        .collect()
}

fn parse_label_requirement(term: &str) -> Option<LabelRequirement> {
    let pair = |key: &str, value: &str| {
        let (key, value) = (key.trim(), value.trim());
        (valid_label_key(key) && valid_label_value(value)).then(|| (key.into(), value.into()))
    };
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return valid_label_key(key).then(|| LabelRequirement::NotExists(key.into()));
    }
    if let Some((head, set)) = term.split_once('(') {
        let set = set.strip_suffix(')')?;
        let values = set
            .split(',')
            .map(|v| {
                Some(v.trim())
                    .filter(|v| valid_label_value(v))
                    .map(String::from)
            })
            .collect::<Option<Vec<_>>>()?;
        let mut words = head.split_whitespace();
        let (key, operator) = (words.next()?, words.next()?);
        if words.next().is_some() || !valid_label_key(key) {
            return None;
        }
        return match operator {
            "in" => Some(LabelRequirement::In(key.into(), values)),
            "notin" => Some(LabelRequirement::NotIn(key.into(), values)),
            _ => None,
        };
    }
    if let Some((key, value)) = term.split_once("!=") {
        let (key, value) = pair(key, value)?;
        return Some(LabelRequirement::NotEquals(key, value));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        let (key, value) = pair(key, value)?;
        return Some(LabelRequirement::Equals(key, value));
    }
    valid_label_key(term).then(|| LabelRequirement::Exists(term.into()))
}

#[derive(Clone, Debug, PartialEq)]
struct FieldRequirement {
    /// The field's JSON path, e.g. ["spec", "nodeName"].
    path: Vec<String>,
    value: String,
    equals: bool,
}

impl FieldRequirement {
    fn matches(&self, object: &Value) -> bool {
        let field = self.path.iter().fold(object, |v, k| &v[k.as_str()]);
        let actual = match field {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (actual == self.value) == self.equals
    }
}

/// The fields the real server lets a field selector use, per type.
fn selectable_field(resource: ResourceKind, field: &str) -> bool {
    matches!(field, "metadata.name" | "metadata.namespace")
        || match resource {
            ResourceKind::Namespaces => field == "status.phase",
            ResourceKind::Pods => matches!(
                field,
                "spec.nodeName"
                    | "spec.restartPolicy"
                    | "spec.schedulerName"
                    | "spec.serviceAccountName"
                    | "spec.hostNetwork"
                    | "status.phase"
                    | "status.podIP"
                    | "status.nominatedNodeName"
            ),
            ResourceKind::Services => matches!(field, "spec.clusterIP" | "spec.type"),
            _ => false,
        }
}

/// `field=value`, `field==value`, `field!=value`, comma-separated.
fn parse_field_selector(
    resource: ResourceKind,
    selector: &str,
) -> Result<Vec<FieldRequirement>, ApiError> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|term| {
            let (field, value, equals) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {selector:?}; can't understand {term:?}"
                )));
            };
            let field = field.trim();
            if !selectable_field(resource, field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            Ok(FieldRequirement {
                path: field.split('.').map(String::from).collect(),
                value: value.trim().into(),
                equals,
            })
        })
        .collect()
}

fn set_reuse_addr(listener: &std::net::TcpListener) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The network namespace a socket was made in. None where that is not allowed (it needs
/// CAP_NET_ADMIN): the caller then shares ours, having had no way to make one.
fn socket_netns(listener: &std::net::TcpListener) -> Option<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor, which we then own.
    let fd = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SIOCGSKNS as _) };
    // SAFETY: a descriptor just returned to us.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds `addr` in `netns` (std sets SO_REUSEADDR, so the address is free again at once).
fn bind_in(addr: SocketAddr, netns: Option<&OwnedFd>) -> io::Result<std::net::TcpListener> {
    let Some(netns) = netns else {
        return std::net::TcpListener::bind(addr);
    };
    let netns = netns.as_raw_fd();
    // setns moves only the calling thread: a thread of its own, which then ends.
    thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: a network-namespace descriptor we own for the duration.
                if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                std::net::TcpListener::bind(addr)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the binding thread panicked")))
    })
}

fn labels_map(labels: &[(&str, &str)]) -> Map<String, Value> {
    labels
        .iter()
        .map(|(k, v)| ((*k).into(), json!(v)))
        .collect()
}

/// 128 bits from a name, for the uids of objects the tests refer to only by name.
fn name_hash(name: &str) -> u128 {
    // FNV-1a, 128-bit.
    name.bytes()
        .fold(0x6c62272e07bb014262b821756295c58d, |hash: u128, byte| {
            (hash ^ u128::from(byte)).wrapping_mul(0x0000000001000000000000000000013b)
        })
}

fn format_uuid(bits: u128) -> String {
    // Version 4, variant 1, as the API server's uids.
    let bits = bits & !(0xf << 76 | 0x3 << 62) | (0x4 << 76 | 0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn uuid() -> String {
    format_uuid(fastrand::u128(..))
}

/// RFC 3339 in UTC, seconds precision, as the API's timestamps.
fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A Namespace as the API serves one, with the `kubernetes.io/metadata.name` label the API server
/// puts on every namespace.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut all = labels_map(&[("kubernetes.io/metadata.name", name)]);
    all.extend(labels_map(labels));
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": all},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

const POD_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// A Pod as the API serves one, scheduled on `node`: Running and ready with `ip`, Pending
/// (containers being created, no IP yet) without. Anything else is plain JSON to change, e.g.
/// `pod["status"]["phase"] = json!("Succeeded")`; see also [`with_host_network`] and
/// [`with_owner`].
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: Option<Ipv4Addr>,
    service_account: &str,
    labels: &[(&str, &str)],
) -> Value {
    let time = now();
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": time});
    let container_status = |running: bool| {
        let mut status = json!({
            "name": "app",
            "image": POD_IMAGE,
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "lastState": {},
            "state": {"waiting": {"reason": "ContainerCreating"}},
        });
        if running {
            status["imageID"] = json!(format!(
                "registry.k8s.io/pause@sha256:{:032x}{:032x}",
                name_hash(POD_IMAGE),
                name_hash(name)
            ));
            status["containerID"] = json!(format!(
                "containerd://{:032x}{:032x}",
                fastrand::u128(..),
                fastrand::u128(..)
            ));
            status["state"] = json!({"running": {"startedAt": time}});
        }
        status
    };
    let status = match ip {
        Some(ip) => json!({
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers", "True"),
                condition("Initialized", "True"),
                condition("Ready", "True"),
                condition("ContainersReady", "True"),
                condition("PodScheduled", "True"),
            ],
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "startTime": time,
            "containerStatuses": [container_status(true)],
            "qosClass": "BestEffort",
        }),
        None => json!({
            "phase": "Pending",
            "conditions": [
                condition("PodReadyToStartContainers", "False"),
                condition("Initialized", "True"),
                condition("Ready", "False"),
                condition("ContainersReady", "False"),
                condition("PodScheduled", "True"),
            ],
            "startTime": time,
            "containerStatuses": [container_status(false)],
            "qosClass": "BestEffort",
        }),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels_map(labels)},
        "spec": {
            "containers": [{
                "name": "app",
                "image": POD_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": status,
    })
}

/// The pod on its node's network: `spec.hostNetwork`, and the DNS policy such pods are given.
/// Its IP is then the node's: pass that to [`pod`].
pub fn with_host_network(mut pod: Value) -> Value {
    pod["spec"]["hostNetwork"] = json!(true);
    pod["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    pod
}

/// The object controlled by `kind` `name` (e.g. "apps/v1", "ReplicaSet", "web-5d8f7c9b4"; a
/// ReplicaSet's pods also carry its `pod-template-hash` label, "5d8f7c9b4" here). The owner's uid
/// is derived from its kind and name, the same each time.
pub fn with_owner(mut object: Value, api_version: &str, kind: &str, name: &str) -> Value {
    object["metadata"]["ownerReferences"] = json!([{
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": format_uuid(name_hash(&format!("{kind}/{name}"))),
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    object
}

/// A ClusterIP Service as `kubectl create service clusterip` makes one (label and selector
/// `app: NAME`), headless without `cluster_ip`. Ports: (name, port, targetPort, appProtocol); an
/// empty name leaves the port unnamed, as a single-port service's may be.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: Option<Ipv4Addr>,
    ports: &[(&str, u16, u16, Option<&str>)],
) -> Value {
    let cluster_ip = cluster_ip.map_or_else(|| "None".to_owned(), |ip| ip.to_string());
    let ports: Vec<Value> = ports
        .iter()
        .map(|&(port_name, port, target_port, app_protocol)| {
            let mut value = json!({"protocol": "TCP", "port": port, "targetPort": target_port});
            if !port_name.is_empty() {
                value["name"] = json!(port_name);
            }
            if let Some(app_protocol) = app_protocol {
                value["appProtocol"] = json!(app_protocol);
            }
            value
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "ports": ports,
            "selector": {"app": name},
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice the endpoint-slice controller keeps for `service`: named
/// `SERVICE-xxxxx` (the same name each time, so applying it again replaces it), labelled
/// `kubernetes.io/service-name`. Endpoints: (ip, ready, node, pod name); ports: (name, port,
/// appProtocol).
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    endpoints: &[(Ipv4Addr, bool, &str, &str)],
    ports: &[(&str, u16, Option<&str>)],
) -> Value {
    // generateName's suffix: five characters of the alphabet the API server draws them from.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hash = name_hash(service);
    let suffix: String = (0..5)
        .map(|_| {
            let c = ALPHABET[(hash % ALPHABET.len() as u128) as usize];
            hash /= ALPHABET.len() as u128;
            char::from(c)
        })
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(ip, ready, node, pod)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|&(port_name, port, app_protocol)| {
            let mut value = json!({"name": port_name, "protocol": "TCP", "port": port});
            if let Some(app_protocol) = app_protocol {
                value["appProtocol"] = json!(app_protocol);
            }
            value
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{suffix}"),
            "generateName": format!("{service}-"),
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}
