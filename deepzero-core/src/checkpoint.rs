//! Checkpoints: one atomic unit per epoch.
//!
//! A checkpoint is a directory `checkpoints/epoch-NNNNNN/` inside the run directory holding
//! `tensors.safetensors` (parameters, optimizer state) and `state.json` (epoch, counters, the
//! task's state, metrics so far). It is written under a temporary name, every file and the
//! directory are fsync'd, and one `rename` makes it visible; only then are older checkpoints
//! removed. A kill at any moment leaves either the old checkpoint or the new one, never a mix.
//! [`load`] takes the newest complete checkpoint and checks that its parts agree: the tensors
//! file carries its epoch in the safetensors metadata, so tensors and state of different epochs
//! are refused.
//!
//! A checkpoint describes itself: besides epoch and steps it holds the [`Fingerprint`] its front
//! end gave the state (a hash of the run's configuration and of the files it read), and
//! [`load_checked`] refuses a checkpoint whose fingerprint is not the one expected, saying what
//! differs. Core does not know what the hashes cover; a checkpoint without one (written before
//! fingerprints) still loads.
//!
//! Run directories written before this layout (`checkpoint.safetensors` + `checkpoint.json` at
//! the top) are still read.

use crate::error::{Error, Result};
use crate::model::BnState;
use crate::trainer::{EpochMetrics, TrainState};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Folder of checkpoints inside a run directory.
pub const DIR: &str = "checkpoints";
/// Tensors inside a checkpoint.
pub const TENSORS_FILE: &str = "tensors.safetensors";
/// Counters and task state inside a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// Version of `state.json` (3: steps and fingerprint).
const FORMAT: u32 = 3;
/// Files of the layout before version 2, at the top of the run directory.
const LEGACY_TENSORS: &str = "checkpoint.safetensors";
const LEGACY_STATE: &str = "checkpoint.json";

/// Key of the epoch in the tensors file's metadata.
const EPOCH_KEY: &str = "epoch";

/// What a checkpoint belongs to, in its front end's terms: opaque hashes that core only stores
/// and compares.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Which run wrote it (for messages only; not compared: a run directory may move).
    pub run: String,
    /// Hash of the run's resolved configuration (what it computes).
    pub config: String,
    /// Files the run depends on: name → hash of the contents.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
}

impl Fingerprint {
    /// How a checkpoint with this fingerprint differs from the `expected` one, one phrase per
    /// difference (empty when it belongs to the expected run).
    pub fn differences(&self, expected: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if self.config != expected.config {
            out.push(format!(
                "it belongs to another run ({}, configuration hash {}; this run's is {})",
                self.run, self.config, expected.config
            ));
        }
        for (name, hash) in &self.inputs {
            match expected.inputs.get(name) {
                Some(now) if now != hash => out.push(format!(
                    "{name} changed since it was saved (its hash was {hash}, now {now})"
                )),
                Some(_) => {}
                None => out.push(format!("it was trained with {name}, which this run lacks")),
            }
        }
        for name in expected.inputs.keys() {
            if !self.inputs.contains_key(name) {
                out.push(format!(
                    "this run reads {name}, which the checkpoint was not trained with"
                ));
            }
        }
        out
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    format: u32,
    epoch: usize,
    /// Optimizer steps done (version 3).
    #[serde(default)]
    steps: u64,
    /// What run wrote it (version 3).
    #[serde(default)]
    fingerprint: Option<Fingerprint>,
    queries: u64,
    seconds: f64,
    /// The task's state (version 2).
    #[serde(default)]
    task: serde_json::Value,
    /// Batch-norm statistics (version 1, classification only).
    #[serde(default, skip_serializing)]
    bn: Option<BnState>,
    history: Vec<EpochMetrics>,
}

/// The points between the writes of a save, in order: where [`save_with`] calls its hook (a
/// kill at each of them must leave a resumable run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// After the tensors are written, before the state file.
    AfterTensors,
    /// After both files are written and synced, before the rename.
    BeforeCommit,
    /// After the rename, before older checkpoints are removed.
    BeforeCleanup,
}

fn name_of(epoch: usize) -> String {
    format!("epoch-{epoch:06}")
}

