//! Backends: one per-rank endpoint trait, implemented by the CPU reference backend
//! (and by the CUDA backend).

mod checks;
pub mod cpu;
pub mod cuda;
pub mod hier;

use half::bf16;

use crate::config::Config;
use crate::error::Result;
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{Rows, RowsRef};
use crate::topology::Topology;

/// Options of a dispatch call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DispatchOptions {
    /// Take BF16 input and send FP8 (E4M3, 1x128 scales) on the wire, quantized
    /// inside dispatch; the received rows are FP8. No effect on FP8 input.
    pub fp8_on_wire: bool,
    /// Round each local expert's received-token count up to a multiple of this
    /// (0 or 1: no rounding), for grouped GEMMs that want aligned segments.
    pub expert_alignment: usize,
}

/// What one rank receives from a dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchOutput {
    /// `[R, H]` received rows (with scales if FP8), ordered by (source rank, source token).
    pub x: Rows,
    /// `[R, k]` expert ids translated to this rank's local ids; -1 for experts on other ranks.
    pub topk_idx: Vec<i64>,
    /// `[R, k]` gate weights; 0 where `topk_idx` is -1.
    pub topk_weights: Vec<f32>,
    /// `[experts per rank]` received tokens per local expert, rounded up to `expert_alignment`.
    pub tokens_per_expert: Vec<usize>,
    /// `[R]` rank each row came from.
    pub source_rank: Vec<u32>,
    /// `[R]` index of each row's token on its source rank.
    pub source_token: Vec<u32>,
}

/// What one rank gets back from a combine.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineOutput {
    /// `[T, H]`: for each of this rank's tokens, the f32 sum of the rows that
    /// came back for it, rounded to BF16 (zero for a token sent nowhere). Across
    /// nodes, each node's partial sum is rounded to BF16 once before it crosses
    /// the inter-node hop (see [`crate::conformance`] for the resulting bound).
    pub x: Vec<bf16>,
    /// `[T, k]` summed weights, when weights were passed to combine.
    pub topk_weights: Option<Vec<f32>>,
}

/// Rows and bytes that crossed one hop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HopCount {
    /// Rows (token vectors).
    pub rows: u64,
    /// Bytes: payload, scales and per-row metadata.
    pub bytes: u64,
}

impl HopCount {
    pub(crate) fn add(&mut self, bytes: usize) {
        self.rows += 1;
        self.bytes += bytes as u64;
    }
}

impl std::ops::AddAssign for HopCount {
    fn add_assign(&mut self, o: Self) {
        self.rows += o.rows;
        self.bytes += o.bytes;
    }
}

/// Traffic one rank put on each hop during one kind of operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Rows this rank sent over the inter-node hop (to rail peers on other nodes).
    pub inter_node: HopCount,
    /// `[num_nodes]` inter-node rows this rank sent to each node.
    pub inter_node_rows_to_node: Vec<u64>,
    /// Rows this rank sent to other ranks of its node (its own and forwarded ones).
    pub intra_node: HopCount,
    /// Rows this rank delivered to itself.
    pub local: HopCount,
}

impl Traffic {
    /// Zero counters for a topology.
    pub fn new(topology: Topology) -> Self {
        Self { inter_node_rows_to_node: vec![0; topology.num_nodes], ..Default::default() }
    }

    /// Add another rank's (or call's) counters.
    pub fn accumulate(&mut self, o: &Traffic) {
        self.inter_node += o.inter_node;
        self.intra_node += o.intra_node;
        self.local += o.local;
        if self.inter_node_rows_to_node.len() < o.inter_node_rows_to_node.len() {
            self.inter_node_rows_to_node.resize(o.inter_node_rows_to_node.len(), 0);
        }
        for (a, b) in self.inter_node_rows_to_node.iter_mut().zip(&o.inter_node_rows_to_node) {
            *a += b;
        }
    }
}

/// Cumulative traffic of one rank, by operation (since creation or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrafficLog {
    /// Dispatch and cached dispatch.
    pub dispatch: Traffic,
    /// Combine.
    pub combine: Traffic,
}

/// One rank's endpoint of an expert-parallel group.
///
/// Every method that moves data is collective: all ranks of the group must call
/// it, in the same order, with consistent arguments (same `topk`, `num_experts`,
/// hidden size and dtype on every rank). Inputs are validated before any data
/// moves; a rank with bad input makes every rank of the call fail with an error
/// (its own typed error there, [`Error::PeerFailed`](crate::Error::PeerFailed) elsewhere).
/// An op that [`Communicator::time_device_resident`] can repeat on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidentOp {
    /// Cached dispatch of `inputs.x` with `inputs.handle`.
    DispatchCached,
    /// Combine of `inputs.y` (one BF16 row per received row) with `inputs.handle`, no weights.
    Combine,
}

