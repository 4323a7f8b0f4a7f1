//! The fuzz harness of the file parsers, shared by `tests/fuzz.rs` of deepzero-core,
//! deepzero-certify and deepzero-pde (the other crates include this file with `#[path]`).
//!
//! A target is a name, the format, a few valid files made by the test, and a check that runs
//! the parser on one input. [`fuzz`] feeds it (a) random bytes, (b) the valid files with random
//! byte mutations, truncations, insertions and overwritten 32-bit words and, for text formats,
//! (c) token-level mutations (fields swapped, replaced by huge numbers, NaN, negative, empty,
//! unicode; lines duplicated or dropped). The property: the parser returns `Ok` or `Err`, never
//! panics (proptest catches the panic and shrinks the input) or hangs (a watchdog aborts the
//! process after [`HANG_SECONDS`] on one input, printing it), and the check's consistency
//! conditions on an `Ok` result hold. A failure prints the shrunk input as a byte string to
//! paste into a named regression test.
//!
//! CI runs [`CI_CASES`] cases per target from a fixed seed. `DEEPZERO_FUZZ_SECONDS=600` runs
//! every target for that long instead, round after round of fresh seeds, and prints the number
//! of cases; `DEEPZERO_FUZZ_SEED=N` gives another run other seeds. Adding a target is one call of
//! [`fuzz`] in a `#[test]`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Seconds each target runs in long mode (unset: CI mode, [`CI_CASES`] cases).
pub const SECONDS_ENV: &str = "DEEPZERO_FUZZ_SECONDS";
/// A number mixed into every seed (default 0), so that another long run tries other inputs.
pub const SEED_ENV: &str = "DEEPZERO_FUZZ_SEED";
/// Cases per target in CI mode.
pub const CI_CASES: u32 = 2000;
/// Cases per round of fresh seeds in long mode.
const ROUND_CASES: u32 = 2000;
/// One input taking longer than this is a hang.
pub const HANG_SECONDS: u64 = 60;
/// Longest fully random input.
const RANDOM_LEN: usize = 600;

/// How a target's files are mutated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Bytes: random and byte-level mutations.
    Binary,
    /// Text: also token-level mutations of the valid files that are UTF-8.
    Text,
}

/// What the check of one input found: the parser accepted or rejected it. A broken property
/// is an `Err` (or a panic) of the check.
pub type Verdict = Result<Parsed, String>;

/// The parser's answer to one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Accepted,
    Rejected,
}

impl Parsed {
    /// From a parser's result, after `consistent` checked an `Ok` value.
    pub fn from<T, E>(
        result: Result<T, E>,
        consistent: impl FnOnce(&T) -> Result<(), String>,
    ) -> Verdict {
        match result {
            Ok(value) => consistent(&value).map(|()| Parsed::Accepted),
            Err(_) => Ok(Parsed::Rejected),
        }
    }
}

