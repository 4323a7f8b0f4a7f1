//! Fuzz targets of the PDE data-set cache: `dataset.json` and `trajectories.f64`, each mutated
//! while the other file stays valid. See `fuzz_harness` (in deepzero-core/tests) for the
//! inputs, the property and the long mode
//! (`DEEPZERO_FUZZ_SECONDS=600 cargo test --release -p deepzero-pde --test fuzz`).
//! The named tests at the end are inputs that once broke the loader.

#[path = "../../deepzero-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::path::Path;

use deepzero_pde::dataset::{Dataset, DatasetConfig};
use fuzz_harness::{fuzz, Format, Parsed, Verdict};

const HEADER: &str = "dataset.json";
const DATA: &str = "trajectories.f64";

/// The two files of a small real data set.
fn dataset_files() -> (Vec<u8>, Vec<u8>) {
    let config = DatasetConfig {
        reference_size: 24,
        source_size: 12,
        train_simulations: 1,
        test_simulations: 1,
        steps: 2,
        seed: 3,
        ..DatasetConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    Dataset::generate(&config)
        .unwrap()
        .save(dir.path())
        .unwrap();
    let read = |name| std::fs::read(dir.path().join(name)).unwrap();
    (read(HEADER), read(DATA))
}

/// Load a data set from the two files, written into `dir`.
fn check(dir: &Path, header: &[u8], data: &[u8]) -> Verdict {
    std::fs::write(dir.join(HEADER), header).unwrap();
    std::fs::write(dir.join(DATA), data).unwrap();
    Parsed::from(Dataset::load(dir), |ds| {
        let c = &ds.config;
        let n = c.source_size;
        let shape = [c.problem.channels(), n, n];
        let sims: Vec<_> = ds.train.iter().chain(&ds.test).collect();
        if ds.train.len() != c.train_simulations || ds.test.len() != c.test_simulations {
            return Err(format!(
                "{} + {} simulations",
                ds.train.len(),
                ds.test.len()
            ));
        }
        for s in sims {
            for states in [&s.reference, &s.source] {
                let fits = states.len() == c.steps + 1
                    && states
                        .iter()
                        .all(|a| a.shape() == shape && a.iter().all(|v| v.is_finite()));
                if !fits {
                    return Err(format!("simulation {} has malformed states", s.index));
                }
            }
        }
        Ok(())
    })
}

#[test]
fn fuzz_pde_dataset_header() {
    let (header, data) = dataset_files();
    let dir = tempfile::tempdir().unwrap();
    fuzz("pde-dataset-header", Format::Text, &[header], |input| {
        check(dir.path(), input, &data)
    });
}

#[test]
fn fuzz_pde_dataset_data() {
    let (header, data) = dataset_files();
    let dir = tempfile::tempdir().unwrap();
    fuzz("pde-dataset-data", Format::Binary, &[data], |input| {
        check(dir.path(), &header, input)
    });
}

// Regression cases: inputs that broke the loader.

/// A header naming a data file outside its directory (`../…`, an absolute path) is refused,
/// even when that file is a valid one.
#[test]
fn data_file_outside_the_directory_is_an_error() {
    let (header, data) = dataset_files();
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join(DATA), &data).unwrap();
    let dir = outer.path().join("set");
    std::fs::create_dir(&dir).unwrap();
    let text = String::from_utf8(header).unwrap();
    let absolute = outer.path().join(DATA).display().to_string();
    for other in ["../trajectories.f64", &absolute] {
        let moved = text.replace("\"trajectories.f64\"", &format!("{other:?}"));
        assert_ne!(moved, text);
        std::fs::write(dir.join(HEADER), &moved).unwrap();
        let Err(err) = Dataset::load(&dir) else {
            panic!("{other} loaded");
        };
        let err = err.to_string();
        assert!(err.contains("must be a file name"), "{err}");
    }
}

/// NaN states in the data file are an error, not a data set to train against.
#[test]
fn non_finite_states_are_an_error() {
    let (header, mut data) = dataset_files();
    data[8..16].copy_from_slice(&f64::NAN.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(HEADER), &header).unwrap();
    std::fs::write(dir.path().join(DATA), &data).unwrap();
    let err = Dataset::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("value 1 is NaN"), "{err}");
}
