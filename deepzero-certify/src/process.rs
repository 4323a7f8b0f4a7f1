//! [`ProcessClassifier`]: an external program as a black box (`process:COMMAND`).
//!
//! The program is started once with `sh -c COMMAND` and kept running. The protocol:
//!
//! - **Request** on the program's stdin: one ASCII line `N C H W\n`, then `N·C·H·W`
//!   little-endian f32 values, the images in NCHW order. Values are pixels in [0, 1] plus
//!   noise, not clipped.
//! - **Response** on its stdout: `N` lines, one per image, each with `K` class scores as ASCII
//!   decimal numbers separated by spaces. `K` is the same on every line and in every response.
//! - When deepzero closes the program's stdin, the program exits.
//!
//! Three threads serve the program: one writes requests to its stdin (so that a program that
//! stops reading cannot block the caller), one reads its stdout line by line into a channel
//! (so that the wait for a response is bounded by a timeout), and one keeps its last stderr
//! lines for error messages. Any failure (the program exits, hangs past the timeout, or answers
//! the wrong number of lines or scores, a non-number, NaN or infinity) kills the program,
//! because its stream is out of step; the error names the request, the line and the last
//! stderr lines, and every later query fails with the same message.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::classifier::{check_batch, BlackBox, QueryCounter};
use crate::error::{Error, ProcessFailure, Result};

/// Default bound on one response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Drop` waits for the program to exit after closing its stdin before killing it.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Stderr lines kept for error messages.
pub const STDERR_LINES: usize = 20;
/// Characters kept of one stderr line.
const STDERR_LINE_CHARS: usize = 300;
/// How long an error waits for the program's last stderr output after it exits or is killed.
const STDERR_SETTLE: Duration = Duration::from_secs(1);

/// An external classifier program speaking the protocol of the [module docs](self).
pub struct ProcessClassifier {
    command: String,
    input_shape: [usize; 3],
    timeout: Duration,
    state: Mutex<State>,
    stderr: Arc<StderrTail>,
    queries: QueryCounter,
}

struct State {
    child: Child,
    /// Requests for the writer thread; dropping it closes the program's stdin.
    to_stdin: Option<Sender<Vec<u8>>>,
    /// Lines of the program's stdout; disconnected at end of file.
    lines: Receiver<Vec<u8>>,
    /// Requests sent so far.
    requests: u64,
    /// K, once the program has answered.
    num_classes: Option<usize>,
    /// The failure that stopped the program, repeated by every later query.
    failed: Option<ProcessFailure>,
}

/// The last lines of the program's stderr, and whether it reached end of file.
#[derive(Default)]
struct StderrTail {
    inner: Mutex<(VecDeque<String>, bool)>,
    changed: Condvar,
}

