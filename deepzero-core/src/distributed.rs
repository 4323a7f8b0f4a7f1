//! Forward parallelization across processes and machines: one step's CGE queries shared out over
//! ranks.
//!
//! Every rank holds the model and builds the same step objective (the same seeded batch), so no
//! data moves. A step's coordinate set is cut into contiguous ranges, one per rank, whose summed
//! query costs are as equal as the granularity allows ([`split`]; the cost of a query comes from
//! the fast engine's cost model, [`crate::fast::coordinate_costs`], or is uniform for objectives
//! without a layer graph). Each rank evaluates its range; one all-gather
//! ([`Collective::all_gather`]) hands every rank every value, in coordinate order, so every rank
//! assembles the same gradient and applies the same update.
//!
//! **Rank-count invariance is bitwise.** A coordinate's value depends only on the base point and
//! that coordinate (the fast engine's queries do not depend on the thread count, and ranges are
//! cut only at the boundaries of the groups that an engine evaluates together), the values are
//! copied, never summed across ranks, and the optimizer runs the same arithmetic on every rank.
//! So 1, 2 or N ranks give the same bits.
//!
//! [`Collective`] is what a transport must offer: [`Single`] (one process) here, MPI in `mpi`
//! behind the `mpi` cargo feature. Failures: an MPI transport arms a watchdog around
//! every collective; a rank that dies or hangs stops the job with a clear message within the
//! configured timeout instead of hanging the others.

use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

#[cfg(feature = "mpi")]
pub mod mpi;

/// The collective operations a distributed run needs between `size()` ranks. `Send + Sync` so
/// that estimators holding one stay usable from thread pools; a transport that may only be
/// called from one thread checks the caller itself.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's piece, concatenated in rank order. `counts[r]` is rank `r`'s piece length;
    /// every rank passes the same `counts`. `what` names the exchange in error messages.
    fn all_gather(&self, piece: &[f64], counts: &[usize], what: &str) -> Result<Vec<f64>>;
    /// Stop every rank now with exit status `code` (an error that only this rank saw).
    fn abort(&self, code: i32) -> !;
}

/// One process: the all-gather returns the piece.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, piece: &[f64], counts: &[usize], what: &str) -> Result<Vec<f64>> {
        if counts != [piece.len()] {
            return Err(Error::Distributed(format!(
                "{what}: one rank, piece of {} values, counts {counts:?}",
                piece.len()
            )));
        }
        Ok(piece.to_vec())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Cut items `0..costs.len()` into `ranks` contiguous ranges of nearly equal summed cost, at
/// multiples of `block` items only (items evaluated together stay together). Range `r` ends at
/// the block boundary closest to the cost quantile `(r + 1) / ranks`. Negative or non-finite
/// costs count as 0; all-zero costs split by count.
pub fn split(costs: &[f64], block: usize, ranks: usize) -> Vec<Range<usize>> {
    let (n, block, ranks) = (costs.len(), block.max(1), ranks.max(1));
    let cost = |c: &f64| if c.is_finite() && *c > 0.0 { *c } else { 0.0 };
    let mut bounds = vec![0usize];
    let mut prefix = vec![0.0f64];
    let mut at = 0;
    while at < n {
        let end = (at + block).min(n);
        let c: f64 = costs[at..end].iter().map(cost).sum();
        prefix.push(prefix.last().copied().unwrap_or(0.0) + c);
        bounds.push(end);
        at = end;
    }
    let blocks = bounds.len() - 1;
    let total = prefix[blocks];
    let mut cuts = Vec::with_capacity(ranks + 1);
    cuts.push(0usize);
    for r in 1..ranks {
        let prev = *cuts.last().expect("first cut");
        let cut = if total > 0.0 {
            let target = total * r as f64 / ranks as f64;
            // First block boundary at or past the target, or the one before it if closer.
            let hi = prefix.partition_point(|&p| p < target).min(blocks);
            if hi > 0 && (target - prefix[hi - 1]) < (prefix[hi] - target) {
                hi - 1
            } else {
                hi
            }
        } else {
            (blocks * r).div_ceil(ranks)
        };
        cuts.push(cut.max(prev));
    }
    cuts.push(blocks);
    cuts.windows(2)
        .map(|w| bounds[w[0]]..bounds[w[1]])
        .collect()
}

