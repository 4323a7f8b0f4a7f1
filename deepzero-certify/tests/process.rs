//! The `process:` classifier: protocol, agreement with the in-process classifier, and every
//! way a program can break the protocol.

mod common;

use std::time::{Duration, Instant};

use common::{linear_case, LinearBox};
use deepzero_certify::{BlackBox, Error, ProcessClassifier, Smoothed};
use rand::rngs::StdRng;
use rand::SeedableRng;

const FAULTY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/faulty_client.py"
);
const SHAPE: [usize; 3] = [1, 2, 2];

fn faulty(mode: &str, timeout: Duration) -> ProcessClassifier {
    ProcessClassifier::spawn(&format!("exec python3 '{FAULTY}' {mode}"), SHAPE, timeout).unwrap()
}

/// Request 1 succeeds, request 2 fails; returns the error text and the failure.
fn second_request_fails(
    mode: &str,
    timeout: Duration,
) -> (String, deepzero_certify::ProcessFailure) {
    let f = faulty(mode, timeout);
    let x = vec![0.5f32; 3 * 4];
    assert_eq!(
        f.logits(&x, 3).unwrap(),
        vec![0.25, -0.25, 0.25, -0.25, 0.25, -0.25]
    );
    let err = f.logits(&x, 3).unwrap_err();
    println!("--- {mode}:\n{err}");
    let failure = err.process_failure().expect("a process error").clone();
    assert_eq!(failure.request, 2, "{err}");
    assert!(
        failure
            .stderr
            .iter()
            .any(|l| l.contains("misbehaving on request 2")),
        "stderr tail missing: {err}"
    );
    // The program is stopped: later queries repeat the error.
    let again = f.logits(&x, 3).unwrap_err().to_string();
    assert!(again.contains("earlier error"), "{again}");
    assert_eq!(f.queries(), 3, "failed requests are not counted");
    (err.to_string(), failure)
}

#[test]
fn linear_program_agrees_with_the_in_process_classifier() {
    let mut rng = StdRng::seed_from_u64(11);
    let (f, x) = linear_case(&mut rng, 0.25, 0.9);
    let program =
        ProcessClassifier::spawn(&f.command(), [1, 4, 4], Duration::from_secs(60)).unwrap();
    assert_eq!(program.num_classes().unwrap(), 2);
    assert_eq!(program.queries(), 1, "num_classes asked one grey image");

    let images: Vec<f32> = (0..5 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(
        program.logits(&images, 5).unwrap(),
        f.logits(&images, 5).unwrap()
    );

    // One image certified with n = 100,000 both ways: same seed, same certificate.
    let time = |g: &dyn Fn(&mut StdRng) -> deepzero_certify::Certificate| {
        let mut rng = StdRng::seed_from_u64(5);
        let start = Instant::now();
        let c = g(&mut rng);
        (c, start.elapsed())
    };
    let by_program = Smoothed::new(&program, 0.25, 10_000).unwrap();
    let in_process = Smoothed::new(&f, 0.25, 10_000).unwrap();
    let (a, ta) = time(&|rng| by_program.certify(&x, 100, 100_000, 0.001, rng).unwrap());
    let (b, tb) = time(&|rng| in_process.certify(&x, 100, 100_000, 0.001, rng).unwrap());
    println!(
        "certify n=100000 (1x4x4): process {:.2} s, in-process {:.3} s; radius {:.4} (exact {:.4})",
        ta.as_secs_f64(),
        tb.as_secs_f64(),
        a.radius,
        f.exact_radius(&x)
    );
    assert_eq!(a, b);
    assert_eq!(program.queries(), 1 + 5 + 100_100);
    assert_eq!(program.requests(), 1 + 1 + 11);
}

#[test]
fn dropping_the_classifier_ends_the_program() {
    let f = faulty("ok", Duration::from_secs(10));
    f.logits(&[0.0; 4], 1).unwrap();
    let start = Instant::now();
    drop(f);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the program should exit on EOF"
    );
}

#[test]
fn program_that_dies() {
    let (err, failure) = second_request_fails("die", Duration::from_secs(20));
    assert!(err.contains("exited") && err.contains("3"), "{err}");
    assert!(
        failure.msg.contains("0 of 3 lines") || failure.msg.contains("no longer reads"),
        "{err}"
    );
}

#[test]
fn program_that_dies_before_answering() {
    let f = faulty("die-at-start", Duration::from_secs(20));
    let err = f.logits(&[0.0; 4], 1).unwrap_err();
    let failure = err.process_failure().unwrap();
    assert_eq!(failure.request, 1);
    assert!(
        err.to_string()
            .contains("giving up before the first request"),
        "{err}"
    );
    assert!(err.to_string().contains("exited"), "{err}");
}

#[test]
fn program_that_is_not_found() {
    let f = ProcessClassifier::spawn(
        "exec ./no-such-classifier-program",
        SHAPE,
        Duration::from_secs(20),
    )
    .unwrap();
    let err = f.logits(&[0.0; 4], 1).unwrap_err().to_string();
    assert!(
        err.contains("no-such-classifier-program") && err.contains("exit"),
        "{err}"
    );
}

