//! Cohen et al.'s certification TSV: writing, reading back for resume, certified accuracy.

use std::path::Path;
use std::time::Duration;

use deepzero_certify::tsv::{format_timedelta, parse_timedelta};
use deepzero_certify::{
    certified_accuracy, parse_tsv, read_tsv, to_tsv, Certificate, CertifyRow, TSV_HEADER,
};

fn row(idx: usize, label: usize, predict: Option<usize>, radius: f64) -> CertifyRow {
    CertifyRow {
        idx,
        label,
        predict,
        radius,
        correct: predict == Some(label),
        time: Duration::from_micros(1_234_567 * idx as u64),
    }
}

#[test]
fn rows_are_written_as_cohen_writes_them() {
    assert_eq!(TSV_HEADER, "idx\tlabel\tpredict\tradius\tcorrect\ttime");
    let cert = Certificate {
        class: None,
        radius: 0.0,
        candidate: 3,
        count: 40,
        n: 100,
        p_lower: 0.3,
    };
    let abstain = CertifyRow::new(0, 3, &cert, Duration::from_secs(2));
    // Python's "{:.3}".format(0.0), as certify.py prints an abstention's radius.
    assert_eq!(abstain.to_string(), "0\t3\t-1\t0.0\t0\t0:00:02");
    let cert = Certificate {
        class: Some(3),
        radius: 0.51237,
        candidate: 3,
        count: 99,
        n: 100,
        p_lower: 0.97,
    };
    let hit = CertifyRow::new(20, 3, &cert, Duration::from_micros(61_500_001));
    assert_eq!(hit.to_string(), "20\t3\t3\t0.512\t1\t0:01:01.500001");
    // A small radius keeps its value (three decimals would read 0.000).
    let small = CertifyRow {
        radius: 6.2e-5,
        ..hit.clone()
    };
    assert_eq!(small.to_string(), "20\t3\t3\t6.2e-05\t1\t0:01:01.500001");
    let back = parse_tsv(&format!("{TSV_HEADER}\n{small}\n"), Path::new("t.tsv")).expect("parses");
    assert_eq!(back[0].radius, 6.2e-5);
    // str(datetime.timedelta(seconds=90061.5)) == '1 day, 1:01:01.500000'
    assert_eq!(
        format_timedelta(Duration::from_secs_f64(90061.5)),
        "1 day, 1:01:01.500000"
    );
    assert_eq!(
        parse_timedelta("2 days, 1:01:01.5"),
        Some(Duration::from_secs_f64(2.0 * 86400.0 + 3661.5))
    );
}

#[test]
fn written_files_read_back() {
    let rows = vec![
        row(0, 1, Some(1), 0.25),
        row(5, 2, None, 0.0),
        row(10, 0, Some(4), 0.125),
    ];
    let dir = std::env::temp_dir().join(format!("deepzero-certify-tsv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("certify.tsv");
    std::fs::write(&path, to_tsv(&rows)).unwrap();
    let back = read_tsv(&path).unwrap();
    assert_eq!(back.len(), 3);
    for (a, b) in rows.iter().zip(&back) {
        assert_eq!(
            (a.idx, a.label, a.predict, a.correct),
            (b.idx, b.label, b.predict, b.correct)
        );
        assert!((a.radius - b.radius).abs() < 5e-4);
        assert_eq!(a.time, b.time);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let e = read_tsv(dir.join("certify.tsv")).unwrap_err().to_string();
    assert!(e.contains("certify.tsv"), "{e}");
}

#[test]
fn bad_rows_are_errors_naming_the_line() {
    let src = Path::new("run/certify.tsv");
    let bad = |body: &str, want: &str, line: usize| {
        let text = format!("{TSV_HEADER}\n0\t1\t1\t0.500\t1\t0:00:01.000000\n{body}\n");
        let e = parse_tsv(&text, src).unwrap_err().to_string();
        assert!(
            e.contains(&format!("run/certify.tsv, line {line}")) && e.contains(want),
            "{e}"
        );
    };
    bad("1\t1\t1\t0.5", "expected 6", 3);
    bad("1\tx\t1\t0.5\t1\t0:00:01", "label", 3);
    bad("1\t1\t-2\t0.5\t0\t0:00:01", "predict", 3);
    bad("1\t1\t1\tnan\t1\t0:00:01", "radius", 3);
    bad("1\t1\t1\t-0.1\t1\t0:00:01", "radius", 3);
    bad("1\t1\t1\t0.5\tTrue\t0:00:01", "correct", 3);
    bad(
        "1\t1\t2\t0.5\t1\t0:00:01",
        "correct is 1 but predict is 2",
        3,
    );
    bad("1\t1\t-1\t0.5\t0\t0:00:01", "abstention", 3);
    bad("1\t1\t1\t0.5\t1\tyesterday", "time", 3);
    bad("0\t1\t1\t0.5\t1\t0:00:01", "increasing", 3);
    let e = parse_tsv("idx\tlabel\tprediction\tradius\tcorrect\ttime\n", src)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1") && e.contains("header"), "{e}");
    assert!(parse_tsv("", src).is_err());
    assert_eq!(parse_tsv(&format!("{TSV_HEADER}\n"), src).unwrap(), vec![]);
}

#[test]
fn certified_accuracy_counts_correct_rows_with_large_enough_radius() {
    let rows = vec![
        row(0, 1, Some(1), 0.8),
        row(1, 1, Some(1), 0.3),
        row(2, 1, Some(0), 0.9), // wrong class: never counts
        row(3, 1, None, 0.0),
    ];
    assert_eq!(
        certified_accuracy(&rows, &[0.0, 0.25, 0.5, 0.75, 1.0]),
        vec![0.5, 0.5, 0.25, 0.25, 0.0]
    );
    assert_eq!(certified_accuracy(&[], &[0.0]), vec![0.0]);
}