impl StderrTail {
    fn lock(&self) -> MutexGuard<'_, (VecDeque<String>, bool)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text: String = text.trim_end().chars().take(STDERR_LINE_CHARS).collect();
        let mut g = self.lock();
        if g.0.len() == STDERR_LINES {
            g.0.pop_front();
        }
        g.0.push_back(text);
    }

    fn close(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }

    /// The kept lines, after waiting (bounded) for end of file when `settle` is set.
    fn lines(&self, settle: bool) -> Vec<String> {
        let mut g = self.lock();
        if settle {
            let deadline = Instant::now() + STDERR_SETTLE;
            while !g.1 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                g = self
                    .changed
                    .wait_timeout(g, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        g.0.iter().cloned().collect()
    }
}

impl ProcessClassifier {
    /// Start `sh -c command` for images of `input_shape` (`[C, H, W]`), each response bounded
    /// by `timeout`.
    pub fn spawn(command: &str, input_shape: [usize; 3], timeout: Duration) -> Result<Self> {
        if command.trim().is_empty() {
            return Err(Error::Config(
                "process classifier: the command is empty; give e.g. `process:python3 model.py`"
                    .into(),
            ));
        }
        if input_shape.contains(&0) {
            return Err(Error::Config(format!(
                "process classifier: input shape {input_shape:?} has a zero dimension"
            )));
        }
        if timeout.is_zero() {
            return Err(Error::Config(
                "process classifier: the timeout must be positive".into(),
            ));
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| {
            Error::Config(format!(
                "process classifier: could not start `sh -c {command:?}`: {e}"
            ))
        })?;
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => {
                    let _ = child.kill();
                    return Err(Error::Config(
                        "process classifier: the program's pipes could not be opened".into(),
                    ));
                }
            };
        let tail = Arc::new(StderrTail::default());
        let (to_stdin, requests) = mpsc::channel();
        let (line_tx, lines) = mpsc::channel();
        let spawned = spawn_writer(stdin, requests)
            .and_then(|_| spawn_reader(stdout, line_tx))
            .and_then(|_| spawn_stderr(stderr, Arc::clone(&tail)));
        if let Err(e) = spawned {
            kill(&mut child);
            return Err(Error::Config(format!(
                "process classifier: could not start its I/O threads: {e}"
            )));
        }
        Ok(ProcessClassifier {
            command: command.to_string(),
            input_shape,
            timeout,
            state: Mutex::new(State {
                child,
                to_stdin: Some(to_stdin),
                lines,
                requests: 0,
                num_classes: None,
                failed: None,
            }),
            stderr: tail,
            queries: QueryCounter::default(),
        })
    }

    /// The command given to `sh -c`.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Requests sent so far (one per [`BlackBox::logits`] call).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kill the program and record the failure; returns the error.
    fn fail(&self, state: &mut State, line: Option<usize>, msg: String) -> Error {
        state.to_stdin = None;
        kill(&mut state.child);
        let failure = ProcessFailure {
            command: self.command.clone(),
            request: state.requests,
            line,
            msg,
            stderr: self.stderr.lines(true),
        };
        state.failed = Some(failure.clone());
        Error::Process(Box::new(failure))
    }

    /// Why the program stopped answering: its exit status if it has exited.
    fn exit_note(state: &mut State) -> String {
        let deadline = Instant::now() + STDERR_SETTLE;
        loop {
            match state.child.try_wait() {
                Ok(Some(status)) => return format!("the program exited ({status})"),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => return "the program closed its stdout".into(),
            }
        }
    }

    fn exchange(&self, state: &mut State, images: &[f32], n: usize) -> Result<Vec<f32>> {
        state.requests += 1;
        // Lines left over from the previous response mean the program answered too many.
        if let Ok(extra) = state.lines.try_recv() {
            let msg = format!(
                "the program answered more lines than the images asked in request {}; \
                 first extra line: {:?}",
                state.requests - 1,
                shorten(&String::from_utf8_lossy(&extra))
            );
            return Err(self.fail(state, None, msg));
        }
        let [c, h, w] = self.input_shape;
        let mut request = format!("{n} {c} {h} {w}\n").into_bytes();
        request.reserve(images.len() * 4);
        for v in images {
            request.extend_from_slice(&v.to_le_bytes());
        }
        let sent = state
            .to_stdin
            .as_ref()
            .is_some_and(|tx| tx.send(request).is_ok());
        if !sent {
            let note = Self::exit_note(state);
            let msg = format!("{note}; it no longer reads requests from its stdin");
            return Err(self.fail(state, None, msg));
        }
        let deadline = Instant::now() + self.timeout;
        let mut scores: Vec<f32> = Vec::with_capacity(n * state.num_classes.unwrap_or(2));
        for i in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match state.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    let msg = format!(
                        "no complete answer within the timeout of {:?}: {i} of {n} lines \
                         arrived; the program was killed (raise the timeout if it is just slow)",
                        self.timeout
                    );
                    return Err(self.fail(state, Some(i + 1), msg));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let note = Self::exit_note(state);
                    let msg = format!("{note} after answering {i} of {n} lines");
                    return Err(self.fail(state, Some(i + 1), msg));
                }
            };
            if let Err(msg) = parse_scores(&line, &mut state.num_classes, &mut scores) {
                return Err(self.fail(state, Some(i + 1), msg));
            }
        }
        Ok(scores)
    }
}

/// Parse one response line of a `process:` classifier (its class scores, separated by
/// whitespace) into `out`, checking the score count against `k` (set by the first line ever
/// answered). The error says what is wrong with the line.
pub fn parse_scores(
    line: &[u8],
    k: &mut Option<usize>,
    out: &mut Vec<f32>,
) -> std::result::Result<(), String> {
    let text = std::str::from_utf8(line)
        .map_err(|_| "the line is not ASCII text".to_string())?
        .trim_end_matches(['\n', '\r']);
    let start = out.len();
    for (j, token) in text.split_ascii_whitespace().enumerate() {
        let v: f32 = token.parse().map_err(|_| {
            format!(
                "score {} is `{}`, not a decimal number",
                j + 1,
                shorten(token)
            )
        })?;
        if !v.is_finite() {
            return Err(format!(
                "score {} is `{token}`; scores must be finite numbers",
                j + 1
            ));
        }
        out.push(v);
    }
    let got = out.len() - start;
    match *k {
        _ if got == 0 => Err(format!(
            "the line is empty ({:?}); expected one line of class scores per image",
            shorten(text)
        )),
        Some(k) if k != got => Err(format!(
            "expected {k} class scores (as in the earlier answers), got {got}"
        )),
        Some(_) => Ok(()),
        None => {
            *k = Some(got);
            Ok(())
        }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

fn spawn_writer(mut stdin: ChildStdin, requests: Receiver<Vec<u8>>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("classifier-stdin".into())
        .spawn(move || {
            for request in requests {
                if stdin
                    .write_all(&request)
                    .and_then(|_| stdin.flush())
                    .is_err()
                {
                    break;
                }
            }
            // Dropping stdin closes it: the program's signal to exit.
        })
        .map(drop)
}

fn spawn_reader(stdout: impl Read + Send + 'static, lines: Sender<Vec<u8>>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("classifier-stdout".into())
        .spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 16, stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if lines.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .map(drop)
}

fn spawn_stderr(stderr: impl Read + Send + 'static, tail: Arc<StderrTail>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("classifier-stderr".into())
        .spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => tail.push(&line),
                }
            }
            tail.close();
        })
        .map(drop)
}

