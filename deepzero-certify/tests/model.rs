//! The deepzero-core model as a black box: eval mode and input normalisation inside.

use candle_core::{Device, Tensor};
use deepzero_certify::{BlackBox, ModelClassifier};
use deepzero_core::data::Normalization;
use deepzero_core::model::{Mode, Model, ModelSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn logits_are_the_models_eval_forward_on_normalised_pixels() {
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 1, width: 4 }, [3, 8, 8], 5).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let params = model.init_params(&mut rng);
    let mut bn = model.new_bn_state();
    for (m, v) in bn.mean.iter_mut().zip(bn.var.iter_mut()) {
        m.iter_mut().for_each(|x| *x = rng.random::<f64>() - 0.5);
        v.iter_mut().for_each(|x| *x = 0.5 + rng.random::<f64>());
    }
    let norm = Normalization::cifar10();
    let classifier =
        ModelClassifier::new(model.clone(), &params, bn.clone(), norm.clone()).unwrap();
    assert_eq!(classifier.input_shape(), [3, 8, 8]);
    assert_eq!(classifier.num_classes().unwrap(), 5);

    let n = 300; // more than one chunk
    let images: Vec<f32> = (0..n * 192).map(|_| rng.random::<f32>()).collect();
    let got = classifier.logits(&images, n).unwrap();
    assert_eq!(classifier.queries(), n as u64);

    // Reference: normalise by hand, one forward pass in eval mode.
    let normalised: Vec<f32> = images
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = i / 64 % 3;
            (x - norm.mean[c]) / norm.std[c]
        })
        .collect();
    let flat = Tensor::from_slice(&params, params.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let views = model.param_views(&flat).unwrap();
    let x = Tensor::from_vec(normalised, (n, 3, 8, 8), &Device::Cpu).unwrap();
    let want = model
        .forward(&views, &x, Mode::Eval(&bn))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max difference {worst}");

    // Eval mode: a single image gives the same scores alone as inside the batch.
    let alone = classifier.logits(&images[..192], 1).unwrap();
    assert!(alone
        .iter()
        .zip(&got[..5])
        .all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn mismatched_parts_are_errors() {
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![4] }, [1, 2, 2], 3).unwrap();
    let params = vec![0.0; model.num_params()];
    let bn = model.new_bn_state();
    let e = |r: deepzero_certify::Result<ModelClassifier>| r.err().expect("an error").to_string();
    assert!(e(ModelClassifier::new(
        model.clone(),
        &params[1..],
        bn.clone(),
        Normalization::identity(1)
    ))
    .contains("parameters"));
    assert!(e(ModelClassifier::new(
        model.clone(),
        &params,
        bn.clone(),
        Normalization::identity(3)
    ))
    .contains("channels"));
    let zero_std = Normalization {
        mean: vec![0.0],
        std: vec![0.0],
    };
    assert!(e(ModelClassifier::new(
        model.clone(),
        &params,
        bn.clone(),
        zero_std
    ))
    .contains("std"));
    let c = ModelClassifier::new(model, &params, bn, Normalization::identity(1)).unwrap();
    assert!(c
        .logits(&[0.0; 7], 2)
        .unwrap_err()
        .to_string()
        .contains("need 8 values"));
}
