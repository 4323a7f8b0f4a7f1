//! Fields made of Fourier modes: random smooth initial states and travelling-wave forcing.
//!
//! A [`WaveField`] is a sum of waves `a_c · sin(2π(kx·x + ky·y)/L + φ − ω·t)` with integer
//! wavenumbers on the periodic domain `[0, L)²`, one amplitude `a_c` per channel. Because it is
//! a continuous function it can be sampled on any grid that resolves its modes, so the reference
//! and the source solver see the same initial state and forcing. Sampling is exact: the modes
//! are written into the spectrum and transformed back, at the cell centres of [`crate::grid`].

use std::f64::consts::PI;

use ndarray::{Array2, Array3, Axis};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use realfft::num_complex::Complex64;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fft::Fft2;

/// One travelling sine wave; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    /// Wavenumber along x (cycles per domain length).
    pub kx: i64,
    /// Wavenumber along y (cycles per domain length).
    pub ky: i64,
    /// Amplitude per channel.
    pub amplitudes: Vec<f64>,
    /// Phase φ in radians.
    pub phase: f64,
    /// Angular frequency ω (radians per unit time); 0 for a standing pattern.
    pub angular_frequency: f64,
}

/// A multi-channel field on `[0, L)²` given as a sum of [`Wave`]s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveField {
    /// Number of channels (2 for a velocity, 1 for a vorticity).
    pub channels: usize,
    /// The waves.
    pub waves: Vec<Wave>,
}

impl WaveField {
    /// A random smooth field: every mode with `0 < |k| ≤ max_wavenumber` (Gaussian amplitude
    /// with envelope `exp(−|k|²/max_wavenumber²)`, uniform phase), then each channel scaled to
    /// root-mean-square value `rms`.
    pub fn random_smooth<R: Rng + ?Sized>(
        rng: &mut R,
        channels: usize,
        max_wavenumber: i64,
        rms: f64,
    ) -> Result<Self> {
        check_positive_wavenumber("max_wavenumber", max_wavenumber)?;
        check_non_negative("rms", rms)?;
        let mut waves = Vec::new();
        let limit = max_wavenumber * max_wavenumber;
        for kx in 0..=max_wavenumber {
            for ky in -max_wavenumber..=max_wavenumber {
                let norm2 = kx * kx + ky * ky;
                // Half plane: kx > 0, or kx = 0 with ky > 0.
                if norm2 == 0 || norm2 > limit || (kx == 0 && ky < 0) {
                    continue;
                }
                let envelope = (-(norm2 as f64) / limit as f64).exp();
                let amplitudes = (0..channels)
                    .map(|_| {
                        let gaussian: f64 = StandardNormal.sample(rng);
                        envelope * gaussian
                    })
                    .collect::<Vec<f64>>();
                waves.push(Wave {
                    kx,
                    ky,
                    amplitudes,
                    phase: rng.random::<f64>() * 2.0 * PI,
                    angular_frequency: 0.0,
                });
            }
        }
        let mut field = Self { channels, waves };
        for channel in 0..channels {
            // Distinct modes: mean square = Σ a²/2.
            let mean_square: f64 = field
                .waves
                .iter()
                .map(|w| 0.5 * w.amplitudes[channel].powi(2))
                .sum();
            let scale = if mean_square > 0.0 {
                rms / mean_square.sqrt()
            } else {
                0.0
            };
            for wave in &mut field.waves {
                wave.amplitudes[channel] *= scale;
            }
        }
        Ok(field)
    }

    /// `count` random travelling waves: wavevector uniform in `[−K, K]²` without 0, amplitude per
    /// channel uniform in `[−amplitude, amplitude]`, phase uniform in `[0, 2π)`, angular
    /// frequency uniform in `[−max_angular_frequency, max_angular_frequency]`.
    pub fn random_travelling<R: Rng + ?Sized>(
        rng: &mut R,
        channels: usize,
        count: usize,
        max_wavenumber: i64,
        amplitude: f64,
        max_angular_frequency: f64,
    ) -> Result<Self> {
        check_positive_wavenumber("max_wavenumber", max_wavenumber)?;
        check_non_negative("amplitude", amplitude)?;
        check_non_negative("max_angular_frequency", max_angular_frequency)?;
        let waves = (0..count)
            .map(|_| {
                let (kx, ky) = loop {
                    let kx = rng.random_range(-max_wavenumber..=max_wavenumber);
                    let ky = rng.random_range(-max_wavenumber..=max_wavenumber);
                    if kx != 0 || ky != 0 {
                        break (kx, ky);
                    }
                };
                Wave {
                    kx,
                    ky,
                    amplitudes: (0..channels)
                        .map(|_| amplitude * (2.0 * rng.random::<f64>() - 1.0))
                        .collect(),
                    phase: rng.random::<f64>() * 2.0 * PI,
                    angular_frequency: max_angular_frequency * (2.0 * rng.random::<f64>() - 1.0),
                }
            })
            .collect();
        Ok(Self { channels, waves })
    }

