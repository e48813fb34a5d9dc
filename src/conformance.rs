//! The conformance suite as data: cases (a workload spec, a config, options)
//! and a runner that checks a backend's results against the serial oracle.
//!
//! Bounds: dispatch (BF16 and FP8 alike) must be bit-exact, since rows are
//! copied, never recomputed (FP8 quantization follows one exact rule, see
//! [`crate::quant`]). Combine sums in f32 in arrival order and the forwarding
//! rank of a node rounds its partial sum to BF16 before it crosses the
//! inter-node hop, so an element may differ from the oracle's by at most
//! `2^-7 * (|expected| + sum of |contributions|)`; summed weights travel in f32
//! and may differ by at most `1e-6 * sum of |weights|`.

use std::thread;

use half::bf16;

use crate::backend::cpu::CpuCluster;
use crate::backend::{CombineOutput, Communicator, DispatchOptions, DispatchOutput};
use crate::config::Config;
use crate::error::Result;
use crate::oracle;
use crate::routing::Layout;
use crate::tensor::{DType, Rows};
use crate::topology::Topology;
use crate::workload::{self, RankInput, RoutingKind, WorkloadSpec};

/// One conformance case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    /// Short unique name.
    pub name: String,
    /// Inputs of every rank.
    pub spec: WorkloadSpec,
    /// Data-movement config (channels, chunk, buffer).
    pub config: Config,
    /// FP8 on the wire, expert alignment.
    #[serde(skip)]
    pub options: DispatchOptions,
    /// Also run a cached dispatch with the first dispatch's handle.
    pub cached: bool,
    /// Pass weights to combine (and check the summed weights).
    pub combine_weights: bool,
}

/// Outcome of one case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseReport {
    /// Case name.
    pub name: String,
    /// Rows (dispatch) and elements (combine) that differ from the oracle beyond the documented bounds.
    pub wrong: usize,
    /// An error the backend returned, if any.
    pub error: Option<String>,
}

impl CaseReport {
    /// No error and nothing wrong.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.wrong == 0
    }
}

impl Case {
    /// A case with a name derived from its parameters.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topology: Topology,
        tokens: usize,
        hidden: usize,
        topk: usize,
        num_experts: usize,
        dtype: DType,
        routing: RoutingKind,
        config: Config,
        options: DispatchOptions,
        cached: bool,
        combine_weights: bool,
        hole_rate: f64,
        seed: u64,
    ) -> Self {
        let name = format!(
            "{topology}-t{tokens}-h{hidden}-k{topk}of{num_experts}-{dtype}{}-{routing:?}-c{}x{}of{}{}{}{}{}",
            if options.fp8_on_wire { "+wire8" } else { "" },
            config.num_channels,
            config.chunk_tokens,
            config.buffer_tokens,
            if options.expert_alignment > 1 { format!("-align{}", options.expert_alignment) } else { String::new() },
            if cached { "-cached" } else { "" },
            if combine_weights { "-w" } else { "" },
            if hole_rate > 0.0 { "-holes" } else { "" },
        )
        .to_lowercase();
        let max_nodes = topology.num_nodes.div_ceil(2).max(1);
        let spec = WorkloadSpec { topology, tokens, hidden, topk, num_experts, dtype, routing, max_nodes, hole_rate, seed };
        Self { name, spec, config, options, cached, combine_weights }
    }
}