/// What the ranks did in one shared step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepShares {
    /// Per rank: the range of the step's coordinate list it evaluated.
    pub ranges: Vec<Range<usize>>,
    /// Per rank: modelled cost of its range (the cost model's units).
    pub costs: Vec<f64>,
    /// Per rank: wall seconds it spent evaluating its range.
    pub compute_seconds: Vec<f64>,
    /// Per rank: CPU seconds (all its threads) it spent evaluating its range; the wall seconds
    /// where the system does not say ([`process_cpu_seconds`]). Unlike wall time, this does not
    /// count time that other programs took from the rank's cores.
    pub cpu_seconds: Vec<f64>,
    /// Payload bytes each rank sent plus received in the step's all-gather.
    pub bytes: u64,
}

impl StepShares {
    /// Load imbalance: the largest rank's CPU time over the mean (1 = balanced).
    pub fn imbalance(&self) -> f64 {
        imbalance(&self.cpu_seconds)
    }
    /// The same on wall time (includes time other programs took from the ranks).
    pub fn wall_imbalance(&self) -> f64 {
        imbalance(&self.compute_seconds)
    }
}

/// CPU seconds this process has run so far, all threads together, from Linux's per-thread
/// `schedstat` (nanoseconds on the CPU); `None` where that is not available.
pub fn process_cpu_seconds() -> Option<f64> {
    let mut nanos = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(entry) = entry else { continue };
        // A thread may end between the listing and the read: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        nanos += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 * 1e-9)
}

/// Max over mean of `v` (1 for an empty or all-zero `v`).
pub fn imbalance(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = v.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

/// Seconds of a rank's queries as `seconds_per_cost · cost + seconds_per_query · queries`: the
/// cost model's multiply-adds at a rate, plus a fixed part per query that multiply-adds do not
/// see (allocation, memory-bound per-channel nodes, the head). Fitted to the ranks' measured
/// times of the previous steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueryTiming {
    /// Seconds per unit of modelled cost.
    pub seconds_per_cost: f64,
    /// Fixed seconds per query.
    pub seconds_per_query: f64,
}

impl QueryTiming {
    /// Least squares over ranks of `seconds = a·cost + b·queries`; `None` when the ranks'
    /// cost-per-query ratios do not separate the two terms or the fit is not positive.
    pub fn fit(costs: &[f64], queries: &[usize], seconds: &[f64]) -> Option<QueryTiming> {
        TimingSums::default().add(costs, queries, seconds).fit()
    }

    /// The fixed part of a query in units of modelled cost.
    pub fn overhead(&self) -> f64 {
        self.seconds_per_query / self.seconds_per_cost
    }
}

/// The normal equations of [`QueryTiming`]'s least squares, summed over observations (ranks and
/// steps).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct TimingSums {
    cc: f64,
    cn: f64,
    nn: f64,
    ct: f64,
    nt: f64,
}

impl TimingSums {
    /// Add one step's observations (per rank: modelled cost, queries, seconds).
    fn add(mut self, costs: &[f64], queries: &[usize], seconds: &[f64]) -> Self {
        for ((&c, &n), &t) in costs.iter().zip(queries).zip(seconds) {
            let n = n as f64;
            self.cc += c * c;
            self.cn += c * n;
            self.nn += n * n;
            self.ct += c * t;
            self.nt += n * t;
        }
        self
    }

    /// Older observations weigh `factor` as much.
    fn decay(self, factor: f64) -> Self {
        TimingSums {
            cc: self.cc * factor,
            cn: self.cn * factor,
            nn: self.nn * factor,
            ct: self.ct * factor,
            nt: self.nt * factor,
        }
    }

    fn fit(&self) -> Option<QueryTiming> {
        let det = self.cc * self.nn - self.cn * self.cn;
        if det.is_nan() || det <= 1e-9 * self.cc * self.nn {
            return None;
        }
        let (mut a, mut b) = (
            (self.ct * self.nn - self.nt * self.cn) / det,
            (self.cc * self.nt - self.cn * self.ct) / det,
        );
        if b < 0.0 {
            // No fixed part: the rate alone, fitted again.
            (a, b) = (self.ct / self.cc, 0.0);
        }
        (a > 0.0 && a.is_finite() && b.is_finite()).then_some(QueryTiming {
            seconds_per_cost: a,
            seconds_per_query: b,
        })
    }
}

/// Weight of the previous steps' timings against the newest step's in the fit: noise of a
/// shared machine averages out, a drift (another batch size, a busier machine) is followed.
const TIMING_MEMORY: f64 = 0.8;

/// An estimator's handle on the ranks: splits a step's coordinates, gathers the values.
#[derive(Clone)]
pub struct Shard {
    comm: Arc<dyn Collective>,
    epoch: usize,
    step: usize,
    last: Option<StepShares>,
    sums: TimingSums,
    timing: Option<QueryTiming>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Shard(rank {} of {})",
            self.comm.rank(),
            self.comm.size()
        )
    }
}

