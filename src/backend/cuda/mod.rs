//! CUDA backend, intra-node: the ranks of one node as threads of one process, one
//! GPU (context + stream) per rank, communication buffers peer-mapped over NVLink.
//!
//! Each call: host agreement (bad input on one rank fails all), then on the rank's
//! stream `sy_notify` (counts, positions, receive prefix) and `sy_dispatch` (rows
//! written straight into their final place in every destination; a cached BF16 dispatch
//! runs `sy_dispatch_bulk`, peer rows by bulk copies beside a copy engine's own rows, where
//! it applies: [`DispatchChoice`]), or the combine (each source pulls its tokens' rows and
//! sums them in destination order: `sy_combine_bulk` through bulk copies into shared memory
//! on sm_90, `sy_combine` elsewhere; [`CombineChoice`]). Kernels come from NVRTC with the
//! shape baked in ([`compile`]). This host-slice API copies inputs in and outputs out; it
//! exists for the conformance suite and the bench.

pub mod compile;
pub mod driver;
pub mod gemm;
mod group;
mod hier_hops;
pub mod layout;
pub mod local_copy;
pub mod nccl;
mod on_stream;
pub mod peer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use half::bf16;

use self::compile::{KernelSpec, NOTIFY_THREADS, THREADS};
use self::driver::{
    dtod_async, dtoh, htod, CapturedGraph, DeviceBuffer, Event, EventPairs, Gpu, IpcMapping, Kernel, Kernels, MappedHost,
    Scratch, Stream,
};
use self::group::HostGroup;
use self::layout::{meta, BufferLayout, SyDiag, SyParams, FLAG_SKIP_LOCAL, FLAG_WITH_WEIGHTS, FLAG_WRITE_META, SIGNAL_SLOTS};
use self::local_copy::{CopyOp, LocalCopy, RowArrays};
pub use self::on_stream::{CallerStream, DeviceRows};
use self::peer::PeerMap;
use crate::backend::hier::{HierRank, Rail};
use crate::backend::{
    checks, CombineOutput, Communicator, DispatchOptions, DispatchOutput, HopCount, Interference, ResidentInputs, ResidentOp,
    Traffic, TrafficLog,
};
use crate::bootstrap::threads::Board;
use crate::bootstrap::{LaunchEnv, ProcessGroup, SharedGroup};
use crate::config::Config;
use crate::error::{Error, Result, Role, WaitDiagnostic};
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{DType, Rows, RowsRef};
use crate::topology::Topology;

/// The driver's variable for hardware work queues per GPU (default 8, at most 32), read once
/// at initialization. Ranks of one process that share a GPU each use a stream (and a side
/// stream): with more streams than queues, one rank's kernel can wait behind another's
/// spinning one. The CLI sets 32 unless it is set; programs that share GPUs should too.
pub const MAX_CONNECTIONS_ENV: &str = "CUDA_DEVICE_MAX_CONNECTIONS";

/// Environment variable: the transport of the inter-node hop when several CUDA nodes
/// run, `nccl` (default) or `host` (the process group: MPI or TCP, through host memory).
pub const RAIL_ENV: &str = "SWITCHYARD_RAIL";
/// Environment variable: communication buffer size per GPU, in MiB (default 2048).
pub const BUFFER_MB_ENV: &str = "SWITCHYARD_CUDA_BUFFER_MB";
const DEFAULT_BUFFER_MB: usize = 2048;
/// Environment variable: the combine kernel, `bulk`, `pull` or `push` (see [`CombineChoice`]).
/// Unset: `bulk` where the GPU has bulk copies (sm_90 and later), `pull` elsewhere.
pub const COMBINE_ENV: &str = "SWITCHYARD_COMBINE";

/// Which combine kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombineChoice {
    /// `sy_combine_bulk`: sources pull the rows through bulk copies into shared memory (sm_90+).
    Bulk,
    /// `sy_combine`: sources pull the rows into registers.
    Pull,
    /// `sy_combine_push`: holders store the rows to their source, which reduces them
    /// (host-slice calls only, when every (token, rank) slot fits the buffer; pull otherwise).
    /// Measured slower on 2x H200: HT-A 12 SMs 359-363 us against 232 us for pull.
    Push,
}

impl CombineChoice {
    const NAMES: [(&'static str, Self); 3] = [("bulk", Self::Bulk), ("pull", Self::Pull), ("push", Self::Push)];

    /// The choice in `SWITCHYARD_COMBINE`; `None` when unset (the default for the GPU).
    pub fn from_env() -> Result<Option<Self>> {
        Self::parse(std::env::var(COMBINE_ENV).ok().as_deref())
    }

    /// A value of `SWITCHYARD_COMBINE` (`None`: unset).
    pub fn parse(value: Option<&str>) -> Result<Option<Self>> {
        parse_choice(COMBINE_ENV, value, &Self::NAMES)
    }
}

/// `value` of the environment variable `var` (`None`: unset) as one of `choices` (name, choice);
/// an error that names the variable and the accepted names otherwise.
fn parse_choice<T: Copy>(var: &str, value: Option<&str>, choices: &[(&str, T)]) -> Result<Option<T>> {
    let Some(v) = value else { return Ok(None) };
    match choices.iter().find(|(name, _)| *name == v) {
        Some(&(_, choice)) => Ok(Some(choice)),
        None => {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            Err(Error::InvalidArgument { arg: var.into(), reason: format!("{v:?}: expected one of {}", names.join(", ")) })
        }
    }
}

/// Environment variable: the cached-dispatch kernel, `bulk` or `stores` (see [`DispatchChoice`]).
/// Unset: `bulk` where it applies (sm_90 and later, BF16 rows, own rows in few enough runs for a
/// copy engine; `CudaRank::cached_dispatch_plan`).
pub const DISPATCH_ENV: &str = "SWITCHYARD_DISPATCH";

/// Which kernel moves the rows of a cached dispatch. A first dispatch (it also writes the
/// metadata) and FP8 rows (quantized inside or not) always run `sy_dispatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchChoice {
    /// `sy_dispatch_bulk`: a few threads per block bulk-copy each row into shared memory and
    /// bulk-store it to the peers it goes to, while a copy engine moves the own rows (sm_90+,
    /// BF16; input 16-byte aligned, else `sy_dispatch`).
    Bulk,
    /// `sy_dispatch`: every warp moves rows with 16-byte loads and stores through registers.
    Stores,
}

impl DispatchChoice {
    const NAMES: [(&'static str, Self); 2] = [("bulk", Self::Bulk), ("stores", Self::Stores)];

    /// The choice in `SWITCHYARD_DISPATCH`; `None` when unset (the default for the GPU).
    pub fn from_env() -> Result<Option<Self>> {
        Self::parse(std::env::var(DISPATCH_ENV).ok().as_deref())
    }

    /// A value of `SWITCHYARD_DISPATCH` (`None`: unset).
    pub fn parse(value: Option<&str>) -> Result<Option<Self>> {
        parse_choice(DISPATCH_ENV, value, &Self::NAMES)
    }
}

/// State shared by the ranks of a cluster: contexts and buffers live until the last rank drops.
struct Shared {
    // Never read: kept alive here because every rank's kernels write into them.
    #[allow(dead_code)]
    buffers: Vec<DeviceBuffer>,
    /// Process mode: the peers' buffers mapped through CUDA IPC (unmapped before ours is freed).
    ipc: Vec<IpcMapping>,
    gpus: Vec<Gpu>,
    peers: PeerMap,
    group: HostGroup,
    buffer_bytes: usize,
    arch: String,
    comm_id: u64,
    /// Most ranks of this process on one GPU: their channels share its SMs.
    ranks_per_gpu: usize,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(g) = self.gpus.first().filter(|_| !self.ipc.is_empty()) {
            let _ = g.bind();
            self.ipc.clear();
        }
        // Free each buffer with its own context current, before the contexts are released.
        for (g, b) in self.gpus.iter().zip(self.buffers.drain(..)) {
            let _ = g.bind();
            drop(b);
        }
    }
}

/// The GPUs of one node; split into per-rank endpoints with [`CudaCluster::into_ranks`].
pub struct CudaCluster {
    shared: Arc<Shared>,
    config: Config,
}

impl CudaCluster {
    /// Use GPUs `0..num_gpus` (2..=8) as the ranks of one node. Fails with
    /// [`Error::BackendUnavailable`] when the driver, NVRTC or the GPUs are missing.
    pub fn new(num_gpus: usize, config: Config) -> Result<Self> {
        Self::on_gpus(&(0..num_gpus).collect::<Vec<_>>(), config)
    }

