//! A CPU without AVX-512 takes the AVX2 kernels, and one without AVX2 the portable ones: every
//! path must give the same numbers. This binary forces each path in turn (the choice is
//! process-wide, so it holds one test only) and compares whole computations bit for bit:
//! base forwards, CGE gradients of the naive and fast engines, and first-order gradients.

use anyhow::Result;
use deepzero_core::fast::backprop;
use deepzero_core::fast::simd::{self, Isa};
use deepzero_core::fast::Engine;
use deepzero_core::head::Head;
use deepzero_core::model::{Model, ModelSpec};
use deepzero_core::query::{Difference, QueryEngine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Everything one path computes for one model, as bits.
fn run(model: &Model, seed: u64, batch: usize) -> Result<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let p: Vec<f32> = model
        .init_params(&mut rng)
        .iter()
        .map(|&v| v as f32 + 0.01)
        .collect();
    let [c, h, w] = model.input_shape;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let head = match model.num_classes() {
        Some(k) => Head::CrossEntropy((0..batch).map(|_| rng.random_range(0..k as u32)).collect()),
        None => Head::SquaredError(std::sync::Arc::new(
            (0..batch * model.output_len())
                .map(|_| rng.random::<f64>())
                .collect(),
        )),
    };
    let d = model.num_params();
    let coords: Vec<usize> = (0..60).map(|_| rng.random_range(0..d)).collect();
    let engine = Engine::new(model, &p, &x, batch, &head)?;
    let base = engine.base_mean_loss();
    let mut bits: Vec<u32> = Vec::new();
    let mut push = |v: f64| bits.extend([(v.to_bits() >> 32) as u32, v.to_bits() as u32]);
    push(base);
    for mode in [QueryEngine::Naive, QueryEngine::Fast] {
        let (g, _) = engine.cge(&coords, 5e-3, Difference::Forward, mode)?;
        g.into_iter().for_each(&mut push);
    }
    // Backprop: forward, weight and input gradients of every convolution.
    let (loss, grad, _) = backprop::loss_and_grad(model, &p, &x, batch, &head)?;
    push(loss);
    grad.into_iter().for_each(&mut push);
    Ok(bits)
}

#[test]
fn every_instruction_set_gives_the_same_bits() -> Result<()> {
    let models = [
        // Output widths 16 and 8 (dense tiles, whole and half pieces), 4 (padded tiles),
        // stride-2 convolutions and option-A shortcuts.
        Model::build(&ModelSpec::Resnet20, [3, 16, 16], 10)?,
        // 28 × 28 inputs: widths 28, 14, 7 (padded tiles), 16 channels, max pooling.
        Model::build(
            &ModelSpec::SimpleCnn {
                depth: 3,
                width: 16,
            },
            [1, 28, 28],
            10,
        )?,
        // Circular padding, 5 × 5 kernels, a squared-error head.
        Model::build_image(
            &ModelSpec::CorrectionCnn {
                width: 8,
                blocks: 1,
                kernel: 5,
                out_channels: 2,
                activation: Default::default(),
            },
            [3, 16, 16],
        )?,
    ];
    let (paths, lacking): (Vec<Isa>, Vec<Isa>) = [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .partition(|i| i.supported());
    let names = |v: &[Isa]| v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
    // Said on every run (`cargo test -- --nocapture` shows it): which paths were compared, and
    // which this CPU lacks and so went unchecked here. DEEPZERO_REQUIRE_ISA=all makes a
    // missing path a failure, for a machine that is meant to check them all.
    eprintln!(
        "isa_paths: compared {}; not on this CPU: {}",
        names(&paths),
        if lacking.is_empty() {
            "none".to_string()
        } else {
            names(&lacking)
        }
    );
    if std::env::var("DEEPZERO_REQUIRE_ISA").is_ok_and(|v| v == "all") {
        assert!(
            lacking.is_empty(),
            "DEEPZERO_REQUIRE_ISA=all: this CPU lacks {}",
            names(&lacking)
        );
    }
    assert!(paths.len() >= 2 || !Isa::Avx2.supported());
    for (m, model) in models.iter().enumerate() {
        let mut first: Option<(Isa, Vec<u32>)> = None;
        for &isa in &paths {
            simd::force(Some(isa)).map_err(anyhow::Error::msg)?;
            let bits = run(model, 7 + m as u64, 4)?;
            match &first {
                None => first = Some((isa, bits)),
                Some((f, want)) => assert!(
                    want == &bits,
                    "{}: the {} path differs from the {} path",
                    model.name,
                    isa.name(),
                    f.name()
                ),
            }
        }
    }
    simd::force(None).map_err(anyhow::Error::msg)?;
    Ok(())
}