/// The standard cases `switchyard check` runs: every topology shape of the
/// issues (1x1, 1x2, 1x4, 1x8, 2x1, 2x2, 4x1, 2x4, 4x2, 4x8), edge token counts, both dtypes
/// and FP8 on the wire, chunk 1 and larger, cached dispatch, weighted combine.
pub fn standard_cases() -> Vec<Case> {
    use DType::*;
    use RoutingKind::*;
    let cfg = |channels, chunk, buffer| Config {
        num_channels: channels,
        chunk_tokens: chunk,
        buffer_tokens: buffer,
        timeout_ms: 20_000,
    };
    let opt = |wire, align| DispatchOptions { fp8_on_wire: wire, expert_alignment: align };
    let t = |n, r| Topology { num_nodes: n, ranks_per_node: r };
    vec![
        Case::new(t(1, 1), 5, 128, 2, 4, Bf16, Uniform, cfg(1, 2, 4), opt(false, 0), true, true, 0.0, 1),
        Case::new(t(1, 2), 0, 256, 4, 16, Bf16, Uniform, cfg(2, 8, 16), opt(false, 0), true, true, 0.0, 2),
        Case::new(t(1, 2), 1, 128, 8, 16, Fp8, Uniform, cfg(2, 1, 1), opt(false, 0), true, false, 0.0, 3),
        Case::new(t(1, 2), 257, 7168, 8, 256, Bf16, Uniform, cfg(4, 16, 64), opt(false, 0), true, true, 0.0, 4),
        Case::new(t(1, 2), 129, 7168, 8, 256, Bf16, Zipf, cfg(2, 8, 32), opt(true, 0), false, false, 0.0, 5),
        Case::new(t(1, 2), 77, 7168, 8, 256, Fp8, Uniform, cfg(3, 4, 8), opt(false, 4), true, true, 0.2, 6),
        Case::new(t(1, 8), 33, 256, 8, 64, Bf16, Uniform, cfg(2, 1, 2), opt(false, 0), true, true, 0.1, 7),
        Case::new(t(1, 8), 64, 256, 8, 64, Fp8, Zipf, cfg(4, 8, 8), opt(false, 8), false, true, 0.0, 8),
        Case::new(t(2, 1), 99, 256, 4, 8, Bf16, Uniform, cfg(2, 4, 8), opt(false, 0), true, true, 0.0, 9),
        Case::new(t(2, 1), 31, 128, 2, 2, Bf16, Uniform, cfg(1, 1, 1), opt(true, 0), true, true, 0.0, 10),
        // Four ranks: two emulated nodes of two (issue 5's one-host layout on 2 GPUs), and
        // one node of four or four of one.
        Case::new(t(2, 2), 150, 7168, 8, 256, Bf16, NodeLimited, cfg(4, 8, 32), opt(false, 0), true, true, 0.0, 18),
        Case::new(t(2, 2), 70, 7168, 8, 64, Fp8, Uniform, cfg(2, 4, 8), opt(false, 4), true, true, 0.1, 19),
        Case::new(t(2, 2), 0, 512, 4, 16, Bf16, Zipf, cfg(2, 2, 4), opt(true, 0), true, true, 0.0, 20),
        Case::new(t(1, 4), 45, 1024, 6, 32, Bf16, Uniform, cfg(3, 4, 8), opt(false, 0), true, true, 0.1, 21),
        Case::new(t(4, 1), 23, 256, 4, 16, Bf16, NodeLimited, cfg(1, 2, 2), opt(true, 0), true, true, 0.0, 22),
        Case::new(t(2, 4), 65, 256, 8, 64, Bf16, NodeLimited, cfg(2, 4, 8), opt(false, 0), true, true, 0.0, 11),
        Case::new(t(2, 4), 50, 512, 6, 32, Fp8, Uniform, cfg(3, 2, 5), opt(false, 2), true, true, 0.25, 12),
        Case::new(t(2, 4), 40, 7168, 8, 64, Bf16, Uniform, cfg(2, 8, 16), opt(true, 0), true, true, 0.0, 13),
        Case::new(t(4, 2), 45, 256, 8, 32, Bf16, NodeLimited, cfg(2, 3, 7), opt(false, 0), true, true, 0.0, 14),
        Case::new(t(4, 2), 17, 128, 1, 8, Bf16, Zipf, cfg(1, 1, 1), opt(false, 0), true, true, 0.5, 15),
        Case::new(t(4, 8), 9, 128, 8, 64, Bf16, Uniform, cfg(2, 2, 4), opt(false, 0), true, true, 0.1, 16),
        Case::new(t(4, 8), 4, 256, 4, 32, Fp8, NodeLimited, cfg(1, 1, 2), opt(false, 0), false, true, 0.0, 17),
    ]
}

