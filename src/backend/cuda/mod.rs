//! CUDA backend (intra-node, one process, one thread per GPU).
pub mod compile;
