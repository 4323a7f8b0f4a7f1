//! `deepzero gradcheck`: an estimator's gradient against backprop's on one batch.

use crate::common::{
    build_model, initial_params, load_data, DataOpts, DtypeArg, EstimatorArg, EstimatorOpts,
    ModelOpts,
};
use anyhow::{bail, Result};
use clap::Args;
use deepzero_core::estimator::{Backprop, GradientEstimator};
use deepzero_core::model::tensor_to_vec;
use deepzero_core::objective::ClassifierObjective;
use deepzero_core::trainer::batch_tensors;
use rand::seq::index::sample;
use serde::Serialize;

/// Flags of `deepzero gradcheck`.
#[derive(Args, Debug, Clone)]
pub struct GradcheckArgs {
    #[command(flatten)]
    pub data: DataOpts,
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub estimator: EstimatorOpts,
    /// Compare over N randomly sampled coordinates (CGE estimates only those); 0 = all.
    #[arg(long, default_value_t = 2000)]
    pub coords: usize,
    /// Batch size of the one batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Numeric precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Seed (init, batch, coordinates, directions).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What gradcheck prints.
#[derive(Serialize, Debug)]
pub struct GradcheckReport {
    pub model: String,
    pub params: usize,
    pub estimator: String,
    pub dtype: String,
    pub mu: f64,
    pub coords: usize,
    pub queries: u64,
    pub cosine: f64,
    pub relative_error: f64,
    /// Per parameter tensor: name, coordinates compared, cosine, relative error.
    pub layers: Vec<LayerCheck>,
}

/// Agreement on one parameter tensor.
#[derive(Serialize, Debug)]
pub struct LayerCheck {
    pub name: String,
    pub coords: usize,
    pub cosine: f64,
    pub relative_error: f64,
}

#[derive(Default)]
struct Acc {
    n: usize,
    dot: f64,
    nt: f64,
    ng: f64,
    nd: f64,
}

impl Acc {
    fn add(&mut self, g: f64, t: f64) {
        self.n += 1;
        self.dot += g * t;
        self.nt += t * t;
        self.ng += g * g;
        self.nd += (g - t) * (g - t);
    }
    fn cosine(&self) -> f64 {
        self.dot / (self.nt.sqrt() * self.ng.sqrt()).max(f64::MIN_POSITIVE)
    }
    fn rel(&self) -> f64 {
        self.nd.sqrt() / self.nt.sqrt().max(f64::MIN_POSITIVE)
    }
}

pub fn run(args: GradcheckArgs) -> Result<()> {
    let r = check(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} ({} params), {} [{}], mu {:e}, {} coords, {} queries: cosine {:.6}, relative_error {:.3e}",
            r.model, r.params, r.estimator, r.dtype, r.mu, r.coords, r.queries, r.cosine, r.relative_error
        );
        for l in &r.layers {
            println!(
                "  {:<24} {:>7} coords  cosine {:.6}  relative_error {:.3e}",
                l.name, l.coords, l.cosine, l.relative_error
            );
        }
    }
    Ok(())
}

pub fn check(args: &GradcheckArgs) -> Result<GradcheckReport> {
    if args.estimator.estimator == EstimatorArg::Fo {
        bail!("--estimator fo is the reference itself; choose --estimator cge or rge");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let precision = args.dtype.precision();
    let device = candle_core::Device::Cpu;
    let (train, _, _) = load_data(&args.data, args.seed, false)?;
    let model = build_model(&args.model, &train)?;
    let params = initial_params(&model, args.seed, precision, &device)?;
    // The batch and the coordinates checked: a stream of their own.
    let mut rng = deepzero_core::seed::stream_rng(args.seed, &[3]);
    let n = args.batch_size.min(train.len());
    let idx: Vec<usize> = sample(&mut rng, train.len(), n).into_vec();
    let (x, y) = batch_tensors(&train, &idx, None, precision.dtype(), &device)?;
    let obj = ClassifierObjective::classifier(&model, x, y)?;
    let d = model.num_params();
    let coords: Vec<usize> = if args.coords == 0 || args.coords >= d {
        (0..d).collect()
    } else {
        let mut c = sample(&mut rng, d, args.coords).into_vec();
        c.sort_unstable();
        c
    };
    let truth = tensor_to_vec(&Backprop.estimate(&obj, &params, &mut rng)?.grad)?;
    let mut est: Box<dyn GradientEstimator> = match args.estimator.estimator {
        EstimatorArg::Cge => Box::new(args.estimator.cge()?.with_coords(coords.clone())),
        _ => args.estimator.build()?,
    };
    let e = est.estimate(&obj, &params, &mut rng)?;
    let g = tensor_to_vec(&e.grad)?;
    if !(e.loss.is_finite() && coords.iter().all(|&i| g[i].is_finite())) {
        bail!(
            "the {} estimate has NaN or infinite entries (loss {}): --mu {:e} is too large or too \
             small for these parameters; try the default --mu {:e}",
            est.name(),
            e.loss,
            args.estimator.mu,
            deepzero_core::estimator::EstimatorConfig::default().mu
        );
    }
    let mut total = Acc::default();
    let mut per: Vec<Acc> = model
        .layout
        .entries
        .iter()
        .map(|_| Acc::default())
        .collect();
    for &i in &coords {
        total.add(g[i], truth[i]);
        if let Some(e) = model.layout.entry_of(i) {
            per[e].add(g[i], truth[i]);
        }
    }
    let layers = model
        .layout
        .entries
        .iter()
        .zip(&per)
        .filter(|(_, a)| a.n > 0)
        .map(|(e, a)| LayerCheck {
            name: e.name.clone(),
            coords: a.n,
            cosine: a.cosine(),
            relative_error: a.rel(),
        })
        .collect();
    Ok(GradcheckReport {
        model: model.name.clone(),
        params: d,
        estimator: est.name(),
        dtype: format!("{:?}", args.dtype).to_lowercase(),
        mu: args.estimator.mu,
        coords: coords.len(),
        queries: e.queries,
        cosine: total.cosine(),
        relative_error: total.rel(),
        layers,
    })
}
