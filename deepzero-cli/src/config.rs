//! `--config FILE` for every command, and what a run's saved configuration is checked against.
//!
//! A config file holds flags as keys: TOML (`epochs = 3`, `dataset = "digits"`), or JSON by the
//! `.json` extension, so that a run's own `config.json` is one. Keys are long flag names with
//! dashes or underscores; nested tables and objects (`[estimator]`, the flattened option groups
//! of `config.json`) are read as if they were flat. [`expand`] reads the file before clap parses
//! and inserts every key that the command line does not give as a flag (`--key=value`), so that
//! clap checks and converts file and command line alike and the command line wins.
//!
//! The resume checks of the commands that continue a run live here too: which flags given to a
//! resume disagree with the saved configuration ([`resume_conflicts`]), and the checkpoint
//! [`Fingerprint`] of a configuration and its input files ([`fingerprint`]).

use anyhow::{bail, Context, Result};
use clap::{Arg, ArgAction, Command};
use deepzero_core::checkpoint::{self, Fingerprint};
use deepzero_core::trainer::TrainState;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The flag that names a config file (a global flag of every command).
pub const FLAG: &str = "config";

/// Keys of a command's saved `config.json` that are not flags (resolved settings written beside
/// the flags for the record): `(command path, keys)`. They are skipped with all they hold.
const NOT_FLAGS: &[(&[&str], &[&str])] =
    &[(&["pde"], &["dataset", "network", "correction", "train"])];

/// Why a config file cannot be used; `code` is the exit status (2 for a usage error, as clap's:
/// bad contents; 1 for a file that cannot be read).
#[derive(Debug)]
pub struct ConfigError {
    pub code: i32,
    pub message: String,
}

fn usage(file: &Path, message: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        code: 2,
        message: format!("--config {}: {message}", file.display()),
    }
}

/// `argv` with the flags of its `--config FILE` inserted after the subcommand words, each key the
/// command line does not give (unchanged without `--config`).
pub fn expand(root: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let words: Vec<Option<&str>> = argv.iter().map(|w| w.to_str()).collect();
    // The subcommand path: the leading words that name subcommands.
    let mut cmd = root;
    let mut at = 1;
    let mut path = Vec::new();
    while let Some(sub) = words
        .get(at)
        .copied()
        .flatten()
        .and_then(|w| cmd.find_subcommand(w))
    {
        path.push(sub.get_name().to_string());
        cmd = sub;
        at += 1;
    }
    let flags = &words[at..];
    let flags = &flags[..flags
        .iter()
        .position(|w| *w == Some("--"))
        .unwrap_or(flags.len())];
    let Some(file) = config_file(flags) else {
        return Ok(argv);
    };
    let table = read(&file)?;
    let ignored: &[&str] = NOT_FLAGS
        .iter()
        .find(|(p, _)| p.iter().eq(path.iter()))
        .map_or(&[], |(_, keys)| keys);
    let mut entries = Vec::new();
    flatten(&table, "", ignored, &mut entries);
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| {
            !a.is_positional()
                && a.get_id() != FLAG
                && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
        })
        .collect();
    let given = given_args(&args, flags);
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    let mut inserted: Vec<OsString> = Vec::new();
    for (key, value) in &entries {
        let name = key.rsplit('.').next().unwrap_or(key);
        let arg = find_arg(&args, name).ok_or_else(|| unknown_key(&file, key, &args))?;
        let id = arg.get_id().as_str();
        if let Some(first) = seen.insert(id, key.clone()) {
            return Err(usage(
                &file,
                format!("keys `{first}` and `{key}` both set --{}", long(arg)),
            ));
        }
        if given.contains(&id) {
            continue;
        }
        for v in flag_values(&file, key, arg, value)? {
            inserted.push(v.into());
        }
    }
    let mut out = argv;
    out.splice(at..at, inserted);
    Ok(out)
}

