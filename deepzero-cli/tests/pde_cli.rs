//! End-to-end tests of `deepzero pde`: a tiny run writes a complete run directory, resumes from
//! its checkpoints, and bad input names the flag.

mod common;

use anyhow::{ensure, Context, Result};
use common::PDE_TINY as TINY;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn deepzero(cwd: &Path, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_deepzero"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .context("running the deepzero binary")
}

#[test]
fn pde_writes_a_complete_run_directory_and_resumes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut args = TINY.to_vec();
    args.extend(["--out", "run"]);
    let o = deepzero(tmp.path(), &args)?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tmp.path().join("run");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    for key in ["mae", "mae_std", "params", "queries", "seconds"] {
        for method in ["src", "non", "zo-sol"] {
            ensure!(
                summary[key][method].is_number(),
                "summary.json: {key}.{method} missing: {summary}"
            );
        }
    }
    ensure!(summary["mae"]["src"].as_f64().unwrap_or(0.0) > 0.0);
    ensure!(summary["queries"]["zo-sol"].as_u64().unwrap_or(0) > 0);
    for file in [
        "config.json",
        "mae_over_time.png",
        "mae_over_time.svg",
        "fields.png",
        "data/dataset.json",
        "non/metrics.jsonl",
        "zo-sol/metrics.jsonl",
    ] {
        ensure!(dir.join(file).is_file(), "{file} missing");
    }
    let lines = std::fs::read_to_string(dir.join("zo-sol/metrics.jsonl"))?;
    ensure!(lines.lines().count() == 2, "{lines}");

    // More epochs into the same directory: the trained methods resume from their checkpoints.
    let mut more = args.clone();
    let i = more.iter().position(|a| *a == "--epochs").unwrap_or(0);
    more[i + 1] = "3";
    let o = deepzero(tmp.path(), &more)?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = std::fs::read_to_string(dir.join("zo-sol/metrics.jsonl"))?;
    ensure!(lines.lines().count() == 3, "{lines}");
    Ok(())
}

/// `summary.json` of a tiny run with `extra` flags in a fresh `out`, and its stderr.
fn summary_of(tmp: &Path, out: &str, extra: &[&str]) -> Result<(Value, String)> {
    let mut args = TINY.to_vec();
    args.extend(extra);
    args.extend(["--out", out]);
    let o = deepzero(tmp, &args)?;
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    ensure!(o.status.success(), "{stderr}");
    let text = std::fs::read_to_string(tmp.join(out).join("summary.json"))?;
    Ok((serde_json::from_str(&text)?, stderr))
}

#[test]
fn zo_sol_starts_from_nons_network_or_from_scratch() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mae = |s: &Value, m: &str| s["mae"][m].as_f64().unwrap_or(f64::NAN);
    // A learning rate too small to move anything: ZO-SOL ends where it starts.
    let still = ["--zo-sol-lr", "1e-12", "--non-lr", "1e-2"];
    let (from_non, _) = summary_of(tmp.path(), "non", &still)?;
    ensure!(from_non["zo_sol_start"] == "non", "{from_non}");
    ensure!(
        (mae(&from_non, "non") - mae(&from_non, "src")).abs() > 1e-6,
        "NON must differ from SRC for the test to mean anything: {from_non}"
    );
    ensure!(
        (mae(&from_non, "zo-sol") - mae(&from_non, "non")).abs() <= 1e-9 * mae(&from_non, "non"),
        "ZO-SOL did not start from NON's network: {from_non}"
    );
    let (scratch, _) = summary_of(
        tmp.path(),
        "scratch",
        &[&still[..], &["--zo-sol-start", "scratch"]].concat(),
    )?;
    ensure!(scratch["zo_sol_start"] == "scratch", "{scratch}");
    ensure!(
        (mae(&scratch, "zo-sol") - mae(&scratch, "src")).abs() <= 1e-9 * mae(&scratch, "src"),
        "a fresh ZO-SOL network is the uncorrected solver: {scratch}"
    );
    // Without NON in the run, the default start falls back to scratch and says so.
    let (alone, stderr) = summary_of(tmp.path(), "alone", &["--methods", "src,zo-sol"])?;
    ensure!(alone["zo_sol_start"] == "scratch", "{alone}");
    ensure!(
        stderr.contains("ZO-SOL starts from a fresh network"),
        "{stderr}"
    );
    // The methods run in the order src, non, zo-sol whatever the order given.
    let (reordered, _) = summary_of(
        tmp.path(),
        "reordered",
        &[&still[..], &["--methods", "zo-sol,non"]].concat(),
    )?;
    ensure!(
        mae(&reordered, "zo-sol") == mae(&from_non, "zo-sol"),
        "{reordered}"
    );
    Ok(())
}

#[test]
fn pde_bad_input_names_the_flag() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (extra, flag) in [
        (&["--dt=-1"][..], "--dt"),
        (&["--grid", "15"][..], "--grid"),
        (&["--reference-grid", "40"][..], "--reference-grid"),
        (&["--methods", "sol"][..], "--methods"),
        (&["--sparsity", "1.5"][..], "--sparsity"),
        (&["--unroll", "50"][..], "--unroll"),
    ] {
        let mut args = TINY.to_vec();
        args.extend(extra);
        args.extend(["--out", "bad"]);
        let o = deepzero(tmp.path(), &args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(!o.status.success(), "{extra:?} was accepted");
        ensure!(
            err.contains(flag),
            "{extra:?}: error does not name {flag}: {err}"
        );
        ensure!(!err.contains("panicked"), "{extra:?} panicked: {err}");
    }
    Ok(())
}

#[test]
fn sol_baselines_train_on_both_solvers() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (summary, _) = summary_of(
        tmp.path(),
        "baselines",
        &["--methods", "fo-sol,src,sol-nograd"],
    )?;
    for method in ["src", "sol-nograd", "fo-sol"] {
        let mae = summary["mae"][method].as_f64().unwrap_or(f64::NAN);
        ensure!(mae.is_finite() && mae > 0.0, "{method}: {summary}");
        ensure!(
            tmp.path()
                .join("baselines")
                .join(method)
                .join("metrics.jsonl")
                .is_file()
                || method == "src",
            "{method}: no metrics.jsonl"
        );
    }
    // A backprop step is one query.
    ensure!(
        summary["queries"]["fo-sol"] == summary["queries"]["sol-nograd"],
        "{summary}"
    );
    // Navier–Stokes has its adjoint too.
    let mut args: Vec<&str> = TINY.to_vec();
    let i = args
        .iter()
        .position(|a| *a == "burgers")
        .context("TINY names burgers")?;
    args[i] = "navier-stokes";
    args.extend(["--methods", "src,fo-sol", "--out", "ns"]);
    let o = deepzero(tmp.path(), &args)?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ns: Value = serde_json::from_str(&std::fs::read_to_string(
        tmp.path().join("ns").join("summary.json"),
    )?)?;
    ensure!(
        ns["mae"]["fo-sol"].as_f64().is_some_and(f64::is_finite),
        "{ns}"
    );
    Ok(())
}
