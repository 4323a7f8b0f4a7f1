//! `--config FILE` and the checks of a resumed run: a run's `config.json` reproduces it, a TOML
//! file with command-line overrides, bad files; mixed, foreign and changed-input checkpoints are
//! refused with what differs (`train`, `certify train-denoiser`, `pde`).

mod common;

use anyhow::{ensure, Result};
use common::{deepzero, fails_with, ok, read_json, stderr, SMALL};
use serde_json::Value;
use std::path::Path;

/// A small fast run on digits: an MLP of 8 units, CGE.
fn small_run<'a>(epochs: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut a = vec!["train", "--width", "8", "--epochs", epochs, "--out", out];
    a.extend(SMALL);
    a
}

/// `metrics.jsonl` without the seconds (the one figure a repetition may change).
fn metrics(dir: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l)?;
            v.as_object_mut().map(|o| o.remove("seconds"));
            Ok(v)
        })
        .collect()
}

#[test]
fn a_runs_config_json_reproduces_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    ok(tmp.path(), &small_run("2", "a"))?;
    ok(
        tmp.path(),
        &["train", "--config", "a/config.json", "--out", "b"],
    )?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ma, mb) = (metrics(&a)?, metrics(&b)?);
    ensure!(ma.len() == 2, "{ma:?}");
    ensure!(ma == mb, "metrics differ:\n{ma:?}\n{mb:?}");
    let drop_time = |mut v: Value| {
        for k in ["wall_seconds", "seconds_per_epoch"] {
            v.as_object_mut().map(|o| o.remove(k));
        }
        v
    };
    let (sa, sb) = (
        drop_time(read_json(&a.join("summary.json"))?),
        drop_time(read_json(&b.join("summary.json"))?),
    );
    ensure!(sa == sb, "summaries differ:\n{sa}\n{sb}");
    // The saved configs agree but for where the run lives.
    let mut cb = read_json(&b.join("config.json"))?;
    cb["out"] = read_json(&a.join("config.json"))?["out"].clone();
    ensure!(cb == read_json(&a.join("config.json"))?);

    // Without --out the file's own is used, and the run directory is not overwritten.
    let before = std::fs::read(a.join("metrics.jsonl"))?;
    let e = fails_with(1, tmp.path(), &["train", "--config", "a/config.json"])?;
    ensure!(e.contains("--overwrite"), "{e}");
    ensure!(std::fs::read(a.join("metrics.jsonl"))? == before);
    Ok(())
}

#[test]
fn a_toml_config_with_command_line_overrides() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(
        tmp.path().join("run.toml"),
        "# a few keys; the rest are the defaults\n\
         epochs = 1\n\
         lr = 0.05\n\
         train_limit = 200\n\
         test-limit = 100\n\
         batch_size = 50\n\
         no_augment = true\n\
         \n\
         [estimator]\n\
         estimator = \"fo\"\n\
         \n\
         [model]\n\
         model = \"Mlp\"\n\
         depth = 2\n",
    )?;
    ok(
        tmp.path(),
        &[
            "train", "--config", "run.toml", "--lr", "0.02", "--depth", "1", "--out", "r",
        ],
    )?;
    let c = read_json(&tmp.path().join("r/config.json"))?;
    ensure!(c["lr"] == 0.02, "the command line wins: {c}");
    ensure!(c["model"]["depth"] == 1, "{c}");
    ensure!(
        c["epochs"] == 1 && c["batch_size"] == 50 && c["no_augment"] == true,
        "{c}"
    );
    ensure!(
        c["data"]["train_limit"] == 200 && c["data"]["test_limit"] == 100,
        "{c}"
    );
    ensure!(
        c["estimator"]["estimator"] == "fo" && c["model"]["model"] == "mlp",
        "{c}"
    );
    ensure!(c["momentum"] == 0.9, "a default: {c}");
    Ok(())
}

#[test]
fn bad_config_files_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text);
    write("unknown.toml", "epochs = 1\nlearning_rate = 0.1\n")?;
    let e = fails_with(2, tmp.path(), &["train", "--config", "unknown.toml"])?;
    ensure!(
        e.contains("unknown.toml")
            && e.contains("unknown key `learning_rate`")
            && e.contains("did you mean `lr`"),
        "{e}"
    );
    write("type.toml", "[data]\ntrain_limit = \"many\"\n")?;
    let e = fails_with(2, tmp.path(), &["train", "--config", "type.toml"])?;
    ensure!(
        e.contains("type.toml")
            && e.contains("key `data.train_limit`")
            && e.contains("--train-limit"),
        "{e}"
    );
    write("flag.toml", "no_augment = \"yes\"\n")?;
    let e = fails_with(2, tmp.path(), &["train", "--config", "flag.toml"])?;
    ensure!(e.contains("expected true or false"), "{e}");
    write("syntax.toml", "epochs = 1\nlr = = 0.1\n")?;
    let e = fails_with(2, tmp.path(), &["train", "--config", "syntax.toml"])?;
    ensure!(e.contains("syntax.toml") && e.contains("line 2"), "{e}");
    let e = fails_with(1, tmp.path(), &["train", "--config", "missing.toml"])?;
    ensure!(e.contains("missing.toml"), "{e}");
    // Every command takes --config: a key of another command is unknown to it.
    write(
        "prune.toml",
        "method = \"random\"\nsparsity = 0.5\nepochs = 3\n",
    )?;
    let e = fails_with(
        2,
        tmp.path(),
        &["prune", "--config", "prune.toml", "--out", "r.json"],
    )?;
    ensure!(e.contains("unknown key `epochs`"), "{e}");
    Ok(())
}

