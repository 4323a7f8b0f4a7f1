//! Tests of `deepzero_core::data`: loaders on files written here, and the shipped data sets.

use std::io::Write;
use std::path::{Path, PathBuf};

use deepzero_core::data::{
    epoch_batches, gather, gather_plain, load, load_cifar10, load_digits_csv, load_idx,
    load_idx_dir, parse_digits_csv, shipped_data_dir, stratified_split, Augment, Dataset,
    DatasetKind, Normalization,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_images_bytes(n: usize, h: usize, w: usize, pixels: &[u8]) -> Vec<u8> {
    assert_eq!(pixels.len(), n * h * w);
    let mut b = Vec::new();
    b.extend_from_slice(&0x0000_0803u32.to_be_bytes());
    for d in [n, h, w] {
        b.extend_from_slice(&(d as u32).to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels_bytes(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x0000_0801u32.to_be_bytes());
    b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// Assert that `r` is an error whose message contains every one of `needles`.
fn assert_err_contains<T: std::fmt::Debug>(r: deepzero_core::Result<T>, needles: &[&str]) {
    let err = r.expect_err("expected an error");
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not contain {n:?}");
    }
}

const N: usize = 3;
const H: usize = 4;
const W: usize = 5;

fn test_pixels() -> Vec<u8> {
    (0..N * H * W).map(|i| ((i * 37 + 7) % 256) as u8).collect()
}

fn test_labels() -> Vec<u8> {
    vec![0, 9, 5]
}

fn check_idx_roundtrip(ds: &Dataset) {
    assert_eq!(ds.len(), N);
    assert_eq!((ds.channels, ds.height, ds.width), (1, H, W));
    assert_eq!(ds.num_classes, 10);
    assert_eq!(ds.sample_len(), H * W);
    assert_eq!(ds.labels, test_labels());
    let expect: Vec<f32> = test_pixels().iter().map(|&b| b as f32 / 255.0).collect();
    assert_eq!(ds.images, expect);
}

// ---------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------

#[test]
fn idx_raw_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let img = write(
        &dir.path().join("imgs-idx3-ubyte"),
        &idx_images_bytes(N, H, W, &test_pixels()),
    );
    let lab = write(
        &dir.path().join("labs-idx1-ubyte"),
        &idx_labels_bytes(&test_labels()),
    );
    check_idx_roundtrip(&load_idx(&img, &lab).unwrap());
}

#[test]
fn idx_gzip_roundtrip_detected_by_magic_not_name() {
    let dir = tempfile::tempdir().unwrap();
    // gzip content under a name without .gz ...
    let img = write(
        &dir.path().join("imgs.bin"),
        &gzip(&idx_images_bytes(N, H, W, &test_pixels())),
    );
    // ... and raw content under a .gz name.
    let lab = write(
        &dir.path().join("labs.gz"),
        &idx_labels_bytes(&test_labels()),
    );
    check_idx_roundtrip(&load_idx(&img, &lab).unwrap());
}

#[test]
fn idx_wrong_magic_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        &dir.path().join("labels-ok"),
        &idx_labels_bytes(&test_labels()),
    );
    // A label file passed as images.
    let img = write(
        &dir.path().join("swapped-images"),
        &idx_labels_bytes(&test_labels()),
    );
    assert_err_contains(load_idx(&img, &lab), &["swapped-images", "magic"]);
    // Garbage magic.
    let mut bytes = idx_images_bytes(N, H, W, &test_pixels());
    bytes[2] = 0x0d;
    let img = write(&dir.path().join("float-images"), &bytes);
    assert_err_contains(load_idx(&img, &lab), &["float-images", "magic"]);
    // Far too short.
    let img = write(&dir.path().join("tiny-images"), &[0, 0]);
    assert_err_contains(load_idx(&img, &lab), &["tiny-images"]);
}

