//! All-gather and barrier for ranks that are threads of one process: small
//! per-rank posts (counts, buffer handles, or an error) through shared memory,
//! with a barrier whose every wait has a deadline. A timeout breaks the group:
//! every later wait fails at once with `PeerFailed` naming the rank that gave up.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, Role, WaitDiagnostic};

/// How long a waiter spins before it sleeps on the condvar.
const SPIN: Duration = Duration::from_micros(500);

pub(crate) struct Board {
    world: usize,
    posts: Vec<Mutex<Option<Arc<dyn Any + Send + Sync>>>>,
    state: Mutex<BarrierState>,
    cv: Condvar,
    /// Mirror of `BarrierState::generation`, read without the lock by spinning waiters.
    released: AtomicU64,
    /// Spin only when every rank can have a core: otherwise spinners starve the late rank.
    spin: Duration,
    broken: AtomicBool,
    /// The first timeout: which rank gave up and why, reported to everyone after.
    broken_by: Mutex<Option<(usize, String)>>,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
}

impl Board {
    pub(crate) fn new(world: usize) -> Self {
        Self {
            world,
            posts: (0..world).map(|_| Mutex::new(None)).collect(),
            state: Mutex::new(BarrierState { arrived: 0, generation: 0 }),
            cv: Condvar::new(),
            released: AtomicU64::new(0),
            spin: if std::thread::available_parallelism().map_or(1, |n| n.get()) > world { SPIN } else { Duration::ZERO },
            broken: AtomicBool::new(false),
            broken_by: Mutex::new(None),
        }
    }

    /// Wait for every rank; fails after `timeout`, and then for good (the group is broken).
    pub(crate) fn barrier(&self, rank: usize, timeout: Duration) -> Result<()> {
        let broken_err = || match self.broken_by.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some((r, reason)) => Error::PeerFailed { rank: r, reason },
            None => Error::Protocol { rank, detail: "the group is unusable: an earlier wait timed out".into() },
        };
        if self.broken.load(Ordering::Acquire) {
            return Err(broken_err());
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation += 1;
            self.released.store(st.generation, Ordering::Release);
            self.cv.notify_all();
            return Ok(());
        }
        // Spin briefly before sleeping: a condvar wake-up can take tens of microseconds, and
        // the CUDA backend launches kernels that spin-wait for their peers right after this
        // barrier, so a late waker would show up as the other ranks' device time.
        drop(st);
        let spin_until = Instant::now() + self.spin;
        while Instant::now() < spin_until && !self.broken.load(Ordering::Acquire) {
            if self.released.load(Ordering::Acquire) != gen {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.generation == gen {
            if self.broken.load(Ordering::Acquire) {
                return Err(broken_err());
            }
            let now = Instant::now();
            if now >= deadline {
                let err = Error::Timeout {
                    timeout_ms: timeout.as_millis() as u64,
                    diag: WaitDiagnostic {
                        rank,
                        channel: 0,
                        role: Role::Notify,
                        head: st.arrived as u64,
                        tail: self.world as u64,
                        detail: format!("barrier: {} of {} ranks arrived", st.arrived, self.world),
                    },
                };
                drop(st);
                self.mark_broken(rank, &err);
                return Err(err);
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    /// Make every later wait fail at once with `PeerFailed` naming `rank` (a rank
    /// that gave up on the group, e.g. after a timeout in its data exchange).
    pub(crate) fn mark_broken(&self, rank: usize, err: &Error) {
        self.broken_by.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert((rank, err.to_string()));
        self.broken.store(true, Ordering::Release);
        // Take the lock so no waiter misses the wake-up between its check and its wait.
        let _st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Post `item` and return every rank's post, in rank order.
    pub(crate) fn all_gather<T: Any + Send + Sync>(&self, rank: usize, item: T, timeout: Duration) -> Result<Vec<Arc<T>>> {
        *self.posts[rank].lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(item));
        self.barrier(rank, timeout)?;
        let all = self
            .posts
            .iter()
            .enumerate()
            .map(|(r, p)| {
                let any = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
                any.and_then(|a| a.downcast::<T>().ok()).ok_or_else(|| Error::Protocol {
                    rank,
                    detail: format!("rank {r} posted a different message in the same step"),
                })
            })
            .collect::<Result<Vec<_>>>();
        // Nobody may overwrite a post before everyone has read it.
        self.barrier(rank, timeout)?;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_gather_returns_every_post_in_rank_order() {
        let board = Arc::new(Board::new(3));
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let b = board.clone();
                std::thread::spawn(move || {
                    (0..5).map(|round| b.all_gather(r, r * 10 + round, Duration::from_secs(5)).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in hs {
            let rounds = h.join().unwrap();
            for (round, got) in rounds.iter().enumerate() {
                let vals: Vec<usize> = got.iter().map(|a| **a).collect();
                assert_eq!(vals, vec![round, 10 + round, 20 + round]);
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_a_diagnostic() {
        let board = Board::new(2);
        let t = Instant::now();
        let err = board.barrier(0, Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        match err {
            Error::Timeout { diag, .. } => {
                assert_eq!(diag.role, Role::Notify);
                assert_eq!((diag.head, diag.tail), (1, 2));
            }
            e => panic!("unexpected {e:?}"),
        }
        // The group is now broken: later waits fail at once, naming the rank that timed out.
        let later = board.barrier(1, Duration::from_secs(10));
        assert!(matches!(later, Err(Error::PeerFailed { rank: 0, .. })), "{later:?}");
    }
}
