//! Models as a small layer graph over one flat parameter vector.
//!
//! A [`Model`] is a list of [`Node`]s in execution order. Node `i` writes register `i + 1`;
//! register 0 holds the input batch. A node reads any earlier registers, so residual
//! connections are ordinary edges. Because every register is written exactly once, a forward
//! pass can *resume* at any node from the registers cached by a base forward: this is what
//! feature reuse in coordinate-wise estimation builds on ([`Model::resume`]).

use crate::error::{Error, Result};
use crate::layers::{CandleCtx, Shapes, TensorParams};
use crate::layout::{Init, ParamKind, ParamLayout};
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Batch-norm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;
/// Batch-norm running-statistics momentum (PyTorch default).
pub const BN_MOMENTUM: f64 = 0.1;

pub use crate::layers::{
    circular_pad, conv2d, Add, AvgPool, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool,
    Op, Padding, Relu, ShortcutA, Sub, Tanh,
};

/// A node: an operation and the registers it reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Human-readable name (`layer1.0.conv1`).
    pub name: String,
    /// The operation.
    pub op: Op,
    /// Registers read (0 = model input, i + 1 = output of node i).
    pub inputs: Vec<usize>,
}

/// Architecture choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// Fully connected ReLU network with the given hidden widths.
    Mlp { hidden: Vec<usize> },
    /// DeepZero's simple CNN: depth × [conv3×3(bias) → BN → ReLU → maxpool 2], GAP, linear.
    SimpleCnn { depth: usize, width: usize },
    /// ResNet-20 (option-A shortcuts) for 32×32 images.
    Resnet20,
    /// DnCNN-style denoiser (image to image, same channels in and out): conv+ReLU,
    /// (depth − 2) × conv+BN+ReLU, conv; the output is the residual `x − net(x)`. 3×3 kernels,
    /// zero padding.
    Dncnn { depth: usize, width: usize },
    /// Correction network for fields on a periodic grid (image to image): circularly padded
    /// `kernel × kernel` convolutions, an input conv, `blocks` residual blocks
    /// (conv-act-conv + skip, act), an output conv to `out_channels` channels that starts at
    /// zero, so a fresh network is the zero correction.
    CorrectionCnn {
        width: usize,
        blocks: usize,
        #[serde(default = "default_correction_kernel")]
        kernel: usize,
        out_channels: usize,
        #[serde(default)]
        activation: Activation,
    },
}

fn default_correction_kernel() -> usize {
    5
}

/// Element-wise nonlinearity of a spec'd model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(x, 0).
    #[default]
    Relu,
    /// tanh.
    Tanh,
}

/// Running batch-norm statistics (eval mode), one entry per batch-norm node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BnState {
    /// Running means.
    pub mean: Vec<Vec<f64>>,
    /// Running (unbiased) variances.
    pub var: Vec<Vec<f64>>,
}

/// Batch statistics measured during one train-mode forward: (mean, biased variance, count) per BN node.
#[derive(Clone, Debug, Default)]
pub struct BnBatchStats {
    /// Per batch-norm node: channel means, biased variances, and elements per channel.
    pub stats: Vec<(Vec<f64>, Vec<f64>, usize)>,
}

impl BnState {
    /// The checkpointed task state of a model-based task: `{"bn": …}`.
    pub fn to_task_state(&self) -> serde_json::Value {
        serde_json::json!({ "bn": self })
    }

    /// Read what [`BnState::to_task_state`] wrote, checked against `model`'s batch-norm layers;
    /// `None` when the state holds no statistics.
    pub fn from_task_state(state: &serde_json::Value, model: &Model) -> Result<Option<BnState>> {
        let Some(v) = state.get("bn") else {
            return Ok(None);
        };
        let bn: BnState = serde_json::from_value(v.clone()).map_err(|source| Error::Json {
            context: "batch-norm statistics in the checkpoint".into(),
            source,
        })?;
        let fits = bn.mean.len() == model.bn_channels.len()
            && bn.var.len() == model.bn_channels.len()
            && bn
                .mean
                .iter()
                .zip(&bn.var)
                .zip(&model.bn_channels)
                .all(|((m, v), &c)| m.len() == c && v.len() == c);
        if !fits {
            return Err(Error::Shape(format!(
                "the checkpoint's batch-norm statistics ({} layers) do not fit model {} ({} layers of {:?} channels)",
                bn.mean.len(),
                model.name,
                model.bn_channels.len(),
                model.bn_channels
            )));
        }
        Ok(Some(bn))
    }