fn epoch_of(name: &str) -> Option<usize> {
    name.strip_prefix("epoch-")?.parse().ok()
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Complete checkpoints in `run_dir`, oldest first: `(epoch, path)`.
fn complete(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = run_dir.join(DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let entry = entry.map_err(|e| Error::io(&root, e))?;
        if let Some(epoch) = entry.file_name().to_str().and_then(epoch_of) {
            out.push((epoch, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Delete every checkpoint of `run_dir` (both layouts, complete or not): what a new run in an
/// old run's directory does first, so that `--resume` cannot continue the old run.
pub fn remove(run_dir: &Path) -> Result<()> {
    let root = run_dir.join(DIR);
    if root.is_dir() {
        std::fs::remove_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    }
    for legacy in [LEGACY_TENSORS, LEGACY_STATE] {
        let p = run_dir.join(legacy);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Whether `run_dir` holds a checkpoint to resume from (either layout).
pub fn exists(run_dir: &Path) -> bool {
    complete(run_dir).is_ok_and(|c| !c.is_empty())
        || (run_dir.join(LEGACY_TENSORS).is_file() && run_dir.join(LEGACY_STATE).is_file())
}

/// Write the state into `run_dir` as one atomic checkpoint.
pub fn save(run_dir: &Path, state: &TrainState) -> Result<()> {
    save_with(run_dir, state, &mut |_| Ok(()))
}

/// [`save`], stopping (with an error) at `stop`: what a kill at that moment leaves behind.
pub fn save_interrupted(
    run_dir: &Path,
    state: &TrainState,
    stop: Option<Interruption>,
) -> Result<()> {
    save_with(run_dir, state, &mut |at| match stop == Some(at) {
        true => Err(Error::Config(format!(
            "checkpoint save interrupted ({at:?})"
        ))),
        false => Ok(()),
    })
}

/// [`save`], calling `hook` at each [`Interruption`] point; an error from it stops the save
/// there. For tests of atomicity: a hook that fails, or one that pauses so that a test can
/// kill the process inside the save.
pub fn save_with(
    run_dir: &Path,
    state: &TrainState,
    hook: &mut dyn FnMut(Interruption) -> Result<()>,
) -> Result<()> {
    let root = run_dir.join(DIR);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = name_of(state.epoch);
    let tmp = root.join(format!("{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let mut tensors: HashMap<String, Tensor> = state.optimizer.clone();
    tensors.insert("params".into(), state.params.clone());
    let tpath = tmp.join(TENSORS_FILE);
    // The epoch goes into the tensors file too, so that a file of another epoch is detected.
    let info = HashMap::from([(EPOCH_KEY.to_string(), state.epoch.to_string())]);
    safetensors::serialize_to_file(&tensors, Some(info), &tpath)
        .map_err(|e| Error::data(&tpath, e.to_string()))?;
    File::open(&tpath)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tpath, e))?;
    hook(Interruption::AfterTensors)?;

    let meta = Meta {
        format: FORMAT,
        epoch: state.epoch,
        steps: state.steps,
        fingerprint: state.fingerprint.clone(),
        queries: state.queries,
        seconds: state.seconds,
        task: state.task.clone(),
        bn: None,
        history: state.history.clone(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|source| Error::Json {
        context: "checkpoint".into(),
        source,
    })?;
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(&tmp)?;
    hook(Interruption::BeforeCommit)?;

    let dest = root.join(&name);
    if dest.exists() {
        // The same epoch saved again (a resumed run repeating it): replace it.
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    sync_dir(&root)?;
    hook(Interruption::BeforeCleanup)?;

    // The new checkpoint is durable: drop older ones, leftovers of interrupted saves, and the
    // files of the layout before version 2.
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let entry = entry.map_err(|e| Error::io(&root, e))?;
        let fname = entry.file_name();
        let fname = fname.to_string_lossy();
        let older = epoch_of(&fname).is_some_and(|e| e != state.epoch);
        if older || fname.contains(".tmp-") {
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    for legacy in [LEGACY_TENSORS, LEGACY_STATE] {
        let p = run_dir.join(legacy);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(&root)
}

/// Read the newest checkpoint of `run_dir` and check that it belongs to the run `expected`
/// describes (see [`Fingerprint::differences`]); the state returned carries `expected`, so that
/// the checkpoints it goes on to write do too. A checkpoint without a fingerprint (written
/// before them) loads unchecked: its [`TrainState::fingerprint`] is `None` until replaced by
/// the caller (which may warn).
pub fn load_checked(run_dir: &Path, device: &Device, expected: &Fingerprint) -> Result<TrainState> {
    let mut state = load(run_dir, device)?;
    if let Some(saved) = &state.fingerprint {
        let differences = saved.differences(expected);
        if !differences.is_empty() {
            return Err(Error::data(
                newest(run_dir)?,
                format!(
                    "the checkpoint of epoch {} does not fit this run: {}",
                    state.epoch,
                    differences.join("; ")
                ),
            ));
        }
        state.fingerprint = Some(expected.clone());
    }
    Ok(state)
}

/// The newest checkpoint's directory (or the legacy state file), for messages.
fn newest(run_dir: &Path) -> Result<PathBuf> {
    Ok(match complete(run_dir)?.pop() {
        Some((_, dir)) => dir,
        None => run_dir.join(LEGACY_STATE),
    })
}

/// Read the newest checkpoint of `run_dir` (its parts checked against each other, its
/// fingerprint not: [`load_checked`]).
pub fn load(run_dir: &Path, device: &Device) -> Result<TrainState> {
    if let Some((epoch, dir)) = complete(run_dir)?.pop() {
        let state = read(&dir.join(TENSORS_FILE), &dir.join(STATE_FILE), device)?;
        if state.epoch != epoch {
            return Err(Error::data(
                dir.join(STATE_FILE),
                format!(
                    "the checkpoint directory is for epoch {epoch} but its state says epoch {}; the checkpoint is damaged",
                    state.epoch
                ),
            ));
        }
        return Ok(state);
    }
    let (t, s) = (run_dir.join(LEGACY_TENSORS), run_dir.join(LEGACY_STATE));
    if t.is_file() && s.is_file() {
        return read(&t, &s, device);
    }
    Err(Error::NotFound(format!(
        "{}: no checkpoint ({DIR}/epoch-N/) to resume from; the run saves one after each epoch",
        run_dir.display()
    )))
}

fn read(tpath: &Path, spath: &Path, device: &Device) -> Result<TrainState> {
    let tensors = std::fs::read(tpath).map_err(|e| Error::io(tpath, e))?;
    let state = std::fs::read(spath).map_err(|e| Error::io(spath, e))?;
    parse(&tensors, tpath, &state, spath, device)
}

/// A checkpoint from the bytes of its two files, `tensors.safetensors` and `state.json`, with
/// their paths for error messages. Checks that the parts agree: a 1-D floating-point `params`
/// tensor of finite values and metrics for every epoch.
pub fn parse(
    tensors: &[u8],
    tpath: &Path,
    state: &[u8],
    spath: &Path,
    device: &Device,
) -> Result<TrainState> {
    let mut tensors_map = candle_core::safetensors::load_buffer(tensors, device)
        .map_err(|e| Error::data(tpath, format!("not a readable safetensors file ({e})")))?;
    let params = tensors_map
        .remove("params")
        .ok_or_else(|| Error::data(tpath, "no `params` tensor in the checkpoint"))?;
    check_params(&params)
        .map_err(|msg| Error::data(tpath, format!("{msg}; the checkpoint is damaged")))?;
    let meta: Meta = serde_json::from_slice(state).map_err(|e| {
        Error::data(
            spath,
            format!("not a readable checkpoint state ({e}); it is damaged"),
        )
    })?;
    if let Some(epoch) = tensors_epoch(tensors, tpath)? {
        if epoch != meta.epoch {
            return Err(Error::data(
                tpath,
                format!(
                    "the checkpoint mixes two epochs: its tensors are of epoch {epoch}, its \
                     state ({}) of epoch {}; it was damaged or assembled from two checkpoints: \
                     restore it from a copy or start the run again",
                    spath.display(),
                    meta.epoch
                ),
            ));
        }
    }
    if meta.history.len() != meta.epoch {
        return Err(Error::data(
            spath,
            format!(
                "the checkpoint is at epoch {} but holds metrics of {} epochs; it is damaged",
                meta.epoch,
                meta.history.len()
            ),
        ));
    }
    let task = match (meta.task, meta.bn) {
        (serde_json::Value::Null, Some(bn)) => serde_json::json!({ "bn": bn }),
        (t, _) => t,
    };
    Ok(TrainState {
        epoch: meta.epoch,
        steps: meta.steps,
        fingerprint: meta.fingerprint,
        params,
        task,
        optimizer: tensors_map,
        queries: meta.queries,
        seconds: meta.seconds,
        history: meta.history,
    })
}

/// The epoch recorded in a tensors file's metadata (`None` for files written before it was).
fn tensors_epoch(bytes: &[u8], tpath: &Path) -> Result<Option<usize>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::data(tpath, e.to_string()))?;
    let Some(value) = header.metadata().as_ref().and_then(|m| m.get(EPOCH_KEY)) else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|_| {
        Error::data(
            tpath,
            format!("the metadata's epoch `{value}` is not a whole number; the file is damaged"),
        )
    })
}

/// `params` is a 1-D floating-point tensor of finite values (the optimizer checks its own
/// tensors when it loads them).
fn check_params(params: &Tensor) -> std::result::Result<(), String> {
    use candle_core::DType;
    if params.rank() != 1 {
        return Err(format!(
            "`params` has shape {:?}, expected one dimension",
            params.dims()
        ));
    }
    if !matches!(params.dtype(), DType::F32 | DType::F64) {
        return Err(format!(
            "`params` is {:?}, expected f32 or f64",
            params.dtype()
        ));
    }
    let values = params
        .to_dtype(DType::F64)
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(|e| e.to_string())?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("`params` entry {i} is {}", values[i])),
        None => Ok(()),
    }
}