/// Values each rank puts before its coordinate values: the base loss (checked equal on every
/// rank), its wall and its CPU compute seconds.
const HEADER: usize = 3;

impl Shard {
    /// Share queries over `comm`'s ranks.
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Shard {
            comm,
            epoch: 0,
            step: 0,
            last: None,
            sums: TimingSums::default(),
            timing: None,
        }
    }

    /// The fitted time of a query (after a shared step whose ranks' loads separate the terms).
    pub fn timing(&self) -> Option<QueryTiming> {
        self.timing
    }

    /// The transport.
    pub fn comm(&self) -> &dyn Collective {
        self.comm.as_ref()
    }

    /// Name steps from here on by `epoch` (0-based), counting steps from 1.
    pub fn begin_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
        self.step = 0;
    }

    /// How the last shared step was divided.
    pub fn last(&self) -> Option<&StepShares> {
        self.last.as_ref()
    }

    /// Evaluate the items `0..costs.len()` of a step over the ranks: `eval(range)` returns the
    /// base loss and this rank's values for its range, in order. Returns the base loss and every
    /// item's value in order. The ranks' base losses must agree bit for bit (they evaluate the
    /// same batch at the same parameters); a disagreement is an error, not a silent divergence.
    ///
    /// Items are weighted by `costs` plus the fixed part of a query fitted to earlier steps
    /// ([`QueryTiming`]). The fit uses the exchanged times, so every rank computes the same
    /// split; the values do not depend on the split, so the fit cannot change the numbers.
    pub fn run(
        &mut self,
        costs: &[f64],
        block: usize,
        eval: impl FnOnce(Range<usize>) -> Result<(f64, Vec<f64>)>,
    ) -> Result<(f64, Vec<f64>)> {
        self.step += 1;
        let (rank, size) = (self.comm.rank(), self.comm.size());
        let overhead = self.timing.map_or(0.0, |t| t.overhead());
        let weights: Vec<f64> = costs.iter().map(|c| c + overhead).collect();
        let ranges = split(&weights, block, size);
        let mine = ranges[rank].clone();
        let started = Instant::now();
        let cpu_started = process_cpu_seconds();
        let (loss, values) = eval(mine.clone())?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = match (cpu_started, process_cpu_seconds()) {
            (Some(a), Some(b)) => b - a,
            _ => seconds,
        };
        if values.len() != mine.len() {
            return Err(Error::Distributed(format!(
                "rank {rank} evaluated {} values for {} coordinates",
                values.len(),
                mine.len()
            )));
        }
        let mut piece = Vec::with_capacity(HEADER + values.len());
        piece.extend([loss, seconds, cpu]);
        piece.extend(values);
        let counts: Vec<usize> = ranges.iter().map(|r| HEADER + r.len()).collect();
        let what = format!(
            "the gradient exchange of epoch {}, step {}",
            self.epoch + 1,
            self.step
        );
        let all = self.comm.all_gather(&piece, &counts, &what)?;
        let mut out = Vec::with_capacity(costs.len());
        let mut compute_seconds = Vec::with_capacity(size);
        let mut cpu_seconds = Vec::with_capacity(size);
        let mut at = 0;
        for (r, range) in ranges.iter().enumerate() {
            let (their_loss, their_seconds) = (all[at], all[at + 1]);
            cpu_seconds.push(all[at + 2]);
            if their_loss.to_bits() != loss.to_bits() {
                return Err(Error::Distributed(format!(
                    "{what}: rank {r} has base loss {their_loss}, rank {rank} {loss}; every rank \
                     must train on the same data from the same parameters (same seed, files, \
                     precision)"
                )));
            }
            compute_seconds.push(their_seconds);
            out.extend_from_slice(&all[at + HEADER..at + HEADER + range.len()]);
            at += HEADER + range.len();
        }
        let cost_of = |r: &Range<usize>| costs[r.clone()].iter().sum::<f64>();
        let shares: Vec<f64> = ranges.iter().map(cost_of).collect();
        let queries: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        self.sums = self
            .sums
            .decay(TIMING_MEMORY)
            .add(&shares, &queries, &cpu_seconds);
        if let Some(fit) = self.sums.fit() {
            self.timing = Some(fit);
        }
        self.last = Some(StepShares {
            costs: shares,
            ranges,
            compute_seconds,
            cpu_seconds,
            bytes: 8 * all.len() as u64,
        });
        Ok((loss, out))
    }
}

/// The hidden fault a test injects into a rank, to check that the job stops cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Rank that fails.
    pub rank: usize,
    /// 1-based number of the all-gather at which it fails (before taking part).
    pub exchange: u64,
    /// How it fails.
    pub kind: FaultKind,
}

