//! Benchmark harness shared by `switchyard bench` and tests: runs dispatch,
//! cached dispatch and combine on every rank of a group, times them the way
//! nccl-tests does, counts the bytes that crossed each hop, measures memcpy in
//! the same run as a reference, optionally checks every result against the
//! serial [`oracle`](crate::oracle), and holds the results schema (`--json`).
//!
//! # Definitions
//! - **Iteration time**: all ranks pass a `barrier()`, each rank times its own
//!   call; the iteration's time is the maximum over ranks. Reported: min, median
//!   and max over the timed iterations (warm-up iterations are not timed).
//!   Device-resident ops ([`Communicator::time_device_resident`]) pass one
//!   barrier, then each rank enqueues every call back to back; iteration i's
//!   time is the maximum over ranks of call i's device time.
//! - **Logical bytes** (per iteration, summed over all ranks): bytes of the rows
//!   delivered to receivers, local ones included. Dispatch: received rows x row
//!   bytes (FP8 rows include their f32 scales). Combine: rows sent back x BF16
//!   row bytes.
//! - **Physical bytes per hop** (per iteration, summed over all ranks): the
//!   bytes the backend's [`traffic`](crate::Communicator::traffic) counters say
//!   crossed the inter-node hop and the intra-node hop (payload, scales and
//!   per-row metadata), counted over the timed loop and divided by its
//!   iterations.
//! - **GB/s** = bytes / median iteration time / 1e9, aggregated over all ranks
//!   of the group.
//! - **memcpy GB/s**: every rank's thread copies, in parallel, as many bytes as
//!   its share of the largest op's logical bytes, between buffers larger than
//!   the caches; bytes are counted once per copy; same timing rule.
//! - **ratio to memcpy** = op logical GB/s / memcpy GB/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use half::bf16;

use crate::backend::cpu::CpuCluster;
use crate::backend::cuda::gemm::GemmShape;
use crate::backend::{CombineOutput, Communicator, DispatchOptions, DispatchOutput, Interference, ResidentInputs, ResidentOp};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::routing::Layout;
use crate::tensor::{DType, Rows};
use crate::topology::Topology;
use crate::workload::{self, RankInput, RoutingKind, WorkloadSpec};

/// Version of the results JSON schema written by `switchyard bench --json`.
pub const SCHEMA_VERSION: u32 = 1;

/// Minimum size of each memcpy buffer, so the copy streams from memory, not cache.
pub const MEMCPY_MIN_BUFFER_BYTES: usize = 32 << 20;

/// An operation the bench times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// [`Communicator::dispatch`] (layout computed beforehand, outside the timing).
    Dispatch,
    /// [`Communicator::dispatch_cached`] with the handle of an earlier dispatch.
    DispatchCached,
    /// [`Communicator::combine`] of one BF16 row per received row, without weights.
    Combine,
}

impl Op {
    /// Every op, in the order the bench runs and prints them.
    pub const ALL: [Op; 3] = [Op::Dispatch, Op::DispatchCached, Op::Combine];

    /// Name as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Op::Dispatch => "dispatch",
            Op::DispatchCached => "dispatch-cached",
            Op::Combine => "combine",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSpec {
    /// Inputs of every rank (topology, shape, dtype, routing, seed).
    pub workload: WorkloadSpec,
    /// The config of each op.
    pub configs: OpConfigs,
    /// Untimed iterations per op before the timed ones.
    pub warmup: usize,
    /// Timed iterations per op (>= 1).
    pub iters: usize,
    /// After timing, run each op once more and compare with the oracle.
    pub check: bool,
    /// Dispatch options (FP8 on the wire for BF16 input, expert alignment).
    pub options: DispatchOptions,
    /// Also measure the interference with a GEMM (device backends only).
    pub interference: Option<InterferenceSpec>,
    /// Also time a grouped NCCL send/recv of the same bytes (device backends only).
    pub nccl: bool,
    /// Time the device-resident ops as replays of one call captured in a CUDA graph
    /// (device backends only).
    pub graph: bool,
}

/// The same-run NCCL baseline of one op: a grouped send/recv of the bytes it moves.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NcclResult {
    /// The op whose bytes it moves (dispatch-cached or combine).
    pub op: Op,
    /// Row type of those bytes.
    pub dtype: DType,
    /// Per iteration the slowest rank's exchange time.
    pub time_us: TimeStats,
    /// The op's logical bytes / median time (the same bytes as the op's row).
    pub logical_gbps: f64,
    /// On several nodes: the baseline is the inter-node hop alone, on the rail's NCCL
    /// communicator, with the bytes the rail carries in the op (not the whole op's bytes).
    #[serde(default)]
    pub inter_node_hop: bool,
    /// On several nodes: this baseline's median / the median of the op's own rail transfer
    /// (the hop efficiency; 1 = the hop inside the op moves as fast as NCCL alone).
    #[serde(default)]
    pub hop_efficiency: Option<f64>,
    /// On several nodes: the op's median / the slower of the two hops measured alone (this
    /// baseline for the network, the node-local op's kernels for NVLink): 1 = fully overlapped,
    /// about 1 + faster/slower when the hops run one after the other.
    #[serde(default)]
    pub overlap: Option<f64>,
}

/// What [`Communicator::measure_interference`] runs in a bench.
#[derive(Debug, Clone, PartialEq)]
pub struct InterferenceSpec {
    /// The GEMM beside the communication.
    pub gemm: GemmShape,
    /// (cached dispatch, combine) pairs per measurement.
    pub iters: usize,
    /// Channel settings to measure, each `[dispatch, combine]`.
    pub settings: Vec<[usize; 2]>,
}

/// What a bench run brings back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// Per op.
    pub measurements: Vec<Measurement>,
    /// Per interference setting: the slowest rank's medians (empty when not asked for
    /// or the backend has no device).
    pub interference: Vec<Interference>,
    /// `[dispatch, combine]` NCCL exchange seconds, per iteration the max over ranks
    /// (`None` when not asked for or the backend has no NCCL).
    pub nccl_seconds: Option<[Vec<f64>; 2]>,
}

/// The config each op runs with: dispatch and cached dispatch share one (cached
/// dispatch follows the routing of a dispatch), combine has its own.
#[derive(Debug, Clone, PartialEq)]
pub struct OpConfigs {
    /// Dispatch and cached dispatch.
    pub dispatch: Config,
    /// Combine.
    pub combine: Config,
}

impl OpConfigs {
    /// The same config for every op.
    pub fn uniform(config: Config) -> Self {
        Self { dispatch: config.clone(), combine: config }
    }

    /// The config of `op`.
    pub fn of(&self, op: Op) -> &Config {
        match op {
            Op::Dispatch | Op::DispatchCached => &self.dispatch,
            Op::Combine => &self.combine,
        }
    }
}

/// Make `config` the communicator's if it is not already. Every rank has the same
/// config in force and asks for the same one, so all of them call the collective
/// [`Communicator::set_config`] or none does.
fn use_config(comm: &mut dyn Communicator, config: &Config) -> Result<()> {
    if comm.config() != config {
        comm.set_config(config.clone())?;
    }
    Ok(())
}

impl BenchSpec {
    /// Row type on the wire: FP8 when the input is FP8 or FP8 is asked for on the wire.
    pub fn wire_dtype(&self) -> DType {
        if self.options.fp8_on_wire {
            DType::Fp8
        } else {
            self.workload.dtype
        }
    }

    /// Progress steps of a run: every iteration of every op, plus one per op for the check.
    pub fn total_steps(&self) -> u64 {
        let per_op = (self.warmup + self.iters + usize::from(self.check)) as u64;
        per_op * Op::ALL.len() as u64
    }
}

