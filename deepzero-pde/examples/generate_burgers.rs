//! Times the default Burgers data generation (128² reference, 32² source, 15 simulations of
//! 200 steps) and prints a summary: `cargo run --release -p deepzero-pde --example generate_burgers
//! [DOMAIN_LENGTH [FORCING_AMPLITUDE [INITIAL_RMS]]]` (defaults: the data set defaults).

use std::time::Instant;

use deepzero_pde::{Dataset, DatasetConfig};

fn main() -> anyhow::Result<()> {
    let mut config = DatasetConfig::default();
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<f64>())
        .collect::<Result<_, _>>()?;
    if let deepzero_pde::Problem::Burgers2d(params) = &mut config.problem {
        if let Some(&length) = args.first() {
            params.domain_length = length;
        }
    }
    if let Some(&amplitude) = args.get(1) {
        config.forcing.amplitude = amplitude;
    }
    if let Some(&rms) = args.get(2) {
        config.initial.rms = rms;
    }
    let start = Instant::now();
    let dataset = Dataset::generate(&config)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut mae = 0.0;
    let mut count = 0;
    let mut max_speed: f64 = 0.0;
    for simulation in dataset.train.iter().chain(&dataset.test) {
        for (reference, source) in simulation.reference.iter().zip(&simulation.source) {
            mae += (reference - source).mapv(f64::abs).mean().unwrap_or(0.0);
            count += 1;
            let speed = reference.index_axis(ndarray::Axis(0), 0).mapv(f64::abs)
                + reference.index_axis(ndarray::Axis(0), 1).mapv(f64::abs);
            max_speed = max_speed.max(speed.iter().fold(0.0_f64, |m, v| m.max(*v)));
        }
    }
    println!(
        "generated {} + {} simulations × {} steps ({}² → {}²) in {seconds:.2} s; SRC MAE vs reference {:.4}; max |u| + |v| (source grid) {max_speed:.3}",
        dataset.train.len(),
        dataset.test.len(),
        config.steps,
        config.reference_size,
        config.source_size,
        mae / count as f64
    );
    Ok(())
}
