//! A deepzero model exported to ONNX answers as the model itself: the same logits (to f32
//! rounding) for every model kind, and the same certificates through `run:` and `onnx:`.
#![cfg(feature = "onnx")]

use deepzero_certify::export::write_onnx;
use deepzero_certify::smoothing::SmoothingConfig;
use deepzero_certify::{certify_images, BlackBox, ModelClassifier, OnnxClassifier};
use deepzero_core::data::Normalization;
use deepzero_core::model::{Model, ModelSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A classifier with random weights and non-trivial running statistics and normalisation.
fn classifier(spec: ModelSpec, shape: [usize; 3], classes: usize, seed: u64) -> ModelClassifier {
    let model = Model::build(&spec, shape, classes).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let params = model.init_params(&mut rng);
    let mut bn = model.new_bn_state();
    for (m, v) in bn.mean.iter_mut().zip(bn.var.iter_mut()) {
        m.iter_mut()
            .for_each(|x| *x = 0.2 * (rng.random::<f64>() - 0.5));
        v.iter_mut().for_each(|x| *x = 0.5 + rng.random::<f64>());
    }
    let c = shape[0];
    let norm = Normalization {
        mean: (0..c).map(|i| 0.3 + 0.1 * i as f32).collect(),
        std: (0..c).map(|i| 0.2 + 0.05 * i as f32).collect(),
    };
    ModelClassifier::new(model, &params, bn, norm).unwrap()
}

fn exported(model: &ModelClassifier, name: &str) -> (tempdir::Dir, OnnxClassifier) {
    let dir = tempdir::Dir::new(name);
    let path = dir.path.join("model.onnx");
    write_onnx(model, &path).unwrap();
    let onnx = OnnxClassifier::load(&path).unwrap();
    (dir, onnx)
}

/// Max |onnx − model| over a batch, relative to the largest logit.
fn logit_gap(model: &ModelClassifier, onnx: &OnnxClassifier, n: usize) -> f64 {
    assert_eq!(onnx.input_shape(), model.input_shape());
    assert_eq!(onnx.num_classes().unwrap(), model.num_classes().unwrap());
    let per: usize = model.input_shape().iter().product();
    let mut rng = StdRng::seed_from_u64(7);
    let images: Vec<f32> = (0..n * per)
        .map(|_| rng.random::<f32>() * 1.4 - 0.2)
        .collect();
    let want = model.logits(&images, n).unwrap();
    let got = onnx.logits(&images, n).unwrap();
    assert_eq!(want.len(), got.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let gap = want
        .iter()
        .zip(&got)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    f64::from(gap / scale)
}

#[test]
fn every_model_kind_exports_with_the_same_logits() {
    let cases = [
        (
            ModelSpec::Mlp {
                hidden: vec![16, 8],
            },
            [1, 8, 8],
            10,
        ),
        (ModelSpec::SimpleCnn { depth: 2, width: 6 }, [1, 12, 12], 10),
        (ModelSpec::SimpleCnn { depth: 1, width: 4 }, [3, 8, 8], 5),
        (ModelSpec::Resnet20, [3, 16, 16], 10),
    ];
    for (i, (spec, shape, classes)) in cases.into_iter().enumerate() {
        let model = classifier(spec.clone(), shape, classes, i as u64);
        let (_dir, onnx) = exported(&model, &format!("export-{i}"));
        let gap = logit_gap(&model, &onnx, 9);
        println!("{spec:?} {shape:?}: max relative logit gap {gap:.2e}");
        assert!(
            gap < 1e-4,
            "{spec:?}: onnx and model logits differ by {gap}"
        );
    }
}

#[test]
fn run_and_onnx_give_the_same_certificates() {
    let model = classifier(ModelSpec::SimpleCnn { depth: 1, width: 4 }, [1, 8, 8], 4, 3);
    let (_dir, onnx) = exported(&model, "export-certify");
    let mut rng = StdRng::seed_from_u64(11);
    let images: Vec<f32> = (0..12 * 64).map(|_| rng.random::<f32>()).collect();
    let labels: Vec<usize> = (0..12).map(|i| i % 4).collect();
    let indices: Vec<usize> = (0..12).collect();
    let config = SmoothingConfig {
        sigma: 0.25,
        n0: 50,
        n: 400,
        alpha: 0.01,
        batch: 128,
    };
    let certify = |bb: &dyn BlackBox| {
        certify_images(bb, &config, &images, &labels, &indices, 5, &[], |_| Ok(())).unwrap()
    };
    let a = certify(&model);
    let b = certify(&onnx);
    assert_eq!(a.len(), 12);
    let radii: Vec<f64> = a.iter().map(|r| r.radius).collect();
    assert!(
        radii.iter().any(|&r| r > 0.0),
        "no image certified: {radii:?}"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.idx, x.predict, x.correct), (y.idx, y.predict, y.correct));
        assert_eq!(x.radius, y.radius, "image {}", x.idx);
    }
}

#[test]
fn image_outputs_are_refused() {
    let spec = ModelSpec::Dncnn { depth: 2, width: 4 };
    let model = Model::build_image(&spec, [1, 8, 8]).unwrap();
    let params = model.init_params(&mut StdRng::seed_from_u64(0));
    let bn = model.new_bn_state();
    let norm = Normalization {
        mean: vec![0.0],
        std: vec![1.0],
    };
    let c = ModelClassifier::new(model, &params, bn, norm).unwrap();
    let e = deepzero_certify::export::onnx_bytes(&c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("only classifiers export"), "{e}");
}

mod tempdir {
    use std::path::PathBuf;

    /// A scratch directory removed on drop.
    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("deepzero-certify-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self { path }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
