//! Models as a small layer graph over one flat parameter vector.
//!
//! A [`Model`] is a list of [`Node`]s in execution order. Node `i` writes register `i + 1`;
//! register 0 holds the input batch. A node reads any earlier registers, so residual
//! connections are ordinary edges. Because every register is written exactly once, a forward
//! pass can *resume* at any node from the registers cached by a base forward: this is what
//! feature reuse in coordinate-wise estimation builds on ([`Model::resume`]).

use crate::error::{Error, Result};
use crate::layout::{ParamKind, ParamLayout};
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Batch-norm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;
/// Batch-norm running-statistics momentum (PyTorch default).
pub const BN_MOMENTUM: f64 = 0.1;

/// One operation of the graph. Parameter fields are indices into [`ParamLayout::entries`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `y = x Wᵀ + b` on `[N, F]` input.
    Linear { weight: usize, bias: Option<usize> },
    /// 2-D convolution, square kernel, NCHW.
    Conv2d {
        weight: usize,
        bias: Option<usize>,
        stride: usize,
        padding: usize,
    },
    /// Batch norm over channels (dim 1); `stats` indexes the running statistics.
    BatchNorm {
        scale: usize,
        shift: usize,
        stats: usize,
    },
    /// max(x, 0).
    Relu,
    /// Max pooling, kernel = stride.
    MaxPool(usize),
    /// Average pooling, kernel = stride.
    AvgPool(usize),
    /// Mean over the spatial dims: `[N, C, H, W] -> [N, C]`.
    GlobalAvgPool,
    /// `[N, ...] -> [N, F]`.
    Flatten,
    /// Sum of the two inputs.
    Add,
    /// ResNet option-A shortcut: spatial subsample by 2, zero-pad `pad` channels on each side.
    ShortcutA { pad: usize },
}

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
    /// Number of output classes.
    pub num_classes: usize,
    /// Channel count of each batch-norm node, in `stats` order.
    pub bn_channels: Vec<usize>,
}

struct Builder {
    nodes: Vec<Node>,
    layout: ParamLayout,
    bn_channels: Vec<usize>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            nodes: Vec::new(),
            layout: ParamLayout::default(),
            bn_channels: Vec::new(),
        }
    }
    /// Register written by the last node (0 if none).
    fn last(&self) -> usize {
        self.nodes.len()
    }
    fn push(&mut self, name: &str, op: Op, inputs: Vec<usize>) -> usize {
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
        });
        self.nodes.len()
    }
    fn linear(&mut self, name: &str, x: usize, fan_in: usize, out: usize) -> usize {
        let node = self.nodes.len();
        let weight = self.layout.push(
            format!("{name}.weight"),
            ParamKind::Weight,
            vec![out, fan_in],
            node,
        );
        let bias = Some(
            self.layout
                .push(format!("{name}.bias"), ParamKind::Bias, vec![out], node),
        );
        self.push(name, Op::Linear { weight, bias }, vec![x])
    }
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
    ) -> usize {
        let node = self.nodes.len();
        let weight = self.layout.push(
            format!("{name}.weight"),
            ParamKind::Weight,
            vec![cout, cin, k, k],
            node,
        );
        let bias = bias.then(|| {
            self.layout
                .push(format!("{name}.bias"), ParamKind::Bias, vec![cout], node)
        });
        self.push(
            name,
            Op::Conv2d {
                weight,
                bias,
                stride,
                padding: k / 2,
            },
            vec![x],
        )
    }
    fn bn(&mut self, name: &str, x: usize, c: usize) -> usize {
        let node = self.nodes.len();
        let scale = self
            .layout
            .push(format!("{name}.weight"), ParamKind::BnScale, vec![c], node);
        let shift = self
            .layout
            .push(format!("{name}.bias"), ParamKind::BnShift, vec![c], node);
        let stats = self.bn_channels.len();
        self.bn_channels.push(c);
        self.push(
            name,
            Op::BatchNorm {
                scale,
                shift,
                stats,
            },
            vec![x],
        )
    }
    fn relu(&mut self, name: &str, x: usize) -> usize {
        self.push(name, Op::Relu, vec![x])
    }
    fn finish(self, name: String, input_shape: [usize; 3], num_classes: usize) -> Model {
        Model {
            name,
            nodes: self.nodes,
            layout: self.layout,
            input_shape,
            num_classes,
            bn_channels: self.bn_channels,
        }
    }
}

