use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// weft: an eBPF-accelerated, node-level service-mesh agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as root on the node).
    Run {
        /// YAML config file, watched for changes. Without it the embedded default is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// This node's name, overriding the config's `agent.node_name` (a DaemonSet sets it from
        /// the pod's `spec.nodeName`).
        #[arg(long, env = "WEFT_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Check a config file and exit.
    CheckConfig { path: PathBuf },
    /// Print the embedded default config.
    DefaultConfig,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let log_filter = weft::logging::init();
    match cli.command {
        Command::Run { config, node_name } => {
            return_large_frees_to_the_os();
            // One thread runs every task. A proxied connection's task and the task of the tunnel
            // connection it shares wake each other on every message; on one thread that costs no
            // futex wake-up or cross-CPU hop, and the bench measured half the context switches
            // and a clearly lower latency than a work-stealing runtime with a worker per core.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(weft::agent::run(config, node_name, log_filter))
        }
        Command::CheckConfig { path } => {
            let config = weft::config::Config::load(&path)?;
            println!("{}: ok ({} pods)", path.display(), config.pods.len());
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", weft::config::EMBEDDED_DEFAULT);
            Ok(())
        }
    }
}

/// Start-up (loading the eBPF programs) allocates and frees several MiB in large blocks. glibc's
/// adaptive thresholds would move such blocks into the heap, which keeps them after they are
/// freed; a fixed mmap threshold keeps them mmapped, so freeing them returns the memory (about
/// 13 MiB of RSS per agent). The proxy's own buffers are smaller and stay in the heap, and a
/// few MiB of free heap are kept rather than trimmed, so bulk transfers do not shrink and regrow
/// the heap hundreds of times a second.
#[cfg(target_env = "gnu")]
fn return_large_frees_to_the_os() {
    const MMAP_THRESHOLD_BYTES: libc::c_int = 128 * 1024;
    const TRIM_THRESHOLD_BYTES: libc::c_int = 4 * 1024 * 1024;
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}

#[cfg(not(target_env = "gnu"))]
fn return_large_frees_to_the_os() {}