/// Inputs of [`Communicator::time_device_resident`]; uploaded once, before the timed calls.
#[derive(Debug, Clone, Copy)]
pub struct ResidentInputs<'a> {
    /// Rows to dispatch.
    pub x: RowsRef<'a>,
    /// Expert outputs to combine, `[received rows, hidden]`.
    pub y: &'a [bf16],
    /// Elements per row.
    pub hidden: usize,
    /// The handle of an earlier dispatch of `x`.
    pub handle: &'a Handle,
    /// Dispatch options.
    pub options: &'a DispatchOptions,
    /// Capture one call in a CUDA graph and replay it `iters` times, instead of
    /// launching each call's kernels from the host (CUDA; ignored elsewhere).
    pub graph: bool,
}

/// What [`Communicator::measure_interference`] measured: medians over the timed
/// iterations, in microseconds, on this rank.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interference {
    /// The GEMM.
    pub gemm: cuda::gemm::GemmShape,
    /// Channels (SMs) of the cached dispatch and of the combine.
    pub channels: [usize; 2],
    /// SMs the GEMM may use beside the communication (the GPU's less the larger channel count).
    pub gemm_sms: usize,
    /// One GEMM with nothing else running, on every SM.
    pub gemm_alone_us: f64,
    /// One GEMM with nothing else running, on `gemm_sms` SMs.
    pub gemm_left_us: f64,
    /// One GEMM on `gemm_sms` SMs while dispatch and combine run.
    pub gemm_together_us: f64,
    /// One cached dispatch followed by one combine, nothing else running.
    pub comm_alone_us: f64,
    /// The same pair while GEMMs run on another stream.
    pub comm_together_us: f64,
}

/// Every rank's outcome of a step that may fail, gathered (collective; small messages):
/// each rank's value in rank order when every rank succeeded, else the first rank that
/// failed and its reason. A message that does not parse is a protocol error. Sending a
/// failure through the gather, rather than returning early, keeps the others from
/// waiting for a message that never comes.
pub(crate) fn gather_outcomes<T: serde::Serialize + serde::de::DeserializeOwned>(
    comm: &mut dyn Communicator,
    mine: std::result::Result<&T, String>,
) -> Result<std::result::Result<Vec<T>, (usize, String)>> {
    let me = comm.rank();
    gather_outcomes_by(me, |bytes| comm.all_gather_bytes(bytes), mine)
}

/// [`gather_outcomes`] through any all-gather of bytes (`me`: this rank, for errors), for
/// groups that are not yet a [`Communicator`].
pub(crate) fn gather_outcomes_by<T: serde::Serialize + serde::de::DeserializeOwned>(
    me: usize,
    all_gather: impl FnOnce(&[u8]) -> Result<Vec<Vec<u8>>>,
    mine: std::result::Result<&T, String>,
) -> Result<std::result::Result<Vec<T>, (usize, String)>> {
    let all = all_gather(&serde_json::to_vec(&mine).expect("outcome serializes"))?;
    let mut values = Vec::with_capacity(all.len());
    for (r, b) in all.iter().enumerate() {
        let got: std::result::Result<T, String> = serde_json::from_slice(b)
            .map_err(|e| crate::Error::Protocol { rank: me, detail: format!("rank {r} sent an unreadable message: {e}") })?;
        match got {
            Ok(v) => values.push(v),
            Err(reason) => return Ok(Err((r, reason))),
        }
    }
    Ok(Ok(values))
}

pub trait Communicator: Send {
    /// Backend name ("cpu", "cuda").
    fn backend_name(&self) -> &'static str;
    /// This rank's index.
    fn rank(&self) -> usize;
    /// The group's topology.
    fn topology(&self) -> Topology;
    /// The configuration in force.
    fn config(&self) -> &Config;

    /// Send every token of `x` once to each rank that hosts one of its experts.
    /// `topk_idx`/`topk_weights` are `[T, k]`; `layout` is `Layout::new` of `topk_idx`.
    fn dispatch(
        &mut self,
        x: RowsRef<'_>,
        topk_idx: &[i64],
        topk_weights: &[f32],
        layout: &Layout,
        options: &DispatchOptions,
    ) -> Result<(DispatchOutput, Handle)>;