impl Model {
    /// Build a model for inputs of shape `[C, H, W]` and `num_classes` outputs.
    pub fn build(spec: &ModelSpec, input_shape: [usize; 3], num_classes: usize) -> Result<Model> {
        let [c, h, w] = input_shape;
        if c == 0 || h == 0 || w == 0 || num_classes < 2 {
            return Err(Error::Config(format!(
                "model input {c}x{h}x{w} with {num_classes} classes: need a non-empty input and at least 2 classes"
            )));
        }
        let mut b = Builder::new();
        match spec {
            ModelSpec::Mlp { hidden } => {
                if hidden.contains(&0) {
                    return Err(Error::Config(
                        "--width: MLP hidden widths must be positive".into(),
                    ));
                }
                let mut x = b.push("flatten", Op::Flatten, vec![0]);
                let mut fan_in = c * h * w;
                for (i, &width) in hidden.iter().enumerate() {
                    x = b.linear(&format!("fc{}", i + 1), x, fan_in, width);
                    x = b.relu(&format!("relu{}", i + 1), x);
                    fan_in = width;
                }
                b.linear(&format!("fc{}", hidden.len() + 1), x, fan_in, num_classes);
                let widths: Vec<String> = hidden.iter().map(|w| w.to_string()).collect();
                Ok(b.finish(
                    format!("mlp-{}", widths.join("-")),
                    input_shape,
                    num_classes,
                ))
            }
            ModelSpec::SimpleCnn { depth, width } => {
                if *depth == 0 || *width == 0 {
                    return Err(Error::Config(
                        "--depth and --width of the CNN must be positive".into(),
                    ));
                }
                let (mut hh, mut ww) = (h, w);
                let mut x = 0;
                let mut cin = c;
                for d in 1..=*depth {
                    if hh < 2 || ww < 2 {
                        return Err(Error::Config(format!(
                            "--depth {depth}: a {h}x{w} input is pooled below 1x1 after {} blocks; use --depth {} or less",
                            d - 1,
                            d - 1
                        )));
                    }
                    x = b.conv(&format!("conv{d}"), x, cin, *width, 3, 1, true);
                    x = b.bn(&format!("bn{d}"), x, *width);
                    x = b.relu(&format!("relu{d}"), x);
                    x = b.push(&format!("pool{d}"), Op::MaxPool(2), vec![x]);
                    hh /= 2;
                    ww /= 2;
                    cin = *width;
                }
                x = b.push("gap", Op::GlobalAvgPool, vec![x]);
                b.linear("fc", x, cin, num_classes);
                Ok(b.finish(format!("cnn-d{depth}-w{width}"), input_shape, num_classes))
            }
            ModelSpec::Resnet20 => {
                if h < 4 || w < 4 || h % 4 != 0 || w % 4 != 0 {
                    return Err(Error::Config(format!(
                        "ResNet-20 needs height and width divisible by 4 (it downsamples twice by 2 with option-A shortcuts), got {h}x{w}"
                    )));
                }
                let mut x = b.conv("conv1", 0, c, 16, 3, 1, false);
                x = b.bn("bn1", x, 16);
                x = b.relu("relu1", x);
                let mut cin = 16;
                for (stage, &cout) in [16usize, 32, 64].iter().enumerate() {
                    for block in 0..3 {
                        let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{}", stage + 1, block);
                        let input = x;
                        let mut y =
                            b.conv(&format!("{p}.conv1"), input, cin, cout, 3, stride, false);
                        y = b.bn(&format!("{p}.bn1"), y, cout);
                        y = b.relu(&format!("{p}.relu1"), y);
                        y = b.conv(&format!("{p}.conv2"), y, cout, cout, 3, 1, false);
                        y = b.bn(&format!("{p}.bn2"), y, cout);
                        let short = if stride != 1 || cin != cout {
                            b.push(
                                &format!("{p}.shortcut"),
                                Op::ShortcutA {
                                    pad: (cout - cin) / 2,
                                },
                                vec![input],
                            )
                        } else {
                            input
                        };
                        let s = b.push(&format!("{p}.add"), Op::Add, vec![y, short]);
                        x = b.relu(&format!("{p}.relu2"), s);
                        cin = cout;
                    }
                }
                x = b.push("gap", Op::GlobalAvgPool, vec![x]);
                let _ = b.last();
                b.linear("fc", x, 64, num_classes);
                Ok(b.finish("resnet20".into(), input_shape, num_classes))
            }
        }
    }

