//! Where each parameter tensor lives in the flat parameter vector.

use serde::{Deserialize, Serialize};

/// What a parameter tensor is; estimators and pruning treat kinds differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Weight of a convolution or linear layer.
    Weight,
    /// Bias of a convolution or linear layer.
    Bias,
    /// Batch-norm scale (gamma).
    BnScale,
    /// Batch-norm shift (beta).
    BnShift,
}

impl ParamKind {
    /// Conv and linear weights: the tensors that pruning scores and sparse CGE samples.
    pub fn is_weight(self) -> bool {
        matches!(self, ParamKind::Weight)
    }
}

/// How a parameter tensor is initialised ([`crate::model::Model::init_params`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// By kind: Kaiming-normal weights, zero biases and shifts, unit batch-norm scales.
    #[default]
    Default,
    /// All zeros (a last layer that makes a fresh model output exactly zero).
    Zeros,
}

/// One parameter tensor inside the flat vector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamEntry {
    /// Dotted name, e.g. `conv1.weight`.
    pub name: String,
    /// What the tensor is.
    pub kind: ParamKind,
    /// Shape in PyTorch convention (`[out, in]`, `[out, in, kh, kw]`, `[c]`).
    pub shape: Vec<usize>,
    /// First index in the flat vector.
    pub offset: usize,
    /// Index of the graph node that reads this tensor.
    pub node: usize,
    /// How the tensor is initialised.
    #[serde(default)]
    pub init: Init,
}

impl ParamEntry {
    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for a zero-sized tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The range of the flat vector this entry occupies.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The layout of all parameters of a model in one flat vector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    /// Entries in order of their offsets.
    pub entries: Vec<ParamEntry>,
}

impl ParamLayout {
    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.entries.last().map_or(0, |e| e.offset + e.len())
    }
    /// True when the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Append a tensor; returns its index in `entries`.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        kind: ParamKind,
        shape: Vec<usize>,
        node: usize,
    ) -> usize {
        let offset = self.len();
        self.entries.push(ParamEntry {
            name: name.into(),
            kind,
            shape,
            offset,
            node,
            init: Init::Default,
        });
        self.entries.len() - 1
    }
    /// The entry that holds flat coordinate `i` (binary search).
    pub fn entry_of(&self, i: usize) -> Option<usize> {
        let idx = self.entries.partition_point(|e| e.offset + e.len() <= i);
        (idx < self.entries.len()).then_some(idx)
    }
    /// Number of scalars of the given kind.
    pub fn count_kind(&self, kind: ParamKind) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.len())
            .sum()
    }
}
