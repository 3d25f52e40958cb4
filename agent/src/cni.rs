//! The node's side of `weft-cni`, the chained CNI plugin that asks this agent to enroll a pod
//! before its containers start, and the protocol both sides speak. The plugin connects to
//! `<cni_dir>/cni.sock`, sends one JSON line ([`CniRequest`]) and reads one JSON line back
//! ([`CniResponse`]). The agent also keeps `<cni_dir>/enrolled-namespaces.json`, which the plugin
//! reads only when the agent does not answer, to decide whether a pod may start uncaptured.
use std::{
    collections::BTreeSet,
    fs,
    future::Future,
    io::{ErrorKind, Write as _},
    net::Ipv4Addr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

/// Where the socket and the namespaces file live unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/run/weft";
pub const SOCKET_NAME: &str = "cni.sock";
pub const ENROLLED_NAMESPACES_FILE: &str = "enrolled-namespaces.json";
/// A request or response is a few hundred bytes; a longer line is not the plugin talking.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How long a connected client may take to send its request, so a stuck one does not keep its
/// task (and file descriptor) forever.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing the answer may take: it fits in the socket buffer unless the client is gone.
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The CNI operation the plugin was invoked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// The pod's sandbox is being set up: enroll it if its namespace is meshed, before any of
    /// its containers starts.
    Add,
    /// The pod's sandbox is going away (may be repeated, and may come without netns or pod
    /// fields).
    Del,
    /// Verify: answer `error` when the pod's namespace is meshed but the pod is not enrolled.
    Check,
}

/// One invocation of the plugin, as it tells the agent. Fields the runtime did not give are
/// empty: ADD always has them all, DEL and CHECK may lack some.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    pub command: CniCommand,
    #[serde(default)]
    pub container_id: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: String,
    /// The IPv4 addresses the previous plugins of the chain gave the pod.
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
}

/// The agent's answer. `Enrolled` and `NotMeshed` let the pod start; `Error` stops it (ADD,
/// CHECK) so the runtime retries rather than running a meshed pod uncaptured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CniResponse {
    Enrolled,
    NotMeshed { reason: String },
    Error { error: String },
}

/// `<dir>/cni.sock`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_NAME)
}

/// Binds `<dir>/cni.sock` (creating `dir`), replacing a stale socket left by an earlier agent,
/// readable and writable by root only. Must be called inside a Tokio runtime.
pub fn bind(dir: &Path) -> Result<UnixListener> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = socket_path(dir);
    match fs::symlink_metadata(&path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )
        }
        Ok(_) => debug!(path = %path.display(), "replacing a stale CNI socket"),
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    }
    // Bound under a temporary name and restricted before it is renamed into place (replacing any
    // stale socket at once): a client never finds the socket while anyone but root may connect.
    let tmp = temporary_sibling(&path);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("binding {}", tmp.display()))?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(err) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("placing the CNI socket at {}", path.display()));
    }
    listener
        .set_nonblocking(true)
        .context("making the CNI socket non-blocking")?;
    UnixListener::from_std(listener).context("registering the CNI socket with the runtime")
}

