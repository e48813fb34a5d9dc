//! `switchyard`: benchmark, conformance check and machine info for the
//! switchyard expert-parallel all-to-all runtime.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod tune;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{info, warn};

use switchyard::bench::{self, BenchSpec, OpConfigs, Report};
use switchyard::bootstrap::LaunchEnv;
use switchyard::config::{ConfigKey, PartialConfig, Resolver, TunedOp};
use switchyard::probe::{self, BackendChoice, BackendKind};
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{conformance, Config, DType, Error, Topology};

const EXIT_HELP: &str = "Exit status: 0 on success; 1 when results are wrong (bench --check) or \
conformance cases fail (check); 2 on any error (bad arguments, backend unavailable, I/O).\n\
Logs go to stderr (RUST_LOG, default `info`; under a launcher `warn` on ranks other than 0); tables go to stdout.\n\
Under mpirun, srun or torchrun every command runs one rank per process (see README: Launching).";

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Expert-parallel all-to-all (MoE dispatch/combine): benchmark, check, info", after_help = EXIT_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Time dispatch, cached dispatch and combine; print one row per op (nccl-tests style).
    Bench(BenchArgs),
    /// Run the conformance cases against the serial oracle; one line per case (under a launcher:
    /// the cases with as many ranks as processes).
    Check(CheckArgs),
    /// Show the version, usable backends, CUDA libraries found, GPUs and peer access.
    Info,
    /// Sweep channels (SMs) and chunk sizes for given shapes; write the best as config entries.
    Tune(tune::TuneArgs),
    /// Draw a tune's time-vs-channels plot (PNG) from its curve JSON.
    Plot(tune::PlotArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "GB/s = bytes / median iteration time, summed over all ranks of the group. \
logical = bytes of rows delivered to receivers (incl. local ones); inter-node / intra-node = bytes \
that crossed that hop (backend traffic counters). x memcpy = logical GB/s / memcpy GB/s measured in \
the same run with one copying thread per rank.\n\nConfig, knob by knob, first that says wins: --channels/--chunk-tokens/\
--buffer-tokens > --config FILE (or SWITCHYARD_CONFIG; the entry matching the op, then its top-level knobs) > the tuned \
file `switchyard tune` wrote (tuned.toml in the cache dir, the same way) > the analytic default. Dispatch and cached \
dispatch share the dispatch config; combine has its own. The choice and its origins are logged at info.")]
struct BenchArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// Tokens per rank.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Hidden size (elements per token row; a multiple of 128 for fp8).
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Experts per token (k).
    #[arg(long, default_value_t = 8)]
    topk: usize,
    /// Total experts (a multiple of the number of ranks).
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Row type of the dispatched rows (fp8: E4M3 with one f32 scale per 128; combine is always bf16).
    #[arg(long, value_enum, default_value_t = DType::Bf16)]
    dtype: DType,
    /// Send BF16 input as FP8 (E4M3, 1x128 scales), quantized inside dispatch.
    #[arg(long)]
    fp8_on_wire: bool,
    /// Routing of the generated workload.
    #[arg(long, value_enum, default_value_t = RoutingKind::Uniform)]
    routing: RoutingKind,
    /// Node limit M for node-limited routing [default: min(4, nodes)].
    #[arg(long)]
    max_nodes: Option<usize>,
    /// Workload seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Untimed iterations per op.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed iterations per op.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// After timing, run each op once more and compare with the serial oracle (fills #wrong).
    #[arg(long)]
    check: bool,
    /// Write the results as JSON (schema 1, see README) to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Config TOML file (schema in README, "Config").
    #[arg(long, value_name = "FILE", env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Channels, for every op (on CUDA one SM each; overrides the config files).
    #[arg(long, visible_alias = "num-sms")]
    channels: Option<usize>,
    /// Tokens per chunk (overrides the config file).
    #[arg(long)]
    chunk_tokens: Option<usize>,
    /// Channel buffer capacity in tokens (overrides the config file).
    #[arg(long)]
    buffer_tokens: Option<usize>,
    /// Also time, in the same run, a grouped NCCL send/recv (cudarc) of the bytes cached dispatch
    /// and combine move (CUDA); on several nodes, of the bytes their NCCL rail carries, with the
    /// hop efficiency and op / slower hop.
    #[arg(long)]
    nccl: bool,
    /// Time cached dispatch and combine (CUDA, device-resident) as replays of one call
    /// captured in a CUDA graph: no host work between calls.
    #[arg(long)]
    graph: bool,
    /// Also measure the interference with the expert GEMM (CUDA): a cuBLAS BF16 GEMM on another
    /// stream beside back-to-back cached dispatch + combine, each alone and both at once, at the
    /// configs in force and at each --interference-sms.
    #[arg(long)]
    interference: bool,
    /// GEMM of --interference, M,N,K.
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [8192usize, 8192, 7168])]
    gemm: Vec<usize>,
    /// Further SM counts (dispatch and combine alike) for --interference.
    #[arg(long, value_delimiter = ',', default_values_t = [24usize])]
    interference_sms: Vec<usize>,
}

