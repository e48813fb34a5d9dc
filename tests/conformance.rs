//! Conformance of the CPU backend with the serial oracle, as property tests.
//!
//! Each property generates [`switchyard::conformance::Case`]s (plain data: a
//! workload spec, a config and options, so the CUDA backend can later run the
//! very same cases) and asserts that `run_case_cpu` reports no error and no
//! element outside the documented bounds. The sweep covers topologies
//! (1x1 .. 4x8), token counts (0, 1, odd, more than one chunk), hidden sizes
//! (128, 256, a few 7168), k 1..=8 with -1 holes, chunk / buffer / channel
//! settings, BF16 and FP8 input and BF16 with FP8 on the wire, expert
//! alignment, cached dispatch, combine with and without weights, and uniform,
//! node-limited and Zipf routing.
//!
//! The proptest RNG seed is fixed, so every run tries the same cases; the
//! number of cases is kept modest so the suite stays fast on two cores.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard::backend::cpu::CpuCluster;
use switchyard::workload::{expert_outputs, RankInput};
use switchyard::{oracle, Communicator, Layout, Rows};

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, RngSeed};
use switchyard::conformance::{run_case_cpu, standard_cases, Case};
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{Config, DType, DispatchOptions, Topology};

/// Every knob a generated case can turn; kept flat so shrinking is simple and
/// the failing values are readable in the proptest output.
#[derive(Debug, Clone)]
struct Knobs {
    nodes: usize,
    per_node: usize,
    tokens: usize,
    hidden: usize,
    topk: usize,
    /// Extra experts per rank beyond the minimum needed for `topk`.
    extra_experts: usize,
    /// 0: BF16; 1: FP8 input; 2: BF16 input with FP8 on the wire.
    dtype_mode: u8,
    routing: RoutingKind,
    /// Picks the node limit M among the feasible ones (0: the smallest).
    max_nodes_pick: usize,
    hole_rate: f64,
    channels: usize,
    chunk: usize,
    /// buffer_tokens = chunk * buffer_chunks.
    buffer_chunks: usize,
    alignment: usize,
    cached: bool,
    combine_weights: bool,
    seed: u64,
}

fn case_from(k: &Knobs) -> Case {
    let topology = Topology::new(k.nodes, k.per_node).unwrap();
    let world = topology.world();
    // num_experts divisible by world and >= k.
    let per_rank = k.topk.div_ceil(world) + k.extra_experts;
    let num_experts = per_rank * world;
    let per_node_experts = per_rank * k.per_node;
    // Node limit M: node-limited top-k needs k <= M * experts per node.
    let min_m = k.topk.div_ceil(per_node_experts).max(1);
    let max_nodes = (min_m + k.max_nodes_pick).min(k.nodes).max(min_m);
    let (dtype, fp8_on_wire) = match k.dtype_mode {
        0 => (DType::Bf16, false),
        1 => (DType::Fp8, false),
        _ => (DType::Bf16, true),
    };
    let routing_name = match k.routing {
        RoutingKind::Uniform => "uniform",
        RoutingKind::NodeLimited => "nodelim",
        RoutingKind::Zipf => "zipf",
    };
    let name = format!(
        "prop-{}x{}-t{}-h{}-k{}-e{}-{}{}-{}{}-holes{}-ch{}-chunk{}-buf{}-align{}{}{}-seed{}",
        k.nodes,
        k.per_node,
        k.tokens,
        k.hidden,
        k.topk,
        num_experts,
        dtype,
        if fp8_on_wire { "-fp8wire" } else { "" },
        routing_name,
        if k.routing == RoutingKind::NodeLimited { format!("M{max_nodes}") } else { String::new() },
        k.hole_rate,
        k.channels,
        k.chunk,
        k.chunk * k.buffer_chunks,
        k.alignment,
        if k.cached { "-cached" } else { "" },
        if k.combine_weights { "-w" } else { "" },
        k.seed,
    );
    Case {
        name,
        spec: WorkloadSpec {
            topology,
            tokens: k.tokens,
            hidden: k.hidden,
            topk: k.topk,
            num_experts,
            dtype,
            routing: k.routing,
            max_nodes,
            hole_rate: k.hole_rate,
            seed: k.seed,
        },
        config: Config {
            num_channels: k.channels,
            chunk_tokens: k.chunk,
            buffer_tokens: k.chunk * k.buffer_chunks,
            timeout_ms: 20_000,
        },
        options: DispatchOptions { fp8_on_wire, expert_alignment: k.alignment },
        cached: k.cached,
        combine_weights: k.combine_weights,
    }
}

