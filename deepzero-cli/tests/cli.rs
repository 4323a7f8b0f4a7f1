//! End-to-end tests of the `deepzero` binary: run directories, resume, errors, gradcheck.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn has_keys(v: &Value, keys: &[&str]) -> Result<()> {
    for k in keys {
        ensure!(v.get(k).is_some(), "key {k:?} missing in {v}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// train: the run directory
// ---------------------------------------------------------------------------------------

#[test]
fn train_writes_a_complete_run_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = run.to_str().context("utf-8 path")?;
    let mut args = vec!["train", "--epochs", "2", "--out", run_s];
    args.extend(SMALL);
    ok(tmp.path(), &args)?;

    for f in [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "accuracy.svg",
        "loss.png",
        "loss.svg",
        "checkpoints/epoch-000002/tensors.safetensors",
        "checkpoints/epoch-000002/state.json",
    ] {
        let p = run.join(f);
        ensure!(p.is_file(), "{} missing", p.display());
        ensure!(std::fs::metadata(&p)?.len() > 0, "{} is empty", p.display());
    }
    // No temporary files left behind, and only the newest checkpoint.
    for e in std::fs::read_dir(&run)?.chain(std::fs::read_dir(run.join("checkpoints"))?) {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(!name.contains(".tmp"), "leftover temporary file {name}");
        ensure!(name != "epoch-000001", "the older checkpoint was kept");
    }
    let png = std::fs::read(run.join("accuracy.png"))?;
    ensure!(png.starts_with(b"\x89PNG"), "accuracy.png is not a PNG");
    let svg = std::fs::read_to_string(run.join("loss.svg"))?;
    ensure!(svg.contains("<svg"), "loss.svg is not an SVG");

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let lines: Vec<&str> = metrics.lines().collect();
    ensure!(lines.len() == 2, "metrics.jsonl has {} lines", lines.len());
    let mut last_queries = 0;
    for (i, l) in lines.iter().enumerate() {
        let m: Value = serde_json::from_str(l)?;
        has_keys(
            &m,
            &[
                "epoch",
                "train_loss",
                "test_loss",
                "test_accuracy",
                "queries",
                "seconds",
            ],
        )?;
        ensure!(
            m["epoch"].as_u64() == Some(i as u64 + 1),
            "epoch field of line {i}: {m}"
        );
        let acc = m["test_accuracy"].as_f64().context("test_accuracy")?;
        ensure!((0.0..=1.0).contains(&acc), "accuracy {acc}");
        let q = m["queries"].as_u64().context("queries")?;
        ensure!(q > last_queries, "queries not increasing: {m}");
        last_queries = q;
    }

    let s = read_json(&run.join("summary.json"))?;
    has_keys(
        &s,
        &[
            "test_accuracy",
            "best_test_accuracy",
            "final_train_loss",
            "queries",
            "wall_seconds",
            "params",
            "model",
            "dataset",
            "estimator",
        ],
    )?;
    // Defaults: MLP with 32 hidden units on 8x8 digits, CGE forward difference.
    let d = 64 * 32 + 32 + 32 * 10 + 10;
    ensure!(s["params"].as_u64() == Some(d), "params {}", s["params"]);
    ensure!(s["dataset"] == "digits", "dataset {}", s["dataset"]);
    // Dense forward CGE: d + 1 queries per step, 4 steps per epoch, 2 epochs.
    ensure!(
        s["queries"].as_u64() == Some(2 * 4 * (d + 1)),
        "queries {}",
        s["queries"]
    );
    ensure!(s["queries"].as_u64() == Some(last_queries));
    let acc = s["test_accuracy"].as_f64().context("test_accuracy")?;
    let best = s["best_test_accuracy"].as_f64().context("best")?;
    ensure!(best >= acc, "best {best} < final {acc}");

    let cfg = read_json(&run.join("config.json"))?;
    ensure!(cfg.to_string().contains("\"epochs\":2"), "config {cfg}");
    Ok(())
}

#[test]
fn train_refuses_non_empty_out_and_resume_of_finished_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = run.to_str().context("utf-8 path")?;
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--estimator",
        "fo",
        "--out",
        run_s,
    ];
    args.extend(SMALL);
    ok(tmp.path(), &args)?;
    let summary = std::fs::read(run.join("summary.json"))?;

    // Same --out again: refused, nothing overwritten.
    let err = fails(tmp.path(), &args)?;
    ensure!(err.contains("--overwrite"), "{err}");
    ensure!(std::fs::read(run.join("summary.json"))? == summary);

    // With --overwrite it runs.
    let mut again = args.clone();
    again.push("--overwrite");
    ok(tmp.path(), &again)?;

    // Resuming a finished run says so.
    let err = fails(tmp.path(), &["train", "--resume", run_s])?;
    ensure!(err.contains("already finished"), "{err}");

    // Resuming a directory without a run names the problem.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty)?;
    let err = fails(
        tmp.path(),
        &["train", "--resume", empty.to_str().context("utf-8")?],
    )?;
    ensure!(err.contains("config.json"), "{err}");
    Ok(())
}

