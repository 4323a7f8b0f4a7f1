//! Harmful input and harmful moments (issue #13): absurd sizes, failed set-ups, old run
//! directories, divergence, input files that change under a run. Each case checks the exit code
//! (2: clap's usage errors, 1: every other error), that the message names the flag or the fix,
//! that nothing panicked, and what the run directory holds afterwards.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use std::path::Path;

fn contains_all(err: &str, needles: &[&str]) -> Result<()> {
    for n in needles {
        ensure!(err.contains(n), "message does not mention {n:?}:\n{err}");
    }
    Ok(())
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str().context("utf-8 path")
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--out", out];
    args.extend(SMALL);
    args.extend(extra);
    args
}

// ---------------------------------------------------------------------------------------
// resource bounds
// ---------------------------------------------------------------------------------------

#[test]
fn absurd_query_counts_are_errors_before_any_allocation() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for q in ["18446744073709551615", "1000000000000"] {
        let out = tmp.path().join(format!("q{q}"));
        let err = fails_with(
            1,
            tmp.path(),
            &train_args(utf8(&out)?, &["--estimator", "rge", "--q", q]),
        )?;
        contains_all(&err, &["--q", q, "use a smaller value"])?;
        ensure!(!out.exists(), "--q {q}: a run directory was left behind");
    }
    // Models too large for memory: the parameter count is checked layer by layer.
    for (i, flags) in [
        ["--model", "mlp", "--width", "18446744073709551615"],
        ["--model", "mlp", "--depth", "18446744073709551615"],
        ["--model", "cnn", "--width", "100000000"],
    ]
    .iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("model{i}"));
        let err = fails_with(1, tmp.path(), &train_args(utf8(&out)?, flags))?;
        contains_all(&err, &[flags[2], "model parameters", "use a smaller value"])?;
        ensure!(!out.exists(), "{flags:?}: a run directory was left behind");
    }
    // The RGE directions of --prune zo-grasp: the same check.
    let ratios = tmp.path().join("r.json");
    let err = fails_with(
        1,
        tmp.path(),
        &[
            "prune",
            "--method",
            "zo-grasp",
            "--sparsity",
            "0.5",
            "--q",
            "18446744073709551615",
            "--out",
            utf8(&ratios)?,
        ],
    )?;
    contains_all(&err, &["--q", "use a smaller value"])?;
    ensure!(!ratios.exists());
    // pde: the data set (every state of every simulation) must fit, checked before it runs.
    for flags in [
        ["--train-sims", "18446744073709551615"],
        ["--steps", "100000000"],
    ] {
        let out = tmp.path().join("pde");
        let mut args = vec!["pde", "--out", utf8(&out)?];
        args.extend(flags);
        let err = fails_with(1, tmp.path(), &args)?;
        contains_all(&err, &[flags[0], "of memory are available"])?;
        ensure!(
            !out.exists(),
            "pde {flags:?}: a run directory was left behind"
        );
    }
    // train --prune zo-grasp: the same check under train's name of the flag.
    let out = tmp.path().join("prune-q");
    let err = fails_with(
        1,
        tmp.path(),
        &train_args(
            utf8(&out)?,
            &[
                "--sparsity",
                "0.5",
                "--prune",
                "zo-grasp",
                "--prune-q",
                "18446744073709551615",
            ],
        ),
    )?;
    contains_all(&err, &["--prune-q is 18446744073709551615"])?;
    ensure!(!out.exists());
    // bench objective allocates its --coords up front.
    let err = fails_with(
        1,
        tmp.path(),
        &["bench", "objective", "--coords", "18446744073709551615"],
    )?;
    contains_all(&err, &["--coords", "use a smaller value"])?;
    Ok(())
}

#[test]
fn more_threads_than_cores_are_capped_with_a_warning() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let err = stderr(&ok(
        tmp.path(),
        &train_args(
            utf8(&out)?,
            &["--estimator", "fo", "--epochs", "1", "--threads", "100000"],
        ),
    )?);
    contains_all(&err, &["warning: --threads 100000", "cores"])?;
    ensure!(out.join("summary.json").is_file(), "the run did not finish");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the run directory's lifecycle
// ---------------------------------------------------------------------------------------

