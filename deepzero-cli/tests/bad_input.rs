//! The README's table of bad inputs ("Bad input, case by case"), run row by row: each command
//! must end with the exit code of its row (2: clap's usage errors, 1: every other error), its
//! message must contain the row's text (`…` stands for parts left out, such as memory figures),
//! nothing may panic or hang, and the scratch directory the commands run in must be unchanged
//! afterwards: no run directory, empty or half-written, and no fixture touched.
//!
//! The README is the single list of cases, so the table and this test cannot drift apart.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::{snapshot, SMALL};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BEGIN: &str = "<!-- bad-input-table:begin -->";
const END: &str = "<!-- bad-input-table:end -->";
/// Longest a bad-input command may take: all of them fail during set-up.
const LIMIT: Duration = Duration::from_secs(120);

/// One row: the arguments after `deepzero`, the exit code, the message fragments in order.
#[derive(Debug)]
struct Case {
    number: String,
    args: Vec<String>,
    code: i32,
    fragments: Vec<String>,
}

/// The text of a table cell: inline code (`x` or ``x``) unwrapped, `\|` unescaped.
fn cell_text(cell: &str) -> String {
    let t = cell.trim();
    let ticks = t.chars().take_while(|&c| c == '`').count();
    let inner = match ticks {
        0 => t,
        n => t[n..t.len() - n].trim(),
    };
    inner.replace("\\|", "|")
}

/// Splits a table row on the `|` that are not escaped.
fn cells(row: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = row.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push_str("\\|");
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn readme_cases() -> Result<Vec<Case>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let start = text
        .find(BEGIN)
        .context("README: no bad-input table begin marker")?;
    let end = text
        .find(END)
        .context("README: no bad-input table end marker")?;
    let mut cases = Vec::new();
    for line in text[start + BEGIN.len()..end].lines() {
        let c = cells(line);
        if c.len() != 4 || c[0].trim().parse::<usize>().is_err() {
            continue; // header, rule, blank
        }
        let command = cell_text(&c[1]);
        let mut words = command.split_whitespace().map(str::to_string);
        ensure!(
            words.next().as_deref() == Some("deepzero"),
            "row {}: the command must start with `deepzero`: {command}",
            c[0].trim()
        );
        cases.push(Case {
            number: c[0].trim().to_string(),
            args: words.collect(),
            code: c[2]
                .trim()
                .parse()
                .with_context(|| format!("row {}: exit", c[0]))?,
            fragments: cell_text(&c[3])
                .split('…')
                .map(|f| f.trim().to_string())
                .filter(|f| !f.is_empty())
                .collect(),
        });
    }
    Ok(cases)
}

/// The fixtures the rows name, in `dir`.
fn make_fixtures(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("notes.txt"), "not a data set\n")?;
    std::fs::write(dir.join("notes.onnx"), "not a model\n")?;
    std::fs::write(dir.join("empty.json"), "")?;
    std::fs::write(dir.join("bad-ratios.json"), "{\"conv1\": 3.0}\n")?;
    std::fs::write(dir.join("broken.toml"), "lr = \n")?;
    std::fs::write(dir.join("unknown.toml"), "lr = 0.1\nlearning_rate = 3\n")?;
    std::fs::write(dir.join("badtype.toml"), "lr = \"fast\"\n")?;
    std::fs::create_dir(dir.join("emptydir"))?;
    let mut args = vec!["train", "--dataset", "digits", "--estimator", "fo"];
    args.extend(SMALL);
    args.extend(["--epochs", "1", "--out", "done"]);
    common::ok(dir, &args)?;
    // What a kill before the first checkpoint leaves: the saved flags, no checkpoint.
    std::fs::create_dir(dir.join("half"))?;
    std::fs::copy(dir.join("done/config.json"), dir.join("half/config.json"))?;
    Ok(())
}

/// Runs `deepzero args` in `cwd` with a time limit; returns (exit code, stderr).
fn run(cwd: &Path, logs: &Path, args: &[String]) -> Result<(Option<i32>, String)> {
    let (out, err) = (logs.join("stdout"), logs.join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_deepzero"))
        .args(args)
        .current_dir(cwd)
        .env_remove("DEEPZERO_DATA")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > LIMIT {
            child.kill()?;
            child.wait()?;
            bail!("deepzero {args:?} still ran after {LIMIT:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status.code(), std::fs::read_to_string(&err)?))
}

#[test]
fn every_bad_input_of_the_readme_table_fails_as_documented() -> Result<()> {
    let cases = readme_cases()?;
    ensure!(
        cases.len() >= 40,
        "the README's bad-input table has {} rows; it must list at least 40",
        cases.len()
    );
    let scratch = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    make_fixtures(scratch.path())?;
    let mut before = snapshot(scratch.path())?;
    let mut failures = Vec::new();
    for case in &cases {
        let (code, err) = run(scratch.path(), logs.path(), &case.args)?;
        let mut problems = Vec::new();
        if code != Some(case.code) {
            problems.push(format!("exit code {code:?}, the table says {}", case.code));
        }
        if err.contains("panicked") {
            problems.push("it panicked".to_string());
        }
        if !err.contains("error") {
            problems.push("no `error` line".to_string());
        }
        let mut rest = err.as_str();
        for f in &case.fragments {
            match rest.find(f.as_str()) {
                Some(at) => rest = &rest[at + f.len()..],
                None => problems.push(format!("the message lacks (in order) {f:?}")),
            }
        }
        let after = snapshot(scratch.path())?;
        if after != before {
            let changed: Vec<_> = after
                .iter()
                .filter(|x| !before.contains(x))
                .chain(before.iter().filter(|x| !after.contains(x)))
                .map(|(p, _)| p.display().to_string())
                .collect();
            problems.push(format!("it changed the directory: {changed:?}"));
            // Restore the fixtures for the next rows.
            for entry in std::fs::read_dir(scratch.path())? {
                let p = entry?.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            make_fixtures(scratch.path())?;
            before = snapshot(scratch.path())?;
        }
        if !problems.is_empty() {
            failures.push(format!(
                "row {} `deepzero {}`: {}\n{err}",
                case.number,
                case.args.join(" "),
                problems.join("; ")
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} rows fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}
