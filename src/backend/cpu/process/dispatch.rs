//! Dispatch between CPU ranks that are processes: the same two-hop route as the
//! ring engine, each hop one personalized exchange of the group.
//!
//! 1. Inter-node: each token bound for another node goes once to the rank with
//!    this rank's local index there (its rail peer), as one dispatch slot carrying
//!    the token's positions at every rank of that node.
//! 2. Intra-node: each rank sends its own tokens to the ranks of its node that
//!    host them, and forwards every slot it got in step 1 to the ranks of its node
//!    the slot names (keeping the ones for itself).
//!
//! Receivers place every row at `recv_prefix[source] + position`, so the output
//! is ordered by (source rank, source token), as on every backend.

use std::time::Duration;

use super::super::dispatch::DispatchInput;
use super::super::output::{Arrived, Output};
use super::super::slots::{DispatchSlot, NOT_SENT};
use crate::backend::Traffic;
use crate::bootstrap::ProcessGroup;
use crate::error::{Error, Result};
use crate::tensor::{DType, Rows};
use crate::topology::Topology;

/// Sender-side positions, from the layout (kept in the handle for cached dispatch).
#[derive(Debug, Clone)]
pub(crate) struct Positions {
    /// `[T, world]` position of token `t` among the rows sent to rank `r`, or `NOT_SENT`.
    pub send_pos: Vec<u32>,
    /// `[world]` rows sent to each rank.
    pub counts: Vec<u32>,
}

impl Positions {
    /// Positions in token order from the `[T, world]` token-goes-to-rank matrix.
    pub fn new(token_in_rank: &[bool], world: usize) -> Self {
        let mut counts = vec![0u32; world];
        let mut send_pos = vec![NOT_SENT; token_in_rank.len()];
        for (i, &hit) in token_in_rank.iter().enumerate() {
            if hit {
                send_pos[i] = counts[i % world];
                counts[i % world] += 1;
            }
        }
        Self { send_pos, counts }
    }
}

/// What one rank knows before moving data: from the notify step.
pub(crate) struct Plan<'a> {
    pub me: usize,
    pub topo: Topology,
    pub positions: &'a Positions,
    /// `[world]` first output row of each source's rows.
    pub recv_prefix: Vec<usize>,
    pub num_recv: usize,
    pub timeout: Duration,
}

/// What a dispatch delivered.
pub(crate) struct Delivered {
    pub out: Output,
    /// `[nodes][rail peer's tokens]` how many ranks of this node each token forwarded
    /// from that node reached (0: not forwarded); combine sums that many rows.
    pub fwd_reach: Vec<Vec<u8>>,
    pub traffic: Traffic,
}

/// Fails unless what each rank sent is a whole number of `slot_bytes`-byte slots.
pub(super) fn check_whole_slots(bufs: &[Vec<u8>], slot_bytes: usize, me: usize, hop: &str) -> Result<()> {
    for (r, b) in bufs.iter().enumerate() {
        if b.len() % slot_bytes != 0 {
            return Err(Error::Protocol {
                rank: me,
                detail: format!("{hop}: rank {r} sent {} bytes, not a whole number of {slot_bytes}-byte slots", b.len()),
            });
        }
    }
    Ok(())
}