fn routing_strategy() -> impl Strategy<Value = RoutingKind> {
    prop_oneof![Just(RoutingKind::Uniform), Just(RoutingKind::NodeLimited), Just(RoutingKind::Zipf)]
}

/// Token counts: 0, 1, small odd, and more than the largest chunk.
fn tokens_strategy(max: usize) -> BoxedStrategy<usize> {
    prop_oneof![
        1 => Just(0usize),
        1 => Just(1usize),
        3 => (0..max.min(40) / 2).prop_map(|h| 2 * h + 1),
        3 => max / 2..=max,
    ]
    .boxed()
}

fn knobs_strategy(
    topologies: &'static [(usize, usize)],
    tokens: BoxedStrategy<usize>,
    hidden: BoxedStrategy<usize>,
) -> impl Strategy<Value = Knobs> {
    let shape = (
        proptest::sample::select(topologies),
        tokens,
        hidden,
        1usize..=8,
        0usize..=3,
        0u8..3,
        routing_strategy(),
        0usize..=3,
        prop_oneof![3 => Just(0.0f64), 3 => Just(0.15), 2 => Just(0.5), 1 => Just(1.0)],
    );
    let run = (
        1usize..=4,
        prop_oneof![Just(1usize), Just(2), Just(3), Just(8), Just(32)],
        1usize..=4,
        prop_oneof![Just(0usize), Just(1), Just(4), Just(128)],
        any::<bool>(),
        any::<bool>(),
        0u64..1_000_000,
    );
    (shape, run).prop_map(
        |(
            ((nodes, per_node), tokens, hidden, topk, extra_experts, dtype_mode, routing, max_nodes_pick, hole_rate),
            (channels, chunk, buffer_chunks, alignment, cached, combine_weights, seed),
        )| Knobs {
            nodes,
            per_node,
            tokens,
            hidden,
            topk,
            extra_experts,
            dtype_mode,
            routing,
            max_nodes_pick,
            hole_rate,
            channels,
            chunk,
            buffer_chunks,
            alignment,
            cached,
            combine_weights,
            seed,
        },
    )
}

fn prop_config(cases: u32, seed: u64) -> PropConfig {
    PropConfig { cases, rng_seed: RngSeed::Fixed(seed), max_shrink_iters: 64, ..PropConfig::default() }
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    // The spec must be one the generator accepts; otherwise the strategy is wrong, not the backend.
    if let Err(e) = case.spec.generate() {
        return Err(TestCaseError::fail(format!("strategy produced an invalid spec for case {}: {e}", case.name)));
    }
    let report = run_case_cpu(case);
    if std::env::var_os("SWITCHYARD_TEST_VERBOSE").is_some() {
        eprintln!("{}: {}", case.name, if report.passed() { "ok" } else { "FAILED" });
    }
    prop_assert!(report.passed(), "case {} failed: {:?}\ncase: {:#?}", case.name, report, case);
    Ok(())
}

const MAIN_TOPOLOGIES: &[(usize, usize)] = &[(1, 1), (1, 2), (1, 8), (2, 1), (2, 2), (2, 4), (4, 2)];

proptest! {
    #![proptest_config(prop_config(256, 0x5717_c4ad_0001))]
    /// The main sweep: small and medium topologies, hidden 128 or 256.
    #[test]
    fn cpu_matches_oracle_main_sweep(knobs in knobs_strategy(
        MAIN_TOPOLOGIES,
        tokens_strategy(96),
        prop_oneof![Just(128usize), Just(256)].boxed(),
    )) {
        check(&case_from(&knobs))?;
    }
}

