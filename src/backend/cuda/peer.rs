//! Peer mapping of the communication buffers, and the host-side agreement step.
//!
//! This milestone runs the ranks of a node as threads of one process: buffers are
//! mapped with `cuCtxEnablePeerAccess` and their (unified) addresses are valid in
//! every context as they are. One process per GPU will swap `map_in_process` for
//! CUDA IPC handles exchanged through the bootstrap; nothing else has to change.

use super::driver::{DeviceBuffer, Gpu};
use super::layout::MAX_WORLD;
use crate::error::{Error, Result};

/// Every rank's buffer base, as seen from any rank of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerMap {
    /// Base address per rank (unused entries 0).
    pub bases: [u64; MAX_WORLD],
}

/// Enable peer access between every pair of GPUs and collect the buffer addresses.
pub fn map_in_process(gpus: &[Gpu], buffers: &[DeviceBuffer]) -> Result<PeerMap> {
    if gpus.len() > MAX_WORLD || gpus.len() != buffers.len() {
        return Err(Error::InvalidArgument {
            arg: "num_gpus".into(),
            reason: format!("{} GPUs: 1..={MAX_WORLD} supported", gpus.len()),
        });
    }
    for a in gpus {
        for b in gpus {
            if a.ordinal() == b.ordinal() {
                continue;
            }
            if !a.can_access_peer(b)? {
                return Err(Error::BackendUnavailable {
                    backend: "cuda",
                    reason: format!("GPU {} cannot access GPU {} (no NVLink/P2P path)", a.ordinal(), b.ordinal()),
                });
            }
            a.enable_peer_access(b)?;
        }
    }
    let mut map = PeerMap::default();
    for (i, b) in buffers.iter().enumerate() {
        map.bases[i] = b.ptr();
    }
    tracing::debug!(?map, "peer buffers mapped in process");
    Ok(map)
}

/// The outcome of the host agreement step for `rank`: its own error if it had
/// one, else `PeerFailed` naming the first other rank that reported a failure.
/// `all` holds every rank's failure text (`None`: ready), from the group's all-gather.
pub fn settle(rank: usize, own: Option<Error>, all: &[Option<String>]) -> Result<()> {
    if let Some(e) = own {
        return Err(e);
    }
    match all.iter().enumerate().find_map(|(r, f)| (r != rank).then(|| f.clone()).flatten().map(|f| (r, f))) {
        Some((rank, reason)) => Err(Error::PeerFailed { rank, reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_error_first_then_the_first_failed_peer() {
        let all = vec![None, Some("bad x".to_string()), None];
        assert!(matches!(settle(0, None, &all), Err(Error::PeerFailed { rank: 1, .. })));
        assert!(matches!(settle(1, Some(Error::Cuda("x".into())), &all), Err(Error::Cuda(_))));
        let fine = vec![None, None];
        assert!(settle(0, None, &fine).is_ok());
    }
}