/// Raw figures of one op, before they are turned into an [`OpResult`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    /// Which op.
    pub op: Op,
    /// Per timed iteration: the maximum over ranks of each rank's time, in seconds.
    pub iter_seconds: Vec<f64>,
    /// `[rank][iteration]` each rank's own time, in seconds.
    #[serde(default)]
    pub rank_seconds: Vec<Vec<f64>>,
    /// Logical bytes of one call, summed over ranks.
    pub logical_bytes: u64,
    /// Inter-node hop bytes of one call (traffic counters / iterations), summed over ranks.
    pub inter_node_bytes: f64,
    /// Intra-node hop bytes of one call, summed over ranks.
    pub intra_node_bytes: f64,
    /// `[nodes]` inter-node rows of one call into each node, summed over the sending ranks.
    #[serde(default)]
    pub inter_node_rows_to_node: Vec<f64>,
    /// Elements or rows that differ from the oracle; `None` without `check`.
    pub wrong: Option<u64>,
    /// Timed as back-to-back calls on device-resident inputs (see [`OpResult::device_resident`]).
    pub device_resident: bool,
    /// `[inter-node transfer, node-local op]` per iteration, the slowest rank's device
    /// seconds of each hop inside the op (two-hop communicators whose hops are timed).
    #[serde(default)]
    pub hop_seconds: Option<[Vec<f64>; 2]>,
}

/// Min, median and max over iterations, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimeStats {
    /// Fastest iteration.
    pub min: f64,
    /// Median iteration (mean of the two middle ones for an even count).
    pub median: f64,
    /// Slowest iteration.
    pub max: f64,
}

impl TimeStats {
    /// Statistics of samples given in seconds (reported in microseconds). Empty input gives zeros.
    pub fn from_seconds(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self { min: 0.0, median: 0.0, max: 0.0 };
        }
        let mut s: Vec<f64> = samples.iter().map(|x| x * 1e6).collect();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Self { min: s[0], median, max: s[n - 1] }
    }
}

/// The machine a report was taken on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    /// Host name.
    pub hostname: String,
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// Names of the GPUs the CUDA driver reports (empty without one).
    pub gpus: Vec<String>,
}

/// Problem shape of a result (per rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Tokens per rank.
    pub tokens: usize,
    /// Elements per token row.
    pub hidden: usize,
    /// Experts per token.
    pub topk: usize,
    /// Total experts.
    pub experts: usize,
}

/// Bandwidth per hop.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhysicalGbps {
    /// Bytes over the inter-node hop / median time.
    pub inter_node: f64,
    /// Bytes over the intra-node hop / median time.
    pub intra_node: f64,
}

/// The inter-node hop of one call: what routing (node-limited or not) costs the network.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Network {
    /// Inter-node rows per token of the group (all ranks' rows / all ranks' tokens): for
    /// dispatch, the other nodes a token goes to, on average (at most `--max-nodes` with
    /// node-limited routing); for combine, the summed rows coming back.
    pub rows_per_token: f64,
    /// Inter-node bytes per token of the group (rows with their metadata).
    pub bytes_per_token: f64,
    /// `[nodes]` inter-node rows into each node, summed over the ranks that send them.
    pub rows_to_node: Vec<f64>,
    /// The two hops inside the op, each timed on the device (per iteration the slowest
    /// rank's); `null` where the communicator does not time them (the host rail).
    #[serde(default)]
    pub hops: Option<HopTimes>,
}

/// Device times of the two hops inside a two-hop op.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HopTimes {
    /// The rail's transfer of the rows (NCCL, between rail peers), in microseconds.
    pub network_us: TimeStats,
    /// The node-local op's kernels (NVLink, inside each node), in microseconds.
    pub node_us: TimeStats,
}

/// One op's row of the results (one line of the table, one element of `results`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpResult {
    /// Which op.
    pub op: Op,
    /// Row type on the wire for dispatch (combine always moves BF16).
    pub dtype: DType,
    /// Backend that ran it ("cpu", "cuda").
    pub backend: String,
    /// Per-rank problem shape.
    pub shape: Shape,
    /// Nodes and ranks per node.
    pub topology: Topology,
    /// Routing rule of the workload.
    pub routing: RoutingKind,
    /// SMs used on a GPU; `null` on the CPU backend.
    pub num_sms: Option<u32>,
    /// Configuration in force.
    pub config: Config,
    /// Iteration times in microseconds.
    pub time_us: TimeStats,
    /// Logical bytes / median time, all ranks together, in GB/s (1e9 bytes/s).
    pub logical_gbps: f64,
    /// Physical bytes per hop / median time, all ranks together.
    pub physical_gbps: PhysicalGbps,
    /// `logical_gbps / memcpy_gbps` of the same run.
    pub ratio_to_memcpy: f64,
    /// `[rank]` each rank's own iteration times (the headline `time_us` takes the slowest
    /// rank per iteration).
    #[serde(default)]
    pub per_rank_us: Vec<TimeStats>,
    /// What one call put on the inter-node hop (the network); `null` on one node.
    #[serde(default)]
    pub network: Option<Network>,
    /// Mismatches with the oracle; `null` when not checked.
    pub wrong: Option<u64>,
    /// How the time was taken. `true`: `iters` calls back to back on inputs already in
    /// device memory, each call's device time (CUDA events), no host step between calls,
    /// the way a model on the GPU calls them. `false`: each call through the host-slice
    /// API after a barrier (on a GPU: the device time of its kernels, with the GPU and links
    /// idle between calls while the host copies inputs and outputs).
    #[serde(default)]
    pub device_resident: bool,
    /// Device-resident calls were replays of one call captured in a CUDA graph (`--graph`).
    #[serde(default)]
    pub graph: bool,
}

/// A whole results file (`switchyard bench --json FILE`), schema version [`SCHEMA_VERSION`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// Where it ran.
    pub machine: Machine,
    /// Git commit of the source, if known.
    pub commit: Option<String>,
    /// When it ran, ISO-8601 UTC (`2025-01-31T12:34:56Z`).
    pub date: String,
    /// memcpy bandwidth measured in the same run, GB/s, all ranks' threads together.
    pub memcpy_gbps: f64,
    /// One entry per op.
    pub results: Vec<OpResult>,
    /// The same-run NCCL grouped send/recv baseline (`bench --nccl`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nccl_sendrecv: Vec<NcclResult>,
    /// GEMM interference, one entry per channel setting (`bench --interference`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interference: Vec<Interference>,
}

/// Table lines (each starting with `#`) for interference results.
pub fn format_interference(rows: &[Interference]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let g = first.gemm;
    let mut s = format!(
        "# interference: BF16 GEMM {}x{}x{} (cuBLAS, another stream, limited to the SMs the communication leaves)\n\
         # beside back-to-back cached dispatch + combine; slowdown = with / alone (GEMM: alone on all SMs)\n\
         #   SMs (dispatch/combine/GEMM)  GEMM all SMs(us)  GEMM SMs left(us)  with comm(us)  slowdown  comm alone(us)  with GEMM(us)  slowdown\n",
        g.m, g.n, g.k
    );
    for r in rows {
        s += &format!(
            "#   {:>12}/{:>3}/{:<11} {:>16.1} {:>18.1} {:>14.1} {:>9.3} {:>15.1} {:>14.1} {:>9.3}\n",
            r.channels[0],
            r.channels[1],
            r.gemm_sms,
            r.gemm_alone_us,
            r.gemm_left_us,
            r.gemm_together_us,
            r.gemm_together_us / r.gemm_alone_us,
            r.comm_alone_us,
            r.comm_together_us,
            r.comm_together_us / r.comm_alone_us
        );
    }
    s
}