/// Each rank's results from one run of a case.
pub struct RankResult {
    /// Dispatch output.
    pub dispatch: DispatchOutput,
    /// Cached dispatch rows, when the case asks for it.
    pub cached: Option<Rows>,
    /// Combine output.
    pub combine: CombineOutput,
}

/// What one rank does in a case, on any backend: layout, dispatch, optional cached
/// dispatch of the same rows, expert outputs, combine.
pub fn run_rank(comm: &mut dyn Communicator, case: &Case, input: &RankInput) -> Result<RankResult> {
    let spec = &case.spec;
    let layout = Layout::new(&input.topk_idx, spec.topk, spec.num_experts, comm.topology())?;
    let (dispatch, handle) = comm.dispatch(input.x.as_ref(), &input.topk_idx, &input.topk_weights, &layout, &case.options)?;
    let cached = if case.cached { Some(comm.dispatch_cached(input.x.as_ref(), &handle, &case.options)?) } else { None };
    let y = workload::expert_outputs(&dispatch.x, comm.rank());
    let weights = case.combine_weights.then_some(&dispatch.topk_weights[..]);
    let combine = comm.combine(&y, spec.hidden, &handle, weights)?;
    Ok(RankResult { dispatch, cached, combine })
}

/// What every rank of a case should get, from the serial oracle.
struct Expected {
    dispatch: Vec<DispatchOutput>,
    combine: Vec<CombineOutput>,
    abs: Vec<Vec<f32>>,
}

fn expected(case: &Case, inputs: &[RankInput]) -> Expected {
    let spec = &case.spec;
    let want = oracle::dispatch(spec.topology, spec.num_experts, spec.topk, inputs, &case.options);
    let ys: Vec<Vec<bf16>> = want.iter().enumerate().map(|(r, d)| workload::expert_outputs(&d.x, r)).collect();
    let ws: Vec<Vec<f32>> = want.iter().map(|d| d.topk_weights.clone()).collect();
    let tokens: Vec<usize> = inputs.iter().map(|i| i.topk_idx.len() / spec.topk).collect();
    let weights = case.combine_weights.then_some(&ws[..]);
    let combine = oracle::combine(&tokens, spec.hidden, spec.topk, &want, &ys, weights);
    let abs = abs_sums(&tokens, spec.hidden, &want, &ys);
    Expected { dispatch: want, combine, abs }
}

fn wrong_of(want: &Expected, r: usize, got: &RankResult) -> usize {
    let mut wrong = count_wrong_dispatch(&got.dispatch, &want.dispatch[r]);
    if let Some(c) = &got.cached {
        wrong += count_wrong_rows(c, &want.dispatch[r].x);
    }
    wrong + count_wrong_combine(&got.combine, &want.combine[r], &want.abs[r])
}

/// Compare every rank's results with the oracle; returns the number of wrong rows/elements.
pub fn check_results(case: &Case, inputs: &[RankInput], results: &[RankResult]) -> usize {
    let want = expected(case, inputs);
    results.iter().enumerate().map(|(r, got)| wrong_of(&want, r, got)).sum()
}

/// Run one case as `comm`'s rank of a group of processes (one rank each): this rank
/// runs its part under the case's config ([`Communicator::set_config`]) and compares
/// its own results with the oracle; the ranks then share their counts and errors, so
/// every rank returns the same report. Collective.
pub fn run_case_as_process(case: &Case, comm: &mut dyn Communicator) -> CaseReport {
    let report = |wrong, error: Option<String>| CaseReport { name: case.name.clone(), wrong, error };
    let rank = comm.rank();
    let mine: std::result::Result<usize, String> = (|| {
        let inputs = case.spec.generate().map_err(|e| format!("bad case: {e}"))?;
        if inputs.len() != comm.topology().world() {
            return Err(format!("case needs {} ranks, the group has {}", inputs.len(), comm.topology().world()));
        }
        if *comm.config() != case.config {
            comm.set_config(case.config.clone()).map_err(|e| e.to_string())?;
        }
        let got = run_rank(comm, case, &inputs[rank]).map_err(|e| e.to_string())?;
        Ok(wrong_of(&expected(case, &inputs), rank, &got))
    })();
    match crate::backend::gather_outcomes(comm, mine.as_ref().map_err(Clone::clone)) {
        Ok(Ok(wrong)) => report(wrong.iter().sum(), None),
        Ok(Err((r, e))) => report(0, Some(format!("rank {r}: {e}"))),
        Err(e) => report(0, Some(format!("rank {rank}: gathering the results: {e}"))),
    }
}