/// The group a command runs on (`bench`, `tune`).
#[derive(Args, Debug)]
struct GroupArgs {
    /// Backend: cpu, cuda (NVLink inside a node; several nodes as processes, the rail hop between
    /// nodes through NCCL, or the host with SWITCHYARD_RAIL=host), or auto (cuda if usable, else cpu).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Number of nodes [default: cpu 2, cuda 1; processes under a launcher: the launched processes
    /// / ranks per node]. On one host the nodes are emulated; CUDA processes share the host's GPUs
    /// when there are more processes than GPUs (consecutive processes on one GPU).
    #[arg(long)]
    nodes: Option<usize>,
    /// Ranks per node [default: cpu 2, cuda the number of visible GPUs; processes under a
    /// launcher: the processes per host, and N splits them into emulated nodes of N consecutive ranks].
    #[arg(long)]
    ranks_per_node: Option<usize>,
    /// CUDA ranks: `processes` (one process per rank: under a launcher that sets RANK/WORLD_SIZE/
    /// MASTER_ADDR/MASTER_PORT this process is one rank, otherwise it spawns one worker per rank),
    /// `threads` (every GPU driven by a thread of this process), or `auto` (= processes).
    #[arg(long, value_enum, default_value_t = Launch::Auto)]
    launch: Launch,
}

impl GroupArgs {
    /// The backend and the topology, with the defaults per backend: 2 emulated nodes x 2
    /// ranks on the CPU, one node of every GPU on CUDA; under a launcher the CPU ranks
    /// are its processes, in nodes of the processes per host unless the flags say otherwise.
    fn resolve(&self) -> Result<(BackendKind, Topology), Error> {
        let backend = choose_backend(self.backend)?;
        let (nodes, ranks_per_node) = match (backend, LaunchEnv::from_env()?) {
            (BackendKind::Cpu, Some(env)) => launched_shape(self.nodes, self.ranks_per_node, &env)?,
            (BackendKind::Cpu, None) => (self.nodes.unwrap_or(2), self.ranks_per_node.unwrap_or(2)),
            (BackendKind::Cuda, Some(env)) if self.launch != Launch::Threads => {
                launched_shape(self.nodes, self.ranks_per_node, &env)?
            }
            (BackendKind::Cuda, _) => (self.nodes.unwrap_or(1), self.ranks_per_node.unwrap_or_else(|| probe::probe().gpus.len())),
        };
        Ok((backend, Topology::new(nodes, ranks_per_node)?))
    }

    /// How this process takes part: it spawned one worker per GPU and they are done
    /// (`Err(exit status)`), or it runs ranks itself (`Ok`: the launcher's view of this
    /// process, `None` for threads of this process, and whether the ranks are processes).
    fn take_part(&self, backend: BackendKind, topology: Topology) -> Result<Result<(Option<LaunchEnv>, bool), ExitCode>, Error> {
        let launch_env = LaunchEnv::from_env()?;
        let processes = match backend {
            BackendKind::Cpu => launch_env.is_some(),
            BackendKind::Cuda => self.launch != Launch::Threads,
        };
        if processes && launch_env.is_none() {
            return spawn_workers(topology.world()).map(Err);
        }
        Ok(Ok((launch_env, processes)))
    }
}

