//! The plain serial oracle: what dispatch and combine must produce, computed
//! from every rank's inputs at once, with no channels, chunks or hops.
//! Written for clarity, not speed; tests and `check` compare backends with it.

use half::bf16;

use crate::backend::{CombineOutput, DispatchOptions, DispatchOutput};
use crate::quant;
use crate::tensor::{DType, Rows};
use crate::topology::Topology;
use crate::workload::RankInput;

/// Expected dispatch output of every rank. Inputs must be valid.
pub fn dispatch(
    topology: Topology,
    num_experts: usize,
    topk: usize,
    inputs: &[RankInput],
    options: &DispatchOptions,
) -> Vec<DispatchOutput> {
    let world = topology.world();
    let per_rank = num_experts / world;
    // What travels: FP8 input as is, BF16 input quantized when FP8 is asked for on the wire.
    let wire: Vec<Rows> = inputs
        .iter()
        .map(|inp| match (&inp.x, options.fp8_on_wire) {
            (Rows::Bf16 { hidden, data }, true) => {
                let (q, s) = quant::quantize(data, *hidden);
                Rows::Fp8 { hidden: *hidden, data: q, scales: s }
            }
            (x, _) => x.clone(),
        })
        .collect();
    let hidden = inputs.first().map(|i| i.x.hidden()).unwrap_or(0);
    let dtype = wire.first().map(|w| w.dtype()).unwrap_or(DType::Bf16);
    let mut outs = Vec::with_capacity(world);
    for dest in 0..world {
        let my_experts = dest * per_rank..(dest + 1) * per_rank;
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (src, inp) in inputs.iter().enumerate() {
            for (t, ids) in inp.topk_idx.chunks_exact(topk).enumerate() {
                if ids.iter().any(|&e| e >= 0 && my_experts.contains(&(e as usize))) {
                    rows.push((src, t));
                }
            }
        }
        let mut x = Rows::zeros(dtype, rows.len(), hidden);
        let mut topk_idx = Vec::with_capacity(rows.len() * topk);
        let mut topk_weights = Vec::with_capacity(rows.len() * topk);
        let mut tokens_per_expert = vec![0usize; per_rank];
        for (i, &(src, t)) in rows.iter().enumerate() {
            let w = wire[src].as_ref();
            x.row_payload_mut(i).copy_from_slice(w.row_payload(t));
            x.row_scales_mut(i).copy_from_slice(w.row_scales(t));
            for slot in 0..topk {
                let e = inputs[src].topk_idx[t * topk + slot];
                if e >= 0 && my_experts.contains(&(e as usize)) {
                    let local = e as usize - my_experts.start;
                    topk_idx.push(local as i64);
                    topk_weights.push(inputs[src].topk_weights[t * topk + slot]);
                    tokens_per_expert[local] += 1;
                } else {
                    topk_idx.push(-1);
                    topk_weights.push(0.0);
                }
            }
        }
        let align = options.expert_alignment.max(1);
        for c in &mut tokens_per_expert {
            *c = c.div_ceil(align) * align;
        }
        outs.push(DispatchOutput {
            x,
            topk_idx,
            topk_weights,
            tokens_per_expert,
            source_rank: rows.iter().map(|&(s, _)| s as u32).collect(),
            source_token: rows.iter().map(|&(_, t)| t as u32).collect(),
        });
    }
    outs
}

/// Expected combine output of every rank: for each token, the f32 sum of the
/// rows every rank sends back for it, rounded once to BF16.
/// `dispatched[d]` says where rank `d`'s rows came from; `y[d]` is `[R_d, H]`;
/// `weights[d]`, if given, is `[R_d, k]`.
pub fn combine(
    num_tokens: &[usize],
    hidden: usize,
    topk: usize,
    dispatched: &[DispatchOutput],
    y: &[Vec<bf16>],
    weights: Option<&[Vec<f32>]>,
) -> Vec<CombineOutput> {
    let mut acc: Vec<Vec<f32>> = num_tokens.iter().map(|&t| vec![0f32; t * hidden]).collect();
    let mut wacc: Vec<Vec<f32>> = num_tokens.iter().map(|&t| vec![0f32; t * topk]).collect();
    for (d, out) in dispatched.iter().enumerate() {
        for i in 0..out.source_rank.len() {
            let (s, t) = (out.source_rank[i] as usize, out.source_token[i] as usize);
            for h in 0..hidden {
                acc[s][t * hidden + h] += y[d][i * hidden + h].to_f32();
            }
            if let Some(w) = weights {
                for j in 0..topk {
                    wacc[s][t * topk + j] += w[d][i * topk + j];
                }
            }
        }
    }
    acc.into_iter()
        .zip(wacc)
        .map(|(a, w)| CombineOutput { x: a.into_iter().map(bf16::from_f32).collect(), topk_weights: weights.map(|_| w) })
        .collect()
}