/// Kill the program and everything it started (its process group), then reap it.
fn kill(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", child.id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl BlackBox for ProcessClassifier {
    fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }

    /// K from the program's answers; asks it about one grey image (one query) if it has not
    /// answered yet.
    fn num_classes(&self) -> Result<usize> {
        if let Some(k) = self.lock().num_classes {
            return Ok(k);
        }
        let grey = vec![0.5f32; self.input_shape.iter().product()];
        let logits = self.logits(&grey, 1)?;
        Ok(logits.len())
    }

    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        check_batch(images, n, self.input_shape)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut state = self.lock();
        if let Some(failure) = &state.failed {
            let mut failure = failure.clone();
            failure.msg = format!(
                "{} (the program was stopped by this earlier error; start a new classifier)",
                failure.msg
            );
            return Err(Error::Process(Box::new(failure)));
        }
        let scores = self.exchange(&mut state, images, n)?;
        self.queries.add(n);
        Ok(scores)
    }

    fn queries(&self) -> u64 {
        self.queries.get()
    }
}

impl Drop for ProcessClassifier {
    /// Close the program's stdin and wait up to [`EXIT_GRACE`] for it to exit; kill it then.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        state.to_stdin = None;
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match state.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => break,
                Ok(None) => thread::sleep(Duration::from_millis(5)),
            }
        }
        kill(&mut state.child);
    }
}

/// The server side of the protocol: answers every request on `input` with `classifier`'s
/// scores on `output` until end of input, and returns the number of requests answered. This
/// is `deepzero certify serve`: any black box (a `run:` model, an ONNX file) becomes a
/// `process:` classifier for deepzero or for another tool.
///
/// Scores are written in Rust's shortest round-trip form, so a client that parses them as f32
/// gets the classifier's values exactly. A malformed request (a header that is not four
/// numbers, an image shape other than the classifier's, a short payload) is an error naming
/// the request; nothing is answered for it.
pub fn serve<C: BlackBox + ?Sized>(
    classifier: &C,
    mut input: impl BufRead,
    mut output: impl Write,
) -> Result<u64> {
    let shape = classifier.input_shape();
    let per_image: usize = shape.iter().product();
    let io = |e: std::io::Error| Error::Io {
        path: "<protocol stream>".into(),
        source: e,
    };
    let mut requests = 0u64;
    let mut header = String::new();
    loop {
        header.clear();
        if input.read_line(&mut header).map_err(io)? == 0 {
            return Ok(requests);
        }
        requests += 1;
        let fields: Vec<usize> = header
            .split_ascii_whitespace()
            .map(|t| t.parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::Config(format!(
                    "request {requests}: the header {:?} is not `N C H W` (four whole numbers)",
                    shorten(header.trim_end())
                ))
            })?;
        let [n, c, h, w] = fields[..] else {
            return Err(Error::Config(format!(
                "request {requests}: the header {:?} is not `N C H W` (four whole numbers)",
                shorten(header.trim_end())
            )));
        };
        if [c, h, w] != shape {
            return Err(Error::Shape(format!(
                "request {requests}: images of {:?} (C, H, W), the classifier takes {shape:?}",
                [c, h, w]
            )));
        }
        let values = n
            .checked_mul(per_image)
            .ok_or_else(|| Error::Config(format!("request {requests}: {n} images is too many")))?;
        let size = values
            .checked_mul(4)
            .ok_or_else(|| Error::Config(format!("request {requests}: {n} images is too many")))?;
        // Read what arrives, up to `size`: a header announcing absurd sizes must not allocate them.
        let mut bytes = Vec::new();
        let got = input
            .by_ref()
            .take(size as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if got != size {
            return Err(Error::Config(format!(
                "request {requests}: the payload of {n} images ({size} bytes) is incomplete: \
                 the stream ended after {got} bytes"
            )));
        }
        let images: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let scores = if n == 0 {
            Vec::new()
        } else {
            classifier.logits(&images, n)?
        };
        let k = scores.len() / n.max(1);
        let mut text = String::with_capacity(scores.len() * 12);
        for row in scores.chunks(k.max(1)) {
            for (j, v) in row.iter().enumerate() {
                if j > 0 {
                    text.push(' ');
                }
                text.push_str(&v.to_string());
            }
            text.push('\n');
        }
        output.write_all(text.as_bytes()).map_err(io)?;
        output.flush().map_err(io)?;
    }
}
