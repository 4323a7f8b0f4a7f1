//! The `deepzero` command: zeroth-order training from the command line.
//!
//! The library crates hold every algorithm; this binary parses flags, builds configs, shows
//! progress and writes run directories (config, metrics, summary, plots, checkpoints).

mod bench;
mod common;
mod experiment;
mod gradcheck;
mod prune;
mod report;
mod train;

use clap::{Parser, Subcommand};

/// Zeroth-order (gradient-free) deep network training — DeepZero in Rust.
#[derive(Parser, Debug)]
#[command(name = "deepzero", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Gradcheck(args) => gradcheck::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Prune(args) => prune::run(*args),
        Command::Experiment(cmd) => experiment::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