impl Report {
    /// Pretty JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("results serialize")
    }

    /// Parse JSON text, checking the schema version.
    pub fn from_json(text: &str) -> Result<Self> {
        let r: Report = serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument { arg: "results JSON".into(), reason: e.to_string() })?;
        if r.schema != SCHEMA_VERSION {
            return Err(Error::InvalidArgument {
                arg: "results JSON".into(),
                reason: format!("schema {} is not the supported version {SCHEMA_VERSION}", r.schema),
            });
        }
        Ok(r)
    }
}

/// What one rank's thread brings back.
struct RankRun {
    /// `[op][iter]` seconds.
    seconds: [Vec<f64>; 3],
    /// `[op]` logical bytes of one call on this rank.
    logical: [u64; 3],
    /// `[op]` (inter, intra) bytes over the timed loop.
    physical: [(u64, u64); 3],
    /// `[op][node]` inter-node rows into each node over the timed loop.
    network: [Vec<u64>; 3],
    /// Results of the extra checked calls.
    checked: Option<(DispatchOutput, Rows, CombineOutput, Vec<bf16>)>,
    /// `[op]` timed with device-resident inputs ([`Communicator::time_device_resident`]).
    resident: [bool; 3],
    /// Per interference setting.
    interference: Vec<Interference>,
    /// `[dispatch, combine]` NCCL exchange seconds per iteration.
    nccl: Option<[Vec<f64>; 2]>,
    /// `[op][iter]` the two hops' device seconds ([`Communicator::take_hop_seconds`]).
    hops: [Vec<[f64; 2]>; 3],
}

/// What a timed call returned; received rows go back to the communicator for reuse.
enum CallOutput {
    Rows(Rows),
    Other,
}

/// Barrier, then time one call on this rank (host clock, or the device time of
/// its kernels on a device backend). Its output is handed back
/// ([`Communicator::recycle_rows`]) or dropped after the clock stops.
fn time_call(
    comm: &mut dyn Communicator,
    f: &mut impl FnMut(&mut dyn Communicator) -> Result<CallOutput>,
) -> Result<(f64, Option<[f64; 2]>)> {
    comm.barrier()?;
    let t0 = Instant::now();
    let out = f(comm)?;
    // On a device, the op's time is its kernels' time (the host-slice API around
    // them copies inputs and outputs through the host, which a device caller does not).
    let dt = comm.device_time_us().map(|us| us * 1e-6).unwrap_or_else(|| t0.elapsed().as_secs_f64());
    if let CallOutput::Rows(rows) = out {
        comm.recycle_rows(rows);
    }
    Ok((dt, comm.take_hop_seconds().pop()))
}

fn run_rank(comm: &mut dyn Communicator, input: &RankInput, spec: &BenchSpec, step: &dyn Fn()) -> Result<RankRun> {
    let w = &spec.workload;
    let (k, hidden) = (w.topk, w.hidden);
    let layout = Layout::new(&input.topk_idx, k, w.num_experts, w.topology)?;
    let opts = spec.options;
    let x = input.x.as_ref();
    let mut seconds: [Vec<f64>; 3] = Default::default();
    let mut physical = [(0u64, 0u64); 3];
    let mut network: [Vec<u64>; 3] = Default::default();
    let mut resident = [false; 3];
    let mut hops: [Vec<[f64; 2]>; 3] = Default::default();

    // The dispatch whose output and handle the other ops use.
    use_config(comm, &spec.configs.dispatch)?;
    let (recv, handle) = comm.dispatch(x, &input.topk_idx, &input.topk_weights, &layout, &opts)?;
    let y = workload::expert_outputs(&recv.x, comm.rank());
    let rows = recv.x.num_rows() as u64;
    let logical = [
        rows * spec.wire_dtype().row_bytes(hidden) as u64,
        rows * spec.wire_dtype().row_bytes(hidden) as u64,
        rows * DType::Bf16.row_bytes(hidden) as u64,
    ];

    for (i, op) in Op::ALL.into_iter().enumerate() {
        use_config(comm, spec.configs.of(op))?;
        let mut call = |c: &mut dyn Communicator| -> Result<CallOutput> {
            Ok(match op {
                Op::Dispatch => CallOutput::Rows(c.dispatch(x, &input.topk_idx, &input.topk_weights, &layout, &opts)?.0.x),
                Op::DispatchCached => CallOutput::Rows(c.dispatch_cached(x, &handle, &opts)?),
                Op::Combine => {
                    c.combine(&y, hidden, &handle, None)?;
                    CallOutput::Other
                }
            })
        };
        let resident_op = match op {
            Op::Dispatch => None,
            Op::DispatchCached => Some(ResidentOp::DispatchCached),
            Op::Combine => Some(ResidentOp::Combine),
        };
        let resident_inputs = ResidentInputs { x, y: &y, hidden, handle: &handle, options: &opts, graph: spec.graph };
        // Device backends: back-to-back calls on device-resident inputs (see `device_resident`).
        let warm = resident_op.and_then(|r| comm.time_device_resident(r, &resident_inputs, spec.warmup.max(1)));
        if let (Some(r), Some(warm)) = (resident_op, warm) {
            warm?;
            (0..spec.warmup).for_each(|_| step());
            comm.barrier()?;
            comm.reset_traffic();
            comm.take_hop_seconds();
            let times = comm.time_device_resident(r, &resident_inputs, spec.iters).expect("the backend answered above")?;
            hops[i] = comm.take_hop_seconds();
            (0..spec.iters).for_each(|_| step());
            seconds[i] = times;
            resident[i] = true;
        } else {
            for _ in 0..spec.warmup {
                time_call(comm, &mut call)?;
                step();
            }
            comm.barrier()?;
            comm.reset_traffic();
            for _ in 0..spec.iters {
                let (dt, hop) = time_call(comm, &mut call)?;
                seconds[i].push(dt);
                hops[i].extend(hop);
                step();
            }
        }
        let t = comm.traffic();
        let t = if op == Op::Combine { &t.combine } else { &t.dispatch };
        physical[i] = (t.inter_node.bytes, t.intra_node.bytes);
        network[i] = t.inter_node_rows_to_node.clone();
    }

    let nccl = if spec.nccl {
        comm.barrier()?;
        let row_bytes = [spec.wire_dtype().row_bytes(hidden), DType::Bf16.row_bytes(hidden)];
        comm.time_nccl_exchange(&handle, row_bytes, spec.iters).transpose()?
    } else {
        None
    };
    let mut interference = Vec::new();
    if let Some(is) = &spec.interference {
        let inputs = ResidentInputs { x, y: &y, hidden, handle: &handle, options: &opts, graph: spec.graph };
        for &channels in &is.settings {
            comm.barrier()?;
            match comm.measure_interference(&inputs, is.gemm, channels, is.iters) {
                Some(r) => interference.push(r?),
                None => break,
            }
        }
    }

    let checked = if spec.check {
        use_config(comm, &spec.configs.dispatch)?;
        comm.barrier()?;
        let (d, h2) = comm.dispatch(x, &input.topk_idx, &input.topk_weights, &layout, &opts)?;
        step();
        let cached = comm.dispatch_cached(x, &h2, &opts)?;
        step();
        let y2 = workload::expert_outputs(&d.x, comm.rank());
        use_config(comm, &spec.configs.combine)?;
        let c = comm.combine(&y2, hidden, &h2, None)?;
        step();
        Some((d, cached, c, y2))
    } else {
        None
    };
    Ok(RankRun { seconds, logical, physical, network, checked, resident, interference, nccl, hops })
}

