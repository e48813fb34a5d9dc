//! `switchyard tune`: sweep channels (one SM each on a GPU) and chunk sizes for
//! given shapes, keep for each op the fewest channels whose time is within a
//! tolerance of the fastest, and write them as config entries.
//!
//! One candidate is one bench run ([`crate::bench`]) with that config for every
//! op, checked against the oracle: a candidate with a wrong result is never
//! chosen (and the tune reports it). The dispatch entry is chosen on cached
//! dispatch (the call a model makes every layer once the routing is known; on a
//! GPU it is timed device-resident), the combine entry on combine; combine rows
//! are BF16 whatever the dispatch row type, so it is chosen from the BF16 run of
//! a shape when there is one.
//!
//! Steps per shape and row type:
//! 1. measure the grid ([`Strategy::Exhaustive`]) or every other channel count of
//!    it ([`Strategy::Refine`], which then measures the grid neighbours of the
//!    fastest point and of the provisional choice);
//! 2. measure the analytic defaults of both ops ([`analytic_default`]);
//! 3. re-measure the fastest few, the provisional choice and the analytic
//!    defaults with more iterations, and choose among the re-measured points.

pub mod plot;

use crate::bench::{self, BenchSpec, Measurement, Op, OpConfigs, TimeStats};
use crate::config::{analytic_default, Config, ConfigKey, Entry, PartialConfig, TunedOp};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::topology::Topology;
use crate::workload::{RoutingKind, WorkloadSpec};
use crate::Communicator;

/// Version of the tune curve JSON.
pub const CURVE_SCHEMA: u32 = 1;

/// A shape to tune for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TuneShape {
    /// Name in reports (`ht-a`, `ll-b`, or the user's).
    pub name: String,
    /// Tokens per rank.
    pub tokens: usize,
    /// Elements per row.
    pub hidden: usize,
    /// Experts per token.
    pub topk: usize,
    /// Total experts.
    pub experts: usize,
}

impl TuneShape {
    /// `ht-a` (4096 tokens, hidden 7168, top-8 of 256), `ll-b` (128 tokens, same
    /// model), or `NAME:TOKENS:HIDDEN:TOPK:EXPERTS`.
    pub fn parse(s: &str) -> Result<Self> {
        let make = |name: &str, tokens| Self { name: name.into(), tokens, hidden: 7168, topk: 8, experts: 256 };
        match s {
            "ht-a" => return Ok(make("ht-a", 4096)),
            "ll-b" => return Ok(make("ll-b", 128)),
            _ => {}
        }
        let bad = || Error::InvalidArgument {
            arg: "--shape".into(),
            reason: format!("`{s}`: expected ht-a, ll-b or NAME:TOKENS:HIDDEN:TOPK:EXPERTS"),
        };
        let parts: Vec<&str> = s.split(':').collect();
        let [name, nums @ ..] = parts.as_slice() else { return Err(bad()) };
        let nums: Vec<usize> = nums.iter().map(|p| p.parse().map_err(|_| bad())).collect::<Result<_>>()?;
        match (name.is_empty(), nums.as_slice()) {
            (false, &[tokens, hidden, topk, experts]) => Ok(Self { name: name.to_string(), tokens, hidden, topk, experts }),
            _ => Err(bad()),
        }
    }
}

/// What to sweep.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grid {
    /// Channel counts (SMs on a GPU), ascending.
    pub channels: Vec<usize>,
    /// Chunk sizes in tokens (backends without chunks: one value).
    pub chunk_tokens: Vec<usize>,
    /// Buffer capacity as a multiple of the chunk.
    pub buffer_chunks: usize,
}

impl Grid {
    fn config(&self, channels: usize, chunk: usize, timeout_ms: u64) -> Config {
        Config { num_channels: channels, chunk_tokens: chunk, buffer_tokens: chunk * self.buffer_chunks, timeout_ms }
    }
}

/// How much of the grid to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every point.
    Exhaustive,
    /// Every other channel count, then the neighbours of the best points.
    Refine,
}

