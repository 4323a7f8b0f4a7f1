//! The `deepzero` command: zeroth-order training from the command line.
//!
//! The library crates hold every algorithm; this binary parses flags, builds configs, shows
//! progress and writes run directories (config, metrics, summary, plots, checkpoints).

mod bench;
mod bench_certify;
mod bench_distributed;
mod bench_objective;
mod certify;
mod certify_train;
mod common;
mod config;
mod experiment;
mod gradcheck;
mod pde;
mod prune;
mod report;
mod report_html;
mod train;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Zeroth-order (gradient-free) deep network training — DeepZero in Rust.
#[derive(Parser, Debug)]
#[command(name = "deepzero", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Read flags from a TOML file (or JSON: a run's config.json): keys are the long flag names,
    /// nested tables are read as flat; flags on the command line override the file's.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model with a ZO estimator (CGE, RGE) or backprop; writes a run directory.
    Train(Box<train::TrainArgs>),
    /// Benchmarks: CGE engines (`bench cge`) and kernels (`bench kernels`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Compare an estimator's gradient on one batch with backprop's (cosine, relative error).
    Gradcheck(gradcheck::GradcheckArgs),
    /// Layer-wise keep ratios from pruning at initialisation (ZO-GraSP, GraSP, magnitude, random).
    Prune(Box<prune::PruneArgs>),
    /// The paper's comparisons as sets of runs: `cge-vs-rge`, `sparsity`.
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
    /// Certified robustness of a black-box classifier by randomized smoothing.
    Certify(certify::CertifyArgs),
    /// PDE error correction with the solver in the loop (SRC, NON, ZO-SOL); `pde generate` for data.
    Pde(Box<pde::PdeArgs>),
    /// One self-contained HTML page overlaying runs (train, experiment, certify, pde): curves
    /// and summary tables.
    Report(report_html::ReportArgs),
}

/// Keep freed tensor buffers in the process heap instead of returning them to the kernel.
///
/// glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
/// mappings and unmaps them on free, so every activation buffer of a training step page-faults
/// again and every unmap shoots down TLBs on all threads: half the time of a candle backprop step
/// on a small CNN went to the kernel. Raising the threshold and the trim threshold lets the heap
/// reuse those pages (measured: `train --estimator fo`, CNN d2, Fashion-MNIST subset, 41 s → 22 s
/// per epoch on 2 cores, same numbers).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: `mallopt` only sets glibc allocator parameters; it is called first thing in
    // `main`, before any other thread exists, and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// The ids of the arguments given on the command line (not defaults).
fn given_flags(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

fn main() {
    tune_allocator();
    let argv = config::expand(&Cli::command(), std::env::args_os().collect()).unwrap_or_else(|e| {
        eprintln!("error: {}", e.message);
        std::process::exit(e.code);
    });
    let matches = Cli::command().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(mut args) => {
            if let Some(("train", m)) = matches.subcommand() {
                args.given = given_flags(m);
            }
            train::run(*args)
        }
        Command::Gradcheck(args) => gradcheck::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Prune(args) => prune::run(*args),
        Command::Experiment(cmd) => experiment::run(cmd),
        Command::Certify(mut args) => {
            if let Some(("certify", m)) = matches.subcommand() {
                match (&mut args.command, m.subcommand()) {
                    (Some(certify::CertifyCommand::TrainDenoiser(a)), Some((_, m))) => {
                        a.given = given_flags(m);
                    }
                    (Some(certify::CertifyCommand::Run(a)), Some((_, m))) => {
                        a.given = given_flags(m);
                    }
                    _ => {}
                }
            }
            certify::run(args)
        }
        Command::Pde(args) => pde::run(*args),
        Command::Report(args) => report_html::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {:#}", common::in_flags(e));
        std::process::exit(1);
    }
}

/// The fuzz target of `--config` files (the harness of deepzero-core's parser fuzzing): TOML and
/// JSON files, valid ones of `train` and `pde` mutated and random bytes, must be taken or refused
/// with an error, and whatever `expand` returns must parse or be refused by clap, never panic.
#[cfg(test)]
#[path = "../../deepzero-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

#[cfg(test)]
mod fuzz_config {
    use super::{config, Cli};
    use crate::fuzz_harness::{fuzz, Format, Parsed, Verdict};
    use clap::CommandFactory;
    use std::ffi::OsString;

    fn check(command: &[&str], extension: &str, bytes: &[u8]) -> Verdict {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join(format!("c.{extension}"));
        std::fs::write(&file, bytes).map_err(|e| e.to_string())?;
        let mut argv: Vec<OsString> = vec!["deepzero".into()];
        argv.extend(command.iter().map(OsString::from));
        argv.push("--config".into());
        argv.push(file.into());
        match config::expand(&Cli::command(), argv) {
            Err(e) if e.message.contains("--config") && (e.code == 1 || e.code == 2) => {
                Ok(Parsed::Rejected)
            }
            Err(e) => Err(format!(
                "an error that does not name --config: {}",
                e.message
            )),
            Ok(argv) => Ok(match Cli::command().try_get_matches_from(argv) {
                Ok(_) => Parsed::Accepted,
                Err(_) => Parsed::Rejected,
            }),
        }
    }

    #[test]
    fn fuzz_config_toml() {
        let valid = [
            b"epochs = 3\nlr = 0.05\nestimator = \"rge\"\nq = 20\n\n[data]\ndataset = \"digits\"\ntrain_limit = 100\n".to_vec(),
            b"no_augment = true\nwarmup_epochs = 1\nmodel = \"cnn\"\ndepth = 2\n".to_vec(),
        ];
        fuzz("config (train, TOML)", Format::Text, &valid, |b| {
            check(&["train"], "toml", b)
        });
        let pde = [b"methods = [\"src\", \"non\"]\ngrid = 16\nsteps = 12\nlr = 1e-3\n".to_vec()];
        fuzz("config (pde, TOML)", Format::Text, &pde, |b| {
            check(&["pde"], "toml", b)
        });
    }

    #[test]
    fn fuzz_config_json() {
        // A run's config.json as `train` writes it.
        let parsed = <Cli as clap::Parser>::try_parse_from([
            "deepzero",
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "2",
        ])
        .expect("train flags");
        let super::Command::Train(args) = parsed.command else {
            panic!("not train");
        };
        let valid = [serde_json::to_vec_pretty(&args).expect("config.json")];
        fuzz("config (train, JSON)", Format::Text, &valid, |b| {
            check(&["train"], "json", b)
        });
    }
}