    /// Rank `r` of one node on GPU `gpus[r]` (1..=8 ranks). A GPU may carry several
    /// ranks: their kernels run side by side on it (one context, a stream per rank), so
    /// one GPU can run the node-wide protocol for development and tests; every channel
    /// of every rank on a GPU needs an SM of its own (checked). Freeing device memory
    /// (`cuMemFree`) waits for every kernel on the GPU, so a rank that frees while a
    /// co-located rank's kernel waits for it stalls both until the deadline: allocate
    /// what the calls use up front (the calls' own workspaces are allocated on first use).
    pub fn on_gpus(gpus: &[usize], config: Config) -> Result<Self> {
        config.validate()?;
        let num_gpus = gpus.len();
        if !(1..=layout::MAX_WORLD).contains(&num_gpus) {
            return Err(Error::InvalidArgument { arg: "num_gpus".into(), reason: format!("{num_gpus}: 1..=8 supported") });
        }
        let available = driver::device_count()?;
        if !compile::nvrtc_available() {
            return Err(Error::BackendUnavailable { backend: "cuda", reason: "libnvrtc not found".into() });
        }
        if let Some(&missing) = gpus.iter().find(|&&g| g >= available) {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!("GPU {missing} asked for, {available} present"),
            });
        }
        let gpus: Vec<Gpu> = gpus.iter().map(|&g| Gpu::new(g)).collect::<Result<_>>()?;
        let most_on_one = gpus.iter().map(|g| gpus.iter().filter(|o| o.ordinal() == g.ordinal()).count()).max().unwrap_or(1);
        let queues = std::env::var(MAX_CONNECTIONS_ENV).ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(8);
        if most_on_one > 1 && 2 * most_on_one > queues {
            tracing::warn!(ranks_per_gpu = most_on_one, queues, "{MAX_CONNECTIONS_ENV}={queues} hardware queues for {} streams per GPU: kernels may queue behind each other and time out; set it to 32 before CUDA starts", 2 * most_on_one);
        }
        check_channels(config.num_channels * most_on_one, &gpus[0]).map_err(|e| match (e, most_on_one) {
            (Error::InvalidArgument { reason, .. }, n) if n > 1 => Error::InvalidArgument {
                arg: "num_channels".into(),
                reason: format!(
                    "{n} ranks share a GPU, so {} channels each take {}: {reason}",
                    config.num_channels,
                    config.num_channels * n
                ),
            },
            (e, _) => e,
        })?;
        let arch = arch_of(&gpus[0])?;
        let buffer_bytes = buffer_bytes_from_env();
        let mb = buffer_bytes >> 20;
        let mut buffers = Vec::with_capacity(num_gpus);
        for g in &gpus {
            g.bind()?;
            buffers.push(new_comm_buffer(buffer_bytes)?);
        }
        let peers = peer::map_in_process(&gpus, &buffers)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let comm_id = 0xC0DA_0000_0000 | NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            gpus = num_gpus,
            device = %gpus[0].name(),
            arch = %arch,
            sms = gpus[0].sm_count().unwrap_or(0),
            buffer_mb = mb,
            channels = config.num_channels,
            timeout_ms = config.timeout_ms,
            "cuda cluster ready"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                buffers,
                ipc: Vec::new(),
                gpus,
                peers,
                group: HostGroup::Threads(Board::new(num_gpus)),
                buffer_bytes,
                arch,
                comm_id,
                ranks_per_gpu: most_on_one,
            }),
            config,
        })
    }

    /// One endpoint per GPU, in rank order; move each to its own thread. (Unlike
    /// `CpuCluster::into_ranks` this can fail: each rank creates a stream and pinned memory.)
    pub fn into_ranks(self) -> Result<Vec<CudaRank>> {
        let world = self.shared.gpus.len();
        (0..world).map(|rank| CudaRank::endpoint(rank, world, rank, self.config.clone(), self.shared.clone())).collect()
    }
}

/// The GPU a process drives: process `local` of the `processes` on its host takes GPU
/// `local` when there are enough of `gpus`; with more processes than GPUs (nodes
/// emulated on one host), blocks of consecutive processes share one, so an emulated
/// node's ranks stay on one GPU and each rail holds distinct GPUs where it can.
pub fn gpu_for_process(local: usize, processes: usize, gpus: usize) -> usize {
    if processes <= gpus {
        local
    } else {
        local * gpus / processes
    }
}

/// This rank's index among the ranks on its host, and how many those are.
pub fn host_slot(hosts: &[String], rank: usize) -> (usize, usize) {
    let same = |h: &&String| **h == hosts[rank];
    (hosts[..rank].iter().filter(same).count(), hosts.iter().filter(same).count())
}

/// The CUDA communicator of this process over `group` in nodes of `ranks_per_node`:
/// one node is a [`CudaRank`] over the whole group; several are a
/// [`HierRank`] with a `CudaRank` per node (NVLink
/// inside, the rail hop through the group). Collective.
pub fn communicator_over(group: &SharedGroup, ranks_per_node: usize, config: Config) -> Result<Box<dyn Communicator>> {
    let slot = host_slot(group.hostnames(), group.rank());
    let world = group.world_size();
    if ranks_per_node == world {
        let id = 0xC0DA_0000_0000 | rand::random::<u32>() as u64;
        return Ok(Box::new(CudaRank::from_process_group(group.whole(), slot, id, config)?));
    }
    let rail = RailChoice::from_env()?;
    if rail == RailChoice::Nccl {
        nccl::emulate_hosts_if_needed(group.hostnames(), group.rank(), ranks_per_node);
    }
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut hier = HierRank::new(group, Some(ranks_per_node), config, &mut |view, cfg| {
        // Only the node's ranks see this id, in handles that stay inside the hierarchical rank.
        let id = 0xC0DA_0000_0000 ^ ((group.rank() / ranks_per_node) as u64) << 8;
        Ok(Box::new(CudaRank::from_process_group(view, slot, id, cfg.clone())?) as Box<dyn Communicator>)
    })?;
    if rail == RailChoice::Nccl {
        // The node's CudaRank made this thread's context current, where NCCL works.
        hier.use_rail(|place, world| Ok(Box::new(nccl::join_rail(place, world, timeout)?) as Box<dyn Rail>))?;
        hier.use_device_hops(Box::new(hier_hops::CudaHops::new()?));
    }
    Ok(Box::new(hier))
}

/// Which transport the inter-node hop of a CUDA group takes ([`RAIL_ENV`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RailChoice {
    /// NCCL between rail peers, on device buffers (the default).
    Nccl,
    /// The process group on the host (MPI or TCP).
    Host,
}

impl RailChoice {
    fn from_env() -> Result<Self> {
        Self::parse(std::env::var(RAIL_ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<Self> {
        match value {
            None | Some("nccl") => Ok(Self::Nccl),
            Some("host") => Ok(Self::Host),
            Some(other) => {
                Err(Error::InvalidArgument { arg: RAIL_ENV.into(), reason: format!("`{other}`: expected `nccl` or `host`") })
            }
        }
    }
}

/// The GPU's arch name for NVRTC, or why it cannot run the kernels.
fn arch_of(gpu: &Gpu) -> Result<String> {
    let (major, minor) = gpu.compute_capability()?;
    if major < 9 {
        // cvt...e4m3x2 needs sm_89; the flag protocol is tested on sm_90.
        return Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: format!("compute capability {major}.{minor}: sm_90 or newer needed"),
        });
    }
    Ok(compile::arch_for(major, minor))
}

/// Communication buffer bytes per GPU (`SWITCHYARD_CUDA_BUFFER_MB`).
fn buffer_bytes_from_env() -> usize {
    std::env::var(BUFFER_MB_ENV).ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(DEFAULT_BUFFER_MB) << 20
}

/// A zeroed communication buffer on the current GPU. Zeroed once, at creation: flags
/// start at 0 and only ever grow (seq-based), so never again.
fn new_comm_buffer(bytes: usize) -> Result<DeviceBuffer> {
    let b = DeviceBuffer::new(bytes)?;
    b.zero()?;
    Ok(b)
}

impl CudaRank {
    /// Rank `rank` of a node of `world` ranks, running on GPU `shared.gpus[gpu_slot]`.
    fn endpoint(rank: usize, world: usize, gpu_slot: usize, config: Config, shared: Arc<Shared>) -> Result<Self> {
        shared.gpus[gpu_slot].bind()?;
        Ok(CudaRank {
            rank,
            world,
            gpu_slot,
            config,
            stream: Stream::new()?,
            meta: MappedHost::new(meta::bytes(compile::MAX_EXPERTS))?,
            kernels: HashMap::new(),
            ws: Workspace::default(),
            traffic: TrafficLog::default(),
            poisoned: None,
            events: None,
            side: None,
            local_copy: LocalCopy::from_env(),
            combine: CombineChoice::from_env()?,
            dispatch: DispatchChoice::from_env()?,
            nccl: None,
            plans: on_stream::PlanCache::default(),
            device_us: 0.0,
            shared,
        })
    }

