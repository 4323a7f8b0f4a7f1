//! `--distributed mpi` end to end under `mpirun`: rank-count invariance (bitwise), a rank that
//! dies or hangs, and `--resume` with another rank count.
//!
//! These tests need the binary built with `--features mpi` and `mpirun` on the PATH; otherwise
//! they print why and pass, unless `DEEPZERO_REQUIRE_MPI=1` (set by `.ci/run`) makes a skip a
//! failure.

use anyhow::{bail, ensure, Context, Result};
use deepzero_core::checkpoint;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether the MPI tests can run here; `Err` when they must and cannot.
fn mpi_available() -> Result<bool> {
    let reason = if !cfg!(feature = "mpi") {
        Some("deepzero-cli was built without the `mpi` feature")
    } else if Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        Some("mpirun is not on the PATH (apt-get install openmpi-bin)")
    } else {
        None
    };
    match reason {
        None => Ok(true),
        Some(r) if std::env::var("DEEPZERO_REQUIRE_MPI").as_deref() == Ok("1") => {
            bail!("DEEPZERO_REQUIRE_MPI=1 but the MPI tests cannot run: {r}")
        }
        Some(r) => {
            eprintln!("skipping the MPI tests: {r}");
            Ok(false)
        }
    }
}

/// A tiny sparse-CGE run on the shipped digits (4 steps per epoch).
fn train_args(out: &Path, epochs: usize) -> Vec<String> {
    let epochs = epochs.to_string();
    let out = out.to_str().expect("utf-8 path");
    [
        "train",
        "--dataset",
        "digits",
        "--model",
        "cnn",
        "--depth",
        "1",
        "--width",
        "4",
        "--train-limit",
        "128",
        "--test-limit",
        "64",
        "--batch-size",
        "32",
        "--sparsity",
        "0.5",
        "--mask-interval",
        "1",
        "--epochs",
        &epochs,
        "--lr",
        "0.05",
        "--seed",
        "7",
        "--threads",
        "1",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run to completion, killing it after `guard` (a hang guard, not a timing assertion).
fn run(mut cmd: Command, guard: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the command")?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > guard {
            child.kill()?;
            child.wait()?;
            bail!("{cmd:?} still running after {guard:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut stdout)?;
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_end(&mut stderr)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn alone(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepzero"));
    c.args(args).env_remove("DEEPZERO_FAULT");
    c
}

fn mpirun(ranks: usize, args: &[String], extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_deepzero"))
        .args(args)
        .args(["--distributed", "mpi"])
        .args(extra)
        .env_remove("DEEPZERO_FAULT");
    c
}

fn succeed(cmd: Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let o = run(cmd, Duration::from_secs(600))?;
    ensure!(
        o.status.success(),
        "{desc} failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(o)
}

/// Parameters of a run directory's checkpoint, as bits.
fn param_bits(dir: &Path) -> Result<(usize, Vec<u32>)> {
    let s = checkpoint::load(dir, &candle_core::Device::Cpu)?;
    let p = s
        .params
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok((s.epoch, p.iter().map(|v| v.to_bits()).collect()))
}

#[test]
fn one_two_and_three_ranks_train_bitwise_the_same() -> Result<()> {
    if !mpi_available()? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let one = tmp.path().join("one");
    succeed(alone(&train_args(&one, 2)))?;
    let (epochs, reference) = param_bits(&one)?;
    assert_eq!(epochs, 2);
    for ranks in [2, 3] {
        let dir = tmp.path().join(format!("ranks{ranks}"));
        let o = succeed(mpirun(ranks, &train_args(&dir, 2), &[]))?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("over {ranks} ranks")),
            "no sharing note:\n{err}"
        );
        // Only rank 0 reports: one run header.
        assert_eq!(err.matches("deepzero train:").count(), 1, "{err}");
        let (e, bits) = param_bits(&dir)?;
        assert_eq!(e, 2);
        assert_eq!(bits.len(), reference.len());
        let differ = bits.iter().zip(&reference).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{ranks} ranks: {differ} parameters differ from one process"
        );
        let metrics = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl"));
        let strip = |s: String| -> Vec<String> {
            // Seconds differ between runs; losses and accuracies must not.
            s.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
                    v.as_object_mut().expect("object").remove("seconds");
                    v.to_string()
                })
                .collect()
        };
        assert_eq!(strip(metrics(&dir)?), strip(metrics(&one)?));
    }
    Ok(())
}

