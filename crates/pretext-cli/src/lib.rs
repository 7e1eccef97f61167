//! What the pretext command-line tools share: config files with `--set`
//! overrides, the device flag, logging, progress bars and error reporting.
//!
//! The binaries (`pretext-contrastive`, `pretext-generative`, `pretext-mlm`)
//! are thin: [`runner`] writes their shared subcommands once over each
//! paradigm, and each binary adds only its own.

pub mod args;
pub mod config;
pub mod hub;
pub mod progress;
pub mod runner;
pub mod tools;

use std::process::ExitCode;

/// Installs the tracing subscriber: `RUST_LOG` if set, else `warn`
/// (`info` with `verbose`). Logs go to stderr.
pub fn init_tracing(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if verbose { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs `f`, printing an error with its whole context chain
/// (`error: while X: because Y`) and returning a failing exit code.
///
/// Started by a parallel launcher (`mpirun -np N`) in a build with MPI, the
/// process joins the run's world first ([`pretext_core::dist::init`]); an
/// error on any rank then stops every rank, with the error and the rank
/// that had it, instead of leaving the others waiting.
pub fn run_main(f: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    let launch = match pretext_core::dist::init() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let world = launch.world;
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if world.size() > 1 => world.abort(&format!("error: {e:#}"), 1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
