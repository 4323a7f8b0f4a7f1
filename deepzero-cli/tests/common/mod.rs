//! Helpers shared by the end-to-end tests: run the `deepzero` binary in a scratch directory and
//! check how it ended. Each test file uses only some of them.
#![allow(dead_code)]

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Small fast training flags on the shipped digits.
pub const SMALL: [&str; 6] = [
    "--train-limit",
    "200",
    "--test-limit",
    "100",
    "--batch-size",
    "50",
];

/// A tiny `deepzero pde` run (Burgers on a 16² grid, 12 steps, 2 epochs of 2 steps): seconds.
pub const PDE_TINY: &[&str] = &[
    "pde",
    "--solver",
    "burgers",
    "--grid",
    "16",
    "--steps",
    "12",
    "--train-sims",
    "2",
    "--test-sims",
    "2",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "2",
    "--batch-size",
    "2",
    "--unroll",
    "2",
    "--width",
    "4",
    "--sparsity",
    "0.9",
];

/// Run `deepzero ARGS` in `cwd` (a scratch directory, so a missing `--out` could not litter
/// the source tree), one rayon thread, the shipped data found through the compiled-in path.
pub fn deepzero(cwd: &Path, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_deepzero"))
        .args(args)
        .current_dir(cwd)
        .env_remove("DEEPZERO_DATA")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .context("running the deepzero binary")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and require success.
pub fn ok(cwd: &Path, args: &[&str]) -> Result<Output> {
    let o = deepzero(cwd, args)?;
    ensure!(
        o.status.success(),
        "deepzero {args:?} failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    Ok(o)
}

/// Run, require a failure with an error message and no panic; return stderr.
pub fn fails(cwd: &Path, args: &[&str]) -> Result<String> {
    let o = deepzero(cwd, args)?;
    ensure!(
        !o.status.success(),
        "deepzero {args:?} succeeded:\n{}",
        stderr(&o)
    );
    failure_message(&o, args)
}

/// Run, require exit code `code` with an error message and no panic; return stderr.
pub fn fails_with(code: i32, cwd: &Path, args: &[&str]) -> Result<String> {
    let o = deepzero(cwd, args)?;
    ensure!(
        o.status.code() == Some(code),
        "deepzero {args:?}: exit status {} (expected {code}):\n{}",
        o.status,
        stderr(&o)
    );
    failure_message(&o, args)
}

fn failure_message(o: &Output, args: &[&str]) -> Result<String> {
    let err = stderr(o);
    ensure!(
        !err.contains("panicked"),
        "deepzero {args:?} panicked:\n{err}"
    );
    ensure!(
        err.contains("error"),
        "deepzero {args:?}: no error message:\n{err}"
    );
    Ok(err)
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every file and directory under `dir` with its bytes (directories: empty).
pub fn snapshot(dir: &Path) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            let rel = p.strip_prefix(dir)?.to_path_buf();
            if p.is_dir() {
                out.push((rel, Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}