proptest! {
    #![proptest_config(prop_config(24, 0x5717_c4ad_0002))]
    /// 32 ranks (4 nodes x 8) with tiny shapes: many peers, few rows each.
    #[test]
    fn cpu_matches_oracle_4x8_tiny(knobs in knobs_strategy(
        &[(4, 8)],
        prop_oneof![Just(0usize), Just(1), Just(3), Just(9)].boxed(),
        Just(128usize).boxed(),
    )) {
        check(&case_from(&knobs))?;
    }
}

proptest! {
    #![proptest_config(prop_config(8, 0x5717_c4ad_0003))]
    /// The DeepSeek-V3 hidden size, on a few cases only.
    #[test]
    fn cpu_matches_oracle_hidden_7168(knobs in knobs_strategy(
        &[(1, 2), (2, 2), (2, 4)],
        tokens_strategy(40),
        Just(7168usize).boxed(),
    )) {
        check(&case_from(&knobs))?;
    }
}

/// Hand-picked edge cases that random sampling may miss; each named by what it covers.
#[test]
fn cpu_matches_oracle_edge_cases() {
    let base = Knobs {
        nodes: 2,
        per_node: 2,
        tokens: 33,
        hidden: 128,
        topk: 4,
        extra_experts: 1,
        dtype_mode: 0,
        routing: RoutingKind::Uniform,
        max_nodes_pick: 0,
        hole_rate: 0.0,
        channels: 2,
        chunk: 8,
        buffer_chunks: 2,
        alignment: 0,
        cached: true,
        combine_weights: true,
        seed: 7,
    };
    let variants: Vec<(&str, Knobs)> = vec![
        ("zero tokens everywhere", Knobs { tokens: 0, ..base.clone() }),
        ("one token, 1x1", Knobs { nodes: 1, per_node: 1, tokens: 1, ..base.clone() }),
        ("every slot a hole (tokens go nowhere)", Knobs { hole_rate: 1.0, ..base.clone() }),
        ("chunk 1, buffer of one chunk", Knobs { chunk: 1, buffer_chunks: 1, tokens: 17, ..base.clone() }),
        ("more channels than tokens", Knobs { channels: 4, tokens: 3, ..base.clone() }),
        ("k = 8 over exactly 8 experts on 1x8", Knobs { nodes: 1, per_node: 8, topk: 8, extra_experts: 0, ..base.clone() }),
        ("k = 1", Knobs { topk: 1, ..base.clone() }),
        ("FP8 input", Knobs { dtype_mode: 1, ..base.clone() }),
        ("BF16 input, FP8 on the wire", Knobs { dtype_mode: 2, ..base.clone() }),
        ("alignment 128", Knobs { alignment: 128, ..base.clone() }),
        ("node-limited M=1 on 4x2", Knobs { nodes: 4, per_node: 2, routing: RoutingKind::NodeLimited, ..base.clone() }),
        (
            "zipf on 2x4, long run of chunks",
            Knobs { per_node: 4, routing: RoutingKind::Zipf, tokens: 257, chunk: 3, ..base.clone() },
        ),
        ("no weights in combine, no cached", Knobs { cached: false, combine_weights: false, ..base.clone() }),
    ];
    let mut failures = Vec::new();
    for (what, k) in &variants {
        let case = case_from(k);
        case.spec.generate().unwrap_or_else(|e| panic!("{what}: invalid spec for {}: {e}", case.name));
        let report = run_case_cpu(&case);
        if !report.passed() {
            failures.push(format!("{what} ({}): {:?}", case.name, report));
        }
    }
    assert!(failures.is_empty(), "{} of {} edge cases failed:\n{}", failures.len(), variants.len(), failures.join("\n"));
}

