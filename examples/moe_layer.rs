//! A small Mixture-of-Experts layer on the CPU backend, checked against the
//! same layer computed without communication.
//!
//! ```text
//! cargo run --release --example moe_layer
//! ```
//!
//! Per rank: router (a random linear map hidden -> experts) -> top-k of the
//! router logits (plain, or DeepSeek-V3 node-limited) with softmax gate weights
//! over the chosen k -> dispatch -> each rank applies its own experts (one
//! small `hidden x hidden` linear map each) to the rows it received, weights
//! each by its gate weight and sums its local experts per row (DeepEP's normal
//! mode) -> combine, which sums the per-rank partial rows per token.
//!
//! Reference: `out[t] = sum_k w_k * Expert_{e_k}(x[t])` in f32 for every token.
//! The run prints the largest error and exits non-zero when any element is
//! outside the BF16 bound (one rounding of each rank's partial row, one of each
//! node's partial sum before the inter-node hop, and one of the final sum).

use std::process::ExitCode;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard::backend::cpu::CpuCluster;
use switchyard::{routing, Communicator, Config, DispatchOptions, Layout, Rows, RowsRef, Topology};

struct Model {
    hidden: usize,
    num_experts: usize,
    topk: usize,
    /// `[H, E]` router weights.
    router: Vec<f32>,
    /// `[E][H, H]` expert weights (row-major, `out = x * W`).
    experts: Vec<Vec<f32>>,
}

impl Model {
    fn new(hidden: usize, num_experts: usize, topk: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let s = 1.0 / (hidden as f32).sqrt();
        let router = (0..hidden * num_experts).map(|_| rng.gen_range(-s..s)).collect();
        let experts = (0..num_experts).map(|_| (0..hidden * hidden).map(|_| rng.gen_range(-s..s)).collect()).collect();
        Self { hidden, num_experts, topk, router, experts }
    }

    /// `x * W_e` for one row.
    fn expert(&self, e: usize, x: &[f32]) -> Vec<f32> {
        let h = self.hidden;
        let w = &self.experts[e];
        let mut out = vec![0f32; h];
        for (i, &xi) in x.iter().enumerate() {
            for (o, &wij) in out.iter_mut().zip(&w[i * h..(i + 1) * h]) {
                *o += xi * wij;
            }
        }
        out
    }

    /// Router: logits `[T, E]`, top-k ids and softmax weights over the chosen k.
    fn route(&self, x: &[bf16], topo: Topology, max_nodes: Option<usize>) -> (Vec<i64>, Vec<f32>) {
        let (h, e, k) = (self.hidden, self.num_experts, self.topk);
        let t = x.len() / h;
        let mut logits = vec![0f32; t * e];
        for tok in 0..t {
            for (i, xv) in x[tok * h..(tok + 1) * h].iter().enumerate() {
                let xv = xv.to_f32();
                for (l, &r) in logits[tok * e..(tok + 1) * e].iter_mut().zip(&self.router[i * e..(i + 1) * e]) {
                    *l += xv * r;
                }
            }
        }
        let idx = match max_nodes {
            Some(m) => routing::node_limited_topk(&logits, e, k, topo, m).expect("node-limited top-k"),
            None => routing::topk(&logits, e, k).expect("top-k"),
        };
        let mut w = vec![0f32; t * k];
        for tok in 0..t {
            let chosen: Vec<f32> = idx[tok * k..(tok + 1) * k].iter().map(|&x| logits[tok * e + x as usize]).collect();
            let m = chosen.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = chosen.iter().map(|&l| (l - m).exp()).sum();
            for (j, &l) in chosen.iter().enumerate() {
                w[tok * k + j] = (l - m).exp() / z;
            }
        }
        (idx, w)
    }
}

/// Result of one run: max abs error, max error relative to its bound, and whether all elements are within the bound.
struct Outcome {
    max_abs_err: f32,
    worst_ratio: f32,
}