/// Everything a tune needs.
#[derive(Debug, Clone)]
pub struct TuneSpec {
    /// Device name of the config keys (GPU name or "cpu").
    pub device: String,
    /// Ranks and nodes.
    pub topology: Topology,
    /// Shapes.
    pub shapes: Vec<TuneShape>,
    /// Dispatch row types.
    pub dtypes: Vec<DType>,
    /// Routing of the generated workloads.
    pub routing: RoutingKind,
    /// Workload seed.
    pub seed: u64,
    /// The grid.
    pub grid: Grid,
    /// How much of it to measure.
    pub strategy: Strategy,
    /// Untimed and timed iterations of a first measurement.
    pub warmup: usize,
    /// Timed iterations of a first measurement (the median is taken).
    pub iters: usize,
    /// Timed iterations of a re-measurement.
    pub remeasure_iters: usize,
    /// How many of the fastest points are re-measured.
    pub finalists: usize,
    /// Fewest channels within this fraction of the fastest time win (0.05).
    pub tolerance: f64,
    /// Deadline of every wait.
    pub timeout_ms: u64,
    /// Which knobs the backend uses: `false` leaves chunk and buffer out of the entries.
    pub chunked: bool,
    /// Kernel source hash to record in entries (GPU backends).
    pub kernels: Option<String>,
}

impl TuneSpec {
    /// Candidates the strategy measures first, before refinement and the analytic defaults.
    pub fn first_candidates(&self) -> Vec<Config> {
        let ch = &self.grid.channels;
        let chans: Vec<usize> = match self.strategy {
            Strategy::Exhaustive => ch.clone(),
            Strategy::Refine => {
                ch.iter().enumerate().filter(|(i, _)| i % 2 == 0 || *i + 1 == ch.len()).map(|(_, c)| *c).collect()
            }
        };
        chans
            .iter()
            .flat_map(|&c| self.grid.chunk_tokens.iter().map(move |&k| (c, k)))
            .map(|(c, k)| self.grid.config(c, k, self.timeout_ms))
            .collect()
    }

    fn key(&self, shape: &TuneShape, op: TunedOp, dtype: DType) -> ConfigKey {
        ConfigKey {
            gpu: self.device.clone(),
            nodes: self.topology.num_nodes,
            ranks_per_node: self.topology.ranks_per_node,
            op,
            dtype,
            hidden: shape.hidden,
            tokens: shape.tokens,
        }
    }

    /// The analytic default of `op` for this shape, on this grid's chunk and timeout.
    fn analytic(&self, shape: &TuneShape, op: TunedOp, dtype: DType) -> Config {
        let a = analytic_default(&self.key(shape, op, dtype));
        Config { timeout_ms: self.timeout_ms, ..a }
    }

    fn bench_spec(&self, shape: &TuneShape, dtype: DType, config: &Config, iters: usize) -> BenchSpec {
        BenchSpec {
            workload: WorkloadSpec {
                topology: self.topology,
                tokens: shape.tokens,
                hidden: shape.hidden,
                topk: shape.topk,
                num_experts: shape.experts,
                dtype,
                routing: self.routing,
                max_nodes: self.topology.num_nodes.min(4),
                hole_rate: 0.0,
                seed: self.seed,
            },
            configs: OpConfigs::uniform(config.clone()),
            warmup: self.warmup,
            iters,
            check: true,
            options: Default::default(),
            interference: None,
            nccl: false,
            graph: false,
        }
    }
}

/// Runs bench candidates on a group and agrees on stopping.
pub trait Runner {
    /// Run one bench; every rank gets the same measurements.
    fn run(&mut self, spec: &BenchSpec) -> Result<Vec<Measurement>>;
    /// Whether to stop before the next candidate (`local`: this process was asked to);
    /// every rank gets the same answer.
    fn should_stop(&mut self, local: bool) -> Result<bool>;
}

