//! End-to-end tests of sparse training from the command line: `deepzero prune`,
//! `deepzero train --sparsity/--ratios/--prune/--prune-weights` and `deepzero experiment`.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;

/// Small fast training on the shipped digits with the simple CNN (3376 parameters).
const SMALL: [&str; 10] = [
    "--model",
    "cnn",
    "--train-limit",
    "200",
    "--test-limit",
    "100",
    "--batch-size",
    "50",
    "--epochs",
    "2",
];

#[test]
fn prune_writes_layer_ratios() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("r.json");
    let out_s = out.to_str().context("utf-8")?;
    ok(
        tmp.path(),
        &[
            "prune",
            "--model",
            "cnn",
            "--method",
            "zo-grasp",
            "--sparsity",
            "0.9",
            "--q",
            "8",
            "--out",
            out_s,
        ],
    )?;
    let r = read_json(&out)?;
    ensure!(
        r["method"] == "zo-grasp" && r["model"] == "cnn-d2-w18",
        "{r}"
    );
    ensure!(r["queries"].as_u64() == Some(2 * (8 + 1)), "{r}");
    let g = r["global_sparsity"].as_f64().context("global_sparsity")?;
    ensure!((g - 0.9).abs() <= 0.01, "{g}");
    let layers = r["layers"].as_array().context("layers")?;
    let names: Vec<&str> = layers.iter().filter_map(|l| l["name"].as_str()).collect();
    ensure!(
        names == ["conv1.weight", "conv2.weight", "fc.weight"],
        "{names:?}"
    );
    for l in layers {
        for k in ["params", "keep_ratio", "kept"] {
            ensure!(l.get(k).is_some(), "{k} missing in {l}");
        }
    }
    let err = fails(tmp.path(), &["prune", "--sparsity", "1.2", "--out", out_s])?;
    ensure!(
        err.contains("--sparsity must be in [0, 1), got 1.2"),
        "{err}"
    );
    Ok(())
}

#[test]
fn sparse_cge_training_uses_fewer_queries() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ratios = tmp.path().join("r.json");
    let ratios_s = ratios.to_str().context("utf-8")?;
    ok(
        tmp.path(),
        &[
            "prune",
            "--model",
            "cnn",
            "--method",
            "magnitude",
            "--sparsity",
            "0.9",
            "--out",
            ratios_s,
        ],
    )?;
    let run = tmp.path().join("run");
    let run_s = run.to_str().context("utf-8")?;
    let mut args = vec!["train", "--ratios", ratios_s, "--out", run_s];
    args.extend(SMALL);
    let o = ok(tmp.path(), &args)?;
    ensure!(stderr(&o).contains("queries per step"), "{}", stderr(&o));
    let s = read_json(&run.join("summary.json"))?;
    // 10% of 3258 weights kept (326) plus 118 biases and batch-norm parameters, plus the base.
    ensure!(s["queries_per_step"].as_f64() == Some(445.0), "{s}");
    ensure!(run.join("ratios.json").is_file());
    Ok(())
}

#[test]
fn pruned_and_sparse_fo_runs_and_flag_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (name, extra) in [
        (
            "sparse-fo",
            vec!["--estimator", "fo", "--sparsity", "0.8", "--prune", "grasp"],
        ),
        (
            "pruned",
            vec!["--estimator", "fo", "--sparsity", "0.8", "--prune-weights"],
        ),
    ] {
        let run = tmp.path().join(name);
        let run_s = run.to_str().context("utf-8")?;
        let mut args = vec!["train", "--out", run_s];
        args.extend(SMALL);
        args.extend(extra);
        ok(tmp.path(), &args)?;
        ensure!(run.join("summary.json").is_file(), "{name}");
    }
    let bad: [(&[&str], &str); 4] = [
        (
            &["--sparsity", "1.2"],
            "--sparsity must be in [0, 1), got 1.2",
        ),
        (
            &["--sparsity", "0.5", "--estimator", "rge"],
            "--sparsity applies to",
        ),
        (&["--sparsity", "0.5", "--prune-weights"], "--estimator fo"),
        (
            &["--sparsity", "0.5", "--mask-interval", "0"],
            "--mask-interval must be at least 1",
        ),
    ];
    for (extra, want) in bad {
        let run = tmp.path().join("bad");
        let mut args = vec![
            "train",
            "--out",
            run.to_str().context("utf-8")?,
            "--overwrite",
        ];
        args.extend(SMALL);
        args.extend(extra);
        let err = fails(tmp.path(), &args)?;
        ensure!(err.contains(want), "{extra:?}: {err}");
    }
    Ok(())
}

#[test]
fn sparsity_experiment_writes_its_tables() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("exp");
    let dir_s = dir.to_str().context("utf-8")?;
    let o = ok(
        tmp.path(),
        &[
            "experiment",
            "sparsity",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--train-limit",
            "100",
            "--test-limit",
            "50",
            "--batch-size",
            "50",
            "--sparsities",
            "0,0.9",
            "--prune-q",
            "8",
            "--out",
            dir_s,
        ],
    )?;
    for f in [
        "table.md",
        "table.json",
        "accuracy.png",
        "accuracy.svg",
        "config.json",
    ] {
        ensure!(dir.join(f).is_file(), "{f} missing");
    }
    ensure!(stderr(&o).contains("[5/5]"), "{}", stderr(&o));
    let t = read_json(&dir.join("table.json"))?;
    let rows = t["rows"].as_array().context("rows")?;
    ensure!(rows.len() == 2, "{t}");
    let q = |r: &Value, k: &str| r[k]["queries_per_step"].as_f64().unwrap_or(0.0);
    ensure!(q(&rows[1], "zo_grasp") < q(&rows[0], "zo_grasp"), "{t}");
    ensure!(q(&rows[1], "fo_sparse_gradients") == 1.0, "{t}");
    let err = fails(
        tmp.path(),
        &[
            "experiment",
            "sparsity",
            "--dataset",
            "digits",
            "--sparsities",
            "0.5,1",
        ],
    )?;
    ensure!(
        err.contains("--sparsities") && err.contains("[0, 1)"),
        "{err}"
    );
    Ok(())
}
