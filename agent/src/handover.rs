//! Upgrading the agent without losing a connection. The new agent starts while the old one still
//! runs (a DaemonSet surge): it opens the same pinned eBPF maps, so a connect redirected by
//! either agent's programs is found by both, and joins the old agent's listeners inside each pod
//! (SO_REUSEPORT). Once ready it records itself as the agent in charge. The old agent, told to
//! stop, sees that, leaves the shared maps alone and closes its listeners; the kernel moves
//! connections still queued on them to the new agent's (`tcp_migrate_req`), and it drains the
//! connections it holds.
//!
//! Readiness follows the hand-over, because during the surge both agents answer the kubelet's
//! probes on the shared admin port: from the moment the new agent announces itself until it takes
//! charge neither reports ready (so the new pod cannot be declared ready by the old agent, and the
//! old one removed before the new one serves), and afterwards only the agent in charge does.
use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{config::HandoverSettings, datapath};

const OWNER_FILE: &str = "agent.pid";
/// The agent starting to take over, until it does.
const SUCCESSOR_FILE: &str = "successor.pid";

#[derive(Clone, Debug)]
pub struct Handover {
    pin_dir: PathBuf,
    owner_file: PathBuf,
    successor_file: PathBuf,
}

impl Handover {
    pub fn new(settings: &HandoverSettings) -> Self {
        Self {
            pin_dir: datapath::pin_dir(&settings.bpf_pin_dir),
            owner_file: settings.state_dir.join(OWNER_FILE),
            successor_file: settings.state_dir.join(SUCCESSOR_FILE),
        }
    }

    /// Tells the agent in charge, if any, that this one is starting to replace it.
    pub fn announce(&self) -> Result<()> {
        write_pid(&self.successor_file, std::process::id())
    }

    /// Why this agent must not report ready, if it must not: another agent is in charge, or one
    /// is starting to take over from this one.
    pub fn not_in_charge(&self) -> Option<String> {
        let me = std::process::id();
        match read_pid(&self.owner_file) {
            Some(owner) if owner == me => read_pid(&self.successor_file)
                .filter(|pid| *pid != me && alive(*pid))
                .map(|pid| format!("agent {pid} is taking over")),
            Some(owner) if alive(owner) => Some(format!("agent {owner} is in charge")),
            _ => Some("not in charge yet".to_owned()),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Records this process as the agent in charge (once it serves every pod).
    pub fn take_charge(&self) -> Result<()> {
        let previous = read_pid(&self.owner_file);
        write_pid(&self.owner_file, std::process::id())?;
        if read_pid(&self.successor_file) == Some(std::process::id()) {
            remove_if_present(&self.successor_file);
        }
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
        read_pid(&self.owner_file).is_some_and(|pid| pid != std::process::id() && alive(pid))
    }

    /// The last agent stopping: the next one starts from fresh maps.
    pub fn release(&self) {
        if let Err(err) = datapath::unpin_maps(&self.pin_dir) {
            warn!(error = format!("{err:#}"), "cannot unpin the eBPF maps");
        }
        remove_if_present(&self.owner_file);
    }
}

fn write_pid(path: &Path, pid: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Renamed into place: a reader never sees a half-written number.
    let tmp = path.with_extension("pid.tmp");
    fs::write(&tmp, pid.to_string())
        .and_then(|()| fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn remove_if_present(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => warn!(error = %err, file = %path.display(), "cannot remove the file"),
    }
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence (and permission, which root has).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;

    /// PID 1 is always alive and never this test; PIDs above i32::MAX never are.
    const OTHER_LIVE_AGENT: u32 = 1;
    const GONE_AGENT: u32 = u32::MAX;

    fn handover(dir: &TempDir) -> Handover {
        Handover::new(&HandoverSettings {
            bpf_pin_dir: dir.path().join("bpf"),
            state_dir: dir.path().join("state"),
        })
    }

    #[test]
    fn only_the_agent_in_charge_with_no_successor_starting_may_be_ready() {
        let dir = TempDir::new().unwrap();
        let me = handover(&dir);
        assert_eq!(me.not_in_charge().as_deref(), Some("not in charge yet"));

        me.take_charge().unwrap();
        assert_eq!(me.not_in_charge(), None);

        write_pid(&me.successor_file, GONE_AGENT).unwrap();
        assert_eq!(
            me.not_in_charge(),
            None,
            "a successor that died changes nothing"
        );
        write_pid(&me.successor_file, OTHER_LIVE_AGENT).unwrap();
        assert_eq!(
            me.not_in_charge().as_deref(),
            Some("agent 1 is taking over")
        );

        write_pid(&me.owner_file, OTHER_LIVE_AGENT).unwrap();
        assert_eq!(me.not_in_charge().as_deref(), Some("agent 1 is in charge"));
        assert!(me.superseded());
    }

    #[test]
    fn a_successor_is_not_ready_until_it_takes_charge_and_then_clears_its_announcement() {
        let dir = TempDir::new().unwrap();
        let me = handover(&dir);
        write_pid(&me.owner_file, OTHER_LIVE_AGENT).unwrap();
        me.announce().unwrap();
        assert_eq!(read_pid(&me.successor_file), Some(std::process::id()));
        assert_eq!(me.not_in_charge().as_deref(), Some("agent 1 is in charge"));

        me.take_charge().unwrap();
        assert_eq!(read_pid(&me.owner_file), Some(std::process::id()));
        assert!(!me.successor_file.exists());
        assert_eq!(me.not_in_charge(), None);
        assert!(!me.superseded());
    }
}