/// Every rank a thread of this process ([`bench::run_on`]).
pub struct ThreadRunner {
    /// The ranks, kept across candidates.
    pub ranks: Vec<Box<dyn Communicator>>,
}

impl Runner for ThreadRunner {
    fn run(&mut self, spec: &BenchSpec) -> Result<Vec<Measurement>> {
        bench::run_on(spec, &mut self.ranks, &|_, _| {}).map(|r| r.measurements)
    }

    fn should_stop(&mut self, local: bool) -> Result<bool> {
        Ok(local)
    }
}

/// This process is one rank of a group of processes ([`bench::run_as_process`]);
/// rank 0's measurements go to every rank.
pub struct ProcessRunner {
    /// This rank's communicator.
    pub comm: Box<dyn Communicator>,
}

impl Runner for ProcessRunner {
    fn run(&mut self, spec: &BenchSpec) -> Result<Vec<Measurement>> {
        let mine = bench::run_as_process(spec, self.comm.as_mut(), &|_, _| {})?.map(|r| r.measurements);
        let bytes = serde_json::to_vec(&mine).expect("measurements serialize");
        let all = self.comm.all_gather_bytes(&bytes)?;
        let rank = self.comm.rank();
        let from_zero: Option<Vec<Measurement>> = serde_json::from_slice(&all[0])
            .map_err(|e| Error::Protocol { rank, detail: format!("rank 0 sent unreadable measurements: {e}") })?;
        from_zero.ok_or_else(|| Error::Protocol { rank, detail: "rank 0 sent no measurements".into() })
    }

    fn should_stop(&mut self, local: bool) -> Result<bool> {
        let all = self.comm.all_gather_bytes(&[u8::from(local)])?;
        Ok(all.iter().any(|b| b.first() == Some(&1)))
    }
}

/// One measured candidate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// The config every op ran with.
    pub config: Config,
    /// Cached dispatch time over the first measurement's iterations.
    pub dispatch_us: TimeStats,
    /// Combine time.
    pub combine_us: TimeStats,
    /// Re-measured medians (dispatch, combine), for finalists.
    pub remeasured_us: Option<[f64; 2]>,
    /// Elements or rows that differed from the oracle, over all ops.
    pub wrong: u64,
    /// Whether this is an analytic default.
    pub analytic: bool,
}

impl Point {
    /// The time that counts for `op`: re-measured if it was, else the first median.
    pub fn time_us(&self, op: TunedOp) -> f64 {
        let i = op as usize;
        self.remeasured_us.map(|r| r[i]).unwrap_or(match op {
            TunedOp::Dispatch => self.dispatch_us.median,
            TunedOp::Combine => self.combine_us.median,
        })
    }
}

/// The choice for one op of one workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Choice {
    /// Op.
    pub op: TunedOp,
    /// Row type on the wire.
    pub dtype: DType,
    /// The chosen config (fewest channels within the tolerance of the fastest).
    pub chosen: Config,
    /// Its time (re-measured).
    pub chosen_us: f64,
    /// The fastest point's config.
    pub fastest: Config,
    /// Its time (re-measured).
    pub fastest_us: f64,
    /// The analytic default.
    pub analytic: Config,
    /// Its time (re-measured).
    pub analytic_us: f64,
    /// `analytic_us / chosen_us` (the issue asks for <= 1.15).
    pub analytic_ratio: f64,
}

/// Everything measured for one shape and row type.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadTune {
    /// Shape.
    pub shape: TuneShape,
    /// Dispatch row type.
    pub dtype: DType,
    /// Measured points, in measurement order.
    pub points: Vec<Point>,
    /// Choices (dispatch, and combine when this workload serves it); empty if interrupted.
    pub choices: Vec<Choice>,
}

/// The outcome of a tune.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuneOutcome {
    /// Per workload, in tuning order (the last one partial when interrupted).
    pub workloads: Vec<WorkloadTune>,
    /// Stopped early on request.
    pub interrupted: bool,
    /// Points with a wrong result (never chosen).
    pub wrong_points: usize,
}