#[test]
fn a_dead_rank_stops_the_job_and_resume_with_another_rank_count_finishes_the_same() -> Result<()> {
    if !mpi_available()? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let whole = tmp.path().join("whole");
    succeed(alone(&train_args(&whole, 3)))?;
    let (_, reference) = param_bits(&whole)?;

    // Rank 1 dies at its 6th gradient exchange: epoch 2, step 2 (4 steps per epoch).
    let dir = tmp.path().join("killed");
    let mut cmd = mpirun(2, &train_args(&dir, 3), &["--rank-timeout", "30"]);
    cmd.env("DEEPZERO_FAULT", "1:6:die");
    let o = run(cmd, Duration::from_secs(300))?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the job survived a dead rank:\n{err}");
    assert!(err.contains("injected fault"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (epoch, _) = param_bits(&dir)?;
    assert_eq!(epoch, 1, "the last checkpoint is epoch 1's");

    // Resume alone (another rank count), then again on three ranks from a copy.
    succeed(alone(&[
        "train".into(),
        "--resume".into(),
        dir.to_str().expect("utf-8").into(),
        "--threads".into(),
        "1".into(),
    ]))?;
    let (epoch, bits) = param_bits(&dir)?;
    assert_eq!(epoch, 3);
    assert!(
        bits == reference,
        "resumed run differs from the uninterrupted one"
    );
    Ok(())
}

#[test]
fn a_hung_rank_stops_the_job_with_a_clear_message_and_resume_on_more_ranks() -> Result<()> {
    if !mpi_available()? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let whole = tmp.path().join("whole");
    succeed(alone(&train_args(&whole, 2)))?;
    let (_, reference) = param_bits(&whole)?;

    // Rank 1 hangs at epoch 2, step 3; rank 0 gives up after 3 s.
    let dir = tmp.path().join("hung");
    let mut cmd = mpirun(2, &train_args(&dir, 2), &["--rank-timeout", "3"]);
    cmd.env("DEEPZERO_FAULT", "1:7:hang");
    let o = run(cmd, Duration::from_secs(300))?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the job survived a hung rank:\n{err}");
    assert!(
        err.contains("the gradient exchange of epoch 2, step 3 did not complete within 3.0 s"),
        "{err}"
    );
    assert!(err.contains("--resume"), "{err}");
    let (epoch, _) = param_bits(&dir)?;
    assert_eq!(epoch, 1);

    let resume = vec![
        "train".to_string(),
        "--resume".into(),
        dir.to_str().expect("utf-8").into(),
        "--threads".into(),
        "1".into(),
    ];
    succeed(mpirun(3, &resume, &[]))?;
    let (epoch, bits) = param_bits(&dir)?;
    assert_eq!(epoch, 2);
    assert!(
        bits == reference,
        "resumed run differs from the uninterrupted one"
    );
    Ok(())
}

#[test]
fn distributed_without_the_feature_or_launcher_is_a_clear_error() -> Result<()> {
    // Without the feature the flag names the rebuild; with it, a run outside mpirun is one rank.
    let tmp = tempfile::tempdir()?;
    let mut args = train_args(&tmp.path().join("r"), 1);
    args.extend(["--distributed".into(), "mpi".into()]);
    let o = run(alone(&args), Duration::from_secs(600))?;
    let err = String::from_utf8_lossy(&o.stderr);
    if cfg!(feature = "mpi") {
        // A singleton MPI job: the same training, alone.
        ensure!(o.status.success(), "singleton MPI run failed:\n{err}");
    } else {
        ensure!(!o.status.success(), "{err}");
        ensure!(err.contains("--features mpi"), "{err}");
    }
    let mut bad = train_args(&tmp.path().join("s"), 1);
    bad.extend(["--rank-timeout".into(), "0".into()]);
    bad.extend(["--distributed".into(), "mpi".into()]);
    let o = run(alone(&bad), Duration::from_secs(600))?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success() && !err.contains("panicked"), "{err}");
    if cfg!(feature = "mpi") {
        ensure!(err.contains("--rank-timeout must be a positive"), "{err}");
    }
    Ok(())
}

#[test]
fn an_error_on_rank_zero_alone_stops_every_rank() -> Result<()> {
    if !mpi_available()? {
        return Ok(());
    }
    // Only rank 0 prepares the run directory: a non-empty one fails there alone, and the other
    // rank must not be left waiting for it at the first exchange.
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("taken");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("something"), "x")?;
    let o = run(
        mpirun(2, &train_args(&dir, 1), &["--rank-timeout", "600"]),
        Duration::from_secs(300),
    )?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("error on rank 0 of 2") && err.contains("--overwrite"),
        "{err}"
    );
    Ok(())
}

#[test]
fn prune_on_two_ranks_writes_the_same_ratios_once() -> Result<()> {
    if !mpi_available()? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let args = |out: &Path| -> Vec<String> {
        let out = out.to_str().expect("utf-8 path");
        ["prune", "--sparsity", "0.9", "--q", "16", "--out", out]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let (one, two) = (tmp.path().join("one.json"), tmp.path().join("two.json"));
    succeed(alone(&args(&one)))?;
    let o = succeed(mpirun(2, &args(&two), &[]))?;
    ensure!(
        std::fs::read(&one)? == std::fs::read(&two)?,
        "ratios differ"
    );
    let reports = String::from_utf8_lossy(&o.stderr)
        .matches("zo-grasp")
        .count();
    ensure!(reports == 1, "expected one report (rank 0), got {reports}");
    Ok(())
}
