//! End-to-end tests of `deepzero certify run`: the run directory, `run:` and `process:`
//! classifiers, resume after a classifier that dies, and bad input.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;
use std::path::Path;

/// Rows of a certify.tsv without the time column.
fn rows(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(|l| l.rsplit_once('\t').map_or(l, |(a, _)| a).to_string())
        .collect())
}

/// A 10-class `process:` classifier in pure Python: scores from the image's mean and corner
/// pixel. With a file `die` next to it, it exits at request 8 (request 1 asks the class count,
/// then each image takes 3: n0, and n in two batches), that is, on image 2.
const CLIENT: &str = r#"
import os, struct, sys
here = os.path.dirname(os.path.abspath(__file__))
req = 0
while True:
    header = sys.stdin.buffer.readline()
    if not header:
        break
    req += 1
    if req == 8 and os.path.exists(os.path.join(here, "die")):
        print("client: dying on purpose", file=sys.stderr, flush=True)
        sys.exit(7)
    n, c, h, w = map(int, header.split())
    d = c * h * w
    x = struct.unpack(f"<{n * d}f", sys.stdin.buffer.read(4 * n * d))
    out = []
    for i in range(n):
        img = x[i * d:(i + 1) * d]
        m = sum(img) / d
        out.append(" ".join(repr((k - 10 * m) * (0.5 + img[0]) * -abs(k - 10 * m)) for k in range(10)))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
"#;

#[test]
fn certify_run_writes_cohens_format_and_resumes_after_a_dying_classifier() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let client = tmp.path().join("client.py");
    std::fs::write(&client, CLIENT)?;
    let spec = format!("process:python3 {}", client.display());
    let common = [
        "--classifier",
        spec.as_str(),
        "--sigma",
        "0.25",
        "--n0",
        "20",
        "--n",
        "200",
        "--batch",
        "100",
        "--max",
        "6",
    ];
    // Uninterrupted.
    let full = tmp.path().join("full");
    let mut args = vec!["certify", "run", "--out", full.to_str().context("utf-8")?];
    args.extend(common);
    ok(tmp.path(), &args)?;
    let tsv = rows(&full.join("certify.tsv"))?;
    ensure!(tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect", "{tsv:?}");
    ensure!(tsv.len() == 7, "{tsv:?}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json"))?)?;
    for k in ["0.0", "0.25", "0.5", "0.75", "1.0"] {
        ensure!(summary["certified_accuracy"][k].is_number(), "{summary}");
    }
    for k in ["abstain_rate", "classifier_queries", "seconds"] {
        ensure!(summary[k].is_number(), "{k}: {summary}");
    }
    // 6 images × (n0 + n) noisy queries, plus one grey image that asks the program its class count.
    ensure!(summary["classifier_queries"] == 6 * 220 + 1, "{summary}");
    ensure!(
        full.join("certified_accuracy.png").is_file()
            && full.join("certified_accuracy.svg").is_file()
    );

    // The classifier dies at its 8th request (image 2): a clear error, the rows so far kept.
    std::fs::write(tmp.path().join("die"), "")?;
    let part = tmp.path().join("part");
    let part_s = part.to_str().context("utf-8")?;
    let mut args = vec!["certify", "run", "--out", part_s];
    args.extend(common);
    let err = fails(tmp.path(), &args)?;
    ensure!(
        err.contains("request 8") && err.contains("dying on purpose"),
        "{err}"
    );
    ensure!(err.contains("--resume"), "{err}");
    let kept = rows(&part.join("certify.tsv"))?;
    ensure!(kept.len() == 3 && kept[..] == tsv[..3], "{kept:?}");
    // Resume with a healthy classifier: the same rows as the uninterrupted run.
    std::fs::remove_file(tmp.path().join("die"))?;
    // Other settings given to the resume are refused: the rows must share one σ and n.
    let err = fails_with(
        1,
        tmp.path(),
        &["certify", "run", "--resume", part_s, "--sigma", "0.5"],
    )?;
    ensure!(err.contains("--sigma 0.5 (the run has 0.25)"), "{err}");
    ensure!(
        rows(&part.join("certify.tsv"))?.len() == 3,
        "a refused resume changed the rows"
    );
    ok(tmp.path(), &["certify", "run", "--resume", part_s])?;
    ensure!(
        rows(&part.join("certify.tsv"))? == tsv,
        "resumed rows differ"
    );
    Ok(())
}