    /// One process per GPU: this process becomes rank `env.rank` of a node of
    /// `env.world_size` processes. The processes meet through
    /// [`crate::bootstrap::join_launched`] (MPI with the `mpi` feature under an MPI
    /// launcher, else the TCP rendezvous of `env`: rank 0 listens on
    /// `MASTER_ADDR:MASTER_PORT`), then set up as in [`CudaRank::from_process_group`].
    pub fn from_launch_env(env: &LaunchEnv, config: Config) -> Result<Self> {
        config.validate()?;
        let group = crate::bootstrap::join_launched(env, Duration::from_millis(config.timeout_ms))?;
        let comm_id = 0xC0DA_0000_0000 ^ ((env.master_port as u64) << 16) ^ env.world_size as u64;
        let slot = host_slot(group.hostnames(), group.rank());
        Self::from_process_group(group, slot, comm_id, config)
    }

    /// This process as one rank of a node whose ranks are the processes of `group` (all
    /// on one host), named `comm_id` in handles. It drives GPU [`gpu_for_process`] of
    /// `host_slot` (its index among the processes of its host, and their number), makes its
    /// communication buffer, and exchanges CUDA IPC handles with the others to map theirs.
    /// Collective: every rank calls it. A rank that fails to set up reports it, and every
    /// other rank fails with `PeerFailed` naming it.
    pub fn from_process_group(
        mut group: Box<dyn ProcessGroup>,
        host_slot: (usize, usize),
        comm_id: u64,
        config: Config,
    ) -> Result<Self> {
        config.validate()?;
        let (rank, world) = (group.rank(), group.world_size());
        if !(1..=layout::MAX_WORLD).contains(&world) {
            return Err(Error::InvalidArgument { arg: "WORLD_SIZE".into(), reason: format!("{world}: 1..=8 GPUs supported") });
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let hosts = group.hostnames().to_vec();
        let buffer_bytes = buffer_bytes_from_env();
        let local = (|| -> Result<(Gpu, String, DeviceBuffer, [u8; 64])> {
            let found = Topology::from_hostnames(&hosts, None)?;
            if found.num_nodes != 1 {
                return Err(Error::InvalidArgument {
                    arg: "WORLD_SIZE".into(),
                    reason: format!("the CUDA backend runs one node; the ranks are on {} hosts", found.num_nodes),
                });
            }
            if !compile::nvrtc_available() {
                return Err(Error::BackendUnavailable { backend: "cuda", reason: "libnvrtc not found".into() });
            }
            let available = driver::device_count()?;
            if available == 0 {
                return Err(Error::BackendUnavailable { backend: "cuda", reason: "no GPU present".into() });
            }
            let ordinal = gpu_for_process(host_slot.0, host_slot.1, available);
            if host_slot.1 > available {
                tracing::warn!(
                    rank,
                    gpu = ordinal,
                    processes = host_slot.1,
                    gpus = available,
                    "more processes than GPUs on this host: GPUs are shared (time-sliced), good for checking, not for timing"
                );
            }
            let gpu = Gpu::new(ordinal)?;
            check_channels(config.num_channels, &gpu)?;
            let arch = arch_of(&gpu)?;
            gpu.bind()?;
            let buffer = new_comm_buffer(buffer_bytes)?;
            let handle = buffer.ipc_handle()?;
            Ok((gpu, arch, buffer, handle))
        })();
        // Message: [0][buffer bytes u64][handle 64] when ready, [1][error text] when not.
        let msg = match &local {
            Ok((.., handle)) => [&[0u8][..], &(buffer_bytes as u64).to_le_bytes(), handle].concat(),
            Err(e) => [&[1u8][..], e.to_string().as_bytes()].concat(),
        };
        let all = group.all_gather(&msg, timeout)?;
        let (gpu, arch, buffer, _) = local?;
        let mut handles = Vec::with_capacity(world);
        for (r, m) in all.iter().enumerate() {
            match m.split_first() {
                Some((0, rest)) if rest.len() == 8 + 64 => {
                    let bytes = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
                    if bytes != buffer_bytes {
                        return Err(Error::Protocol {
                            rank,
                            detail: format!(
                                "rank {r} has a {bytes}-byte buffer, this rank {buffer_bytes}: set {BUFFER_MB_ENV} alike"
                            ),
                        });
                    }
                    handles.push(<[u8; 64]>::try_from(&rest[8..]).expect("64 bytes"));
                }
                Some((1, text)) => return Err(Error::PeerFailed { rank: r, reason: String::from_utf8_lossy(text).into_owned() }),
                _ => return Err(Error::Protocol { rank, detail: format!("rank {r} sent a malformed setup message") }),
            }
        }
        let mut bases = [0u64; layout::MAX_WORLD];
        bases[rank] = buffer.ptr();
        let mut ipc = Vec::with_capacity(world - 1);
        let mapped = (|| -> Result<()> {
            for (r, h) in handles.iter().enumerate().filter(|(r, _)| *r != rank) {
                let m = IpcMapping::open(h)?;
                bases[r] = m.ptr();
                ipc.push(m);
            }
            Ok(())
        })();
        let group = HostGroup::Processes(Mutex::new(group));
        let status = group.gather_status(rank, mapped.as_ref().err().map(|e| e.to_string()), timeout)?;
        peer::settle(rank, mapped.err(), &status)?;
        tracing::info!(rank, world, gpu = gpu.ordinal(), device = %gpu.name(), arch = %arch, buffer_mb = buffer_bytes >> 20, "cuda rank ready (one process per GPU, CUDA IPC)");
        let shared = Arc::new(Shared {
            buffers: vec![buffer],
            ipc,
            gpus: vec![gpu],
            peers: PeerMap { bases },
            group,
            buffer_bytes,
            arch,
            comm_id,
            ranks_per_gpu: 1,
        });
        Self::endpoint(rank, world, 0, config, shared)
    }
}

#[derive(Default)]
struct Workspace {
    x: Scratch,
    scales: Scratch,
    idx: Scratch,
    w: Scratch,
    pos: Scratch,
    send_base: Scratch,
    out: Scratch,
    out_w: Scratch,
    src: Scratch,
}

/// A call ready to launch: its kernel, parameters (inputs uploaded), buffer layout and the
/// copy-engine copies that go beside the kernel.
struct PreparedLaunch {
    spec: KernelSpec,
    p: SyParams,
    lay: BufferLayout,
    kernel: Kernel,
    side_ops: Vec<CopyOp>,
}

/// What a CUDA dispatch leaves in its [`Handle`].
struct CudaHandleState {
    /// Names this routing in the rank's cache of plans on the device (unique per process).
    id: u64,
    /// `[T, W]` row of each token among those sent to each rank (-1: not sent).
    pos: Vec<i32>,
    /// `[W]` start of my rows in each rank's receive area.
    send_base: Vec<i32>,
    /// Most rows any rank received (capacity check for reuse).
    max_recv_any: usize,
    /// The runs of tokens this rank sends to itself, for the own-row copies of every cached
    /// dispatch (worked out once here, not per call).
    own_runs: Vec<local_copy::Run>,
}

/// A fresh id for a handle's plan (see `CudaHandleState::id`).
fn next_handle_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Compiled CUBINs of this process, per (spec, arch): every rank thread shares one compile.
fn cubin_for(spec: &KernelSpec, arch: &str) -> Result<Arc<compile::Cubin>> {
    static CACHE: OnceLock<Mutex<HashMap<(KernelSpec, String), Arc<compile::Cubin>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().map_err(|_| Error::Cuda("kernel cache lock poisoned".into()))?;
    if let Some(c) = map.get(&(*spec, arch.to_string())) {
        return Ok(c.clone());
    }
    let c = Arc::new(compile::compile_intranode(spec, arch)?);
    for r in c.resources() {
        tracing::debug!(spec = %spec.name(), kernel = %r.name, regs = r.registers, stack = r.stack_bytes, spills = r.spill_stores + r.spill_loads, "kernel resources");
    }
    map.insert((*spec, arch.to_string()), c.clone());
    Ok(c)
}

/// Every channel is one block that spin-waits on its peers' blocks, so all of them
/// must be resident at once: 1 to one channel per SM (and the kernels' limit).
fn check_channels(channels: usize, gpu: &Gpu) -> Result<()> {
    let limit = gpu.sm_count()?.min(compile::MAX_CHANNELS);
    if channels == 0 || channels > limit {
        return Err(Error::InvalidArgument {
            arg: "num_channels".into(),
            reason: format!("{channels} channels (one SM each) do not fit: {} has 1..={limit} usable SMs", gpu.name()),
        });
    }
    Ok(())
}

/// One rank (GPU) of a [`CudaCluster`], or of a node of processes ([`CudaRank::from_launch_env`]).
pub struct CudaRank {
    rank: usize,
    world: usize,
    /// This rank's GPU in `shared.gpus`.
    gpu_slot: usize,
    config: Config,
    stream: Stream,
    meta: MappedHost,
    kernels: HashMap<KernelSpec, Kernels>,
    ws: Workspace,
    traffic: TrafficLog,
    poisoned: Option<String>,
    /// Timing events around each launch, made on first use.
    events: Option<(Event, Event)>,
    /// Device time of the current call's kernels, in microseconds.
    device_us: f64,
    /// Side stream and fork/join events for copy-engine copies beside a kernel, made on first use.
    side: Option<(Stream, Event, Event)>,
    /// Who copies own rows in dispatch.
    local_copy: LocalCopy,
    /// The combine kernel asked for in `SWITCHYARD_COMBINE` (`None`: the GPU's default).
    combine: Option<CombineChoice>,
    /// The cached-dispatch kernel asked for in `SWITCHYARD_DISPATCH` (`None`: the GPU's default).
    dispatch: Option<DispatchChoice>,
    /// The same-run NCCL baseline's communicator, made on first use.
    nccl: Option<nccl::NcclExchange>,
    /// Plans of recent handles on the device, for the calls on the caller's stream (`on_stream`).
    plans: on_stream::PlanCache,
    // Last: dropped after the stream, modules and workspaces of this rank.
    shared: Arc<Shared>,
}

impl CudaRank {
    fn gpu(&self) -> &Gpu {
        &self.shared.gpus[self.gpu_slot]
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn ensure_kernels(&mut self, spec: &KernelSpec) -> Result<()> {
        if !self.kernels.contains_key(spec) {
            let cubin = cubin_for(spec, &self.shared.arch)?;
            self.gpu().bind()?;
            let k = Kernels::load(&cubin.image)?;
            self.kernels.insert(*spec, k);
        }
        Ok(())
    }

    /// Agree with every rank that the call may go ahead; `prep` runs the local checks.
    fn agree(&mut self, prep: Result<()>) -> Result<()> {
        let own = match (&self.poisoned, prep) {
            (Some(p), _) => Some(Error::Cuda(format!("communicator unusable after an earlier failure: {p}"))),
            (None, Err(e)) => Some(e),
            (None, Ok(())) => None,
        };
        let text = own.as_ref().map(|e| e.to_string());
        let all = self.shared.group.gather_status(self.rank, text, self.timeout())?;
        peer::settle(self.rank, own, &all)
    }

    /// Start a collective call: every rank agrees its inputs are fine, then this
    /// rank binds its GPU and zeroes the call's device time.
    fn begin_call(&mut self, prep: Result<()>) -> Result<()> {
        self.agree(prep)?;
        self.gpu().bind()?;
        self.device_us = 0.0;
        Ok(())
    }

    /// Enqueue the start of one call on the device, before its first kernel: the rank's
    /// call count (the flags' epoch, kept in its buffer) goes up by one. Every rank
    /// enqueues it once per call, so the counts stay equal without the host.
    fn advance(&self, spec: &KernelSpec, p: &SyParams) -> Result<()> {
        self.kernels[spec].launch(Kernel::Advance, 1, 32, p, &self.stream)
    }

    /// [`CudaRank::advance`] on any stream of this rank's context.
    fn advance_on(&self, stream: &Stream, spec: &KernelSpec, p: &SyParams) -> Result<()> {
        self.kernels[spec].launch(Kernel::Advance, 1, 32, p, stream)
    }

    /// Wait for this rank's uploads, then for every rank: the kernels that follow spin-wait
    /// for their peers, so a rank still copying its input (pageable copies return before the
    /// DMA ends) would otherwise count as the others' device time.
    fn start_together(&mut self) -> Result<()> {
        self.stream.sync()?;
        self.agree(Ok(()))
    }

    /// Reject a call whose largest per-rank receive count does not fit this shape's receive area.
    fn check_fits(&self, spec: &KernelSpec, max_recv_any: usize) -> Result<()> {
        let cap = BufferLayout::new(spec, self.shared.buffer_bytes).max_recv;
        if max_recv_any > cap {
            return Err(Error::InvalidArgument {
                arg: BUFFER_MB_ENV.into(),
                reason: format!("{max_recv_any} rows do not fit the {cap} this buffer holds for this shape"),
            });
        }
        Ok(())
    }

    fn base_params(&self, spec: &KernelSpec, num_tokens: usize) -> (SyParams, BufferLayout) {
        let lay = BufferLayout::new(spec, self.shared.buffer_bytes);
        let mut p = SyParams {
            peers: self.shared.peers.bases,
            host_meta: self.meta.dev_ptr(),
            timeout_ns: self.config.timeout_ms.saturating_mul(1_000_000),
            num_tokens: num_tokens as u64,
            rank: self.rank as u64,
            ..Default::default()
        };
        lay.apply(&mut p);
        debug_assert!(lay.counts >= SIGNAL_SLOTS * 8);
        (p, lay)
    }

    fn channels(&self) -> u32 {
        self.config.num_channels.clamp(1, compile::MAX_CHANNELS) as u32
    }

    /// [`Communicator::time_device_resident`]: upload once, agree once, then enqueue `iters`
    /// calls back to back (each its own `advance` on the device, so the flags order them) with
    /// events around each, and wait once at the end.
    fn resident_loop(&mut self, op: ResidentOp, inp: &ResidentInputs<'_>, iters: usize) -> Result<Vec<f64>> {
        let l = match op {
            ResidentOp::DispatchCached => self.prepare_cached_dispatch(inp.x, inp.handle, inp.options)?,
            ResidentOp::Combine => self.prepare_combine(inp.y, inp.hidden, inp.handle, None)?,
        };
        let events = EventPairs::new(iters)?;
        self.meta.write(meta::DIAG, SyDiag::default());
        // One call (its `advance` included, so every replay is a call of its own) as a graph.
        let graph = match inp.graph {
            true => Some(self.ensure_side().and_then(|_| CapturedGraph::begin_capture(&self.stream)).and_then(|_| {
                let enqueued = self
                    .advance(&l.spec, &l.p)
                    .and_then(|_| self.enqueue(&l.spec, l.kernel, self.channels(), THREADS as u32, &l.p, &l.side_ops));
                CapturedGraph::end_capture(&self.stream, enqueued)
            })),
            false => None,
        }
        .transpose();
        // Every rank says whether it could capture before any launches.
        self.agree(graph.as_ref().map(|_| ()).map_err(|e| Error::Cuda(e.to_string())))?;
        let graph = graph?;
        self.start_together()?;
        let r = (|| {
            for (a, b) in events.iter() {
                a.record(&self.stream)?;
                match &graph {
                    Some(g) => g.launch(&self.stream)?,
                    None => {
                        self.advance(&l.spec, &l.p)?;
                        self.enqueue(&l.spec, l.kernel, self.channels(), THREADS as u32, &l.p, &l.side_ops)?;
                    }
                }
                b.record(&self.stream)?;
            }
            self.stream.sync()?;
            events.seconds()
        })();
        let times = r.inspect_err(|e| self.poisoned = Some(e.to_string()))?;
        self.check_device_timeout()?;
        let st = inp.handle.state::<CudaHandleState>("cuda")?;
        let (row_bytes, into) = match op {
            ResidentOp::DispatchCached => (spec_row_bytes(&l.spec), &mut self.traffic.dispatch),
            ResidentOp::Combine => (inp.hidden * 2, &mut self.traffic.combine),
        };
        count_traffic(self.rank, &rows_per_destination(self.world, &st.pos), row_bytes, iters, into);
        Ok(times)
    }

    /// [`Communicator::time_nccl_exchange`].
    fn nccl_exchange(&mut self, handle: &Handle, row_bytes: [usize; 2], iters: usize) -> Result<[Vec<f64>; 2]> {
        let world = self.world;
        let send_rows = rows_per_destination(world, &handle.state::<CudaHandleState>("cuda")?.pos);
        // Every rank's send counts: what I receive from s is what s sends me.
        let mine: Vec<u8> = send_rows.iter().flat_map(|&n| (n as u64).to_le_bytes()).collect();
        let all = self.all_gather_bytes(&mine)?;
        let recv_rows: Vec<usize> = all
            .iter()
            .map(|b| {
                let at = self.rank * 8;
                b.get(at..at + 8).map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes")) as usize).unwrap_or(0)
            })
            .collect();
        if self.nccl.is_none() {
            self.gpu().bind()?;
            // Rank 0 makes the id; every rank says whether it can go on before any waits for it.
            let id = if !nccl::nccl_available() {
                Err(Error::BackendUnavailable { backend: "cuda", reason: "libnccl not found".into() })
            } else if self.rank == 0 {
                nccl::unique_id().map(|i| i.to_vec())
            } else {
                Ok(Vec::new())
            };
            let (bytes, ready) = match id {
                Ok(b) => (b, Ok(())),
                Err(e) => (Vec::new(), Err(e)),
            };
            self.agree(ready)?;
            let ids = self.all_gather_bytes(&bytes)?;
            let id: [u8; 128] = ids[0]
                .as_slice()
                .try_into()
                .map_err(|_| Error::Protocol { rank: self.rank, detail: "rank 0 sent no NCCL id".into() })?;
            self.nccl = Some(nccl::NcclExchange::new(self.rank, world, &id)?);
        }
        self.gpu().bind()?;
        self.start_together()?;
        let x = self.nccl.as_mut().expect("made above");
        let bytes = |rows: &[usize], rb: usize| rows.iter().map(|r| r * rb).collect::<Vec<usize>>();
        let dispatch = x.time(&bytes(&send_rows, row_bytes[0]), &bytes(&recv_rows, row_bytes[0]), iters)?;
        // Combine sends each received row back to its source.
        let combine = x.time(&bytes(&recv_rows, row_bytes[1]), &bytes(&send_rows, row_bytes[1]), iters)?;
        Ok([dispatch, combine])
    }

    /// [`Communicator::measure_interference`].
    fn interference(
        &mut self,
        inp: &ResidentInputs<'_>,
        shape: gemm::GemmShape,
        channels: [usize; 2],
        iters: usize,
    ) -> Result<Interference> {
        let gemm_sms = self.gpu().sm_count()?.saturating_sub(channels[0].max(channels[1])).max(1);
        let fits = channels.iter().try_for_each(|&c| check_channels(c * self.shared.ranks_per_gpu, self.gpu()));
        self.gpu().bind()?;
        let g = fits.and_then(|_| gemm::Gemm::new(shape));
        self.agree(g.as_ref().map(|_| ()).map_err(|e| Error::Cuda(e.to_string())))?;
        let g = g?;
        // Each launch is a call of its own (its own `advance`), as in `resident_loop`.
        let d = self.prepare_cached_dispatch(inp.x, inp.handle, inp.options)?;
        let c = self.prepare_combine(inp.y, inp.hidden, inp.handle, None)?;
        self.meta.write(meta::DIAG, SyDiag::default());
        let r = (|| -> Result<Interference> {
            let pair_events = EventPairs::new(iters)?;
            let pairs = |this: &mut Self| -> Result<()> {
                for (a, b) in pair_events.iter() {
                    a.record(&this.stream)?;
                    this.advance(&d.spec, &d.p)?;
                    this.enqueue(&d.spec, d.kernel, channels[0] as u32, THREADS as u32, &d.p, &d.side_ops)?;
                    this.advance(&c.spec, &c.p)?;
                    this.enqueue(&c.spec, c.kernel, channels[1] as u32, THREADS as u32, &c.p, &c.side_ops)?;
                    b.record(&this.stream)?;
                }
                Ok(())
            };
            // Median of event pairs' times, in microseconds.
            let median_us = |ev: &[f64]| {
                let mut v = ev.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2] * 1e6
            };
            // One timed GEMM per event pair.
            let gemms = |ev: &EventPairs| -> Result<()> {
                for (a, b) in ev.iter() {
                    a.record(g.stream())?;
                    g.enqueue()?;
                    b.record(g.stream())?;
                }
                Ok(())
            };
            // GEMM alone (after two untimed ones), on every SM, then on the SMs left.
            let gemm_alone_on = |sms: usize| -> Result<f64> {
                g.set_sm_target(sms)?;
                g.enqueue()?;
                g.enqueue()?;
                let ev = EventPairs::new(iters.max(5))?;
                gemms(&ev)?;
                g.stream().sync()?;
                Ok(median_us(&ev.seconds()?))
            };
            let gemm_alone = gemm_alone_on(0)?;
            let gemm_alone_left = gemm_alone_on(gemm_sms)?;
            // The pairs alone.
            self.start_together()?;
            pairs(self)?;
            self.stream.sync()?;
            let comm_times = pair_events.seconds()?;
            let comm_alone = median_us(&comm_times);
            // Both: enough GEMMs to run from before the first pair to after the last.
            let n_both = ((comm_times.iter().sum::<f64>() * 1e6 / gemm_alone_left).ceil() as usize + 2).max(3);
            let both_events = EventPairs::new(n_both)?;
            self.start_together()?;
            gemms(&both_events)?;
            // Let the first GEMM get going, as in a layer where the communication of one
            // micro-batch starts while the experts of another compute.
            std::thread::sleep(Duration::from_secs_f64(gemm_alone_left * 0.25e-6));
            pairs(self)?;
            self.stream.sync()?;
            g.stream().sync()?;
            // The first and last GEMMs may only partly overlap the pairs: leave them out.
            let both_times = both_events.seconds()?;
            Ok(Interference {
                gemm: shape,
                channels,
                gemm_sms,
                gemm_alone_us: gemm_alone,
                gemm_left_us: gemm_alone_left,
                gemm_together_us: median_us(&both_times[1..n_both - 1]),
                comm_alone_us: comm_alone,
                comm_together_us: median_us(&pair_events.seconds()?),
            })
        })();
        let out = r.inspect_err(|e| self.poisoned = Some(e.to_string()))?;
        self.check_device_timeout()?;
        Ok(out)
    }

