//! The tuner: its choice rule against a hand-computed answer on synthetic
//! timings, its handling of wrong candidates and of a stop request, and a real
//! sweep on the CPU backend whose entries the resolver then picks up.

use std::cell::Cell;
use std::collections::HashMap;

use switchyard::backend::cpu::CpuCluster;
use switchyard::bench::{BenchSpec, Measurement, Op};
use switchyard::config::{ConfigFile, ConfigKey, Origin, PartialConfig, Resolver, TunedOp};
use switchyard::tune::{self, Grid, Runner, Strategy, ThreadRunner, TuneShape, TuneSpec};
use switchyard::workload::RoutingKind;
use switchyard::{Communicator, Config, DType, Error, Topology};

/// A runner whose times are a function of the channel count (the same every run),
/// with a set of channel counts that give wrong results.
struct Synthetic {
    dispatch_us: HashMap<usize, f64>,
    combine_us: HashMap<usize, f64>,
    wrong_at: Vec<usize>,
    runs: Vec<Config>,
}

impl Runner for Synthetic {
    fn run(&mut self, spec: &BenchSpec) -> Result<Vec<Measurement>, Error> {
        let c = spec.configs.dispatch.clone();
        assert_eq!(spec.configs.combine, c, "a candidate runs every op with one config");
        assert!(spec.check, "every candidate is checked against the oracle");
        self.runs.push(c.clone());
        let ch = c.num_channels;
        let wrong = if self.wrong_at.contains(&ch) { 5 } else { 0 };
        let m = |op, us: f64| Measurement {
            op,
            iter_seconds: vec![us * 1e-6; spec.iters],
            rank_seconds: Vec::new(),
            logical_bytes: 1,
            inter_node_bytes: 0.0,
            intra_node_bytes: 0.0,
            inter_node_rows_to_node: Vec::new(),
            wrong: Some(wrong),
            device_resident: false,
            hop_seconds: None,
        };
        Ok(vec![m(Op::Dispatch, 999.0), m(Op::DispatchCached, self.dispatch_us[&ch]), m(Op::Combine, self.combine_us[&ch])])
    }

    fn should_stop(&mut self, local: bool) -> Result<bool, Error> {
        Ok(local)
    }
}

fn spec(strategy: Strategy, channels: Vec<usize>, device: &str) -> TuneSpec {
    TuneSpec {
        device: device.into(),
        topology: Topology { num_nodes: 1, ranks_per_node: 2 },
        shapes: vec![TuneShape::parse("ht-a").unwrap()],
        dtypes: vec![DType::Bf16],
        routing: RoutingKind::Uniform,
        seed: 1,
        grid: Grid { channels, chunk_tokens: vec![32], buffer_chunks: 4 },
        strategy,
        warmup: 0,
        iters: 3,
        remeasure_iters: 5,
        finalists: 2,
        tolerance: 0.05,
        timeout_ms: 5000,
        chunked: false,
        kernels: Some("feed".into()),
    }
}

/// Times like the GPU's: dispatch flat from 8 channels on, combine falling until 24.
fn gpu_like() -> Synthetic {
    let chans = [2usize, 4, 8, 12, 16, 17, 20, 24, 32];
    let d = [700.0, 380.0, 205.0, 203.0, 200.0, 200.0, 199.0, 198.0, 199.0];
    let c = [1500.0, 800.0, 420.0, 290.0, 230.0, 226.0, 205.0, 190.0, 191.0];
    Synthetic {
        dispatch_us: chans.iter().copied().zip(d).collect(),
        combine_us: chans.iter().copied().zip(c).collect(),
        wrong_at: Vec::new(),
        runs: Vec::new(),
    }
}