    /// A field with no waves (zero everywhere).
    pub fn zero(channels: usize) -> Self {
        Self {
            channels,
            waves: Vec::new(),
        }
    }

    /// The largest `|kx|` or `|ky|` of any wave (0 when there are none).
    pub fn max_wavenumber(&self) -> i64 {
        self.waves
            .iter()
            .map(|w| w.kx.abs().max(w.ky.abs()))
            .max()
            .unwrap_or(0)
    }

    /// Checks the field against a solver: `channels` channels, every wave with one amplitude per
    /// channel and finite parameters, and every wavenumber below the Nyquist index `n/2`.
    pub fn check_for_grid(&self, what: &'static str, channels: usize, n: usize) -> Result<()> {
        if self.channels != channels {
            return Err(Error::parameter(
                what,
                format!("{} channels", self.channels),
                format!("a field with {channels} channels"),
            ));
        }
        for wave in &self.waves {
            let finite = wave.phase.is_finite()
                && wave.angular_frequency.is_finite()
                && wave.amplitudes.iter().all(|a| a.is_finite());
            if wave.amplitudes.len() != channels || !finite {
                return Err(Error::parameter(
                    what,
                    format!("{wave:?}"),
                    format!(
                        "waves with {channels} finite amplitudes and finite phase and frequency"
                    ),
                ));
            }
        }
        let max = self.max_wavenumber();
        if 2 * max >= n as i64 {
            return Err(Error::GridSize {
                what,
                size: n,
                minimum: 2 * max as usize + 2,
                reason: format!("it cannot resolve wavenumber {max}"),
            });
        }
        Ok(())
    }

    /// Adds `scale ×` the spectrum of this field at time `t` to `spectra` (one half spectrum
    /// per channel, layout of [`Fft2::forward`], unnormalised).
    pub fn add_to_spectra(&self, spectra: &mut [Array2<Complex64>], t: f64, scale: f64) {
        for (channel, spectrum) in spectra.iter_mut().enumerate().take(self.channels) {
            let (ny, columns) = spectrum.dim();
            let nx = 2 * (columns - 1);
            let cells = (nx * ny) as f64;
            for wave in &self.waves {
                // Cell-centred samples shift the phase by π(kx/nx + ky/ny).
                let psi = wave.phase - wave.angular_frequency * t
                    + PI * (wave.kx as f64 / nx as f64 + wave.ky as f64 / ny as f64);
                // a·sin(θ) = a/(2i)·(e^{iθ} − e^{−iθ}); coefficient of +k is a/(2i)·e^{iψ}.
                let half = 0.5 * scale * cells * wave.amplitudes[channel];
                let plus = Complex64::new(half * psi.sin(), -half * psi.cos());
                let row = |ky: i64| ky.rem_euclid(ny as i64) as usize;
                match wave.kx {
                    kx if kx > 0 => spectrum[[row(wave.ky), kx as usize]] += plus,
                    kx if kx < 0 => spectrum[[row(-wave.ky), (-kx) as usize]] += plus.conj(),
                    _ => {
                        spectrum[[row(wave.ky), 0]] += plus;
                        spectrum[[row(-wave.ky), 0]] += plus.conj();
                    }
                }
            }
        }
    }

    /// The same field with its time origin moved to `t0`: `shifted.at(t) = self.at(t0 + t)`.
    pub fn shifted(&self, t0: f64) -> Self {
        let mut field = self.clone();
        for wave in &mut field.waves {
            wave.phase -= wave.angular_frequency * t0;
        }
        field
    }

    /// Samples the field at time `t` on the grid of `fft`; shape `[channels, ny, nx]`.
    pub fn evaluate(&self, fft: &Fft2, t: f64) -> Result<Array3<f64>> {
        let (ny, nx) = fft.shape();
        let n = ny.min(nx);
        self.check_for_grid("wave field", self.channels, n)?;
        let mut spectra = vec![Array2::zeros(fft.spectrum_shape()); self.channels];
        self.add_to_spectra(&mut spectra, t, 1.0);
        let mut field = Array3::zeros((self.channels, ny, nx));
        for (channel, spectrum) in spectra.iter().enumerate() {
            field
                .index_axis_mut(Axis(0), channel)
                .assign(&fft.inverse(spectrum.view())?);
        }
        Ok(field)
    }
}

fn check_positive_wavenumber(name: &'static str, value: i64) -> Result<()> {
    if value < 1 {
        return Err(Error::parameter(name, value, "an integer ≥ 1"));
    }
    Ok(())
}

fn check_non_negative(name: &'static str, value: f64) -> Result<()> {
    if !(value >= 0.0 && value.is_finite()) {
        return Err(Error::parameter(name, value, "a finite number ≥ 0"));
    }
    Ok(())
}
