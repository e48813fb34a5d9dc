//! How the ranks of a group find each other and agree: all-gather and barrier
//! with deadlines. `threads`: ranks that are threads of one process (the CPU
//! backend's ranks, and the CUDA backend's one-process-per-node mode).
//! [`LaunchEnv`] and [`TcpGroup`]: ranks that are separate processes (one per GPU),
//! started by torchrun, mpirun, a PMI launcher or srun, meeting over TCP at rank 0.

mod env;
mod tcp;
pub(crate) mod threads;
mod wire;

pub use env::{LaunchEnv, Launcher, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT};
pub use tcp::TcpGroup;