impl TuneOutcome {
    /// Config entries for the completed workloads.
    pub fn entries(&self, spec: &TuneSpec) -> Vec<Entry> {
        let mut out = Vec::new();
        for w in &self.workloads {
            for c in &w.choices {
                let knobs = if spec.chunked {
                    PartialConfig {
                        num_channels: Some(c.chosen.num_channels),
                        chunk_tokens: Some(c.chosen.chunk_tokens),
                        buffer_tokens: Some(c.chosen.buffer_tokens),
                        timeout_ms: None,
                    }
                } else {
                    PartialConfig { num_channels: Some(c.chosen.num_channels), ..Default::default() }
                };
                out.push(Entry {
                    gpu: spec.device.clone(),
                    nodes: spec.topology.num_nodes,
                    ranks_per_node: spec.topology.ranks_per_node,
                    op: c.op,
                    dtype: c.dtype,
                    hidden: w.shape.hidden,
                    tokens: Some(w.shape.tokens),
                    knobs,
                    median_us: Some(c.chosen_us),
                    kernels: spec.kernels.clone(),
                });
            }
        }
        out
    }
}

/// Progress of a tune: (candidates measured so far, what is being measured).
pub type Progress<'a> = &'a dyn Fn(usize, &str);

/// Among `points` with no wrong result (and, if given, only those re-measured),
/// the fastest and the fewest-channel one within `tol` of it (ties: the faster).
fn choose(points: &[Point], op: TunedOp, tol: f64, remeasured_only: bool) -> Option<(usize, usize)> {
    let ok: Vec<usize> =
        (0..points.len()).filter(|&i| points[i].wrong == 0 && (!remeasured_only || points[i].remeasured_us.is_some())).collect();
    let fastest = *ok.iter().min_by(|&&a, &&b| points[a].time_us(op).total_cmp(&points[b].time_us(op)))?;
    let limit = points[fastest].time_us(op) * (1.0 + tol);
    let chosen = *ok
        .iter()
        .filter(|&&i| points[i].time_us(op) <= limit)
        .min_by(|&&a, &&b| {
            let (pa, pb) = (&points[a], &points[b]);
            pa.config.num_channels.cmp(&pb.config.num_channels).then(pa.time_us(op).total_cmp(&pb.time_us(op)))
        })
        .expect("the fastest is within the limit");
    Some((fastest, chosen))
}

/// The grid neighbours (by channel count, every chunk) of `config`.
fn neighbours(spec: &TuneSpec, config: &Config) -> Vec<Config> {
    let ch = &spec.grid.channels;
    let Some(i) = ch.iter().position(|&c| c == config.num_channels) else { return Vec::new() };
    let near = [i.checked_sub(1), Some(i + 1).filter(|&j| j < ch.len())];
    near.into_iter()
        .flatten()
        .flat_map(|j| spec.grid.chunk_tokens.iter().map(move |&k| (ch[j], k)))
        .map(|(c, k)| spec.grid.config(c, k, spec.timeout_ms))
        .collect()
}

/// Measures candidates of one workload, each config once.
struct Sweep<'a> {
    spec: &'a TuneSpec,
    shape: &'a TuneShape,
    dtype: DType,
    points: Vec<Point>,
    done: &'a mut usize,
}

/// Why a sweep stopped early.
enum Stop {
    Interrupted,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl Sweep<'_> {
    fn median_of(ms: &[Measurement], op: Op) -> TimeStats {
        ms.iter().find(|m| m.op == op).map(|m| TimeStats::from_seconds(&m.iter_seconds)).unwrap_or(TimeStats::from_seconds(&[]))
    }

