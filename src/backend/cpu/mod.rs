//! CPU reference backend: threads as ranks, grouped into emulated nodes (being written).

use half::bf16;

use crate::backend::{CombineOutput, Communicator, DispatchOptions, DispatchOutput, TrafficLog};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{Rows, RowsRef};
use crate::topology::Topology;

/// A group of CPU ranks sharing memory; split it into per-rank endpoints with [`CpuCluster::into_ranks`].
pub struct CpuCluster {
    topology: Topology,
    config: Config,
}

impl CpuCluster {
    /// A group of `topology.world()` ranks.
    pub fn new(topology: Topology, config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self { topology, config })
    }

    /// One endpoint per rank, in rank order; move each to its own thread.
    pub fn into_ranks(self) -> Vec<CpuRank> {
        (0..self.topology.world()).map(|rank| CpuRank { rank, topology: self.topology, config: self.config.clone(), traffic: TrafficLog::default() }).collect()
    }
}

/// One rank of a [`CpuCluster`].
pub struct CpuRank {
    rank: usize,
    topology: Topology,
    config: Config,
    traffic: TrafficLog,
}

impl Communicator for CpuRank {
    fn backend_name(&self) -> &'static str { "cpu" }
    fn rank(&self) -> usize { self.rank }
    fn topology(&self) -> Topology { self.topology }
    fn config(&self) -> &Config { &self.config }
    fn dispatch(&mut self, _x: RowsRef<'_>, _i: &[i64], _w: &[f32], _l: &Layout, _o: &DispatchOptions) -> Result<(DispatchOutput, Handle)> {
        Err(Error::BackendUnavailable { backend: "cpu", reason: "being written".into() })
    }
    fn dispatch_cached(&mut self, _x: RowsRef<'_>, _h: &Handle, _o: &DispatchOptions) -> Result<Rows> {
        Err(Error::BackendUnavailable { backend: "cpu", reason: "being written".into() })
    }
    fn combine(&mut self, _y: &[bf16], _hidden: usize, _h: &Handle, _w: Option<&[f32]>) -> Result<CombineOutput> {
        Err(Error::BackendUnavailable { backend: "cpu", reason: "being written".into() })
    }
    fn barrier(&mut self) -> Result<()> { Ok(()) }
    fn traffic(&self) -> &TrafficLog { &self.traffic }
    fn reset_traffic(&mut self) { self.traffic = TrafficLog::default(); }
}
