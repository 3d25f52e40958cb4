//! Kubernetes as a source of the mesh: `model` turns API objects into the config file's terms,
//! `watch` keeps them current with kube-rs watchers and reflectors.
pub mod cni_admission;
pub mod model;
pub mod watch;

use std::sync::Mutex;

use serde::Serialize;

/// What `/config_dump` shows of the Kubernetes source.
#[derive(Default)]
pub struct KubernetesReport {
    /// `None` without Kubernetes.
    pub watches: Mutex<Option<watch::WatchStatusTable>>,
    pub skipped: Mutex<Vec<model::Skipped>>,
}

#[derive(Serialize)]
pub struct KubernetesDump {
    pub watches: std::collections::BTreeMap<&'static str, watch::WatchStatus>,
    /// Cluster objects the agent does not use, and why.
    pub skipped: Vec<model::Skipped>,
}

impl KubernetesReport {
    pub fn dump(&self) -> Option<KubernetesDump> {
        let watches = crate::lock(&self.watches)
            .as_ref()
            .map(|w| crate::lock(w).clone())?;
        Some(KubernetesDump {
            watches,
            skipped: crate::lock(&self.skipped).clone(),
        })
    }
}