#[test]
fn failed_set_up_leaves_no_run_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases: [(&[&str], &str); 6] = [
        (&["--lr", "0"], "--lr"),
        (&["--estimator", "rge", "--q", "0"], "--q"),
        (&["--dataset", "mnist"], "--data-dir"),
        (&["--model", "cnn", "--depth", "9"], "--depth"),
        (&["--sparsity", "1.5"], "--sparsity"),
        (
            &["--ratios", "/nonexistent/deepzero-ratios.json"],
            "--ratios",
        ),
    ];
    for (i, (flags, flag)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("run{i}"));
        let err = fails_with(1, tmp.path(), &train_args(utf8(&out)?, flags))?;
        contains_all(&err, &[flag])?;
        ensure!(!out.exists(), "{flags:?}: left {} behind", out.display());
    }
    // certify train-denoiser: the same order (classifier checked before the directory).
    let out = tmp.path().join("denoiser");
    let err = fails_with(
        1,
        tmp.path(),
        &[
            "certify",
            "train-denoiser",
            "--method",
            "mse",
            "--classifier",
            "run:/nonexistent/deepzero-victim",
            "--out",
            utf8(&out)?,
        ],
    )?;
    contains_all(&err, &["--classifier"])?;
    ensure!(
        !out.exists(),
        "train-denoiser left {} behind",
        out.display()
    );
    // … and an autoencoder too large for memory (built after the classifier is opened).
    let victim = tmp.path().join("victim");
    ok(
        tmp.path(),
        &train_args(utf8(&victim)?, &["--estimator", "fo", "--epochs", "1"]),
    )?;
    let classifier = format!("run:{}", utf8(&victim)?);
    let err = fails_with(
        1,
        tmp.path(),
        &[
            "certify",
            "train-denoiser",
            "--method",
            "zo-ae-ds",
            "--dataset",
            "digits",
            "--classifier",
            &classifier,
            "--ae-hidden",
            "18446744073709551615",
            "--out",
            utf8(&out)?,
        ],
    )?;
    contains_all(&err, &["model parameters", "use a smaller value"])?;
    ensure!(
        !out.exists(),
        "train-denoiser left {} behind",
        out.display()
    );
    // experiment: the sub-runs' shared flags are checked before its directory exists.
    for (which, flags) in [
        ("cge-vs-rge", ["--lr", "0"]),
        ("sparsity", ["--epochs", "0"]),
    ] {
        let out = tmp.path().join(which);
        let mut args = vec!["experiment", which, "--out", utf8(&out)?];
        args.extend(flags);
        let err = fails_with(1, tmp.path(), &args)?;
        contains_all(&err, &[flags[0]])?;
        ensure!(
            !out.exists(),
            "experiment {which} left {} behind",
            out.display()
        );
    }
    // Usage errors are clap's: exit code 2, nothing created either.
    let out = tmp.path().join("clap");
    fails_with(2, tmp.path(), &train_args(utf8(&out)?, &["--model", "vgg"]))?;
    ensure!(!out.exists());
    Ok(())
}

#[test]
fn overwrite_clears_the_old_run_so_resume_cannot_continue_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = utf8(&run)?;
    ok(
        tmp.path(),
        &train_args(run_s, &["--estimator", "fo", "--epochs", "2"]),
    )?;
    ensure!(run.join("checkpoints").is_dir());
    // A new run in the old directory stops before its first checkpoint (it diverges at once,
    // as a kill in epoch 1 would stop it).
    let err = fails_with(
        1,
        tmp.path(),
        &train_args(
            run_s,
            &[
                "--estimator",
                "cge",
                "--mu",
                "1e300",
                "--epochs",
                "3",
                "--overwrite",
            ],
        ),
    )?;
    contains_all(&err, &["diverged", "no checkpoint was written"])?;
    ensure!(
        !run.join("checkpoints").exists(),
        "--overwrite kept the old run's checkpoints"
    );
    ensure!(!run.join("summary.json").exists(), "old summary.json kept");
    // Resuming must not continue the old run's checkpoint under the new config.
    let err = fails_with(1, tmp.path(), &["train", "--resume", run_s])?;
    contains_all(
        &err,
        &["before its first checkpoint", "--overwrite", "config.json"],
    )?;
    Ok(())
}

