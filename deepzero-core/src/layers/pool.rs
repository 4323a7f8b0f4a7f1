//! Pooling and flattening.

use super::{
    change_to_full, image_shape, shape_error, Base, CandleCtx, HostParams, Layer, NodeCache,
    NodeGrads, Shapes,
};
use crate::error::{Error, Result};
use crate::fast::kernels::{self, Act};
use crate::fast::Change;
use crate::layout::ParamLayout;
use candle_core::{Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Max pooling, kernel = stride = the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxPool(pub usize);

/// Average pooling, kernel = stride = the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvgPool(pub usize);

/// Mean over the spatial dims: `[N, C, H, W] -> [N, C]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalAvgPool;

/// `[N, ...] -> [N, F]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flatten;

fn pool_shape(name: &str, s: &[usize], k: usize) -> Result<Vec<usize>> {
    let [c, h, w] = image_shape(name, s)?;
    if k == 0 || h / k == 0 || w / k == 0 {
        return Err(shape_error(
            name,
            format!("pooling {h}x{w} by {k} leaves nothing"),
        ));
    }
    Ok(vec![c, h / k, w / k])
}

fn input_elements(shapes: &Shapes) -> u64 {
    shapes.ins[0].iter().product::<usize>() as u64
}

/// Input gradient of a layer that works channel by channel: `dx` shaped like `x`, channel `c`
/// written by `f(c, dx plane)` (channels over threads).
fn per_channel_backward(x: &Act, wanted: bool, f: impl Fn(usize, &mut [f32]) + Sync) -> NodeGrads {
    let dx = wanted.then(|| {
        let mut dx = Act::zeros(x.c, x.n, x.h, x.w);
        let plane = x.plane_len().max(1);
        dx.data
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(c, dst)| f(c, dst));
        dx
    });
    NodeGrads {
        inputs: vec![dx],
        params: Vec::new(),
    }
}

fn pool_fast(x: &Act, k: usize, max: bool) -> Act {
    let mut out = Act::zeros(x.c, x.n, x.h / k, x.w / k);
    let plane = out.plane_len().max(1);
    // Channels over threads.
    out.data
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(c, dst)| kernels::pool_plane(x.plane(c), x.n, x.h, x.w, k, max, dst));
    out
}

impl Layer for MaxPool {
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        pool_shape(name, ins[0], self.0)
    }
    fn cost(&self, shapes: &Shapes, _layout: &ParamLayout) -> u64 {
        input_elements(shapes)
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        pool(ins[0], self.0, true)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        (pool_fast(ins[0], self.0, true), None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        // Each window's gradient goes to its first element (row-major) equal to the window's
        // maximum, as candle's argmax picks it.
        let (x, y, k) = (base.input(0), base.out, self.0);
        let (oh, ow) = (y.h, y.w);
        per_channel_backward(x, wanted[0], |c, dst| {
            let (xs, ys, dys) = (x.plane(c), y.plane(c), dy.plane(c));
            if k == 2 {
                return maxpool2_backward(xs, ys, dys, x.n, x.h, x.w, dst);
            }
            for ni in 0..x.n {
                for oy in 0..oh {
                    let o0 = (ni * oh + oy) * ow;
                    let rows = (ni * x.h + oy * k) * x.w;
                    for ox in 0..ow {
                        let (top, target) = (rows + ox * k, ys[o0 + ox]);
                        let at = (0..k * k)
                            .map(|t| top + (t / k) * x.w + t % k)
                            .find(|&at| xs[at] == target)
                            .unwrap_or(top);
                        dst[at] += dys[o0 + ox];
                    }
                }
            }
        })
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let x = base.input(0);
        Some((
            c,
            maxpool_delta(x.plane(c), base.out.plane(c), d, x.n, x.h, x.w, self.0),
        ))
    }
}

impl Layer for AvgPool {
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        pool_shape(name, ins[0], self.0)
    }
    fn cost(&self, shapes: &Shapes, _layout: &ParamLayout) -> u64 {
        input_elements(shapes)
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        pool(ins[0], self.0, false)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        (pool_fast(ins[0], self.0, false), None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        let (x, k) = (base.input(0), self.0);
        let (oh, ow, inv) = (dy.h, dy.w, 1.0 / (k * k) as f32);
        per_channel_backward(x, wanted[0], |c, dst| {
            let dys = dy.plane(c);
            for ni in 0..x.n {
                for oy in 0..oh {
                    for i in 0..k {
                        let row = &mut dst[(ni * x.h + oy * k + i) * x.w..][..ow * k];
                        let src = &dys[(ni * oh + oy) * ow..][..ow];
                        for (window, &d) in row.chunks_exact_mut(k).zip(src) {
                            window.fill(d * inv);
                        }
                    }
                }
            }
        })
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let (x, k) = (base.input(0), self.0);
        let mut q = vec![0.0; x.n * (x.h / k) * (x.w / k)];
        kernels::pool_plane(d, x.n, x.h, x.w, k, false, &mut q);
        Some((c, q))
    }
}

