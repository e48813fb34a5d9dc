//! Peer mapping of the communication buffers, and the host-side agreement step.
//!
//! This milestone runs the ranks of a node as threads of one process: buffers are
//! mapped with `cuCtxEnablePeerAccess` and their (unified) addresses are valid in
//! every context as they are. One process per GPU will swap `map_in_process` for
//! CUDA IPC handles exchanged through the bootstrap; nothing else has to change.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::driver::{DeviceBuffer, Gpu};
use super::layout::MAX_WORLD;
use crate::error::{Error, Result, Role, WaitDiagnostic};

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

/// In-process all-gather of each rank's "may I go on" status before a collective
/// launches anything, so bad input on one rank fails every rank instead of leaving
/// the others spinning until their deadline.
pub struct HostGroup {
    world: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
}

struct GroupState {
    generation: u64,
    arrived: usize,
    pending: Vec<Option<String>>,
    last: Vec<Option<String>>,
}

impl HostGroup {
    /// A group of `world` ranks.
    pub fn new(world: usize) -> Self {
        Self {
            world,
            state: Mutex::new(GroupState { generation: 0, arrived: 0, pending: vec![None; world], last: vec![None; world] }),
            cv: Condvar::new(),
        }
    }

    /// Contribute `failure` (None: ok) and wait for every rank's, up to `timeout`.
    /// Returns every rank's failure text, in rank order.
    pub fn gather(&self, rank: usize, failure: Option<String>, timeout: Duration) -> Result<Vec<Option<String>>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.state.lock().map_err(|_| Error::Protocol { rank, detail: "host group lock poisoned".into() })?;
        let gen = g.generation;
        g.pending[rank] = failure;
        g.arrived += 1;
        if g.arrived == self.world {
            g.last = std::mem::replace(&mut g.pending, vec![None; self.world]);
            g.arrived = 0;
            g.generation += 1;
            self.cv.notify_all();
            return Ok(g.last.clone());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    timeout_ms: timeout.as_millis() as u64,
                    diag: WaitDiagnostic {
                        rank,
                        channel: 0,
                        role: Role::Notify,
                        head: g.arrived as u64,
                        tail: self.world as u64,
                        detail: "host agreement: not every rank entered the collective call".into(),
                    },
                });
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map_err(|_| Error::Protocol { rank, detail: "host group lock poisoned".into() })?
                .0;
            if g.generation != gen {
                return Ok(g.last.clone());
            }
        }
    }
}

/// Turn the gathered statuses into this rank's result: its own error first, else the
/// first failing peer's as [`Error::PeerFailed`].
pub fn settle(rank: usize, own: Option<Error>, all: &[Option<String>]) -> Result<()> {
    if let Some(e) = own {
        return Err(e);
    }
    match all.iter().enumerate().find(|(r, f)| *r != rank && f.is_some()) {
        Some((r, f)) => Err(Error::PeerFailed { rank: r, reason: f.clone().unwrap_or_default() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn gather_collects_every_rank_and_repeats() {
        let g = Arc::new(HostGroup::new(3));
        for round in 0..3 {
            let outs: Vec<_> = (0..3)
                .map(|r| {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let f = (r == 1 && round == 1).then(|| "bad".to_string());
                        g.gather(r, f, Duration::from_secs(5)).unwrap()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            for o in &outs {
                assert_eq!(o[1].is_some(), round == 1);
                assert!(o[0].is_none() && o[2].is_none());
            }
            if round == 1 {
                assert!(matches!(settle(0, None, &outs[0]), Err(Error::PeerFailed { rank: 1, .. })));
                assert!(settle(1, Some(Error::Cuda("x".into())), &outs[1]).is_err());
            }
        }
    }

    #[test]
    fn gather_times_out_when_a_rank_is_missing() {
        let g = HostGroup::new(2);
        let e = g.gather(0, None, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, Error::Timeout { diag: WaitDiagnostic { rank: 0, head: 1, tail: 2, .. }, .. }), "{e:?}");
    }
}