    /// Fold one batch's statistics into the running estimates (PyTorch's rule).
    pub fn update(&mut self, batch: &BnBatchStats) {
        for (k, (m, v, n)) in batch.stats.iter().enumerate() {
            let unbias = if *n > 1 {
                *n as f64 / (*n as f64 - 1.0)
            } else {
                1.0
            };
            for c in 0..m.len() {
                self.mean[k][c] = (1.0 - BN_MOMENTUM) * self.mean[k][c] + BN_MOMENTUM * m[c];
                self.var[k][c] = (1.0 - BN_MOMENTUM) * self.var[k][c] + BN_MOMENTUM * v[c] * unbias;
            }
        }
    }
}

/// How batch norm normalises.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// Batch statistics (training and every ZO query).
    Train,
    /// Running statistics.
    Eval(&'a BnState),
}

/// A network: graph, parameter layout and input/output sizes. Parameters live outside, in one
/// flat tensor, so that estimators can address every coordinate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Model {
    /// Short description, e.g. `cnn-d2-w18`.
    pub name: String,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Where each parameter tensor lives.
    pub layout: ParamLayout,
    /// `[C, H, W]` of one input.
    pub input_shape: [usize; 3],
    /// Shape of one sample's output: `[K]` for a classifier, `[C, H, W]` for an image.
    pub output_shape: Vec<usize>,
    /// Channel count of each batch-norm node, in `stats` order.
    pub bn_channels: Vec<usize>,
}

/// A convolution's settings for [`GraphBuilder::conv`]: `out` channels, a square `kernel`,
/// "same" padding (`kernel / 2`), stride 1, a bias and zero padding unless changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    /// Output channels.
    pub out: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// With a bias.
    pub bias: bool,
    /// Zero or circular padding.
    pub padding: Padding,
}

impl ConvSpec {
    /// `out` channels, `kernel × kernel`, stride 1, bias, zero padding.
    pub fn new(out: usize, kernel: usize) -> Self {
        ConvSpec {
            out,
            kernel,
            stride: 1,
            bias: true,
            padding: Padding::Zeros,
        }
    }
    /// Set the stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    /// With or without a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// Zero or circular padding.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }
}

/// Builds a model graph over one flat parameter layout. Nodes are added in execution order;
/// every method returns the register the new node writes (register 0 is the model input,
/// [`GraphBuilder::INPUT`]) and checks shapes as it goes, so a graph that builds also runs.
/// After an error, drop the builder.
///
/// ```
/// use deepzero_core::model::{ConvSpec, GraphBuilder, Padding};
/// let mut b = GraphBuilder::new([2, 8, 8]).unwrap();
/// let h = b.conv("conv1", GraphBuilder::INPUT, ConvSpec::new(4, 3).padding(Padding::Circular)).unwrap();
/// let h = b.tanh("act1", h).unwrap();
/// let out = b.conv("out", h, ConvSpec::new(1, 3).padding(Padding::Circular)).unwrap();
/// b.zero_init(out).unwrap();
/// let model = b.finish("tiny-correction");
/// assert_eq!(model.output_shape, vec![1, 8, 8]);
/// ```
pub struct GraphBuilder {
    nodes: Vec<Node>,
    layout: ParamLayout,
    bn_channels: Vec<usize>,
    shapes: Vec<Vec<usize>>,
    input_shape: [usize; 3],
}

impl GraphBuilder {
    /// The register holding the model input.
    pub const INPUT: usize = 0;