/// The value of `--config` among a command's flag words.
fn config_file(flags: &[Option<&str>]) -> Option<PathBuf> {
    let long = format!("--{FLAG}");
    for (i, w) in flags.iter().enumerate() {
        match w {
            Some(w) if *w == long => return flags.get(i + 1).copied().flatten().map(PathBuf::from),
            Some(w) => {
                if let Some(v) = w.strip_prefix(&long).and_then(|r| r.strip_prefix('=')) {
                    return Some(PathBuf::from(v));
                }
            }
            None => {}
        }
    }
    None
}

/// The file's keys and values: TOML, or JSON for a `.json` file.
fn read(file: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        code: 1,
        message: format!("--config {}: {e}", file.display()),
    })?;
    let value = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| usage(file, format!("not valid JSON: {e}")))?
    } else {
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            // toml's message says where: `TOML parse error at line 3, column 9` and the line.
            usage(
                file,
                format!("not valid TOML: {}", e.to_string().trim_end()),
            )
        })?;
        serde_json::to_value(table).map_err(|e| usage(file, e))?
    };
    if !value.is_object() {
        return Err(usage(
            file,
            "expected a table of flags (`key = value` lines)",
        ));
    }
    Ok(value)
}

/// `(dotted key, value)` of every leaf of `v` (objects are walked into), except the top-level
/// keys in `ignored`.
fn flatten(v: &Value, prefix: &str, ignored: &[&str], out: &mut Vec<(String, Value)>) {
    let Some(obj) = v.as_object() else {
        return;
    };
    for (k, x) in obj {
        if prefix.is_empty() && ignored.contains(&k.as_str()) {
            continue;
        }
        let key = match prefix {
            "" => k.clone(),
            p => format!("{p}.{k}"),
        };
        match x {
            Value::Object(_) => flatten(x, &key, &[], out),
            _ => out.push((key, x.clone())),
        }
    }
}

fn long(arg: &Arg) -> String {
    arg.get_long()
        .map_or_else(|| arg.get_id().as_str().replace('_', "-"), str::to_string)
}

/// The flag a key names: its long name or an alias (dashes or underscores), or its field name.
fn find_arg<'a>(args: &[&'a Arg], key: &str) -> Option<&'a Arg> {
    let dashed = key.replace('_', "-");
    let underscored = key.replace('-', "_");
    args.iter().copied().find(|a| {
        a.get_id().as_str() == underscored
            || a.get_long() == Some(dashed.as_str())
            || a.get_all_aliases()
                .is_some_and(|al| al.contains(&dashed.as_str()))
    })
}

/// The ids of the flags among the command line's words.
fn given_args<'a>(args: &[&'a Arg], flags: &[Option<&str>]) -> Vec<&'a str> {
    let mut given = Vec::new();
    for w in flags.iter().flatten() {
        let found = if let Some(name) = w.strip_prefix("--") {
            find_arg(args, name.split('=').next().unwrap_or(name))
                .filter(|a| a.get_long().is_some())
        } else if let Some(shorts) = w.strip_prefix('-') {
            shorts
                .chars()
                .next()
                .and_then(|c| args.iter().copied().find(|a| a.get_short() == Some(c)))
        } else {
            None
        };
        if let Some(a) = found {
            given.push(a.get_id().as_str());
        }
    }
    given
}

