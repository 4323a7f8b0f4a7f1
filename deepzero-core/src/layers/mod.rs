//! Layer kinds: each one in one place.
//!
//! A layer kind is a struct implementing [`Layer`]: its output shape and cost, its candle forward
//! (differentiable, any dtype), its forward on our f32 kernels ([`crate::fast::kernels`]), its
//! change propagation for the fast engine ([`crate::fast`]) and its backward on our kernels
//! ([`crate::fast::backprop`]). [`Op`] lists the kinds and dispatches to them; the model
//! ([`crate::model`]), the fast engine, backprop and the cost model only call the trait.
//!
//! To add a layer kind: write its struct and `impl Layer` in a file of this module, add a
//! variant to [`Op`] and a line to [`Op::layer`], and, if models should build it, a method on
//! [`crate::model::GraphBuilder`].

mod activation;
mod combine;
mod conv;
mod linear;
mod norm;
mod pool;

pub use activation::{Relu, Tanh};
pub use combine::{Add, ShortcutA, Sub};
pub use conv::{circular_pad, conv2d, Conv2d, Padding};
pub use linear::Linear;
pub use norm::BatchNorm;
pub use pool::{AvgPool, Flatten, GlobalAvgPool, MaxPool};

use crate::error::Result;
use crate::fast::kernels::Act;
use crate::fast::Change;
use crate::layout::{ParamEntry, ParamLayout};
use crate::model::{BnBatchStats, BnState, Mode};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One operation of the graph. Parameter fields of the layer structs are indices into
/// [`ParamLayout::entries`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `y = x Wᵀ + b` on `[N, F]` input.
    Linear(Linear),
    /// 2-D convolution, square kernel, NCHW, zero or circular padding.
    Conv2d(Conv2d),
    /// Batch norm over channels with the batch's statistics (or running ones in eval mode).
    BatchNorm(BatchNorm),
    /// max(x, 0).
    Relu(Relu),
    /// tanh(x).
    Tanh(Tanh),
    /// Max pooling, kernel = stride.
    MaxPool(MaxPool),
    /// Average pooling, kernel = stride.
    AvgPool(AvgPool),
    /// Mean over the spatial dims: `[N, C, H, W] -> [N, C]`.
    GlobalAvgPool(GlobalAvgPool),
    /// `[N, ...] -> [N, F]`.
    Flatten(Flatten),
    /// Sum of the two inputs.
    Add(Add),
    /// First input minus the second.
    Sub(Sub),
    /// ResNet option-A shortcut: spatial subsample by 2, zero-pad channels on each side.
    ShortcutA(ShortcutA),
}

impl Op {
    /// The layer behind the op.
    pub(crate) fn layer(&self) -> &dyn Layer {
        match self {
            Op::Linear(l) => l,
            Op::Conv2d(l) => l,
            Op::BatchNorm(l) => l,
            Op::Relu(l) => l,
            Op::Tanh(l) => l,
            Op::MaxPool(l) => l,
            Op::AvgPool(l) => l,
            Op::GlobalAvgPool(l) => l,
            Op::Flatten(l) => l,
            Op::Add(l) => l,
            Op::Sub(l) => l,
            Op::ShortcutA(l) => l,
        }
    }

    /// Layout indices of the parameter tensors the op reads.
    pub fn params(&self) -> Vec<usize> {
        self.layer().params()
    }

    /// Number of registers the op reads.
    pub fn arity(&self) -> usize {
        self.layer().arity()
    }
}

/// Parameters as candle tensors, one of them possibly replaced.
#[derive(Clone, Copy)]
pub(crate) struct TensorParams<'a> {
    pub views: &'a [Tensor],
    pub over: Option<(usize, &'a Tensor)>,
}

impl<'a> TensorParams<'a> {
    /// Parameter tensor `e`.
    pub fn get(&self, e: usize) -> &'a Tensor {
        match self.over {
            Some((o, t)) if o == e => t,
            _ => &self.views[e],
        }
    }
}

/// What a candle forward of one node sees besides its inputs.
pub(crate) struct CandleCtx<'a, 'b> {
    /// Node name (for error messages).
    pub name: &'a str,
    pub params: TensorParams<'a>,
    pub mode: Mode<'a>,
    /// Batch-norm statistics are recorded here when given.
    pub stats: Option<&'b mut BnBatchStats>,
}

/// Parameters as host f32 slices, one tensor possibly replaced.
#[derive(Clone, Copy)]
pub(crate) struct HostParams<'a> {
    pub layout: &'a ParamLayout,
    pub flat: &'a [f32],
    pub over: Option<(usize, &'a [f32])>,
}

impl<'a> HostParams<'a> {
    /// Parameter tensor `e`.
    pub fn get(&self, e: usize) -> &'a [f32] {
        match self.over {
            Some((o, v)) if o == e => v,
            _ => &self.flat[self.layout.entries[e].range()],
        }
    }
}

