//! 2-D convolution with zero or circular (periodic) padding.

use super::{
    change_to_full, channel_sums, image_shape, shape_error, Base, CandleCtx, HostParams, Layer,
    NodeCache, NodeGrads, Shapes, Spread,
};
use crate::error::{Error, Result};
use crate::fast::conv_grad::{conv_backward_data, conv_backward_weight};
use crate::fast::kernels::{self, Act, ConvGeom};
use crate::fast::pieces::{for_pieces_into, sample_planes};
use crate::fast::Change;
use crate::layout::{ParamEntry, ParamKind, ParamLayout};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Zeros outside the image (default).
    #[default]
    Zeros,
    /// Periodic: the image wraps around (fields on a periodic grid).
    Circular,
}

/// 2-D convolution, square kernel, NCHW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Weight `[Co, Ci, k, k]` (layout index).
    pub weight: usize,
    /// Bias `[Co]` (layout index).
    pub bias: Option<usize>,
    /// Stride.
    pub stride: usize,
    /// Padding on each side.
    pub padding: usize,
    /// Zero or circular padding.
    #[serde(default)]
    pub padding_mode: Padding,
}

impl Conv2d {
    fn circular(&self) -> bool {
        self.padding_mode == Padding::Circular
    }
    /// `(Co, Ci, k)`.
    fn dims(&self, layout: &ParamLayout) -> (usize, usize, usize) {
        let s = &layout.entries[self.weight].shape;
        (s[0], s[1], s[2])
    }
    fn geom(&self, k: usize, h: usize, w: usize) -> ConvGeom {
        ConvGeom::new(k, self.stride, self.padding, self.circular(), h, w)
    }
    fn conv(&self, x: &Act, w: &[f32], co: usize, k: usize, bias: Option<&[f32]>) -> Act {
        kernels::conv(
            x,
            w,
            co,
            bias,
            k,
            self.stride,
            self.padding,
            self.circular(),
        )
    }
}

/// Circular padding of `[N, C, H, W]` by `p` on each side of both spatial dims.
pub fn circular_pad(x: &Tensor, p: usize) -> Result<Tensor> {
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    if p > h || p > w {
        return Err(Error::Shape(format!(
            "circular padding {p} is larger than the {h}x{w} image"
        )));
    }
    let x = Tensor::cat(&[&x.narrow(2, h - p, p)?, x, &x.narrow(2, 0, p)?], 2)?;
    Ok(Tensor::cat(
        &[&x.narrow(3, w - p, p)?, &x, &x.narrow(3, 0, p)?],
        3,
    )?)
}