#[test]
fn exhaustive_sweep_picks_the_fewest_channels_within_five_percent() {
    let s = spec(Strategy::Exhaustive, vec![2, 4, 8, 12, 16, 20, 24, 32], "NVIDIA H200");
    let mut r = gpu_like();
    let (out, err) = tune::tune(&s, &mut r, &|| false, &|_, _| {});
    assert!(err.is_none() && !out.interrupted && out.wrong_points == 0);
    let w = &out.workloads[0];
    // 8 + the analytic defaults (8 and 17 channels for HT-A; 8 is on the grid).
    assert_eq!(w.points.len(), 9);
    let by_op = |op| w.choices.iter().find(|c| c.op == op).unwrap();
    // Dispatch: fastest 198 at 24; 205 <= 1.05 * 198 = 207.9 -> 8 channels.
    let d = by_op(TunedOp::Dispatch);
    assert_eq!((d.chosen.num_channels, d.fastest.num_channels, d.analytic.num_channels), (8, 24, 8));
    assert_eq!(d.chosen_us, 205.0);
    // Combine: fastest 190 at 24; 205 > 199.5 -> 24 channels; analytic 17 -> 226 / 190.
    let c = by_op(TunedOp::Combine);
    assert_eq!((c.chosen.num_channels, c.analytic.num_channels), (24, 17));
    assert!((c.analytic_ratio - 226.0 / 190.0).abs() < 1e-9, "{}", c.analytic_ratio);
    // Entries: channels only (no chunks on this backend), the kernels hash, the shape's tokens.
    let entries = out.entries(&s);
    assert_eq!(entries.len(), 2);
    for e in &entries {
        assert_eq!(e.knobs.chunk_tokens, None);
        assert_eq!(e.kernels.as_deref(), Some("feed"));
        assert_eq!((e.tokens, e.hidden, e.gpu.as_str()), (Some(4096), 7168, "NVIDIA H200"));
    }
}

#[test]
fn refine_measures_less_and_lands_on_the_same_choice_here() {
    let grid = vec![2, 4, 8, 12, 16, 20, 24, 32];
    let mut ex = gpu_like();
    let (full, _) = tune::tune(&spec(Strategy::Exhaustive, grid.clone(), "g"), &mut ex, &|| false, &|_, _| {});
    let mut re = gpu_like();
    let (refined, _) = tune::tune(&spec(Strategy::Refine, grid, "g"), &mut re, &|| false, &|_, _| {});
    assert!(re.runs.len() < ex.runs.len(), "refine ran {} candidates, exhaustive {}", re.runs.len(), ex.runs.len());
    let pick = |o: &tune::TuneOutcome| o.workloads[0].choices.iter().map(|c| c.chosen.num_channels).collect::<Vec<_>>();
    assert_eq!(pick(&refined), pick(&full));
}

#[test]
fn wrong_candidates_are_never_chosen_and_are_counted() {
    let s = spec(Strategy::Exhaustive, vec![2, 4, 8, 12, 16, 20, 24, 32], "g");
    let mut r = gpu_like();
    r.wrong_at = vec![8, 24];
    let (out, err) = tune::tune(&s, &mut r, &|| false, &|_, _| {});
    assert!(err.is_none());
    assert_eq!(out.wrong_points, 2);
    for c in &out.workloads[0].choices {
        assert!(![8, 24].contains(&c.chosen.num_channels) && ![8, 24].contains(&c.fastest.num_channels), "{c:?}");
    }
    // Dispatch without 8 and 24: fastest 199 (20 or 32), fewest within 5%: 12 (203).
    let d = out.workloads[0].choices.iter().find(|c| c.op == TunedOp::Dispatch).unwrap();
    assert_eq!(d.chosen.num_channels, 12);
    // No right candidate at all: an error, and no choice.
    let mut none = gpu_like();
    none.wrong_at = vec![2, 4, 8, 12, 16, 17, 20, 24, 32];
    let (out, err) = tune::tune(&s, &mut none, &|| false, &|_, _| {});
    assert!(err.is_some() && out.workloads[0].choices.is_empty());
}

#[test]
fn a_stop_request_keeps_the_finished_workloads() {
    let mut s = spec(Strategy::Exhaustive, vec![2, 4, 8], "g");
    s.shapes.push(TuneShape::parse("ll-b").unwrap());
    let mut first_only = s.clone();
    first_only.shapes.truncate(1);
    let mut r = gpu_like();
    let (full, _) = tune::tune(&first_only, &mut r, &|| false, &|_, _| {});
    let per_shape = r.runs.len();
    // Ask to stop once the first shape is done and one candidate of the second has run.
    let mut r = gpu_like();
    let calls = Cell::new(0usize);
    let stop = || {
        calls.set(calls.get() + 1);
        calls.get() > per_shape + 1
    };
    let (out, err) = tune::tune(&s, &mut r, &stop, &|_, _| {});
    assert!(err.is_none() && out.interrupted);
    assert_eq!(r.runs.len(), per_shape + 1);
    assert_eq!(out.workloads.len(), 2);
    assert_eq!(out.workloads[0], full.workloads[0]);
    assert!(out.workloads[1].choices.is_empty() && out.workloads[1].points.len() == 1);
    assert_eq!(out.entries(&s).len(), 2, "entries of the finished shape only");
}

