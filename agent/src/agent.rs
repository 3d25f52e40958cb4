//! The agent's lifecycle: preflight checks, attach, enroll from config, follow config changes,
//! and on SIGTERM/SIGINT detach, stop accepting and drain.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};
use weft_common::Settings;

use crate::{
    access_log::AccessLog,
    admin::{self, AdminState, Readiness},
    cni::{self, CniRequest, CniResponse},
    config::{AgentSettings, Config, IdentitySettings, PodSpec},
    datapath::{check_cgroup2_dir, Datapath},
    enrollment::PodStatus,
    enrollment::{Enrollment, EnrollmentSettings, LISTENER_LINGER},
    handover::Handover,
    identity::{CertificateStore, MeshCa},
    inbound::MAX_CONCURRENT_HANDSHAKES,
    kubernetes::{
        cni_admission::{admit, Admission},
        model::{derive, merge, ClusterConfig, Skipped},
        watch::{ClusterWatch, SETTLE},
        KubernetesReport,
    },
    l7::service::Services,
    lock,
    logging::LogFilter,
    metrics,
    proxy::ProxyContext,
    state::{MeshState, SharedState},
    stats::Stats,
    tunnel::TunnelPool,
};

/// How often pods that failed to enroll (e.g. their netns is not there yet) are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Editors write a file in several steps; wait for them to settle before reloading.
const RELOAD_SETTLE: Duration = Duration::from_millis(150);
/// After the drain period, how long resetting the remaining connections may take.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// How often certificates are checked for renewal; lifetimes are hours, or seconds in tests.
const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(
    config_path: Option<PathBuf>,
    node_name: Option<String>,
    log_filter: LogFilter,
) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("weft must run as root: it loads eBPF programs and enters pod network namespaces");
    }
    // Watch before the first load, so an edit made during start-up is not missed.
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let _watcher = match &config_path {
        Some(path) => Some(watch_config(path, reload_tx)?),
        None => None,
    };
    let config = load(config_path.as_deref(), node_name.as_deref())?;
    let settings = config.agent.clone();
    let startup = config.clone();
    check_cgroup2_dir(&settings.cgroup_path)?;
    let handover = settings.handover.as_ref().map(Handover::new);
    if let Some(handover) = &handover {
        handover
            .announce()
            .context("announcing this agent for the hand-over")?;
    }
    let certs = match &config.identity {
        Some(identity) => Some(load_identities(identity)?),
        None => {
            warn!("no identity section in the config: traffic is proxied as plain L4, without mTLS tunnels or inbound capture");
            None
        }
    };
    raise_fd_limit();
    let admin_listener = admin::bind(settings.admin_addr, "admin").await?;
    let metrics_listener = admin::bind(settings.metrics_addr, "metrics").await?;

    let datapath = Arc::new(Datapath::attach(
        &settings.cgroup_path,
        Settings {
            agent_mark: settings.socket_mark,
            delivery_mark: settings.delivery_mark,
            outbound_port: settings.outbound_port,
            inbound_port: settings.inbound_port,
        },
        handover.as_ref().map(Handover::pin_dir),
    )?);
    datapath.set_exclusions(&settings.exclude_ports, &settings.exclude_cidrs)?;
    info!(cgroup = %settings.cgroup_path.display(), "eBPF programs attached");
    let readiness = Arc::new(Readiness::new(handover.clone()));
    readiness.set_attached(true);

    let stats = Arc::new(Stats::default());
    let tunnels = certs.as_ref().map(|certs| {
        TunnelPool::new(
            Arc::clone(certs),
            Arc::clone(&stats),
            settings.inbound_port,
            settings.socket_mark,
            settings.connect_timeout(),
        )
    });
    let ctx = Arc::new(ProxyContext {
        datapath: Arc::clone(&datapath),
        stats: Arc::clone(&stats),
        state: SharedState::new(MeshState::from_config(
            &config,
            &Services::default(),
            &stats,
        )),
        tunnels,
        socket_mark: settings.socket_mark,
        delivery_mark: settings.delivery_mark,
        tunnel_port: settings.inbound_port,
        connect_timeout: settings.connect_timeout(),
        tunnel_idle_timeout: settings.tunnel_idle_timeout(),
        handshakes: Semaphore::new(MAX_CONCURRENT_HANDSHAKES),
        protocol_detection_timeout: settings.protocol_detection_timeout(),
        opaque_ports: settings.opaque_ports.clone(),
        retry_body_limit: settings.retry_body_limit_bytes,
        strict_allows_node: settings.strict_allows_node,
        exhausted: Default::default(),
        access_log: AccessLog::stdout(&settings.access_log),
        local_pods: Default::default(),
        leaving: Default::default(),
        connections: TaskTracker::new(),
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    let mut enrollment = Enrollment::new(
        Arc::clone(&ctx),
        EnrollmentSettings {
            outbound_port: settings.outbound_port,
            tunnel_port: settings.inbound_port,
            plaintext_port: settings.inbound_plaintext_port,
            delivery_mark: settings.delivery_mark,
            proc_root: config.kubernetes.proc_root.clone(),
            identities: config
                .identity
                .as_ref()
                .zip(certs.as_ref())
                .map(|(identity, certs)| (identity.trust_domain.clone(), Arc::clone(certs))),
        },
    );
    // Served before the first enrollment, which may take a while: /ready says why it is not
    // ready yet, and until the very end of shutdown, that it is draining.
    let stop_admin = CancellationToken::new();
    let kubernetes_report = Arc::new(KubernetesReport::default());
    let admin_state = Arc::new(AdminState {
        datapath: Arc::clone(&datapath),
        proxy: Arc::clone(&ctx),
        stats,
        pods: enrollment.status(),
        certs: certs.clone(),
        readiness: Arc::clone(&readiness),
        log_filter,
        graph: Arc::default(),
        kubernetes: Arc::clone(&kubernetes_report),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin_state),
        stop_admin.clone(),
        admin::routes,
    ));
    tokio::spawn(admin::serve(
        metrics_listener,
        Arc::clone(&admin_state),
        stop_admin.clone(),
        admin::metrics_routes,
    ));
    {
        let (ctx, stop) = (Arc::clone(&ctx), stop_admin.clone());
        let idle = settings.metrics_idle_expiry();
        tokio::spawn(async move { metrics::expire_series(&ctx, idle, stop).await });
    }
    {
        let (ctx, stop) = (Arc::clone(&ctx), stop_admin.clone());
        tokio::spawn(async move { admin_state.graph.sample_until(&ctx, stop).await });
    }
    let cluster = match config.kubernetes.enabled {
        true => Some(ClusterWatch::start(&config.kubernetes, &settings.node_name).await?),
        false => None,
    };
    *lock(&kubernetes_report.watches) = cluster.as_ref().map(ClusterWatch::status);
    let (cni_tx, mut cni_rx) = mpsc::channel(CNI_QUEUE);
    if let Some(cluster) = &cluster {
        let listener = cni::bind(&config.kubernetes.cni_dir)?;
        tokio::spawn(cni::serve(listener, {
            let cluster = cluster.clone();
            move |request| cni_request(cluster.clone(), cni_tx.clone(), request)
        }));
    }
    let mut desired = Desired {
        file: config,
        cluster: None,
        cni_pods: BTreeMap::new(),
        cni_deleted: BTreeSet::new(),
    };
    let mut applied = desired.file.clone();
    apply(
        &ctx,
        &mut enrollment,
        &desired,
        &startup,
        &kubernetes_report,
        &mut applied,
    )
    .await?;
    if cluster.is_none() {
        take_charge(&datapath, &enrollment, handover.as_ref());
        readiness.set_config_applied();
    }
    info!(admin = %settings.admin_addr, metrics = %settings.metrics_addr, "weft is running");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let mut renew = tokio::time::interval(RENEW_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(()) = reload_rx.recv() => {
                tokio::time::sleep(RELOAD_SETTLE).await;
                while reload_rx.try_recv().is_ok() {}
            }
            // SIGHUP: reload now (also when the watcher cannot see a change).
            _ = sighup.recv() => {}
            Some((admission, reply)) = cni_rx.recv(), if cluster.is_some() => {
                let response = cni_answer(admission, &ctx, &mut enrollment, &mut desired, &startup, &kubernetes_report, &mut applied).await;
                let _ = reply.send(response);
                continue;
            }
            () = changes(cluster.as_ref()) => {
                let Some(cluster) = &cluster else { continue };
                // One rebuild for a burst of changes (a rollout touches a pod, its slice, ...).
                tokio::time::sleep(SETTLE).await;
                if !cluster.synced() {
                    continue;
                }
                let view = derive(&cluster.objects(), &startup.agent.node_name);
                if desired.cluster.as_ref() == Some(&view) {
                    continue;
                }
                let namespaces = &view.enrolled_namespaces;
                if desired.cluster.as_ref().map(|c| &c.enrolled_namespaces) != Some(namespaces) {
                    // The CNI plugin's fallback when it cannot reach the agent.
                    if let Err(err) = cni::write_enrolled_namespaces(&startup.kubernetes.cni_dir, namespaces) {
                        error!(error = format!("{err:#}"), "cannot record the enrolled namespaces for the CNI plugin");
                    }
                }
                let first = desired.cluster.is_none();
                // A deleted sandbox's pod is remembered only while the API server lists it.
                desired.cni_deleted.retain(|uid| view.pods.iter().any(|pod| pod.uid.as_ref() == Some(uid)));
                desired.cluster = Some(view);
                match apply(&ctx, &mut enrollment, &desired, &startup, &kubernetes_report, &mut applied).await {
                    Ok(()) if first => {
                        take_charge(&datapath, &enrollment, handover.as_ref());
                        readiness.set_config_applied();
                        info!("cluster state applied");
                    }
                    Ok(()) => {}
                    Err(err) => error!(error = format!("{err:#}"), "cluster state not applied; the running state is unchanged"),
                }
                continue;
            }
            _ = retry.tick(), if enrollment.has_failures() => {
                enrollment.apply(&applied).await;
                continue;
            }
            _ = renew.tick(), if certs.is_some() => {
                if let Some(certs) = &certs {
                    certs.renew_due();
                }
                continue;
            }
        }
        let Some(path) = &config_path else { continue };
        match reload(path, node_name.as_deref(), &desired.file, &datapath) {
            Ok(Some(new)) => {
                let old = std::mem::replace(&mut desired.file, new);
                match apply(
                    &ctx,
                    &mut enrollment,
                    &desired,
                    &startup,
                    &kubernetes_report,
                    &mut applied,
                )
                .await
                {
                    Ok(()) => info!("configuration reloaded"),
                    Err(err) => {
                        desired.file = old;
                        error!(
                            error = format!("{err:#}"),
                            "config rejected; the running state is unchanged"
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(err) => error!(
                error = format!("{err:#}"),
                "config rejected; the running state is unchanged"
            ),
        }
    }

    let superseded = handover.as_ref().is_some_and(Handover::superseded);
    if superseded {
        // The new agent serves the pods from the same maps: only this agent's listeners and
        // programs go. Connections queued on the listeners move to the new agent's.
        info!(
            "shutting down after a newer agent took over: closing listeners, draining connections"
        );
        enrollment.abandon_all();
    } else {
        // Release every pod first: new connects go direct at once, while the hooks stay
        // attached long enough for connects already redirected to be established, tracked and
        // accepted.
        info!(
            "shutting down: releasing pods, then detaching eBPF programs and draining connections"
        );
        enrollment.release_all();
    }
    readiness.set_draining();
    ctx.draining.cancel();
    tokio::time::sleep(LISTENER_LINGER).await;
    datapath.detach();
    readiness.set_attached(false);
    ctx.connections.close();
    let drain = settings.drain_timeout();
    if tokio::time::timeout(drain, ctx.connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = ctx.connections.len(),
            grace_ms = drain.as_millis() as u64,
            "closing connections still open after the drain period"
        );
        // Reset them rather than end them cleanly: a cut stream must not look complete.
        ctx.abort.cancel();
        let _ = tokio::time::timeout(ABORT_GRACE, ctx.connections.wait()).await;
    }
    stop_admin.cancel();
    if let Some(handover) = handover.as_ref().filter(|_| !superseded) {
        handover.release();
    }
    info!("stopped");
    Ok(())
}

/// Once every pod is served: forgets enrolled namespaces this agent does not serve (left in the
/// pinned maps by an agent that was killed, or by the one it replaces), and takes charge so the
/// agent it replaces, if any, stops without touching the shared state.
fn take_charge(datapath: &Datapath, enrollment: &Enrollment, handover: Option<&Handover>) {
    let Some(handover) = handover else { return };
    match datapath.retain_enrolled(&enrollment.cookies()) {
        Ok(0) => {}
        Ok(stale) => info!(
            stale,
            "removed enrolled namespaces no agent serves any more"
        ),
        Err(err) => warn!(
            error = format!("{err:#}"),
            "cannot clean the enrolled namespaces"
        ),
    }
    if let Err(err) = handover.take_charge() {
        error!(
            error = format!("{err:#}"),
            "cannot record this agent as in charge; an agent stopping now would release the pods"
        );
    }
}

/// What the agent is asked to run: the config file's entries, the cluster's (once its first lists
/// are in), and the pods the CNI plugin enrolled before the API server had their address.
struct Desired {
    file: Config,
    cluster: Option<ClusterConfig>,
    cni_pods: BTreeMap<String, PodSpec>,
    /// UIDs of pods whose sandbox the CNI plugin saw deleted: not enrolled again (by UID) while
    /// the API server still lists them, until a new ADD.
    cni_deleted: BTreeSet<String>,
}

impl Desired {
    /// The config in force, and the cluster's objects left out of it.
    fn in_force(&self, startup: &Config) -> Result<(Config, Vec<Skipped>)> {
        let (merged, skipped) = match &self.cluster {
            Some(cluster) => merge(&self.file, cluster, &self.cni_pods, &self.cni_deleted),
            None => (self.file.clone(), Vec::new()),
        };
        let merged = in_force(&merged, startup);
        merged
            .validate()
            .context("the config file merged with the cluster's objects is invalid")?;
        Ok((merged, skipped))
    }
}

/// Replaces the mesh state and brings enrollment in line with `desired`; on error nothing
/// changes.
async fn apply(
    ctx: &ProxyContext,
    enrollment: &mut Enrollment,
    desired: &Desired,
    startup: &Config,
    report: &KubernetesReport,
    applied: &mut Config,
) -> Result<()> {
    let (config, skipped) = desired.in_force(startup)?;
    // Pods that leave are released before the state forgets them, so a connection still steered
    // to one meanwhile is served as that pod's rather than reset as nobody's.
    enrollment.release_absent(&config);
    let previous = ctx.state.get();
    ctx.state.replace(MeshState::from_config(
        &config,
        &previous.services,
        &ctx.stats,
    ));
    enrollment.apply(&config).await;
    *lock(&report.skipped) = skipped;
    *applied = config;
    Ok(())
}

/// Pending CNI requests; the plugin waits (and pod start-up with it) while they queue.
const CNI_QUEUE: usize = 64;

type CniReply = oneshot::Sender<CniResponse>;

/// Decides on a CNI plugin's request and, when it needs enrolling or releasing, has the agent
/// loop do it and waits for the outcome.
async fn cni_request(
    cluster: ClusterWatch,
    agent: mpsc::Sender<(Admission, CniReply)>,
    request: CniRequest,
) -> CniResponse {
    let admission = admit(&cluster, &request).await;
    if let Admission::Answer(response) = admission {
        return response;
    }
    let (reply, answer) = oneshot::channel();
    let stopping = || CniResponse::Error {
        error: "the agent is shutting down; try again".to_owned(),
    };
    if agent.send((admission, reply)).await.is_err() {
        return stopping();
    }
    answer.await.unwrap_or_else(|_| stopping())
}

/// Carries out an admission in the agent loop.
async fn cni_answer(
    admission: Admission,
    ctx: &ProxyContext,
    enrollment: &mut Enrollment,
    desired: &mut Desired,
    startup: &Config,
    report: &KubernetesReport,
    applied: &mut Config,
) -> CniResponse {
    let id = match admission {
        Admission::Answer(response) => return response,
        Admission::Release { uid } => {
            let known = desired.cni_pods.remove(&uid).is_some();
            let listed = desired.cluster.as_ref().is_some_and(|cluster| {
                cluster
                    .pods
                    .iter()
                    .any(|pod| pod.uid.as_ref() == Some(&uid))
            });
            if listed {
                desired.cni_deleted.insert(uid);
            }
            if known || listed {
                if let Err(err) = apply(ctx, enrollment, desired, startup, report, applied).await {
                    error!(
                        error = format!("{err:#}"),
                        "releasing a pod for the CNI plugin"
                    );
                }
            }
            return CniResponse::NotMeshed {
                reason: "released".to_owned(),
            };
        }
        Admission::Check(id) => id,
        Admission::Enroll(spec) => {
            let id = spec.id();
            let uid = spec.uid.clone().unwrap_or_default();
            desired.cni_deleted.remove(&uid);
            desired.cni_pods.insert(uid, spec);
            if let Err(err) = apply(ctx, enrollment, desired, startup, report, applied).await {
                return CniResponse::Error {
                    error: format!("{err:#}"),
                };
            }
            id
        }
    };
    match lock(&enrollment.status()).get(&id) {
        Some(PodStatus::Enrolled { .. }) => CniResponse::Enrolled,
        Some(PodStatus::Failed { error, .. }) => CniResponse::Error {
            error: error.clone(),
        },
        None => {
            let object = format!("Pod {id}");
            let reason = lock(&report.skipped)
                .iter()
                .find(|s| s.object == object)
                .map_or_else(
                    || "not in the agent's state".to_owned(),
                    |s| s.reason.clone(),
                );
            CniResponse::Error {
                error: format!("pod {id} is not enrolled: {reason}"),
            }
        }
    }
}

/// The cluster's next change; never, without Kubernetes.
async fn changes(cluster: Option<&ClusterWatch>) {
    match cluster {
        Some(cluster) => cluster.changes().await,
        None => std::future::pending().await,
    }
}

/// The config file (or the embedded default), with this node's name from the command line or
/// environment when given (a DaemonSet's pods learn it from the downward API).
fn load(path: Option<&Path>, node_name: Option<&str>) -> Result<Config> {
    let mut config = match path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default()?,
    };
    if let Some(node_name) = node_name {
        config.agent.node_name = node_name.to_owned();
        config
            .validate()
            .context("the node name given on the command line")?;
    }
    Ok(config)
}

/// Loads `path` and, if it differs from `running`, applies its exclusions. Returns the new config
/// for enrollment, `None` when nothing changed, or an error when it is rejected (nothing applied).
fn reload(
    path: &Path,
    node_name: Option<&str>,
    running: &Config,
    datapath: &Datapath,
) -> Result<Option<Config>> {
    let new = load(Some(path), node_name)?;
    if &new == running {
        return Ok(None);
    }
    let (old, next) = (&running.agent, &new.agent);
    if let Err(err) = datapath.set_exclusions(&next.exclude_ports, &next.exclude_cidrs) {
        // Put back what was there so a half-applied set does not linger.
        datapath.set_exclusions(&old.exclude_ports, &old.exclude_cidrs)?;
        return Err(err);
    }
    let restart_only = AgentSettings {
        exclude_ports: old.exclude_ports.clone(),
        exclude_cidrs: old.exclude_cidrs.clone(),
        ..next.clone()
    };
    if &restart_only != old || new.identity != running.identity {
        warn!("agent or identity settings other than exclusions changed; they take effect when weft restarts");
    }
    Ok(Some(new))
}

/// `new` with the identity settings and node name of `startup`: those change only on restart
/// (the certificates, listeners and capture were built from them), so a reload must not judge
/// workloads by a trust domain or node the running agent does not have.
fn in_force(new: &Config, startup: &Config) -> Config {
    let mut effective = new.clone();
    effective.identity = startup.identity.clone();
    effective.agent.node_name = startup.agent.node_name.clone();
    effective
}

/// Loads the mesh CA; a missing, malformed, expired or non-CA file stops start-up.
fn load_identities(identity: &IdentitySettings) -> Result<Arc<CertificateStore>> {
    let ca = MeshCa::load(&identity.ca_cert, &identity.ca_key).context("loading the mesh CA")?;
    info!(trust_domain = %identity.trust_domain, ca = %identity.ca_cert.display(), lifetime_s = identity.cert_lifetime_s, "workload identities enabled");
    Ok(Arc::new(CertificateStore::new(
        ca,
        identity.cert_lifetime(),
        identity.renew_fraction,
    )))
}

/// Each proxied connection holds two descriptors; the usual soft limit of 1024 is far too low.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!("could not raise the open-file limit; busy nodes may run out of descriptors");
            }
        }
    }
}

/// Watches the config file's directory: editors replace files by renaming, and Kubernetes
/// ConfigMap volumes swap a `..data` symlink, so an update may only show as an event on a `..`
/// entry. Unchanged content reloads as a no-op.
fn watch_config(
    path: &Path,
    reload: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let config_name = path.file_name().map(ToOwned::to_owned);
    let concerns_config = move |changed: &PathBuf| {
        let name = changed.file_name();
        name == config_name.as_deref()
            || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access() && e.paths.iter().any(&concerns_config)) {
            let _ = reload.send(());
        }
    })
    .context("creating the config file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch the config file's directory {}", dir.display()))?;
    Ok(watcher)
}
