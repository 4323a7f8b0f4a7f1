//! Integrating-factor Runge–Kutta (Lawson RK4) for spectral equations `∂ŝ/∂t = −λ ŝ + N(ŝ)`.
//!
//! The linear part is integrated exactly by the factor `E = exp(−λΔt/2)`, so stiff diffusion
//! imposes no step limit and a state with `N = 0` decays exactly (to round-off) as `exp(−λt)`.

use ndarray::{Array, Dimension, Zip};
use realfft::num_complex::Complex64;

use crate::error::Result;

/// One Lawson RK4 step of size `dt`; `half_decay` is `exp(−λΔt/2)` per mode.
pub(crate) fn lawson_rk4<D, N>(
    state: &Array<Complex64, D>,
    half_decay: &Array<f64, D>,
    dt: f64,
    mut nonlinear: N,
) -> Result<Array<Complex64, D>>
where
    D: Dimension,
    N: FnMut(&Array<Complex64, D>) -> Result<Array<Complex64, D>>,
{
    let half = 0.5 * dt;
    let stage_a = nonlinear(state)?;
    // s2 = E (s + dt/2 a)
    let s2 = Zip::from(state)
        .and(&stage_a)
        .and(half_decay)
        .map_collect(|&s, &a, &e| (s + a * half) * e);
    let stage_b = nonlinear(&s2)?;
    // s3 = E s + dt/2 b
    let s3 = Zip::from(state)
        .and(&stage_b)
        .and(half_decay)
        .map_collect(|&s, &b, &e| s * e + b * half);
    let stage_c = nonlinear(&s3)?;
    // s4 = E² s + dt E c
    let s4 = Zip::from(state)
        .and(&stage_c)
        .and(half_decay)
        .map_collect(|&s, &c, &e| s * (e * e) + c * (dt * e));
    let stage_d = nonlinear(&s4)?;
    let mut next = Zip::from(state)
        .and(&stage_a)
        .and(half_decay)
        .map_collect(|&s, &a, &e| s * (e * e) + a * (dt / 6.0 * e * e));
    Zip::from(&mut next)
        .and(&stage_b)
        .and(&stage_c)
        .and(&stage_d)
        .and(half_decay)
        .for_each(|n, &b, &c, &d, &e| *n += (b + c) * (dt / 3.0 * e) + d * (dt / 6.0));
    Ok(next)
}
