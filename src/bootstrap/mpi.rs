//! The process group over MPI (cargo feature `mpi`, rsmpi on OpenMPI or MPICH):
//! rank and size from `MPI_COMM_WORLD`, hosts from a shared-memory split, bytes
//! through MPI collectives.
//!
//! MPI's blocking collectives have no deadline. So every call first meets the other
//! ranks in a non-blocking barrier polled against the deadline; a rank that never
//! arrives (stuck, or on another code path) becomes a `Timeout` naming the call
//! instead of a hang. Once everyone has arrived, the sizes are exchanged and the
//! collective itself runs; every rank sees every size, so all take the same
//! decision when a size does not fit MPI's 32-bit counts.

use std::time::{Duration, Instant};

use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use tracing::info;

use super::env::LaunchEnv;
use super::ProcessGroup;
use crate::error::{Error, Result, Role, WaitDiagnostic};

/// This process's end of an MPI job.
pub struct MpiGroup {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    hostnames: Vec<String>,
    /// Why the group broke (the rank blamed, the reason); every later call fails with it.
    broken: Option<(usize, String)>,
    /// Collectives begun, for the diagnostics.
    calls: u64,
    /// Declared last so it drops last: dropping it finalizes MPI.
    _universe: Universe,
}

// SAFETY: `init` requires MPI_THREAD_SERIALIZED or more, and every MPI call goes
// through `&mut self`, so calls from different threads never overlap.
unsafe impl Send for MpiGroup {}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiGroup").field("rank", &self.rank).field("size", &self.size).finish_non_exhaustive()
    }
}

impl MpiGroup {
    /// Initialize MPI (once per process) and join `MPI_COMM_WORLD`. `env` is what the
    /// launcher's variables said; MPI must agree with it. `timeout` bounds the
    /// host-name exchange.
    pub fn init(env: &LaunchEnv, timeout: Duration) -> Result<Self> {
        let unavailable = |reason: String| Error::BackendUnavailable { backend: "mpi", reason };
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| unavailable("MPI is already initialized in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(unavailable(format!("the MPI library gives thread level {threading:?}; switchyard needs Serialized")));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (env.rank, env.world_size) {
            return Err(Error::InvalidArgument {
                arg: format!("{:?} launcher variables", env.launcher),
                reason: format!("they say rank {} of {}, MPI says rank {rank} of {size}", env.rank, env.world_size),
            });
        }
        let mut group = Self { world, rank, size, hostnames: Vec::new(), broken: None, calls: 0, _universe: universe };
        group.hostnames = group.find_hosts(timeout)?;
        info!(rank, world = size, hosts = ?group.hostnames, "mpi bootstrap: group formed");
        Ok(group)
    }

    /// Every rank's host: the processor name of the lowest rank it shares memory with
    /// (`MPI_Comm_split_type(SHARED)`), so two hosts that report one name stay apart.
    fn find_hosts(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let shared = self.world.split_shared(self.rank as i32);
        let mut leader = self.rank as u64;
        shared.process_at_rank(0).broadcast_into(&mut leader);
        let name = mpi::environment::processor_name().unwrap_or_else(|_| "unknown-host".into());
        let mut msg = leader.to_le_bytes().to_vec();
        msg.extend_from_slice(name.as_bytes());
        let all = self.all_gather(&msg, timeout)?;
        let leaders: Vec<usize> = all.iter().map(|m| u64::from_le_bytes(m[..8].try_into().expect("8 bytes")) as usize).collect();
        let names: Vec<String> = all.iter().map(|m| String::from_utf8_lossy(&m[8..]).into_owned()).collect();
        Ok(leaders
            .iter()
            .map(|&l| {
                let clash = leaders.iter().any(|&o| o != l && names[o] == names[l]);
                if clash {
                    format!("{}#{l}", names[l])
                } else {
                    names[l].clone()
                }
            })
            .collect())
    }

