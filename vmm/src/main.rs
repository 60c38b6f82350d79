//! `sandcore`: runs functions of a guest ELF in KVM micro VMs, collects
//! crash dumps from other hosts and opens stored dumps in gdb.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Log filter used when `RUST_LOG` is unset or invalid.
const DEFAULT_LOG_FILTER: &str = "warn,sandcore=info,sandcore_sinks=info";

#[derive(Parser)]
#[command(
    name = "sandcore",
    version,
    about = "Run functions of a static no_std guest ELF in KVM micro VMs, with ELF crash dumps",
    after_help = "Logs go to stderr. RUST_LOG sets the log filter (default: \
                  warn,sandcore=info,sandcore_sinks=info).\n\
                  Exit status: 0 on success, 1 if the guest or an operation failed, 2 for invalid usage."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo guest: calls with latencies, a crash, its dump and a restore.
    Demo(cli::demo::DemoArgs),
    /// Call one guest function and print its result.
    Run(cli::run::RunArgs),
    /// Receive crash dumps from socket sinks and store them in a directory.
    #[cfg(feature = "crashdump")]
    Collect(cli::collect::CollectArgs),
    /// List, inspect and debug stored crash dumps.
    #[cfg(feature = "crashdump")]
    Dumps(cli::dumps::DumpsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();

    let result = match cli.command {
        Command::Demo(args) => cli::demo::run(&args),
        Command::Run(args) => cli::run::run(&args),
        #[cfg(feature = "crashdump")]
        Command::Collect(args) => cli::collect::run(&args),
        #[cfg(feature = "crashdump")]
        Command::Dumps(args) => cli::dumps::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG`.
fn init_logging() {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(error) => {
            if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() {
                eprintln!(
                    "warning: ignoring invalid RUST_LOG ({error}); using {DEFAULT_LOG_FILTER}"
                );
            }
            EnvFilter::new(DEFAULT_LOG_FILTER)
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
