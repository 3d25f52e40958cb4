//! Node-local admin endpoint (loopback only: `/logging` changes the agent):
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /ready`: 200 once the eBPF programs are attached and the config is applied, until
//!   shutdown begins; otherwise 503 with the reason;
//! - `GET /stats`: JSON counters;
//! - `GET /config_dump`: JSON of the configuration, workloads, services, pods and certificates in
//!   force (certificate metadata only, never key material);
//! - `GET /logging`: the log filter; `POST /logging?level=<EnvFilter directives>` replaces it;
//! - `GET /graph`: JSON of the node's live traffic between workloads, and `GET /` a page that
//!   draws it.
//!
//! [`serve`] runs any [`Router`]: the metrics listener ([`metrics_routes`], `GET /metrics`, on an
//! address a node-level scraper reaches) shares the serving loop and the state.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    convert::Infallible,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::Instant,
};

use anyhow::{Context, Result};
use flate2::{write::GzEncoder, Compression};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderMap},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, InboundMode, PodId, ServiceSpec},
    datapath::Datapath,
    enrollment::{PodStatus, PodStatusTable},
    graph::{self, GraphHistory},
    handover::Handover,
    identity::{CertificateInfo, CertificateStore, Identity},
    kubernetes::{KubernetesDump, KubernetesReport},
    lock,
    logging::{FilterError, LogFilter},
    metrics,
    proxy::ProxyContext,
    state::MeshState,
    stats::Stats,
};

/// What a listener answers: a response for each request, computed from the shared state.
pub type Router = fn(&AdminState, &Request<Incoming>) -> Response<Full<Bytes>>;

pub struct AdminState {
    pub datapath: Arc<Datapath>,
    /// The mesh state in force (config, workloads, services and their endpoints).
    pub proxy: Arc<ProxyContext>,
    pub stats: Arc<Stats>,
    pub pods: PodStatusTable,
    pub certs: Option<Arc<CertificateStore>>,
    pub readiness: Arc<Readiness>,
    pub log_filter: LogFilter,
    pub graph: Arc<GraphHistory>,
    pub kubernetes: Arc<KubernetesReport>,
}

/// What `/ready` reports, set by the agent as it starts and stops.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    config_applied: AtomicBool,
    draining: AtomicBool,
    /// With upgrades by hand-over, only the agent in charge of the node is ready.
    handover: Option<Handover>,
}

impl Readiness {
    pub fn new(handover: Option<Handover>) -> Self {
        Self {
            handover,
            ..Self::default()
        }
    }

    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Relaxed);
    }

    /// The first configuration has been applied (pods enrolled or their failures recorded).
    pub fn set_config_applied(&self) {
        self.config_applied.store(true, Relaxed);
    }

    /// Shutdown has begun; never undone.
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Ready, or why not.
    pub fn check(&self) -> Result<(), Cow<'static, str>> {
        if self.draining.load(Relaxed) {
            Err("draining".into())
        } else if !self.attached.load(Relaxed) {
            Err("eBPF programs not attached".into())
        } else if !self.config_applied.load(Relaxed) {
            Err("configuration not applied yet".into())
        } else if let Some(reason) = self.handover.as_ref().and_then(Handover::not_in_charge) {
            Err(reason.into())
        } else {
            Ok(())
        }
    }
}

/// Binds the listener of `what` (the admin or the metrics endpoint). SO_REUSEPORT lets an
/// agent taking over (see `handover`) bind while the one it replaces still answers.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let bound = (|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    })();
    bound.with_context(|| format!("cannot listen on the {what} address {addr}"))
}

/// Answers requests on `listener` with `routes` until `stop` (connections already accepted are
/// not cut).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
    routes: Router,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Usually fd exhaustion: back off instead of spinning.
                debug!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    // Off the proxy's thread: a large /metrics takes milliseconds to render,
                    // which would stall every connection of the node.
                    let answer = tokio::task::spawn_blocking(move || routes(&state, &req)).await;
                    Ok::<_, Infallible>(answer.unwrap_or_else(|err| {
                        warn!(error = %err, "an admin request failed");
                        text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
                    }))
                }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "admin connection error");
            }
        });
    }
}

/// The admin listener's routes.
pub fn routes(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        // The pid says which agent answered: during an upgrade two share the port.
        (&Method::GET, "/ready") => match state.readiness.check() {
            Ok(()) => text(
                StatusCode::OK,
                format!("ready (agent pid {})\n", std::process::id()),
            ),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{reason} (agent pid {})\n", std::process::id()),
            ),
        },
        (&Method::GET, "/stats") => stats(state),
        (&Method::GET, "/config_dump") => {
            let pods = lock(&state.pods).clone();
            let kubernetes = state.kubernetes.dump();
            match config_dump(
                &state.proxy.state.get(),
                &pods,
                state.certs.as_deref(),
                kubernetes,
            ) {
                Ok(body) => json_response(body),
                Err(err) => {
                    warn!(error = %err, "cannot render the config dump");
                    text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
                }
            }
        }
        (&Method::GET, "/logging") => match state.log_filter.current() {
            Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
            Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
        },
        (&Method::POST, "/logging") => set_log_filter(&state.log_filter, req.uri().query()),
        (&Method::GET, "/graph") => match serde_json::to_vec(&state.graph.graph(&state.proxy)) {
            Ok(body) => json_response(body),
            Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
        },
        (&Method::GET, "/") => {
            let mut page = text(StatusCode::OK, graph::PAGE);
            page.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            page
        }
        (_, "/" | "/graph" | "/healthz" | "/ready" | "/stats" | "/config_dump") => {
            method_not_allowed("GET")
        }
        (_, "/logging") => method_not_allowed("GET, POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The metrics listener: `GET /metrics` only.
pub fn metrics_routes(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let sources = metrics::Sources {
                ctx: &state.proxy,
                pods: &state.pods,
                certs: state.certs.as_deref(),
            };
            metrics_response(metrics::render(&sources), req.headers())
        }
        (_, "/metrics") => method_not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The metrics text, gzipped when the scraper accepts it (Prometheus asks for it): a node with
/// many workloads renders megabytes of label sets repeated from line to line.
fn metrics_response(text: String, request_headers: &HeaderMap) -> Response<Full<Bytes>> {
    let gzipped = if accepts_gzip(request_headers) {
        gzip(text.as_bytes())
            .inspect_err(|err| warn!("sending /metrics uncompressed: gzip failed: {err}"))
            .ok()
    } else {
        None
    };
    let mut response = match gzipped {
        Some(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_ENCODING,
                header::HeaderValue::from_static("gzip"),
            );
            response
        }
        None => Response::new(Full::new(Bytes::from(text))),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    headers.insert(
        header::VARY,
        header::HeaderValue::from_static("accept-encoding"),
    );
    response
}

/// Whether `Accept-Encoding` lists gzip (or `*`) without `q=0`.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|param| {
                param
                    .trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    // The fastest level: repeated label sets compress well even so, at a fraction of the CPU.
    let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 16), Compression::fast());
    encoder.write_all(bytes)?;
    encoder.finish()
}

fn stats(state: &AdminState) -> Response<Full<Bytes>> {
    let ebpf: serde_json::Map<_, _> = state
        .datapath
        .counters()
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.into()))
        .collect();
    let (connecting, established) = state.datapath.tracked_connections();
    let body = json!({
        "ebpf": ebpf,
        "tracked_connections": { "connecting": connecting, "established": established },
        "unknown_origin": state.stats.unknown_origin.load(Relaxed),
        "pods": &*lock(&state.pods),
        "flows": state.stats.snapshot(),
        "inbound": state.stats.inbound_snapshot(),
        "tunnels": &state.stats.tunnels,
        "services": state.stats.services_snapshot(),
        "endpoints": state.proxy.state.get().services.endpoint_snapshot(Instant::now()),
        "certificates": state.certs.as_ref().map(|certs| certs.snapshot()),
    });
    json_response(body.to_string().into_bytes())
}

/// `/config_dump`: only types that carry no key material go in. The config names the CA's files
/// but never holds their contents, and certificates appear as [`CertificateInfo`].
#[derive(Serialize)]
struct ConfigDump<'a> {
    /// As in force: a reload keeps the identity settings and node name of start-up.
    config: &'a Config,
    workloads: Vec<WorkloadView<'a>>,
    services: Vec<ServiceView<'a>>,
    pods: &'a BTreeMap<PodId, PodStatus>,
    /// `null` without identities.
    certificates: Option<Vec<CertificateInfo>>,
    /// `null` without Kubernetes.
    kubernetes: Option<KubernetesDump>,
}

#[derive(Serialize)]
struct WorkloadView<'a> {
    id: &'a PodId,
    workload: &'a str,
    namespace: &'a str,
    ip: Ipv4Addr,
    identity: &'a Identity,
    node: &'a str,
    labels: &'a BTreeMap<String, String>,
    inbound_mode: InboundMode,
}

#[derive(Serialize)]
struct ServiceView<'a> {
    #[serde(flatten)]
    spec: &'a ServiceSpec,
    /// Per service port (`namespace/name:port`), the endpoints as the balancer sees them.
    endpoints: BTreeMap<String, serde_json::Value>,
}

fn config_dump(
    mesh: &MeshState,
    pods: &BTreeMap<PodId, PodStatus>,
    certs: Option<&CertificateStore>,
    kubernetes: Option<KubernetesDump>,
) -> serde_json::Result<Vec<u8>> {
    let mut workloads: Vec<WorkloadView> = mesh
        .workloads()
        .map(|w| WorkloadView {
            id: &w.id,
            workload: &w.name,
            namespace: &w.namespace,
            ip: w.ip,
            identity: &w.identity,
            node: &w.node,
            labels: &w.labels,
            inbound_mode: w.inbound_mode,
        })
        .collect();
    workloads.sort_by_key(|w| w.id);
    let mut endpoints = match mesh.services.endpoint_snapshot(Instant::now()) {
        serde_json::Value::Object(by_port) => by_port,
        _ => serde_json::Map::new(),
    };
    let services = mesh
        .config
        .services
        .iter()
        .map(|spec| ServiceView {
            spec,
            endpoints: spec
                .ports
                .iter()
                .filter_map(|port| {
                    let id = format!("{}/{}:{}", spec.namespace, spec.name, port.port);
                    endpoints.remove(&id).map(|summary| (id, summary))
                })
                .collect(),
        })
        .collect();
    serde_json::to_vec_pretty(&ConfigDump {
        config: &mesh.config,
        workloads,
        services,
        pods,
        certificates: certs.map(CertificateStore::snapshot),
        kubernetes,
    })
}

/// `POST /logging?level=<directives>`: replaces the log filter, or 400 with nothing changed.
fn set_log_filter(filter: &LogFilter, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(directives) = query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("level="))
        .filter(|directives| !directives.is_empty())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing level: POST /logging?level=<directives>, e.g. level=debug or level=weft=debug,h2=info\n",
        );
    };
    // Directives are taken as written: `%` never appears in them, so an escape is a client that
    // encoded the query, and decoding it here would accept what the filter syntax does not.
    if directives.contains('%') {
        return text(
            StatusCode::BAD_REQUEST,
            "invalid log filter: send the directives unencoded (no %-escapes)\n",
        );
    }
    let previous = filter.current().unwrap_or_default();
    match filter.set(directives) {
        Ok(current) => {
            info!(%previous, %current, "log filter changed");
            text(StatusCode::OK, format!("{current}\n"))
        }
        Err(err @ FilterError::Invalid(_)) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
        Err(err @ FilterError::Unavailable(_)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
        }
    }
}

fn json_response(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}\n"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use tempfile::TempDir;

    use super::*;
    use crate::{identity::MeshCa, l7::service::Services};

    fn accept_encoding(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::ACCEPT_ENCODING, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn gzip_is_chosen_only_when_accepted() {
        assert!(accepts_gzip(&accept_encoding(&["gzip"])));
        assert!(accepts_gzip(&accept_encoding(&["identity, GZIP;q=0.5"])));
        assert!(accepts_gzip(&accept_encoding(&["br", "*"])));
        assert!(!accepts_gzip(&accept_encoding(&[])));
        assert!(!accepts_gzip(&accept_encoding(&["identity", "br"])));
        assert!(!accepts_gzip(&accept_encoding(&["gzip;q=0"])));
        assert!(!accepts_gzip(&accept_encoding(&["x-gzip-ish"])));
    }

    #[tokio::test]
    async fn metrics_are_gzipped_for_scrapers_that_accept_it_and_say_the_same() {
        use http_body_util::BodyExt;
        use std::io::Read;

        let text: String = (0..2000)
            .map(|i| format!("weft_example_total{{pod=\"p{i}\"}} {i}\n"))
            .collect();

        let plain = metrics_response(text.clone(), &accept_encoding(&["identity"]));
        assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
        let plain_body = plain.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(plain_body, text.as_bytes());

        let zipped = metrics_response(text.clone(), &accept_encoding(&["gzip"]));
        assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            zipped.headers()[header::CONTENT_TYPE],
            metrics::CONTENT_TYPE
        );
        let body = zipped.into_body().collect().await.unwrap().to_bytes();
        assert!(
            body.len() * 5 < text.len(),
            "{} of {}",
            body.len(),
            text.len()
        );
        let mut unzipped = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, text);
    }

    #[test]
    fn readiness_needs_attach_and_config_and_ends_with_draining() {
        let readiness = Readiness::default();
        assert_eq!(readiness.check(), Err("eBPF programs not attached".into()));
        readiness.set_attached(true);
        assert_eq!(
            readiness.check(),
            Err("configuration not applied yet".into())
        );
        readiness.set_config_applied();
        assert_eq!(readiness.check(), Ok(()));
        readiness.set_draining();
        assert_eq!(readiness.check(), Err("draining".into()));
        readiness.set_attached(false);
        assert_eq!(readiness.check(), Err("draining".into()));
    }

    /// A mesh CA written to `dir` as PEM files, the way a mounted Secret holds it.
    fn write_ca(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf, String) {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "admin test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let key_pem = key.serialize_pem();
        std::fs::write(&key_path, &key_pem).unwrap();
        (cert_path, key_path, key_pem)
    }

    #[test]
    fn the_config_dump_shows_identities_and_certificates_but_no_key() {
        let dir = TempDir::new().unwrap();
        let (cert_path, key_path, key_pem) = write_ca(&dir);
        let config = Config::parse(&format!(
            "identity:\n  trust_domain: cluster.local\n  ca_cert: {}\n  ca_key: {}\n\
             pods:\n  - {{name: web-1, namespace: shop, netns: /var/run/netns/web-1, ip: 10.0.0.2, service_account: web, labels: {{app: web}}, workload: web}}\n\
             peers:\n  - {{name: db-1, namespace: shop, ip: 10.0.1.2, service_account: db, node: other}}\n\
             services:\n  - {{name: db, namespace: shop, vips: [10.96.0.10], ports: [{{port: 5432}}], endpoints: [10.0.1.2]}}\n",
            cert_path.display(),
            key_path.display()
        ))
        .unwrap();
        let mesh = MeshState::from_config(&config, &Services::default(), &Stats::default());
        let store = CertificateStore::new(
            MeshCa::load(&cert_path, &key_path).unwrap(),
            Duration::from_secs(3600),
            0.5,
        );
        let web = Identity::new("cluster.local", "shop", "web");
        let issued = store.certificate(&web).unwrap();
        let pods = BTreeMap::from([(
            PodId::new("shop", "web-1"),
            PodStatus::Enrolled {
                netns: "/var/run/netns/web-1".to_owned(),
                netns_cookie: 7,
                cgroup: None,
            },
        )]);

        let body = config_dump(&mesh, &pods, Some(&store), None).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        for forbidden in ["PRIVATE KEY", "BEGIN", "-----"] {
            assert!(!text.contains(forbidden), "{forbidden} in {text}");
        }
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "CA key material in {text}");
        }

        let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            dump["config"]["identity"]["ca_key"],
            key_path.display().to_string()
        );
        let workloads = dump["workloads"].as_array().unwrap();
        assert_eq!(workloads.len(), 2);
        assert_eq!(workloads[0]["id"], "shop/db-1");
        assert_eq!(workloads[0]["node"], "other");
        assert_eq!(workloads[1]["id"], "shop/web-1");
        assert_eq!(workloads[1]["workload"], "web");
        assert_eq!(
            workloads[1]["identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(workloads[1]["labels"]["app"], "web");
        assert_eq!(workloads[1]["inbound_mode"], "PERMISSIVE");
        let services = dump["services"].as_array().unwrap();
        assert_eq!(services[0]["name"], "db");
        assert_eq!(
            services[0]["endpoints"]["shop/db:5432"]["endpoints"][0]["address"],
            "10.0.1.2:5432"
        );
        assert_eq!(dump["pods"]["shop/web-1"]["state"], "enrolled");
        let certificates = dump["certificates"].as_array().unwrap();
        assert_eq!(certificates.len(), 1);
        assert_eq!(certificates[0]["identity"], web.to_string());
        assert_eq!(certificates[0]["serial"], issued.serial);
        assert!(certificates[0]["not_after"].is_string());
    }

    #[test]
    fn without_identities_the_config_dump_has_no_workloads_or_certificates() {
        let config = Config::embedded_default().unwrap();
        let mesh = MeshState::from_config(&config, &Services::default(), &Stats::default());
        let body = config_dump(&mesh, &BTreeMap::new(), None, None).unwrap();
        let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(dump["workloads"], json!([]));
        assert_eq!(dump["certificates"], serde_json::Value::Null);
        assert_eq!(
            dump["config"]["agent"]["admin_addr"],
            config.agent.admin_addr.to_string()
        );
    }
}
