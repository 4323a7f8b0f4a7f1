//! Randomized smoothing against the exact answer for linear classifiers: the smoothed
//! classifier of f(x) = sign(w·x + b) has radius |w·x + b| / ‖w‖ (Cohen et al., §3.1).

mod common;

use std::time::Instant;

use common::{binomial_upper_quantile, linear_case, LinearBox};
use deepzero_certify::{BlackBox, Error, Smoothed, SmoothingConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SIGMA: f64 = 0.25;

/// Over 300 points, CERTIFY (n = 2000, α = 0.05) may overstate the exact radius (or certify
/// the wrong class) with probability at most α per point; the violation count must stay
/// below Binomial(300, α)'s 1e-6 upper quantile.
#[test]
fn certify_overstates_the_exact_radius_no_more_often_than_alpha() {
    let (points, alpha) = (300u64, 0.05);
    let mut rng = StdRng::seed_from_u64(1);
    let mut violations = 0u64;
    let mut abstained = 0u64;
    for i in 0..points {
        // Top-class probabilities spread over (0.55, 0.995).
        let p_top = 0.55 + 0.445 * (i as f64 + 0.5) / points as f64;
        let (f, x) = linear_case(&mut rng, SIGMA, p_top);
        let exact = f.exact_radius(&x);
        let truth = usize::from(f.margin(&x) > 0.0);
        let smoothed = Smoothed::new(f, SIGMA, 500).unwrap();
        let cert = smoothed.certify(&x, 100, 2000, alpha, &mut rng).unwrap();
        match cert.class {
            None => abstained += 1,
            Some(c) if c != truth || cert.radius > exact => violations += 1,
            Some(_) => {}
        }
    }
    let bound = binomial_upper_quantile(points, alpha, 1e-6);
    println!(
        "known-answer: {violations} violations of {points} points (alpha {alpha}, expected at \
         most {:.1}, bound {bound}), {abstained} abstentions",
        points as f64 * alpha
    );
    assert!(violations <= bound, "{violations} > {bound}");
}

/// With n = 100,000 (α = 0.001) the certified radius is within 10% of the exact one when the
/// top-class probability is in [0.6, 0.99].
#[test]
fn certify_is_close_to_the_exact_radius_with_many_samples() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut worst = 0.0f64;
    for i in 0..10 {
        let p_top = 0.6 + 0.39 * i as f64 / 9.0;
        let (f, x) = linear_case(&mut rng, SIGMA, p_top);
        let exact = f.exact_radius(&x);
        let truth = usize::from(f.margin(&x) > 0.0);
        let smoothed = Smoothed::new(f, SIGMA, 10_000).unwrap();
        let start = Instant::now();
        let cert = smoothed.certify(&x, 100, 100_000, 0.001, &mut rng).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(cert.class, Some(truth));
        let rel = (cert.radius - exact).abs() / exact;
        println!(
            "p_top {p_top:.3}: radius {:.4}, exact {exact:.4}, relative error {rel:.4}, pA {:.5}, \
             {:.0} ms in-process",
            cert.radius,
            cert.p_lower,
            elapsed.as_secs_f64() * 1e3
        );
        assert!(rel < 0.10, "relative error {rel} at p_top {p_top}");
        assert!(cert.radius <= exact * 1.001);
        assert_eq!(smoothed.classifier().queries(), 100_100);
        worst = worst.max(rel);
    }
    println!("worst relative error at n = 100000: {worst:.4}");
}

/// The same seed gives the same certificates and predictions, whatever the batch size.
#[test]
fn same_seed_same_certificates() {
    let mut rng = StdRng::seed_from_u64(3);
    let (f, x) = linear_case(&mut rng, SIGMA, 0.8);
    let run = |batch: usize, seed: u64| {
        let g = Smoothed::new(&f, SIGMA, batch).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let cert = g.certify(&x, 100, 3000, 0.001, &mut rng).unwrap();
        let pred = g.predict(&x, 1000, 0.001, &mut rng).unwrap();
        (cert, pred)
    };
    let a = run(100, 7);
    assert_eq!(a, run(100, 7));
    assert_eq!(a, run(37, 7));
    assert_ne!(a.0, run(100, 8).0);
}

