//! Data generation (seeded determinism, conservative downsampling, save/load) and the error
//! variants bad input must produce.

use deepzero_pde::grid::{downsample_block_mean, downsample_channels};
use deepzero_pde::{
    Burgers2d, Burgers2dParams, Dataset, DatasetConfig, Error, KolmogorovForcing, NavierStokes2d,
    NavierStokesParams, Problem, Solver, WaveField,
};
use ndarray::{Array2, Array3};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn small_config(seed: u64) -> DatasetConfig {
    DatasetConfig {
        reference_size: 64,
        source_size: 16,
        train_simulations: 2,
        test_simulations: 1,
        steps: 20,
        seed,
        ..DatasetConfig::default()
    }
}

#[test]
fn same_seed_gives_same_data_and_other_seed_differs() -> anyhow::Result<()> {
    let first = Dataset::generate(&small_config(1))?;
    let again = Dataset::generate(&small_config(1))?;
    let other = Dataset::generate(&small_config(2))?;
    assert_eq!(first, again);
    assert_ne!(first.train[0].reference[5], other.train[0].reference[5]);
    assert_ne!(first.train[0].reference[5], first.train[1].reference[5]);
    assert_eq!((first.train.len(), first.test.len()), (2, 1));
    assert_eq!(first.train[0].reference.len(), 21);
    assert_eq!(first.train[0].source[20].shape(), &[2, 16, 16]);
    // The source run starts from the downsampled reference state and then drifts from it.
    assert_eq!(first.train[0].source[0], first.train[0].reference[0]);
    let drift = (&first.train[0].source[20] - &first.train[0].reference[20])
        .mapv(f64::abs)
        .sum();
    assert!(drift > 0.0);
    Ok(())
}

#[test]
fn block_mean_downsampling_conserves_the_mean() -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let fine = Array2::from_shape_fn((128, 128), |_| rng.random::<f64>() * 4.0 - 1.0);
    let coarse = downsample_block_mean(fine.view(), 4)?;
    assert_eq!(coarse.dim(), (32, 32));
    let (fine_mean, coarse_mean) = (
        fine.mean().unwrap_or(f64::NAN),
        coarse.mean().unwrap_or(f64::NAN),
    );
    println!("means: fine {fine_mean:.17}, coarse {coarse_mean:.17}");
    assert!((fine_mean - coarse_mean).abs() < 1e-14);
    // Block (0, 0) is the mean of the first 4 × 4 cells.
    let block: f64 = fine.slice(ndarray::s![0..4, 0..4]).sum() / 16.0;
    assert!((coarse[[0, 0]] - block).abs() < 1e-15);
    let channels = Array3::from_shape_fn((2, 8, 8), |(c, i, j)| (c * 64 + i * 8 + j) as f64);
    let down = downsample_channels(channels.view(), 2)?;
    assert_eq!(down[[1, 0, 0]], (64.0 + 65.0 + 72.0 + 73.0) / 4.0);
    Ok(())
}