/// Move the rows of `input` (its `rail_tokens` sizes the forward record) along the route.
pub(crate) fn run(
    group: &mut dyn ProcessGroup,
    plan: &Plan<'_>,
    input: &DispatchInput<'_>,
    spare: Option<Rows>,
) -> Result<Delivered> {
    let (topo, me) = (plan.topo, plan.me);
    let (rpn, nodes, world) = (topo.ranks_per_node, topo.num_nodes, topo.world());
    let (my_node, my_local) = (topo.node_of(me), topo.local_of(me));
    let x = input.x;
    let (hidden, dtype, k) = (x.hidden(), x.dtype(), input.topk);
    let groups = if dtype == DType::Fp8 { hidden / crate::quant::SCALE_GROUP } else { 0 };
    let slot = DispatchSlot::new(rpn, k, groups, dtype.row_bytes(hidden) - 4 * groups);
    let slot_bytes = slot.bytes();
    let mut out = Output::new(
        me,
        plan.recv_prefix.clone(),
        plan.num_recv,
        spare,
        dtype,
        hidden,
        k,
        input.experts_per_rank,
        input.with_meta,
    );
    let mut traffic = Traffic::new(topo);
    let send_pos = &plan.positions.send_pos;
    let (no_ids, no_weights) = (vec![0i64; k], vec![0f32; k]);
    let meta = |t: usize| {
        if input.with_meta {
            (&input.topk_idx[t * k..(t + 1) * k], &input.topk_weights[t * k..(t + 1) * k])
        } else {
            (&no_ids[..], &no_weights[..])
        }
    };
    let write = |buf: &mut Vec<u8>, t: usize, node: usize| {
        let (ids, weights) = meta(t);
        let positions = &send_pos[t * world + topo.rank_of(node, 0)..][..rpn];
        let at = buf.len();
        buf.resize(at + slot_bytes, 0);
        slot.write(&mut buf[at..], me as u32, t as u32, positions, ids, weights, x.row_scales(t), x.row_payload(t));
    };
    let sent_to = |t: usize, r: usize| send_pos[t * world + r] != NOT_SENT;

    // Hop 1: one slot per (token, other node it goes to), to the rail peer there.
    let mut inter_in = vec![Vec::new(); world];
    if nodes > 1 {
        let mut parts = vec![Vec::new(); world];
        for t in 0..x.num_rows() {
            for n in (0..nodes).filter(|&n| n != my_node) {
                if topo.ranks_of_node(n).any(|r| sent_to(t, r)) {
                    write(&mut parts[topo.rank_of(n, my_local)], t, n);
                    traffic.inter_node.add(slot_bytes);
                    traffic.inter_node_rows_to_node[n] += 1;
                }
            }
        }
        inter_in = group.all_to_all(&parts, plan.timeout)?;
        check_whole_slots(&inter_in, slot_bytes, me, "inter-node hop")?;
    }

    // Hop 2: own tokens to the ranks of this node, and the forwarded slots.
    let mut parts = vec![Vec::new(); world];
    for t in 0..x.num_rows() {
        for j in 0..rpn {
            let dest = topo.rank_of(my_node, j);
            if !sent_to(t, dest) {
                continue;
            }
            if dest == me {
                let (ids, weights) = meta(t);
                let (payload, scales) = (x.row_payload(t), x.row_scales(t));
                let pos = send_pos[t * world + me];
                out.place(&Arrived { src: me as u32, token: t as u32, pos, payload, scales, ids, weights })?;
                traffic.local.add(payload.len() + 4 * scales.len());
            } else {
                write(&mut parts[dest], t, my_node);
                traffic.intra_node.add(slot_bytes);
            }
        }
    }
    let mut fwd_reach: Vec<Vec<u8>> = input.rail_tokens.iter().map(|&t| vec![0u8; t]).collect();
    let (mut ids, mut weights, mut scales) = (vec![0i64; k], vec![0f32; k], vec![0f32; groups]);
    for n in (0..nodes).filter(|&n| n != my_node) {
        for s in inter_in[topo.rank_of(n, my_local)].chunks_exact(slot_bytes) {
            let token = slot.src_token(s);
            let mut reached = 0u8;
            for j in (0..rpn).filter(|&j| slot.pos(s, j) != NOT_SENT) {
                reached += 1;
                if j == my_local {
                    slot.ids(s, &mut ids);
                    slot.weights(s, &mut weights);
                    slot.scales(s, &mut scales);
                    let payload = slot.payload(s);
                    let (src, pos) = (slot.src_rank(s), slot.pos(s, j));
                    out.place(&Arrived { src, token, pos, payload, scales: &scales, ids: &ids, weights: &weights })?;
                    traffic.local.add(payload.len() + 4 * scales.len());
                } else {
                    parts[topo.rank_of(my_node, j)].extend_from_slice(s);
                    traffic.intra_node.add(slot_bytes);
                }
            }
            match fwd_reach[n].get_mut(token as usize) {
                Some(r) if *r == 0 => *r = reached,
                _ => {
                    return Err(Error::Protocol {
                        rank: me,
                        detail: format!("forwarded token {token} from node {n} is out of range or came twice"),
                    })
                }
            }
        }
    }
    if rpn > 1 {
        let intra_in = group.all_to_all(&parts, plan.timeout)?;
        check_whole_slots(&intra_in, slot_bytes, me, "intra-node hop")?;
        for s in intra_in.iter().flat_map(|b| b.chunks_exact(slot_bytes)) {
            slot.ids(s, &mut ids);
            slot.weights(s, &mut weights);
            slot.scales(s, &mut scales);
            let (src, token, pos, payload) = (slot.src_rank(s), slot.src_token(s), slot.pos(s, my_local), slot.payload(s));
            out.place(&Arrived { src, token, pos, payload, scales: &scales, ids: &ids, weights: &weights })?;
        }
    }
    out.check_complete()?;
    Ok(Delivered { out, fwd_reach, traffic })
}