/// A finished 1-epoch run whose config is raised to 2 epochs continues at epoch 2.
#[test]
fn train_resume_continues_from_the_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = run.to_str().context("utf-8 path")?;
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--estimator",
        "fo",
        "--out",
        run_s,
    ];
    args.extend(SMALL);
    ok(tmp.path(), &args)?;
    let first = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    ensure!(first.lines().count() == 1);

    let mut cfg = read_json(&run.join("config.json"))?;
    cfg["epochs"] = Value::from(2);
    std::fs::write(run.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let o = ok(tmp.path(), &["train", "--resume", run_s])?;
    ensure!(stderr(&o).contains("resuming"), "{}", stderr(&o));

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let lines: Vec<&str> = metrics.lines().collect();
    ensure!(lines.len() == 2, "metrics.jsonl: {metrics}");
    ensure!(
        lines[0] == first.trim_end(),
        "epoch 1 metrics changed by resuming:\nbefore: {first}after:  {}",
        lines[0]
    );
    let m2: Value = serde_json::from_str(lines[1])?;
    ensure!(m2["epoch"].as_u64() == Some(2));
    // Backprop: one query per step, 4 steps per epoch.
    ensure!(m2["queries"].as_u64() == Some(8), "{m2}");
    let s = read_json(&run.join("summary.json"))?;
    ensure!(s["queries"].as_u64() == Some(8), "{s}");
    Ok(())
}

/// One `--engine` flag for CGE and RGE (`--cge-engine` still accepted); a run saved with the
/// older `cge_engine` / `rge_engine` keys resumes, and `--resume` takes `--threads` from the
/// resuming command.
#[test]
fn engine_flag_and_old_configs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let run_s = run.to_str().context("utf-8 path")?;
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--estimator",
        "rge",
        "--q",
        "3",
        "--cge-engine",
        "naive",
        "--out",
        run_s,
    ];
    args.extend(SMALL);
    let o = ok(tmp.path(), &args)?;
    ensure!(stderr(&o).contains("rge(q=3)"), "{}", stderr(&o));
    let mut cfg = read_json(&run.join("config.json"))?;
    ensure!(cfg["estimator"]["engine"] == "naive", "{cfg}");
    let est = cfg["estimator"]
        .as_object_mut()
        .context("estimator config is an object")?;
    est.remove("engine");
    // The old name of the same setting (another engine would be another configuration, which
    // the checkpoint's hash refuses).
    est.insert("cge_engine".into(), Value::from("naive"));
    est.insert("rge_engine".into(), Value::from("candle"));
    cfg["epochs"] = Value::from(2);
    std::fs::write(run.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let o = ok(tmp.path(), &["train", "--resume", run_s, "--threads", "2"])?;
    let err = stderr(&o);
    ensure!(
        err.contains("resuming") && err.contains("rge(q=3)"),
        "{err}"
    );
    ensure!(read_json(&run.join("summary.json"))?["epochs"] == 2);
    Ok(())
}