#[test]
fn idx_truncated_and_trailing_bytes_name_file() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        &dir.path().join("labels"),
        &idx_labels_bytes(&test_labels()),
    );
    let full = idx_images_bytes(N, H, W, &test_pixels());

    let img = write(&dir.path().join("cut-images"), &full[..full.len() - 1]);
    assert_err_contains(load_idx(&img, &lab), &["cut-images", "truncated"]);

    // Truncated inside the header.
    let img = write(&dir.path().join("cut-header"), &full[..10]);
    assert_err_contains(load_idx(&img, &lab), &["cut-header", "truncated"]);

    // Truncated gzip stream.
    let gz = gzip(&full);
    let img = write(&dir.path().join("cut-images.gz"), &gz[..gz.len() / 2]);
    assert_err_contains(load_idx(&img, &lab), &["cut-images.gz"]);

    let mut long = full.clone();
    long.extend_from_slice(b"junk");
    let img = write(&dir.path().join("long-images"), &long);
    assert_err_contains(load_idx(&img, &lab), &["long-images"]);

    // Labels truncated too.
    let img = write(&dir.path().join("images"), &full);
    let lab_bytes = idx_labels_bytes(&test_labels());
    let lab = write(
        &dir.path().join("cut-labels"),
        &lab_bytes[..lab_bytes.len() - 1],
    );
    assert_err_contains(load_idx(&img, &lab), &["cut-labels", "truncated"]);
}

#[test]
fn idx_count_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let img = write(
        &dir.path().join("three-images"),
        &idx_images_bytes(N, H, W, &test_pixels()),
    );
    let lab = write(&dir.path().join("two-labels"), &idx_labels_bytes(&[1, 2]));
    assert_err_contains(
        load_idx(&img, &lab),
        &["two-labels", "three-images", "2", "3"],
    );
}

#[test]
fn idx_label_out_of_range_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = write(
        &dir.path().join("images"),
        &idx_images_bytes(N, H, W, &test_pixels()),
    );
    let lab = write(
        &dir.path().join("bad-labels"),
        &idx_labels_bytes(&[1, 10, 2]),
    );
    assert_err_contains(load_idx(&img, &lab), &["bad-labels", "10"]);
}

#[test]
fn idx_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let lab = write(
        &dir.path().join("labels"),
        &idx_labels_bytes(&test_labels()),
    );
    let img = dir.path().join("no-such-images");
    assert_err_contains(load_idx(&img, &lab), &["no-such-images"]);
}

#[test]
fn idx_dir_accepts_gz_and_raw_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("train-images-idx3-ubyte.gz"),
        &gzip(&idx_images_bytes(N, H, W, &test_pixels())),
    );
    write(
        &d.join("train-labels-idx1-ubyte"),
        &idx_labels_bytes(&test_labels()),
    );
    write(
        &d.join("t10k-images-idx3-ubyte"),
        &idx_images_bytes(1, H, W, &[7; H * W]),
    );
    // t10k labels still missing.
    assert_err_contains(load_idx_dir(d), &["t10k-labels-idx1-ubyte"]);
    write(
        &d.join("t10k-labels-idx1-ubyte.gz"),
        &gzip(&idx_labels_bytes(&[4])),
    );
    let (train, test) = load_idx_dir(d).unwrap();
    check_idx_roundtrip(&train);
    assert_eq!(test.len(), 1);
    assert_eq!(test.labels, vec![4]);
    assert!(test.images.iter().all(|&x| x == 7.0 / 255.0));

    // The same through `load` with --data-dir (MNIST and Fashion-MNIST share the format).
    let (train, test) = load(DatasetKind::Mnist, Some(d), 0).unwrap();
    check_idx_roundtrip(&train);
    assert_eq!(test.len(), 1);
    let (train, _) = load(DatasetKind::FashionMnist, Some(d), 0).unwrap();
    check_idx_roundtrip(&train);
}

// ---------------------------------------------------------------------------------------
// CIFAR-10
// ---------------------------------------------------------------------------------------

/// One record: label, then R, G, B planes. Plane `c` of record `tag` is filled with
/// `tag * 3 + c`, except pixel (row 1, col 2), which is `200 + c`.
fn cifar_record(label: u8, tag: u8) -> Vec<u8> {
    let mut r = vec![label];
    for c in 0..3u8 {
        let mut plane = vec![tag * 3 + c; 1024];
        plane[32 + 2] = 200 + c;
        r.extend_from_slice(&plane);
    }
    r
}

