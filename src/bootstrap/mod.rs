//! How the ranks of a group find each other and agree: all-gather and barrier
//! with deadlines. `threads`: ranks that are threads of one process (the CPU
//! backend's ranks, and the CUDA backend's one-process-per-node mode).

pub(crate) mod threads;