#[test]
fn cpu_sweep_writes_entries_the_resolver_then_uses() {
    let topology = Topology { num_nodes: 2, ranks_per_node: 2 };
    let s = TuneSpec {
        device: "cpu".into(),
        topology,
        shapes: vec![TuneShape::parse("small:40:256:4:16").unwrap()],
        dtypes: vec![DType::Bf16, DType::Fp8],
        routing: RoutingKind::Uniform,
        seed: 3,
        grid: Grid { channels: vec![1, 2, 3], chunk_tokens: vec![4, 16], buffer_chunks: 2 },
        strategy: Strategy::Refine,
        warmup: 0,
        iters: 2,
        remeasure_iters: 2,
        finalists: 1,
        tolerance: 0.05,
        timeout_ms: 20_000,
        chunked: true,
        kernels: None,
    };
    let first = Config { num_channels: 1, chunk_tokens: 4, buffer_tokens: 8, timeout_ms: 20_000 };
    let ranks = CpuCluster::new(topology, first).unwrap().into_ranks();
    let mut runner = ThreadRunner { ranks: ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect() };
    let (out, err) = tune::tune(&s, &mut runner, &|| false, &|_, _| {});
    assert!(err.is_none(), "{err:?}");
    assert_eq!(out.wrong_points, 0, "every candidate matches the oracle");
    // bf16: dispatch + combine; fp8: dispatch.
    let entries = out.entries(&s);
    assert_eq!(entries.len(), 3);
    for w in &out.workloads {
        for c in &w.choices {
            assert!(c.chosen_us <= c.fastest_us * 1.05 + 1e-9, "{c:?}");
            let p = w.points.iter().find(|p| p.config == c.chosen).unwrap();
            assert!(p.remeasured_us.is_some() && p.wrong == 0);
        }
    }

    let dir = std::env::temp_dir().join(format!("switchyard-tune-test-{}", std::process::id()));
    let path = dir.join("tuned.toml");
    let mut file = ConfigFile::default();
    entries.iter().for_each(|e| file.upsert(e.clone()));
    file.write(&path).unwrap();
    let resolver = Resolver::new(PartialConfig::default(), None, Some(&path)).unwrap();
    for e in &entries {
        let key = ConfigKey { gpu: "cpu".into(), nodes: 2, ranks_per_node: 2, op: e.op, dtype: e.dtype, hidden: 256, tokens: 40 };
        let got = resolver.resolve(&key).unwrap();
        assert_eq!(Some(got.config.num_channels), e.knobs.num_channels);
        assert_eq!(Some(got.config.chunk_tokens), e.knobs.chunk_tokens);
        assert!(matches!(got.origins[0], Origin::Tuned { entry: Some(_), .. }), "{:?}", got.origins[0]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tuned configs committed under configs/ read, are current with this build's
/// kernel sources (else the resolver refuses them as stale: re-tune on the GPU host,
/// scripts/gpu-tune.sh), and hold an entry for every call the tune issue names.
#[test]
fn committed_configs_cover_ht_a_and_ll_b_and_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("configs/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    assert!(!files.is_empty(), "no configs/*.toml");
    for path in &files {
        let r = Resolver::new(PartialConfig::default(), Some(path), None).expect("the file reads");
        for tokens in [4096, 128] {
            for (op, dtype) in
                [(TunedOp::Dispatch, DType::Bf16), (TunedOp::Dispatch, DType::Fp8), (TunedOp::Combine, DType::Bf16)]
            {
                let key = ConfigKey { gpu: "NVIDIA H200".into(), nodes: 1, ranks_per_node: 2, op, dtype, hidden: 7168, tokens };
                let got = r.resolve(&key).unwrap_or_else(|e| panic!("{}: {key}: {e}", path.display()));
                assert!(
                    matches!(&got.origins[0], Origin::File { entry: Some(_), .. }),
                    "{}: {key}: num_channels from {:?}, not an entry",
                    path.display(),
                    got.origins[0]
                );
            }
        }
    }
}
