//! Combine between CPU ranks that are processes: dispatch's route in reverse,
//! each hop one personalized exchange.
//!
//! 1. Intra-node: every received row goes back to its source if the source is on
//!    this node, else to this node's rank with the source's local index (the rank
//!    that forwarded it here).
//! 2. Inter-node: each forwarding rank sums its node's rows per token in f32 and
//!    sends one BF16 row per token back to the source over the rail.
//!
//! The source sums what comes back in f32 and writes BF16 once.

use std::time::Duration;

use half::bf16;

use super::super::combine::{add_row, add_weights, to_bf16};
use super::super::slots::CombineSlot;
use super::dispatch::check_whole_slots;
use crate::backend::Traffic;
use crate::bootstrap::ProcessGroup;
use crate::error::{Error, Result};
use crate::topology::Topology;

/// What one rank's combine starts from.
pub(crate) struct Input<'a> {
    pub me: usize,
    pub topo: Topology,
    /// `[R, H]` one row per received row.
    pub y: &'a [bf16],
    pub hidden: usize,
    /// `[R, k]` weights to sum back, if any.
    pub weights: Option<&'a [f32]>,
    pub topk: usize,
    /// Tokens of this rank.
    pub num_tokens: usize,
    /// `[R]` source rank and token of each received row.
    pub source_rank: &'a [u32],
    pub source_token: &'a [u32],
    /// From dispatch: `[nodes][rail peer's tokens]` rows of this node each forwarded token reached.
    pub fwd_reach: &'a [Vec<u8>],
    /// `[nodes]` tokens of this rank that went to each node (partial rows to expect back).
    pub tokens_to_node: &'a [usize],
    pub timeout: Duration,
}

/// The per-token sums.
pub(crate) struct Combined {
    pub x: Vec<bf16>,
    pub weights: Option<Vec<f32>>,
    pub traffic: Traffic,
}

/// Running f32 sums of `rows` rows (and their weights).
struct Sums {
    hidden: usize,
    kw: usize,
    x: Vec<f32>,
    w: Vec<f32>,
}

impl Sums {
    fn new(rows: usize, hidden: usize, kw: usize) -> Self {
        Self { hidden, kw, x: vec![0.0; rows * hidden], w: vec![0.0; rows * kw] }
    }

    fn add(&mut self, row: usize, payload: &[bf16], weights: &[f32]) {
        add_row(&mut self.x[row * self.hidden..(row + 1) * self.hidden], payload);
        add_weights(&mut self.w[row * self.kw..(row + 1) * self.kw], weights);
    }

    fn add_slot(&mut self, row: usize, slot: &CombineSlot, s: &[u8], wbuf: &mut [f32]) {
        slot.weights(s, wbuf);
        self.add(row, bytemuck::cast_slice(slot.payload(s)), &wbuf[..self.kw]);
    }
}

fn bad(me: usize, detail: String) -> Error {
    Error::Protocol { rank: me, detail }
}