#[test]
fn resume_refuses_conflicting_flags_and_takes_more_epochs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = utf8(&run)?;
    ok(
        tmp.path(),
        &train_args(run_s, &["--estimator", "fo", "--epochs", "1"]),
    )?;
    let err = fails_with(
        1,
        tmp.path(),
        &[
            "train",
            "--resume",
            run_s,
            "--lr",
            "0.5",
            "--batch-size",
            "10",
            "--epochs",
            "2",
        ],
    )?;
    contains_all(
        &err,
        &[
            "--lr 0.5 (the run has 0.1)",
            "--batch-size 10 (the run has 50)",
        ],
    )?;
    ensure!(!err.contains("--epochs"), "--epochs may change:\n{err}");
    // Flags that agree with the saved run, and a longer run: allowed.
    ok(
        tmp.path(),
        &[
            "train",
            "--resume",
            run_s,
            "--lr",
            "0.1",
            "--epochs",
            "2",
            "--threads",
            "1",
        ],
    )?;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json"))?)?;
    ensure!(summary["epochs"] == 2, "{summary}");
    // The new length is saved: a plain resume now says the run is finished.
    let err = fails_with(1, tmp.path(), &["train", "--resume", run_s])?;
    contains_all(&err, &["already finished its 2 epochs"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// divergence
// ---------------------------------------------------------------------------------------

#[test]
fn divergence_in_every_engine_stops_with_the_step_and_the_cause() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // μ = 1e300 moves the parameters to 1e300: the queries' losses are infinite or NaN while
    // the base loss is finite, so the gradient check (not the loss check) stops these.
    let zo: [&[&str]; 4] = [
        &["--estimator", "cge", "--engine", "fast"],
        &["--estimator", "cge", "--engine", "reuse"],
        &["--estimator", "cge", "--engine", "naive"],
        &["--estimator", "rge", "--q", "4"],
    ];
    for (i, flags) in zo.iter().enumerate() {
        let out = tmp.path().join(format!("zo{i}"));
        let mut extra = flags.to_vec();
        extra.extend(["--mu", "1e300", "--epochs", "1"]);
        let err = fails_with(1, tmp.path(), &train_args(utf8(&out)?, &extra))?;
        contains_all(
            &err,
            &["training diverged", "epoch 1, step 1", "μ", "gradient"],
        )?;
        ensure!(!out.join("summary.json").exists());
    }
    // Backprop with an absurd learning rate: the loss becomes NaN after the first update.
    let out = tmp.path().join("fo");
    let err = fails_with(
        1,
        tmp.path(),
        &train_args(
            utf8(&out)?,
            &["--estimator", "fo", "--lr", "1e30", "--epochs", "1"],
        ),
    )?;
    contains_all(&err, &["training diverged", "learning rate", "epoch 1"])?;
    Ok(())
}

#[test]
fn divergence_in_the_applications_names_the_epoch_and_the_learning_rate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // PDE: a correction trained with a huge rate blows the solver up; the advice is the rate
    // (not the solver's Δt), and the epoch is named.
    for method in ["non", "zo-sol"] {
        let out = tmp.path().join(format!("pde-{method}"));
        let mut args = PDE_TINY.to_vec();
        args.extend(["--methods", method, "--lr", "1e6", "--out", utf8(&out)?]);
        let err = fails_with(1, tmp.path(), &args)?;
        contains_all(
            &err,
            &["training diverged", "epoch 1", "lower the learning rate"],
        )?;
        ensure!(
            !err.contains("use Δt"),
            "{method}: the solver's advice:\n{err}"
        );
    }
    // Denoiser: an infinite loss stops the run at its step.
    let victim = tmp.path().join("victim");
    ok(
        tmp.path(),
        &train_args(utf8(&victim)?, &["--estimator", "fo", "--epochs", "1"]),
    )?;
    let classifier = format!("run:{}", utf8(&victim)?);
    let out = tmp.path().join("denoiser");
    let err = fails_with(
        1,
        tmp.path(),
        &[
            "certify",
            "train-denoiser",
            "--classifier",
            &classifier,
            "--dataset",
            "digits",
            "--method",
            "mse",
            "--train-limit",
            "64",
            "--eval-size",
            "8",
            "--epochs",
            "2",
            "--lr",
            "1e30",
            "--out",
            utf8(&out)?,
        ],
    )?;
    contains_all(&err, &["training diverged", "epoch 1", "learning rate"])?;
    Ok(())
}

