//! Upgrading the agent without losing a connection. The new agent starts while the old one still
//! runs (a DaemonSet surge): it opens the same pinned eBPF maps, so a connect redirected by
//! either agent's programs is found by both, and joins the old agent's listeners inside each pod
//! (SO_REUSEPORT). Once ready it records itself as the agent in charge. The old agent, told to
//! stop, sees that, leaves the shared maps alone and closes its listeners; the kernel moves
//! connections still queued on them to the new agent's (`tcp_migrate_req`), and it drains the
//! connections it holds.
use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{config::HandoverSettings, datapath};

const OWNER_FILE: &str = "agent.pid";

pub struct Handover {
    pin_dir: PathBuf,
    owner_file: PathBuf,
}

impl Handover {
    pub fn new(settings: &HandoverSettings) -> Self {
        Self {
            pin_dir: datapath::pin_dir(&settings.bpf_pin_dir),
            owner_file: settings.state_dir.join(OWNER_FILE),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Records this process as the agent in charge (once it serves every pod).
    pub fn take_charge(&self) -> Result<()> {
        if let Some(dir) = self.owner_file.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let previous = self.owner();
        let tmp = self.owner_file.with_extension("pid.tmp");
        fs::write(&tmp, std::process::id().to_string())
            .and_then(|()| fs::rename(&tmp, &self.owner_file))
            .with_context(|| format!("writing {}", self.owner_file.display()))?;
        match previous.filter(|pid| *pid != std::process::id() && alive(*pid)) {
            Some(pid) => info!(
                previous_agent = pid,
                "took over from the running agent; it may now stop"
            ),
            None => info!(owner_file = %self.owner_file.display(), "in charge of the node"),
        }
        Ok(())
    }

    /// True when another agent, still running, has taken charge since this one did.
    pub fn superseded(&self) -> bool {
        self.owner()
            .is_some_and(|pid| pid != std::process::id() && alive(pid))
    }

    /// The last agent stopping: the next one starts from fresh maps.
    pub fn release(&self) {
        if let Err(err) = datapath::unpin_maps(&self.pin_dir) {
            warn!(error = format!("{err:#}"), "cannot unpin the eBPF maps");
        }
        match fs::remove_file(&self.owner_file) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => {
                warn!(error = %err, file = %self.owner_file.display(), "cannot remove the owner file")
            }
        }
    }

    fn owner(&self) -> Option<u32> {
        fs::read_to_string(&self.owner_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence (and permission, which root has).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