/// Write the five training batches (2, 3, 1, 2, 2 records) and a test batch of 4 records;
/// returns the expected (label, tag) of the training records in order.
fn write_cifar(dir: &Path) -> Vec<(u8, u8)> {
    let counts = [2usize, 3, 1, 2, 2];
    let mut expect = Vec::new();
    let mut tag = 0u8;
    for (b, &n) in counts.iter().enumerate() {
        let mut bytes = Vec::new();
        for _ in 0..n {
            let label = (tag * 7 + b as u8) % 10;
            bytes.extend_from_slice(&cifar_record(label, tag));
            expect.push((label, tag));
            tag += 1;
        }
        write(&dir.join(format!("data_batch_{}.bin", b + 1)), &bytes);
    }
    let mut test = Vec::new();
    for t in 0..4u8 {
        test.extend_from_slice(&cifar_record(9 - t, 40 + t));
    }
    write(&dir.join("test_batch.bin"), &test);
    expect
}

fn check_cifar_record(ds: &Dataset, i: usize, label: u8, tag: u8) {
    assert_eq!(ds.labels[i], label, "label of record {i}");
    let img = ds.image(i);
    for c in 0..3usize {
        let plane = &img[c * 1024..(c + 1) * 1024];
        let fill = (tag as usize * 3 + c) as f32 / 255.0;
        assert_eq!(plane[0], fill, "record {i} channel {c}");
        assert_eq!(plane[1023], fill, "record {i} channel {c}");
        assert_eq!(
            plane[32 + 2],
            (200 + c) as f32 / 255.0,
            "record {i} channel {c}"
        );
    }
}

#[test]
fn cifar10_binary_plane_order_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let expect = write_cifar(dir.path());
    let train = load_cifar10(dir.path(), true).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!((train.channels, train.height, train.width), (3, 32, 32));
    assert_eq!(train.num_classes, 10);
    assert_eq!(train.images.len(), 10 * 3072);
    for (i, &(label, tag)) in expect.iter().enumerate() {
        check_cifar_record(&train, i, label, tag);
    }
    let test = load_cifar10(dir.path(), false).unwrap();
    assert_eq!(test.len(), 4);
    for t in 0..4u8 {
        check_cifar_record(&test, t as usize, 9 - t, 40 + t);
    }
    let (tr, te) = load(DatasetKind::Cifar10, Some(dir.path()), 0).unwrap();
    assert_eq!((tr.len(), te.len()), (10, 4));
    assert_eq!(tr.labels, train.labels);
}

#[test]
fn cifar10_tarball_subfolder_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&sub).unwrap();
    write_cifar(&sub);
    assert_eq!(load_cifar10(dir.path(), true).unwrap().len(), 10);
}

#[test]
fn cifar10_truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let mut bytes = cifar_record(1, 1);
    bytes.extend_from_slice(&cifar_record(2, 2)[..3000]);
    write(&dir.path().join("test_batch.bin"), &bytes);
    assert_err_contains(load_cifar10(dir.path(), false), &["test_batch.bin", "3073"]);
    // The training set is unaffected.
    assert!(load_cifar10(dir.path(), true).is_ok());
    write(&dir.path().join("data_batch_4.bin"), &[]);
    assert_err_contains(load_cifar10(dir.path(), true), &["data_batch_4.bin"]);
}

#[test]
fn cifar10_missing_batch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    assert_err_contains(load_cifar10(dir.path(), true), &["data_batch_3.bin"]);
    assert!(load_cifar10(dir.path(), false).is_ok());
    assert_err_contains(
        load_cifar10(&dir.path().join("nowhere"), true),
        &["nowhere"],
    );
}

#[test]
fn cifar10_bad_label_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    write(&dir.path().join("test_batch.bin"), &cifar_record(10, 0));
    assert_err_contains(
        load_cifar10(dir.path(), false),
        &["test_batch.bin", "label"],
    );
}

// ---------------------------------------------------------------------------------------
// digits CSV
// ---------------------------------------------------------------------------------------

fn digits_row(base: u32, label: u32) -> String {
    let mut f: Vec<String> = (0..64).map(|i| ((base + i) % 17).to_string()).collect();
    f.push(label.to_string());
    f.join(",")
}