/// Run one case on the CPU backend (threads as ranks) and compare with the oracle.
pub fn run_case_cpu(case: &Case) -> CaseReport {
    match CpuCluster::new(case.spec.topology, case.config.clone()) {
        Ok(c) => run_case_on(case, c.into_ranks().into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect()),
        Err(e) => CaseReport { name: case.name.clone(), wrong: 0, error: Some(e.to_string()) },
    }
}

/// Run one case on the given ranks of any backend (one thread per rank, all in
/// this process) and compare every rank's results with the oracle.
pub fn run_case_on(case: &Case, ranks: Vec<Box<dyn Communicator>>) -> CaseReport {
    let report = |wrong, error: Option<String>| CaseReport { name: case.name.clone(), wrong, error };
    let inputs = match case.spec.generate() {
        Ok(i) => i,
        Err(e) => return report(0, Some(format!("bad case: {e}"))),
    };
    if ranks.len() != inputs.len() {
        return report(0, Some(format!("case needs {} ranks, backend gave {}", inputs.len(), ranks.len())));
    }
    let results: Vec<Result<RankResult>> = thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .zip(&inputs)
            .map(|(mut comm, input)| s.spawn(move || run_rank(comm.as_mut(), case, input)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(crate::Error::Protocol { rank: usize::MAX, detail: "rank thread panicked".into() }))
            })
            .collect()
    });
    let mut ok = Vec::with_capacity(results.len());
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) => ok.push(v),
            Err(e) => return report(0, Some(format!("rank {r}: {e}"))),
        }
    }
    report(check_results(case, &inputs, &ok), None)
}

/// Rows of `got` whose payload or scales differ from `want` (bit-exact), plus the
/// difference in row counts; a dtype or hidden-size mismatch counts every row.
pub fn count_wrong_rows(got: &Rows, want: &Rows) -> usize {
    if got.dtype() != want.dtype() || got.hidden() != want.hidden() {
        return got.num_rows().max(want.num_rows()).max(1);
    }
    let (g, w) = (got.as_ref(), want.as_ref());
    let n = g.num_rows().min(w.num_rows());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let differing =
        (0..n).filter(|&i| g.row_payload(i) != w.row_payload(i) || bits(g.row_scales(i)) != bits(w.row_scales(i))).count();
    differing + g.num_rows().abs_diff(w.num_rows())
}

/// Rows of a dispatch output that differ from the oracle's (rows, routing, sources),
/// plus every wrong per-expert count. Bit-exact.
pub fn count_wrong_dispatch(got: &DispatchOutput, want: &DispatchOutput) -> usize {
    let rows = want.source_rank.len();
    if got.source_rank.len() != rows || got.topk_idx.len() != want.topk_idx.len() {
        return rows.max(got.source_rank.len()).max(1);
    }
    let k = if rows == 0 { 0 } else { want.topk_idx.len() / rows };
    let mut wrong = count_wrong_rows(&got.x, &want.x);
    for i in 0..rows {
        let meta_ok = got.source_rank[i] == want.source_rank[i]
            && got.source_token[i] == want.source_token[i]
            && got.topk_idx[i * k..(i + 1) * k] == want.topk_idx[i * k..(i + 1) * k]
            && got.topk_weights[i * k..(i + 1) * k]
                .iter()
                .map(|v| v.to_bits())
                .eq(want.topk_weights[i * k..(i + 1) * k].iter().map(|v| v.to_bits()));
        wrong += usize::from(!meta_ok);
    }
    wrong
        + got.tokens_per_expert.iter().zip(&want.tokens_per_expert).filter(|(a, b)| a != b).count()
        + got.tokens_per_expert.len().abs_diff(want.tokens_per_expert.len())
}