impl Layer for Conv2d {
    fn params(&self) -> Vec<usize> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }
    fn shape(&self, name: &str, ins: &[&[usize]], layout: &ParamLayout) -> Result<Vec<usize>> {
        let [c, h, w] = image_shape(name, ins[0])?;
        let (co, ci, k) = self.dims(layout);
        if c != ci {
            return Err(shape_error(
                name,
                format!("input has {c} channels, the weight expects {ci}"),
            ));
        }
        if self.stride == 0 || h + 2 * self.padding < k || w + 2 * self.padding < k {
            return Err(shape_error(
                name,
                format!(
                    "a {k}x{k} kernel with stride {} and padding {} does not fit a {h}x{w} input",
                    self.stride, self.padding
                ),
            ));
        }
        if self.circular() && (self.padding > h || self.padding > w) {
            return Err(shape_error(
                name,
                format!(
                    "circular padding {} is larger than the {h}x{w} input",
                    self.padding
                ),
            ));
        }
        let g = self.geom(k, h, w);
        Ok(vec![co, g.oh, g.ow])
    }
    fn cost(&self, shapes: &Shapes, layout: &ParamLayout) -> u64 {
        let (co, ci, k) = self.dims(layout);
        (co * shapes.out[1] * shapes.out[2] * ci * k * k) as u64
    }
    fn forward(&self, ins: &[&Tensor], ctx: &mut CandleCtx) -> Result<Tensor> {
        let w = ctx.params.get(self.weight);
        let y = match self.padding_mode {
            Padding::Zeros => conv2d(ins[0], w, self.padding, self.stride)?,
            Padding::Circular => conv2d(&circular_pad(ins[0], self.padding)?, w, 0, self.stride)?,
        };
        Ok(match self.bias {
            Some(b) => {
                let b = ctx.params.get(b);
                let c = b.dims1()?;
                y.broadcast_add(&b.reshape((1, c, 1, 1))?)?
            }
            None => y,
        })
    }
    fn forward_fast(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache) {
        let (co, _, k) = self.dims(params.layout);
        let bias = self.bias.map(|b| params.get(b));
        (
            self.conv(ins[0], params.get(self.weight), co, k, bias),
            None,
        )
    }
    fn forward_train(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache) {
        let x = ins[0];
        let (co, _, k) = self.dims(params.layout);
        let g = self.geom(k, x.h, x.w);
        let (w, bias) = (params.get(self.weight), self.bias.map(|b| params.get(b)));
        let mut out = Act::for_overwrite(co, x.n, g.oh, g.ow);
        for_pieces_into(&mut out, x.h * x.w, |s0, samples, segments| {
            let planes = sample_planes(x, s0, samples);
            kernels::conv_into(&planes, samples, &g, w, co, bias, segments);
        });
        (out, None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        let x = base.input(0);
        let (co, ci, k) = self.dims(base.params.layout);
        let g = self.geom(k, x.h, x.w);
        let mut params = vec![(self.weight, conv_backward_weight(x, &dy, co, &g))];
        if let Some(b) = self.bias {
            params.push((b, channel_sums(&dy)));
        }
        let dx = wanted[0].then(|| conv_backward_data(&dy, base.params.get(self.weight), ci, &g));
        NodeGrads {
            inputs: vec![dx],
            params,
        }
    }
    fn perturbed(&self, base: &Base, entry: &ParamEntry, j: usize, delta: f32) -> Change {
        if entry.kind != ParamKind::Weight {
            return Change::Chan(j, vec![delta; base.out.plane_len()]);
        }
        // W[o, c, i, jj] moves: output channel o changes by δ times input channel c shifted by
        // the tap (i, jj).
        let x = base.input(0);
        let (ci, k) = (entry.shape[1], entry.shape[2]);
        let o = j / (ci * k * k);
        let c = (j / (k * k)) % ci;
        let (i, jj) = ((j / k) % k, j % k);
        let g = self.geom(k, x.h, x.w);
        let mut p = vec![0.0f32; base.out.plane_len()];
        let src = x.plane(c);
        for ni in 0..x.n {
            for oy in 0..g.oh {
                let Some(iy) = g.source(oy, i, x.h) else {
                    continue;
                };
                let srow = &src[(ni * x.h + iy) * x.w..][..x.w];
                let drow = &mut p[(ni * g.oh + oy) * g.ow..][..g.ow];
                for (ox, d) in drow.iter_mut().enumerate() {
                    if let Some(ix) = g.source(ox, jj, x.w) {
                        *d = delta * srow[ix];
                    }
                }
            }
        }
        Change::Chan(o, p)
    }
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        let x = base.input(0);
        let y = base.out;
        let (co, ci, k) = self.dims(base.params.layout);
        let w = base.params.get(self.weight);
        match ins[0] {
            Change::Same => Change::Same,
            // One changed input channel: 1/C_in of the convolution.
            Change::Chan(c, d) => {
                let g = self.geom(k, x.h, x.w);
                let mut out = Act::zeros(y.c, y.n, y.h, y.w);
                kernels::conv_add_channel(&mut out, d, w, ci, *c, &g, x.n);
                Change::Full(out)
            }
            full => Change::Full(self.conv(&change_to_full(full, x), w, co, k, None)),
        }
    }
    fn perturbed_cost(&self, cost: f64, shapes: &Shapes, layout: &ParamLayout) -> f64 {
        let (co, ci, k) = self.dims(layout);
        let _ = shapes;
        cost / co.max(1) as f64 / (ci * k * k).max(1) as f64
    }
    fn propagate_cost(
        &self,
        ins: &[Spread],
        cost: f64,
        _shapes: &Shapes,
        layout: &ParamLayout,
    ) -> (Spread, f64) {
        if ins.contains(&Spread::Full) {
            (Spread::Full, cost)
        } else {
            (Spread::Full, cost / self.dims(layout).1.max(1) as f64)
        }
    }
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