#[test]
fn dataset_round_trips_through_disk() -> anyhow::Result<()> {
    let directory = tempfile::tempdir()?;
    let config = small_config(4);
    let generated = Dataset::load_or_generate(directory.path(), &config)?;
    let loaded = Dataset::load(directory.path())?;
    assert_eq!(generated, loaded);
    let cached = Dataset::load_or_generate(directory.path(), &config)?;
    assert_eq!(generated, cached);
    // A truncated data file is reported, naming the file.
    let data = directory.path().join("trajectories.f64");
    let bytes = std::fs::read(&data)?;
    std::fs::write(&data, &bytes[..bytes.len() - 8])?;
    match Dataset::load(directory.path()) {
        Err(Error::Format { path, .. }) => assert_eq!(path, data),
        other => panic!("expected a format error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn navier_stokes_dataset_has_one_channel() -> anyhow::Result<()> {
    let config = DatasetConfig {
        problem: Problem::NavierStokes(NavierStokesParams {
            forcing: Some(KolmogorovForcing {
                amplitude: 0.5,
                wavenumber: 2,
            }),
            ..NavierStokesParams::default()
        }),
        ..small_config(5)
    };
    let dataset = Dataset::generate(&config)?;
    assert_eq!(dataset.test[0].reference[20].shape(), &[1, 16, 16]);
    let solver = dataset.source_solver(&dataset.test[0])?;
    assert_eq!(solver.forcing_at(0)?.shape(), &[1, 16, 16]);
    Ok(())
}

#[test]
fn time_step_beyond_cfl_bound_is_refused_at_construction() {
    // On the unit square (the default domain is 32 cells wide) Δt = 1 is far beyond the limit.
    let params = Burgers2dParams {
        dt: 1.0,
        domain_length: 1.0,
        ..Burgers2dParams::default()
    };
    match Burgers2d::new(&params, 128, WaveField::zero(2)) {
        Err(Error::CflBound {
            cfl,
            limit,
            suggested_dt,
            ..
        }) => {
            assert!(cfl > limit);
            assert!(suggested_dt < 1.0);
        }
        other => panic!("expected CflBound, got {other:?}"),
    }
    let ns = NavierStokesParams {
        dt: 0.1,
        ..NavierStokesParams::default()
    };
    assert!(matches!(
        NavierStokes2d::new(&ns, 128),
        Err(Error::CflBound { .. })
    ));
}

#[test]
fn fast_state_is_refused_at_the_step_it_reaches() -> anyhow::Result<()> {
    let unit_square = Burgers2dParams {
        domain_length: 1.0,
        ..Burgers2dParams::default()
    };
    let solver = Burgers2d::new(&unit_square, 32, WaveField::zero(2))?;
    // CFL = 0.1 · (6 + 6) · 32 = 38.4 > 32.
    let state = Array3::from_elem((2, 32, 32), 6.0);
    match solver.rollout(&state, 7, 3) {
        Err(Error::Cfl {
            step,
            cfl,
            simulation,
            ..
        }) => {
            assert_eq!(step, 7);
            assert_eq!(simulation, None);
            assert!((cfl - 38.4).abs() < 1e-9, "cfl {cfl}");
        }
        other => panic!("expected Cfl, got {other:?}"),
    }
    let message = solver
        .step(&state, 7)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("step 7") && message.contains("Δt"),
        "{message}"
    );
    Ok(())
}

#[test]
fn non_finite_state_is_reported_at_its_step() -> anyhow::Result<()> {
    let solver = Burgers2d::new(&Burgers2dParams::default(), 32, WaveField::zero(2))?;
    let state = Array3::from_elem((2, 32, 32), 0.1);
    let result = solver.rollout_corrected(&state, 0, 10, |index, mut predicted| {
        if index == 4 {
            predicted[[1, 3, 5]] = f64::NAN;
        }
        Ok(predicted)
    });
    assert!(
        matches!(
            result,
            Err(Error::NonFinite {
                step: 4,
                simulation: None,
                ..
            })
        ),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn blow_up_in_data_generation_names_simulation_and_step() {
    // A forcing this strong overflows to infinity in the first step of simulation 0.
    let config = DatasetConfig {
        problem: Problem::NavierStokes(NavierStokesParams {
            forcing: Some(KolmogorovForcing {
                amplitude: 1e306,
                wavenumber: 1,
            }),
            ..NavierStokesParams::default()
        }),
        ..small_config(6)
    };
    match Dataset::generate(&config) {
        Err(error @ Error::NonFinite { .. }) => {
            assert!(
                matches!(
                    error,
                    Error::NonFinite {
                        simulation: Some(0),
                        step: 0,
                        ..
                    }
                ),
                "{error:?}"
            );
            assert!(error.to_string().contains("simulation 0"), "{error}");
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn unusable_grid_sizes_are_refused() {
    let params = Burgers2dParams::default();
    for size in [0, 2, 31] {
        assert!(
            matches!(
                Burgers2d::new(&params, size, WaveField::zero(2)),
                Err(Error::GridSize { .. })
            ),
            "size {size}"
        );
    }
    assert!(matches!(
        NavierStokes2d::new(&NavierStokesParams::default(), 33),
        Err(Error::GridSize { .. })
    ));
    // Forcing with wavenumber 4 cannot be resolved on an 8 × 8 grid.
    let mut rng = StdRng::seed_from_u64(1);
    let forcing = WaveField::random_travelling(&mut rng, 2, 20, 4, 1.0, 1.0).ok();
    let forcing = forcing
        .filter(|f| f.max_wavenumber() == 4)
        .unwrap_or_else(|| WaveField::zero(2));
    assert!(matches!(
        Burgers2d::new(&params, 8, forcing),
        Err(Error::GridSize { .. })
    ));
    let config = DatasetConfig {
        reference_size: 100,
        ..DatasetConfig::default()
    };
    assert!(matches!(
        Dataset::generate(&config),
        Err(Error::GridRatio { .. })
    ));
    let config = DatasetConfig {
        reference_size: 96,
        source_size: 64,
        ..DatasetConfig::default()
    };
    assert!(matches!(
        Dataset::generate(&config),
        Err(Error::GridRatio { .. })
    ));
}

#[test]
fn wrong_state_shape_and_bad_parameters_are_refused() -> anyhow::Result<()> {
    let solver = Burgers2d::new(&Burgers2dParams::default(), 32, WaveField::zero(2))?;
    let wrong = Array3::zeros((2, 16, 16));
    assert!(matches!(solver.step(&wrong, 0), Err(Error::Shape { .. })));
    let params = Burgers2dParams {
        viscosity: -1.0,
        ..Burgers2dParams::default()
    };
    assert!(matches!(
        Burgers2d::new(&params, 32, WaveField::zero(2)),
        Err(Error::InvalidParameter {
            name: "viscosity",
            ..
        })
    ));
    Ok(())
}

/// The warm-up (`skip_steps`) drops the first reference states and starts the recorded forcing
/// at the same moment: the recorded trajectory is the tail of a run without warm-up, and the
/// source solver of a simulation sees the forcing the reference saw at those times.
#[test]
fn warm_up_steps_are_the_first_steps_of_one_reference_run() -> anyhow::Result<()> {
    let skip = 7;
    let plain = Dataset::generate(&DatasetConfig {
        steps: 20 + skip,
        skip_steps: 0,
        ..small_config(4)
    })?;
    let warm = Dataset::generate(&DatasetConfig {
        steps: 20,
        skip_steps: skip,
        ..small_config(4)
    })?;
    for (p, w) in plain.train.iter().zip(&warm.train) {
        assert_eq!(&p.reference[skip..], &w.reference[..]);
        let (ps, ws) = (plain.source_solver(p)?, warm.source_solver(w)?);
        for step in [0, 5, 19] {
            let a = ps.forcing_at(skip + step)?;
            let b = ws.forcing_at(step)?;
            let gap = (&a - &b).mapv(f64::abs).fold(0.0f64, |m, &v| m.max(v));
            assert!(gap < 1e-12, "forcing differs by {gap} at step {step}");
        }
        // The source run starts from the first recorded reference state.
        assert_eq!(w.source[0], w.reference[0]);
    }
    Ok(())
}