/// Run target `name`: the valid files must be accepted, then the generated inputs must pass
/// `check` (see the module docs).
pub fn fuzz(name: &str, format: Format, valid: &[Vec<u8>], check: impl Fn(&[u8]) -> Verdict) {
    for (i, file) in valid.iter().enumerate() {
        assert_eq!(
            check(file),
            Ok(Parsed::Accepted),
            "fuzz {name}: valid file {i} is not accepted"
        );
    }
    let strategy = inputs(format, valid);
    let seconds: Option<u64> = std::env::var(SECONDS_ENV).ok().map(|s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{SECONDS_ENV}={s} is not a number of seconds"))
    });
    let base: u64 = std::env::var(SEED_ENV).map_or(0, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s} is not a whole number"))
    });
    let watchdog = Watchdog::start(name);
    let accepted = AtomicU64::new(0);
    let cases = AtomicU64::new(0);
    let started = Instant::now();
    let mut round = 0u64;
    loop {
        let (n, deadline) = match seconds {
            None => (CI_CASES, false),
            Some(s) => (ROUND_CASES, started.elapsed() >= Duration::from_secs(s)),
        };
        if deadline {
            break;
        }
        let config = Config {
            cases: n,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, rng(name, base, round));
        let outcome = runner.run(&strategy, |input| {
            watchdog.begin(&input);
            let verdict = check(&input);
            watchdog.end();
            cases.fetch_add(1, Ordering::Relaxed);
            match verdict {
                Ok(Parsed::Accepted) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(Parsed::Rejected) => Ok(()),
                Err(msg) => Err(TestCaseError::fail(msg)),
            }
        });
        watchdog.end();
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => panic!(
                "fuzz {name} (seed {base}, round {round}): {why}\nshrunk input ({} bytes), add it as a named \
                 regression test: {}",
                input.len(),
                byte_string(&input)
            ),
            Err(TestError::Abort(why)) => panic!("fuzz {name}: proptest aborted: {why}"),
        }
        round += 1;
        if seconds.is_none() {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {} cases ({} accepted) in {:.1} s, {round} round(s) of seed {base}",
        cases.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// The seeded generator of round `round` of target `name`.
fn rng(name: &str, base: u64, round: u64) -> TestRng {
    // FNV-1a of the name, the base seed, the round: a different, reproducible stream per target
    // and round.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&h.to_le_bytes());
    seed[8..16].copy_from_slice(&round.to_le_bytes());
    seed[16..24].copy_from_slice(&base.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &seed)
}

/// `bytes` as a Rust byte-string literal.
pub fn byte_string(bytes: &[u8]) -> String {
    let escaped: String = bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    format!("b\"{escaped}\"")
}

/// The input being checked and since when.
type Current = Arc<Mutex<Option<(Instant, Vec<u8>)>>>;

/// Aborts the process when one input runs longer than [`HANG_SECONDS`], printing it.
struct Watchdog {
    current: Current,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(name: &str) -> Watchdog {
        let current = Current::default();
        let done = Arc::new(AtomicBool::new(false));
        let (watched, finished, name) = (current.clone(), done.clone(), name.to_string());
        std::thread::spawn(move || {
            while !finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let guard = watched.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, input)) = &*guard {
                    if since.elapsed() > Duration::from_secs(HANG_SECONDS) {
                        eprintln!(
                            "fuzz {name}: one input ran more than {HANG_SECONDS} s (a hang); \
                             input ({} bytes): {}",
                            input.len(),
                            byte_string(input)
                        );
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog { current, done }
    }

    fn begin(&self, input: &[u8]) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), input.to_vec()));
    }

    fn end(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The inputs of a target (see the module docs).
fn inputs(format: Format, valid: &[Vec<u8>]) -> BoxedStrategy<Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..RANDOM_LEN);
    let bytes = (
        prop::sample::select(valid.to_vec()),
        prop::collection::vec(byte_edit(), 1..5),
    )
        .prop_map(|(mut file, edits)| {
            for e in &edits {
                e.apply(&mut file);
            }
            file
        });
    let texts: Vec<String> = valid
        .iter()
        .filter_map(|f| String::from_utf8(f.clone()).ok())
        .collect();
    if format == Format::Binary || texts.is_empty() {
        return prop_oneof![1 => random, 4 => bytes].boxed();
    }
    let tokens = (
        prop::sample::select(texts),
        prop::collection::vec(token_edit(), 1..4),
    )
        .prop_map(|(text, edits)| {
            let mut tokens = tokenize(&text);
            for e in &edits {
                e.apply(&mut tokens);
            }
            tokens.concat().into_bytes()
        });
    prop_oneof![1 => random, 3 => bytes, 4 => tokens].boxed()
}

/// Byte values and 32-bit words that often reach edge cases.
const BYTES: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'\n', b',', b'-'];
const WORDS: [u32; 8] = [
    0,
    1,
    2,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x0000_0803,
    3073,
];