#[test]
fn certify_run_through_a_trained_model_and_bad_input() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let victim = tmp.path().join("victim");
    let victim_s = victim.to_str().context("utf-8")?;
    ok(
        tmp.path(),
        &[
            "train",
            "--estimator",
            "fo",
            "--epochs",
            "2",
            "--out",
            victim_s,
        ],
    )?;
    let spec = format!("run:{victim_s}");
    // Certify every third of the first 10 test images through `classifier`; the TSV rows.
    let certify = |classifier: &str, out: &Path| -> Result<Vec<String>> {
        let out_s = out.to_str().context("utf-8")?;
        let args = [
            "certify",
            "run",
            "--classifier",
            classifier,
            "--sigma",
            "0.25",
            "--n",
            "500",
            "--max",
            "4",
            "--skip",
            "3",
            "--out",
            out_s,
        ];
        ok(tmp.path(), &args)?;
        rows(&out.join("certify.tsv"))
    };
    let tsv = certify(&spec, &tmp.path().join("cert"))?;
    let idx: Vec<&str> = tsv[1..]
        .iter()
        .map(|r| r.split('\t').next().unwrap_or(""))
        .collect();
    ensure!(idx == ["0", "3", "6", "9"], "{idx:?}");

    // The same model exported to ONNX, and served over the process protocol (the model and its
    // ONNX file): every black box gives the same predictions and radii on the same images.
    let onnx = tmp.path().join("victim.onnx");
    let onnx_s = onnx.to_str().context("utf-8")?;
    ok(
        tmp.path(),
        &["certify", "export", "--classifier", &spec, "--out", onnx_s],
    )?;
    let err = fails(
        tmp.path(),
        &["certify", "export", "--classifier", &spec, "--out", onnx_s],
    )?;
    ensure!(err.contains("--overwrite"), "{err}");
    let err = fails(
        tmp.path(),
        &[
            "certify",
            "export",
            "--classifier",
            &format!("onnx:{onnx_s}"),
            "--out",
            "x.onnx",
        ],
    )?;
    ensure!(err.contains("only run:DIR"), "{err}");
    let exe = env!("CARGO_BIN_EXE_deepzero");
    let onnx_spec = format!("onnx:{onnx_s}");
    for (name, other) in [
        ("onnx", onnx_spec.clone()),
        (
            "process-run",
            format!("process:'{exe}' certify serve --classifier 'run:{victim_s}'"),
        ),
        (
            "process-onnx",
            format!("process:'{exe}' certify serve --classifier '{onnx_spec}'"),
        ),
    ] {
        let got = certify(&other, &tmp.path().join(format!("cert-{name}")))?;
        ensure!(got == tsv, "{name}: {got:?}\nrun: {tsv:?}");
    }

    // Bad input: each a clear error naming the flag, and no run directory left behind.
    let bad = tmp.path().join("bad");
    let bad_s = bad.to_str().context("utf-8")?;
    for (extra, needle) in [
        (vec!["--sigma", "0"], "--sigma"),
        (vec!["--sigma", "0.25", "--n", "0"], "--n"),
        (vec!["--sigma", "0.25", "--alpha", "1.5"], "--alpha"),
        (
            vec!["--sigma", "0.25", "--dataset", "fashion-mnist"],
            "data set",
        ),
    ] {
        let mut args = vec!["certify", "run", "--classifier", &spec, "--out", bad_s];
        args.extend(extra);
        let err = fails(tmp.path(), &args)?;
        ensure!(err.contains(needle), "{args:?}: {err}");
        ensure!(!bad.exists(), "{args:?} left a run directory");
    }
    let err = fails(
        tmp.path(),
        &[
            "certify",
            "run",
            "--classifier",
            "nonsense",
            "--sigma",
            "0.25",
            "--out",
            bad_s,
        ],
    )?;
    ensure!(err.contains("run:DIR"), "{err}");
    Ok(())
}

