//! `switchyard tune`: the command around [`switchyard::tune`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use clap::Args;
use tracing::{info, warn};

use switchyard::backend::cpu::CpuCluster;
use switchyard::bench;
use switchyard::config::resolve::tuned_path;
use switchyard::config::ConfigFile;
use switchyard::probe::BackendKind;
use switchyard::tune::{self, Grid, ProcessRunner, Runner, Strategy, ThreadRunner, TuneOutcome, TuneShape, TuneSpec};
use switchyard::workload::RoutingKind;
use switchyard::{Communicator, Config, DType, Error, Topology};

use super::{device_name, GroupArgs, LazyBar};

#[derive(Args, Debug)]
#[command(after_help = "For each shape and row type: time every candidate config (checked against the oracle; a \
wrong one is never chosen), re-measure the fastest few, the provisional choice and the analytic defaults, and keep \
per op the fewest channels whose median is within --tolerance of the fastest. Entries go into --out (merged with \
the entries already there); the curves into --json and --plot. Ctrl-C stops between candidates and keeps what is \
done (exit status 130).")]
pub(crate) struct TuneArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// Shapes: ht-a (4096 tokens/rank, hidden 7168, top-8 of 256), ll-b (128 tokens/rank), or
    /// NAME:TOKENS:HIDDEN:TOPK:EXPERTS; repeat or separate with commas.
    #[arg(long = "shape", value_delimiter = ',', default_values_t = ["ht-a".to_string(), "ll-b".to_string()])]
    shapes: Vec<String>,
    /// Dispatch row types to tune (combine is tuned once per shape, on BF16 rows).
    #[arg(long = "dtype", value_enum, value_delimiter = ',', default_values_t = [DType::Bf16, DType::Fp8])]
    dtypes: Vec<DType>,
    /// Channel counts to try (SMs on a GPU) [default: cuda 2,4,8,12,16,20,24,32; cpu 1,2,4].
    #[arg(long, value_delimiter = ',', visible_alias = "num-sms")]
    channels: Option<Vec<usize>>,
    /// Chunk sizes to try, in tokens (CPU backend; the CUDA kernels have no chunks) [default: 16,32,64].
    #[arg(long, value_delimiter = ',')]
    chunk_tokens: Option<Vec<usize>>,
    /// Channel buffer capacity, in chunks.
    #[arg(long, default_value_t = 4)]
    buffer_chunks: usize,
    /// refine: every other channel count, then the neighbours of the best; exhaustive: the whole grid.
    #[arg(long, value_enum, default_value_t = Strategy::Refine)]
    strategy: Strategy,
    /// Untimed iterations per candidate.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed iterations per candidate (the median counts).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Timed iterations of a re-measurement.
    #[arg(long, default_value_t = 30)]
    remeasure_iters: usize,
    /// How many of the fastest candidates are re-measured.
    #[arg(long, default_value_t = 3)]
    finalists: usize,
    /// Keep the fewest channels whose time is within this fraction of the fastest.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// Routing of the generated workloads.
    #[arg(long, value_enum, default_value_t = RoutingKind::Uniform)]
    routing: RoutingKind,
    /// Workload seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Deadline of every wait, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Config file to write the entries into [default: tuned.toml in the cache dir, which
    /// every run reads; see `SWITCHYARD_CACHE_DIR`].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Every measured point and the choices, as JSON [default: OUT with `-curve.json`].
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Time-vs-channels plot, PNG [default: OUT with `-curve.png`].
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

/// The curve JSON: the spec's grid and every point and choice.
#[derive(serde::Serialize)]
struct CurveReport<'a> {
    schema: u32,
    machine: bench::Machine,
    commit: Option<String>,
    date: String,
    backend: &'static str,
    device: &'a str,
    topology: Topology,
    grid: &'a Grid,
    strategy: Strategy,
    tolerance: f64,
    iters: usize,
    remeasure_iters: usize,
    outcome: &'a TuneOutcome,
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "tuned".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