    /// A graph for inputs of shape `[C, H, W]`.
    pub fn new(input_shape: [usize; 3]) -> Result<Self> {
        let [c, h, w] = input_shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(Error::Config(format!(
                "model input {c}x{h}x{w}: every dimension must be positive"
            )));
        }
        Ok(GraphBuilder {
            nodes: Vec::new(),
            layout: ParamLayout::default(),
            bn_channels: Vec::new(),
            shapes: vec![input_shape.to_vec()],
            input_shape,
        })
    }

    /// Shape of register `r` for one sample.
    pub fn shape(&self, r: usize) -> &[usize] {
        &self.shapes[r]
    }

    /// Register written by the last node (0 if none).
    pub fn last(&self) -> usize {
        self.nodes.len()
    }

    /// Append a node (any [`Op`]) reading `inputs`; checks the registers and the shapes.
    pub fn push(&mut self, name: &str, op: Op, inputs: Vec<usize>) -> Result<usize> {
        let layer = op.layer();
        if inputs.len() != layer.arity() {
            return Err(Error::Config(format!(
                "{name}: reads {} registers, needs {}",
                inputs.len(),
                layer.arity()
            )));
        }
        if let Some(&r) = inputs.iter().find(|&&r| r > self.nodes.len()) {
            return Err(Error::Config(format!(
                "{name}: register {r} is not written yet (last is {})",
                self.nodes.len()
            )));
        }
        let ins: Vec<&[usize]> = inputs.iter().map(|&r| self.shapes[r].as_slice()).collect();
        let out = layer.shape(name, &ins, &self.layout)?;
        self.shapes.push(out);
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
        });
        Ok(self.nodes.len())
    }

    fn param(
        &mut self,
        name: &str,
        suffix: &str,
        kind: ParamKind,
        shape: Vec<usize>,
    ) -> Result<usize> {
        let total = shape
            .iter()
            .try_fold(1usize, |n, &s| n.checked_mul(s))
            .and_then(|n| n.checked_add(self.layout.len()))
            .unwrap_or(usize::MAX);
        check_params(total)?;
        let node = self.nodes.len();
        Ok(self
            .layout
            .push(format!("{name}.{suffix}"), kind, shape, node))
    }

    /// Fully connected layer with bias to `out` features (input: `[F]` features).
    pub fn linear(&mut self, name: &str, x: usize, out: usize) -> Result<usize> {
        let fan_in = match self.shapes.get(x).map(|s| s.as_slice()) {
            Some([f]) => *f,
            s => {
                return Err(Error::Config(format!(
                    "{name}: a linear layer needs [F] features, register {x} is {s:?}"
                )))
            }
        };
        let weight = self.param(name, "weight", ParamKind::Weight, vec![out, fan_in])?;
        let bias = Some(self.param(name, "bias", ParamKind::Bias, vec![out])?);
        self.push(name, Op::Linear(Linear { weight, bias }), vec![x])
    }

    /// Convolution with "same" padding `kernel / 2` (see [`ConvSpec`]).
    pub fn conv(&mut self, name: &str, x: usize, spec: ConvSpec) -> Result<usize> {
        let cin = self.channels(name, x)?;
        if spec.out == 0 || spec.kernel == 0 || spec.stride == 0 {
            return Err(Error::Config(format!(
                "{name}: channels, kernel and stride must be positive, got {spec:?}"
            )));
        }
        let k = spec.kernel;
        let weight = self.param(name, "weight", ParamKind::Weight, vec![spec.out, cin, k, k])?;
        let bias = match spec.bias {
            true => Some(self.param(name, "bias", ParamKind::Bias, vec![spec.out])?),
            false => None,
        };
        let op = Op::Conv2d(Conv2d {
            weight,
            bias,
            stride: spec.stride,
            padding: k / 2,
            padding_mode: spec.padding,
        });
        self.push(name, op, vec![x])
    }

    fn channels(&self, name: &str, x: usize) -> Result<usize> {
        match self.shapes.get(x).map(|s| s.as_slice()) {
            Some([c, _, _]) => Ok(*c),
            s => Err(Error::Config(format!(
                "{name}: needs an image [C, H, W], register {x} is {s:?}"
            ))),
        }
    }

    /// Batch norm over the channels of `x` (scale 1, shift 0 at init).
    pub fn batch_norm(&mut self, name: &str, x: usize) -> Result<usize> {
        let c = match self.shapes.get(x).and_then(|s| s.first()) {
            Some(&c) => c,
            None => {
                return Err(Error::Config(format!(
                    "{name}: register {x} is not written yet"
                )))
            }
        };
        let scale = self.param(name, "weight", ParamKind::BnScale, vec![c])?;
        let shift = self.param(name, "bias", ParamKind::BnShift, vec![c])?;
        let stats = self.bn_channels.len();
        self.bn_channels.push(c);
        self.push(
            name,
            Op::BatchNorm(BatchNorm {
                scale,
                shift,
                stats,
            }),
            vec![x],
        )
    }

    /// max(x, 0).
    pub fn relu(&mut self, name: &str, x: usize) -> Result<usize> {
        self.push(name, Op::Relu(Relu), vec![x])
    }

    /// tanh(x).
    pub fn tanh(&mut self, name: &str, x: usize) -> Result<usize> {
        self.push(name, Op::Tanh(Tanh), vec![x])
    }

    /// The given nonlinearity.
    pub fn activation(&mut self, name: &str, x: usize, act: Activation) -> Result<usize> {
        match act {
            Activation::Relu => self.relu(name, x),
            Activation::Tanh => self.tanh(name, x),
        }
    }

    /// Max pooling, kernel = stride = `k`.
    pub fn max_pool(&mut self, name: &str, x: usize, k: usize) -> Result<usize> {
        self.push(name, Op::MaxPool(MaxPool(k)), vec![x])
    }

    /// Average pooling, kernel = stride = `k`.
    pub fn avg_pool(&mut self, name: &str, x: usize, k: usize) -> Result<usize> {
        self.push(name, Op::AvgPool(AvgPool(k)), vec![x])
    }

    /// Mean over the spatial dims.
    pub fn global_avg_pool(&mut self, name: &str, x: usize) -> Result<usize> {
        self.push(name, Op::GlobalAvgPool(GlobalAvgPool), vec![x])
    }

    /// Features `[C·H·W]`.
    pub fn flatten(&mut self, name: &str, x: usize) -> Result<usize> {
        self.push(name, Op::Flatten(Flatten), vec![x])
    }

    /// `a + b`.
    pub fn add(&mut self, name: &str, a: usize, b: usize) -> Result<usize> {
        self.push(name, Op::Add(Add), vec![a, b])
    }

    /// `a − b`.
    pub fn sub(&mut self, name: &str, a: usize, b: usize) -> Result<usize> {
        self.push(name, Op::Sub(Sub), vec![a, b])
    }

    /// Residual to the model input, `x − net(x)` (DnCNN): `net` must have the input's shape.
    pub fn residual_to_input(&mut self, name: &str, net: usize) -> Result<usize> {
        self.sub(name, Self::INPUT, net)
    }

    /// ResNet option-A shortcut: subsample by 2, `pad` zero channels on each side.
    pub fn shortcut_a(&mut self, name: &str, x: usize, pad: usize) -> Result<usize> {
        self.push(name, Op::ShortcutA(ShortcutA { pad }), vec![x])
    }

    /// Every parameter of the node that writes register `r` starts at zero
    /// ([`Init::Zeros`]): a zero-initialised last layer makes a fresh model output zero.
    pub fn zero_init(&mut self, r: usize) -> Result<()> {
        if r == 0 || r > self.nodes.len() {
            return Err(Error::Config(format!(
                "zero_init: register {r} is not written by a node"
            )));
        }
        for e in self.nodes[r - 1].op.params() {
            self.layout.entries[e].init = Init::Zeros;
        }
        Ok(())
    }

    /// The model; its output is the last node's register.
    pub fn finish(self, name: impl Into<String>) -> Model {
        Model {
            name: name.into(),
            output_shape: self.shapes.last().cloned().unwrap_or_default(),
            nodes: self.nodes,
            layout: self.layout,
            input_shape: self.input_shape,
            bn_channels: self.bn_channels,
        }
    }
}