    /// Values in one sample's output.
    pub fn output_len(&self) -> usize {
        self.register_shapes()
            .last()
            .map_or(0, |s| s.iter().product())
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

    /// Kaiming-normal weights (std = √(2 / fan_in)), zero biases, batch-norm scale 1 and shift 0.
    pub fn init_params(&self, rng: &mut impl Rng) -> Vec<f64> {
        let mut out = vec![0.0; self.num_params()];
        for e in &self.layout.entries {
            let r = e.range();
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
        let p = |i: usize| -> &Tensor {
            match over {
                Some((e, t)) if e == i => t,
                _ => &views[i],
            }
        };
        for node in &self.nodes[start..] {
            let x = &regs[node.inputs[0]];
            let y = match &node.op {
                Op::Linear { weight, bias } => {
                    let y = x.matmul(&p(*weight).t()?)?;
                    match bias {
                        Some(b) => y.broadcast_add(p(*b))?,
                        None => y,
                    }
                }
                Op::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                } => {
                    let y = conv2d(x, p(*weight), *padding, *stride)?;
                    match bias {
                        Some(b) => {
                            let c = p(*b).dims1()?;
                            y.broadcast_add(&p(*b).reshape((1, c, 1, 1))?)?
                        }
                        None => y,
                    }
                }
                Op::BatchNorm {
                    scale,
                    shift,
                    stats: k,
                } => {
                    let c = x.dim(1)?;
                    let bshape: Vec<usize> =
                        (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
                    let gamma = p(*scale).reshape(bshape.as_slice())?;
                    let beta = p(*shift).reshape(bshape.as_slice())?;
                    let (xhat, _) = match mode {
                        Mode::Train => {
                            let mean = channel_mean(x)?.reshape(bshape.as_slice())?;
                            let xc = x.broadcast_sub(&mean)?;
                            let var = channel_mean(&xc.sqr()?)?.reshape(bshape.as_slice())?;
                            if let Some(s) = stats.as_deref_mut() {
                                let n = x.elem_count() / c;
                                let m =
                                    mean.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                                let v =
                                    var.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                                s.stats.push((m, v, n));
                            }
                            (xc.broadcast_div(&(var + BN_EPS)?.sqrt()?)?, ())
                        }
                        Mode::Eval(state) => {
                            let dev = x.device();
                            let m = Tensor::from_slice(&state.mean[*k], bshape.as_slice(), dev)?
                                .to_dtype(x.dtype())?;
                            let v = Tensor::from_slice(&state.var[*k], bshape.as_slice(), dev)?
                                .to_dtype(x.dtype())?;
                            (
                                x.broadcast_sub(&m)?.broadcast_div(&(v + BN_EPS)?.sqrt()?)?,
                                (),
                            )
                        }
                    };
                    xhat.broadcast_mul(&gamma)?.broadcast_add(&beta)?
                }
                Op::Relu => x.relu()?,
                Op::MaxPool(k) => pool(x, *k, true)?,
                Op::AvgPool(k) => pool(x, *k, false)?,
                Op::GlobalAvgPool => x.mean(D::Minus1)?.mean(D::Minus1)?,
                Op::Flatten => x.flatten_from(1)?,
                Op::Add => (x + &regs[node.inputs[1]])?,
                Op::ShortcutA { pad } => {
                    let (n, c, h, w) = x.dims4()?;
                    let sub = if h % 2 == 0 && w % 2 == 0 {
                        x.reshape((n, c, h / 2, 2, w / 2, 2))?
                            .narrow(3, 0, 1)?
                            .narrow(5, 0, 1)?
                            .reshape((n, c, h / 2, w / 2))?
                    } else {
                        return Err(Error::Shape(format!(
                            "{}: option-A shortcut needs even spatial size, got {h}x{w}",
                            node.name
                        )));
                    };
                    sub.pad_with_zeros(1, *pad, *pad)?
                }
            };
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

    fn shapes_and_costs(&self) -> (Vec<Vec<usize>>, Vec<u64>) {
        let mut shapes: Vec<Vec<usize>> = vec![self.input_shape.to_vec()];
        let mut costs = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let s = &shapes[node.inputs[0]];
            let (out, cost): (Vec<usize>, u64) = match &node.op {
                Op::Linear { weight, .. } => {
                    let e = &self.layout.entries[*weight];
                    (vec![e.shape[0]], (e.shape[0] * e.shape[1]) as u64)
                }
                Op::Conv2d {
                    weight,
                    stride,
                    padding,
                    ..
                } => {
                    let e = &self.layout.entries[*weight];
                    let k = e.shape[2];
                    let oh = (s[1] + 2 * padding - k) / stride + 1;
                    let ow = (s[2] + 2 * padding - k) / stride + 1;
                    (
                        vec![e.shape[0], oh, ow],
                        (e.shape[0] * oh * ow * e.shape[1] * k * k) as u64,
                    )
                }
                Op::MaxPool(k) | Op::AvgPool(k) => {
                    let o = vec![s[0], s[1] / k, s[2] / k];
                    let c = s.iter().product::<usize>() as u64;
                    (o, c)
                }
                Op::GlobalAvgPool => (vec![s[0]], s.iter().product::<usize>() as u64),
                Op::Flatten => (vec![s.iter().product()], 0),
                Op::ShortcutA { pad } => {
                    let o = vec![s[0] + 2 * pad, s[1] / 2, s[2] / 2];
                    let c = o.iter().product::<usize>() as u64;
                    (o, c)
                }
                _ => (s.clone(), s.iter().product::<usize>() as u64),
            };
            shapes.push(out);
            costs.push(cost);
        }
        (shapes, costs)
    }
}

/// Per-channel mean of `[N, C, ...]` as `[C]`. Sums the contiguous trailing dims first:
/// candle's reduction over non-trailing dims walks the tensor element by element and was the
/// largest cost of a training step.
fn channel_mean(x: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let rest = x.elem_count() / (n * c).max(1);
    let s = if rest > 1 {
        x.reshape((n, c, rest))?.sum(2)?
    } else {
        x.reshape((n, c))?
    };
    Ok((s.sum(0)? / (n * rest) as f64)?)
}

/// 2-D convolution as one batched matrix product over an im2col matrix built from `k²` shifted
/// views of the padded input. candle 0.11's CPU `conv2d` runs a direct loop at ≈5 GFLOP/s (its
/// backward is slower still); this form runs at the matmul rate and stays differentiable.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (co, ci, kh, kw) = w.dims4()?;
    if ci != c {
        return Err(Error::Shape(format!(
            "conv2d: input has {c} channels, weight expects {ci}"
        )));
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (wd + 2 * padding - kw) / stride + 1;
    let xp = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + 2 * padding, wd + 2 * padding);
    let mut patches = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let v = if stride == 1 {
                xp.narrow(2, i, oh)?.narrow(3, j, ow)?
            } else {
                // rows i, i+s, …: take s·oh rows (padding the tail if needed), keep every s-th.
                let need_h = stride * oh;
                let need_w = stride * ow;
                let mut t =
                    xp.narrow(2, i, (hp - i).min(need_h))?
                        .narrow(3, j, (wp - j).min(need_w))?;
                let (th, tw) = (t.dim(2)?, t.dim(3)?);
                if th < need_h {
                    t = t.pad_with_zeros(2, 0, need_h - th)?;
                }
                if tw < need_w {
                    t = t.pad_with_zeros(3, 0, need_w - tw)?;
                }
                t.reshape((n, c, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((n, c, oh, ow))?
            };
            patches.push(v);
        }
    }
    let cols = Tensor::stack(&patches, 2)?.reshape((n, c * kh * kw, oh * ow))?;
    let wm = w.reshape((co, ci * kh * kw))?;
    Ok(wm.broadcast_matmul(&cols)?.reshape((n, co, oh, ow))?)
}

/// Pooling with kernel = stride = `k` (trailing rows/columns that do not fill a window are
/// dropped, as in PyTorch). Built from reshape + gather rather than candle's pooling ops:
/// candle 0.11's max-pool backward scales the gradient by 1/k², and a plain `max` reduction
/// sends the gradient to every tied element (ties are common: flat image regions give equal
/// conv outputs), while the derivative of a window's max flows through one element. The
/// gradient check caught both.
fn pool(x: &Tensor, k: usize, max: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k, w / k);
    if oh == 0 || ow == 0 {
        return Err(Error::Shape(format!(
            "pooling {h}x{w} by {k} leaves nothing"
        )));
    }
    let x = if oh * k != h || ow * k != w {
        x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?
    } else {
        x.clone()
    };
    let x = x.reshape((n, c, oh, k, ow, k))?;
    if !max {
        return Ok(x.mean(5)?.mean(3)?);
    }
    let windows = x
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, oh, ow, k * k))?;
    let arg = windows.detach().argmax_keepdim(4)?;
    Ok(windows.gather(&arg, 4)?.squeeze(4)?)
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