#[test]
fn program_that_hangs_hits_the_timeout() {
    let start = Instant::now();
    let (err, failure) = second_request_fails("hang", Duration::from_secs(2));
    assert!(
        err.contains("timeout") && err.contains("0 of 3 lines"),
        "{err}"
    );
    assert_eq!(failure.line, Some(1));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn program_that_answers_too_few_lines() {
    let (err, failure) = second_request_fails("fewer", Duration::from_secs(2));
    assert!(err.contains("2 of 3 lines"), "{err}");
    assert_eq!(failure.line, Some(3));
}

#[test]
fn program_that_answers_too_many_lines() {
    let f = faulty("more", Duration::from_secs(20));
    let x = vec![0.5f32; 4 * 3];
    f.logits(&x, 3).unwrap();
    // Request 2 gets one line too many; the extra line is found by request 2 (if it arrived in
    // time) or, once it has arrived, before request 3 is sent. Give it time to arrive: a line
    // that comes after the next request was sent cannot be told apart from that request's.
    let err = match f.logits(&x, 3) {
        Err(e) => e,
        Ok(_) => {
            std::thread::sleep(Duration::from_millis(500));
            f.logits(&x, 3).unwrap_err()
        }
    };
    let text = err.to_string();
    assert!(
        text.contains("more lines than") && text.contains("request 2"),
        "{text}"
    );
    assert!(text.contains("misbehaving on request 2"), "{text}");
}

#[test]
fn program_that_answers_the_wrong_number_of_scores() {
    let (err, failure) = second_request_fails("scores", Duration::from_secs(20));
    assert!(
        err.contains("expected 2 class scores") && err.contains("got 3"),
        "{err}"
    );
    assert_eq!(failure.line, Some(2));
    assert!(err.contains("request 2, response line 2"), "{err}");
}

#[test]
fn program_that_answers_nan() {
    let (err, failure) = second_request_fails("nan", Duration::from_secs(20));
    assert!(err.contains("`nan`") && err.contains("finite"), "{err}");
    assert_eq!(failure.line, Some(2));
}

#[test]
fn program_that_answers_a_non_number() {
    let (err, failure) = second_request_fails("word", Duration::from_secs(20));
    assert!(
        err.contains("`banana`") && err.contains("not a decimal number"),
        "{err}"
    );
    assert_eq!(failure.line, Some(2));
}

#[test]
fn bad_arguments() {
    let e = |r: Result<ProcessClassifier, Error>| r.err().expect("an error").to_string();
    assert!(e(ProcessClassifier::spawn(
        "  ",
        SHAPE,
        Duration::from_secs(1)
    ))
    .contains("empty"));
    assert!(e(ProcessClassifier::spawn(
        "cat",
        [0, 2, 2],
        Duration::from_secs(1)
    ))
    .contains("zero"));
    assert!(e(ProcessClassifier::spawn("cat", SHAPE, Duration::ZERO)).contains("timeout"));
    let f = faulty("ok", Duration::from_secs(10));
    let err = f.logits(&[0.0; 5], 1).unwrap_err().to_string();
    assert!(err.contains("need 4 values, got 5"), "{err}");
    let _ = LinearBox::new(vec![], 0.0, SHAPE);
}

#[test]
fn drop_kills_a_program_that_ignores_end_of_file() {
    let f = ProcessClassifier::spawn("exec sleep 3600", SHAPE, Duration::from_secs(1)).unwrap();
    let start = Instant::now();
    drop(f);
    let waited = start.elapsed();
    println!(
        "drop of a program ignoring EOF took {:.2} s",
        waited.as_secs_f64()
    );
    assert!(waited < deepzero_certify::process::EXIT_GRACE + Duration::from_secs(3));
}

#[test]
fn stderr_tail_is_bounded_and_keeps_the_last_lines() {
    let cmd = "cat > /dev/null & i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo \"noise $i\" >&2; done; exit 4";
    let f = ProcessClassifier::spawn(cmd, SHAPE, Duration::from_secs(20)).unwrap();
    let err = f.logits(&[0.0; 4], 1).unwrap_err();
    let failure = err.process_failure().unwrap();
    assert_eq!(
        failure.stderr.len(),
        deepzero_certify::process::STDERR_LINES
    );
    assert_eq!(failure.stderr.last().map(String::as_str), Some("noise 500"));
    assert!(err.to_string().contains("exit status: 4"), "{err}");
}

#[test]
fn a_boxed_dyn_classifier_can_be_smoothed() {
    let mut rng = StdRng::seed_from_u64(12);
    let (f, x) = linear_case(&mut rng, 0.25, 0.9);
    let boxed: Box<dyn BlackBox> = Box::new(
        ProcessClassifier::spawn(&f.command(), [1, 4, 4], Duration::from_secs(60)).unwrap(),
    );
    let g = Smoothed::new(boxed, 0.25, 1000).unwrap();
    let p = g.predict(&x, 1000, 0.001, &mut rng).unwrap();
    assert_eq!(p.class, Some(usize::from(f.margin(&x) > 0.0)));
    assert_eq!(g.classifier().queries(), 1000);
}