#[test]
fn digits_csv_good_plain_gzip_and_memory() {
    let text = format!(
        "{}\n{}\r\n{}\n",
        digits_row(0, 3),
        digits_row(5, 0),
        digits_row(16, 9)
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = write(&dir.path().join("digits.csv"), text.as_bytes());
    let gz = write(&dir.path().join("digits.csv.gz"), &gzip(text.as_bytes()));
    let a = load_digits_csv(&plain).unwrap();
    let b = load_digits_csv(&gz).unwrap();
    let c = parse_digits_csv(&gzip(text.as_bytes()), Path::new("embedded")).unwrap();
    let d = parse_digits_csv(text.as_bytes(), Path::new("embedded")).unwrap();
    for ds in [&a, &b, &c, &d] {
        assert_eq!(ds.len(), 3);
        assert_eq!(
            (ds.channels, ds.height, ds.width, ds.num_classes),
            (1, 8, 8, 10)
        );
        assert_eq!(ds.labels, vec![3, 0, 9]);
        assert_eq!(ds.images[0], 0.0);
        assert_eq!(ds.images[16], 16.0 / 16.0);
        assert_eq!(ds.images[64], 5.0 / 16.0);
        assert_eq!(ds.images[64 * 2 + 1], 0.0); // (16 + 1) % 17
        assert_eq!(ds.images, a.images);
    }
}

#[test]
fn digits_csv_bad_rows_report_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let good = digits_row(0, 1);
    // Line 2 has only 64 values.
    let short: String = good.rsplit_once(',').unwrap().0.to_string();
    let p = write(
        &dir.path().join("short.csv"),
        format!("{good}\n{short}\n{good}\n").as_bytes(),
    );
    assert_err_contains(load_digits_csv(&p), &["short.csv", "line 2", "64"]);
    // Line 3 has a pixel value of 17.
    let big = good.replacen("0,", "17,", 1);
    let p = write(
        &dir.path().join("big.csv"),
        format!("{good}\n{good}\n{big}\n").as_bytes(),
    );
    assert_err_contains(load_digits_csv(&p), &["big.csv", "line 3", "17"]);
    // Line 1 has a label of 10 and a non-number.
    let p = write(
        &dir.path().join("label.csv"),
        format!("{}\n", digits_row(0, 10)).as_bytes(),
    );
    assert_err_contains(load_digits_csv(&p), &["label.csv", "line 1", "label"]);
    let p = write(
        &dir.path().join("word.csv"),
        format!("{good}\n{}\n", good.replacen('0', "x", 1)).as_bytes(),
    );
    assert_err_contains(load_digits_csv(&p), &["word.csv", "line 2", "\"x\""]);
    // Empty input.
    assert_err_contains(
        parse_digits_csv(b"\n\n", Path::new("empty.csv")),
        &["empty.csv"],
    );
}

// ---------------------------------------------------------------------------------------
// shipped data
// ---------------------------------------------------------------------------------------

#[test]
fn shipped_digits_and_stratified_split() {
    let path = shipped_data_dir().join("digits").join("digits.csv.gz");
    let all = load_digits_csv(&path).unwrap();
    assert_eq!(all.len(), 1797);
    assert_eq!(all.num_classes, 10);
    assert_eq!((all.channels, all.height, all.width), (1, 8, 8));
    assert!(all.images.iter().all(|&x| (0.0..=1.0).contains(&x)));
    let counts = all.class_counts();
    assert_eq!(counts.len(), 10);
    assert!(counts.iter().all(|&c| c > 150));
    assert_eq!(counts.iter().sum::<usize>(), 1797);

    let (train, test) = load(DatasetKind::Digits, None, 7).unwrap();
    assert_eq!(train.len() + test.len(), 1797);
    let test_counts = test.class_counts();
    let train_counts = train.class_counts();
    for k in 0..10 {
        let target = 0.2 * counts[k] as f64;
        assert!(
            (test_counts[k] as f64 - target).abs() <= 1.0,
            "class {k}: {} of {}",
            test_counts[k],
            counts[k]
        );
        assert_eq!(train_counts[k] + test_counts[k], counts[k]);
    }
    // The outputs are shuffled, not grouped by class.
    assert_ne!(train.labels[..50], {
        let mut s = train.labels[..50].to_vec();
        s.sort();
        s
    });

    let (train2, test2) = load(DatasetKind::Digits, None, 7).unwrap();
    assert_eq!(train.labels, train2.labels);
    assert_eq!(train.images, train2.images);
    assert_eq!(test.labels, test2.labels);
    let (train3, test3) = load(DatasetKind::Digits, None, 8).unwrap();
    assert_eq!(test3.len(), test.len());
    assert_ne!(train.images, train3.images);
    assert_ne!(test.images, test3.images);

    // Same function on the loaded set directly.
    let (a, b) = stratified_split(&all, 0.2, 7);
    assert_eq!(a.images, train.images);
    assert_eq!(b.labels, test.labels);
}