/// Bytes a training run holds per parameter: the f64 initial values, the parameter tensor, the
/// gradient and the optimizer's state.
pub const BYTES_PER_PARAM: usize = 4 * std::mem::size_of::<f64>();

/// Check that a model of `count` parameters fits into memory ([`BYTES_PER_PARAM`] each): what
/// every layer of a model under construction checks, before anything is allocated.
pub fn check_params(count: usize) -> Result<()> {
    crate::bounds::check_memory(
        crate::error::Setting::ModelSize,
        count,
        BYTES_PER_PARAM,
        "parameters",
    )
}

impl Model {
    /// Build a classifier for inputs of shape `[C, H, W]` and `num_classes` outputs
    /// (`Mlp`, `SimpleCnn`, `Resnet20`; image-to-image specs use [`Model::build_image`]).
    pub fn build(spec: &ModelSpec, input_shape: [usize; 3], num_classes: usize) -> Result<Model> {
        let [c, h, w] = input_shape;
        if c == 0 || h == 0 || w == 0 || num_classes < 2 {
            return Err(Error::Config(format!(
                "model input {c}x{h}x{w} with {num_classes} classes: need a non-empty input and at least 2 classes"
            )));
        }
        let mut b = GraphBuilder::new(input_shape)?;
        match spec {
            ModelSpec::Mlp { hidden } => {
                if hidden.contains(&0) {
                    return Err(Error::Config("MLP hidden widths must be positive".into()));
                }
                let mut x = b.flatten("flatten", 0)?;
                for (i, &width) in hidden.iter().enumerate() {
                    x = b.linear(&format!("fc{}", i + 1), x, width)?;
                    x = b.relu(&format!("relu{}", i + 1), x)?;
                }
                b.linear(&format!("fc{}", hidden.len() + 1), x, num_classes)?;
                let widths: Vec<String> = hidden.iter().map(|w| w.to_string()).collect();
                Ok(b.finish(format!("mlp-{}", widths.join("-"))))
            }
            ModelSpec::SimpleCnn { depth, width } => {
                if *depth == 0 || *width == 0 {
                    return Err(Error::Config(
                        "the CNN's depth and width must be positive".into(),
                    ));
                }
                let (mut hh, mut ww) = (h, w);
                let mut x = 0;
                for d in 1..=*depth {
                    if hh < 2 || ww < 2 {
                        return Err(Error::Config(format!(
                            "a CNN of depth {depth} pools a {h}x{w} input below 1x1 after {} blocks; use depth {} or less",
                            d - 1,
                            d - 1
                        )));
                    }
                    x = b.conv(&format!("conv{d}"), x, ConvSpec::new(*width, 3))?;
                    x = b.batch_norm(&format!("bn{d}"), x)?;
                    x = b.relu(&format!("relu{d}"), x)?;
                    x = b.max_pool(&format!("pool{d}"), x, 2)?;
                    hh /= 2;
                    ww /= 2;
                }
                x = b.global_avg_pool("gap", x)?;
                b.linear("fc", x, num_classes)?;
                Ok(b.finish(format!("cnn-d{depth}-w{width}")))
            }
            ModelSpec::Resnet20 => {
                if h < 4 || w < 4 || h % 4 != 0 || w % 4 != 0 {
                    return Err(Error::Config(format!(
                        "ResNet-20 needs height and width divisible by 4 (it downsamples twice by 2 with option-A shortcuts), got {h}x{w}"
                    )));
                }
                let mut x = b.conv("conv1", 0, ConvSpec::new(16, 3).bias(false))?;
                x = b.batch_norm("bn1", x)?;
                x = b.relu("relu1", x)?;
                let mut cin = 16;
                for (stage, &cout) in [16usize, 32, 64].iter().enumerate() {
                    for block in 0..3 {
                        let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{}", stage + 1, block);
                        let input = x;
                        let conv = ConvSpec::new(cout, 3).bias(false);
                        let mut y = b.conv(&format!("{p}.conv1"), input, conv.stride(stride))?;
                        y = b.batch_norm(&format!("{p}.bn1"), y)?;
                        y = b.relu(&format!("{p}.relu1"), y)?;
                        y = b.conv(&format!("{p}.conv2"), y, conv)?;
                        y = b.batch_norm(&format!("{p}.bn2"), y)?;
                        let short = if stride != 1 || cin != cout {
                            b.shortcut_a(&format!("{p}.shortcut"), input, (cout - cin) / 2)?
                        } else {
                            input
                        };
                        let s = b.add(&format!("{p}.add"), y, short)?;
                        x = b.relu(&format!("{p}.relu2"), s)?;
                        cin = cout;
                    }
                }
                x = b.global_avg_pool("gap", x)?;
                b.linear("fc", x, num_classes)?;
                Ok(b.finish("resnet20"))
            }
            ModelSpec::Dncnn { .. } | ModelSpec::CorrectionCnn { .. } => Err(Error::Config(
                format!("{spec:?} maps images to images; build it with Model::build_image"),
            )),
        }
    }

