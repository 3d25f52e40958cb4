//! Project automation: toolchain setup, the multi-node lab, and the pieces the demo, lab tests and
//! benchmark share.
pub mod agent;
pub mod bench;
pub mod bench_http;
pub mod bench_obs;
pub mod chromium;
pub mod lab;
pub mod pki;
pub mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

/// Runs `cmd`, failing with the command line when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Fails unless running as root, which the lab (namespaces, cgroups, eBPF) needs.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, cgroups and eBPF); run it with sudo");
    }
    Ok(())
}