/// Per-channel batch-norm statistics of a base forward: mean and 1/std — the batch's, or with
/// `eval` the running ones (then the output does not depend on the batch's statistics, and
/// neither does the backward).
#[derive(Clone, Debug)]
pub(crate) struct BnCache {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    pub eval: bool,
}

/// What a node kept from the base forward besides its output.
pub(crate) type NodeCache = Option<BnCache>;

/// One node of the base forward, as the fast engine's change propagation sees it.
pub(crate) struct Base<'a> {
    /// Every register of the base forward.
    pub regs: &'a [Act],
    /// Registers the node reads.
    pub inputs: &'a [usize],
    /// The node's output.
    pub out: &'a Act,
    pub cache: &'a NodeCache,
    /// The base parameters.
    pub params: HostParams<'a>,
}

impl Base<'_> {
    /// Input `i` of the node in the base forward.
    pub fn input(&self, i: usize) -> &Act {
        &self.regs[self.inputs[i]]
    }
    /// The batch-norm statistics the node recorded.
    pub fn bn(&self) -> &BnCache {
        self.cache
            .as_ref()
            .expect("batch-norm statistics of the base forward")
    }
}

/// How far a query's change has spread in a register (the cost model's view of [`Change`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spread {
    /// Unchanged.
    Same,
    /// One channel changed.
    One,
    /// Every channel changed.
    Full,
}

/// Shapes a node sees, for one sample: `[C, H, W]` or `[F]`.
pub(crate) struct Shapes<'a> {
    pub ins: &'a [&'a [usize]],
    pub out: &'a [usize],
}

/// What one node's backward returns.
pub(crate) struct NodeGrads {
    /// Per input: the gradient of the loss with respect to it (`None` where not wanted).
    pub inputs: Vec<Option<Act>>,
    /// Per parameter tensor the node reads (layout index): its gradient, laid out as the tensor.
    pub params: Vec<(usize, Vec<f32>)>,
}

/// One layer kind. See the module documentation for how the parts are used.
pub(crate) trait Layer: Sync {
    /// Registers read.
    fn arity(&self) -> usize {
        1
    }
    /// Layout indices of the parameter tensors read.
    fn params(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Output shape for one sample, or an error naming the node and what does not fit.
    fn shape(&self, name: &str, ins: &[&[usize]], layout: &ParamLayout) -> Result<Vec<usize>>;
    /// Multiply-adds of one sample's forward (default: one per output element).
    fn cost(&self, shapes: &Shapes, _layout: &ParamLayout) -> u64 {
        shapes.out.iter().product::<usize>() as u64
    }
    /// Forward in candle (differentiable, any dtype).
    fn forward(&self, ins: &[&Tensor], ctx: &mut CandleCtx) -> Result<Tensor>;
    /// Forward on our f32 kernels (channel-major activations).
    fn forward_fast(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache);
    /// Forward in train mode for backprop: what [`Layer::forward_fast`] computes, possibly spread
    /// over threads (results must not depend on their count). Default: `forward_fast`.
    fn forward_train(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache) {
        self.forward_fast(ins, params)
    }
    /// Forward in eval mode on our kernels, spread over threads like [`Layer::forward_train`]:
    /// batch norm with the running statistics `bn` (as [`crate::model::Mode::Eval`]), every
    /// other layer as in train mode; the cache serves [`Layer::backward_fast`]. Default:
    /// `forward_train`.
    fn forward_eval(&self, ins: &[&Act], params: HostParams, _bn: &BnState) -> (Act, NodeCache) {
        self.forward_train(ins, params)
    }
    /// Backward: the gradients of the loss with respect to the inputs (those `wanted`) and the
    /// parameters, given `dy`, the gradient with respect to the output of the forward `base`
    /// (its registers and caches as [`Layer::forward_train`] left them). `dy` is handed over:
    /// element-wise layers turn it into the input gradient in place.
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads;
    /// Change of the output when coordinate `j` of parameter tensor `entry` moves by `delta`.
    /// Default: the parameter is added to one channel `j` (a bias, a batch-norm shift).
    fn perturbed(&self, base: &Base, _entry: &ParamEntry, j: usize, delta: f32) -> Change {
        Change::Chan(j, vec![delta; base.out.plane_len()])
    }
    /// Change of the output from the changes of the inputs (at least one is not `Same`).
    /// Default: a per-channel layer ([`Layer::per_channel`]).
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        match ins[0] {
            Change::Same => Change::Same,
            Change::Chan(c, d) => {
                let (o, q) = self.per_channel(base, *c, d).expect("a per-channel layer");
                Change::Chan(o, q)
            }
            Change::Full(dx) => {
                let y = base.out;
                // Every output plane is written below or zeroed after (no memset up front).
                let mut out = Act::for_overwrite(y.c, y.n, y.h, y.w);
                let mut written = vec![false; y.c];
                for c in 0..dx.c {
                    let o = self
                        .per_channel_into(base, c, dx.plane(c), &mut out)
                        .expect("a per-channel layer");
                    written[o] = true;
                }
                for (o, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
                    out.plane_mut(o).fill(0.0);
                }
                Change::Full(out)
            }
        }
    }
    /// [`Layer::per_channel`] written straight into its plane of `out` (shaped like the
    /// output); returns the output channel. Default: through `per_channel`; the hot layers
    /// write in place and save a copy per channel.
    fn per_channel_into(&self, base: &Base, c: usize, d: &[f32], out: &mut Act) -> Option<usize> {
        let (o, q) = self.per_channel(base, c, d)?;
        out.plane_mut(o).copy_from_slice(&q);
        Some(o)
    }
    /// For per-channel layers: the output channel and its change when input channel `c`
    /// changes by `d`.
    fn per_channel(&self, _base: &Base, _c: usize, _d: &[f32]) -> Option<(usize, Vec<f32>)> {
        None
    }
    /// Cost model: multiply-adds per sample of [`Layer::perturbed`] (default: one per element
    /// of one output channel).
    fn perturbed_cost(&self, cost: f64, shapes: &Shapes, _layout: &ParamLayout) -> f64 {
        cost / shapes.out[0].max(1) as f64
    }
    /// Cost model: how far the change spreads and what [`Layer::propagate`] costs per sample
    /// (default: a per-channel layer).
    fn propagate_cost(
        &self,
        ins: &[Spread],
        cost: f64,
        shapes: &Shapes,
        _layout: &ParamLayout,
    ) -> (Spread, f64) {
        if ins.contains(&Spread::Full) {
            (Spread::Full, cost)
        } else {
            (Spread::One, cost / shapes.out[0].max(1) as f64)
        }
    }
}

