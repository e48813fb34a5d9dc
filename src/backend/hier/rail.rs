//! The inter-node hop: how a rank's bytes reach its rail peers (the ranks with the
//! same local index on the other nodes). Through the process group on the host
//! ([`GroupRail`], any backend), or through NCCL on device buffers (the CUDA backend's
//! `NcclExchange`, which drives the NICs on a cluster).

use std::time::Duration;

use crate::bootstrap::ProcessGroup;
use crate::error::Result;
use crate::topology::Topology;

/// Where a rank sits on its rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailPlace {
    /// The group's nodes and ranks per node.
    pub topology: Topology,
    /// This rank in the group.
    pub rank: usize,
}

impl RailPlace {
    /// This rank's node, which is also its rank on its rail.
    pub fn node(&self) -> usize {
        self.topology.node_of(self.rank)
    }

    /// The rail's index: this rank's local index in its node.
    pub fn local(&self) -> usize {
        self.topology.local_of(self.rank)
    }
}

/// One rank's end of its rail.
pub trait Rail: Send {
    /// For logs and results ("host", "nccl").
    fn name(&self) -> &'static str;

    /// Send `parts[n]` to the rail peer on node `n` (this node's part is empty and
    /// stays here) and return what each rail peer sent this rank, by node. `world` is
    /// the whole process group, for rails that go through it. Collective over all
    /// ranks of the group; waits at most `timeout`.
    fn exchange(&mut self, world: &mut dyn ProcessGroup, parts: Vec<Vec<u8>>, timeout: Duration) -> Result<Vec<Vec<u8>>>;

    /// This rail as `Any`, for a backend's device path to reach its own rail type.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;

    /// Seconds the network transfer of the last [`Rail::exchange`] took on the device
    /// (the rows only, not the count exchange or any staging), when the rail can time it.
    fn last_transfer_seconds(&self) -> Option<f64> {
        None
    }

    /// The same-run baseline of the hop: `iters` plain transfers (after warm-up) that
    /// send `send_bytes[n]` to and receive `recv_bytes[n]` from the rail peer on each
    /// node, each timed on the device; seconds per transfer. `None`: no device timing.
    /// Collective over the rail.
    fn time_raw(&mut self, _send_bytes: &[usize], _recv_bytes: &[usize], _iters: usize) -> Option<Result<Vec<f64>>> {
        None
    }
}

/// The rail through the process group's personalized exchange on the host (MPI, or
/// the TCP rendezvous): every rank takes part, each sends only to its rail peers.
pub struct GroupRail {
    place: RailPlace,
}

impl GroupRail {
    /// The rail of `place`.
    pub fn new(place: RailPlace) -> Self {
        Self { place }
    }
}

impl Rail for GroupRail {
    fn name(&self) -> &'static str {
        "host"
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn exchange(&mut self, world: &mut dyn ProcessGroup, parts: Vec<Vec<u8>>, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let (topo, local) = (self.place.topology, self.place.local());
        let mut full = vec![Vec::new(); topo.world()];
        for (n, p) in parts.into_iter().enumerate() {
            full[topo.rank_of(n, local)] = p;
        }
        let mut got = world.all_to_all(&full, timeout)?;
        Ok((0..topo.num_nodes).map(|n| std::mem::take(&mut got[topo.rank_of(n, local)])).collect())
    }
}