/// Every case of the standard set (`switchyard check`) passes on the CPU backend.
#[test]
fn standard_cases_pass_on_cpu() {
    let cases = standard_cases();
    assert!(!cases.is_empty(), "conformance::standard_cases() is empty");
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "standard case name {} is not unique", c.name);
    }
    let mut failures = Vec::new();
    for case in &cases {
        let report = run_case_cpu(case);
        assert_eq!(report.name, case.name, "report names another case");
        if !report.passed() {
            failures.push(format!("{}: {:?}", case.name, report));
        }
    }
    assert!(failures.is_empty(), "{} of {} standard cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

// ---------------------------------------------------------------- sequences on one communicator
//
// These run the backend directly and compare with the serial oracle through the
// shared helpers (not through `run_case_cpu`), so they also guard the runner.

/// Inputs where rank `r` has `tokens[r]` tokens (0 allowed), all from one spec family.
fn uneven_inputs(base: &WorkloadSpec, tokens: &[usize]) -> Vec<RankInput> {
    tokens
        .iter()
        .enumerate()
        .map(|(r, &t)| WorkloadSpec { tokens: t, ..base.clone() }.generate().expect("valid spec").swap_remove(r))
        .collect()
}

/// Several rounds on the same ranks, with a different token count on every rank
/// and every round (buffers and ring positions are reused across calls).
#[test]
fn repeated_rounds_with_uneven_tokens_match_oracle() {
    for (nodes, per_node) in [(1usize, 3usize), (2, 2), (2, 3), (3, 1)] {
        let topo = Topology::new(nodes, per_node).unwrap();
        let world = topo.world();
        let config = Config { num_channels: 3, chunk_tokens: 2, buffer_tokens: 5, timeout_ms: 20_000 };
        let mut ranks = CpuCluster::new(topo, config).unwrap().into_ranks();
        for round in 0..4u64 {
            let base = WorkloadSpec {
                topology: topo,
                tokens: 0,
                hidden: 128,
                topk: 3,
                num_experts: 2 * world,
                dtype: if round % 2 == 0 { DType::Bf16 } else { DType::Fp8 },
                routing: if round == 2 { RoutingKind::Zipf } else { RoutingKind::Uniform },
                max_nodes: nodes,
                hole_rate: 0.1,
                seed: 100 + round,
            };
            // Rank r gets (r * 7 + round * 5) % 23 tokens: some get 0, counts differ per round.
            let tokens: Vec<usize> = (0..world).map(|r| (r * 7 + round as usize * 5) % 23).collect();
            let inputs = Arc::new(uneven_inputs(&base, &tokens));
            let what = format!("{topo} round {round} tokens {tokens:?} {}", base.dtype);
            ranks = common::check_valid_round(&what, ranks, &base, inputs, DispatchOptions::default(), Duration::from_secs(60));
        }
    }
}

/// A handle stays valid after later dispatches: two routings in flight, combined
/// in reverse order, and a cached dispatch along the older routing.
#[test]
fn older_handles_stay_valid_after_newer_dispatches() {
    let topo = Topology::new(2, 2).unwrap();
    let spec_for = |seed: u64, tokens: usize| WorkloadSpec {
        topology: topo,
        tokens,
        hidden: 256,
        topk: 4,
        num_experts: 16,
        dtype: DType::Bf16,
        routing: RoutingKind::Uniform,
        max_nodes: 2,
        hole_rate: 0.1,
        seed,
    };
    let (sa, sb) = (spec_for(1, 19), spec_for(2, 11));
    let (ia, ib) = (Arc::new(sa.generate().unwrap()), Arc::new(sb.generate().unwrap()));
    let (ia2, ib2) = (ia.clone(), ib.clone());
    let results = common::run_cluster("two handles", topo, common::test_config(20_000), Duration::from_secs(60), move |comm| {
        let r = comm.rank();
        let opts = DispatchOptions::default();
        let dispatch = |comm: &mut switchyard::backend::cpu::CpuRank, inp: &RankInput| {
            let layout = Layout::new(&inp.topk_idx, 4, 16, topo).unwrap();
            comm.dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &opts)
                .unwrap_or_else(|e| panic!("rank {r}: dispatch: {e}"))
        };
        let (ra, ha) = dispatch(comm, &ia2[r]);
        let (rb, hb) = dispatch(comm, &ib2[r]);
        let cb = comm.combine(&expert_outputs(&rb.x, r), 256, &hb, None).unwrap_or_else(|e| panic!("rank {r}: combine B: {e}"));
        let ca = comm.combine(&expert_outputs(&ra.x, r), 256, &ha, None).unwrap_or_else(|e| panic!("rank {r}: combine A: {e}"));
        let cached_a = comm.dispatch_cached(ia2[r].x.as_ref(), &ha, &opts).unwrap_or_else(|e| panic!("rank {r}: cached A: {e}"));
        (ra, rb, ca, cb, cached_a)
    });
    let opts = DispatchOptions::default();
    let (wa, wb) = (oracle::dispatch(topo, 16, 4, &ia, &opts), oracle::dispatch(topo, 16, 4, &ib, &opts));
    let ya: Vec<_> = wa.iter().enumerate().map(|(d, o)| expert_outputs(&o.x, d)).collect();
    let yb: Vec<_> = wb.iter().enumerate().map(|(d, o)| expert_outputs(&o.x, d)).collect();
    let za: Vec<Vec<f32>> = wa.iter().map(|o| vec![0.0; o.topk_weights.len()]).collect();
    let zb: Vec<Vec<f32>> = wb.iter().map(|o| vec![0.0; o.topk_weights.len()]).collect();
    let ea = common::expected_combine(&[19; 4], 256, 4, &wa, &ya, &za);
    let eb = common::expected_combine(&[11; 4], 256, 4, &wb, &yb, &zb);
    let rel = common::combine_rel_of_abs_sum(topo);
    for (r, (ra, rb, ca, cb, cached_a)) in results.iter().enumerate() {
        assert!(*ra == wa[r], "rank {r}: dispatch A differs from the oracle: {}", common::summarize(ra));
        assert!(*rb == wb[r], "rank {r}: dispatch B differs from the oracle: {}", common::summarize(rb));
        common::check_close(&format!("rank {r}: combine A (after B)"), &ca.x, &ea.x[r], &ea.abs_sum[r], rel)
            .unwrap_or_else(|m| panic!("{m}"));
        common::check_close(&format!("rank {r}: combine B"), &cb.x, &eb.x[r], &eb.abs_sum[r], rel)
            .unwrap_or_else(|m| panic!("{m}"));
        assert!(*cached_a == wa[r].x, "rank {r}: cached dispatch along A (after B) differs from the oracle's rows");
        assert!(matches!(cached_a, Rows::Bf16 { .. }));
    }
}

