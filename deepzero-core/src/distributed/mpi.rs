//! [`Collective`] over MPI (rsmpi), with a watchdog on every collective.
//!
//! Only the thread that created [`Mpi`] calls MPI (`MPI_THREAD_FUNNELED`); the rayon workers of
//! a rank never do. The watchdog is a plain thread that never calls MPI either: when a
//! collective has not completed within the timeout it prints which exchange stalled and exits
//! the process with [`EXIT_TIMEOUT`], and the MPI launcher then stops the other ranks. A rank
//! that dies is noticed by the launcher directly (it stops the job and names the rank); the
//! watchdog covers a rank that hangs, or a launcher that does not notice.

use super::{Collective, Fault};
use crate::error::{Error, Result};
use ::mpi::datatype::PartitionMut;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use ::mpi::Count;
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a rank whose watchdog fired.
pub const EXIT_TIMEOUT: i32 = 3;

type Armed = Arc<Mutex<Option<(Instant, String)>>>;

/// MPI's world communicator, initialised once per process; dropping it finalises MPI.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    armed: Armed,
    exchanges: Cell<u64>,
    fault: Option<Fault>,
    _universe: Universe,
}

impl Mpi {
    /// Initialise MPI. A collective that has not completed after `timeout` stops the job with a
    /// message ending in `hint` (what the user should do: the front end's flags). `fault`: a
    /// test's injected failure.
    pub fn init(timeout: Duration, hint: String, fault: Option<Fault>) -> Result<Mpi> {
        if timeout.is_zero() {
            return Err(Error::Config("the rank timeout must be positive".into()));
        }
        let (universe, _) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled)
            .ok_or_else(|| Error::Distributed("MPI was initialised twice in one process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let armed: Armed = Arc::new(Mutex::new(None));
        let watched = Arc::clone(&armed);
        let tick = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
        std::thread::Builder::new()
            .name("deepzero-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                let stalled = watched.lock().ok().and_then(|a| {
                    a.as_ref()
                        .map(|(since, what)| (since.elapsed(), what.clone()))
                });
                if let Some((waited, what)) = stalled {
                    if waited >= timeout {
                        eprintln!(
                            "error: rank {rank} of {size}: {what} did not complete within {:.1} s: \
                             another rank died or hangs; stopping the job. {hint}",
                            timeout.as_secs_f64()
                        );
                        std::process::exit(EXIT_TIMEOUT);
                    }
                }
            })
            .map_err(|e| Error::Distributed(format!("cannot start the watchdog thread: {e}")))?;
        Ok(Mpi {
            world,
            rank,
            size,
            armed,
            exchanges: Cell::new(0),
            fault,
            _universe: universe,
        })
    }

    fn arm(&self, what: Option<&str>) {
        if let Ok(mut a) = self.armed.lock() {
            *a = what.map(|w| (Instant::now(), w.to_string()));
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, piece: &[f64], counts: &[usize], what: &str) -> Result<Vec<f64>> {
        if counts.len() != self.size || counts[self.rank] != piece.len() {
            return Err(Error::Distributed(format!(
                "{what}: rank {} has a piece of {} values, counts {counts:?} for {} ranks",
                self.rank,
                piece.len(),
                self.size
            )));
        }
        let exchange = self.exchanges.get() + 1;
        self.exchanges.set(exchange);
        if let Some(f) = &self.fault {
            f.strike(self.rank, exchange);
        }
        let to_count = |n: usize| {
            Count::try_from(n).map_err(|_| {
                Error::Distributed(format!("{what}: {n} values exceed MPI's count range"))
            })
        };
        let counts_c: Vec<Count> = counts.iter().map(|&n| to_count(n)).collect::<Result<_>>()?;
        let mut displs = Vec::with_capacity(counts.len());
        let mut at = 0usize;
        for &n in counts {
            displs.push(to_count(at)?);
            at += n;
        }
        let mut all = vec![0.0f64; at];
        self.arm(Some(what));
        {
            let mut partition = PartitionMut::new(&mut all[..], counts_c, &displs[..]);
            self.world.all_gather_varcount_into(piece, &mut partition);
        }
        self.arm(None);
        Ok(all)
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
