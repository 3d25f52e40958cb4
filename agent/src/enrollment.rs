//! Turns the desired set of pods into enrolled ones: a listener inside each pod's netns plus its
//! cookie in the eBPF enrollment map. Changes apply to a pod's next connection; nothing restarts.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{Config, PodId, PodSpec},
    lock,
    netns::PodNetns,
    proxy::{run_outbound, PodProxy, ProxyContext},
};

/// What the admin endpoint reports per configured pod.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PodStatus {
    Enrolled { netns: String, netns_cookie: u64 },
    Failed { netns: String, error: String },
}

pub type PodStatusTable = Arc<Mutex<BTreeMap<PodId, PodStatus>>>;

struct EnrolledPod {
    spec: PodSpec,
    cookie: u64,
    stop_accepting: CancellationToken,
}

impl EnrolledPod {
    fn status(&self) -> PodStatus {
        PodStatus::Enrolled {
            netns: self.spec.netns.display().to_string(),
            netns_cookie: self.cookie,
        }
    }
}

pub struct Enrollment {
    ctx: Arc<ProxyContext>,
    outbound_port: u16,
    enrolled: BTreeMap<PodId, EnrolledPod>,
    status: PodStatusTable,
}

impl Enrollment {
    pub fn new(ctx: Arc<ProxyContext>, outbound_port: u16) -> Self {
        Self {
            ctx,
            outbound_port,
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

    /// Brings the enrolled pods in line with `config`. A pod that fails is reported and skipped;
    /// every other pod is still applied.
    pub async fn apply(&mut self, config: &Config) {
        let desired: BTreeMap<PodId, &PodSpec> = config.pods.iter().map(|p| (p.id(), p)).collect();
        let gone: Vec<PodId> = self
            .enrolled
            .iter()
            .filter(|(id, pod)| desired.get(*id) != Some(&&pod.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.unenroll(&id);
        }
        let still_enrolled = &self.enrolled;
        lock(&self.status)
            .retain(|id, _| desired.contains_key(id) || still_enrolled.contains_key(id));
        for (id, spec) in desired {
            if let Some(pod) = self.enrolled.get(&id) {
                // Already serving this spec (say, a failed release it is wanted back from): report
                // it as enrolled. A pod still holding an older spec keeps its failed release status.
                if &pod.spec == spec {
                    lock(&self.status).insert(id, pod.status());
                }
                continue;
            }
            let status = match self.enroll(spec).await {
                Ok(status) => status,
                Err(err) => {
                    error!(pod = %id, error = format!("{err:#}"), "cannot enroll pod; will retry");
                    PodStatus::Failed {
                        netns: spec.netns.display().to_string(),
                        error: format!("{err:#}"),
                    }
                }
            };
            lock(&self.status).insert(id, status);
        }
    }

    async fn enroll(&mut self, spec: &PodSpec) -> Result<PodStatus> {
        let id = spec.id();
        let netns = PodNetns::enter(&spec.netns, format!("netns-{}", spec.name))?;
        let cookie = netns.cookie();
        if let Some((other, _)) = self.enrolled.iter().find(|(_, pod)| pod.cookie == cookie) {
            bail!(
                "netns {} is the same namespace as pod {other}'s",
                spec.netns.display()
            );
        }
        let listen_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port));
        let listener = netns.listen(listen_addr).await.with_context(|| {
            format!("opening the outbound listener {listen_addr} inside the pod")
        })?;
        let stop_accepting = CancellationToken::new();
        let proxy = Arc::new(PodProxy {
            id: id.clone(),
            netns,
        });
        tokio::spawn(run_outbound(
            listener,
            proxy,
            Arc::clone(&self.ctx),
            stop_accepting.clone(),
        ));
        // The listener exists before the pod is marked enrolled, so no redirected connect is refused.
        if let Err(err) = self.ctx.datapath.enroll(cookie) {
            stop_accepting.cancel();
            return Err(err);
        }
        let pod = EnrolledPod {
            spec: spec.clone(),
            cookie,
            stop_accepting,
        };
        let status = pod.status();
        info!(pod = %id, netns = %spec.netns.display(), netns_cookie = cookie, "pod enrolled");
        self.enrolled.insert(id, pod);
        Ok(status)
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
            let netns = pod.spec.netns.display().to_string();
            lock(&self.status).insert(id.clone(), PodStatus::Failed { netns, error });
            return;
        }
        if let Some(pod) = self.enrolled.remove(id) {
            close_listener_after_linger(pod.stop_accepting);
        }
        lock(&self.status).remove(id);
        info!(pod = %id, "pod released");
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

fn close_listener_after_linger(stop_accepting: CancellationToken) {
    tokio::spawn(async move {
        tokio::time::sleep(LISTENER_LINGER).await;
        stop_accepting.cancel();
    });
}