fn unknown_key(file: &Path, key: &str, args: &[&Arg]) -> ConfigError {
    let name = key.rsplit('.').next().unwrap_or(key).replace('_', "-");
    // Close in spelling, or abbreviated by initials (`learning-rate` → `lr`).
    let initials: String = name.split('-').filter_map(|w| w.chars().next()).collect();
    let closest = args.iter().map(|a| long(a)).min_by_key(|l| {
        let full = edit_distance(l, &name);
        match name.contains('-') {
            true => (full.min(edit_distance(l, &initials)), full),
            false => (full, full),
        }
    });
    usage(
        file,
        match closest {
            Some(c) => {
                format!("unknown key `{key}`: not a flag of this command (did you mean `{c}`?)")
            }
            None => format!("unknown key `{key}`: this command takes no flags"),
        },
    )
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The command-line words for `key = value` of flag `arg`, the value checked by the flag's own
/// parser (enum values also in serde's or Rust's spelling: `fashion_mnist`, `FashionMnist`).
fn flag_values(
    file: &Path,
    key: &str,
    arg: &Arg,
    value: &Value,
) -> Result<Vec<String>, ConfigError> {
    let flag = format!("--{}", long(arg));
    let wrong = |what: &str| {
        usage(
            file,
            format!("key `{key}`: {what} for {flag}, got {}", short_json(value)),
        )
    };
    if !arg.get_action().takes_values() {
        return match value {
            Value::Bool(true) => Ok(vec![flag]),
            Value::Bool(false) | Value::Null => Ok(vec![]),
            _ => Err(wrong("expected true or false")),
        };
    }
    let many = matches!(arg.get_action(), ArgAction::Append);
    let items: Vec<&Value> = match value {
        Value::Null => vec![],
        Value::Array(items) if many => items.iter().collect(),
        Value::Array(_) => return Err(wrong("expected one value, not a list,")),
        v => vec![v],
    };
    let mut words = Vec::new();
    for item in items {
        let text = match item {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(wrong("expected a string or a number")),
        };
        let text = match check_value(arg, &text) {
            Ok(()) => text,
            Err(reason) => {
                let kebab = kebab_case(&text);
                if kebab != text && check_value(arg, &kebab).is_ok() {
                    kebab
                } else {
                    return Err(usage(
                        file,
                        format!(
                            "key `{key}`: invalid value {} for {flag}: {reason}",
                            short_json(item)
                        ),
                    ));
                }
            }
        };
        words.push(format!("{flag}={text}"));
    }
    Ok(words)
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Whether `arg`'s value parser takes `text` (the reason when not).
fn check_value(arg: &Arg, text: &str) -> std::result::Result<(), String> {
    let probe = Arg::new("value")
        .long("value")
        .action(ArgAction::Set)
        .allow_hyphen_values(true)
        .value_parser(arg.get_value_parser().clone());
    let delimited = match arg.get_value_delimiter() {
        Some(d) => probe.value_delimiter(d),
        None => probe,
    };
    let result = Command::new("config")
        .no_binary_name(true)
        .arg(delimited)
        .try_get_matches_from([format!("--value={text}")]);
    let Err(e) = result else {
        return Ok(());
    };
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_string())
        .collect();
    Err(if !possible.is_empty() {
        format!("expected one of {}", possible.join(", "))
    } else {
        match std::error::Error::source(&e) {
            Some(source) => source.to_string(),
            None => e.kind().to_string(),
        }
    })
}

/// `FashionMnist`, `fashion_mnist` → `fashion-mnist`.
fn kebab_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 && !out.ends_with('-') {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// resume checks
// ---------------------------------------------------------------------------------------------

/// Settings a resume may change: how to run (threads, ranks), and how long (`--epochs`).
pub const RESUME_MAY_SET: &[&str] = &[
    "resume",
    "threads",
    "distributed",
    "rank_timeout",
    "overwrite",
    "epochs",
    FLAG,
];

/// `--flag value (the run has saved)` for each flag in `given` (clap ids) that disagrees with
/// the saved run's configuration; `args` is the resuming command's, both as they serialise.
pub fn resume_conflicts(
    given: &[String],
    args: &impl Serialize,
    saved: &impl Serialize,
) -> Result<Vec<String>> {
    let mine = serde_json::to_value(args)?;
    let theirs = serde_json::to_value(saved)?;
    let mut conflicts = Vec::new();
    for id in given
        .iter()
        .filter(|id| !RESUME_MAY_SET.contains(&id.as_str()))
    {
        let (a, b) = (setting_value(&mine, id), setting_value(&theirs, id));
        if a != b {
            conflicts.push(format!(
                "--{} {} (the run has {})",
                id.replace('_', "-"),
                show(a),
                show(b)
            ));
        }
    }
    Ok(conflicts)
}

/// The setting names (leaf keys, groups flattened) of a serialised config.
pub fn setting_ids(v: &Value) -> Vec<String> {
    let mut entries = Vec::new();
    flatten(v, "", &[], &mut entries);
    entries
        .into_iter()
        .map(|(key, _)| key.rsplit('.').next().unwrap_or(&key).to_string())
        .collect()
}

fn show(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| show(Some(i)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Null) | None => "unset".into(),
        Some(v) => v.to_string(),
    }
}

/// `--resume dir` of a run saved as `saved`: it must have a checkpoint, and the flags `given`
/// to the resuming command (`args`) must agree with the saved ones.
pub fn check_resumable(
    dir: &Path,
    given: &[String],
    args: &impl Serialize,
    saved: &impl Serialize,
) -> Result<()> {
    if !deepzero_core::checkpoint::exists(dir) {
        bail!(
            "--resume {}: the run stopped before its first checkpoint (written at the end of \
             epoch 1), so there is nothing to resume; start it again with the flags in {} and \
             `--out {} --overwrite`",
            dir.display(),
            dir.join("config.json").display(),
            dir.display()
        );
    }
    refuse_conflicts(
        &format!("--resume {}", dir.display()),
        &resume_conflicts(given, args, saved)?,
        "drop them or start a new run with --out",
    )
}

/// The error for flags of `what` (`--resume DIR`) that disagree with the saved run.
pub fn refuse_conflicts(what: &str, conflicts: &[String], fix: &str) -> Result<()> {
    if conflicts.is_empty() {
        return Ok(());
    }
    let many = conflicts.len() > 1;
    bail!(
        "{what}: {} the saved run ({}); {fix}",
        if many {
            "these flags disagree with"
        } else {
            "this flag disagrees with"
        },
        conflicts.join(", "),
    )
}

/// The value of the setting `key` in a serialised config: flattened option groups are nested
/// objects, and a group may share its name with one of its settings (`estimator.estimator`).
pub fn setting_value<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    if let Some(x) = obj.get(key) {
        return match x.is_object() {
            true => setting_value(x, key).or(Some(x)),
            false => Some(x),
        };
    }
    obj.values()
        .filter(|x| x.is_object())
        .find_map(|x| setting_value(x, key))
}

