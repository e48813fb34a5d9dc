//! How the ranks of a group find each other and agree: all-gather and barrier
//! with deadlines. `threads`: ranks that are threads of one process (the CPU
//! backend's ranks, and the CUDA backend's one-process-per-node mode).
//! [`LaunchEnv`] and [`ProcessGroup`]: ranks that are separate processes, started by
//! torchrun, mpirun, a PMI launcher or srun, meeting over TCP at rank 0
//! ([`TcpGroup`]) or, with the `mpi` feature under an MPI launcher, through MPI
//! ([`MpiGroup`]).

mod env;
#[cfg(feature = "mpi")]
mod mpi;
mod split;
mod tcp;
pub(crate) mod threads;
mod wire;

use std::time::Duration;

use crate::error::Result;

pub use env::{LaunchEnv, Launcher, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT};
#[cfg(feature = "mpi")]
pub use mpi::MpiGroup;
pub use split::SharedGroup;
pub use tcp::TcpGroup;

/// A group of processes, one rank each, that exchange bytes collectively. Every
/// call is collective (every rank makes the same calls in the same order) and
/// waits at most `timeout`; after a failure the group stays broken and every
/// later call fails at once.
pub trait ProcessGroup: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's host (ranks on one host share memory), in rank order.
    fn hostnames(&self) -> &[String];
    /// Every rank's `bytes`, in rank order (lengths may differ).
    fn all_gather(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>>;
    /// `parts[r]` goes to rank `r`; returns what every rank sent this one, in rank order.
    fn all_to_all(&mut self, parts: &[Vec<u8>], timeout: Duration) -> Result<Vec<Vec<u8>>>;
    /// Return once every rank has called it.
    fn barrier(&mut self, timeout: Duration) -> Result<()>;
    /// Which transport this is, for logs ("tcp", "mpi").
    fn transport(&self) -> &'static str;
}

impl ProcessGroup for TcpGroup {
    fn rank(&self) -> usize {
        TcpGroup::rank(self)
    }
    fn world_size(&self) -> usize {
        TcpGroup::world_size(self)
    }
    fn hostnames(&self) -> &[String] {
        TcpGroup::hostnames(self)
    }
    fn all_gather(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        TcpGroup::all_gather(self, bytes, timeout)
    }
    fn all_to_all(&mut self, parts: &[Vec<u8>], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        TcpGroup::all_to_all(self, parts, timeout)
    }
    fn barrier(&mut self, timeout: Duration) -> Result<()> {
        TcpGroup::barrier(self, timeout)
    }
    fn transport(&self) -> &'static str {
        "tcp"
    }
}

/// Processes of a job start seconds apart (CUDA initialization alone takes
/// seconds): a rendezvous waits at least this long.
pub const RENDEZVOUS_MIN: Duration = Duration::from_secs(60);

/// This process's group under the launcher that started it: through MPI when built
/// with the `mpi` feature and started by an MPI launcher (mpirun, a PMI launcher,
/// srun), otherwise the TCP rendezvous at `MASTER_ADDR:MASTER_PORT`. The rendezvous
/// waits `timeout`, and at least [`RENDEZVOUS_MIN`].
pub fn join_launched(env: &LaunchEnv, timeout: Duration) -> Result<Box<dyn ProcessGroup>> {
    let timeout = timeout.max(RENDEZVOUS_MIN);
    #[cfg(feature = "mpi")]
    if env.launcher != Launcher::Torchrun {
        return Ok(Box::new(MpiGroup::init(env, timeout)?));
    }
    Ok(Box::new(TcpGroup::from_env(env, timeout)?))
}