    /// One bench run of `config` (after agreeing not to stop): cached dispatch and combine
    /// times, and the elements that differed from the oracle.
    fn run(
        &mut self,
        runner: &mut dyn Runner,
        config: &Config,
        iters: usize,
        stop: &dyn Fn() -> bool,
        progress: Progress<'_>,
        what: &str,
    ) -> std::result::Result<(TimeStats, TimeStats, u64), Stop> {
        if runner.should_stop(stop())? {
            return Err(Stop::Interrupted);
        }
        progress(
            *self.done,
            &format!("{} {} {what} channels {} chunk {}", self.shape.name, self.dtype, config.num_channels, config.chunk_tokens),
        );
        let ms = runner.run(&self.spec.bench_spec(self.shape, self.dtype, config, iters))?;
        *self.done += 1;
        let wrong: u64 = ms.iter().map(|m| m.wrong.unwrap_or(0)).sum();
        if wrong > 0 {
            tracing::warn!("{} {}: {config:?} gave {wrong} wrong elements; not a candidate", self.shape.name, self.dtype);
        }
        Ok((Self::median_of(&ms, Op::DispatchCached), Self::median_of(&ms, Op::Combine), wrong))
    }

    /// Measure `config` unless it was; returns its index.
    fn measure(
        &mut self,
        runner: &mut dyn Runner,
        config: &Config,
        analytic: bool,
        stop: &dyn Fn() -> bool,
        progress: Progress<'_>,
    ) -> std::result::Result<usize, Stop> {
        if let Some(i) = self.points.iter().position(|p| p.config == *config) {
            self.points[i].analytic |= analytic;
            return Ok(i);
        }
        let (dispatch_us, combine_us, wrong) = self.run(runner, config, self.spec.iters, stop, progress, "measure")?;
        self.points.push(Point { config: config.clone(), dispatch_us, combine_us, remeasured_us: None, wrong, analytic });
        Ok(self.points.len() - 1)
    }

    fn remeasure(
        &mut self,
        runner: &mut dyn Runner,
        i: usize,
        stop: &dyn Fn() -> bool,
        progress: Progress<'_>,
    ) -> std::result::Result<(), Stop> {
        if self.points[i].remeasured_us.is_some() || self.points[i].wrong > 0 {
            return Ok(());
        }
        let config = self.points[i].config.clone();
        let (d, c, wrong) = self.run(runner, &config, self.spec.remeasure_iters, stop, progress, "re-measure")?;
        let p = &mut self.points[i];
        p.wrong += wrong;
        p.remeasured_us = Some([d.median, c.median]);
        Ok(())
    }
}

/// The ops a workload chooses for: dispatch always; combine from the BF16 run of a
/// shape (or the first run of it when BF16 is not tuned).
fn ops_of(spec: &TuneSpec, dtype: DType) -> Vec<TunedOp> {
    let combine_here = dtype == DType::Bf16 || !spec.dtypes.contains(&DType::Bf16) && spec.dtypes.first() == Some(&dtype);
    if combine_here {
        vec![TunedOp::Dispatch, TunedOp::Combine]
    } else {
        vec![TunedOp::Dispatch]
    }
}

/// Tune every shape and row type of `spec` on `runner`. `stop` says whether this
/// process was asked to stop (Ctrl-C); stopping is agreed between candidates, and
/// the outcome then holds what was done. An error ends the tune; the outcome so
/// far is returned beside it.
pub fn tune(
    spec: &TuneSpec,
    runner: &mut dyn Runner,
    stop: &dyn Fn() -> bool,
    progress: Progress<'_>,
) -> (TuneOutcome, Option<Error>) {
    let mut outcome = TuneOutcome { workloads: Vec::new(), interrupted: false, wrong_points: 0 };
    let mut done = 0usize;
    for shape in &spec.shapes {
        for &dtype in &spec.dtypes {
            let mut sweep = Sweep { spec, shape, dtype, points: Vec::new(), done: &mut done };
            let result = tune_workload(spec, runner, &mut sweep, stop, progress);
            let points = std::mem::take(&mut sweep.points);
            outcome.wrong_points += points.iter().filter(|p| p.wrong > 0).count();
            match result {
                Ok(choices) => outcome.workloads.push(WorkloadTune { shape: shape.clone(), dtype, points, choices }),
                Err(stop) => {
                    outcome.workloads.push(WorkloadTune { shape: shape.clone(), dtype, points, choices: Vec::new() });
                    return match stop {
                        Stop::Interrupted => {
                            outcome.interrupted = true;
                            (outcome, None)
                        }
                        Stop::Failed(e) => (outcome, Some(e)),
                    };
                }
            }
        }
    }
    (outcome, None)
}

