//! Turns the desired set of pods into enrolled ones: an outbound listener inside each pod's netns
//! plus its cookie in the eBPF enrollment map, and, with identities, the pod's tunnel listener
//! and its inbound capture. Changes apply to a pod's next connection; nothing restarts.
use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{Config, PodId, PodSpec},
    datapath::InboundCapture,
    identity::{CertificateStore, Identity},
    inbound::{serve_steered, serve_tunnel},
    lock,
    netns::PodNetns,
    podns::{self, FoundNetns, PodUid, ProcIndex},
    proxy::{accept_until_stopped, serve_outbound, PodProxy, ProxyContext},
    stats::Peer,
};

/// What the admin endpoint reports per configured pod.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PodStatus {
    Enrolled {
        netns: String,
        netns_cookie: u64,
        /// The pod's cgroup, for pods found by UID.
        #[serde(skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    Failed {
        netns: String,
        /// A short class for metrics: `netns_not_found`, `release_failed` or `enroll_failed`.
        reason: &'static str,
        error: String,
    },
}

pub type PodStatusTable = Arc<Mutex<BTreeMap<PodId, PodStatus>>>;

struct EnrolledPod {
    spec: PodSpec,
    /// The path the network namespace was opened from (given, or found by pod UID).
    netns: PathBuf,
    cookie: u64,
    cgroup: Option<String>,
    identity: Option<Identity>,
    inbound: Option<InboundCapture>,
    stop_accepting: CancellationToken,
}

/// Where a pod's network namespace is opened from.
enum NetnsPath {
    /// The config (or the CNI plugin) named it.
    Given(PathBuf),
    /// Found among the node's processes by pod UID.
    Found(FoundNetns),
}

/// Ports and identities of the listeners each pod gets.
pub struct EnrollmentSettings {
    pub outbound_port: u16,
    pub tunnel_port: u16,
    pub plaintext_port: u16,
    pub delivery_mark: u32,
    /// The node's /proc, where pods given by UID are found.
    pub proc_root: PathBuf,
    /// Present when identities are configured: pods then get tunnels and inbound capture.
    pub identities: Option<(String, Arc<CertificateStore>)>,
}

/// Whether two specs of a pod need different listeners. Inbound mode and labels are read from
/// the live mesh state on every connection, so changing them does not re-enroll the pod.
fn same_enrollment(a: &PodSpec, b: &PodSpec) -> bool {
    (
        &a.name,
        &a.namespace,
        &a.netns,
        &a.uid,
        a.ip,
        &a.service_account,
    ) == (
        &b.name,
        &b.namespace,
        &b.netns,
        &b.uid,
        b.ip,
        &b.service_account,
    )
}

impl EnrolledPod {
    fn status(&self) -> PodStatus {
        PodStatus::Enrolled {
            netns: self.netns.display().to_string(),
            netns_cookie: self.cookie,
            cgroup: self.cgroup.clone(),
        }
    }
}

pub struct Enrollment {
    ctx: Arc<ProxyContext>,
    settings: EnrollmentSettings,
    enrolled: BTreeMap<PodId, EnrolledPod>,
    status: PodStatusTable,
}

impl Enrollment {
    pub fn new(ctx: Arc<ProxyContext>, settings: EnrollmentSettings) -> Self {
        Self {
            ctx,
            settings,
            enrolled: BTreeMap::new(),
            status: PodStatusTable::default(),
        }
    }

    pub fn status(&self) -> PodStatusTable {
        Arc::clone(&self.status)
    }

    /// True when some configured pod could not be enrolled (worth retrying later).
    pub fn has_failures(&self) -> bool {
        lock(&self.status)
            .values()
            .any(|s| matches!(s, PodStatus::Failed { .. }))
    }