impl Layer for GlobalAvgPool {
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        let [c, _, _] = image_shape(name, ins[0])?;
        Ok(vec![c])
    }
    fn cost(&self, shapes: &Shapes, _layout: &ParamLayout) -> u64 {
        input_elements(shapes)
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok(ins[0].mean(D::Minus1)?.mean(D::Minus1)?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        let x = ins[0];
        let mut out = Act::zeros(x.c, x.n, 1, 1);
        for c in 0..x.c {
            kernels::gap_plane(x.plane(c), x.n, x.h * x.w, out.plane_mut(c));
        }
        (out, None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        let x = base.input(0);
        let hw = x.h * x.w;
        let inv = 1.0 / hw as f32;
        per_channel_backward(x, wanted[0], |c, dst| {
            for (image, &d) in dst.chunks_exact_mut(hw).zip(dy.plane(c)) {
                image.fill(d * inv);
            }
        })
    }
    fn per_channel(&self, base: &Base, _c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let x = base.input(0);
        let mut q = vec![0.0; x.n];
        kernels::gap_plane(d, x.n, x.h * x.w, &mut q);
        Some((_c, q))
    }
}

impl Layer for Flatten {
    fn shape(&self, _name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        Ok(vec![ins[0].iter().product()])
    }
    fn cost(&self, _shapes: &Shapes, _layout: &ParamLayout) -> u64 {
        0
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok(ins[0].flatten_from(1)?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        let x = ins[0];
        let hw = x.h * x.w;
        let mut out = Act::zeros(x.c * hw, x.n, 1, 1);
        for c in 0..x.c {
            let p = x.plane(c);
            for ni in 0..x.n {
                for s in 0..hw {
                    out.data[(c * hw + s) * x.n + ni] = p[ni * hw + s];
                }
            }
        }
        (out, None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        // The inverse of the forward's permutation.
        let x = base.input(0);
        let hw = x.h * x.w;
        per_channel_backward(x, wanted[0], |c, dst| {
            for ni in 0..x.n {
                for s in 0..hw {
                    dst[ni * hw + s] = dy.data[(c * hw + s) * x.n + ni];
                }
            }
        })
    }
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        let x = base.input(0);
        match ins[0] {
            Change::Same => Change::Same,
            Change::Chan(c, d) if x.h * x.w == 1 => Change::Chan(*c, d.clone()),
            // Flattening is linear: flatten the change.
            change => Change::Full(
                self.forward_fast(&[&change_to_full(change, x)], base.params)
                    .0,
            ),
        }
    }
}

/// Max-pool backward with 2×2 windows (the common case, without index arithmetic per tap):
/// each window's gradient to its first element, row-major, equal to the window's maximum.
fn maxpool2_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    n: usize,
    h: usize,
    w: usize,
    dx: &mut [f32],
) {
    let (oh, ow) = (h / 2, w / 2);
    for ni in 0..n {
        for oy in 0..oh {
            let r0 = (ni * h + 2 * oy) * w;
            let (x0, x1) = (&x[r0..r0 + w], &x[r0 + w..r0 + 2 * w]);
            let o0 = (ni * oh + oy) * ow;
            let (ys, ds) = (&y[o0..o0 + ow], &dy[o0..o0 + ow]);
            let (d0, d1) = dx[r0..r0 + 2 * w].split_at_mut(w);
            for ox in 0..ow {
                let (j, m, d) = (2 * ox, ys[ox], ds[ox]);
                if x0[j] == m {
                    d0[j] = d;
                } else if x0[j + 1] == m {
                    d0[j + 1] = d;
                } else if x1[j] == m {
                    d1[j] = d;
                } else {
                    d1[j + 1] = d;
                }
            }
        }
    }
}

/// Max-pool output change: per window `max_i((x_i − M) + Δ_i)` with `M` the base maximum.
fn maxpool_delta(
    x: &[f32],
    y: &[f32],
    d: &[f32],
    n: usize,
    h: usize,
    w: usize,
    k: usize,
) -> Vec<f32> {
    let (oh, ow) = (h / k, w / k);
    let mut out = vec![0.0; n * oh * ow];
    for ni in 0..n {
        for oy in 0..oh {
            let orow = &mut out[(ni * oh + oy) * ow..][..ow];
            let yrow = &y[(ni * oh + oy) * ow..][..ow];
            if k == 2 {
                let r0 = (ni * h + oy * 2) * w;
                let (x0, x1) = (&x[r0..r0 + w], &x[r0 + w..r0 + 2 * w]);
                let (d0, d1) = (&d[r0..r0 + w], &d[r0 + w..r0 + 2 * w]);
                for ox in 0..ow {
                    let mx = yrow[ox];
                    let j = 2 * ox;
                    let a = ((x0[j] - mx) + d0[j]).max((x0[j + 1] - mx) + d0[j + 1]);
                    let b = ((x1[j] - mx) + d1[j]).max((x1[j + 1] - mx) + d1[j + 1]);
                    orow[ox] = a.max(b);
                }
                continue;
            }
            for ox in 0..ow {
                let mx = yrow[ox];
                let mut best = f32::NEG_INFINITY;
                for i in 0..k {
                    let base = (ni * h + oy * k + i) * w + ox * k;
                    for j in 0..k {
                        best = best.max((x[base + j] - mx) + d[base + j]);
                    }
                }
                orow[ox] = best;
            }
        }
    }
    out
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