#[test]
fn shipped_fashion_mnist_subset() {
    let dir = shipped_data_dir().join("fashion-mnist");
    let (train, test) = load_idx_dir(&dir).unwrap();
    assert_eq!((train.len(), test.len()), (10_000, 2_000));
    for ds in [&train, &test] {
        assert_eq!(
            (ds.channels, ds.height, ds.width, ds.num_classes),
            (1, 28, 28, 10)
        );
        assert_eq!(ds.images.len(), ds.len() * 784);
        assert!(ds.class_counts().iter().all(|&c| c > 100));
    }
    // Through `load`: the full set if installed system-wide, else this subset.
    let (tr, te) = load(DatasetKind::FashionMnist, None, 0).unwrap();
    assert_eq!((tr.channels, tr.height, tr.width), (1, 28, 28));
    assert!(tr.len() == 10_000 || tr.len() == 60_000);
    assert!(te.len() == 2_000 || te.len() == 10_000);
    // The subset is the head of the full set.
    assert_eq!(tr.labels[..10_000], train.labels[..]);
}

// ---------------------------------------------------------------------------------------
// Dataset helpers, normalization, augmentation, batching
// ---------------------------------------------------------------------------------------

/// n samples of C×H×W with value = a distinct number per (sample, position), labels i % k.
fn synthetic(n: usize, c: usize, h: usize, w: usize, k: usize) -> Dataset {
    let sl = c * h * w;
    Dataset {
        images: (0..n * sl).map(|i| (i % 1000) as f32 / 1000.0).collect(),
        labels: (0..n).map(|i| (i % k) as u8).collect(),
        channels: c,
        height: h,
        width: w,
        num_classes: k,
    }
}

#[test]
fn dataset_subset_take_counts_balanced() {
    let ds = synthetic(20, 2, 3, 3, 4);
    assert_eq!(ds.len(), 20);
    assert!(!ds.is_empty());
    assert_eq!(ds.sample_len(), 18);
    let s = ds.subset(&[5, 0, 5]);
    assert_eq!(s.len(), 3);
    assert_eq!(s.labels, vec![1, 0, 1]);
    assert_eq!(s.image(0), ds.image(5));
    assert_eq!(s.image(1), ds.image(0));
    assert_eq!(s.image(2), ds.image(5));
    let t = ds.take(4);
    assert_eq!(t.len(), 4);
    assert_eq!(t.images[..], ds.images[..4 * 18]);
    assert_eq!(ds.take(100).len(), 20);
    assert_eq!(ds.class_counts(), vec![5, 5, 5, 5]);
    assert!(ds.subset(&[]).is_empty());

    let b = ds.balanced_sample(2, 3);
    assert_eq!(b.class_counts(), vec![2, 2, 2, 2]);
    assert_eq!(b.labels, ds.balanced_sample(2, 3).labels);
    assert_eq!(b.images, ds.balanced_sample(2, 3).images);
    assert_eq!(ds.balanced_sample(100, 3).len(), 20);
}

#[test]
fn stratified_split_synthetic() {
    let ds = synthetic(103, 1, 2, 2, 3); // class sizes 35, 34, 34
    let (train, test) = stratified_split(&ds, 0.25, 1);
    assert_eq!(test.class_counts(), vec![9, 9, 9]); // round(8.75), round(8.5)
    assert_eq!(train.len() + test.len(), 103);
    let (train0, test0) = stratified_split(&ds, 0.0, 1);
    assert_eq!((train0.len(), test0.len()), (103, 0));
    let (_, test1) = stratified_split(&ds, 1.0, 1);
    assert_eq!(test1.len(), 103);
    // Every sample lands in exactly one side.
    let mut seen: Vec<Vec<f32>> = train
        .images
        .chunks(4)
        .chain(test.images.chunks(4))
        .map(|c| c.to_vec())
        .collect();
    seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut orig: Vec<Vec<f32>> = ds.images.chunks(4).map(|c| c.to_vec()).collect();
    orig.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(seen, orig);
}