#[test]
fn same_seed_same_result() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut summaries = Vec::new();
    for name in ["a", "b"] {
        let run = tmp.path().join(name);
        let run_s = run.to_str().context("utf-8 path")?;
        let mut args = vec![
            "train",
            "--epochs",
            "1",
            "--estimator",
            "rge",
            "--q",
            "5",
            "--seed",
            "7",
            "--out",
            run_s,
        ];
        args.extend(SMALL);
        ok(tmp.path(), &args)?;
        summaries.push(read_json(&run.join("summary.json"))?);
    }
    for k in ["test_accuracy", "final_train_loss", "queries"] {
        ensure!(
            summaries[0][k] == summaries[1][k],
            "{k}: {} vs {}",
            summaries[0][k],
            summaries[1][k]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_input_is_rejected_with_clear_messages() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let out_s = out.to_str().context("utf-8 path")?;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--dataset", "cifar10"], vec!["--data-dir"]),
        (vec!["--dataset", "mnist"], vec!["--data-dir"]),
        (
            vec!["--data-dir", "/nonexistent/deepzero-data"],
            vec!["/nonexistent/deepzero-data"],
        ),
        (
            vec!["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
            vec!["/nonexistent/cifar"],
        ),
        (vec!["--mu", "0"], vec!["--mu"]),
        (vec!["--mu=-0.1", "--estimator", "rge"], vec!["--mu"]),
        (vec!["--q", "0", "--estimator", "rge"], vec!["--q"]),
        (vec!["--epochs", "0"], vec!["--epochs"]),
        (vec!["--batch-size", "0"], vec!["--batch-size"]),
        (vec!["--lr", "0"], vec!["--lr"]),
        (vec!["--momentum", "1.5"], vec!["--momentum"]),
        (vec!["--train-limit", "0"], vec!["--train-limit"]),
        (vec!["--model", "cnn", "--depth", "9"], vec!["--depth"]),
        (vec!["--model", "mlp", "--width", "0"], vec!["--width"]),
        (
            vec!["--warmup-epochs", "5", "--epochs", "2"],
            vec!["--warmup-epochs"],
        ),
    ];
    for (i, (flags, needles)) in cases.iter().enumerate() {
        let dir = format!("{out_s}{i}");
        let mut args = vec!["train", "--out", dir.as_str()];
        args.extend(flags.iter().copied());
        let err = fails(tmp.path(), &args)?;
        for n in needles {
            ensure!(
                err.contains(n),
                "{flags:?}: message does not mention {n:?}:\n{err}"
            );
        }
    }
    // Unknown values are clap errors (exit code 2), also without panics.
    let err = fails(tmp.path(), &["train", "--model", "vgg", "--out", out_s])?;
    ensure!(err.contains("vgg"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// gradcheck
// ---------------------------------------------------------------------------------------

#[test]
fn gradcheck_cge_central_f64_matches_backprop() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let o = ok(
        tmp.path(),
        &[
            "gradcheck",
            "--model",
            "mlp",
            "--estimator",
            "cge",
            "--difference",
            "central",
            "--dtype",
            "f64",
            "--mu",
            "1e-6",
            "--json",
        ],
    )?;
    let r: Value = serde_json::from_str(&stdout(&o)).with_context(|| stdout(&o))?;
    let cos = r["cosine"].as_f64().context("cosine")?;
    let rel = r["relative_error"].as_f64().context("relative_error")?;
    ensure!(cos >= 0.9999, "cosine {cos}");
    ensure!(rel <= 1e-4, "relative error {rel}");
    let coords = r["coords"].as_u64().context("coords")?;
    ensure!(r["queries"].as_u64() == Some(2 * coords + 1), "{r}");
    let layers = r["layers"].as_array().context("layers")?;
    ensure!(!layers.is_empty());
    let per_layer: u64 = layers.iter().filter_map(|l| l["coords"].as_u64()).sum();
    ensure!(
        per_layer == coords,
        "layers cover {per_layer} of {coords} coordinates"
    );

    // Backprop against itself is refused.
    let err = fails(tmp.path(), &["gradcheck", "--estimator", "fo"])?;
    ensure!(err.contains("--estimator"), "{err}");
    Ok(())
}

/// `bench fo` on a small CNN: our f32 gradient against candle's float64 one. A ReLU input whose
/// sign differs from the float64 forward's changes that position's derivative outright, so the
/// distance measures the sums' rounding only where no input flipped: then it must be at the
/// level of f32 rounding, and no worse than candle's own f32 gradient by more than a factor 2.
#[test]
fn bench_fo_gradient_is_accurate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let o = ok(
        tmp.path(),
        &[
            "bench", "fo", "--model", "cnn", "--depth", "2", "--width", "8", "--batch", "32",
            "--steps", "1", "--json",
        ],
    )?;
    let v: Value = serde_json::from_str(&stdout(&o))?;
    let (ours, candle) = (
        v["ours_rel_diff_f64"].as_f64().context("ours")?,
        v["candle_rel_diff_f64"].as_f64().context("candle")?,
    );
    let flips = v["relu_flips_ours"].as_u64().context("flips")?;
    ensure!(v["relu_flips_candle"].as_u64().is_some(), "{v}");
    ensure!(v["isa"].as_str().is_some(), "{v}");
    if flips == 0 {
        ensure!(
            ours < 1e-5,
            "our f32 gradient is {ours:e} from float64: {v}"
        );
        ensure!(
            ours <= 2.0 * candle.max(1e-7),
            "ours {ours:e} vs candle {candle:e}: {v}"
        );
    }
    Ok(())
}

/// A loss that grows a thousandfold without becoming infinite has diverged: the run stops with
/// an error naming the learning rate (RGE at the learning rate tuned for CGE blew up to 7.9e20
/// and exited 0 before). RGE's own default learning rate trains the default model.
#[test]
fn a_finite_blow_up_stops_the_run_and_rge_has_its_own_rate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rge = ["train", "--estimator", "rge", "--q", "20", "--out"];
    let run = tmp.path().join("rge-0.1");
    let mut args = rge.to_vec();
    args.extend([run.to_str().context("utf-8 path")?, "--lr", "0.1"]);
    let err = fails_with(1, tmp.path(), &args)?;
    ensure!(
        err.contains("diverged") && err.contains("learning rate"),
        "{err}"
    );
    let run = tmp.path().join("rge");
    let mut args = rge.to_vec();
    args.push(run.to_str().context("utf-8 path")?);
    ok(tmp.path(), &args)?;
    let summary = read_json(&run.join("summary.json"))?;
    let acc = summary["test_accuracy"].as_f64().context("accuracy")?;
    ensure!(
        acc > 0.8,
        "RGE at its default learning rate: test accuracy {acc}"
    );
    let config = read_json(&run.join("config.json"))?;
    ensure!(config["lr"].as_f64() == Some(0.01), "{config}");
    Ok(())
}

/// `bench certify` on a `run:` classifier times our kernels and, in the same run, tract on the
/// classifier's ONNX export; CERTIFY's answer comes with them.
#[test]
fn bench_certify_times_our_kernels_and_tract() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut args = vec![
        "train",
        "--estimator",
        "fo",
        "--epochs",
        "1",
        "--out",
        "victim",
    ];
    args.extend(SMALL);
    ok(tmp.path(), &args)?;
    let o = ok(
        tmp.path(),
        &[
            "bench",
            "certify",
            "--classifier",
            "run:victim",
            "--n0",
            "10",
            "--n",
            "300",
            "--batch",
            "100",
            "--json",
        ],
    )?;
    let v: Value = serde_json::from_str(&stdout(&o))?;
    let ours = v["forwards_per_second"].as_f64().context("ours")?;
    let tract = v["tract_forwards_per_second"].as_f64().context("tract")?;
    ensure!(ours > 0.0 && tract > 0.0, "{v}");
    ensure!(v["forwards"].as_u64() == Some(310), "{v}");
    ensure!(v["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    Ok(())
}