/// PREDICT answers the true class when it is clear and abstains on a coin flip.
#[test]
fn predict_answers_or_abstains() {
    let mut rng = StdRng::seed_from_u64(4);
    let (f, x) = linear_case(&mut rng, SIGMA, 0.9);
    let truth = usize::from(f.margin(&x) > 0.0);
    let g = Smoothed::new(f, SIGMA, 1000).unwrap();
    let p = g.predict(&x, 1000, 0.001, &mut rng).unwrap();
    assert_eq!(p.class, Some(truth));
    assert_eq!(p.counts.iter().sum::<u64>(), 1000);
    assert!(p.p_value < 1e-10);

    // Exactly on the decision boundary both classes have probability ½: an answer is a
    // type-I error, which PREDICT makes with probability at most α.
    let (points, alpha) = (400u64, 0.01);
    let mut answered = 0;
    for _ in 0..points {
        let (f, x) = linear_case(&mut rng, SIGMA, 0.5);
        let g = Smoothed::new(f, SIGMA, 1000).unwrap();
        let p = g.predict(&x, 500, alpha, &mut rng).unwrap();
        answered += u64::from(p.class.is_some());
    }
    let bound = binomial_upper_quantile(points, alpha, 1e-6);
    println!(
        "predict on the boundary: {answered} answers of {points} (alpha {alpha}, bound {bound})"
    );
    assert!(answered <= bound, "{answered} > {bound}");
    // n = 10 with α = 0.001 (SPEC: a common mistake): PREDICT always abstains, since even
    // 10 of 10 has p-value 2·2⁻¹⁰ > α; CERTIFY's best is pA = α^(1/10) = 0.50119, a radius
    // of σ·Φ⁻¹(0.50119) = 0.00074.
    let (f, x) = linear_case(&mut rng, SIGMA, 0.999_999);
    let g = Smoothed::new(f, SIGMA, 1000).unwrap();
    let p = g.predict(&x, 10, 0.001, &mut rng).unwrap();
    assert_eq!(p.class, None);
    assert!(
        (p.p_value - 2.0 / 1024.0).abs() < 1e-15,
        "p-value {}",
        p.p_value
    );
    let c = g.certify(&x, 10, 10, 0.001, &mut rng).unwrap();
    assert_eq!(c.count, 10);
    assert!((c.p_lower - 0.001f64.powf(0.1)).abs() < 1e-12);
    assert!(c.radius < 1e-3, "radius {}", c.radius);
}

#[test]
fn invalid_arguments_are_errors_that_name_the_argument() {
    let f = LinearBox::new(vec![1.0; 16], 0.0, [1, 4, 4]);
    let msg = |e: Error| e.to_string();
    for sigma in [0.0, -0.5, f64::NAN, f64::INFINITY] {
        let e = Smoothed::new(&f, sigma, 10).err().expect("bad sigma");
        assert!(msg(e).contains("sigma"));
    }
    assert!(msg(Smoothed::new(&f, 0.25, 0).err().unwrap()).contains("batch"));
    let g = Smoothed::new(&f, 0.25, 10).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let x = vec![0.5f32; 16];
    assert!(msg(g.certify(&x, 0, 10, 0.01, &mut rng).unwrap_err()).contains("n0"));
    assert!(msg(g.certify(&x, 10, 0, 0.01, &mut rng).unwrap_err()).contains("n must"));
    for alpha in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(msg(g.certify(&x, 10, 10, alpha, &mut rng).unwrap_err()).contains("alpha"));
        assert!(msg(g.predict(&x, 10, alpha, &mut rng).unwrap_err()).contains("alpha"));
    }
    let e = msg(g.certify(&x[..15], 10, 10, 0.01, &mut rng).unwrap_err());
    assert!(e.contains("15 values") && e.contains("16"), "{e}");
    assert_eq!(f.queries(), 0, "no query before the arguments are checked");
}

#[test]
fn config_defaults_are_cohens_and_are_checked() {
    let config = SmoothingConfig::default();
    assert_eq!(
        (config.sigma, config.n0, config.n, config.alpha),
        (0.25, 100, 100_000, 0.001)
    );
    config.validate().unwrap();
    let parsed: SmoothingConfig = serde_json::from_str(r#"{"sigma": 0.5}"#).unwrap();
    assert_eq!((parsed.sigma, parsed.n), (0.5, 100_000));
    let f = LinearBox::new(vec![1.0; 16], 0.0, [1, 4, 4]);
    let bad = SmoothingConfig {
        alpha: 1.5,
        ..config.clone()
    };
    let e = Smoothed::from_config(&f, &bad).err().unwrap().to_string();
    assert!(
        e.contains("alpha must be in [1e-15, 1)") && e.contains("1.5"),
        "{e}"
    );
    // Levels too small for f64 are refused, not a panic in the quantile.
    let tiny = SmoothingConfig {
        alpha: 1e-200,
        ..config.clone()
    };
    assert!(Smoothed::from_config(&f, &tiny).is_err());
    assert!(deepzero_certify::smoothing::clopper_pearson_lower(3, 50, 1e-200).is_err());
    // A batch of noisy images that cannot fit into memory is refused before anything is drawn.
    let e = Smoothed::new(&f, 0.25, usize::MAX / 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("memory"), "{e}");
    let bad = SmoothingConfig { n0: 0, ..config };
    assert!(Smoothed::from_config(&f, &bad).is_err());
}