/// Answers the plugin's requests on `listener` with `handler`, one task per connection, until the
/// returned future is dropped. A malformed or oversized request gets an `error` answer; a client
/// that connects and sends nothing (the plugin's STATUS probe) is simply closed.
pub async fn serve<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(CniRequest) -> F + Send + Sync + 'static,
    F: Future<Output = CniResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, Arc::clone(&handler)));
            }
            Err(err) => {
                // Typically out of file descriptors: pause rather than spin.
                warn!(error = %err, "accepting on the CNI socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer<H, F>(stream: UnixStream, handler: Arc<H>)
where
    H: Fn(CniRequest) -> F,
    F: Future<Output = CniResponse>,
{
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut limited = BufReader::new(read).take(MAX_MESSAGE_BYTES as u64 + 1);
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => {
            warn!(
                "a CNI client sent no request within {REQUEST_READ_TIMEOUT:?}; closing its connection"
            );
            return;
        }
        Ok(Err(err)) => {
            warn!(error = %err, "reading a CNI request failed");
            return;
        }
        Ok(Ok(0)) => {
            debug!("a CNI client connected and closed without a request (a STATUS probe)");
            return;
        }
        Ok(Ok(_)) => {}
    }
    let response = match parse_request(&line) {
        Ok(request) => {
            debug!(?request, "CNI request");
            let response = handler(request.clone()).await;
            debug!(?request, ?response, "CNI request answered");
            response
        }
        Err(err) => {
            warn!(error = %format!("{err:#}"), "malformed CNI request");
            CniResponse::Error {
                error: format!("{err:#}"),
            }
        }
    };
    let write_answer = async {
        write.write_all(&encode_line(&response)?).await?;
        write.shutdown().await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(RESPONSE_WRITE_TIMEOUT, write_answer).await {
        Ok(Ok(())) => {}
        // The plugin gives up after its own timeout; by then nobody reads the answer.
        Ok(Err(err)) => debug!(error = %format!("{err:#}"), "answering a CNI request failed"),
        Err(_) => debug!("a CNI client did not take its answer"),
    }
}

fn parse_request(line: &[u8]) -> Result<CniRequest> {
    if line.len() > MAX_MESSAGE_BYTES {
        bail!("request longer than {MAX_MESSAGE_BYTES} bytes");
    }
    serde_json::from_slice(line).context("request is not a CNI request JSON line")
}

fn encode_line<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    Ok(line)
}

/// The plugin's side: sends `request` to the agent at `socket` and returns its answer. It has no
/// timeout of its own; the caller bounds it.
pub async fn request(socket: &Path, request: &CniRequest) -> Result<CniResponse> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the weft agent at {}", socket.display()))?;
    stream
        .write_all(&encode_line(request)?)
        .await
        .context("sending the request to the weft agent")?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(MAX_MESSAGE_BYTES as u64)
        .read_until(b'\n', &mut line)
        .await
        .context("reading the weft agent's answer")?;
    if line.is_empty() {
        bail!("the weft agent closed the connection without answering");
    }
    serde_json::from_slice(&line).context("the weft agent's answer is not a CNI response")
}

#[derive(Serialize, Deserialize)]
struct EnrolledNamespaces {
    namespaces: BTreeSet<String>,
}

/// Writes `<dir>/enrolled-namespaces.json` (`{"namespaces":[...]}`) atomically, creating `dir`:
/// the plugin never reads a half-written file.
pub fn write_enrolled_namespaces(dir: &Path, namespaces: &BTreeSet<String>) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(ENROLLED_NAMESPACES_FILE);
    let body = serde_json::to_vec(&EnrolledNamespaces {
        namespaces: namespaces.clone(),
    })?;
    let tmp = temporary_sibling(&path);
    let written = fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(&body)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// The namespaces the agent last wrote to `<dir>/enrolled-namespaces.json`; `None` when it never
/// wrote the file.
pub fn read_enrolled_namespaces(dir: &Path) -> Result<Option<BTreeSet<String>>> {
    let path = dir.join(ENROLLED_NAMESPACES_FILE);
    let body = match fs::read(&path) {
        Ok(body) => body,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let file: EnrolledNamespaces =
        serde_json::from_slice(&body).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(file.namespaces))
}