/// `[T, H]` per rank: the sum of absolute values of the rows combined into each element.
pub fn abs_sums(num_tokens: &[usize], hidden: usize, dispatched: &[DispatchOutput], y: &[Vec<bf16>]) -> Vec<Vec<f32>> {
    let mut acc: Vec<Vec<f32>> = num_tokens.iter().map(|&t| vec![0f32; t * hidden]).collect();
    for (d, out) in dispatched.iter().enumerate() {
        for i in 0..out.source_rank.len() {
            let (s, t) = (out.source_rank[i] as usize, out.source_token[i] as usize);
            for h in 0..hidden {
                acc[s][t * hidden + h] += y[d][i * hidden + h].to_f32().abs();
            }
        }
    }
    acc
}

/// Elements of a combine output outside the documented bound around the oracle's
/// (see the module docs); `abs_sum` is this rank's part of [`abs_sums`].
pub fn count_wrong_combine(got: &CombineOutput, want: &CombineOutput, abs_sum: &[f32]) -> usize {
    if got.x.len() != want.x.len() {
        return got.x.len().max(want.x.len()).max(1);
    }
    let mut wrong = got
        .x
        .iter()
        .zip(&want.x)
        .zip(abs_sum)
        .filter(|((g, w), a)| {
            let (g, w) = (g.to_f32(), w.to_f32());
            !((g - w).abs() <= (w.abs() + **a) / 128.0 + f32::MIN_POSITIVE)
        })
        .count();
    match (&got.topk_weights, &want.topk_weights) {
        (Some(g), Some(w)) if g.len() == w.len() => {
            wrong += g.iter().zip(w).filter(|(g, w)| !((*g - *w).abs() <= 1e-6 * (w.abs() + 1.0))).count();
        }
        (None, None) => {}
        _ => wrong += 1,
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_rows_are_counted() {
        let a = Rows::Bf16 { hidden: 2, data: vec![bf16::ONE; 6] };
        let mut b = a.clone();
        assert_eq!(count_wrong_rows(&a, &b), 0);
        if let Rows::Bf16 { data, .. } = &mut b {
            data[3] = bf16::ZERO;
            data.truncate(4);
        }
        assert_eq!(count_wrong_rows(&a, &b), 2); // one differing row + one missing
    }

    #[test]
    fn comparisons_catch_a_single_flipped_value() {
        let case = &standard_cases()[3];
        let inputs = case.spec.generate().unwrap();
        let want = oracle::dispatch(case.spec.topology, case.spec.num_experts, case.spec.topk, &inputs, &case.options);
        let mut got = want[0].clone();
        assert_eq!(count_wrong_dispatch(&got, &want[0]), 0);
        got.x.row_payload_mut(3)[5] ^= 1;
        assert_eq!(count_wrong_dispatch(&got, &want[0]), 1);
        let mut got = want[0].clone();
        got.topk_weights[0] += 1.0;
        assert_eq!(count_wrong_dispatch(&got, &want[0]), 1);
        let mut got = want[0].clone();
        got.source_token.swap(0, 1);
        assert_eq!(count_wrong_dispatch(&got, &want[0]), 2);
        let c = CombineOutput { x: vec![bf16::from_f32(1.0); 4], topk_weights: None };
        let mut bad = c.clone();
        bad.x[2] = bf16::from_f32(1.5);
        assert_eq!(count_wrong_combine(&bad, &c, &[1.0; 4]), 1);
        assert_eq!(count_wrong_combine(&c, &c, &[1.0; 4]), 0);
    }
}