fn tune_workload(
    spec: &TuneSpec,
    runner: &mut dyn Runner,
    sw: &mut Sweep<'_>,
    stop: &dyn Fn() -> bool,
    progress: Progress<'_>,
) -> std::result::Result<Vec<Choice>, Stop> {
    let ops = ops_of(spec, sw.dtype);
    for c in spec.first_candidates() {
        sw.measure(runner, &c, false, stop, progress)?;
    }
    if spec.strategy == Strategy::Refine {
        let mut more = Vec::new();
        for &op in &ops {
            if let Some((fastest, chosen)) = choose(&sw.points, op, spec.tolerance, false) {
                more.extend(neighbours(spec, &sw.points[fastest].config));
                more.extend(neighbours(spec, &sw.points[chosen].config));
            }
        }
        for c in more {
            sw.measure(runner, &c, false, stop, progress)?;
        }
    }
    let mut analytic = Vec::new();
    for &op in &ops {
        let a = spec.analytic(sw.shape, op, sw.dtype);
        analytic.push(sw.measure(runner, &a, true, stop, progress)?);
    }
    // Re-measure the fastest few, the provisional choices and the analytic defaults.
    let mut finalists = analytic.clone();
    for &op in &ops {
        let mut by_time: Vec<usize> = (0..sw.points.len()).filter(|&i| sw.points[i].wrong == 0).collect();
        by_time.sort_by(|&a, &b| sw.points[a].time_us(op).total_cmp(&sw.points[b].time_us(op)));
        finalists.extend(by_time.into_iter().take(spec.finalists));
        if let Some((_, chosen)) = choose(&sw.points, op, spec.tolerance, false) {
            finalists.push(chosen);
        }
    }
    for i in finalists {
        sw.remeasure(runner, i, stop, progress)?;
    }
    let mut choices = Vec::new();
    for (&op, &a) in ops.iter().zip(&analytic) {
        let Some((fastest, chosen)) = choose(&sw.points, op, spec.tolerance, true) else {
            return Err(Stop::Failed(Error::Protocol {
                rank: 0,
                detail: format!("{} {}: no candidate gave a right result", sw.shape.name, sw.dtype),
            }));
        };
        let p = &sw.points;
        let chosen_us = p[chosen].time_us(op);
        choices.push(Choice {
            op,
            dtype: if op == TunedOp::Combine { DType::Bf16 } else { sw.dtype },
            chosen: p[chosen].config.clone(),
            chosen_us,
            fastest: p[fastest].config.clone(),
            fastest_us: p[fastest].time_us(op),
            analytic: p[a].config.clone(),
            analytic_us: p[a].time_us(op),
            analytic_ratio: p[a].time_us(op) / chosen_us,
        });
    }
    Ok(choices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ch: usize, d: f64, c: f64, wrong: u64) -> Point {
        let t = |us| TimeStats { min: us, median: us, max: us };
        Point {
            config: Config { num_channels: ch, ..Config::default() },
            dispatch_us: t(d),
            combine_us: t(c),
            remeasured_us: None,
            wrong,
            analytic: false,
        }
    }

    #[test]
    fn shapes_parse() {
        assert_eq!(TuneShape::parse("ht-a").unwrap().tokens, 4096);
        assert_eq!(TuneShape::parse("ll-b").unwrap().tokens, 128);
        let s = TuneShape::parse("mine:64:512:4:32").unwrap();
        assert_eq!((s.name.as_str(), s.tokens, s.hidden, s.topk, s.experts), ("mine", 64, 512, 4, 32));
        for bad in ["", "x", "a:1:2:3", ":1:2:3:4", "a:1:2:3:z"] {
            assert!(matches!(TuneShape::parse(bad), Err(Error::InvalidArgument { .. })), "{bad}");
        }
    }

    #[test]
    fn choice_is_the_fewest_channels_within_tolerance_and_never_a_wrong_point() {
        let pts = vec![
            point(4, 300.0, 500.0, 0),
            point(8, 205.0, 260.0, 0),
            point(12, 200.0, 240.0, 0),
            point(16, 199.0, 200.0, 0),
            point(24, 190.0, 150.0, 3), // fastest but wrong
        ];
        // Dispatch: fastest right one 199; 205 <= 1.05 * 199 -> 8 channels.
        assert_eq!(choose(&pts, TunedOp::Dispatch, 0.05, false), Some((3, 1)));
        // Combine: fastest right 200 at 16; nothing fewer within 5%.
        assert_eq!(choose(&pts, TunedOp::Combine, 0.05, false), Some((3, 3)));
        // Only re-measured points count in the final choice.
        let mut pts = pts;
        pts[2].remeasured_us = Some([210.0, 230.0]);
        assert_eq!(choose(&pts, TunedOp::Dispatch, 0.05, true), Some((2, 2)));
        assert_eq!(pts[2].time_us(TunedOp::Combine), 230.0);
        assert_eq!(choose(&[point(4, 1.0, 1.0, 1)], TunedOp::Dispatch, 0.05, false), None);
    }

    fn spec(strategy: Strategy) -> TuneSpec {
        TuneSpec {
            device: "cpu".into(),
            topology: Topology { num_nodes: 1, ranks_per_node: 2 },
            shapes: vec![],
            dtypes: vec![DType::Bf16],
            routing: RoutingKind::Uniform,
            seed: 0,
            grid: Grid { channels: vec![2, 4, 8, 12, 16], chunk_tokens: vec![16, 32], buffer_chunks: 4 },
            strategy,
            warmup: 0,
            iters: 1,
            remeasure_iters: 1,
            finalists: 2,
            tolerance: 0.05,
            timeout_ms: 1000,
            chunked: true,
            kernels: None,
        }
    }

    #[test]
    fn refine_starts_from_every_other_channel_count() {
        let chans = |s: &TuneSpec| s.first_candidates().iter().map(|c| (c.num_channels, c.chunk_tokens)).collect::<Vec<_>>();
        let ex = spec(Strategy::Exhaustive);
        assert_eq!(chans(&ex).len(), 10);
        let re = spec(Strategy::Refine);
        assert_eq!(chans(&re), vec![(2, 16), (2, 32), (8, 16), (8, 32), (16, 16), (16, 32)]);
        assert!(re.first_candidates().iter().all(|c| c.buffer_tokens == 4 * c.chunk_tokens && c.timeout_ms == 1000));
        let n: Vec<usize> = neighbours(&re, &re.grid.config(8, 16, 1000)).iter().map(|c| c.num_channels).collect();
        assert_eq!(n, vec![4, 4, 12, 12]);
        assert!(neighbours(&re, &re.grid.config(16, 16, 1000)).iter().all(|c| c.num_channels == 12));
    }

    #[test]
    fn combine_is_chosen_from_the_bf16_run() {
        let mut s = spec(Strategy::Exhaustive);
        s.dtypes = vec![DType::Fp8, DType::Bf16];
        assert_eq!(ops_of(&s, DType::Fp8), vec![TunedOp::Dispatch]);
        assert_eq!(ops_of(&s, DType::Bf16), vec![TunedOp::Dispatch, TunedOp::Combine]);
        s.dtypes = vec![DType::Fp8];
        assert_eq!(ops_of(&s, DType::Fp8), vec![TunedOp::Dispatch, TunedOp::Combine]);
    }
}