/// One byte-level mutation.
#[derive(Clone, Debug)]
enum ByteEdit {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    Truncate(Index),
    Duplicate(Index, usize),
    Word(Index, u32, bool),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let at = any::<Index>;
    prop_oneof![
        (at(), 0u8..8).prop_map(|(i, bit)| ByteEdit::Flip(i, bit)),
        (at(), prop::sample::select(BYTES.to_vec())).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (at(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (at(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        (at(), 1usize..64).prop_map(|(i, n)| ByteEdit::Remove(i, n)),
        at().prop_map(ByteEdit::Truncate),
        (at(), 1usize..64).prop_map(|(i, n)| ByteEdit::Duplicate(i, n)),
        (at(), prop::sample::select(WORDS.to_vec()), any::<bool>())
            .prop_map(|(i, w, big)| ByteEdit::Word(i, w, big)),
    ]
}

impl ByteEdit {
    fn apply(&self, file: &mut Vec<u8>) {
        let len = file.len();
        let pos = |i: &Index| if len == 0 { 0 } else { i.index(len) };
        match self {
            ByteEdit::Flip(i, bit) if len > 0 => file[pos(i)] ^= 1 << bit,
            ByteEdit::Set(i, b) if len > 0 => file[pos(i)] = *b,
            ByteEdit::Insert(i, bytes) => {
                let at = if len == 0 { 0 } else { i.index(len + 1) };
                file.splice(at..at, bytes.iter().copied());
            }
            ByteEdit::Remove(i, n) if len > 0 => {
                let at = pos(i);
                file.drain(at..(at + n).min(len));
            }
            ByteEdit::Truncate(i) => file.truncate(pos(i)),
            ByteEdit::Duplicate(i, n) if len > 0 => {
                let at = pos(i);
                let copy = file[at..(at + n).min(len)].to_vec();
                file.splice(at..at, copy);
            }
            ByteEdit::Word(i, w, big) if len >= 4 => {
                let at = i.index(len - 3);
                let bytes = if *big {
                    w.to_be_bytes()
                } else {
                    w.to_le_bytes()
                };
                file[at..at + 4].copy_from_slice(&bytes);
            }
            _ => {}
        }
    }
}

/// Field values that often reach edge cases of text parsers.
const FIELDS: [&str; 30] = [
    "",
    "0",
    "-0",
    "-1",
    "1",
    "17",
    "0.5",
    "-0.5",
    "1e-400",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "1e999",
    "-1e308",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "0x10",
    "true",
    "null",
    "{}",
    "[]",
    "é",
    "日本語",
    "\u{feff}",
    "\u{0}",
    "\"",
];

/// Separators of [`tokenize`]: each one is a token of its own.
const SEPARATORS: &[char] = &[
    ',', '\t', '\n', '\r', ' ', ':', '"', '{', '}', '[', ']', '.',
];

/// `text` split into tokens: the runs between separators and the separators themselves, so
/// that concatenating the tokens gives `text` back.
fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if SEPARATORS.contains(&c) {
            if start < i {
                tokens.push(text[start..i].to_string());
            }
            tokens.push(c.to_string());
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        tokens.push(text[start..].to_string());
    }
    tokens
}

/// One token-level mutation.
#[derive(Clone, Debug)]
enum TokenEdit {
    Replace(Index, &'static str),
    Unicode(Index, String),
    Swap(Index, Index),
    Remove(Index),
    DuplicateLine(Index),
    RemoveLine(Index),
    Huge(Index, usize),
}

fn token_edit() -> impl Strategy<Value = TokenEdit> {
    let at = any::<Index>;
    prop_oneof![
        4 => (at(), prop::sample::select(FIELDS.to_vec())).prop_map(|(i, f)| TokenEdit::Replace(i, f)),
        1 => (at(), prop::collection::vec(any::<char>(), 0..6))
            .prop_map(|(i, c)| TokenEdit::Unicode(i, c.into_iter().collect())),
        2 => (at(), at()).prop_map(|(a, b)| TokenEdit::Swap(a, b)),
        1 => at().prop_map(TokenEdit::Remove),
        1 => at().prop_map(TokenEdit::DuplicateLine),
        1 => at().prop_map(TokenEdit::RemoveLine),
        1 => (at(), 20usize..400).prop_map(|(i, n)| TokenEdit::Huge(i, n)),
    ]
}

impl TokenEdit {
    fn apply(&self, tokens: &mut Vec<String>) {
        let len = tokens.len();
        if len == 0 {
            return;
        }
        match self {
            TokenEdit::Replace(i, f) => tokens[i.index(len)] = f.to_string(),
            TokenEdit::Unicode(i, s) => tokens[i.index(len)] = s.clone(),
            TokenEdit::Swap(a, b) => tokens.swap(a.index(len), b.index(len)),
            TokenEdit::Remove(i) => {
                tokens.remove(i.index(len));
            }
            TokenEdit::Huge(i, digits) => tokens[i.index(len)] = "9".repeat(*digits),
            TokenEdit::DuplicateLine(i) | TokenEdit::RemoveLine(i) => {
                let lines: Vec<usize> = (0..len).filter(|&t| tokens[t] == "\n").collect();
                // The line holding token `at`: from after the previous newline to its newline.
                let at = i.index(len);
                let start = lines.iter().rev().find(|&&t| t < at).map_or(0, |t| t + 1);
                let end = lines.iter().find(|&&t| t >= at).map_or(len, |t| t + 1);
                let line: Vec<String> = tokens[start..end].to_vec();
                match self {
                    TokenEdit::DuplicateLine(_) => {
                        tokens.splice(end..end, line);
                    }
                    _ => {
                        tokens.drain(start..end);
                    }
                }
            }
        }
    }
}