/// `certify train-denoiser` (mse, then deepzero from it) and `certify compare` end to end on
/// digits; a second `compare` into the same directory resumes and gives the same table.
#[test]
fn train_denoiser_and_compare() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    ok(
        tmp.path(),
        &[
            "train",
            "--estimator",
            "fo",
            "--epochs",
            "2",
            "--out",
            &p("victim"),
        ],
    )?;
    let victim = format!("run:{}", p("victim"));
    let common = [
        "--classifier",
        victim.as_str(),
        "--sigma",
        "0.25",
        "--dataset",
        "digits",
    ];
    let mut mse = vec![
        "certify",
        "train-denoiser",
        "--method",
        "mse",
        "--train-limit",
        "200",
    ];
    mse.extend(["--epochs", "1", "--out"]);
    let den = p("den");
    mse.push(&den);
    mse.extend(common);
    ok(tmp.path(), &mse)?;
    let dz = p("dz");
    let mut zo = vec![
        "certify",
        "train-denoiser",
        "--method",
        "deepzero",
        "--init",
        &den,
    ];
    zo.extend([
        "--train-limit",
        "64",
        "--epochs",
        "1",
        "--sparsity",
        "0.9",
        "--out",
        &dz,
    ]);
    zo.extend(common);
    ok(tmp.path(), &zo)?;
    let s: Value = serde_json::from_str(&std::fs::read_to_string(
        tmp.path().join("dz/summary.json"),
    )?)?;
    ensure!(s.to_string().contains("black_box_queries"), "{s}");
    for f in ["config.json", "denoiser.json", "metrics.jsonl"] {
        ensure!(tmp.path().join("dz").join(f).is_file(), "dz/{f} missing");
    }
    let cmp = p("cmp");
    let mse_spec = format!("mse={den}");
    let dz_spec = format!("deepzero={dz}");
    let mut args = vec!["certify", "compare", "--denoiser", &mse_spec, &dz_spec];
    args.extend(["--n", "100", "--max", "3", "--out", &cmp]);
    args.extend(common);
    ok(tmp.path(), &args)?;
    let table = std::fs::read_to_string(tmp.path().join("cmp/table.json"))?;
    let t: Value = serde_json::from_str(&table)?;
    for m in ["none", "mse", "deepzero"] {
        ensure!(t[m].is_object(), "{m} missing in {t}");
        ensure!(rows(&tmp.path().join(format!("cmp/certify-{m}.tsv")))?.len() == 4);
    }
    ok(tmp.path(), &args)?;
    ensure!(
        std::fs::read_to_string(tmp.path().join("cmp/table.json"))? == table,
        "resumed table differs"
    );
    // The query budget per training step of each method, from its run's summary.
    let md = std::fs::read_to_string(tmp.path().join("cmp/table.md"))?;
    let budget = s["black_box_queries_per_step"]
        .as_u64()
        .context("deepzero's summary has no black_box_queries_per_step")?;
    ensure!(budget > 0, "{s}");
    ensure!(
        md.contains("black-box images / training step")
            && md
                .lines()
                .any(|l| l.starts_with("| deepzero |") && l.ends_with(&format!(" {budget} |"))),
        "{md}"
    );
    Ok(())
}

/// A digits victim trained with `--seed 3` is certified on its own test split (its
/// `config.json` names the seed), so no certified image is one it trained on; the seed-0
/// split that was used before would have certified some of its training images.
#[test]
fn certification_uses_the_victims_own_split() -> Result<()> {
    use deepzero_core::data::{load, DatasetKind};
    let tmp = tempfile::tempdir()?;
    ok(
        tmp.path(),
        &[
            "train",
            "--estimator",
            "fo",
            "--epochs",
            "1",
            "--seed",
            "3",
            "--out",
            "victim",
        ],
    )?;
    ok(
        tmp.path(),
        &[
            "certify",
            "run",
            "--classifier",
            "run:victim",
            "--sigma",
            "0.25",
            "--n0",
            "10",
            "--n",
            "50",
            "--max",
            "60",
            "--out",
            "cert",
        ],
    )?;
    let summary = read_json(&tmp.path().join("cert").join("summary.json"))?;
    ensure!(summary["split"]["seed"] == 3, "{summary}");
    ensure!(summary["split"]["source"] == "run:victim", "{summary}");
    let idx: Vec<usize> = rows(&tmp.path().join("cert").join("certify.tsv"))?[1..]
        .iter()
        .map(|r| r.split('\t').next().unwrap_or("").parse())
        .collect::<Result<_, _>>()?;
    ensure!(idx.len() == 60, "{idx:?}");
    let (train, test) = load(DatasetKind::Digits, None, 3)?;
    let (_, seed0_test) = load(DatasetKind::Digits, None, 0)?;
    let len = train.channels * train.height * train.width;
    let key = |images: &[f32], i: usize| -> Vec<u32> {
        images[i * len..(i + 1) * len]
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let trained: std::collections::HashSet<Vec<u32>> =
        (0..train.len()).map(|i| key(&train.images, i)).collect();
    let leaked = idx
        .iter()
        .filter(|&&i| trained.contains(&key(&test.images, i)))
        .count();
    ensure!(
        leaked == 0,
        "{leaked} certified images were training images"
    );
    let would_leak = idx
        .iter()
        .filter(|&&i| trained.contains(&key(&seed0_test.images, i)))
        .count();
    ensure!(
        would_leak > 0,
        "the seed-0 split shares no image with the victim's training set: the test sees nothing"
    );
    Ok(())
}