/// The newest checkpoint directory of a run.
fn newest_checkpoint(run: &Path) -> Result<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(run.join("checkpoints"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    dirs.sort();
    dirs.pop()
        .ok_or_else(|| anyhow::anyhow!("no checkpoint in {}", run.display()))
}

#[test]
fn a_checkpoint_of_mixed_epochs_is_refused_and_metrics_stay() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Older checkpoints are removed after a save: epoch 1 comes from a second run.
    ok(tmp.path(), &small_run("1", "one"))?;
    ok(tmp.path(), &small_run("2", "two"))?;
    let two = tmp.path().join("two");
    std::fs::copy(
        newest_checkpoint(&tmp.path().join("one"))?.join("tensors.safetensors"),
        newest_checkpoint(&two)?.join("tensors.safetensors"),
    )?;
    let before = std::fs::read(two.join("metrics.jsonl"))?;
    let e = fails_with(
        1,
        tmp.path(),
        &["train", "--resume", "two", "--epochs", "3"],
    )?;
    ensure!(
        e.contains("mixes two epochs") && e.contains("epoch 1") && e.contains("epoch 2"),
        "{e}"
    );
    ensure!(
        std::fs::read(two.join("metrics.jsonl"))? == before,
        "metrics.jsonl changed"
    );
    Ok(())
}

#[test]
fn a_foreign_checkpoint_or_changed_ratios_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = small_run("1", "a");
    a.extend(["--prune", "random", "--sparsity", "0.5"]);
    ok(tmp.path(), &a)?;
    let mut b = small_run("1", "b");
    b.extend(["--lr", "0.05"]);
    ok(tmp.path(), &b)?;
    let run_a = tmp.path().join("a");

    // b's checkpoint in a: it belongs to another run.
    let saved = tmp.path().join("a-checkpoints");
    std::fs::rename(run_a.join("checkpoints"), &saved)?;
    let from_b = newest_checkpoint(&tmp.path().join("b"))?;
    let dest = run_a
        .join("checkpoints")
        .join(from_b.file_name().unwrap_or_default());
    std::fs::create_dir_all(&dest)?;
    for f in ["tensors.safetensors", "state.json"] {
        std::fs::copy(from_b.join(f), dest.join(f))?;
    }
    let e = fails_with(1, tmp.path(), &["train", "--resume", "a", "--epochs", "2"])?;
    ensure!(
        e.contains("belongs to another run") && e.contains("configuration hash"),
        "{e}"
    );
    std::fs::remove_dir_all(run_a.join("checkpoints"))?;
    std::fs::rename(&saved, run_a.join("checkpoints"))?;

    // The run's copy of its ratios edited: its hash then and now.
    let ratios = run_a.join("ratios.json");
    let text = std::fs::read_to_string(&ratios)?;
    ensure!(text.contains("0.5"), "{text}");
    std::fs::write(&ratios, text.replacen("0.5", "0.25", 1))?;
    let e = fails_with(1, tmp.path(), &["train", "--resume", "a", "--epochs", "2"])?;
    ensure!(
        e.contains("ratios.json changed since it was saved") && e.contains("its hash was"),
        "{e}"
    );
    std::fs::write(&ratios, text)?;
    ok(tmp.path(), &["train", "--resume", "a", "--epochs", "2"])?;
    ensure!(metrics(&run_a)?.len() == 2);
    Ok(())
}

#[test]
fn a_denoiser_resume_lists_conflicts_and_checks_its_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut victim = vec![
        "train",
        "--estimator",
        "fo",
        "--epochs",
        "1",
        "--out",
        "victim",
    ];
    victim.extend(SMALL);
    ok(tmp.path(), &victim)?;
    let denoiser = |out: &'static str, lr: &'static str| {
        vec![
            "certify",
            "train-denoiser",
            "--classifier",
            "run:victim",
            "--dataset",
            "digits",
            "--method",
            "mse",
            "--train-limit",
            "64",
            "--eval-size",
            "16",
            "--epochs",
            "1",
            "--lr",
            lr,
            "--out",
            out,
        ]
    };
    ok(tmp.path(), &denoiser("d", "0.001"))?;
    let resume = ["certify", "train-denoiser", "--resume", "d"];
    let e = fails_with(
        1,
        tmp.path(),
        &[
            &resume[..],
            &["--epochs", "2", "--lr", "0.5", "--sigma", "0.5"],
        ]
        .concat(),
    )?;
    ensure!(
        e.contains("--lr 0.5 (the run has 0.001)") && e.contains("--sigma 0.5 (the run has 0.25)"),
        "{e}"
    );
    // Another run's checkpoint in d.
    ok(tmp.path(), &denoiser("e", "0.002"))?;
    let d = tmp.path().join("d");
    std::fs::remove_dir_all(d.join("checkpoints"))?;
    let from = newest_checkpoint(&tmp.path().join("e"))?;
    let dest = d
        .join("checkpoints")
        .join(from.file_name().unwrap_or_default());
    std::fs::create_dir_all(&dest)?;
    for f in ["tensors.safetensors", "state.json"] {
        std::fs::copy(from.join(f), dest.join(f))?;
    }
    let e = fails_with(1, tmp.path(), &[&resume[..], &["--epochs", "2"]].concat())?;
    ensure!(e.contains("belongs to another run"), "{e}");
    // A run's own checkpoint resumes (--epochs may be raised, and is saved).
    ok(
        tmp.path(),
        &[
            "certify",
            "train-denoiser",
            "--resume",
            "e",
            "--epochs",
            "2",
        ],
    )?;
    ensure!(read_json(&tmp.path().join("e/config.json"))?["epochs"] == 2);
    ensure!(metrics(&tmp.path().join("e"))?.len() == 2);
    Ok(())
}

