//! [`Collective`] over MPI (rsmpi), with a watchdog on every collective.
//!
//! Only the thread that created [`Mpi`] calls MPI (`MPI_THREAD_FUNNELED`); the rayon workers of
//! a rank never do, and a call from another thread is an error (checked on every call). The watchdog is a plain thread that never calls MPI either: when a
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// Exit status of a rank whose watchdog fired.
pub const EXIT_TIMEOUT: i32 = 3;

type Armed = Arc<Mutex<Option<(Instant, String)>>>;

/// The MPI handles, used only on the thread that initialised MPI (`owner`).
struct World {
    comm: SimpleCommunicator,
    owner: ThreadId,
    universe: Option<Universe>,
}

// SAFETY: MPI runs at MPI_THREAD_FUNNELED: only the initialising thread may call it. `World` is
// reached only through `Mpi::world`, which hands it out on that thread alone, and its `Drop`
// finalises MPI only there; on any other thread the handles are plain values that are never
// passed to MPI, so moving or sharing them is harmless.
#[allow(unsafe_code)]
unsafe impl Send for World {}
#[allow(unsafe_code)]
unsafe impl Sync for World {}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::current().id() != self.owner {
            // Finalising from another thread is not allowed: leave it to process exit.
            std::mem::forget(self.universe.take());
        }
    }
}

/// MPI's world communicator, initialised once per process; dropping it finalises MPI.
pub struct Mpi {
    world: World,
    rank: usize,
    size: usize,
    armed: Armed,
    exchanges: AtomicU64,
    fault: Option<Fault>,
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
            world: World {
                comm: world,
                owner: std::thread::current().id(),
                universe: Some(universe),
            },
            rank,
            size,
            armed,
            exchanges: AtomicU64::new(0),
            fault,
        })
    }

    /// The communicator, on the thread that initialised MPI only.
    fn world(&self, what: &str) -> Result<&SimpleCommunicator> {
        if std::thread::current().id() != self.world.owner {
            return Err(Error::Distributed(format!(
                "{what}: MPI called from a thread other than the one that initialised it"
            )));
        }
        Ok(&self.world.comm)
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
        let world = self.world(what)?;
        let exchange = self.exchanges.fetch_add(1, Ordering::Relaxed) + 1;
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
            world.all_gather_varcount_into(piece, &mut partition);
        }
        self.arm(None);
        Ok(all)
    }
    fn abort(&self, code: i32) -> ! {
        match self.world("abort") {
            Ok(world) => world.abort(code),
            Err(_) => std::process::exit(code),
        }
    }
}