/// Pick the most informative of several ranks' errors: a rank's own error over
/// "a peer failed" reports.
fn first_error(errors: Vec<Error>) -> Option<Error> {
    let mut fallback = None;
    for e in errors {
        if matches!(e, Error::PeerFailed { .. }) {
            fallback.get_or_insert(e);
        } else {
            return Some(e);
        }
    }
    fallback
}

/// Run the bench on the CPU backend: one thread per rank. `progress(done, total)`
/// is called from rank 0's thread after each step (see [`BenchSpec::total_steps`]).
pub fn run_cpu(spec: &BenchSpec, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Run> {
    let ranks = CpuCluster::new(spec.workload.topology, spec.configs.dispatch.clone())?.into_ranks();
    run_on(spec, &mut ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect::<Vec<_>>(), progress)
}

/// Run the bench on the CUDA backend: one node of `ranks_per_node` GPUs.
pub fn run_cuda(spec: &BenchSpec, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Run> {
    let topo = spec.workload.topology;
    if topo.num_nodes != 1 {
        return Err(Error::InvalidArgument {
            arg: "--nodes".into(),
            reason: format!(
                "CUDA ranks as threads run one node; {} nodes need ranks as processes (--launch processes)",
                topo.num_nodes
            ),
        });
    }
    let ranks = crate::backend::cuda::CudaCluster::new(topo.ranks_per_node, spec.configs.dispatch.clone())?.into_ranks()?;
    run_on(spec, &mut ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect::<Vec<_>>(), progress)
}

/// Run the bench on the given ranks (one thread per rank, all in this process).
/// The ranks can run further benches afterwards (a failed one leaves them unusable).
pub fn run_on(spec: &BenchSpec, ranks: &mut [Box<dyn Communicator>], progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Run> {
    if spec.iters == 0 {
        return Err(Error::InvalidArgument { arg: "iters".into(), reason: "must be >= 1".into() });
    }
    let inputs = spec.workload.generate()?;
    let total = spec.total_steps();
    let done = AtomicU64::new(0);
    let results: Vec<Result<RankRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .zip(&inputs)
            .map(|(comm, input)| {
                let done = &done;
                s.spawn(move || {
                    let is_zero = comm.rank() == 0;
                    let step = move || {
                        if is_zero {
                            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                        }
                    };
                    run_rank(comm.as_mut(), input, spec, &step)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Err(Error::Protocol { rank: usize::MAX, detail: "a rank thread panicked".into() }))
            })
            .collect()
    });
    let mut runs = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(run) => runs.push(run),
            Err(e) => errors.push(e),
        }
    }
    if let Some(e) = first_error(errors) {
        return Err(e);
    }

    let want = spec.check.then(|| expected(spec, &inputs));
    let sums: Vec<RankSummary> = runs.iter().enumerate().map(|(rank, run)| RankSummary::of(run, want.as_ref(), rank)).collect();
    Ok(measurements(spec, &sums))
}

/// What one rank reports of its run, sent to rank 0 in process mode.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RankSummary {
    seconds: [Vec<f64>; 3],
    logical: [u64; 3],
    physical: [(u64, u64); 3],
    #[serde(default)]
    network: [Vec<u64>; 3],
    resident: [bool; 3],
    /// `[op]` mismatches with the oracle, when checked.
    wrong: Option<[u64; 3]>,
    /// Per interference setting.
    #[serde(default)]
    interference: Vec<Interference>,
    /// NCCL baseline seconds.
    #[serde(default)]
    nccl: Option<[Vec<f64>; 2]>,
    /// `[op][iter]` the two hops' device seconds.
    #[serde(default)]
    hops: [Vec<[f64; 2]>; 3],
}

impl RankSummary {
    fn of(run: &RankRun, want: Option<&Expected>, rank: usize) -> Self {
        Self {
            seconds: run.seconds.clone(),
            logical: run.logical,
            physical: run.physical,
            network: run.network.clone(),
            resident: run.resident,
            wrong: want.map(|w| wrong_of_rank(w, rank, run)),
            interference: run.interference.clone(),
            nccl: run.nccl.clone(),
            hops: run.hops.clone(),
        }
    }
}

/// Per op: iteration time = max over ranks, bytes summed over ranks; per interference
/// setting: each time the slowest rank's.
fn measurements(spec: &BenchSpec, sums: &[RankSummary]) -> Run {
    let iters = spec.iters;
    let nodes = spec.workload.topology.num_nodes;
    let interference = match sums.first() {
        Some(first) => (0..first.interference.len())
            .map(|i| {
                let all = || sums.iter().filter_map(|r| r.interference.get(i));
                let max = |f: fn(&Interference) -> f64| all().map(f).fold(0.0, f64::max);
                Interference {
                    gemm_alone_us: max(|x| x.gemm_alone_us),
                    gemm_left_us: max(|x| x.gemm_left_us),
                    gemm_together_us: max(|x| x.gemm_together_us),
                    comm_alone_us: max(|x| x.comm_alone_us),
                    comm_together_us: max(|x| x.comm_together_us),
                    ..first.interference[i].clone()
                }
            })
            .collect(),
        None => Vec::new(),
    };
    let measurements = Op::ALL
        .into_iter()
        .enumerate()
        .map(|(i, op)| Measurement {
            op,
            iter_seconds: (0..iters).map(|it| sums.iter().map(|r| r.seconds[i][it]).fold(0.0, f64::max)).collect(),
            rank_seconds: sums.iter().map(|r| r.seconds[i].clone()).collect(),
            logical_bytes: sums.iter().map(|r| r.logical[i]).sum(),
            inter_node_bytes: sums.iter().map(|r| r.physical[i].0).sum::<u64>() as f64 / iters as f64,
            intra_node_bytes: sums.iter().map(|r| r.physical[i].1).sum::<u64>() as f64 / iters as f64,
            inter_node_rows_to_node: (0..nodes)
                .map(|n| sums.iter().filter_map(|r| r.network[i].get(n)).sum::<u64>() as f64 / iters as f64)
                .collect(),
            wrong: sums.iter().map(|r| r.wrong.map(|w| w[i])).sum(),
            device_resident: sums.iter().all(|r| r.resident[i]),
            hop_seconds: sums.iter().all(|r| r.hops[i].len() == iters).then(|| {
                [0, 1].map(|h| (0..iters).map(|it| sums.iter().map(|r| r.hops[i][it][h]).fold(0.0, f64::max)).collect())
            }),
        })
        .collect();
    let nccl_seconds = sums.iter().all(|r| r.nccl.is_some()).then(|| {
        [0, 1].map(|i| {
            (0..iters).map(|it| sums.iter().filter_map(|r| r.nccl.as_ref()?[i].get(it).copied()).fold(0.0, f64::max)).collect()
        })
    });
    let nccl_seconds = nccl_seconds.filter(|_| !sums.is_empty());
    Run { measurements, interference, nccl_seconds }
}

/// What a bench over launched processes checks before any process waits for another: the
/// workload's ranks are the launched processes, and there is something to time. Its topology.
fn check_launched(spec: &BenchSpec, env: &crate::bootstrap::LaunchEnv) -> Result<crate::topology::Topology> {
    let topo = spec.workload.topology;
    if topo.world() != env.world_size {
        return Err(Error::InvalidArgument {
            arg: "--nodes/--ranks-per-node".into(),
            reason: format!("{} processes were launched; the bench asks for {topo}", env.world_size),
        });
    }
    if spec.iters == 0 {
        return Err(Error::InvalidArgument { arg: "iters".into(), reason: "must be >= 1".into() });
    }
    Ok(topo)
}