    /// Wait, up to `timeout`, until every rank has begun this collective.
    fn meet(&mut self, op: &str, timeout: Duration) -> Result<()> {
        if let Some((rank, reason)) = &self.broken {
            return Err(Error::PeerFailed { rank: *rank, reason: reason.clone() });
        }
        self.calls += 1;
        let deadline = Instant::now() + timeout;
        let mut request = self.world.immediate_barrier();
        let mut nap = Duration::from_micros(1);
        loop {
            match request.test() {
                Ok(_) => return Ok(()),
                Err(r) => request = r,
            }
            if Instant::now() >= deadline {
                // SAFETY: a barrier has no buffers; abandoning it leaves MPI nothing to write into.
                let _ = unsafe { request.into_raw() };
                let detail = format!(
                    "{op} #{}: rank {} waited for the other ranks; at least one did not start this call",
                    self.calls, self.rank
                );
                self.broken = Some((self.rank, detail.clone()));
                let diag =
                    WaitDiagnostic { rank: self.rank, channel: 0, role: Role::Notify, head: 0, tail: self.size as u64, detail };
                return Err(Error::Timeout { timeout_ms: timeout.as_millis() as u64, diag });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    /// Every rank's `sizes` (the same length on each), gathered. Every rank then checks
    /// the same `totals` of them against MPI's 32-bit counts, so all fail alike.
    fn gather_sizes(&mut self, op: &str, sizes: &[u64], totals: impl Fn(&[u64]) -> Vec<u64>) -> Result<Vec<u64>> {
        let mut all = vec![0u64; sizes.len() * self.size];
        self.world.all_gather_into(sizes, &mut all[..]);
        if let Some(big) = totals(&all).into_iter().find(|&s| s > i32::MAX as u64) {
            let detail = format!("{op}: {big} bytes for one rank is over MPI's 2 GiB count limit");
            self.broken = Some((self.rank, detail.clone()));
            return Err(Error::InvalidArgument { arg: "message size".into(), reason: detail });
        }
        Ok(all)
    }
}

/// Displacements of consecutive parts of `counts` bytes (whose sum fits in `i32`: checked by `gather_sizes`).
fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}

/// `len` zero bytes in their own allocation, even when `len` is 0: MPI refuses a send
/// buffer equal to the receive buffer, and every empty `Vec` has the same dangling pointer.
fn distinct_buffer(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(1));
    v.resize(len, 0);
    v
}

/// Split `buf` into consecutive parts of `counts` bytes.
fn split(buf: &[u8], counts: &[i32]) -> Vec<Vec<u8>> {
    let mut at = 0;
    counts
        .iter()
        .map(|&c| {
            let part = buf[at..at + c as usize].to_vec();
            at += c as usize;
            part
        })
        .collect()
}

impl ProcessGroup for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn hostnames(&self) -> &[String] {
        &self.hostnames
    }

    fn all_gather(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.meet("all_gather", timeout)?;
        let sizes = self.gather_sizes("all_gather", &[bytes.len() as u64], |all| vec![all.iter().sum()])?;
        let counts: Vec<i32> = sizes.iter().map(|&c| c as i32).collect();
        let displs = displacements(&counts);
        let mut buf = distinct_buffer(counts.iter().map(|&c| c as usize).sum());
        let mut recv = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
        self.world.all_gather_varcount_into(bytes, &mut recv);
        Ok(split(&buf, &counts))
    }

    fn all_to_all(&mut self, parts: &[Vec<u8>], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        if parts.len() != self.size {
            let reason = format!("{} parts for a group of {}", parts.len(), self.size);
            return Err(Error::InvalidArgument { arg: "parts".into(), reason });
        }
        self.meet("all_to_all", timeout)?;
        let lens: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
        let n = self.size;
        // `[source][destination]` bytes; every rank's send and receive totals must fit.
        let sums = |m: &[u64]| -> Vec<u64> {
            let rows = (0..n).map(|s| m[s * n..(s + 1) * n].iter().sum());
            rows.chain((0..n).map(|d| (0..n).map(|s| m[s * n + d]).sum())).collect()
        };
        let matrix = self.gather_sizes("all_to_all", &lens, sums)?;
        let send_counts: Vec<i32> = lens.iter().map(|&c| c as i32).collect();
        let recv_counts: Vec<i32> = (0..n).map(|src| matrix[src * n + self.rank] as i32).collect();
        let (send_displs, recv_displs) = (displacements(&send_counts), displacements(&recv_counts));
        let mut send_buf = distinct_buffer(0);
        parts.iter().for_each(|p| send_buf.extend_from_slice(p));
        let mut recv_buf = distinct_buffer(recv_counts.iter().map(|&c| c as usize).sum());
        let send = Partition::new(&send_buf[..], &send_counts[..], &send_displs[..]);
        let mut recv = PartitionMut::new(&mut recv_buf[..], &recv_counts[..], &recv_displs[..]);
        self.world.all_to_all_varcount_into(&send, &mut recv);
        Ok(split(&recv_buf, &recv_counts))
    }

    fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.meet("barrier", timeout)
    }

    fn transport(&self) -> &'static str {
        "mpi"
    }
}