/// Nodes x ranks per node of a CPU job whose ranks are the launcher's processes:
/// `--ranks-per-node`, else `--nodes`, else the launcher's processes per host.
fn launched_shape(nodes: Option<usize>, ranks_per_node: Option<usize>, env: &LaunchEnv) -> Result<(usize, usize), Error> {
    let world = env.world_size;
    let bad = |reason: String| Error::InvalidArgument { arg: "--nodes/--ranks-per-node".into(), reason };
    let rpn = match (ranks_per_node, nodes) {
        (Some(r), _) => r,
        (None, Some(n)) if n > 0 && world % n == 0 => world / n,
        (None, Some(n)) => return Err(bad(format!("{world} launched processes do not split into {n} nodes"))),
        (None, None) => env.local_world_size.unwrap_or(world),
    };
    if rpn == 0 || world % rpn != 0 {
        return Err(bad(format!("{world} launched processes do not split into nodes of {rpn}")));
    }
    if let Some(n) = nodes.filter(|&n| n * rpn != world) {
        return Err(bad(format!("{n} nodes x {rpn} ranks is not the {world} launched processes")));
    }
    Ok((world / rpn, rpn))
}

/// How the CUDA backend's ranks are laid out over processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Launch {
    Auto,
    Processes,
    Threads,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Backend: cpu, cuda, or auto (cuda if usable, else cpu). CUDA processes run the cases with as
    /// many ranks as there are processes (one node or several); threads every one-node case, its ranks
    /// round robin over the GPUs (several ranks share a GPU when there are fewer GPUs than ranks).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Run only the cases whose name contains this text.
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// CUDA ranks: `processes` (one process per GPU, spawned unless a launcher set RANK/WORLD_SIZE;
    /// one set of communicators per node shape runs the cases) or `threads` (a fresh cluster of threads per case);
    /// `auto` = processes.
    #[arg(long, value_enum, default_value_t = Launch::Auto)]
    launch: Launch,
}

