//! The agent's lifecycle: preflight checks, attach, enroll from config, follow config changes,
//! and on SIGTERM/SIGINT detach, stop accepting and drain.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};
use weft_common::Settings;

use crate::{
    admin::{self, AdminState},
    config::{AgentSettings, Config},
    datapath::{check_cgroup2_dir, Datapath},
    enrollment::Enrollment,
    proxy::ProxyContext,
    stats::Stats,
};

/// How often pods that failed to enroll (e.g. their netns is not there yet) are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Editors write a file in several steps; wait for them to settle before reloading.
const RELOAD_SETTLE: Duration = Duration::from_millis(150);

pub async fn run(config_path: Option<PathBuf>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("weft must run as root: it loads eBPF programs and enters pod network namespaces");
    }
    let mut config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default()?,
    };
    let settings = config.agent.clone();
    check_cgroup2_dir(&settings.cgroup_path)?;
    let admin_listener = admin::bind(settings.admin_addr).await?;

    let datapath = Arc::new(Datapath::attach(
        &settings.cgroup_path,
        Settings {
            agent_mark: settings.socket_mark,
            outbound_port: settings.outbound_port,
            _pad: 0,
        },
    )?);
    datapath.set_exclusions(&settings.exclude_ports, &settings.exclude_cidrs)?;
    info!(cgroup = %settings.cgroup_path.display(), "eBPF programs attached");

    let stats = Arc::new(Stats::default());
    let ctx = Arc::new(ProxyContext {
        datapath: Arc::clone(&datapath),
        stats: Arc::clone(&stats),
        socket_mark: settings.socket_mark,
        connect_timeout: settings.connect_timeout(),
        connections: TaskTracker::new(),
    });
    let mut enrollment = Enrollment::new(Arc::clone(&ctx), settings.outbound_port);
    enrollment.apply(&config).await;

    let stop_admin = CancellationToken::new();
    let admin_state = Arc::new(AdminState {
        datapath: Arc::clone(&datapath),
        stats,
        pods: enrollment.status(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        stop_admin.clone(),
    ));
    info!(admin = %settings.admin_addr, "weft is running");

    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let _watcher = match &config_path {
        Some(path) => Some(watch_config(path, reload_tx)?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(()) = reload_rx.recv() => {
                tokio::time::sleep(RELOAD_SETTLE).await;
                while reload_rx.try_recv().is_ok() {}
                let Some(path) = &config_path else { continue };
                match Config::load(path) {
                    Ok(new) => {
                        apply_settings_change(&settings, &new.agent, &datapath);
                        enrollment.apply(&new).await;
                        config = new;
                    }
                    Err(err) => error!(error = format!("{err:#}"), "config rejected; the running state is unchanged"),
                }
            }
            _ = retry.tick(), if enrollment.has_failures() => enrollment.apply(&config).await,
        }
    }

    info!("shutting down: detaching eBPF programs and draining connections");
    datapath.detach();
    enrollment.stop_all();
    stop_admin.cancel();
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
    }
    info!("stopped");
    Ok(())
}

/// Exclusions apply live; the other agent settings are fixed at start-up.
fn apply_settings_change(running: &AgentSettings, new: &AgentSettings, datapath: &Datapath) {
    if let Err(err) = datapath.set_exclusions(&new.exclude_ports, &new.exclude_cidrs) {
        error!(
            error = format!("{err:#}"),
            "cannot update excluded ports/CIDRs"
        );
    }
    let restart_only = AgentSettings {
        exclude_ports: running.exclude_ports.clone(),
        exclude_cidrs: running.exclude_cidrs.clone(),
        ..new.clone()
    };
    if &restart_only != running {
        warn!("agent settings other than exclusions changed; they take effect when weft restarts");
    }
}

/// Watches the config file's directory (editors and ConfigMaps replace files by renaming).
fn watch_config(
    path: &Path,
    reload: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref())
            {
                let _ = reload.send(());
            }
        }
    })
    .context("creating the config file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}