#[test]
fn normalization_fit_apply_gives_zero_mean_unit_std() {
    let (mut train, _) = load(DatasetKind::Digits, None, 0).unwrap();
    let norm = Normalization::fit(&train);
    assert_eq!(norm.mean.len(), 1);
    assert!(norm.mean[0] > 0.1 && norm.std[0] > 0.1);
    norm.apply(&mut train).unwrap();
    let again = Normalization::fit(&train);
    assert!(again.mean[0].abs() < 1e-3, "{again:?}");
    assert!((again.std[0] - 1.0).abs() < 1e-3, "{again:?}");

    // Per channel on three channels with different statistics.
    let mut ds = synthetic(10, 3, 4, 4, 2);
    for (k, plane) in ds.images.chunks_mut(16).enumerate() {
        let c = k % 3;
        for (j, x) in plane.iter_mut().enumerate() {
            *x = c as f32 * 0.3 + (j as f32 * 0.01) * (c + 1) as f32;
        }
    }
    let n = Normalization::fit(&ds);
    assert!(n.mean[0] < n.mean[1] && n.mean[1] < n.mean[2]);
    n.apply(&mut ds).unwrap();
    let m = Normalization::fit(&ds);
    for c in 0..3 {
        assert!(m.mean[c].abs() < 1e-4, "{m:?}");
        assert!((m.std[c] - 1.0).abs() < 1e-4, "{m:?}");
    }

    // Wrong channel count is an error.
    let mut grey = synthetic(2, 1, 2, 2, 2);
    assert!(Normalization::cifar10().apply(&mut grey).is_err());
    let c = Normalization::cifar10();
    assert_eq!(c.mean, vec![0.4914, 0.4822, 0.4465]);
    assert_eq!(c.std, vec![0.2471, 0.2435, 0.2616]);
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<Normalization>(&json).unwrap(), c);
}

/// Input image with distinct non-zero values.
fn aug_input() -> Dataset {
    let (c, h, w) = (2, 5, 6);
    Dataset {
        images: (0..c * h * w).map(|i| 1.0 + i as f32).collect(),
        labels: vec![3],
        channels: c,
        height: h,
        width: w,
        num_classes: 10,
    }
}

/// `src` shifted by (dy, dx) with zero fill, optionally mirrored afterwards.
fn shifted(ds: &Dataset, dy: isize, dx: isize, flip: bool) -> Vec<f32> {
    let (c, h, w) = (ds.channels, ds.height as isize, ds.width as isize);
    let src = ds.image(0);
    let mut out = Vec::new();
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let xx = if flip { w - 1 - x } else { x };
                let (sy, sx) = (y + dy, xx + dx);
                out.push(if (0..h).contains(&sy) && (0..w).contains(&sx) {
                    src[ch * (h * w) as usize + (sy * w + sx) as usize]
                } else {
                    0.0
                });
            }
        }
    }
    out
}

#[test]
fn augment_crop_moves_pixels_deterministically() {
    let ds = aug_input();
    let aug = Augment {
        crop_padding: 2,
        hflip: false,
    };
    let idx = vec![0usize; 64];
    let mut rng = StdRng::seed_from_u64(5);
    let (x, y) = gather(&ds, &idx, Some((&aug, &mut rng)));
    assert_eq!(x.len(), 64 * ds.sample_len());
    assert_eq!(y, vec![3; 64]);
    let mut moved = 0;
    for out in x.chunks(ds.sample_len()) {
        let mut found = None;
        for dy in -2..=2 {
            for dx in -2..=2 {
                if shifted(&ds, dy, dx, false) == out {
                    found = Some((dy, dx));
                }
            }
        }
        let (dy, dx) = found.expect("output is not a padded crop of the input");
        if (dy, dx) != (0, 0) {
            moved += 1;
        }
    }
    assert!(moved > 40, "only {moved} of 64 crops moved the image");
    let mut rng = StdRng::seed_from_u64(5);
    let (x2, _) = gather(&ds, &idx, Some((&aug, &mut rng)));
    assert_eq!(x, x2);
    let mut rng = StdRng::seed_from_u64(6);
    let (x3, _) = gather(&ds, &idx, Some((&aug, &mut rng)));
    assert_ne!(x, x3);
}