const PDE: &[&str] = &[
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
    "--steps-per-epoch",
    "2",
    "--batch-size",
    "2",
    "--unroll",
    "2",
    "--width",
    "4",
    "--methods",
    "non",
    "--epochs",
    "1",
];

#[test]
fn pde_into_a_run_with_checkpoints_checks_flags_and_checkpoints() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    ok(tmp.path(), &[PDE, &["--out", "a"]].concat())?;
    ok(
        tmp.path(),
        &[PDE, &["--out", "b", "--lr", "0.001"]].concat(),
    )?;
    let e = fails_with(
        1,
        tmp.path(),
        &[PDE, &["--out", "a", "--lr", "0.001", "--mu", "0.01"]].concat(),
    )?;
    ensure!(
        e.contains("--lr 0.001 (the run has unset)") && e.contains("--mu 0.01 (the run has unset)"),
        "{e}"
    );
    // b's checkpoint in a, a's flags: the checkpoint belongs to another run.
    let a_non = tmp.path().join("a/non");
    std::fs::remove_dir_all(a_non.join("checkpoints"))?;
    let from = newest_checkpoint(&tmp.path().join("b/non"))?;
    let dest = a_non
        .join("checkpoints")
        .join(from.file_name().unwrap_or_default());
    std::fs::create_dir_all(&dest)?;
    for f in ["tensors.safetensors", "state.json"] {
        std::fs::copy(from.join(f), dest.join(f))?;
    }
    let mut more = [PDE, &["--out", "a"]].concat();
    let i = more.iter().rposition(|a| *a == "--epochs").unwrap_or(0);
    more[i + 1] = "2";
    let o = deepzero(tmp.path(), &more)?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("belongs to another run"),
        "{e}"
    );
    Ok(())
}

/// A `deepzero` (sparse CGE with ZO-GraSP ratios) denoiser run killed after its first epoch and
/// resumed ends with the parameters and the black-box count of the uninterrupted run: the ratios
/// are computed at the run's starting point again (they were computed at the resumed weights),
/// and the count is part of the checkpoint.
#[test]
fn a_killed_and_resumed_deepzero_denoiser_ends_as_the_uninterrupted_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut victim = vec![
        "train",
        "--estimator",
        "fo",
        "--epochs",
        "1",
        "--out",
        "victim",
    ];
    victim.extend(SMALL);
    ok(tmp.path(), &victim)?;
    let denoiser = |out: &'static str| {
        vec![
            "certify",
            "train-denoiser",
            "--classifier",
            "run:victim",
            "--dataset",
            "digits",
            "--method",
            "deepzero",
            "--train-limit",
            "256",
            "--eval-size",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--out",
            out,
        ]
    };
    ok(tmp.path(), &denoiser("whole"))?;
    // Kill the second run as soon as its first epoch is written (its checkpoint comes first).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_deepzero"))
        .args(denoiser("part"))
        .current_dir(tmp.path())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let metrics = tmp.path().join("part/metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() == 0) {
        ensure!(
            started.elapsed().as_secs() < 120,
            "no epoch finished in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    if !tmp.path().join("part/summary.json").is_file() {
        ok(
            tmp.path(),
            &["certify", "train-denoiser", "--resume", "part"],
        )?;
    }
    let tensors = |run: &str| -> Result<Vec<u8>> {
        let dir = newest_checkpoint(&tmp.path().join(run))?;
        Ok(std::fs::read(dir.join("tensors.safetensors"))?)
    };
    ensure!(
        tensors("whole")? == tensors("part")?,
        "the resumed denoiser's parameters differ from the uninterrupted run's"
    );
    let last = |run: &str| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(tmp.path().join(run).join("metrics.jsonl"))?;
        Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
    };
    let (a, b) = (last("whole")?, last("part")?);
    ensure!(
        a["black_box_queries"] == b["black_box_queries"] && a["epoch"] == 3,
        "black-box counts differ: {a} vs {b}"
    );
    Ok(())
}