/// How an injected fault fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The process dies (abort, as a crash).
    Die,
    /// The process stops answering (sleeps forever).
    Hang,
}

impl std::str::FromStr for Fault {
    type Err = Error;
    /// `RANK:EXCHANGE:die` or `RANK:EXCHANGE:hang`.
    fn from_str(s: &str) -> Result<Fault> {
        let bad = || {
            Error::Config(format!(
                "fault `{s}` is not RANK:EXCHANGE:die or RANK:EXCHANGE:hang"
            ))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let [rank, exchange, kind] = parts.as_slice() else {
            return Err(bad());
        };
        Ok(Fault {
            rank: rank.parse().map_err(|_| bad())?,
            exchange: exchange.parse().map_err(|_| bad())?,
            kind: match *kind {
                "die" => FaultKind::Die,
                "hang" => FaultKind::Hang,
                _ => return Err(bad()),
            },
        })
    }
}

impl Fault {
    /// Fail now if this is the faulty rank's faulty exchange.
    pub fn strike(&self, rank: usize, exchange: u64) {
        if rank != self.rank || exchange != self.exchange {
            return;
        }
        eprintln!(
            "rank {rank}: injected fault at exchange {exchange}: {:?}",
            self.kind
        );
        match self.kind {
            FaultKind::Die => std::process::abort(),
            FaultKind::Hang => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_balances_cost_not_count() {
        // One expensive item then many cheap ones: the first rank takes the expensive item only.
        let mut costs = vec![10.0];
        costs.extend(vec![1.0; 10]);
        let r = split(&costs, 1, 2);
        assert_eq!(r, vec![0..1, 1..11]);
        // Covers everything, in order, for any rank count.
        for ranks in 1..15 {
            let r = split(&costs, 3, ranks);
            assert_eq!(r.len(), ranks);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[ranks - 1].end, 11);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for x in &r {
                assert!(x.start % 3 == 0 || x.start == 11, "{r:?}");
            }
        }
    }

    #[test]
    fn split_uniform_and_degenerate() {
        assert_eq!(split(&[1.0; 8], 1, 4), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(split(&[0.0; 4], 1, 2), vec![0..2, 2..4]);
        assert_eq!(split(&[], 1, 3), vec![0..0, 0..0, 0..0]);
    }

    #[test]
    fn timing_fit_recovers_rate_and_overhead() {
        // seconds = 2·cost + 3·queries, exactly.
        let (costs, queries) = ([10.0, 1.0, 5.0], [1usize, 20, 4]);
        let secs: Vec<f64> = costs
            .iter()
            .zip(queries)
            .map(|(c, n)| 2.0 * c + 3.0 * n as f64)
            .collect();
        let t = QueryTiming::fit(&costs, &queries, &secs).unwrap();
        assert!((t.seconds_per_cost - 2.0).abs() < 1e-9, "{t:?}");
        assert!((t.seconds_per_query - 3.0).abs() < 1e-9, "{t:?}");
        assert!((t.overhead() - 1.5).abs() < 1e-9);
        // A negative fixed part is dropped and the rate fitted alone: seconds = 2·cost − queries/20.
        let secs = [19.95, 1.0, 9.8];
        let t = QueryTiming::fit(&[10.0, 1.0, 5.0], &[1, 20, 4], &secs).unwrap();
        assert_eq!(t.seconds_per_query, 0.0);
        assert!(t.seconds_per_cost > 0.0);
        // Proportional loads cannot separate the terms.
        assert!(QueryTiming::fit(&[2.0, 4.0], &[1, 2], &[1.0, 2.0]).is_none());
    }

    #[test]
    fn faults_parse() {
        let f: Fault = "1:3:die".parse().unwrap();
        assert_eq!(
            f,
            Fault {
                rank: 1,
                exchange: 3,
                kind: FaultKind::Die
            }
        );
        assert!("1:x:die".parse::<Fault>().is_err());
        assert!("1:2:explode".parse::<Fault>().is_err());
    }

    #[test]
    fn single_rank_shard_returns_all_values() {
        let mut shard = Shard::new(Arc::new(Single));
        let (loss, v) = shard
            .run(&[1.0, 2.0, 3.0], 1, |r| {
                Ok((0.5, r.map(|i| i as f64 * 10.0).collect()))
            })
            .unwrap();
        assert_eq!(loss, 0.5);
        assert_eq!(v, vec![0.0, 10.0, 20.0]);
        let last = shard.last().unwrap();
        assert_eq!(last.ranges, vec![0..3]);
        assert_eq!(last.costs, vec![6.0]);
    }
}
