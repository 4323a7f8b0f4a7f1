//! Checkpoints: `checkpoint.safetensors` (parameters, optimizer state) and `checkpoint.json`
//! (epoch, counters, batch-norm statistics, metrics so far), both written atomically.

use crate::error::{Error, Result};
use crate::model::BnState;
use crate::trainer::{EpochMetrics, TrainState};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// File names inside a run directory.
pub const TENSORS_FILE: &str = "checkpoint.safetensors";
/// Companion JSON file.
pub const STATE_FILE: &str = "checkpoint.json";

#[derive(Serialize, Deserialize)]
struct Meta {
    epoch: usize,
    queries: u64,
    seconds: f64,
    bn: BnState,
    history: Vec<EpochMetrics>,
}

fn atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write the state into `dir`.
pub fn save(dir: &Path, state: &TrainState) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = state.optimizer.clone();
    tensors.insert("params".into(), state.params.clone());
    atomic(&dir.join(TENSORS_FILE), |p| {
        Ok(candle_core::safetensors::save(&tensors, p)?)
    })?;
    let meta = Meta {
        epoch: state.epoch,
        queries: state.queries,
        seconds: state.seconds,
        bn: state.bn.clone(),
        history: state.history.clone(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|source| Error::Json {
        context: "checkpoint".into(),
        source,
    })?;
    atomic(&dir.join(STATE_FILE), |p| {
        std::fs::write(p, &json).map_err(|e| Error::io(p, e))
    })
}

/// Read a state written by [`save`].
pub fn load(dir: &Path, device: &Device) -> Result<TrainState> {
    let tpath = dir.join(TENSORS_FILE);
    let spath = dir.join(STATE_FILE);
    if !tpath.exists() || !spath.exists() {
        return Err(Error::NotFound(format!(
            "{}: no checkpoint ({TENSORS_FILE} and {STATE_FILE}) to resume from; the run saves one after each epoch",
            dir.display()
        )));
    }
    let mut tensors = candle_core::safetensors::load(&tpath, device)
        .map_err(|e| Error::data(&tpath, e.to_string()))?;
    let params = tensors
        .remove("params")
        .ok_or_else(|| Error::data(&tpath, "no `params` tensor in the checkpoint"))?;
    let bytes = std::fs::read(&spath).map_err(|e| Error::io(&spath, e))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| Error::data(&spath, e.to_string()))?;
    Ok(TrainState {
        epoch: meta.epoch,
        params,
        bn: meta.bn,
        optimizer: tensors,
        queries: meta.queries,
        seconds: meta.seconds,
        history: meta.history,
    })
}