fn main() -> ExitCode {
    // Before any CUDA call (the driver reads it once): with fewer hardware queues than the
    // streams of the ranks sharing a GPU, a rank's kernel can queue behind another rank's
    // spinning one until the deadline. 32 is the driver's maximum; a value set outside wins.
    if std::env::var_os(switchyard::backend::cuda::MAX_CONNECTIONS_ENV).is_none() {
        std::env::set_var(switchyard::backend::cuda::MAX_CONNECTIONS_ENV, "32");
    }
    let cli = Cli::parse();
    init_logging();
    let result = match cli.cmd {
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Check(a) => cmd_check(a),
        Cmd::Info => cmd_info(),
        Cmd::Tune(a) => tune::cmd_tune(a),
        Cmd::Plot(a) => tune::cmd_plot(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, `RUST_LOG` or `info`; under a launcher only rank 0 logs `info` by
/// default (the others `warn`), so one job prints one account, not one per rank.
fn init_logging() {
    let launched_rank = LaunchEnv::from_env().ok().flatten().map(|e| e.rank);
    let default = if launched_rank.unwrap_or(0) == 0 { "info" } else { "warn" };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn choose_backend(choice: BackendChoice) -> Result<BackendKind, Error> {
    let (kind, why) = probe::resolve_backend(choice, probe::probe)?;
    info!("backend {}: {why}", kind.name());
    Ok(kind)
}

/// The device name config entries are keyed by: the first GPU's name, or "cpu".
fn device_name(backend: BackendKind) -> String {
    match backend {
        BackendKind::Cpu => switchyard::config::resolve::CPU_DEVICE.to_string(),
        BackendKind::Cuda => probe::probe().gpus.first().map(|g| g.name.clone()).unwrap_or_else(|| "unknown GPU".into()),
    }
}

/// Each op's config: flags > config file > tuned file > analytic default (see `config::resolve`).
fn resolve_configs(a: &BenchArgs, backend: BackendKind, topology: Topology) -> Result<OpConfigs, Error> {
    let explicit = PartialConfig {
        num_channels: a.channels,
        chunk_tokens: a.chunk_tokens,
        buffer_tokens: a.buffer_tokens,
        timeout_ms: None,
    };
    let resolver = Resolver::with_tuned_file(explicit, a.config.as_deref())?;
    let gpu = device_name(backend);
    let key = |op, dtype| ConfigKey {
        gpu: gpu.clone(),
        nodes: topology.num_nodes,
        ranks_per_node: topology.ranks_per_node,
        op,
        dtype,
        hidden: a.hidden,
        tokens: a.tokens,
    };
    let wire = if a.fp8_on_wire { DType::Fp8 } else { a.dtype };
    Ok(OpConfigs {
        dispatch: resolver.resolve(&key(TunedOp::Dispatch, wire))?.config,
        combine: resolver.resolve(&key(TunedOp::Combine, DType::Bf16))?.config,
    })
}

/// One line per op kind: its knobs.
fn config_line(c: &OpConfigs) -> String {
    let one =
        |c: &Config| format!("channels {}, chunk {} tokens, buffer {} tokens", c.num_channels, c.chunk_tokens, c.buffer_tokens);
    format!("dispatch: {}; combine: {}", one(&c.dispatch), one(&c.combine))
}

/// A progress bar on stderr that appears only if stderr is a terminal and the
/// run has already taken more than a second.
struct LazyBar {
    bar: ProgressBar,
    start: Instant,
    tty: bool,
    shown: AtomicBool,
}

impl LazyBar {
    fn new(total: u64, what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({elapsed})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Self { bar, start: Instant::now(), tty: std::io::stderr().is_terminal(), shown: AtomicBool::new(false) }
    }

    fn set(&self, done: u64) {
        self.bar.set_position(done);
        if self.tty && self.start.elapsed() > Duration::from_secs(1) && !self.shown.swap(true, Ordering::Relaxed) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    fn message(&self, what: &str) {
        self.bar.set_message(what.to_string());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn cmd_bench(a: BenchArgs) -> Result<ExitCode, Error> {
    let (backend, topology) = a.group.resolve()?;
    let (nodes, ranks_per_node) = (topology.num_nodes, topology.ranks_per_node);
    let configs = resolve_configs(&a, backend, topology)?;
    let max_nodes = a.max_nodes.unwrap_or(nodes.min(4));
    let spec = BenchSpec {
        workload: WorkloadSpec {
            topology,
            tokens: a.tokens,
            hidden: a.hidden,
            topk: a.topk,
            num_experts: a.experts,
            dtype: a.dtype,
            routing: a.routing,
            max_nodes,
            hole_rate: 0.0,
            seed: a.seed,
        },
        configs: configs.clone(),
        warmup: a.warmup,
        iters: a.iters,
        check: a.check,
        options: switchyard::DispatchOptions { fp8_on_wire: a.fp8_on_wire, expert_alignment: 0 },
        interference: a.interference.then(|| bench::InterferenceSpec {
            gemm: switchyard::backend::cuda::gemm::GemmShape { m: a.gemm[0], n: a.gemm[1], k: a.gemm[2] },
            iters: a.iters,
            settings: std::iter::once([configs.dispatch.num_channels, configs.combine.num_channels])
                .chain(a.interference_sms.iter().map(|&n| [n, n]))
                .collect(),
        }),
        nccl: a.nccl,
        graph: a.graph,
    };
    info!(
        "workload: {} nodes x {} ranks, {} tokens/rank, hidden {}, top-{} of {} experts, {}, routing {}{}, seed {}; warmup {}, iters {}{}",
        nodes,
        ranks_per_node,
        a.tokens,
        a.hidden,
        a.topk,
        a.experts,
        a.dtype,
        routing_name(a.routing),
        if a.routing == RoutingKind::NodeLimited { format!(" (max {max_nodes} nodes)") } else { String::new() },
        a.seed,
        a.warmup,
        a.iters,
        if a.check { ", checked against the oracle" } else { "" }
    );

    let (launch_env, processes) = match a.group.take_part(backend, topology)? {
        Ok(part) => part,
        Err(workers_done) => return Ok(workers_done),
    };

    let bar = LazyBar::new(spec.total_steps(), "bench");
    let measurements = match (backend, &launch_env) {
        (BackendKind::Cpu, Some(env)) => bench::run_cpu_process(&spec, env, &|done, _total| bar.set(done)),
        (BackendKind::Cpu, None) => bench::run_cpu(&spec, &|done, _total| bar.set(done)).map(Some),
        (BackendKind::Cuda, Some(env)) if processes => bench::run_cuda_process(&spec, env, &|done, _total| bar.set(done)),
        (BackendKind::Cuda, _) => bench::run_cuda(&spec, &|done, _total| bar.set(done)).map(Some),
    };
    bar.finish();
    // Only rank 0 of a node of processes reports; the others are done once it has their part.
    let Some(run) = measurements? else {
        return Ok(ExitCode::SUCCESS);
    };
    let measurements = run.measurements.clone();

    let world = topology.world();
    let max_logical = measurements.iter().map(|m| m.logical_bytes).max().unwrap_or(0) as usize;
    let memcpy_gbps = bench::measure_memcpy(world, max_logical.div_ceil(world.max(1)), a.iters.max(5));
    let results = bench::results(&spec, backend.name(), &measurements, memcpy_gbps);

    println!(
        "# switchyard bench: backend {}, {} nodes x {} ranks, tokens/rank {}, hidden {}, top-{} of {} experts, routing {}, seed {}",
        backend.name(),
        nodes,
        ranks_per_node,
        a.tokens,
        a.hidden,
        a.topk,
        a.experts,
        routing_name(a.routing),
        a.seed
    );
    println!("# config: {}; warmup {}, iters {}", config_line(&configs), a.warmup, a.iters);
    print!("{}", bench::format_table(&results, memcpy_gbps));
    print!("{}", bench::format_per_rank(&results));
    print!("{}", bench::format_network(&results));
    let nccl = bench::nccl_results(&spec, &run);
    print!("{}", bench::format_nccl(&nccl, &results));
    print!("{}", bench::format_interference(&run.interference));
    if a.nccl && nccl.is_empty() {
        warn!("--nccl: the {} backend (or its rail: SWITCHYARD_RAIL) has no NCCL; nothing measured", backend.name());
    }
    if a.graph && !results.iter().any(|r| r.graph) {
        // The CPU backend and several CUDA nodes have no graph capture: their calls were timed as they are.
        warn!(
            "--graph: no call was captured in a CUDA graph here ({} backend, {nodes} node(s)); the times are of plain calls",
            backend.name()
        );
    }
    if a.interference && run.interference.is_empty() {
        warn!("--interference: the {} backend has no device; nothing measured", backend.name());
    }

    if let Some(path) = &a.json {
        let gpus =
            if backend == BackendKind::Cpu { Vec::new() } else { probe::probe().gpus.into_iter().map(|g| g.name).collect() };
        let report = Report {
            schema: bench::SCHEMA_VERSION,
            machine: bench::machine(gpus),
            commit: bench::source_commit(),
            date: bench::iso8601_utc(SystemTime::now()),
            memcpy_gbps,
            results: results.clone(),
            nccl_sendrecv: nccl.clone(),
            interference: run.interference.clone(),
        };
        std::fs::write(path, report.to_json() + "\n").map_err(|source| Error::Io { path: path.clone(), source })?;
        info!("wrote {}", path.display());
    }

    let wrong: u64 = results.iter().filter_map(|r| r.wrong).sum();
    if wrong > 0 {
        for r in results.iter().filter(|r| r.wrong.unwrap_or(0) > 0) {
            warn!("{}: {} results differ from the oracle", r.op.name(), r.wrong.unwrap_or(0));
        }
        eprintln!("error: {wrong} results differ from the oracle");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The rank counts of `cases`, smallest first, for an error that names them ("1, 2, 4 or 8").
fn world_sizes(cases: &[conformance::Case]) -> String {
    let sizes: std::collections::BTreeSet<usize> = cases.iter().map(|c| c.spec.topology.world()).collect();
    let names: Vec<String> = sizes.iter().map(usize::to_string).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last} ranks", rest.join(", ")),
        Some((last, _)) => format!("{last} ranks"),
        None => "no ranks".into(),
    }
}

/// Run this same command as one worker process per GPU (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT` set, rendezvous on a free local port); rank 0 keeps stdout.
/// Exit status: the first failing worker's, else 0.
fn spawn_workers(n: usize) -> Result<ExitCode, Error> {
    let io_err = |what: &str| {
        let path = PathBuf::from(what);
        move |source| Error::Io { path, source }
    };
    // A free port now; a clash with another program before rank 0 binds it shows up as an error.
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io_err("tcp://127.0.0.1:0"))?.port();
    let exe = std::env::current_exe().map_err(io_err("current executable"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    info!("spawning {n} worker processes (one per rank; more ranks than GPUs share them), rendezvous on 127.0.0.1:{port}");
    let mut children = Vec::with_capacity(n);
    for r in 0..n {
        let mut c = std::process::Command::new(&exe);
        c.args(&args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if r != 0 {
            c.stdout(std::process::Stdio::null());
        }
        children.push(c.spawn().map_err(io_err("worker process"))?);
    }
    match wait_workers(&mut children, WORKER_GRACE).map_err(io_err("worker process"))? {
        None => Ok(ExitCode::SUCCESS),
        Some((r, status)) => {
            warn!("worker {r} exited with {status}");
            Ok(ExitCode::from(status.code().map_or(2, |c| c.clamp(1, 255) as u8)))
        }
    }
}

/// How long the other workers get, after one failed, to stop on their own.
const WORKER_GRACE: Duration = Duration::from_secs(15);

/// Wait for every worker. Once one fails, the others get `grace` to stop on their own
/// (the failure reaches them through the rendezvous) and are then killed, so one stuck
/// worker cannot hang the command. Returns the first failure: (worker index, status).
fn wait_workers(
    children: &mut [std::process::Child],
    grace: Duration,
) -> std::io::Result<Option<(usize, std::process::ExitStatus)>> {
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut first_failure = None;
    let mut kill_at = None;
    while done.iter().any(Option::is_none) {
        for (i, child) in children.iter_mut().enumerate() {
            if done[i].is_none() {
                if let Some(status) = child.try_wait()? {
                    done[i] = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((i, status));
                        kill_at = Some(Instant::now() + grace);
                    }
                }
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for (i, child) in children.iter_mut().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                warn!("worker {i} still running {grace:?} after another failed: killing it");
                let _ = child.kill();
                done[i] = Some(child.wait()?);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(first_failure)
}

fn routing_name(r: RoutingKind) -> &'static str {
    match r {
        RoutingKind::Uniform => "uniform",
        RoutingKind::NodeLimited => "node-limited",
        RoutingKind::Zipf => "zipf",
    }
}

fn cmd_check(a: CheckArgs) -> Result<ExitCode, Error> {
    let backend = choose_backend(a.backend)?;
    let cases: Vec<_> =
        conformance::standard_cases().into_iter().filter(|c| a.filter.as_deref().map_or(true, |f| c.name.contains(f))).collect();
    if cases.is_empty() {
        return Err(match &a.filter {
            Some(f) => {
                Error::InvalidArgument { arg: "--filter".into(), reason: format!("no conformance case name contains {f:?}") }
            }
            None => Error::InvalidArgument { arg: "conformance cases".into(), reason: "none are defined".into() },
        });
    }
    let launched = LaunchEnv::from_env()?;
    let processes = match backend {
        BackendKind::Cpu => launched.is_some(),
        BackendKind::Cuda => a.launch != Launch::Threads,
    };
    let launch_env = if processes { launched } else { None };
    let cases: Vec<_> = match (backend, &launch_env) {
        (BackendKind::Cpu, None) => cases,
        // Processes started by a launcher run the cases of as many ranks as there are processes.
        (BackendKind::Cpu, Some(env)) => {
            let sizes = world_sizes(&cases);
            let fit: Vec<_> = cases.into_iter().filter(|c| c.spec.topology.world() == env.world_size).collect();
            info!("cpu: {} cases have {} ranks", fit.len(), env.world_size);
            if fit.is_empty() {
                return Err(Error::InvalidArgument {
                    arg: "conformance cases".into(),
                    reason: format!("none has {} ranks (the cases here have {sizes})", env.world_size),
                });
            }
            fit
        }
        // CUDA processes run the cases of as many ranks as were launched, one node or several
        // (nodes of processes on one host share its GPUs); threads run one node of every GPU.
        (BackendKind::Cuda, _) => {
            let gpus = probe::probe().gpus.len();
            let ranks = launch_env.as_ref().map_or(gpus, |e| e.world_size);
            // Threads run every one-node case, ranks round robin over the GPUs (several on one GPU when there are fewer).
            let fits = |t: Topology| if processes { t.world() == ranks } else { t.num_nodes == 1 && gpus > 0 };
            let sizes = world_sizes(&cases);
            let fit: Vec<_> = cases.into_iter().filter(|c| fits(c.spec.topology)).collect();
            let what = if processes { format!("{ranks} ranks") } else { format!("one node (on {gpus} GPUs)") };
            info!("cuda: {} cases have {what}", fit.len());
            if fit.is_empty() {
                return Err(Error::InvalidArgument {
                    arg: "conformance cases".into(),
                    reason: format!("none has {what} (the cases here have {sizes})"),
                });
            }
            fit
        }
    };
    let first = &cases[0];
    let (mut cpu_proc, mut cuda_group) = match (backend, &launch_env) {
        (BackendKind::Cuda, None) if processes => return spawn_workers(first.spec.topology.world()),
        (BackendKind::Cuda, Some(env)) => {
            let group = switchyard::bootstrap::join_launched(env, Duration::from_millis(first.config.timeout_ms))?;
            (None, Some((switchyard::bootstrap::SharedGroup::new(group), None)))
        }
        (BackendKind::Cpu, Some(env)) => {
            let rpn = Some(first.spec.topology.ranks_per_node);
            (Some(switchyard::backend::cpu::CpuProcessRank::from_launch_env(env, rpn, first.config.clone())?), None)
        }
        _ => (None, None),
    };
    // In a group of processes every rank runs every case; rank 0 reports.
    let reports = launch_env.as_ref().map_or(true, |e| e.rank == 0);
    let width = cases.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let bar = LazyBar::new(cases.len() as u64, "check");
    let (mut passed, mut failed) = (0usize, 0usize);
    for (i, case) in cases.iter().enumerate() {
        let report = match (cpu_proc.as_mut(), cuda_group.as_mut()) {
            (Some(c), _) => run_case_cpu_process(case, c),
            (_, Some((group, comm))) => run_case_cuda_process(case, group, comm),
            (None, None) if backend == BackendKind::Cpu => conformance::run_case_cpu(case),
            (None, None) => run_case_cuda(case),
        };
        let line = if report.passed() {
            passed += 1;
            format!("{:<width$}  PASS", report.name)
        } else {
            failed += 1;
            let detail = match &report.error {
                Some(e) => format!("error: {e}"),
                None => format!("{} wrong", report.wrong),
            };
            format!("{:<width$}  FAIL  {detail}", report.name)
        };
        if reports {
            bar.bar.suspend(|| println!("{line}"));
            bar.set(i as u64 + 1);
        }
    }
    bar.finish();
    if reports {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// One conformance case on this process's CPU rank, regrouped into the case's nodes.
fn run_case_cpu_process(
    case: &conformance::Case,
    comm: &mut switchyard::backend::cpu::CpuProcessRank,
) -> conformance::CaseReport {
    let rpn = case.spec.topology.ranks_per_node;
    if switchyard::Communicator::topology(comm).ranks_per_node != rpn {
        if let Err(e) = comm.set_ranks_per_node(rpn) {
            return conformance::CaseReport { name: case.name.clone(), wrong: 0, error: Some(format!("regrouping: {e}")) };
        }
    }
    conformance::run_case_as_process(case, comm)
}

/// One conformance case on this process's CUDA rank, in the case's nodes: the
/// communicator is made afresh (over the same group) when the nodes change.
fn run_case_cuda_process(
    case: &conformance::Case,
    group: &switchyard::bootstrap::SharedGroup,
    comm: &mut Option<Box<dyn switchyard::Communicator>>,
) -> conformance::CaseReport {
    let topo = case.spec.topology;
    if comm.as_ref().map(|c| c.topology()) != Some(topo) {
        // The old one goes first: its buffers and mappings are freed before the new ones are made.
        *comm = None;
        match switchyard::backend::cuda::communicator_over(group, topo.ranks_per_node, case.config.clone()) {
            Ok(c) => *comm = Some(c),
            Err(e) => return conformance::CaseReport { name: case.name.clone(), wrong: 0, error: Some(format!("set-up: {e}")) },
        }
    }
    conformance::run_case_as_process(case, comm.as_mut().expect("made above").as_mut())
}

/// One conformance case on a fresh CUDA cluster of the case's ranks (round robin over the GPUs).
fn run_case_cuda(case: &conformance::Case) -> conformance::CaseReport {
    let gpus = probe::probe().gpus.len().max(1);
    let on: Vec<usize> = (0..case.spec.topology.ranks_per_node).map(|r| r % gpus).collect();
    let ranks = switchyard::backend::cuda::CudaCluster::on_gpus(&on, case.config.clone()).and_then(|c| c.into_ranks());
    match ranks {
        Ok(r) => {
            conformance::run_case_on(case, r.into_iter().map(|r| Box::new(r) as Box<dyn switchyard::Communicator>).collect())
        }
        Err(e) => conformance::CaseReport { name: case.name.clone(), wrong: 0, error: Some(e.to_string()) },
    }
}

fn cmd_info() -> Result<ExitCode, Error> {
    let p = probe::probe();
    println!("switchyard {}", env!("CARGO_PKG_VERSION"));
    println!("commit: {}", bench::source_commit().unwrap_or_else(|| "unknown".into()));
    // What a tuned entry's `kernels` key must say to be used with this build.
    println!("kernels: {} (hash of the CUDA kernels' code)", switchyard::backend::cuda::compile::kernel_source_hash());
    println!("backends:");
    println!("  cpu   usable (reference backend: threads as ranks, emulated nodes; or launched processes)");
    let mpi = if cfg!(feature = "mpi") {
        "built in (ranks under mpirun/srun meet through MPI)"
    } else {
        "not built in (cargo build --features mpi); launched ranks meet over TCP"
    };
    println!("mpi: {mpi}");
    match LaunchEnv::from_env()? {
        Some(e) => println!("launcher: {:?}, rank {} of {}", e.launcher, e.rank, e.world_size),
        None => println!("launcher: none (one process)"),
    }
    println!("  cuda  {}", if p.cuda_usable { "usable".to_string() } else { format!("not usable: {}", p.reason) });
    println!("CUDA libraries (loaded at run time):");
    for l in &p.libraries {
        let state = if l.loadable { "loads" } else { "not found" };
        println!("  {:<9} {:<10} {}", l.name, state, l.purpose);
        for path in &l.paths {
            println!("            {}", path.display());
        }
        if !l.loadable && !l.paths.is_empty() {
            println!(
                "            (present under a name cudarc does not open; e.g. add a {}.so symlink to LD_LIBRARY_PATH)",
                l.name
            );
        }
    }
    println!("  searched: LD_LIBRARY_PATH and {}", probe::SYSTEM_LIB_DIRS.join(", "));
    if p.gpus.is_empty() {
        println!("GPUs: none");
    } else {
        println!("GPUs: {}", p.gpus.len());
        for g in &p.gpus {
            println!(
                "  [{}] {}  sm_{}{}  {} SMs  {:.1} GiB",
                g.index,
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.sm_count,
                g.total_mem_bytes as f64 / (1u64 << 30) as f64
            );
        }
        println!("peer access (row can access column):");
        print!("      ");
        for j in 0..p.gpus.len() {
            print!(" {j:>3}");
        }
        println!();
        for (i, row) in p.peer_access.iter().enumerate() {
            print!("  {i:>3} ");
            for &ok in row {
                print!(" {:>3}", if ok { "yes" } else { "no" });
            }
            println!();
        }
    }
    println!("CUDA usable: {} ({})", if p.cuda_usable { "yes" } else { "no" }, p.reason);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn workers_all_succeeding_is_success() {
        let mut c: Vec<_> = (0..2).map(|_| Command::new("true").spawn().unwrap()).collect();
        assert!(wait_workers(&mut c, Duration::from_secs(5)).unwrap().is_none());
    }

    #[test]
    fn a_failed_worker_is_reported_and_a_stuck_one_killed_after_the_grace() {
        let t = Instant::now();
        let mut c =
            vec![Command::new("sleep").arg("30").spawn().unwrap(), Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap()];
        let (i, status) = wait_workers(&mut c, Duration::from_millis(300)).unwrap().expect("a failure");
        assert_eq!((i, status.code()), (1, Some(3)));
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    }
}