/// A change as a full activation shaped like `like` (zeros where unchanged).
pub(crate) fn change_to_full<'b>(change: &'b Change, like: &Act) -> std::borrow::Cow<'b, Act> {
    use std::borrow::Cow;
    match change {
        Change::Full(a) => Cow::Borrowed(a),
        Change::Same => Cow::Owned(Act::zeros(like.c, like.n, like.h, like.w)),
        Change::Chan(o, d) => {
            let mut a = Act::zeros(like.c, like.n, like.h, like.w);
            a.plane_mut(*o).copy_from_slice(d);
            Cow::Owned(a)
        }
    }
}

/// Per-channel sums of `a` (a bias gradient), each in f64 with eight independent lanes (one
/// f64 add chain is latency-bound), added in a fixed order.
pub(crate) fn channel_sums(a: &Act) -> Vec<f32> {
    (0..a.c)
        .into_par_iter()
        .map(|c| {
            let mut lanes = [0.0f64; 8];
            let chunks = a.plane(c).chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
            for chunk in chunks {
                for (l, &v) in lanes.iter_mut().zip(chunk) {
                    *l += v as f64;
                }
            }
            (lanes.iter().sum::<f64>() + tail) as f32
        })
        .collect()
}

/// Values per piece of work of the element-wise maps (64 KiB: enough to outweigh handing it
/// to a thread).
const CHUNK: usize = 1 << 14;

/// `f(v)` of every value of `x` into a new activation, in fixed chunks over threads: an
/// element-wise layer's forward in one pass.
pub(crate) fn map_act(x: &Act, f: impl Fn(f32) -> f32 + Sync) -> Act {
    let mut out = Act::for_overwrite(x.c, x.n, x.h, x.w);
    out.data
        .par_chunks_mut(CHUNK)
        .zip(x.data.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = f(v);
            }
        });
    out
}

/// `f(a, b)` of the values of `a` and `b` (same shape) into a new activation, like [`map_act`].
pub(crate) fn zip_map_act(a: &Act, b: &Act, f: impl Fn(f32, f32) -> f32 + Sync) -> Act {
    assert_eq!(a.data.len(), b.data.len(), "zip_map_act: shapes differ");
    let mut out = Act::for_overwrite(a.c, a.n, a.h, a.w);
    out.data
        .par_chunks_mut(CHUNK)
        .zip(a.data.par_chunks(CHUNK).zip(b.data.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// `d ← f(d, v)` element-wise for `d` in `a` and `v` in `b` (same length), in fixed chunks over
/// threads: an element-wise layer's backward in place of the output gradient.
pub(crate) fn zip_apply(a: &mut Act, b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    a.data
        .par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            for (d, &v) in a.iter_mut().zip(b) {
                *d = f(*d, v);
            }
        });
}

fn shape_error(name: &str, msg: String) -> crate::error::Error {
    crate::error::Error::Shape(format!("{name}: {msg}"))
}

/// `[C, H, W]` of input `i`, or an error naming the node.
fn image_shape(name: &str, s: &[usize]) -> Result<[usize; 3]> {
    match s {
        [c, h, w] => Ok([*c, *h, *w]),
        _ => Err(shape_error(
            name,
            format!("needs an image input [C, H, W], got {s:?}"),
        )),
    }
}