    /// Releases the enrolled pods `config` no longer has (or has with other listeners).
    pub fn release_absent(&mut self, config: &Config) {
        let desired: BTreeMap<PodId, &PodSpec> = config.pods.iter().map(|p| (p.id(), p)).collect();
        let gone: Vec<PodId> = self
            .enrolled
            .iter()
            .filter(|(id, pod)| {
                !desired
                    .get(*id)
                    .is_some_and(|spec| same_enrollment(spec, &pod.spec))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.unenroll(&id);
        }
    }

    /// Brings the enrolled pods in line with `config`. A pod that fails is reported and skipped;
    /// every other pod is still applied.
    pub async fn apply(&mut self, config: &Config) {
        self.release_absent(config);
        let desired: BTreeMap<PodId, &PodSpec> = config.pods.iter().map(|p| (p.id(), p)).collect();
        let still_enrolled = &self.enrolled;
        lock(&self.status)
            .retain(|id, _| desired.contains_key(id) || still_enrolled.contains_key(id));
        let mut procs = None;
        for (id, spec) in desired {
            if let Some(pod) = self.enrolled.get(&id) {
                // Already serving this spec (say, a failed release it is wanted back from): report
                // it as enrolled. A pod still holding an older spec keeps its failed release status.
                if same_enrollment(&pod.spec, spec) {
                    lock(&self.status).insert(id, pod.status());
                }
                continue;
            }
            let status = match self.enroll(spec, &mut procs).await {
                Ok(status) => status,
                Err(err) => {
                    error!(pod = %id, error = format!("{err:#}"), "cannot enroll pod; will retry");
                    PodStatus::Failed {
                        netns: spec.netns_source(),
                        reason: match err.downcast_ref::<crate::podns::Error>() {
                            Some(_) => "netns_not_found",
                            None => "enroll_failed",
                        },
                        error: format!("{err:#}"),
                    }
                }
            };
            lock(&self.status).insert(id, status);
        }
        if let Some((_, certs)) = &self.settings.identities {
            // Certificates of identities that left the node go with them.
            let held: HashSet<Identity> = self
                .enrolled
                .values()
                .filter_map(|pod| pod.identity.clone())
                .collect();
            certs.retain(&held);
            if let Some(tunnels) = &self.ctx.tunnels {
                tunnels.retain_sources(&held);
            }
        }
        // Pooled HTTP connections to endpoints that no service has any more are closed.
        let endpoints = self.ctx.state.get().services.endpoint_addresses();
        for pod in crate::read(&self.ctx.local_pods).values() {
            pod.http.retain(&endpoints);
        }
    }

    /// The pod's netns path: the one given, or the one its processes are in, found by pod UID in
    /// a scan of the node's processes made once per pass, and only if some pod needs it.
    fn netns_path(&self, spec: &PodSpec, procs: &mut Option<ProcIndex>) -> Result<NetnsPath> {
        if let Some(path) = &spec.netns {
            return Ok(NetnsPath::Given(path.clone()));
        }
        let Some(uid) = &spec.uid else {
            bail!("the pod has neither netns nor uid");
        };
        let uid: PodUid = uid.parse()?;
        let index = match procs {
            Some(index) => index,
            None => procs.insert(ProcIndex::scan(
                &self.settings.proc_root,
                Path::new(podns::OWN_NETNS),
            )?),
        };
        Ok(NetnsPath::Found(index.netns_of(&uid)?))
    }

    async fn enroll(&mut self, spec: &PodSpec, procs: &mut Option<ProcIndex>) -> Result<PodStatus> {
        let id = spec.id();
        let (netns_path, expected_inode, cgroup) = match self.netns_path(spec, procs)? {
            NetnsPath::Given(path) => (path, None, None),
            NetnsPath::Found(FoundNetns {
                path,
                inode,
                cgroup,
                ..
            }) => (path, Some(inode), Some(cgroup)),
        };
        let netns = PodNetns::enter(&netns_path, format!("netns-{}", spec.name))?;
        // The process found by the scan may have exited and its PID been reused since.
        if let Some(expected) = expected_inode {
            let inode = netns.file().metadata().map(|m| m.ino()).unwrap_or(0);
            if inode != expected {
                bail!(
                    "the pod's process left {} before it was opened; will look again",
                    netns_path.display()
                );
            }
        }
        // An agent taking over later joins these listeners; when this one then closes them, the
        // connections still queued move to the new agent's instead of being reset.
        if let Err(err) = netns
            .enable_request_migration(&self.settings.proc_root)
            .await
        {
            warn!(pod = %id, error = %err, "cannot enable tcp_migrate_req in the pod; an agent upgrade may reset connections queued at that moment");
        }
        let cookie = netns.cookie();
        if let Some((other, _)) = self.enrolled.iter().find(|(_, pod)| pod.cookie == cookie) {
            bail!(
                "netns {} is the same namespace as pod {other}'s",
                netns_path.display()
            );
        }
        let settings = &self.settings;
        let listen_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, settings.outbound_port));
        let outbound = netns.listen(listen_addr).await.with_context(|| {
            format!("opening the outbound listener {listen_addr} inside the pod")
        })?;
        let identity = settings.identities.as_ref().map(|(trust_domain, _)| {
            Identity::new(trust_domain, &spec.namespace, &spec.service_account)
        });
        let transparent_delivery = match &identity {
            Some(_) => match netns
                .route_marked_replies_locally(settings.delivery_mark, &settings.proc_root)
                .await
            {
                Ok(()) => true,
                Err(err) => {
                    warn!(pod = %id, error = %err, "cannot route delivery replies inside the pod; apps will see the pod's own address as source");
                    false
                }
            },
            None => false,
        };
        let inbound_listeners = match (&identity, &settings.identities) {
            (Some(identity), Some((_, certs))) => {
                let tunnel_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.tunnel_port));
                let tunnel = netns.listen(tunnel_addr).await.with_context(|| {
                    format!("opening the tunnel listener {tunnel_addr} inside the pod")
                })?;
                let plaintext_addr =
                    SocketAddr::from((Ipv4Addr::LOCALHOST, settings.plaintext_port));
                let plaintext = netns.listen(plaintext_addr).await.with_context(|| {
                    format!(
                        "opening the plaintext inbound listener {plaintext_addr} inside the pod"
                    )
                })?;
                let tls = TlsAcceptor::from(certs.server_config(identity)?);
                Some((tunnel, tls, plaintext))
            }
            _ => None,
        };
        let proxy = Arc::new(PodProxy {
            peer: Peer::new(
                spec.workload_name(),
                &spec.namespace,
                identity.as_ref().map(Identity::to_string),
            ),
            id: id.clone(),
            ip: spec.ip,
            netns,
            identity: identity.clone(),
            transparent_delivery,
            http: Default::default(),
        });
        let stop_accepting = CancellationToken::new();
        let ctx = &self.ctx;
        tokio::spawn(accept_until_stopped(
            outbound,
            Arc::clone(&proxy),
            Arc::clone(ctx),
            stop_accepting.clone(),
            "outbound",
            serve_outbound,
        ));
        let mut inbound = None;
        if let Some((tunnel, tls, plaintext)) = inbound_listeners {
            let capture = ctx
                .datapath
                .capture_inbound(proxy.netns.file(), spec.ip, &plaintext);
            let capture = match capture {
                Ok(capture) => capture,
                Err(err) => {
                    stop_accepting.cancel();
                    return Err(err);
                }
            };
            inbound = Some(capture);
            tokio::spawn(accept_until_stopped(
                tunnel,
                Arc::clone(&proxy),
                Arc::clone(ctx),
                stop_accepting.clone(),
                "tunnel",
                move |ctx, pod, stream, peer| serve_tunnel(ctx, pod, tls.clone(), stream, peer),
            ));
            tokio::spawn(accept_until_stopped(
                plaintext,
                Arc::clone(&proxy),
                Arc::clone(ctx),
                stop_accepting.clone(),
                "plaintext",
                serve_steered,
            ));
            crate::write(&ctx.local_pods).insert(spec.ip, Arc::clone(&proxy));
        }
        // The listener exists before the pod is marked enrolled, so no redirected connect is refused.
        if let Err(err) = ctx.datapath.enroll(cookie) {
            self.release_inbound(spec.ip, inbound);
            stop_accepting.cancel();
            return Err(err);
        }
        let pod = EnrolledPod {
            spec: spec.clone(),
            netns: netns_path,
            cookie,
            cgroup,
            identity,
            inbound,
            stop_accepting,
        };
        let status = pod.status();
        info!(pod = %id, netns = %pod.netns.display(), netns_cookie = cookie, ip = %spec.ip, identity = ?pod.identity.as_ref().map(ToString::to_string), "pod enrolled");
        self.enrolled.insert(id, pod);
        Ok(status)
    }

    /// Stops steering the pod's inbound connections to the agent and forgets it as a delivery
    /// target, which it returns. A failure is logged: the capture goes at the latest with the
    /// agent.
    fn release_inbound(
        &self,
        ip: Ipv4Addr,
        capture: Option<InboundCapture>,
    ) -> Option<Arc<PodProxy>> {
        let proxy = crate::write(&self.ctx.local_pods).remove(&ip);
        if let Some(capture) = capture {
            if let Err(err) = self.ctx.datapath.release_inbound(capture) {
                error!(%ip, error = format!("{err:#}"), "cannot release inbound capture");
            }
        }
        proxy
    }

    /// Releases capture first so the pod's next connect goes direct, then closes the listener
    /// after a linger. Connections already proxied keep running until they end. If the map entry
    /// cannot be removed the listener stays, so captured connects still find it, and the release
    /// is retried.
    fn unenroll(&mut self, id: &PodId) {
        let Some(pod) = self.enrolled.get(id) else {
            return;
        };
        if let Err(err) = self.ctx.datapath.unenroll(pod.cookie) {
            let error = format!("cannot release the pod (will retry): {err:#}");
            warn!(pod = %id, error, "pod still enrolled");
            let netns = pod.netns.display().to_string();
            lock(&self.status).insert(
                id.clone(),
                PodStatus::Failed {
                    netns,
                    reason: "release_failed",
                    error,
                },
            );
            return;
        }
        if let Some(pod) = self.enrolled.remove(id) {
            let ip = pod.spec.ip;
            let proxy = self.release_inbound(ip, pod.inbound);
            // Called before the state forgets the pod, so its workload is still there to keep.
            let workload = self.ctx.state.get().local_workload(ip).cloned();
            let leaving = proxy.zip(workload);
            if let Some(leaving) = &leaving {
                crate::write(&self.ctx.leaving).insert(ip, leaving.clone());
            }
            close_listener_after_linger(
                pod.stop_accepting,
                leaving.map(|(proxy, _)| (ip, proxy)),
                Arc::clone(&self.ctx),
            );
        }
        lock(&self.status).remove(id);
        info!(pod = %id, "pod released");
    }

    /// The enrolled pods' network-namespace cookies.
    pub fn cookies(&self) -> HashSet<u64> {
        self.enrolled.values().map(|pod| pod.cookie).collect()
    }

    /// Stops accepting on every pod's listeners and leaves the eBPF maps as they are: the agent
    /// that took over serves the pods from them (see `handover`).
    pub fn abandon_all(&mut self) {
        for (_, pod) in std::mem::take(&mut self.enrolled) {
            pod.stop_accepting.cancel();
        }
    }

    /// Releases every pod (shutdown).
    pub fn release_all(&mut self) {
        let ids: Vec<PodId> = self.enrolled.keys().cloned().collect();
        for id in ids {
            self.unenroll(&id);
        }
    }
}

/// Connects redirected just before a pod left the enrollment map may still sit in its listener's
/// accept queue; closing the listener at once would reset them, so it keeps accepting briefly.
pub const LISTENER_LINGER: Duration = Duration::from_millis(250);

fn close_listener_after_linger(
    stop_accepting: CancellationToken,
    leaving: Option<(Ipv4Addr, Arc<PodProxy>)>,
    ctx: Arc<ProxyContext>,
) {
    tokio::spawn(async move {
        tokio::time::sleep(LISTENER_LINGER).await;
        stop_accepting.cancel();
        if let Some((ip, proxy)) = leaving {
            // Unless a pod enrolled at the same address has left since.
            let mut pods = crate::write(&ctx.leaving);
            if pods
                .get(&ip)
                .is_some_and(|(left, _)| Arc::ptr_eq(left, &proxy))
            {
                pods.remove(&ip);
            }
        }
    });
}
