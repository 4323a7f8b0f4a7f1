//! `deepzero train` killed with SIGKILL at random moments — during an epoch, inside a
//! checkpoint save (through the test hook `DEEPZERO_TEST_CHECKPOINT_PAUSE_MS`), during a
//! resume — and resumed until it finishes, ends with the parameters and optimizer state of an
//! uninterrupted run, bit for bit, and a `metrics.jsonl` with each epoch once.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use common::{ok, SMALL};
use deepzero_core::checkpoint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EPOCHS: usize = 5;
/// Kills per trial before the run is let finish.
const KILLS: usize = 5;
/// The pause at each point of a checkpoint save when a kill aims there (the hook's window).
const PAUSE_MS: &str = "100";

fn train_args(out: &str) -> Vec<String> {
    let mut args = vec!["train".to_string(), "--out".into(), out.into()];
    args.extend(SMALL.iter().map(|s| s.to_string()));
    let epochs = EPOCHS.to_string();
    args.extend(["--epochs", &epochs, "--estimator", "rge", "--overwrite"].map(String::from));
    args
}

/// When to kill a run.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// After this many milliseconds.
    After(u64),
    /// When the save announces its `n`-th pause (1-based, three per checkpoint).
    AtPause(usize),
}

/// Start `deepzero ARGS` in `cwd` (with the checkpoint pause when `pause`), stderr piped line
/// by line into the returned channel.
fn start(cwd: &Path, args: &[String], pause: bool) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deepzero"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("DEEPZERO_DATA")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match pause {
        true => cmd.env("DEEPZERO_TEST_CHECKPOINT_PAUSE_MS", PAUSE_MS),
        false => cmd.env_remove("DEEPZERO_TEST_CHECKPOINT_PAUSE_MS"),
    };
    let mut child = cmd.spawn().context("starting deepzero")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}

/// How a run ended.
enum End {
    Finished,
    Killed,
    Failed(String),
}

/// Run `args`, killing the process as `kill` says.
fn run_killed(cwd: &Path, args: &[String], kill: Option<Kill>) -> Result<End> {
    use std::os::unix::process::ExitStatusExt;
    let (mut child, lines) = start(cwd, args, matches!(kill, Some(Kill::AtPause(_))))?;
    let mut seen = Vec::new();
    match kill {
        None => {}
        Some(Kill::After(ms)) => std::thread::sleep(Duration::from_millis(ms)),
        Some(Kill::AtPause(n)) => {
            let mut pauses = 0;
            // Until the n-th pause is announced, or the run ends (the channel closes).
            for line in lines.iter() {
                pauses += usize::from(line.starts_with("checkpoint: pausing"));
                seen.push(line);
                if pauses == n {
                    break;
                }
            }
        }
    }
    if kill.is_some() {
        // An error here means the process had already exited.
        let _ = child.kill();
    }
    let status = child.wait()?;
    seen.extend(lines.iter());
    let stderr = seen.join("\n");
    ensure!(
        !stderr.contains("panicked"),
        "deepzero {args:?} panicked:\n{stderr}"
    );
    Ok(match (status.success(), status.signal()) {
        (true, _) => End::Finished,
        (false, Some(9)) => End::Killed,
        _ => End::Failed(stderr),
    })
}

/// Train into `run` through kills until it finishes; returns how many kills landed.
fn train_through_kills(cwd: &Path, run: &Path, rng: &mut StdRng, first: Kill) -> Result<usize> {
    let run_s = run.to_str().context("utf-8 path")?.to_string();
    let fresh = train_args(&run_s);
    let resume: Vec<String> = ["train", "--resume", &run_s].map(String::from).to_vec();
    let mut args = fresh.clone();
    let mut killed = 0;
    for attempt in 0..=KILLS {
        let kill = match attempt {
            0 => Some(first),
            KILLS => None,
            _ if rng.random_bool(0.5) => Some(Kill::After(rng.random_range(0..50))),
            // Inside one of the next two saves: a run with an epoch left always reaches it.
            _ => Some(Kill::AtPause(rng.random_range(1..=6))),
        };
        match run_killed(cwd, &args, kill)? {
            End::Finished => return Ok(killed),
            End::Killed => killed += 1,
            End::Failed(err) => anyhow::bail!("deepzero {args:?} failed:\n{err}"),
        }
        if checkpoint::exists(run) {
            args = resume.clone();
            continue;
        }
        // Killed before its first checkpoint: the CLI refuses to resume and says to start again.
        match run_killed(cwd, &resume, None)? {
            End::Failed(err) => ensure!(
                err.contains("--overwrite") || !run.join("config.json").exists(),
                "resume without a checkpoint: {err}"
            ),
            _ => anyhow::bail!("a run without a checkpoint was resumed"),
        }
        args = fresh.clone();
    }
    anyhow::bail!("the run did not finish after {KILLS} kills and a last run")
}

fn tensors(run: &Path) -> Result<Vec<(String, Vec<u64>)>> {
    let state = checkpoint::load(run, &Device::Cpu)?;
    let mut all: Vec<_> = state.optimizer.into_iter().collect();
    all.push(("params".into(), state.params));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.into_iter()
        .map(|(name, t)| {
            let bits = t
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .map(|v| v.to_bits())
                .collect();
            Ok((name, bits))
        })
        .collect()
}

/// `(epoch, train_loss bits)` of each line of `metrics.jsonl`.
fn epochs(run: &Path) -> Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let epoch = v["epoch"].as_u64().context("epoch")?;
            let loss = v["train_loss"].as_f64().context("train_loss")?;
            Ok((epoch, loss.to_bits()))
        })
        .collect()
}

#[test]
fn killed_and_resumed_runs_end_like_an_uninterrupted_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reference = tmp.path().join("reference");
    let args = train_args(reference.to_str().context("utf-8")?);
    ok(
        tmp.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let (want_tensors, want_epochs) = (tensors(&reference)?, epochs(&reference)?);
    ensure!(want_epochs.len() == EPOCHS, "{want_epochs:?}");
    let mut rng = StdRng::seed_from_u64(13);
    // The first kill of each trial: inside the last checkpoint's save (then the resume only
    // writes the reports), inside the first one (nothing to resume), at random moments.
    let firsts = [
        Kill::AtPause(3 * EPOCHS),
        Kill::AtPause(2),
        Kill::AtPause(1),
        Kill::After(20),
        Kill::After(40),
        Kill::AtPause(8),
    ];
    let mut kills = 0;
    for (trial, &first) in firsts.iter().enumerate() {
        let run = tmp.path().join(format!("trial-{trial}"));
        let landed = train_through_kills(tmp.path(), &run, &mut rng, first)
            .with_context(|| format!("trial {trial}"))?;
        eprintln!("trial {trial}: {landed} kills");
        kills += landed;
        ensure!(
            tensors(&run)? == want_tensors,
            "trial {trial}: the final checkpoint differs from the uninterrupted run's"
        );
        ensure!(
            epochs(&run)? == want_epochs,
            "trial {trial}: metrics.jsonl {:?}, uninterrupted {want_epochs:?}",
            epochs(&run)?
        );
        ensure!(
            run.join("summary.json").is_file(),
            "trial {trial}: no summary.json"
        );
    }
    // A kill aimed at a pause of a fresh run always lands (a kill after a delay may come after
    // the end on a fast machine).
    let sure = firsts
        .iter()
        .filter(|k| matches!(k, Kill::AtPause(_)))
        .count();
    ensure!(kills >= sure, "only {kills} kills landed");
    eprintln!("{kills} kills in {} trials", firsts.len());
    Ok(())
}