    /// Build an image-to-image model (`Dncnn`, `CorrectionCnn`) for inputs of shape `[C, H, W]`.
    pub fn build_image(spec: &ModelSpec, input_shape: [usize; 3]) -> Result<Model> {
        let [c, h, w] = input_shape;
        let mut b = GraphBuilder::new(input_shape)?;
        match spec {
            ModelSpec::Dncnn { depth, width } => {
                if *depth < 2 || *width == 0 {
                    return Err(Error::Config(format!(
                        "DnCNN needs depth >= 2 and a positive width, got depth {depth}, width {width}"
                    )));
                }
                let mut x = b.conv("conv1", 0, ConvSpec::new(*width, 3))?;
                x = b.relu("relu1", x)?;
                for d in 2..*depth {
                    x = b.conv(&format!("conv{d}"), x, ConvSpec::new(*width, 3).bias(false))?;
                    x = b.batch_norm(&format!("bn{d}"), x)?;
                    x = b.relu(&format!("relu{d}"), x)?;
                }
                let noise = b.conv(&format!("conv{depth}"), x, ConvSpec::new(c, 3).bias(false))?;
                b.residual_to_input("residual", noise)?;
                Ok(b.finish(format!("dncnn-d{depth}-w{width}")))
            }
            ModelSpec::CorrectionCnn {
                width,
                blocks,
                kernel,
                out_channels,
                activation,
            } => {
                if *width == 0 || *out_channels == 0 || *kernel == 0 || kernel % 2 == 0 {
                    return Err(Error::Config(format!(
                        "correction CNN needs a positive width and output channels and an odd kernel, got width {width}, out {out_channels}, kernel {kernel}"
                    )));
                }
                if kernel / 2 > h || kernel / 2 > w {
                    return Err(Error::Config(format!(
                        "correction CNN: a {kernel}x{kernel} kernel wraps more than once around a {h}x{w} grid"
                    )));
                }
                let conv = |out| ConvSpec::new(out, *kernel).padding(Padding::Circular);
                let mut x = b.conv("conv_in", 0, conv(*width))?;
                x = b.activation("act_in", x, *activation)?;
                for i in 0..*blocks {
                    let p = format!("block{i}");
                    let mut y = b.conv(&format!("{p}.conv1"), x, conv(*width))?;
                    y = b.activation(&format!("{p}.act1"), y, *activation)?;
                    y = b.conv(&format!("{p}.conv2"), y, conv(*width))?;
                    let s = b.add(&format!("{p}.add"), y, x)?;
                    x = b.activation(&format!("{p}.act2"), s, *activation)?;
                }
                let out = b.conv("conv_out", x, conv(*out_channels))?;
                b.zero_init(out)?;
                Ok(b.finish(format!("correction-w{width}-b{blocks}-k{kernel}")))
            }
            _ => Err(Error::Config(format!(
                "{spec:?} is a classifier; build it with Model::build and a class count"
            ))),
        }
    }