/// Settings a configuration's hash leaves out besides [`RESUME_MAY_SET`]: where the run and its
/// copies live (`out`; an input file's contents are hashed instead of its path).
const NOT_HASHED: &[&str] = &["out"];

/// FNV-1a (64 bits) of `bytes`, as 16 hex digits: stable across builds and platforms.
pub fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `v` with its object keys sorted and the keys in `drop` removed at any depth.
fn canonical(v: &Value, drop: &[&str]) -> Value {
    match v {
        Value::Object(obj) => {
            let mut keys: Vec<&String> =
                obj.keys().filter(|k| !drop.contains(&k.as_str())).collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&obj[k], drop)))
                    .collect::<Map<String, Value>>(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| canonical(i, drop)).collect()),
        other => other.clone(),
    }
}

/// The checkpoint fingerprint of the run in `dir` with configuration `config` (hashed without
/// [`RESUME_MAY_SET`], [`NOT_HASHED`] and the command's own `also_not_hashed`) and the files `inputs` of `dir`
/// that it reads (`ratios.json`; a file that is not there is left out).
pub fn fingerprint(
    dir: &Path,
    config: &impl Serialize,
    also_not_hashed: &[&str],
    inputs: &[&str],
) -> Result<Fingerprint> {
    let drop: Vec<&str> = RESUME_MAY_SET
        .iter()
        .chain(NOT_HASHED)
        .chain(also_not_hashed)
        .copied()
        .collect();
    let json = canonical(&serde_json::to_value(config)?, &drop);
    let mut files = BTreeMap::new();
    for name in inputs {
        let path = dir.join(name);
        if path.is_file() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            files.insert(name.to_string(), hash(&bytes));
        }
    }
    Ok(Fingerprint {
        run: dir.display().to_string(),
        config: hash(serde_json::to_string(&json)?.as_bytes()),
        inputs: files,
    })
}

