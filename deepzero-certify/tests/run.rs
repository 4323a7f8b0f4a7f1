//! Certifying a data set resumably: a run resumed from its TSV file gives the rows of an
//! uninterrupted run.

mod common;

use std::path::Path;

use common::LinearBox;
use deepzero_certify::{certify_images, parse_tsv, to_tsv, BlackBox, CertifyRow, SmoothingConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn data() -> (LinearBox, Vec<f32>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(31);
    let w: Vec<f64> = (0..16).map(|_| rng.random::<f64>() - 0.5).collect();
    let f = LinearBox::new(w, 0.0, [1, 4, 4]);
    let images: Vec<f32> = (0..8 * 16).map(|_| rng.random::<f32>()).collect();
    let labels = images
        .chunks(16)
        .map(|x| usize::from(f.margin(x) > 0.0))
        .collect();
    (f, images, labels)
}

fn same(a: &CertifyRow, b: &CertifyRow) -> bool {
    (a.idx, a.label, a.predict, a.correct) == (b.idx, b.label, b.predict, b.correct)
        && (a.radius - b.radius).abs() < 5e-4
}

#[test]
fn a_resumed_run_gives_the_rows_of_an_uninterrupted_one() {
    let (f, images, labels) = data();
    let config = SmoothingConfig {
        n: 2000,
        batch: 300,
        ..SmoothingConfig::default()
    };
    let indices = [0, 2, 4, 5, 7];
    let mut emitted = Vec::new();
    let full = certify_images(&f, &config, &images, &labels, &indices, 9, &[], |row| {
        emitted.push(row.to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(full.len(), 5);
    assert_eq!(emitted.len(), 5);
    assert!(full.iter().any(|r| r.correct && r.radius > 0.0));

    // Interrupted after two rows: read them back from the file text and resume.
    let text = to_tsv(&full[..2]);
    let done = parse_tsv(&text, Path::new("partial.tsv")).unwrap();
    let mut new_rows = 0;
    let resumed = certify_images(&f, &config, &images, &labels, &indices, 9, &done, |_| {
        new_rows += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(new_rows, 3);
    assert!(full.iter().zip(&resumed).all(|(a, b)| same(a, b)));
    assert_eq!(f.queries(), 8 * 2100);

    // A different seed gives different noise.
    let other =
        certify_images(&f, &config, &images, &labels, &indices, 10, &[], |_| Ok(())).unwrap();
    assert!(full.iter().zip(&other).any(|(a, b)| a.radius != b.radius));
}

#[test]
fn resuming_from_a_foreign_file_is_an_error() {
    let (f, images, labels) = data();
    let config = SmoothingConfig {
        n: 100,
        ..SmoothingConfig::default()
    };
    let rows = certify_images(&f, &config, &images, &labels, &[1, 3], 0, &[], |_| Ok(())).unwrap();
    let e = certify_images(&f, &config, &images, &labels, &[0, 2], 0, &rows, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image 1") && e.contains("does not certify"),
        "{e}"
    );
    let mut wrong = rows[..1].to_vec();
    wrong[0].label = 1 - wrong[0].label;
    wrong[0].correct = false;
    wrong[0].predict = None;
    let e = certify_images(
        &f,
        &config,
        &images,
        &labels,
        &[1, 3],
        0,
        &wrong,
        |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("other data"), "{e}");
    let e = certify_images(&f, &config, &images, &labels, &[8], 0, &[], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = certify_images(&f, &config, &images[1..], &labels, &[0], 0, &[], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels need"), "{e}");
}