fn check_args(a: &TuneArgs, grid: &Grid) -> Result<(), Error> {
    let bad = |arg: &str, reason: &str| Err(Error::InvalidArgument { arg: arg.into(), reason: reason.into() });
    if grid.channels.is_empty() || grid.channels.contains(&0) {
        return bad("--channels", "give one or more counts, each >= 1");
    }
    if grid.chunk_tokens.is_empty() || grid.chunk_tokens.contains(&0) {
        return bad("--chunk-tokens", "give one or more sizes, each >= 1");
    }
    if a.buffer_chunks == 0 {
        return bad("--buffer-chunks", "must be >= 1");
    }
    if a.iters == 0 || a.remeasure_iters == 0 {
        return bad("--iters", "timed iterations must be >= 1");
    }
    if !(0.0..1.0).contains(&a.tolerance) {
        return bad("--tolerance", "must be in [0, 1)");
    }
    if a.dtypes.is_empty() {
        return bad("--dtype", "give one or more row types");
    }
    Ok(())
}

pub(crate) fn cmd_tune(a: TuneArgs) -> Result<ExitCode, Error> {
    let (backend, topology) = a.group.resolve()?;
    let gpus = switchyard::probe::probe().gpus;
    let ranks_per_node = topology.ranks_per_node;
    let shapes: Vec<TuneShape> = a.shapes.iter().map(|s| TuneShape::parse(s)).collect::<Result<_, _>>()?;
    let chunked = backend == BackendKind::Cpu;
    let mut channels = a.channels.clone().unwrap_or_else(|| match backend {
        BackendKind::Cuda => vec![2, 4, 8, 12, 16, 20, 24, 32],
        BackendKind::Cpu => vec![1, 2, 4],
    });
    channels.sort_unstable();
    channels.dedup();
    let chunk_tokens = match (backend, &a.chunk_tokens) {
        (BackendKind::Cuda, Some(_)) => {
            return Err(Error::InvalidArgument {
                arg: "--chunk-tokens".into(),
                reason: "the CUDA kernels write rows straight to their place and have no chunks to tune".into(),
            })
        }
        (BackendKind::Cuda, None) => vec![Config::default().chunk_tokens],
        (BackendKind::Cpu, c) => c.clone().unwrap_or_else(|| vec![16, 32, 64]),
    };
    let grid = Grid { channels, chunk_tokens, buffer_chunks: a.buffer_chunks };
    check_args(&a, &grid)?;
    let spec = TuneSpec {
        device: device_name(backend),
        topology,
        shapes,
        dtypes: a.dtypes.clone(),
        routing: a.routing,
        seed: a.seed,
        grid: grid.clone(),
        strategy: a.strategy,
        warmup: a.warmup,
        iters: a.iters,
        remeasure_iters: a.remeasure_iters,
        finalists: a.finalists,
        tolerance: a.tolerance,
        timeout_ms: a.timeout_ms,
        chunked,
        kernels: (backend == BackendKind::Cuda).then(switchyard::backend::cuda::compile::kernel_source_hash),
    };
    let out = match &a.out {
        Some(p) => p.clone(),
        None => tuned_path().ok_or_else(|| Error::InvalidArgument {
            arg: "--out".into(),
            reason: "no cache directory (set SWITCHYARD_CACHE_DIR or HOME), so name the file".into(),
        })?,
    };
    // Read the file to merge into before spending time: a broken one is an error now, not after the sweep.
    let mut file = if out.exists() { ConfigFile::read(&out)? } else { ConfigFile::default() };

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // The spawner and its workers all get the terminal's Ctrl-C; the workers stop
    // between candidates and rank 0 writes what is done, the spawner waits for them.
    ctrlc::set_handler(move || {
        if !flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping after the current candidate (Ctrl-C again has no further effect)");
        }
    })
    .map_err(|e| Error::InvalidArgument { arg: "Ctrl-C handler".into(), reason: e.to_string() })?;
    // The rail hop of several nodes (NCCL or the host) has no knobs of ours; the node-local
    // knobs are tuned on one node (and refused before any worker is spawned).
    if backend == BackendKind::Cuda && topology.num_nodes > 1 {
        return Err(Error::InvalidArgument {
            arg: "--nodes".into(),
            reason: format!("{topology}: tune CUDA on one node (its config applies to every node of a multi-node group)"),
        });
    }
    let (launch_env, processes) = match a.group.take_part(backend, topology)? {
        Ok(part) => part,
        Err(workers_done) => return Ok(workers_done),
    };

    let first = Config { num_channels: grid.channels[0], ..Config::default() };
    let first = Config { timeout_ms: a.timeout_ms, buffer_tokens: first.chunk_tokens * a.buffer_chunks, ..first };
    let mut runner: Box<dyn Runner> = match (backend, &launch_env) {
        // Its hops are whole all-to-alls: there is nothing to tune, and its entries would
        // be read by the thread backend, whose entries share the key.
        (BackendKind::Cpu, Some(_)) => {
            return Err(Error::InvalidArgument {
                arg: "--backend".into(),
                reason: "CPU ranks as launched processes use neither channels nor chunks; tune the CPU backend without a \
                         launcher (threads), or CUDA"
                    .into(),
            })
        }
        (BackendKind::Cpu, None) => Box::new(ThreadRunner {
            ranks: CpuCluster::new(topology, first)?
                .into_ranks()
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn Communicator>)
                .collect(),
        }),
        (BackendKind::Cuda, Some(env)) if processes => {
            Box::new(ProcessRunner { comm: Box::new(switchyard::backend::cuda::CudaRank::from_launch_env(env, first)?) })
        }
        (BackendKind::Cuda, _) => Box::new(ThreadRunner {
            ranks: switchyard::backend::cuda::CudaCluster::new(ranks_per_node, first)?
                .into_ranks()?
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn Communicator>)
                .collect(),
        }),
    };
    let is_rank0 = launch_env.as_ref().map_or(true, |e| e.rank == 0);
    let per_workload = spec.first_candidates().len() + 2 + 2 * a.finalists + 2;
    let bar = LazyBar::new((per_workload * spec.shapes.len() * spec.dtypes.len()) as u64, "tune");
    info!(
        "tuning {} shapes x {} row types on {} ({topology}), channels {:?}, chunks {:?}, {:?}",
        spec.shapes.len(),
        spec.dtypes.len(),
        spec.device,
        grid.channels,
        grid.chunk_tokens,
        a.strategy
    );
    let progress = |done: usize, what: &str| {
        if is_rank0 {
            bar.set(done as u64);
            bar.message(what);
        }
    };
    let (outcome, failure) = tune::tune(&spec, runner.as_mut(), &|| stop.load(Ordering::SeqCst), &progress);
    bar.finish();
    if !is_rank0 {
        return match failure {
            Some(e) => Err(e),
            None => Ok(ExitCode::SUCCESS),
        };
    }

    // What is done is kept whatever happened after it.
    let entries = outcome.entries(&spec);
    for e in &entries {
        file.upsert(e.clone());
    }
    if !entries.is_empty() {
        file.write(&out)?;
        info!("wrote {} entries to {}", entries.len(), out.display());
    }
    let json = a.json.clone().unwrap_or_else(|| sibling(&out, "-curve.json"));
    let report = CurveReport {
        schema: tune::CURVE_SCHEMA,
        machine: bench::machine(gpus.iter().map(|g| g.name.clone()).collect()),
        commit: bench::source_commit(),
        date: bench::iso8601_utc(SystemTime::now()),
        backend: backend.name(),
        device: &spec.device,
        topology,
        grid: &grid,
        strategy: a.strategy,
        tolerance: a.tolerance,
        iters: a.iters,
        remeasure_iters: a.remeasure_iters,
        outcome: &outcome,
    };
    let text = serde_json::to_string_pretty(&report).expect("report serializes") + "\n";
    std::fs::write(&json, text).map_err(|source| Error::Io { path: json.clone(), source })?;
    info!("wrote {}", json.display());
    print!("{}", choices_table(&outcome));
    let plot = a.plot.clone().unwrap_or_else(|| sibling(&out, "-curve.png"));
    if tune::plot::font_available() {
        tune::plot::write_png(&outcome, &plot_title(topology, &spec.device, backend.name()), &plot)?;
        info!("wrote {}", plot.display());
    } else {
        warn!(
            "no TrueType font here, so no plot; draw it where there is one: switchyard plot {} --out {}",
            json.display(),
            plot.display()
        );
    }

    if let Some(e) = failure {
        return Err(e);
    }
    if outcome.wrong_points > 0 {
        eprintln!("error: {} candidates gave results that differ from the oracle", outcome.wrong_points);
        return Ok(ExitCode::from(1));
    }
    if outcome.interrupted {
        warn!(
            "interrupted: kept the {} workloads finished before Ctrl-C",
            outcome.workloads.iter().filter(|w| !w.choices.is_empty()).count()
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

fn plot_title(topology: Topology, device: &str, backend: &str) -> String {
    format!("switchyard tune: {} node(s) x {} ranks, {device} ({backend} backend)", topology.num_nodes, topology.ranks_per_node)
}

#[derive(Args, Debug)]
pub(crate) struct PlotArgs {
    /// A curve JSON written by `switchyard tune`.
    curve: PathBuf,
    /// The PNG to write [default: CURVE with the extension .png].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Draw a tune's time-vs-channels plot from its curve JSON (e.g. on a machine with fonts).
pub(crate) fn cmd_plot(a: PlotArgs) -> Result<ExitCode, Error> {
    let text = std::fs::read_to_string(&a.curve).map_err(|source| Error::Io { path: a.curve.clone(), source })?;
    let bad = |reason: String| Error::Config { path: a.curve.clone(), reason };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if v["schema"] != tune::CURVE_SCHEMA {
        return Err(bad(format!("key `schema`: expected {}, found {}", tune::CURVE_SCHEMA, v["schema"])));
    }
    let outcome: TuneOutcome = serde_json::from_value(v["outcome"].clone()).map_err(|e| bad(format!("key `outcome`: {e}")))?;
    let topology: Topology = serde_json::from_value(v["topology"].clone()).map_err(|e| bad(format!("key `topology`: {e}")))?;
    let title = plot_title(topology, v["device"].as_str().unwrap_or("?"), v["backend"].as_str().unwrap_or("?"));
    let out = a.out.clone().unwrap_or_else(|| a.curve.with_extension("png"));
    tune::plot::write_png(&outcome, &title, &out)?;
    info!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// One line per choice.
fn choices_table(outcome: &TuneOutcome) -> String {
    let mut s =
        String::from("#  shape     op  dtype  tokens  channels  chunk  median(us)  fastest(us) @ch  analytic(us) @ch  ratio\n");
    for w in &outcome.workloads {
        for c in &w.choices {
            s += &format!(
                "{:>8} {:>9} {:>5} {:>7} {:>9} {:>6} {:>11.1} {:>12.1} {:>3} {:>13.1} {:>3} {:>6.2}\n",
                w.shape.name,
                c.op.name(),
                c.dtype,
                w.shape.tokens,
                c.chosen.num_channels,
                c.chosen.chunk_tokens,
                c.chosen_us,
                c.fastest_us,
                c.fastest.num_channels,
                c.analytic_us,
                c.analytic.num_channels,
                c.analytic_ratio
            );
        }
    }
    s += "# channels: fewest within the tolerance of the fastest; ratio = analytic default / chosen (re-measured medians)\n";
    s
}