/// The newest checkpoint of `dir`, checked against `expected`; one written before fingerprints
/// loads with a warning and carries `expected` from now on.
pub fn load_checkpoint(
    dir: &Path,
    device: &candle_core::Device,
    expected: &Fingerprint,
) -> Result<TrainState> {
    let mut state = checkpoint::load_checked(dir, device, expected)?;
    if state.fingerprint.is_none() {
        crate::note!(
            "warning: the checkpoint in {} records no configuration hash (written by an older \
             deepzero); it is resumed unchecked",
            dir.display()
        );
        state.fingerprint = Some(expected.clone());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser};

    #[derive(Parser, Debug)]
    struct Root {
        #[command(subcommand)]
        command: Sub,
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Go(GoArgs),
    }
    #[derive(Args, Debug)]
    struct GoArgs {
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        #[arg(long)]
        lr: Option<f64>,
        #[arg(long, value_enum, default_value_t = crate::common::DataArg::Digits)]
        dataset: crate::common::DataArg,
        #[arg(long)]
        no_augment: bool,
        #[arg(long, value_delimiter = ',')]
        depths: Vec<usize>,
    }

    fn run(toml: &str, cli: &[&str]) -> Result<Vec<String>, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, toml).expect("write");
        let mut argv: Vec<OsString> = vec!["deepzero".into(), "go".into()];
        argv.extend(cli.iter().map(OsString::from));
        argv.push("--config".into());
        argv.push(file.clone().into());
        use clap::CommandFactory;
        let out = expand(&Root::command(), argv)?;
        Ok(out
            .into_iter()
            .skip(2)
            .map(|w| w.to_string_lossy().into_owned())
            .filter(|w| !w.ends_with("c.toml") && w != "--config")
            .collect())
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let words = run(
            "epochs = 3\nlr = 0.5\ndataset = \"FashionMnist\"\nno_augment = true\n[group]\ndepths = [1, 2]\n",
            &["--lr", "0.1"],
        )
        .expect("expands");
        assert_eq!(
            words,
            [
                "--dataset=fashion-mnist",
                "--epochs=3",
                "--depths=1",
                "--depths=2",
                "--no-augment",
                "--lr",
                "0.1"
            ]
        );
    }

    #[test]
    fn bad_keys_and_values_name_the_key() {
        let e = run("epoch = 3\n", &[]).unwrap_err();
        assert!(
            e.message.contains("unknown key `epoch`") && e.message.contains("`epochs`"),
            "{}",
            e.message
        );
        assert_eq!(e.code, 2);
        let e = run("epochs = 2.5\n", &[]).unwrap_err();
        assert!(
            e.message
                .contains("key `epochs`: invalid value 2.5 for --epochs"),
            "{}",
            e.message
        );
        let e = run("no-augment = 1\n", &[]).unwrap_err();
        assert!(
            e.message.contains("expected true or false"),
            "{}",
            e.message
        );
        let e = run("dataset = \"vgg\"\n", &[]).unwrap_err();
        assert!(
            e.message.contains("expected one of digits"),
            "{}",
            e.message
        );
        let e = run("epochs = [1, 2]\n", &[]).unwrap_err();
        assert!(e.message.contains("not a list"), "{}", e.message);
    }

    #[test]
    fn hashes_are_stable() {
        // FNV-1a test vectors.
        assert_eq!(hash(b""), "cbf29ce484222325");
        assert_eq!(hash(b"a"), "af63dc4c8601ec8c");
        let a = serde_json::json!({"b": 1, "a": {"threads": 4, "lr": 0.1}});
        let b = serde_json::json!({"a": {"lr": 0.1, "threads": 8}, "b": 1});
        let d = Path::new("/nonexistent");
        assert_eq!(
            fingerprint(d, &a, &[], &[]).expect("hash").config,
            fingerprint(d, &b, &[], &[]).expect("hash").config
        );
    }
}
