//! The ONNX classifier against the same network computed in Rust (the weights follow the
//! closed formulas of scripts/make_onnx_fixture.py, which wrote the fixtures).
#![cfg(feature = "onnx")]

use deepzero_certify::{BlackBox, OnnxClassifier, Smoothed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Conv(3→2, 3×3, pad 1) → ReLU → flatten → linear(32 → 3), in f64.
fn reference(x: &[f32]) -> Vec<f64> {
    let conv_w = |i: usize| 0.3 * (1.0 + i as f64).sin();
    let conv_b = |j: usize| 0.1 * (j as f64).cos();
    let fc_w = |i: usize| 0.2 * (2.0 + 0.5 * i as f64).sin();
    let mut hidden = vec![0.0f64; 32];
    for o in 0..2 {
        for y in 0..4i64 {
            for xx in 0..4i64 {
                let mut s = conv_b(o);
                for c in 0..3 {
                    for ky in 0..3i64 {
                        for kx in 0..3i64 {
                            let (iy, ix) = (y + ky - 1, xx + kx - 1);
                            if (0..4).contains(&iy) && (0..4).contains(&ix) {
                                let wi = ((o * 3 + c) * 3 + ky as usize) * 3 + kx as usize;
                                let xi = (c * 4 + iy as usize) * 4 + ix as usize;
                                s += conv_w(wi) * f64::from(x[xi]);
                            }
                        }
                    }
                }
                hidden[(o * 4 + y as usize) * 4 + xx as usize] = s.max(0.0);
            }
        }
    }
    (0..3)
        .map(|k| 0.05 * k as f64 + (0..32).map(|i| fc_w(k * 32 + i) * hidden[i]).sum::<f64>())
        .collect()
}

fn check(classifier: &OnnxClassifier, n: usize) {
    let mut rng = StdRng::seed_from_u64(21);
    let images: Vec<f32> = (0..n * 48)
        .map(|_| rng.random::<f32>() * 1.4 - 0.2)
        .collect();
    let got = classifier.logits(&images, n).unwrap();
    assert_eq!(got.len(), n * 3);
    let mut worst = 0.0f64;
    for (i, x) in images.chunks(48).enumerate() {
        for (k, want) in reference(x).into_iter().enumerate() {
            worst = worst.max((f64::from(got[i * 3 + k]) - want).abs());
        }
    }
    println!(
        "{}: {n} images, max |onnx − rust| = {worst:.2e}",
        classifier.path().display()
    );
    assert!(worst < 1e-5, "max abs difference {worst}");
}

#[test]
fn symbolic_batch_matches_the_rust_reference() {
    let c = OnnxClassifier::load(fixture("classifier_dyn.onnx")).unwrap();
    assert_eq!(c.input_shape(), [3, 4, 4]);
    assert_eq!(c.num_classes().unwrap(), 3);
    assert_eq!(c.fixed_batch(), None);
    check(&c, 1);
    check(&c, 300); // more than one chunk
    assert_eq!(c.queries(), 301);
}

#[test]
fn fixed_batch_runs_in_padded_chunks() {
    let c = OnnxClassifier::load(fixture("classifier_b2.onnx")).unwrap();
    assert_eq!(c.fixed_batch(), Some(2));
    assert_eq!(c.input_shape(), [3, 4, 4]);
    check(&c, 5);
    assert_eq!(c.queries(), 5);
    let g = Smoothed::new(&c, 0.25, 7).unwrap();
    let cert = g
        .certify(&[0.5; 48], 10, 100, 0.01, &mut StdRng::seed_from_u64(1))
        .unwrap();
    assert_eq!(cert.n, 100);
}

#[test]
fn missing_or_broken_files_are_clear_errors() {
    let e = OnnxClassifier::load(fixture("missing.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing.onnx") && e.contains("no such file"),
        "{e}"
    );
    let broken = fixture("faulty_client.py");
    let e = OnnxClassifier::load(&broken).err().unwrap().to_string();
    assert!(
        e.contains("faulty_client.py") && e.contains("could not load"),
        "{e}"
    );
}