fn run_layer(
    topo: Topology,
    tokens: usize,
    hidden: usize,
    num_experts: usize,
    topk: usize,
    max_nodes: Option<usize>,
) -> Result<Outcome, String> {
    let model = std::sync::Arc::new(Model::new(hidden, num_experts, topk, 0x5eed));
    let world = topo.world();
    let per_rank = num_experts / world;
    let inputs: Vec<Vec<bf16>> = (0..world)
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(100 + r as u64);
            (0..tokens * hidden).map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0))).collect()
        })
        .collect();
    let inputs = std::sync::Arc::new(inputs);
    let ranks = CpuCluster::new(topo, Config::default()).map_err(|e| e.to_string())?.into_ranks();

    let outs: Vec<Result<(Vec<bf16>, Vec<i64>, Vec<f32>), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut comm| {
                let (model, inputs) = (model.clone(), inputs.clone());
                s.spawn(move || {
                    let r = comm.rank();
                    let x = &inputs[r];
                    let (idx, w) = model.route(x, topo, max_nodes);
                    let layout = Layout::new(&idx, topk, num_experts, topo).map_err(|e| format!("rank {r}: layout: {e}"))?;
                    let (recv, handle) = comm
                        .dispatch(RowsRef::Bf16 { hidden, data: x }, &idx, &w, &layout, &DispatchOptions::default())
                        .map_err(|e| format!("rank {r}: dispatch: {e}"))?;
                    // Local experts: sum_j w_j * Expert_j(row) over the slots hosted here.
                    let n = recv.source_rank.len();
                    let mut y = Vec::with_capacity(n * hidden);
                    for i in 0..n {
                        let row = match &recv.x {
                            Rows::Bf16 { data, .. } => {
                                data[i * hidden..(i + 1) * hidden].iter().map(|v| v.to_f32()).collect::<Vec<_>>()
                            }
                            Rows::Fp8 { .. } => recv.x.row_f32(i),
                        };
                        let mut acc = vec![0f32; hidden];
                        for j in 0..topk {
                            let local = recv.topk_idx[i * topk + j];
                            if local >= 0 {
                                let e = r * per_rank + local as usize;
                                let gw = recv.topk_weights[i * topk + j];
                                for (a, v) in acc.iter_mut().zip(model.expert(e, &row)) {
                                    *a += gw * v;
                                }
                            }
                        }
                        y.extend(acc.into_iter().map(bf16::from_f32));
                    }
                    let out = comm.combine(&y, hidden, &handle, None).map_err(|e| format!("rank {r}: combine: {e}"))?;
                    Ok((out.x, idx, w))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank thread panicked".into()))).collect()
    });

    // Reference without communication: out[t] = sum_k w_k * Expert_{e_k}(x[t]).
    let mut max_abs_err = 0f32;
    let mut worst_ratio = 0f32;
    for (r, res) in outs.into_iter().enumerate() {
        let (got, idx, w) = res?;
        for t in 0..tokens {
            let x: Vec<f32> = inputs[r][t * hidden..(t + 1) * hidden].iter().map(|v| v.to_f32()).collect();
            let mut want = vec![0f32; hidden];
            let mut abs = vec![0f32; hidden];
            for j in 0..topk {
                let e = idx[t * topk + j];
                if e < 0 {
                    continue;
                }
                for ((o, a), v) in want.iter_mut().zip(abs.iter_mut()).zip(model.expert(e as usize, &x)) {
                    *o += w[t * topk + j] * v;
                    *a += (w[t * topk + j] * v).abs();
                }
            }
            for h in 0..hidden {
                let g = got[t * hidden + h].to_f32();
                let err = (g - want[h]).abs();
                // BF16 roundings, each at most 2^-8 of what it rounds: each rank's partial
                // row (<= sum of |terms| in all), each node's partial sum before it crosses
                // the inter-node hop (same), and the final sum; plus f32 reordering.
                let bound = (2.0 * abs[h] + want[h].abs()) / 256.0 + 1e-4 * abs[h] + 1e-6;
                max_abs_err = max_abs_err.max(err);
                worst_ratio = worst_ratio.max(err / bound);
                if !(err <= bound) {
                    return Err(format!(
                        "rank {r} token {t} element {h}: got {g}, reference {}, error {err} > bound {bound}",
                        want[h]
                    ));
                }
            }
        }
    }
    Ok(Outcome { max_abs_err, worst_ratio })
}

fn main() -> ExitCode {
    let topo = Topology::new(2, 2).expect("topology");
    let (tokens, hidden, num_experts, topk) = (64, 256, 16, 4);
    let mut ok = true;
    for (label, max_nodes) in [("plain top-k", None), ("node-limited top-k (M=1)", Some(1))] {
        let start = std::time::Instant::now();
        match run_layer(topo, tokens, hidden, num_experts, topk, max_nodes) {
            Ok(o) => println!(
                "moe_layer {topo} {label}: {tokens} tokens/rank, hidden {hidden}, {num_experts} experts, top-{topk}: max abs error {:.3e} ({:.0}% of the BF16 bound) in {:.0?}",
                o.max_abs_err,
                100.0 * o.worst_ratio,
                start.elapsed()
            ),
            Err(e) => {
                eprintln!("moe_layer {topo} {label}: FAILED: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