    /// Number of output classes: `Some(k)` for a model with a 1-D output of `k` values.
    pub fn num_classes(&self) -> Option<usize> {
        match self.output_shape.as_slice() {
            [k] => Some(*k),
            _ => None,
        }
    }

    /// Values of one sample's output.
    pub fn output_len(&self) -> usize {
        self.output_shape.iter().product()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.len()
    }

    /// Fresh running statistics (mean 0, variance 1).
    pub fn new_bn_state(&self) -> BnState {
        BnState {
            mean: self.bn_channels.iter().map(|&c| vec![0.0; c]).collect(),
            var: self.bn_channels.iter().map(|&c| vec![1.0; c]).collect(),
        }
    }

    /// Kaiming-normal weights (std = √(2 / fan_in)), zero biases, batch-norm scale 1 and shift 0;
    /// zeros for entries marked [`Init::Zeros`] (which draw nothing from `rng`).
    pub fn init_params(&self, rng: &mut impl Rng) -> Vec<f64> {
        let mut out = vec![0.0; self.num_params()];
        for e in &self.layout.entries {
            let r = e.range();
            if e.init == Init::Zeros {
                continue;
            }
            match e.kind {
                ParamKind::Weight => {
                    let fan_in: usize = e.shape[1..].iter().product();
                    let normal =
                        Normal::new(0.0, (2.0 / fan_in as f64).sqrt()).expect("finite std");
                    for v in &mut out[r] {
                        *v = normal.sample(rng);
                    }
                }
                ParamKind::BnScale => out[r].fill(1.0),
                ParamKind::Bias | ParamKind::BnShift => {}
            }
        }
        out
    }

