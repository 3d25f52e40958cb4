use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    },
    /// Check a config file and exit.
    CheckConfig { path: PathBuf },
    /// Print the embedded default config.
    DefaultConfig,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(weft::agent::run(config)),
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