/// A hidden name next to `path`, unique in this process, for a file renamed into place.
fn temporary_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn add_request() -> CniRequest {
        CniRequest {
            command: CniCommand::Add,
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-1".into(),
            ips: vec![Ipv4Addr::new(10, 244, 1, 7)],
        }
    }

    #[test]
    fn cni_messages_have_the_documented_shape() {
        let json = serde_json::to_value(add_request()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"command": "ADD", "container_id": "c0ffee",
                "netns": "/var/run/netns/cni-1", "ifname": "eth0", "pod_namespace": "shop",
                "pod_name": "web-0", "pod_uid": "uid-1", "ips": ["10.244.1.7"]})
        );
        let del: CniRequest =
            serde_json::from_str(r#"{"command":"DEL","container_id":"c"}"#).unwrap();
        assert_eq!(del.command, CniCommand::Del);
        assert!(del.netns.is_empty() && del.ips.is_empty());
        for (response, text) in [
            (CniResponse::Enrolled, r#"{"outcome":"enrolled"}"#),
            (
                CniResponse::NotMeshed {
                    reason: "namespace kube-system is not meshed".into(),
                },
                r#"{"outcome":"not_meshed","reason":"namespace kube-system is not meshed"}"#,
            ),
            (
                CniResponse::Error {
                    error: "no identity".into(),
                },
                r#"{"outcome":"error","error":"no identity"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&response).unwrap(), text);
            assert_eq!(serde_json::from_str::<CniResponse>(text).unwrap(), response);
        }
    }

    #[test]
    fn cni_enrolled_namespaces_file_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("run/weft");
        assert_eq!(read_enrolled_namespaces(&nested).unwrap(), None);
        let namespaces: BTreeSet<String> = ["shop".to_owned(), "bank".to_owned()].into();
        write_enrolled_namespaces(&nested, &namespaces).unwrap();
        assert_eq!(
            fs::read_to_string(nested.join(ENROLLED_NAMESPACES_FILE)).unwrap(),
            r#"{"namespaces":["bank","shop"]}"#
        );
        write_enrolled_namespaces(&nested, &BTreeSet::new()).unwrap();
        assert_eq!(
            read_enrolled_namespaces(&nested).unwrap(),
            Some(BTreeSet::new())
        );
        // Only the file itself remains: no temporary left behind.
        assert_eq!(fs::read_dir(&nested).unwrap().count(), 1);
        fs::write(nested.join(ENROLLED_NAMESPACES_FILE), "{").unwrap();
        assert!(read_enrolled_namespaces(&nested).is_err());
    }

    #[tokio::test]
    async fn cni_socket_is_private_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let stale = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        drop(stale);
        let _listener = bind(dir.path()).unwrap();
        let meta = fs::metadata(socket_path(dir.path())).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let other = tempfile::tempdir().unwrap();
        fs::write(socket_path(other.path()), "not a socket").unwrap();
        let err = bind(other.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
    }

    #[tokio::test]
    async fn cni_serve_answers_each_request_and_survives_bad_and_stuck_clients() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        tokio::spawn(serve(listener, move |request: CniRequest| {
            let recorded = Arc::clone(&recorded);
            async move {
                let answer = if request.pod_namespace == "shop" {
                    CniResponse::Enrolled
                } else {
                    CniResponse::NotMeshed {
                        reason: format!("namespace {} is not meshed", request.pod_namespace),
                    }
                };
                crate::lock(&recorded).push(request);
                answer
            }
        }));
        let socket = socket_path(dir.path());

        // A client that connects and never sends must not hold up the others.
        let _stuck = UnixStream::connect(&socket).await.unwrap();
        // Nor one that sends half a line and stalls.
        let mut stalled = UnixStream::connect(&socket).await.unwrap();
        stalled.write_all(b"{\"command\":").await.unwrap();

        assert_eq!(
            request(&socket, &add_request()).await.unwrap(),
            CniResponse::Enrolled
        );
        let mut other = add_request();
        other.pod_namespace = "kube-system".into();
        assert_eq!(
            request(&socket, &other).await.unwrap(),
            CniResponse::NotMeshed {
                reason: "namespace kube-system is not meshed".into()
            }
        );
        assert_eq!(*crate::lock(&seen), vec![add_request(), other]);

        for bad in [b"not json\n".to_vec(), vec![b' '; MAX_MESSAGE_BYTES + 10]] {
            let mut client = UnixStream::connect(&socket).await.unwrap();
            client.write_all(&bad).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            let answer: CniResponse = serde_json::from_str(&answer).unwrap();
            assert!(matches!(answer, CniResponse::Error { .. }), "{answer:?}");
        }
        assert_eq!(crate::lock(&seen).len(), 2, "bad requests reach no handler");

        // A STATUS probe: connect, send nothing, close.
        drop(UnixStream::connect(&socket).await.unwrap());
        assert_eq!(
            request(&socket, &add_request()).await.unwrap(),
            CniResponse::Enrolled
        );
    }

    #[tokio::test]
    async fn cni_request_fails_clearly_without_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(&socket_path(dir.path()), &add_request())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("connecting to the weft agent"),
            "{err:#}"
        );
    }
}