    /// Views of each parameter tensor of `flat` (no copies), shaped as the layout says.
    pub fn param_views(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        if flat.dims() != [self.num_params()] {
            return Err(Error::Shape(format!(
                "parameter vector has shape {:?}, model {} needs [{}]",
                flat.dims(),
                self.name,
                self.num_params()
            )));
        }
        self.layout
            .entries
            .iter()
            .map(|e| {
                Ok(flat
                    .narrow(0, e.offset, e.len())?
                    .reshape(e.shape.as_slice())?)
            })
            .collect()
    }

    /// Forward pass to logits `[N, classes]`.
    pub fn forward(&self, views: &[Tensor], x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut regs = Vec::with_capacity(self.nodes.len() + 1);
        regs.push(x.clone());
        self.run(views, &mut regs, 0, mode, None, None)?;
        Ok(regs.pop().expect("at least the input register"))
    }

    /// Forward pass that keeps every register (the cache for [`Model::resume`]) and records the
    /// batch-norm batch statistics when `stats` is given.
    pub fn forward_cached(
        &self,
        views: &[Tensor],
        x: &Tensor,
        mode: Mode,
        stats: Option<&mut BnBatchStats>,
    ) -> Result<Vec<Tensor>> {
        let mut regs = Vec::with_capacity(self.nodes.len() + 1);
        regs.push(x.clone());
        self.run(views, &mut regs, 0, mode, stats, None)?;
        Ok(regs)
    }

    /// Re-run nodes `start..` on top of cached registers, with parameter tensor `entry` replaced
    /// by `value`; returns logits. Registers before `start` are taken from `cache` unchanged.
    pub fn resume(
        &self,
        views: &[Tensor],
        cache: &[Tensor],
        start: usize,
        entry: usize,
        value: &Tensor,
    ) -> Result<Tensor> {
        let mut regs: Vec<Tensor> = cache[..=start].to_vec();
        self.run(
            views,
            &mut regs,
            start,
            Mode::Train,
            None,
            Some((entry, value)),
        )?;
        Ok(regs.pop().expect("at least the input register"))
    }

    fn run(
        &self,
        views: &[Tensor],
        regs: &mut Vec<Tensor>,
        start: usize,
        mode: Mode,
        mut stats: Option<&mut BnBatchStats>,
        over: Option<(usize, &Tensor)>,
    ) -> Result<()> {
        let params = TensorParams { views, over };
        for node in &self.nodes[start..] {
            let ins: Vec<&Tensor> = node.inputs.iter().map(|&r| &regs[r]).collect();
            let mut ctx = CandleCtx {
                name: &node.name,
                params,
                mode,
                stats: stats.as_deref_mut(),
            };
            let y = node.op.layer().forward(&ins, &mut ctx)?;
            regs.push(y);
        }
        Ok(())
    }