pub(crate) fn run(group: &mut dyn ProcessGroup, input: &Input<'_>) -> Result<Combined> {
    let (topo, me, hidden) = (input.topo, input.me, input.hidden);
    let (rpn, nodes, world) = (topo.ranks_per_node, topo.num_nodes, topo.world());
    let (my_node, my_local) = (topo.node_of(me), topo.local_of(me));
    let kw = if input.weights.is_some() { input.topk } else { 0 };
    let slot = CombineSlot::new(kw, hidden * 2);
    let slot_bytes = slot.bytes();
    let mut traffic = Traffic::new(topo);
    let mut out = Sums::new(input.num_tokens, hidden, kw);
    // Forwarded tokens of each other node: token -> its row in that node's partial sums.
    let fwd_index: Vec<Vec<u32>> = input
        .fwd_reach
        .iter()
        .map(|reach| {
            let mut next = 0u32;
            reach
                .iter()
                .map(|&r| {
                    if r == 0 {
                        return u32::MAX;
                    }
                    next += 1;
                    next - 1
                })
                .collect()
        })
        .collect();
    let mut partial: Vec<Sums> =
        fwd_index.iter().map(|ix| Sums::new(ix.iter().filter(|&&i| i != u32::MAX).count(), hidden, kw)).collect();
    let mut arrived: Vec<Vec<u8>> = input.fwd_reach.iter().map(|r| vec![0u8; r.len()]).collect();
    let mut wbuf = vec![0f32; kw];
    // Add one row for (src, token) here: to the output if it is ours, else to the partial sum of its node.
    let mut take = |src: usize, token: usize, row: &[bf16], w: &[f32], out: &mut Sums| -> Result<()> {
        if src == me {
            if token >= input.num_tokens {
                return Err(bad(me, format!("combine row for token {token}, this rank has {}", input.num_tokens)));
            }
            out.add(token, row, w);
            return Ok(());
        }
        let n = topo.node_of(src);
        let ok = src < world && n != my_node && topo.local_of(src) == my_local;
        let at = ok.then(|| fwd_index[n].get(token).copied()).flatten().filter(|&i| i != u32::MAX);
        let Some(i) = at else {
            return Err(bad(me, format!("combine row for rank {src} token {token} was not forwarded by this rank")));
        };
        partial[n].add(i as usize, row, w);
        arrived[n][token] += 1;
        Ok(())
    };

    // Hop 1 (intra-node): each received row to its source or to the rank that forwarded it.
    let mut parts = vec![Vec::new(); world];
    for (i, (&src, &token)) in input.source_rank.iter().zip(input.source_token).enumerate() {
        let (src, token) = (src as usize, token as usize);
        let row = &input.y[i * hidden..(i + 1) * hidden];
        let w = input.weights.map_or(&[][..], |w| &w[i * input.topk..(i + 1) * input.topk]);
        let dest = if topo.node_of(src) == my_node { src } else { topo.rank_of(my_node, topo.local_of(src)) };
        if dest == me {
            take(src, token, row, w, &mut out)?;
            traffic.local.add(2 * hidden + 4 * kw);
        } else {
            let at = parts[dest].len();
            parts[dest].resize(at + slot_bytes, 0);
            slot.write(&mut parts[dest][at..], src as u32, token as u32, w, bytemuck::cast_slice(row));
            traffic.intra_node.add(slot_bytes);
        }
    }
    if rpn > 1 {
        let got = group.all_to_all(&parts, input.timeout)?;
        check_whole_slots(&got, slot_bytes, me, "combine intra-node hop")?;
        for b in &got {
            for s in b.chunks_exact(slot_bytes) {
                slot.weights(s, &mut wbuf);
                let (src, token) = (slot.src_rank(s) as usize, slot.src_token(s) as usize);
                take(src, token, bytemuck::cast_slice(slot.payload(s)), &wbuf, &mut out)?;
            }
        }
    }

    // Hop 2 (inter-node): one summed row per forwarded token, back to its source.
    if nodes > 1 {
        let mut parts = vec![Vec::new(); world];
        let mut row = vec![bf16::ZERO; hidden];
        for n in (0..nodes).filter(|&n| n != my_node) {
            let src = topo.rank_of(n, my_local);
            for (token, &i) in fwd_index[n].iter().enumerate().filter(|(_, &i)| i != u32::MAX) {
                if arrived[n][token] != input.fwd_reach[n][token] {
                    let (got, want) = (arrived[n][token], input.fwd_reach[n][token]);
                    return Err(bad(me, format!("rank {src} token {token}: {got} combine rows arrived, {want} expected")));
                }
                let i = i as usize;
                for (d, &v) in row.iter_mut().zip(&partial[n].x[i * hidden..(i + 1) * hidden]) {
                    *d = to_bf16(v);
                }
                let at = parts[src].len();
                parts[src].resize(at + slot_bytes, 0);
                slot.write(
                    &mut parts[src][at..],
                    src as u32,
                    token as u32,
                    &partial[n].w[i * kw..(i + 1) * kw],
                    bytemuck::cast_slice(&row),
                );
                traffic.inter_node.add(slot_bytes);
                traffic.inter_node_rows_to_node[n] += 1;
            }
        }
        let got = group.all_to_all(&parts, input.timeout)?;
        for n in (0..nodes).filter(|&n| n != my_node) {
            let b = &got[topo.rank_of(n, my_local)];
            if b.len() != input.tokens_to_node[n] * slot_bytes {
                let want = input.tokens_to_node[n];
                return Err(bad(me, format!("combine from node {n}: {} bytes arrived, {want} partial rows expected", b.len())));
            }
            for s in b.chunks_exact(slot_bytes) {
                let token = slot.src_token(s) as usize;
                if slot.src_rank(s) as usize != me || token >= input.num_tokens {
                    return Err(bad(me, format!("combine from node {n}: a row for rank {} token {token}", slot.src_rank(s))));
                }
                out.add_slot(token, &slot, s, &mut wbuf);
            }
        }
    }
    Ok(Combined { x: out.x.iter().map(|&v| to_bf16(v)).collect(), weights: input.weights.map(|_| out.w), traffic })
}