/// Run the bench as one rank of a CPU group whose ranks are processes started by a
/// launcher (mpirun, srun, torchrun): the group forms through MPI (with the `mpi`
/// feature under an MPI launcher) or the TCP rendezvous, nodes are blocks of the
/// spec's ranks per node (each on one host). Rank 0 returns the measurements, the
/// others `None`.
pub fn run_cpu_process(
    spec: &BenchSpec,
    env: &crate::bootstrap::LaunchEnv,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<Run>> {
    let topo = check_launched(spec, env)?;
    let config = spec.configs.dispatch.clone();
    let mut comm = crate::backend::cpu::CpuProcessRank::from_launch_env(env, Some(topo.ranks_per_node), config)?;
    run_as_process(spec, &mut comm, progress)
}

/// Run the bench as one rank of a group of processes (one per GPU, or several sharing a
/// GPU to emulate nodes) that met through `env`, in the workload's nodes
/// ([`crate::backend::cuda::communicator_over`]). Every rank runs its
/// part and checks its own results; rank 0 gathers them and returns the
/// measurements, the other ranks `None`. `progress` is called on rank 0 only.
pub fn run_cuda_process(
    spec: &BenchSpec,
    env: &crate::bootstrap::LaunchEnv,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<Run>> {
    let topo = check_launched(spec, env)?;
    let config = spec.configs.dispatch.clone();
    let group = crate::bootstrap::join_launched(env, std::time::Duration::from_millis(config.timeout_ms))?;
    let group = crate::bootstrap::SharedGroup::new(group);
    let mut comm = crate::backend::cuda::communicator_over(&group, topo.ranks_per_node, config)?;
    run_as_process(spec, comm.as_mut(), progress)
}

/// Run the bench as `comm`'s rank of a group of processes (one rank each): every
/// rank runs its part and checks its own results; rank 0 gathers them and returns
/// the measurements, the other ranks `None`. `comm` can run further benches.
pub fn run_as_process(
    spec: &BenchSpec,
    comm: &mut dyn Communicator,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<Run>> {
    if spec.iters == 0 {
        return Err(Error::InvalidArgument { arg: "iters".into(), reason: "must be >= 1".into() });
    }
    let inputs = spec.workload.generate()?;
    let rank = comm.rank();
    let total = spec.total_steps();
    let done = AtomicU64::new(0);
    let step = || {
        if rank == 0 {
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
        }
    };
    // A rank's failure goes to every rank in the gather, so nobody waits for a summary that never comes.
    let mine: std::result::Result<RankSummary, String> = run_rank(comm, &inputs[rank], spec, &step)
        .map(|run| RankSummary::of(&run, spec.check.then(|| expected(spec, &inputs)).as_ref(), rank))
        .map_err(|e| e.to_string());
    let sums = match crate::backend::gather_outcomes(comm, mine.as_ref().map_err(Clone::clone))? {
        Ok(sums) => sums,
        Err((r, reason)) if r == rank => return Err(Error::Protocol { rank, detail: reason }),
        Err((r, reason)) => return Err(Error::PeerFailed { rank: r, reason }),
    };
    Ok((rank == 0).then(|| measurements(spec, &sums)))
}

/// What every rank should get, from the serial oracle.
struct Expected {
    dispatch: Vec<DispatchOutput>,
    combine: Vec<CombineOutput>,
    /// Per rank, per output element: the sum of |terms| (the combine error bound's scale).
    abs: Vec<Vec<f32>>,
}

fn expected(spec: &BenchSpec, inputs: &[RankInput]) -> Expected {
    let w = &spec.workload;
    let dispatch = crate::oracle::dispatch(w.topology, w.num_experts, w.topk, inputs, &spec.options);
    // Combine: every rank's expert outputs computed from the oracle's received rows.
    let ys: Vec<Vec<bf16>> = dispatch.iter().enumerate().map(|(r, o)| workload::expert_outputs(&o.x, r)).collect();
    let tokens: Vec<usize> = inputs.iter().map(|i| i.topk_idx.len() / w.topk).collect();
    let combine = crate::oracle::combine(&tokens, w.hidden, w.topk, &dispatch, &ys, None);
    let abs = crate::conformance::abs_sums(&tokens, w.hidden, &dispatch, &ys);
    Expected { dispatch, combine, abs }
}

/// `[op]` mismatches of one rank's checked calls.
fn wrong_of_rank(want: &Expected, rank: usize, run: &RankRun) -> [u64; 3] {
    let (d, cached, c, _) = run.checked.as_ref().expect("checked run");
    [
        crate::conformance::count_wrong_dispatch(d, &want.dispatch[rank]) as u64,
        crate::conformance::count_wrong_rows(cached, &want.dispatch[rank].x) as u64,
        crate::conformance::count_wrong_combine(c, &want.combine[rank], &want.abs[rank]) as u64,
    ]
}

/// memcpy bandwidth in GB/s: `threads` threads copy `bytes_per_thread` each, in
/// parallel, `iters` timed times after one warm-up; per iteration the time is
/// the slowest thread's, and the result is total bytes / median time. Each
/// thread's buffers are at least [`MEMCPY_MIN_BUFFER_BYTES`]; successive copies
/// move through them so the source is not cache-hot.
pub fn measure_memcpy(threads: usize, bytes_per_thread: usize, iters: usize) -> f64 {
    let threads = threads.max(1);
    let bytes = bytes_per_thread.max(4096);
    let iters = iters.max(1);
    let region = bytes.max(MEMCPY_MIN_BUFFER_BYTES);
    let barrier = Barrier::new(threads);
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    let src = vec![0x5au8; region];
                    let mut dst = vec![0xa5u8; region];
                    let slots = (region - bytes) / 4096 + 1;
                    let mut out = Vec::with_capacity(iters);
                    for it in 0..=iters {
                        let off = (it * bytes.div_ceil(4096)) % slots * 4096;
                        barrier.wait();
                        let t0 = Instant::now();
                        dst[off..off + bytes].copy_from_slice(&src[off..off + bytes]);
                        std::hint::black_box(&mut dst);
                        let dt = t0.elapsed().as_secs_f64();
                        if it > 0 {
                            out.push(dt);
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("memcpy thread")).collect()
    });
    let per_iter: Vec<f64> = (0..iters).map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    let median_us = TimeStats::from_seconds(&per_iter).median;
    (threads * bytes) as f64 / (median_us * 1e-6).max(1e-12) / 1e9
}

/// Turn measurements into result rows.
pub fn results(spec: &BenchSpec, backend: &str, measurements: &[Measurement], memcpy_gbps: f64) -> Vec<OpResult> {
    let w = &spec.workload;
    measurements
        .iter()
        .map(|m| {
            let time_us = TimeStats::from_seconds(&m.iter_seconds);
            let secs = (time_us.median * 1e-6).max(1e-12);
            let logical_gbps = m.logical_bytes as f64 / secs / 1e9;
            OpResult {
                op: m.op,
                dtype: if m.op == Op::Combine { DType::Bf16 } else { spec.wire_dtype() },
                backend: backend.into(),
                shape: Shape { tokens: w.tokens, hidden: w.hidden, topk: w.topk, experts: w.num_experts },
                topology: w.topology,
                routing: w.routing,
                // One block (SM) per channel on a GPU.
                num_sms: (backend == "cuda").then_some(spec.configs.of(m.op).num_channels as u32),
                config: spec.configs.of(m.op).clone(),
                time_us,
                logical_gbps,
                physical_gbps: PhysicalGbps {
                    inter_node: m.inter_node_bytes / secs / 1e9,
                    intra_node: m.intra_node_bytes / secs / 1e9,
                },
                ratio_to_memcpy: if memcpy_gbps > 0.0 { logical_gbps / memcpy_gbps } else { 0.0 },
                per_rank_us: m.rank_seconds.iter().map(|r| TimeStats::from_seconds(r)).collect(),
                network: network_of(m, w),
                wrong: m.wrong,
                device_resident: m.device_resident,
                graph: m.device_resident && spec.graph,
            }
        })
        .collect()
}

/// The network figures of a measurement, on more than one node.
fn network_of(m: &Measurement, w: &WorkloadSpec) -> Option<Network> {
    let tokens = (w.tokens * w.topology.world()) as f64;
    (w.topology.num_nodes > 1 && tokens > 0.0).then(|| {
        let rows: f64 = m.inter_node_rows_to_node.iter().sum();
        Network {
            rows_per_token: rows / tokens,
            bytes_per_token: m.inter_node_bytes / tokens,
            rows_to_node: m.inter_node_rows_to_node.clone(),
            hops: m
                .hop_seconds
                .as_ref()
                .map(|[net, node]| HopTimes { network_us: TimeStats::from_seconds(net), node_us: TimeStats::from_seconds(node) }),
        }
    })
}

/// The per-rank lines under the table (more than one rank): per op, the fastest,
/// median and slowest of the ranks' own median times, naming the fastest and slowest rank.
pub fn format_per_rank(results: &[OpResult]) -> String {
    let mut s = String::new();
    for r in results.iter().filter(|r| r.per_rank_us.len() > 1) {
        if s.is_empty() {
            s.push_str("# per rank (each rank's own median, us): fastest, median, slowest rank\n");
        }
        let mut medians: Vec<(f64, usize)> = r.per_rank_us.iter().enumerate().map(|(k, t)| (t.median, k)).collect();
        medians.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (lo, hi) = (medians[0], medians[medians.len() - 1]);
        let mid = TimeStats::from_seconds(&medians.iter().map(|m| m.0 * 1e-6).collect::<Vec<_>>()).median;
        s += &format!(
            "# {:>17}  {:>5}  {:>10.1} (rank {})  {:>10.1}  {:>10.1} (rank {})\n",
            r.op.name(),
            r.dtype.name(),
            lo.0,
            lo.1,
            mid,
            hi.0,
            hi.1
        );
    }
    s
}

/// The network lines under the table (multi-node runs): per op, inter-node rows and
/// bytes per token and the rows into each node; empty on one node.
pub fn format_network(results: &[OpResult]) -> String {
    let mut s = String::new();
    for r in results {
        let Some(n) = &r.network else { continue };
        if s.is_empty() {
            s.push_str("# inter-node hop per call (all ranks): rows/token, KB/token, rows into each node\n");
        }
        let into: Vec<String> = n.rows_to_node.iter().map(|x| format!("{x:.0}")).collect();
        s += &format!(
            "# {:>17}  {:>5}  {:>6.3} rows/token  {:>8.2} KB/token  [{}]\n",
            r.op.name(),
            r.dtype.name(),
            n.rows_per_token,
            n.bytes_per_token / 1e3,
            into.join(", ")
        );
    }
    s
}

/// The NCCL baseline rows of a run: the bytes of cached dispatch (wire row type) and combine.
/// On several nodes the baseline is the inter-node hop alone, and each row also
/// carries the hop efficiency and the overlap of the op (where its hops were timed).
pub fn nccl_results(spec: &BenchSpec, run: &Run) -> Vec<NcclResult> {
    let Some(secs) = &run.nccl_seconds else { return Vec::new() };
    let inter_node_hop = spec.workload.topology.num_nodes > 1;
    let median = |s: &[f64]| TimeStats::from_seconds(s).median;
    [(Op::DispatchCached, spec.wire_dtype(), &secs[0]), (Op::Combine, DType::Bf16, &secs[1])]
        .into_iter()
        .map(|(op, dtype, s)| {
            let m = run.measurements.iter().find(|m| m.op == op);
            let time_us = TimeStats::from_seconds(s);
            let logical = m.map_or(0, |m| m.logical_bytes) as f64;
            let gbps = if time_us.median > 0.0 { logical / (time_us.median * 1e-6) / 1e9 } else { 0.0 };
            let hops = m.and_then(|m| m.hop_seconds.as_ref().map(|h| (median(&m.iter_seconds), median(&h[0]), median(&h[1]))));
            let (hop_efficiency, overlap) = match hops.filter(|_| inter_node_hop) {
                Some((op_us, net_us, node_us)) => (Some(time_us.median / net_us), Some(op_us / time_us.median.max(node_us))),
                None => (None, None),
            };
            NcclResult { op, dtype, time_us, logical_gbps: gbps, inter_node_hop, hop_efficiency, overlap }
        })
        .collect()
}

/// Table lines (each starting with `#`) for the NCCL baseline, with the ratio of its
/// median to the op's.
pub fn format_nccl(rows: &[NcclResult], results: &[OpResult]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    if rows.iter().any(|r| r.inter_node_hop) {
        return format_rail_baseline(rows, results);
    }
    let mut s = String::from("# NCCL grouped send/recv of the same bytes, same run (cudarc NCCL, every rank incl. itself):\n");
    for r in rows {
        let ours = results.iter().find(|o| o.op == r.op).map_or(f64::NAN, |o| o.time_us.median);
        s += &format!(
            "# {:>17}  {:>5}  {:>10.1}  {:>10.1}  {:>10.1}  {:>8.2}  NCCL / ours = {:.2}\n",
            r.op.name(),
            r.dtype.name(),
            r.time_us.min,
            r.time_us.median,
            r.time_us.max,
            r.logical_gbps,
            r.time_us.median / ours
        );
    }
    s
}

/// [`format_nccl`] on several nodes: the rail's NCCL alone against the two hops inside the op.
fn format_rail_baseline(rows: &[NcclResult], results: &[OpResult]) -> String {
    let mut s = String::from(
        "# inter-node hop alone: NCCL send/recv of the rail's bytes between rail peers, same run, vs the hops inside the op\n\
         #                op  dtype  NCCL alone(us)  rail in op(us)  node op(us)  op(us)  hop efficiency  op / slower hop\n",
    );
    let fmt = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    for r in rows {
        let op = results.iter().find(|o| o.op == r.op);
        let hops = op.and_then(|o| o.network.as_ref()?.hops);
        s += &format!(
            "# {:>17}  {:>5}  {:>14.1}  {:>14}  {:>11}  {:>6.1}  {:>14}  {:>15}\n",
            r.op.name(),
            r.dtype.name(),
            r.time_us.median,
            hops.map_or_else(|| "-".to_string(), |h| format!("{:.1}", h.network_us.median)),
            hops.map_or_else(|| "-".to_string(), |h| format!("{:.1}", h.node_us.median)),
            op.map_or(f64::NAN, |o| o.time_us.median),
            fmt(r.hop_efficiency),
            fmt(r.overlap)
        );
    }
    s
}

/// Header lines of the table (each starting with `#`).
pub const TABLE_HEADER: [&str; 2] = [
    "#              op  dtype     min(us)  median(us)     max(us)   logical   inter-node   intra-node   #wrong  x memcpy",
    "#                                                               (GB/s)       (GB/s)       (GB/s)                   ",
];

/// One table line for a result, aligned under [`TABLE_HEADER`]; `-` when not checked.
pub fn format_row(r: &OpResult) -> String {
    let wrong = r.wrong.map_or_else(|| "-".to_string(), |w| w.to_string());
    format!(
        "{:>17}  {:>5}  {:>10.1}  {:>10.1}  {:>10.1}  {:>8.2}  {:>11.2}  {:>11.2}  {:>7}  {:>8.2}",
        r.op.name(),
        r.dtype.name(),
        r.time_us.min,
        r.time_us.median,
        r.time_us.max,
        r.logical_gbps,
        r.physical_gbps.inter_node,
        r.physical_gbps.intra_node,
        wrong,
        r.ratio_to_memcpy
    )
}

/// The whole table: header, one row per result, and a footer naming the
/// definitions and the memcpy reference.
pub fn format_table(results: &[OpResult], memcpy_gbps: f64) -> String {
    let mut s = String::new();
    for h in TABLE_HEADER {
        s.push_str(h.trim_end());
        s.push('\n');
    }
    for r in results {
        s.push_str(&format_row(r));
        s.push('\n');
    }
    let ranks = results.first().map_or(0, |r| r.topology.world());
    s.push_str(&format!(
        "# GB/s = bytes / median time, summed over all {ranks} ranks; logical = rows delivered (incl. local),\n\
         # inter-node/intra-node = bytes that crossed each hop; memcpy ({ranks} threads in parallel): {memcpy_gbps:.2} GB/s\n"
    ));
    let resident: Vec<&str> = results.iter().filter(|r| r.device_resident).map(|r| r.op.name()).collect();
    if !resident.is_empty() {
        s.push_str(&format!(
            "# device-resident (back-to-back calls, inputs in device memory{}): {}; the others: host-slice calls\n",
            if results.iter().any(|r| r.graph) { ", each a replay of one call captured in a CUDA graph" } else { "" },
            resident.join(", ")
        ));
    }
    s
}

/// ISO-8601 UTC text of a time, to the second (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn iso8601_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Git commit of the source tree this binary was built from: `SWITCHYARD_COMMIT`
/// set at build time if any, else `git rev-parse HEAD` in the crate's source
/// directory at run time (with `-dirty` when it has uncommitted changes), else `None`.
pub fn source_commit() -> Option<String> {
    if let Some(c) = option_env!("SWITCHYARD_COMMIT") {
        return Some(c.to_string());
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git")
        .args(["-C", dir, "rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut c = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if c.is_empty() {
        return None;
    }
    let dirty = std::process::Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    if dirty {
        c.push_str("-dirty");
    }
    Some(c)
}

/// The machine description for a report.
pub fn machine(gpus: Vec<String>) -> Machine {
    Machine { hostname: crate::probe::hostname(), cpus: std::thread::available_parallelism().map_or(1, |n| n.get()), gpus }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let spec = BenchSpec {
            workload: WorkloadSpec {
                topology: Topology::new(2, 2).unwrap(),
                tokens: 64,
                hidden: 256,
                topk: 4,
                num_experts: 16,
                dtype: DType::Fp8,
                routing: RoutingKind::NodeLimited,
                max_nodes: 1,
                hole_rate: 0.0,
                seed: 7,
            },
            configs: OpConfigs::uniform(Config::default()),
            warmup: 0,
            iters: 4,
            check: false,
            options: DispatchOptions::default(),
            interference: None,
            nccl: false,
            graph: false,
        };
        let ms: Vec<Measurement> = Op::ALL
            .into_iter()
            .map(|op| Measurement {
                op,
                iter_seconds: vec![4e-6, 1e-6, 3e-6, 2e-6],
                rank_seconds: vec![vec![1e-6, 1e-6, 2e-6, 2e-6], vec![4e-6, 1e-6, 3e-6, 2e-6], vec![3e-6; 4], vec![1e-6; 4]],
                logical_bytes: 2_500_000,
                inter_node_bytes: 1e6,
                intra_node_bytes: 5e5,
                inter_node_rows_to_node: vec![100.0, 28.0],
                wrong: (op == Op::Combine).then_some(0),
                device_resident: op == Op::Combine,
                hop_seconds: None,
            })
            .collect();
        Report {
            schema: SCHEMA_VERSION,
            machine: machine(vec![]),
            commit: None,
            date: iso8601_utc(SystemTime::now()),
            memcpy_gbps: 2000.0,
            results: results(&spec, "cpu", &ms, 2000.0),
            nccl_sendrecv: Vec::new(),
            interference: Vec::new(),
        }
    }

    #[test]
    fn nccl_rows_take_the_ops_bytes_and_compare_medians() {
        let report = sample();
        let spec = BenchSpec {
            workload: WorkloadSpec {
                topology: Topology { num_nodes: 1, ranks_per_node: 2 },
                tokens: 8,
                hidden: 256,
                topk: 2,
                num_experts: 4,
                dtype: DType::Bf16,
                routing: RoutingKind::Uniform,
                max_nodes: 1,
                hole_rate: 0.0,
                seed: 0,
            },
            configs: OpConfigs::uniform(Config::default()),
            warmup: 0,
            iters: 2,
            check: false,
            options: DispatchOptions::default(),
            interference: None,
            nccl: true,
            graph: false,
        };
        let m = |op, bytes| Measurement {
            op,
            iter_seconds: vec![1e-6, 1e-6],
            rank_seconds: Vec::new(),
            logical_bytes: bytes,
            inter_node_bytes: 0.0,
            intra_node_bytes: 0.0,
            inter_node_rows_to_node: vec![0.0],
            wrong: None,
            device_resident: true,
            hop_seconds: None,
        };
        let run = Run {
            measurements: vec![m(Op::Dispatch, 1), m(Op::DispatchCached, 4000), m(Op::Combine, 8000)],
            interference: Vec::new(),
            nccl_seconds: Some([vec![2e-6, 4e-6], vec![8e-6, 8e-6]]),
        };
        let rows = nccl_results(&spec, &run);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].op, rows[0].time_us.median), (Op::DispatchCached, 3.0));
        assert!((rows[0].logical_gbps - 4000.0 / 3e-6 / 1e9).abs() < 1e-9);
        assert!((rows[1].logical_gbps - 1.0).abs() < 1e-9);
        let t = format_nccl(&rows, &report.results);
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(t.lines().all(|l| l.starts_with('#')));
        assert!(nccl_results(&spec, &Run { nccl_seconds: None, ..run.clone() }).is_empty());

        // Two nodes: the baseline is the rail hop, set against the hops timed inside the op.
        let two = BenchSpec {
            workload: WorkloadSpec { topology: Topology { num_nodes: 2, ranks_per_node: 1 }, ..spec.workload.clone() },
            ..spec
        };
        let mut run = run;
        for m in &mut run.measurements {
            m.iter_seconds = vec![10e-6, 10e-6];
            m.hop_seconds = Some([vec![4e-6, 4e-6], vec![5e-6, 5e-6]]);
        }
        let rows = nccl_results(&two, &run);
        // Dispatch: NCCL alone 3 us against 4 us inside; the op's 10 us against the slower hop (node: 5 us).
        assert!(rows.iter().all(|r| r.inter_node_hop));
        assert!((rows[0].hop_efficiency.unwrap() - 0.75).abs() < 1e-9);
        assert!((rows[0].overlap.unwrap() - 2.0).abs() < 1e-9);
        // Combine: NCCL alone 8 us is the slower hop.
        assert!((rows[1].hop_efficiency.unwrap() - 2.0).abs() < 1e-9);
        assert!((rows[1].overlap.unwrap() - 1.25).abs() < 1e-9);
        let mut results = results(&two, "cuda", &run.measurements, 1.0);
        let t = format_nccl(&rows, &results);
        assert!(t.contains("inter-node hop alone") && t.lines().count() == 4, "{t}");
        assert!(t.lines().nth(2).unwrap().contains("4.0") && t.lines().nth(2).unwrap().contains("0.75"), "{t}");
        // Without hop times (the host rail) the figures are dashes, not numbers.
        run.measurements.iter_mut().for_each(|m| m.hop_seconds = None);
        results.iter_mut().for_each(|r| r.network.as_mut().unwrap().hops = None);
        let rows = nccl_results(&two, &run);
        assert!(rows.iter().all(|r| r.hop_efficiency.is_none() && r.overlap.is_none()));
        assert!(format_nccl(&rows, &results).lines().nth(2).unwrap().contains(" -"));
    }

    #[test]
    fn per_rank_lines_name_the_fastest_and_slowest_rank() {
        let r = sample();
        // Rank medians: 1.5, 2.5, 3.0, 1.0 us.
        assert_eq!(r.results[0].per_rank_us.len(), 4);
        assert_eq!(r.results[0].per_rank_us[1], TimeStats { min: 1.0, median: 2.5, max: 4.0 });
        let t = format_per_rank(&r.results);
        assert_eq!(t.lines().count(), 4, "{t}");
        let first = t.lines().nth(1).unwrap();
        assert!(first.contains("1.0 (rank 3)") && first.contains("2.0") && first.contains("3.0 (rank 2)"), "{first}");
    }

    #[test]
    fn network_figures_are_per_token_of_the_group_and_only_on_several_nodes() {
        let r = sample();
        // 2 x 2 ranks x 64 tokens = 256 tokens; 128 rows and 1 MB crossed per call.
        let n = r.results[0].network.as_ref().expect("two nodes");
        assert!((n.rows_per_token - 0.5).abs() < 1e-12 && (n.bytes_per_token - 1e6 / 256.0).abs() < 1e-9, "{n:?}");
        assert_eq!(n.rows_to_node, vec![100.0, 28.0]);
        let t = format_network(&r.results);
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(t.contains("0.500 rows/token") && t.contains("3.91 KB/token") && t.contains("[100, 28]"), "{t}");
        let mut one = r.results.clone();
        one.iter_mut().for_each(|x| x.network = None);
        assert_eq!(format_network(&one), "");
    }

    #[test]
    fn interference_lines_carry_the_slowdowns() {
        assert_eq!(format_interference(&[]), "");
        let row = Interference {
            gemm: GemmShape { m: 8, n: 4, k: 2 },
            channels: [8, 16],
            gemm_sms: 116,
            gemm_alone_us: 1000.0,
            gemm_left_us: 1050.0,
            gemm_together_us: 1100.0,
            comm_alone_us: 400.0,
            comm_together_us: 600.0,
        };
        let t = format_interference(&[row]);
        assert!(t.lines().all(|l| l.starts_with('#')) && t.lines().count() == 4, "{t}");
        assert!(t.contains("8x4x2") && t.contains("1.100") && t.contains("1.500"), "{t}");
    }

    #[test]
    fn figures_follow_the_definitions() {
        let r = sample();
        let d = &r.results[0];
        assert_eq!(d.time_us, TimeStats { min: 1.0, median: 2.5, max: 4.0 });
        assert!((d.logical_gbps - 1000.0).abs() < 1e-6, "{}", d.logical_gbps); // 2.5 MB / 2.5 us
        assert!((d.physical_gbps.inter_node - 400.0).abs() < 1e-6);
        assert!((d.physical_gbps.intra_node - 200.0).abs() < 1e-6);
        assert!((d.ratio_to_memcpy - 0.5).abs() < 1e-12);
        assert_eq!(d.dtype, DType::Fp8);
        assert_eq!(r.results[2].dtype, DType::Bf16, "combine moves BF16");
        assert_eq!(TimeStats::from_seconds(&[3e-6, 1e-6, 2e-6]).median, 2.0);
    }

    #[test]
    fn json_schema_round_trips_with_the_documented_keys() {
        let r = sample();
        let text = r.to_json();
        // serde_json parses floats to within one ulp, so compare floats with a tolerance.
        let back = Report::from_json(&text).unwrap();
        assert_eq!((back.schema, &back.machine, &back.commit, &back.date), (r.schema, &r.machine, &r.commit, &r.date));
        assert_eq!(back.results.len(), r.results.len());
        for (a, b) in back.results.iter().zip(&r.results) {
            assert_eq!(
                (a.op, a.dtype, &a.backend, a.shape, a.topology, a.routing, a.num_sms, &a.config, a.wrong),
                (b.op, b.dtype, &b.backend, b.shape, b.topology, b.routing, b.num_sms, &b.config, b.wrong)
            );
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs().max(1.0);
            assert!(close(a.logical_gbps, b.logical_gbps) && close(a.ratio_to_memcpy, b.ratio_to_memcpy));
            assert!(close(a.physical_gbps.inter_node, b.physical_gbps.inter_node));
            assert!(close(a.time_us.median, b.time_us.median));
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in ["schema", "machine", "commit", "date", "memcpy_gbps", "results"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for key in ["hostname", "cpus", "gpus"] {
            assert!(v["machine"].get(key).is_some(), "missing machine.{key}");
        }
        let e = &v["results"][0];
        for key in [
            "op",
            "dtype",
            "backend",
            "shape",
            "topology",
            "routing",
            "num_sms",
            "config",
            "time_us",
            "logical_gbps",
            "physical_gbps",
            "ratio_to_memcpy",
            "wrong",
            "device_resident",
        ] {
            assert!(e.get(key).is_some(), "missing results[].{key}");
        }
        assert_eq!(e["op"], "dispatch");
        assert_eq!(v["results"][1]["op"], "dispatch-cached");
        assert_eq!(e["dtype"], "fp8");
        assert_eq!(e["routing"], "node-limited");
        assert!(e["num_sms"].is_null() && e["wrong"].is_null());
        assert_eq!(v["results"][2]["wrong"], 0);
        assert_eq!((&e["device_resident"], &v["results"][2]["device_resident"]), (&false.into(), &true.into()));
        assert_eq!(e["shape"], serde_json::json!({"tokens": 64, "hidden": 256, "topk": 4, "experts": 16}));
        assert_eq!(e["topology"], serde_json::json!({"num_nodes": 2, "ranks_per_node": 2}));
        for key in ["num_channels", "chunk_tokens", "buffer_tokens", "timeout_ms"] {
            assert!(e["config"].get(key).is_some(), "missing config.{key}");
        }
        for key in ["min", "median", "max"] {
            assert!(e["time_us"][key].is_f64());
        }
        assert!(e["physical_gbps"]["inter_node"].is_f64() && e["physical_gbps"]["intra_node"].is_f64());
        let bad = text.replacen("\"schema\": 1", "\"schema\": 2", 1);
        assert!(Report::from_json(&bad).is_err());
    }

    #[test]
    fn table_has_one_aligned_row_per_op() {
        let r = sample();
        let t = format_table(&r.results, r.memcpy_gbps);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with('#') && lines[0].contains("#wrong") && lines[0].contains("x memcpy"));
        let rows: Vec<&str> = lines.iter().copied().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].trim_start().starts_with("dispatch ") && rows[0].contains("fp8"));
        assert!(rows[1].trim_start().starts_with("dispatch-cached"));
        assert!(rows[2].trim_start().starts_with("combine") && rows[2].contains("bf16"));
        // Unchecked rows print `-`, checked ones the count; all rows are as wide as the header.
        assert_eq!(rows[0].split_whitespace().nth(8), Some("-"));
        assert_eq!(rows[2].split_whitespace().nth(8), Some("0"));
        for row in &rows {
            assert_eq!(row.len(), TABLE_HEADER[0].trim_end().len(), "{row}");
        }
        assert!(t.contains("summed over all 4 ranks"));
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn memcpy_measures_something_positive() {
        let g = measure_memcpy(2, 1 << 20, 2);
        assert!(g.is_finite() && g > 0.0, "{g}");
    }
}