    /// Everything a cached dispatch does before its launch: the checks and the agreement
    /// (`begin_call`), the input and plan uploads, and the own-row copies.
    fn prepare_cached_dispatch(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<PreparedLaunch> {
        let spec = spec_for(self.world, &x, handle.topk, handle.num_experts, options);
        let prep = (|| {
            checks::dispatch_cached(self.shared.comm_id, self.rank, &x, handle, options)?;
            let st = handle.state::<CudaHandleState>("cuda")?;
            spec.validate()?;
            self.check_fits(&spec, st.max_recv_any)?;
            self.ensure_kernels(&spec)
        })();
        self.begin_call(prep)?;
        let st = handle.state::<CudaHandleState>("cuda")?;
        let (mut p, lay) = self.base_params(&spec, handle.num_tokens);
        self.upload_x(&x, &mut p)?;
        self.upload_plan(&st.pos, &st.send_base, &mut p)?;
        p.flags = 0;
        let (kernel, side_ops) = self.cached_dispatch_plan(&spec, &lay, &st.own_runs, &mut p)?;
        Ok(PreparedLaunch { spec, p, lay, kernel, side_ops })
    }

    /// Everything a combine does before its launch: the checks and the agreement, `y` (and its
    /// weights) into this rank's buffer, the plan, the output space and the kernel choice.
    fn prepare_combine(
        &mut self,
        y: &[bf16],
        hidden: usize,
        handle: &Handle,
        topk_weights: Option<&[f32]>,
    ) -> Result<PreparedLaunch> {
        let (t, k) = (handle.num_tokens, handle.topk);
        let spec =
            KernelSpec { world: self.world, hidden, topk: k, num_experts: handle.num_experts, x_fp8: false, wire_fp8: false };
        let prep = (|| {
            checks::combine(self.shared.comm_id, self.rank, y, hidden, handle, topk_weights)?;
            let st = handle.state::<CudaHandleState>("cuda")?;
            spec.validate()?;
            self.check_fits(&spec, st.max_recv_any)?;
            self.ensure_kernels(&spec)
        })();
        self.begin_call(prep)?;
        let st = handle.state::<CudaHandleState>("cuda")?;
        let (mut p, lay) = self.base_params(&spec, t);
        let own = self.shared.peers.bases[self.rank];
        // y goes into our own buffer, where peers pull it from (stream-ordered before the kernel).
        htod(own + lay.y as u64, y, &self.stream)?;
        if let Some(w) = topk_weights {
            htod(own + lay.y_w as u64, w, &self.stream)?;
            p.flags |= FLAG_WITH_WEIGHTS;
        }
        self.upload_plan(&st.pos, &st.send_base, &mut p)?;
        p.out = self.ws.out.get(t * hidden * 2)?;
        p.out_weights = self.ws.out_w.get(t * k * 4)?;
        let kernel = self.combine_kernel(&spec, handle, &lay, &mut p)?;
        Ok(PreparedLaunch { spec, p, lay, kernel, side_ops: Vec::new() })
    }

    /// Which combine kernel runs, with its extra inputs set on `p`: see [`CombineChoice`];
    /// push only when every (token, rank) slot fits the buffer.
    fn combine_kernel(&mut self, spec: &KernelSpec, handle: &Handle, lay: &BufferLayout, p: &mut SyParams) -> Result<Kernel> {
        let push = handle.num_tokens * self.world <= lay.max_recv && self.combine == Some(CombineChoice::Push);
        if !push {
            return self.pull_kernel(spec);
        }
        let info: Vec<i32> =
            handle.source_rank.iter().zip(&handle.source_token).flat_map(|(&r, &t)| [r as i32, t as i32]).collect();
        p.src_info = self.ws.src.get(info.len() * 4)?;
        htod(p.src_info, &info, &self.stream)?;
        p.num_recv = handle.num_recv() as u64;
        Ok(Kernel::CombinePush)
    }

    /// The kernel and own-row copies of a cached dispatch with parameters `p` (`p.x` set):
    /// `sy_dispatch_bulk` with a copy engine moving the own rows where that kernel was built
    /// (sm_90 and later, BF16 rows), the input is 16-byte aligned (as bulk copies need), the own
    /// rows form at most [`local_copy::MAX_RUNS`] runs and the copy engine pays here
    /// ([`LocalCopy::allows_bulk_dispatch`]; `SWITCHYARD_DISPATCH=bulk` skips that test,
    /// `SWITCHYARD_DISPATCH=stores` or `SWITCHYARD_LOCAL_COPY=kernel` rule the kernel out);
    /// `sy_dispatch` with [`CudaRank::own_row_copies`] otherwise.
    /// Asking for `bulk` where it was not built is an error; the other cases fall back quietly.
    fn cached_dispatch_plan(
        &self,
        spec: &KernelSpec,
        lay: &BufferLayout,
        runs: &[local_copy::Run],
        p: &mut SyParams,
    ) -> Result<(Kernel, Vec<CopyOp>)> {
        let built = self.kernels[spec].has_dispatch_bulk();
        if self.dispatch == Some(DispatchChoice::Bulk) && !built {
            return Err(Error::InvalidArgument {
                arg: DISPATCH_ENV.into(),
                reason: format!("bulk needs bulk copies (sm_90 or later; this GPU is {}) and BF16 rows", self.shared.arch),
            });
        }
        let bulk = built
            && p.x % 16 == 0
            && runs.len() <= local_copy::MAX_RUNS
            && match self.dispatch {
                Some(DispatchChoice::Stores) => false,
                Some(DispatchChoice::Bulk) => self.local_copy != LocalCopy::Kernel,
                None => self.local_copy.allows_bulk_dispatch(self.channels() as usize, p.num_tokens as usize),
            };
        if bulk {
            return Ok((Kernel::DispatchBulk, self.own_row_copy_ops(spec, lay, runs, p)));
        }
        Ok((Kernel::Dispatch, self.own_row_copies(spec, lay, runs, p)))
    }

    /// The pulling combine kernel for `spec`'s build: the bulk-copy one where it was built
    /// (unless `SWITCHYARD_COMBINE=pull`), the register one otherwise. Asking for `bulk` on a
    /// GPU without bulk copies is an error.
    fn pull_kernel(&self, spec: &KernelSpec) -> Result<Kernel> {
        let built = self.kernels[spec].has_combine_bulk();
        match self.combine {
            Some(CombineChoice::Pull) => Ok(Kernel::Combine),
            Some(CombineChoice::Bulk) if !built => Err(Error::InvalidArgument {
                arg: COMBINE_ENV.into(),
                reason: format!("bulk needs bulk copies (sm_90 or later); this GPU is {}", self.shared.arch),
            }),
            _ if built => Ok(Kernel::CombineBulk),
            _ => Ok(Kernel::Combine),
        }
    }

    /// Enqueue one kernel on this rank's stream, with `side_ops` copy-engine copies beside it
    /// (forked before the kernel so they overlap it, joined after it). No host wait.
    fn enqueue(
        &mut self,
        spec: &KernelSpec,
        which: Kernel,
        grid: u32,
        block: u32,
        p: &SyParams,
        side_ops: &[CopyOp],
    ) -> Result<()> {
        if !side_ops.is_empty() {
            self.ensure_side()?;
        }
        self.enqueue_on(&self.stream, spec, which, grid, block, p, side_ops)
    }

    /// [`CudaRank::enqueue`] on any stream of this rank's context; the side stream must
    /// exist when there are `side_ops` ([`CudaRank::ensure_side`]).
    #[allow(clippy::too_many_arguments)]
    fn enqueue_on(
        &self,
        stream: &Stream,
        spec: &KernelSpec,
        which: Kernel,
        grid: u32,
        block: u32,
        p: &SyParams,
        side_ops: &[CopyOp],
    ) -> Result<()> {
        let side = match side_ops.is_empty() {
            true => None,
            false => Some(self.side.as_ref().ok_or_else(|| Error::Cuda("side stream not made before enqueue".into()))?),
        };
        if let Some((_, fork, _)) = side {
            fork.record(stream)?;
        }
        // The kernel goes out first: its peers wait for it, while the copies are only waited for at the end.
        self.kernels[spec].launch(which, grid, block, p, stream)?;
        if let Some((side, fork, join)) = side {
            side.wait_event(fork)?;
            for op in side_ops {
                dtod_async(op.dst, op.src, op.bytes, side)?;
            }
            join.record(side)?;
            stream.wait_event(join)?;
        }
        Ok(())
    }

    /// Make the side stream and its fork/join events (not while a stream captures: they are made first).
    fn ensure_side(&mut self) -> Result<()> {
        if self.side.is_none() {
            self.side = Some((Stream::new()?, Event::new()?, Event::new()?));
        }
        Ok(())
    }

    /// Launch, wait, and turn a device-side timeout into `Error::Timeout`.
    fn run(&mut self, spec: &KernelSpec, which: Kernel, grid: u32, block: u32, p: &SyParams, side_ops: &[CopyOp]) -> Result<()> {
        self.meta.write(meta::DIAG, SyDiag::default());
        if self.events.is_none() {
            self.events = Some((Event::new()?, Event::new()?));
        }
        let host_launch_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let r = (|| {
            let (start, _) = self.events.as_ref().expect("created above");
            start.record(&self.stream)?;
            self.enqueue(spec, which, grid, block, p, side_ops)?;
            let (start, end) = self.events.as_ref().expect("created above");
            end.record(&self.stream)?;
            self.stream.sync()?;
            end.elapsed_ms_since(start)
        })();
        let r = r.map(|ms| self.device_us += ms as f64 * 1e3);
        if r.is_ok() && which != Kernel::Notify && tracing::enabled!(tracing::Level::DEBUG) {
            let [entry, ready, done]: [u64; 3] = std::array::from_fn(|i| self.meta.read::<u64>(meta::STAMPS + 8 * i));
            tracing::debug!(
                rank = self.rank,
                kernel = ?which,
                // The global timer follows the host clock on current drivers, so these compare across GPUs.
                host_launch_ns,
                entry_ns = entry,
                wait_peers_us = ready.wrapping_sub(entry) as f64 / 1e3,
                own_work_us = done.wrapping_sub(ready) as f64 / 1e3,
                event_us = self.device_us,
                "where the time went (block 0)"
            );
        }
        if let Err(e) = r {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.check_device_timeout()
    }

    /// After the stream is synchronized: the call's error if a device wait timed out.
    fn check_device_timeout(&mut self) -> Result<()> {
        let d: SyDiag = self.meta.read(meta::DIAG);
        if d.timed_out != 0 {
            let role = match d.role {
                0 => Role::Sender,
                1 => Role::Forwarder,
                2 => Role::Receiver,
                _ => Role::Notify,
            };
            let e = Error::Timeout {
                timeout_ms: self.config.timeout_ms,
                diag: WaitDiagnostic {
                    rank: d.rank as usize,
                    channel: d.channel as usize,
                    role,
                    head: d.head,
                    tail: d.tail,
                    // The wait's name says which kernel and phase it was.
                    detail: format!("{} (peer {}, call {})", layout::wait_name(d.what), d.peer, d.seq),
                },
            };
            tracing::error!(error = %e, "device wait timed out");
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    fn upload_x(&mut self, x: &RowsRef<'_>, p: &mut SyParams) -> Result<()> {
        let s = &self.stream;
        match *x {
            RowsRef::Bf16 { data, .. } => {
                p.x = self.ws.x.get(data.len() * 2)?;
                htod(p.x, data, s)?;
            }
            RowsRef::Fp8 { data, scales, .. } => {
                p.x = self.ws.x.get(data.len())?;
                htod(p.x, data, s)?;
                p.x_scales = self.ws.scales.get(scales.len() * 4)?;
                htod(p.x_scales, scales, s)?;
            }
        }
        Ok(())
    }

    /// The runs of tokens this rank sends to itself ([`local_copy::own_runs`]).
    fn own_runs(&self, pos: &[i32], send_base: &[i32]) -> Vec<local_copy::Run> {
        local_copy::own_runs(pos, self.world, self.rank, send_base[self.rank] as usize)
    }

    /// Copy-engine copies of this rank's own rows (and scales), if the [`LocalCopy`] policy picks
    /// them for `sy_dispatch` ([`CudaRank::own_row_copy_ops`]). `p.x` must be set.
    fn own_row_copies(&self, spec: &KernelSpec, lay: &BufferLayout, runs: &[local_copy::Run], p: &mut SyParams) -> Vec<CopyOp> {
        // BF16 rows only: FP8 rows bring a scales copy per run, and measured slower that way
        // (HT-A, 12 SMs: 182 us with copy-engine copies, 118 us with the kernel; docs/perf-notes.md).
        if !self.local_copy.use_copy_engine(runs, !spec.x_fp8 && !spec.wire_fp8, self.channels() as usize) {
            return Vec::new();
        }
        self.own_row_copy_ops(spec, lay, runs, p)
    }

    /// The copies that move the own rows (and scales) of `runs`; sets `FLAG_SKIP_LOCAL` on `p` so
    /// the kernel leaves those rows alone. `p.x` must be set.
    fn own_row_copy_ops(&self, spec: &KernelSpec, lay: &BufferLayout, runs: &[local_copy::Run], p: &mut SyParams) -> Vec<CopyOp> {
        let own = self.shared.peers.bases[self.rank];
        let wire_row = if spec.wire_fp8 { spec.hidden } else { spec.hidden * 2 };
        let mut arrays = vec![RowArrays { src: p.x, dst: own + lay.recv_x as u64, bytes: wire_row }];
        if spec.x_fp8 {
            arrays.push(RowArrays { src: p.x_scales, dst: own + lay.recv_scales as u64, bytes: spec.hidden / 128 * 4 });
        }
        p.flags |= FLAG_SKIP_LOCAL;
        tracing::debug!(runs = runs.len(), "own rows by copy engine");
        local_copy::copy_ops(runs, &arrays)
    }

    fn upload_plan(&mut self, pos: &[i32], send_base: &[i32], p: &mut SyParams) -> Result<()> {
        p.pos = self.ws.pos.get(pos.len() * 4)?;
        htod(p.pos, pos, &self.stream)?;
        p.send_base = self.ws.send_base.get(send_base.len() * 4)?;
        htod(p.send_base, send_base, &self.stream)
    }

    fn read_rows(&self, spec: &KernelSpec, lay: &BufferLayout, n: usize, hidden: usize) -> Result<Rows> {
        let own = self.shared.peers.bases[self.rank];
        let dtype = if spec.wire_fp8 { DType::Fp8 } else { DType::Bf16 };
        let scales = if spec.wire_fp8 { own + lay.recv_scales as u64 } else { 0 };
        DeviceRows { data: own + lay.recv_x as u64, scales, dtype, hidden, num_rows: n }.download(&self.stream)
    }
}

impl CudaRank {
    /// How many calls this rank has started on the device: its call count, which every
    /// call (and every replay of a captured call) raises by one and whose value the
    /// call's flags carry. Equal on every rank between calls. Waits for this rank's stream.
    pub fn calls_on_device(&self) -> Result<u64> {
        self.gpu().bind()?;
        let mut count = [0u64];
        dtoh(&mut count, self.shared.peers.bases[self.rank] + layout::CALL_COUNT_OFFSET as u64, &self.stream)?;
        Ok(count[0])
    }
}

impl Drop for CudaRank {
    fn drop(&mut self) {
        // Module unload and stream destroy act on the current context: make it ours.
        let _ = self.gpu().bind();
    }
}

fn spec_for(world: usize, x: &RowsRef<'_>, topk: usize, num_experts: usize, options: &DispatchOptions) -> KernelSpec {
    let x_fp8 = x.dtype() == DType::Fp8;
    KernelSpec { world, hidden: x.hidden(), topk, num_experts, x_fp8, wire_fp8: x_fp8 || options.fp8_on_wire }
}

impl Communicator for CudaRank {
    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn topology(&self) -> Topology {
        Topology { num_nodes: 1, ranks_per_node: self.world }
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn dispatch(
        &mut self,
        x: RowsRef<'_>,
        topk_idx: &[i64],
        topk_weights: &[f32],
        layout: &Layout,
        options: &DispatchOptions,
    ) -> Result<(DispatchOutput, Handle)> {
        let (t, k, e) = (layout.num_tokens, layout.topk, layout.num_experts);
        let spec = spec_for(self.world, &x, k, e, options);
        let prep = (|| {
            checks::dispatch(self.topology(), &x, topk_idx, topk_weights, layout, options)?;
            spec.validate()?;
            self.ensure_kernels(&spec)
        })();
        self.begin_call(prep)?;
        let (mut p, lay) = self.base_params(&spec, t);
        self.upload_x(&x, &mut p)?;
        p.topk_idx = self.ws.idx.get(topk_idx.len() * 8)?;
        htod(p.topk_idx, topk_idx, &self.stream)?;
        p.topk_weights = self.ws.w.get(topk_weights.len() * 4)?;
        htod(p.topk_weights, topk_weights, &self.stream)?;
        p.pos = self.ws.pos.get(t * self.world * 4)?;
        p.send_base = self.ws.send_base.get(self.world * 4)?;

        self.start_together()?;
        self.advance(&spec, &p)?;
        self.run(&spec, Kernel::Notify, 1, NOTIFY_THREADS as u32, &p, &[])?;
        let num_recv = self.meta.read::<i32>(meta::NUM_RECV) as usize;
        let max_recv_any = self.meta.read::<i32>(meta::MAX_RECV_ANY) as usize;
        let send_base: Vec<i32> = (0..self.world).map(|d| self.meta.read::<i32>(meta::SEND_BASE + 4 * d)).collect();
        let epr = e / self.world;
        let align = options.expert_alignment.max(1);
        let tokens_per_expert: Vec<usize> =
            (0..epr).map(|i| (self.meta.read::<i32>(meta::TPE + 4 * i) as usize).div_ceil(align) * align).collect();
        let mut pos = vec![0i32; t * self.world];
        dtoh(&mut pos, p.pos, &self.stream)?;
        if max_recv_any > lay.max_recv {
            // Every rank sees the same counts matrix, so every rank stops here together.
            return Err(Error::InvalidArgument {
                arg: BUFFER_MB_ENV.into(),
                reason: format!("a rank receives {max_recv_any} rows; the buffer holds {} for this shape", lay.max_recv),
            });
        }

        p.flags = FLAG_WRITE_META;
        let own_runs = self.own_runs(&pos, &send_base);
        let side_ops = self.own_row_copies(&spec, &lay, &own_runs, &mut p);
        self.start_together()?;
        self.run(&spec, Kernel::Dispatch, self.channels(), THREADS as u32, &p, &side_ops)?;

        let rows = self.read_rows(&spec, &lay, num_recv, spec.hidden)?;
        let own = self.shared.peers.bases[self.rank];
        let mut idx32 = vec![0i32; num_recv * k];
        dtoh(&mut idx32, own + lay.recv_idx as u64, &self.stream)?;
        let mut w = vec![0f32; num_recv * k];
        dtoh(&mut w, own + lay.recv_w as u64, &self.stream)?;
        let mut src = vec![0i32; num_recv * 2];
        dtoh(&mut src, own + lay.recv_src as u64, &self.stream)?;

        let row_bytes = spec_row_bytes(&spec) + k * 8 + 8;
        count_traffic(self.rank, &rows_per_destination(self.world, &pos), row_bytes, 1, &mut self.traffic.dispatch);

        let out = DispatchOutput {
            x: rows,
            topk_idx: idx32.iter().map(|&v| v as i64).collect(),
            topk_weights: w,
            tokens_per_expert,
            source_rank: src.iter().step_by(2).map(|&v| v as u32).collect(),
            source_token: src.iter().skip(1).step_by(2).map(|&v| v as u32).collect(),
        };
        let handle = Handle {
            comm_id: self.shared.comm_id,
            rank: self.rank,
            topology: self.topology(),
            num_tokens: t,
            topk: k,
            num_experts: e,
            source_rank: out.source_rank.clone(),
            source_token: out.source_token.clone(),
            backend_state: Arc::new(CudaHandleState { id: next_handle_id(), pos, send_base, max_recv_any, own_runs }),
        };
        Ok((out, handle))
    }

    fn dispatch_cached(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<Rows> {
        let l = self.prepare_cached_dispatch(x, handle, options)?;
        self.start_together()?;
        self.advance(&l.spec, &l.p)?;
        self.run(&l.spec, l.kernel, self.channels(), THREADS as u32, &l.p, &l.side_ops)?;
        let st = handle.state::<CudaHandleState>("cuda")?;
        count_traffic(
            self.rank,
            &rows_per_destination(self.world, &st.pos),
            spec_row_bytes(&l.spec),
            1,
            &mut self.traffic.dispatch,
        );
        self.read_rows(&l.spec, &l.lay, handle.num_recv(), l.spec.hidden)
    }

    fn combine(&mut self, y: &[bf16], hidden: usize, handle: &Handle, topk_weights: Option<&[f32]>) -> Result<CombineOutput> {
        let (t, k) = (handle.num_tokens, handle.topk);
        let l = self.prepare_combine(y, hidden, handle, topk_weights)?;
        self.start_together()?;
        self.advance(&l.spec, &l.p)?;
        self.run(&l.spec, l.kernel, self.channels(), THREADS as u32, &l.p, &[])?;
        let mut x = vec![bf16::ZERO; t * hidden];
        dtoh(&mut x, l.p.out, &self.stream)?;
        let weights = match topk_weights {
            Some(_) => {
                let mut w = vec![0f32; t * k];
                dtoh(&mut w, l.p.out_weights, &self.stream)?;
                Some(w)
            }
            None => None,
        };
        // Rows that crossed back to us: one per (token, rank it went to).
        let st = handle.state::<CudaHandleState>("cuda")?;
        count_traffic(self.rank, &rows_per_destination(self.world, &st.pos), hidden * 2, 1, &mut self.traffic.combine);
        Ok(CombineOutput { x, topk_weights: weights })
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn device_time_us(&self) -> Option<f64> {
        Some(self.device_us)
    }

    fn time_device_resident(&mut self, op: ResidentOp, inputs: &ResidentInputs<'_>, iters: usize) -> Option<Result<Vec<f64>>> {
        Some(self.resident_loop(op, inputs, iters))
    }

    fn time_nccl_exchange(&mut self, handle: &Handle, row_bytes: [usize; 2], iters: usize) -> Option<Result<[Vec<f64>; 2]>> {
        Some(self.nccl_exchange(handle, row_bytes, iters.max(1)))
    }

    fn measure_interference(
        &mut self,
        inputs: &ResidentInputs<'_>,
        gemm: gemm::GemmShape,
        channels: [usize; 2],
        iters: usize,
    ) -> Option<Result<Interference>> {
        Some(self.interference(inputs, gemm, channels, iters.max(1)))
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        let fits = check_channels(config.num_channels * self.shared.ranks_per_gpu, self.gpu());
        checks::agree_on_config(self, &config, fits)?;
        self.config = config;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.agree(Ok(()))
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.shared.group.all_gather(self.rank, bytes.to_vec(), self.timeout())
    }

    fn traffic(&self) -> &TrafficLog {
        &self.traffic
    }

    fn reset_traffic(&mut self) {
        self.traffic = TrafficLog::default();
    }
}

/// Rows a plan sends to each rank: the (token, destination) entries of `pos`
/// (`[T][world]`, -1: not sent).
fn rows_per_destination(world: usize, pos: &[i32]) -> Vec<usize> {
    let mut rows = vec![0usize; world];
    for row in pos.chunks_exact(world) {
        for (d, &q) in row.iter().enumerate() {
            rows[d] += usize::from(q >= 0);
        }
    }
    rows
}

/// Add `calls` calls' rows to `into`: `rows[d]` rows of `row_bytes` to each rank `d`,
/// to this rank (local) or over NVLink (intra-node).
fn count_traffic(rank: usize, rows: &[usize], row_bytes: usize, calls: usize, into: &mut Traffic) {
    for (d, &n) in rows.iter().enumerate() {
        let n = (n * calls) as u64;
        let hop = HopCount { rows: n, bytes: n * row_bytes as u64 };
        if d == rank {
            into.local += hop;
        } else {
            into.intra_node += hop;
        }
    }
}

fn spec_row_bytes(spec: &KernelSpec) -> usize {
    if spec.wire_fp8 { DType::Fp8 } else { DType::Bf16 }.row_bytes(spec.hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_counts_every_sent_row_once_per_call() {
        // 3 tokens x 3 ranks; rank 1 is this one.
        let pos = [0, -1, 2, -1, 5, 1, 4, 3, -1];
        assert_eq!(rows_per_destination(3, &pos), vec![2, 2, 2]);
        let mut t = Traffic::default();
        count_traffic(1, &rows_per_destination(3, &pos), 10, 3, &mut t);
        // Row by row: 6 rows per call, 2 of them to this rank, over 3 calls.
        assert_eq!(t.local, HopCount { rows: 6, bytes: 60 });
        assert_eq!(t.intra_node, HopCount { rows: 12, bytes: 120 });
        assert_eq!(
            spec_row_bytes(&KernelSpec { world: 2, hidden: 256, topk: 8, num_experts: 16, x_fp8: false, wire_fp8: true }),
            264
        );
    }

    #[test]
    fn processes_share_gpus_in_blocks_only_when_there_are_more_of_them() {
        // One GPU each while they last.
        assert_eq!((0..4).map(|p| gpu_for_process(p, 4, 8)).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // 2 emulated nodes x 2 ranks on 2 GPUs: each node on its own GPU, each rail across both.
        assert_eq!((0..4).map(|p| gpu_for_process(p, 4, 2)).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
        assert_eq!((0..8).map(|p| gpu_for_process(p, 8, 1)).collect::<Vec<_>>(), vec![0; 8]);
        let hosts: Vec<String> = ["a", "a", "b", "b", "b"].iter().map(|h| h.to_string()).collect();
        assert_eq!((0..5).map(|r| host_slot(&hosts, r)).collect::<Vec<_>>(), vec![(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]);
    }

    #[test]
    fn the_rail_choice_names_its_variable_when_it_is_wrong() {
        assert_eq!(RailChoice::parse(None).unwrap(), RailChoice::Nccl);
        assert_eq!(RailChoice::parse(Some("host")).unwrap(), RailChoice::Host);
        let e = RailChoice::parse(Some("ib")).unwrap_err().to_string();
        assert!(e.contains(RAIL_ENV) && e.contains("`ib`"), "{e}");
    }

    #[test]
    fn the_dispatch_choice_names_its_variable_when_it_is_wrong() {
        assert_eq!(DispatchChoice::parse(None).unwrap(), None);
        assert_eq!(DispatchChoice::parse(Some("bulk")).unwrap(), Some(DispatchChoice::Bulk));
        assert_eq!(DispatchChoice::parse(Some("stores")).unwrap(), Some(DispatchChoice::Stores));
        let e = DispatchChoice::parse(Some("tma")).unwrap_err().to_string();
        assert!(e.contains(DISPATCH_ENV) && e.contains("\"tma\""), "{e}");
    }

    #[test]
    fn the_combine_choice_names_its_variable_when_it_is_wrong() {
        assert_eq!(CombineChoice::parse(None).unwrap(), None);
        assert_eq!(CombineChoice::parse(Some("bulk")).unwrap(), Some(CombineChoice::Bulk));
        assert_eq!(CombineChoice::parse(Some("pull")).unwrap(), Some(CombineChoice::Pull));
        assert_eq!(CombineChoice::parse(Some("push")).unwrap(), Some(CombineChoice::Push));
        let e = CombineChoice::parse(Some("tma")).unwrap_err().to_string();
        assert!(e.contains(COMBINE_ENV) && e.contains("\"tma\""), "{e}");
    }

    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        // On a machine without the driver this must come back as a value.
        if driver::driver_available() {
            return;
        }
        match CudaCluster::new(2, Config::default()) {
            Err(Error::BackendUnavailable { backend: "cuda", .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("no driver, yet a cluster"),
        }
    }
}
