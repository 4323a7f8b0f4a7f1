//! The statistics of CERTIFY and PREDICT against scipy.
//!
//! Golden values generated with scipy 1.x:
//! ```python
//! from scipy.stats import beta, norm, binomtest
//! beta.ppf(alpha, k, n - k + 1)      # one-sided Clopper–Pearson lower bound
//! norm.ppf(p)                        # Φ⁻¹
//! binomtest(k, n, 0.5).pvalue        # two-sided binomial test
//! ```

use deepzero_certify::{binomial_test_half, clopper_pearson_lower, normal_inverse_cdf};

fn close(got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-300);
    assert!(
        err <= tol || (got - want).abs() <= 1e-15,
        "got {got}, want {want} (relative error {err})"
    );
}

#[test]
fn clopper_pearson_matches_scipy() {
    // (k, n, alpha, beta.ppf(alpha, k, n - k + 1))
    let table = [
        (1, 10, 0.05, 0.005116196891823701),
        (9, 10, 0.05, 0.6058366975634952),
        (10, 10, 0.001, 0.5011872336272722),
        (99_990, 100_000, 0.001, 0.9997586773435911),
        (50_000, 100_000, 0.001, 0.49510904290369595),
        (60_000, 100_000, 0.001, 0.5952010472945846),
        (100_000, 100_000, 0.001, 0.9999309248330094),
        (5, 100, 0.01, 0.012968921327023254),
        (1000, 1000, 0.001, 0.9931160484209338),
    ];
    for (k, n, alpha, want) in table {
        close(clopper_pearson_lower(k, n, alpha).unwrap(), want, 1e-10);
    }
    // nA = 0: the bound is 0.
    assert_eq!(clopper_pearson_lower(0, 100, 0.001).unwrap(), 0.0);
    // All n successes: BetaInv(α; n, 1) = α^(1/n).
    close(
        clopper_pearson_lower(7, 7, 0.01).unwrap(),
        0.01f64.powf(1.0 / 7.0),
        1e-12,
    );
    assert!(clopper_pearson_lower(11, 10, 0.01).is_err());
    assert!(clopper_pearson_lower(1, 0, 0.01).is_err());
    assert!(clopper_pearson_lower(1, 10, 1.0).is_err());
}

#[test]
fn normal_quantile_matches_scipy() {
    // (p, norm.ppf(p))
    let table = [
        (0.6, 0.2533471031357997),
        (0.9, 1.2815515655446004),
        (0.975, 1.959963984540054),
        (0.999, 3.090232306167813),
        (0.9999, 3.719016485455709),
        (1e-10, -6.361340902404056),
        (0.99999999, 5.612001243305505),
    ];
    for (p, want) in table {
        close(normal_inverse_cdf(p).unwrap(), want, 1e-9);
    }
    assert!(normal_inverse_cdf(0.5).unwrap().abs() < 1e-15);
    for p in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(normal_inverse_cdf(p).is_err());
    }
}

#[test]
fn binomial_test_matches_scipy() {
    // (k, n, binomtest(k, n, 0.5).pvalue)
    let table = [
        (7, 10, 0.34375),
        (60, 100, 0.05688793364098089),
        (530, 1000, 0.06202319509836343),
        (10, 10, 0.001953125),
        (0, 10, 0.001953125),
        (5, 10, 1.0),
        (990, 1000, 4.9666775829792705e-278),
    ];
    for (k, n, want) in table {
        close(binomial_test_half(k, n), want, 1e-9);
    }
    assert_eq!(binomial_test_half(0, 0), 1.0);
}