    /// Multiply-adds of one forward of one sample, per node (conv and linear only; the other
    /// nodes are counted as one operation per element they write).
    pub fn node_costs(&self) -> Vec<u64> {
        self.shapes_and_costs().1
    }

    /// Shape of every register for one sample (`[C, H, W]`, or `[F]` after flatten/GAP/linear).
    pub fn register_shapes(&self) -> Vec<Vec<usize>> {
        self.shapes_and_costs().0
    }

    /// Every convolution with its input size, in node order (what `bench kernels` times).
    pub fn conv_layers(&self) -> Vec<ConvLayer> {
        let (shapes, costs) = self.shapes_and_costs();
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(k, node)| match &node.op {
                Op::Conv2d(conv) => {
                    let w = &self.layout.entries[conv.weight].shape;
                    let s = &shapes[node.inputs[0]];
                    Some(ConvLayer {
                        node: k,
                        name: node.name.clone(),
                        in_channels: w[1],
                        out_channels: w[0],
                        kernel: w[2],
                        stride: conv.stride,
                        padding: conv.padding,
                        padding_mode: conv.padding_mode,
                        height: s[1],
                        width: s[2],
                        cost: costs[k],
                    })
                }
                _ => None,
            })
            .collect()
    }

    fn shapes_and_costs(&self) -> (Vec<Vec<usize>>, Vec<u64>) {
        graph_shapes(&self.nodes, &self.layout, &self.input_shape)
            .expect("a built model's shapes fit (checked when it was built)")
    }
}

/// Shape of every register and cost of every node, for one sample.
fn graph_shapes(
    nodes: &[Node],
    layout: &ParamLayout,
    input_shape: &[usize],
) -> Result<(Vec<Vec<usize>>, Vec<u64>)> {
    let mut shapes: Vec<Vec<usize>> = vec![input_shape.to_vec()];
    let mut costs = Vec::with_capacity(nodes.len());
    for node in nodes {
        let layer = node.op.layer();
        let ins: Vec<&[usize]> = node.inputs.iter().map(|&r| shapes[r].as_slice()).collect();
        let out = layer.shape(&node.name, &ins, layout)?;
        costs.push(layer.cost(
            &Shapes {
                ins: &ins,
                out: &out,
            },
            layout,
        ));
        shapes.push(out);
    }
    Ok((shapes, costs))
}

/// A convolution of a model and the size of its input, for one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on each side.
    pub padding: usize,
    /// Zero or circular padding.
    pub padding_mode: Padding,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Multiply-adds per sample.
    pub cost: u64,
}

/// Mean cross-entropy of `logits [N, K]` against `labels [N]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(per_sample_cross_entropy(logits, labels)?.mean_all()?)
}

/// Cross-entropy of each sample, `[N]`.
pub fn per_sample_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lse = logits.log_sum_exp(D::Minus1)?;
    let picked = logits.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((lse - picked)?)
}

/// Numeric precision of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (default).
    #[default]
    F32,
    /// 64-bit floats (for checking formulas without rounding noise).
    F64,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }
}

/// Where tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU (default).
    #[default]
    Cpu,
    /// A CUDA GPU (needs the `cuda` feature).
    Cuda,
}

impl DeviceKind {
    /// Open the device.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => {
                if candle_core::utils::cuda_is_available() {
                    Ok(Device::new_cuda(0)?)
                } else {
                    Err(Error::Config(
                        "--device cuda: this build has no CUDA support; rebuild with `--features cuda` (needs the CUDA toolkit)".into(),
                    ))
                }
            }
        }
    }
}

/// Host parameters to a 1-D tensor of the given precision.
pub fn params_tensor(params: &[f64], precision: Precision, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(params, params.len(), device)?.to_dtype(precision.dtype())?)
}

/// A 1-D tensor back to host f64.
pub fn tensor_to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}