#[test]
fn gradcheck_with_a_huge_mu_is_an_error_not_a_nan_cosine() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for estimator in ["cge", "rge"] {
        let err = fails_with(
            1,
            tmp.path(),
            &["gradcheck", "--estimator", estimator, "--mu", "1e300"],
        )?;
        contains_all(&err, &["--mu", "NaN or infinite"])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// input files
// ---------------------------------------------------------------------------------------

#[test]
fn a_ratios_file_is_copied_and_resume_uses_the_copy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ratios = tmp.path().join("r.json");
    let run = tmp.path().join("run");
    let run_s = utf8(&run)?;
    ok(
        tmp.path(),
        &[
            "prune",
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            utf8(&ratios)?,
        ],
    )?;
    ok(
        tmp.path(),
        &train_args(
            run_s,
            &[
                "--estimator",
                "cge",
                "--ratios",
                utf8(&ratios)?,
                "--epochs",
                "1",
            ],
        ),
    )?;
    ensure!(run.join("ratios.json").is_file(), "no copy of --ratios");
    // A run stopped after epoch 1 of 2: what a kill leaves (config says 2, checkpoint 1).
    let config_path = run.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config["epochs"] = 2.into();
    std::fs::write(&config_path, serde_json::to_string(&config)?)?;
    // The original file is gone: the resume reads the run's own copy.
    std::fs::remove_file(&ratios)?;
    ok(tmp.path(), &["train", "--resume", run_s])?;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json"))?)?;
    ensure!(summary["epochs"] == 2, "{summary}");
    // Without the copy the resume says which file is missing.
    config["epochs"] = 3.into();
    std::fs::write(&config_path, serde_json::to_string(&config)?)?;
    std::fs::remove_file(run.join("ratios.json"))?;
    let err = fails_with(1, tmp.path(), &["train", "--resume", run_s])?;
    contains_all(&err, &["ratios.json", "is missing"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// experiment --resume and single output files
// ---------------------------------------------------------------------------------------

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[test]
fn experiment_resume_refuses_a_missing_foreign_or_different_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let exp = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "experiment",
            "cge-vs-rge",
            "--dataset",
            "digits",
            "--train-limit",
            "100",
            "--test-limit",
            "50",
            "--batch-size",
            "50",
            "--depths",
            "1",
            "--epochs",
            "1",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // A missing directory: was a fresh full experiment; now an error, and nothing is created.
    let missing = tmp.path().join("missing");
    let args = exp(utf8(&missing)?, &["--resume"]);
    let err = fails_with(1, tmp.path(), &strs(&args))?;
    contains_all(
        &err,
        &["--resume", "no experiment there to resume", "drop --resume"],
    )?;
    ensure!(!missing.exists(), "--resume created {}", missing.display());
    // A `train` run: was overwritten (its config.json replaced); now refused, untouched.
    let run = tmp.path().join("run");
    ok(
        tmp.path(),
        &train_args(utf8(&run)?, &["--estimator", "fo", "--epochs", "1"]),
    )?;
    let before = snapshot(&run)?;
    let args = exp(utf8(&run)?, &["--resume"]);
    let err = fails_with(1, tmp.path(), &strs(&args))?;
    contains_all(
        &err,
        &[
            "not a `deepzero experiment cge-vs-rge` run",
            "nothing was changed",
        ],
    )?;
    ensure!(snapshot(&run)? == before, "the train run was modified");
    // An experiment resumed with other settings: was mixed into one table; now refused.
    let done = tmp.path().join("exp");
    ok(tmp.path(), &strs(&exp(utf8(&done)?, &[])))?;
    let before = snapshot(&done)?;
    let args = exp(utf8(&done)?, &["--resume", "--lr", "0.05"]);
    let err = fails_with(1, tmp.path(), &strs(&args))?;
    contains_all(&err, &["--lr 0.05 (the experiment has 0.1)", "config.json"])?;
    let args = [
        "experiment",
        "sparsity",
        "--dataset",
        "digits",
        "--resume",
        "--out",
        utf8(&done)?,
    ];
    let err = fails_with(1, tmp.path(), &args)?;
    contains_all(&err, &["holds a `deepzero experiment cge-vs-rge` run"])?;
    ensure!(snapshot(&done)? == before, "the experiment was modified");
    // The same settings (and another --threads) resume: every sub-run is kept.
    let args = exp(utf8(&done)?, &["--resume", "--threads", "1"]);
    let o = ok(tmp.path(), &strs(&args))?;
    ensure!(
        stderr(&o).matches("finished earlier, kept").count() == 3,
        "{}",
        stderr(&o)
    );
    Ok(())
}

#[test]
fn prune_refuses_to_replace_an_existing_file_without_overwrite() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("notes.txt");
    std::fs::write(&out, "keep me")?;
    let args = [
        "prune",
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        utf8(&out)?,
    ];
    let err = fails_with(1, tmp.path(), &args)?;
    contains_all(&err, &["--out", "exists", "--overwrite"])?;
    ensure!(
        std::fs::read_to_string(&out)? == "keep me",
        "the file was replaced"
    );
    let mut with = args.to_vec();
    with.push("--overwrite");
    ok(tmp.path(), &with)?;
    ensure!(
        std::fs::read_to_string(&out)?.contains("layers"),
        "no ratios written"
    );
    Ok(())
}