#[test]
fn augment_hflip_mirrors() {
    let ds = aug_input();
    let aug = Augment {
        crop_padding: 0,
        hflip: true,
    };
    let idx = vec![0usize; 64];
    let mut rng = StdRng::seed_from_u64(11);
    let (x, _) = gather(&ds, &idx, Some((&aug, &mut rng)));
    let plain = ds.image(0).to_vec();
    let mirror = shifted(&ds, 0, 0, true);
    assert_ne!(plain, mirror);
    assert_eq!(mirror[0], plain[5]); // row 0: x=0 <- x=w-1
    let (mut n_plain, mut n_mirror) = (0, 0);
    for out in x.chunks(ds.sample_len()) {
        if out == plain.as_slice() {
            n_plain += 1;
        } else if out == mirror.as_slice() {
            n_mirror += 1;
        } else {
            panic!("output is neither the image nor its mirror");
        }
    }
    assert!(
        n_plain > 10 && n_mirror > 10,
        "{n_plain} plain, {n_mirror} mirrored"
    );

    // Crop and flip together: a shifted mirror.
    let both = Augment {
        crop_padding: 1,
        hflip: true,
    };
    let mut rng = StdRng::seed_from_u64(12);
    let (x, _) = gather(&ds, &idx, Some((&both, &mut rng)));
    for out in x.chunks(ds.sample_len()) {
        let ok = (-1..=1).any(|dy| {
            (-1..=1)
                .any(|dx| shifted(&ds, dy, dx, false) == out || shifted(&ds, dy, dx, true) == out)
        });
        assert!(ok);
    }
}

#[test]
fn gather_without_augmentation_copies() {
    let ds = synthetic(6, 3, 2, 2, 3);
    let (x, y) = gather_plain(&ds, &[4, 1]);
    assert_eq!(y, vec![1, 1]);
    assert_eq!(x[..12], *ds.image(4));
    assert_eq!(x[12..], *ds.image(1));
    let none = Augment::default();
    let mut rng = StdRng::seed_from_u64(0);
    let (x2, y2) = gather(&ds, &[4, 1], Some((&none, &mut rng)));
    assert_eq!((x2, y2), (x, y));
}

#[test]
fn epoch_batches_cover_every_index_once() {
    let b = epoch_batches(103, 10, 42, 0, true, false);
    assert_eq!(b.len(), 11);
    assert!(b[..10].iter().all(|c| c.len() == 10));
    assert_eq!(b[10].len(), 3);
    let mut all: Vec<usize> = b.concat();
    assert_ne!(all, (0..103).collect::<Vec<_>>(), "not shuffled");
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());

    assert_eq!(b, epoch_batches(103, 10, 42, 0, true, false));
    assert_ne!(b, epoch_batches(103, 10, 42, 1, true, false));
    assert_ne!(b, epoch_batches(103, 10, 43, 0, true, false));

    let d = epoch_batches(103, 10, 42, 0, true, true);
    assert_eq!(d.len(), 10);
    assert_eq!(d[..], b[..10]);

    let ordered = epoch_batches(7, 3, 42, 5, false, false);
    assert_eq!(ordered, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert!(epoch_batches(0, 3, 0, 0, true, false).is_empty());
    assert!(epoch_batches(2, 3, 0, 0, true, true).is_empty());
}

// ---------------------------------------------------------------------------------------
// load() errors and DatasetKind
// ---------------------------------------------------------------------------------------

#[test]
fn load_without_data_dir_errors_for_unshipped_sets() {
    assert_err_contains(
        load(DatasetKind::Cifar10, None, 0),
        &["--data-dir", "data_batch_1.bin", "test_batch.bin"],
    );
    assert_err_contains(load(DatasetKind::Mnist, None, 0), &["--data-dir"]);
}

#[test]
fn load_with_missing_data_dir_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-there");
    for kind in DatasetKind::ALL {
        assert_err_contains(load(kind, Some(&missing), 0), &["not-there"]);
    }
    // An existing but empty directory: the missing file is named.
    assert_err_contains(
        load(DatasetKind::Cifar10, Some(dir.path()), 0),
        &["data_batch_1.bin"],
    );
    assert_err_contains(
        load(DatasetKind::Digits, Some(dir.path()), 0),
        &["digits.csv"],
    );
}

#[test]
fn dataset_kind_names() {
    for (kind, name) in [
        (DatasetKind::Digits, "digits"),
        (DatasetKind::FashionMnist, "fashion-mnist"),
        (DatasetKind::Mnist, "mnist"),
        (DatasetKind::Cifar10, "cifar10"),
    ] {
        assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
        assert_eq!(kind.to_string(), name);
        assert_eq!(name.parse::<DatasetKind>().unwrap(), kind);
    }
    assert!("imagenet".parse::<DatasetKind>().is_err());
}