    /// Dispatch new rows along the routing of an earlier dispatch, skipping the
    /// layout and all counting. Returns the received rows, in the same order.
    fn dispatch_cached(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<Rows>;

    /// Send one BF16 row per received row (`y`: `[R, H]`) back to its source and sum
    /// them per token in f32. With `topk_weights` (`[R, k]`) the weights are summed back too.
    fn combine(&mut self, y: &[bf16], hidden: usize, handle: &Handle, topk_weights: Option<&[f32]>) -> Result<CombineOutput>;

    /// Replace the config the next calls run with. Collective: every rank calls it
    /// with the same config; if the ranks ask for different ones, or one cannot take
    /// it (invalid, or past this backend's limits), every rank fails and keeps its
    /// old config. Handles made under the old config keep working.
    fn set_config(&mut self, config: Config) -> Result<()>;

    /// Block until every rank has reached the barrier (with the configured deadline).
    fn barrier(&mut self) -> Result<()>;

    /// Traffic counters of this rank.
    fn traffic(&self) -> &TrafficLog;

    /// Zero the traffic counters.
    fn reset_traffic(&mut self);

    /// Host all-gather of a small message (results, diagnostics) among the ranks of
    /// this group: every rank's bytes, in rank order. Collective; not for row data.
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Time `iters` back-to-back calls of `op` with every input already in device
    /// memory and no host step between calls, the way a model on the GPU calls them;
    /// returns each call's device time in seconds, in call order (the same calls on
    /// every rank). Collective. The host-slice calls copy through the host around
    /// every call, which idles the GPU and the links between calls. `None`: the
    /// backend has no device (callers time the host-slice calls instead).
    fn time_device_resident(&mut self, _op: ResidentOp, _inputs: &ResidentInputs<'_>, _iters: usize) -> Option<Result<Vec<f64>>> {
        None
    }

    /// The same-run NCCL baseline: time `iters` grouped NCCL send/recv exchanges (to and
    /// from every rank, itself included) of the bytes a cached dispatch along `handle`
    /// moves with `row_bytes[0]`-byte rows, then of the bytes the combine moves back with
    /// `row_bytes[1]`-byte rows; seconds per exchange, `[dispatch, combine]`. Collective.
    /// On several nodes: the inter-node hop alone, NCCL on the rail with the bytes the
    /// rail carries. `None`: the backend (or its rail) has no NCCL.
    fn time_nccl_exchange(&mut self, _handle: &Handle, _row_bytes: [usize; 2], _iters: usize) -> Option<Result<[Vec<f64>; 2]>> {
        None
    }

    /// How dispatch and combine and the expert computation slow each other down:
    /// `iters` pairs of (cached dispatch, combine) of `inputs` back to back, with
    /// `channels` = [dispatch, combine] SMs, alone; a cuBLAS BF16 GEMM of `gemm` on
    /// another stream, alone on every SM and alone on the SMs the communication leaves;
    /// then both at once, the GEMM on the SMs left (enough GEMMs to cover the pairs,
    /// which start once the GEMMs run).
    /// Collective. The results of these calls are not kept (their inputs share
    /// buffer space). `None`: the backend has no device.
    fn measure_interference(
        &mut self,
        _inputs: &ResidentInputs<'_>,
        _gemm: cuda::gemm::GemmShape,
        _channels: [usize; 2],
        _iters: usize,
    ) -> Option<Result<Interference>> {
        None
    }

    /// Device time of the last data-moving call's kernels in microseconds (CUDA
    /// events around each launch, host reads between them excluded); `None` on
    /// backends without a device.
    fn device_time_us(&self) -> Option<f64> {
        None
    }

    /// `[inter-node transfer, node-local op]` device seconds of each call since the last
    /// take (host calls and device-resident ones), for communicators with two hops whose
    /// both parts are timed on the device; empty otherwise.
    fn take_hop_seconds(&mut self) -> Vec<[f64; 2]> {
        Vec::new()
    }

    /// This communicator as `Any`, for a backend to reach its own type inside a
    /// composite one (the CUDA backend's node ranks inside a hierarchical rank).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }

    /// Hand back rows this communicator returned (received rows of a dispatch or
    /// cached dispatch) once you are done with them, so the next dispatch reuses
    /// their memory instead of mapping and page-faulting tens of MB afresh.
    /// Optional; the default drops them.
    fn recycle_rows(&mut self, rows: Rows) {
        drop(rows);
    }
}