/// The per-rank runner that `check` uses for a group of processes, driven here by
/// CPU ranks on threads: one set of ranks runs several cases (their configs set
/// collectively in between), every rank returns the same report, and each report
/// counts the mismatches of all ranks (the cases pass: the oracle agrees).
#[test]
fn cases_run_rank_by_rank_share_one_report() {
    let cases: Vec<Case> =
        standard_cases().into_iter().filter(|c| c.spec.topology == Topology { num_nodes: 2, ranks_per_node: 4 }).collect();
    assert!(cases.len() >= 2, "the standard cases have several 2x4 ones");
    let first = cases[0].config.clone();
    let ranks = CpuCluster::new(cases[0].spec.topology, first).unwrap().into_ranks();
    let cases = Arc::new(cases);
    let per_rank = common::run_ranks("run_case_as_process", ranks, Duration::from_secs(120), {
        let cases = cases.clone();
        move |comm| cases.iter().map(|c| switchyard::conformance::run_case_as_process(c, comm)).collect::<Vec<_>>()
    });
    for (i, case) in cases.iter().enumerate() {
        let r0 = &per_rank[0][i];
        assert!(r0.passed(), "{}: {:?}", case.name, r0.error);
        for (r, reports) in per_rank.iter().enumerate() {
            let ri = &reports[i];
            assert_eq!((&ri.name, ri.wrong, &ri.error), (&r0.name, r0.wrong, &r0.error), "rank {r} disagrees on {}", case.name);
        }
    }
    // A case for another group size fails on every rank with the same message.
    let other = standard_cases().into_iter().find(|c| c.spec.topology.world() != 8).unwrap();
    let ranks = CpuCluster::new(cases[0].spec.topology, cases[0].config.clone()).unwrap().into_ranks();
    let reports = common::run_ranks("wrong size", ranks, Duration::from_secs(60), move |comm| {
        switchyard::conformance::run_case_as_process(&other, comm)
    });
    for r in &reports {
        let e = r.error.as_deref().unwrap_or("");
        assert!(!r.passed() && e.contains("ranks"), "{e}");
    }
}
