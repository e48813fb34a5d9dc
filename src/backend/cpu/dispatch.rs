//! The dispatch exchange of the CPU backend, run by every rank at once.
//!
//! Roles, per channel (a contiguous slice of each source's tokens):
//! - sender: takes `chunk` tokens at a time; a token bound for its own node goes
//!   straight to each destination rank's intra-node ring (or, for itself, into
//!   its output); a token bound for another node is sent once per node, to
//!   the rank with the same local index there (inter-node ring);
//! - forwarder: moves each slot from its inter-node rings to the intra-node
//!   rings of the ranks of its node that host the token's experts (one copy,
//!   same slot bytes);
//! - receiver: copies each arriving row to its final place in the output,
//!   `recv_prefix[source] + position`, so output order is (source rank, token).

use std::sync::Arc;

use half::bf16;

use super::output::{Arrived, Output};
use super::progress::{Blocked, Progress};
use super::ring::Ring;
use super::slots::{DispatchSlot, NOT_SENT};
use crate::backend::Traffic;
use crate::error::{Error, Result, Role};
use crate::tensor::{DType, Rows, RowsRef};
use crate::topology::Topology;

/// Fixed facts about this rank and call.
pub(super) struct RankCtx {
    pub me: usize,
    pub topo: Topology,
    pub channels: usize,
    pub chunk: usize,
    pub timeout: std::time::Duration,
}

impl RankCtx {
    pub fn node(&self) -> usize {
        self.topo.node_of(self.me)
    }
    pub fn local(&self) -> usize {
        self.topo.local_of(self.me)
    }
}

/// Token range of channel `c` when `num_tokens` tokens are split over `channels`.
pub(super) fn channel_range(num_tokens: usize, channels: usize, c: usize) -> std::ops::Range<usize> {
    (c * num_tokens / channels)..((c + 1) * num_tokens / channels)
}

/// Rings one rank uses in one call. Intra-node rings are indexed `[channel * ranks_per_node + local]`,
/// inter-node rings `[channel * num_nodes + node]`; `None` where no ring exists (self, own node).
pub(super) struct CallRings {
    pub intra_out: Vec<Option<Arc<Ring>>>,
    pub intra_in: Vec<Option<Arc<Ring>>>,
    pub inter_out: Vec<Option<Arc<Ring>>>,
    pub inter_in: Vec<Option<Arc<Ring>>>,
}

/// Sender-side plan, from the layout (or the handle for cached dispatch).
pub(super) struct SendPlan {
    /// `[T, world]` token goes to rank.
    pub token_in_rank: Vec<bool>,
    /// `[T, world]` position of the token among the rows sent to that rank, or NOT_SENT.
    pub send_pos: Vec<u32>,
    /// `[C, world]` tokens of each channel sent to each rank.
    pub counts: Vec<u32>,
    /// `[C, nodes]` tokens of each channel sent to each node.
    pub node_counts: Vec<u32>,
}

impl SendPlan {
    pub fn new(token_in_rank: Vec<bool>, num_tokens: usize, topo: Topology, channels: usize) -> Self {
        let (world, nodes) = (topo.world(), topo.num_nodes);
        let mut send_pos = vec![NOT_SENT; num_tokens * world];
        let mut next = vec![0u32; world];
        let mut counts = vec![0u32; channels * world];
        let mut node_counts = vec![0u32; channels * nodes];
        for c in 0..channels {
            for t in channel_range(num_tokens, channels, c) {
                for r in 0..world {
                    if token_in_rank[t * world + r] {
                        send_pos[t * world + r] = next[r];
                        next[r] += 1;
                        counts[c * world + r] += 1;
                    }
                }
                for n in 0..nodes {
                    if topo.ranks_of_node(n).any(|r| token_in_rank[t * world + r]) {
                        node_counts[c * nodes + n] += 1;
                    }
                }
            }
        }
        Self { token_in_rank, send_pos, counts, node_counts }
    }
}

/// Receiver-side expectations, from the notify step.
#[derive(Debug, Clone)]
pub(super) struct RecvPlan {
    /// `[world]` first output row of each source's rows.
    pub recv_prefix: Vec<usize>,
    pub num_recv: usize,
    /// `[C, nodes]` slots to forward from the rail peer on each node.
    pub expect_fwd: Vec<usize>,
    /// `[C, ranks_per_node]` slots arriving from each local peer.
    pub expect_recv: Vec<usize>,
}

/// What dispatch delivered, and what it recorded for combine.
pub(super) struct Delivered {
    pub x: Rows,
    pub topk_idx: Vec<i64>,
    pub topk_weights: Vec<f32>,
    pub source_rank: Vec<u32>,
    pub source_token: Vec<u32>,
    pub record: Record,
    pub traffic: Traffic,
}

/// The route each row took, kept in the handle so combine reverses it.
#[derive(Debug, Clone, Default)]
pub(super) struct Record {
    /// `[C, ranks_per_node]` output rows in arrival order per (channel, local peer; own index: self-delivered).
    pub arrival: Vec<Vec<u32>>,
    /// `[C, ranks_per_node]` slots this rank pushed to each local peer.
    pub sent_intra: Vec<usize>,
    /// `[C, nodes]` tokens this rank sent to each other node.
    pub sent_inter: Vec<usize>,
    /// `[nodes][source tokens]` how many ranks of this node each token forwarded from that node's rail peer reached.
    pub fwd_count: Vec<Vec<u8>>,
    /// `[C, nodes]` tokens this rank forwarded from each node's rail peer.
    pub fwd_tokens: Vec<usize>,
}

/// Inputs of one dispatch exchange.
pub(super) struct DispatchInput<'a> {
    pub x: RowsRef<'a>,
    /// `[T, k]` global expert ids (unused when `with_meta` is false).
    pub topk_idx: &'a [i64],
    pub topk_weights: &'a [f32],
    pub topk: usize,
    pub experts_per_rank: usize,
    /// Write topk ids/weights and sources (false for cached dispatch, which returns rows only).
    pub with_meta: bool,
    /// `[nodes]` token count of each rail peer (sizes `fwd_count`).
    pub rail_tokens: Vec<usize>,
}

pub(super) fn run(
    ctx: &RankCtx,
    rings: &CallRings,
    plan: &SendPlan,
    recv: &RecvPlan,
    input: &DispatchInput<'_>,
    spare: Option<Rows>,
) -> Result<Delivered> {
    let mut ex = Exchange::new(ctx, rings, plan, recv, input, spare);
    let mut progress = Progress::new(ctx.me, ctx.timeout);
    loop {
        let mut moved = ex.send_step()?;
        moved |= ex.forward_step()?;
        moved |= ex.receive_step()?;
        if ex.done() {
            break;
        }
        progress.step(moved, || ex.blocked.clone())?;
    }
    ex.finish()
}

struct Exchange<'a> {
    ctx: &'a RankCtx,
    rings: &'a CallRings,
    plan: &'a SendPlan,
    recv: &'a RecvPlan,
    input: &'a DispatchInput<'a>,
    slot: DispatchSlot,
    out: Output,
    record: Record,
    traffic: Traffic,
    send_cursor: Vec<usize>,
    fwd_done: Vec<usize>,
    recv_done: Vec<usize>,
    blocked: Option<Blocked>,
    // scratch
    ids: Vec<i64>,
    weights: Vec<f32>,
    scales: Vec<f32>,
}

impl<'a> Exchange<'a> {
    fn new(
        ctx: &'a RankCtx,
        rings: &'a CallRings,
        plan: &'a SendPlan,
        recv: &'a RecvPlan,
        input: &'a DispatchInput<'a>,
        spare: Option<Rows>,
    ) -> Self {
        let (rpn, nodes, c) = (ctx.topo.ranks_per_node, ctx.topo.num_nodes, ctx.channels);
        let hidden = input.x.hidden();
        let dtype = input.x.dtype();
        let groups = if dtype == DType::Fp8 { hidden / crate::quant::SCALE_GROUP } else { 0 };
        let k = input.topk;
        let n = recv.num_recv;
        let num_tokens = input.x.num_rows();
        Self {
            ctx,
            rings,
            plan,
            recv,
            input,
            slot: DispatchSlot::new(rpn, k, groups, dtype.row_bytes(hidden) - 4 * groups),
            out: Output::new(
                ctx.me,
                recv.recv_prefix.clone(),
                n,
                spare,
                dtype,
                hidden,
                k,
                input.experts_per_rank,
                input.with_meta,
            ),
            record: Record {
                arrival: vec![Vec::new(); c * rpn],
                sent_intra: vec![0; c * rpn],
                sent_inter: vec![0; c * nodes],
                fwd_count: input.rail_tokens.iter().map(|&t| vec![0u8; t]).collect(),
                fwd_tokens: vec![0; c * nodes],
            },
            traffic: Traffic::new(ctx.topo),
            send_cursor: (0..c).map(|ch| channel_range(num_tokens, c, ch).start).collect(),
            fwd_done: vec![0; c * nodes],
            recv_done: vec![0; c * rpn],
            blocked: None,
            ids: vec![0; k],
            weights: vec![0.0; k],
            scales: vec![0.0; groups],
        }
    }

    fn done(&self) -> bool {
        let num_tokens = self.input.x.num_rows();
        (0..self.ctx.channels).all(|c| self.send_cursor[c] == channel_range(num_tokens, self.ctx.channels, c).end)
            && self.fwd_done == self.recv.expect_fwd
            && self.recv_done == self.recv.expect_recv
    }

    /// Put one row into its final place in the output and note its arrival for combine.
    fn place(&mut self, channel: usize, from_local: usize, row: Arrived<'_>) -> Result<()> {
        let idx = self.out.place(&row)?;
        self.record.arrival[channel * self.ctx.topo.ranks_per_node + from_local].push(idx as u32);
        Ok(())
    }

    fn send_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let (topo, rpn, nodes, world) = (ctx.topo, ctx.topo.ranks_per_node, ctx.topo.num_nodes, ctx.topo.world());
        let (my_node, my_local) = (ctx.node(), ctx.local());
        let (input, plan) = (self.input, self.plan);
        let x = input.x;
        let k = input.topk;
        // Cached dispatch sends no routing: its slots carry zeros there.
        let (no_ids, no_weights) = (vec![0i64; k], vec![0f32; k]);
        let mut moved = false;
        for c in 0..ctx.channels {
            let end = channel_range(x.num_rows(), ctx.channels, c).end;
            let start = self.send_cursor[c];
            if start == end {
                continue;
            }
            let batch = start..(start + ctx.chunk).min(end);
            // Room for the whole chunk in every ring it touches, or wait.
            let mut need_intra = vec![0usize; rpn];
            let mut need_inter = vec![0usize; nodes];
            for t in batch.clone() {
                let row = &self.plan.token_in_rank[t * world..(t + 1) * world];
                for j in 0..rpn {
                    need_intra[j] += (j != my_local && row[topo.rank_of(my_node, j)]) as usize;
                }
                for n in (0..nodes).filter(|&n| n != my_node) {
                    need_inter[n] += topo.ranks_of_node(n).any(|r| row[r]) as usize;
                }
            }
            let mut short = None;
            for (j, &need) in need_intra.iter().enumerate().filter(|(_, &n)| n > 0) {
                let ring = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                if ring.free(ring.tail()) < need {
                    short = Some((ring, format!("intra-node ring to local rank {j}")));
                    break;
                }
            }
            if short.is_none() {
                for (n, &need) in need_inter.iter().enumerate().filter(|(_, &n)| n > 0) {
                    let ring = self.rings.inter_out[c * nodes + n].as_ref().expect("inter ring");
                    if ring.free(ring.tail()) < need {
                        short = Some((ring, format!("inter-node ring to node {n}")));
                        break;
                    }
                }
            }
            if let Some((ring, detail)) = short {
                self.blocked = Some(Blocked { channel: c, role: Role::Sender, head: ring.head(), tail: ring.tail(), detail });
                continue;
            }
            let slot_bytes = self.slot.bytes();
            // Slots written in this chunk and not yet published, per ring.
            let mut pending_intra = vec![0u64; rpn];
            let mut pending_inter = vec![0u64; nodes];
            for t in batch.clone() {
                let row = &plan.token_in_rank[t * world..(t + 1) * world];
                let ids = if input.with_meta { &input.topk_idx[t * k..(t + 1) * k] } else { &no_ids[..] };
                let weights = if input.with_meta { &input.topk_weights[t * k..(t + 1) * k] } else { &no_weights[..] };
                let payload = x.row_payload(t);
                let scales = x.row_scales(t);
                for j in 0..rpn {
                    let dest = topo.rank_of(my_node, j);
                    if !row[dest] {
                        continue;
                    }
                    let pos = plan.send_pos[t * world + dest];
                    if j == my_local {
                        let row = Arrived { src: ctx.me as u32, token: t as u32, pos, payload, scales, ids, weights };
                        self.place(c, my_local, row)?;
                        self.traffic.local.add(payload.len() + 4 * scales.len());
                    } else {
                        let ring = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                        let tail = ring.tail() + pending_intra[j];
                        let positions = &plan.send_pos[t * world + topo.rank_of(my_node, 0)..][..rpn];
                        // SAFETY: this rank is the ring's only producer and checked room above.
                        let s = unsafe { ring.slot_mut(tail, slot_bytes) };
                        self.slot.write(s, ctx.me as u32, t as u32, positions, ids, weights, scales, payload);
                        pending_intra[j] += 1;
                        self.traffic.intra_node.add(slot_bytes);
                    }
                }
                for n in (0..nodes).filter(|&n| n != my_node) {
                    if !topo.ranks_of_node(n).any(|r| row[r]) {
                        continue;
                    }
                    let ring = self.rings.inter_out[c * nodes + n].as_ref().expect("inter ring");
                    let tail = ring.tail() + pending_inter[n];
                    let positions = &plan.send_pos[t * world + topo.rank_of(n, 0)..][..rpn];
                    // SAFETY: as above.
                    let s = unsafe { ring.slot_mut(tail, slot_bytes) };
                    self.slot.write(s, ctx.me as u32, t as u32, positions, ids, weights, scales, payload);
                    pending_inter[n] += 1;
                    self.traffic.inter_node.add(slot_bytes);
                    self.traffic.inter_node_rows_to_node[n] += 1;
                }
            }
            // Publish the chunk: one release store per ring.
            for (j, &p) in pending_intra.iter().enumerate().filter(|(_, &p)| p > 0) {
                let ring = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                ring.publish(ring.tail() + p);
                self.record.sent_intra[c * rpn + j] += p as usize;
            }
            for (n, &p) in pending_inter.iter().enumerate().filter(|(_, &p)| p > 0) {
                let ring = self.rings.inter_out[c * nodes + n].as_ref().expect("inter ring");
                ring.publish(ring.tail() + p);
                self.record.sent_inter[c * nodes + n] += p as usize;
            }
            self.send_cursor[c] = batch.end;
            moved = true;
        }
        Ok(moved)
    }

    fn forward_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let (rpn, nodes) = (ctx.topo.ranks_per_node, ctx.topo.num_nodes);
        let (my_node, my_local) = (ctx.node(), ctx.local());
        let slot = self.slot;
        let slot_bytes = slot.bytes();
        let mut moved = false;
        let mut pending = vec![0u64; rpn];
        for c in 0..ctx.channels {
            for n in (0..nodes).filter(|&n| n != my_node) {
                let i = c * nodes + n;
                if self.fwd_done[i] == self.recv.expect_fwd[i] {
                    continue;
                }
                let src_ring = self.rings.inter_in[i].as_ref().expect("inter ring").clone();
                let head0 = src_ring.head();
                let avail = src_ring.available(head0).min(ctx.chunk);
                let mut head = head0;
                pending.iter_mut().for_each(|p| *p = 0);
                for _ in 0..avail {
                    // SAFETY: this rank is the ring's only consumer; `head` < tail.
                    let s = unsafe { src_ring.slot(head, slot_bytes) };
                    let room = (0..rpn).filter(|&j| j != my_local && slot.pos(s, j) != NOT_SENT).all(|j| {
                        let r = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                        r.free(r.tail() + pending[j]) > 0
                    });
                    if !room {
                        let j = (0..rpn).find(|&j| j != my_local && slot.pos(s, j) != NOT_SENT).unwrap_or(0);
                        let r = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                        self.blocked = Some(Blocked {
                            channel: c,
                            role: Role::Forwarder,
                            head: r.head(),
                            tail: r.tail(),
                            detail: format!("forwarding to local rank {j}"),
                        });
                        break;
                    }
                    let (src, token) = (slot.src_rank(s), slot.src_token(s));
                    let mut reached = 0u8;
                    for j in 0..rpn {
                        let pos = slot.pos(s, j);
                        if pos == NOT_SENT {
                            continue;
                        }
                        reached += 1;
                        if j == my_local {
                            let (mut ids, mut w, mut sc) = (
                                std::mem::take(&mut self.ids),
                                std::mem::take(&mut self.weights),
                                std::mem::take(&mut self.scales),
                            );
                            slot.ids(s, &mut ids);
                            slot.weights(s, &mut w);
                            slot.scales(s, &mut sc);
                            let payload = slot.payload(s);
                            let row = Arrived { src, token, pos, payload, scales: &sc, ids: &ids, weights: &w };
                            let r = self.place(c, my_local, row);
                            self.traffic.local.add(payload.len() + 4 * sc.len());
                            (self.ids, self.weights, self.scales) = (ids, w, sc);
                            r?;
                        } else {
                            let r = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                            // SAFETY: only producer of this ring; room checked above.
                            let d = unsafe { r.slot_mut(r.tail() + pending[j], slot_bytes) };
                            d.copy_from_slice(s);
                            pending[j] += 1;
                            self.traffic.intra_node.add(slot_bytes);
                        }
                    }
                    let counts = &mut self.record.fwd_count[n];
                    match counts.get_mut(token as usize) {
                        Some(cnt) => *cnt = reached,
                        None => {
                            return Err(Error::Protocol {
                                rank: ctx.me,
                                detail: format!("forwarded token {token} from node {n} is out of range"),
                            })
                        }
                    }
                    head += 1;
                }
                let consumed = (head - head0) as usize;
                if consumed > 0 {
                    src_ring.release(head);
                    for j in 0..rpn {
                        if pending[j] > 0 {
                            let r = self.rings.intra_out[c * rpn + j].as_ref().expect("intra ring");
                            r.publish(r.tail() + pending[j]);
                            self.record.sent_intra[c * rpn + j] += pending[j] as usize;
                        }
                    }
                    self.fwd_done[i] += consumed;
                    self.record.fwd_tokens[i] += consumed;
                    moved = true;
                } else if self.blocked.is_none() {
                    self.blocked = Some(Blocked {
                        channel: c,
                        role: Role::Forwarder,
                        head: head0,
                        tail: src_ring.tail(),
                        detail: format!("waiting for rows from node {n}"),
                    });
                }
            }
        }
        Ok(moved)
    }

    fn receive_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let rpn = ctx.topo.ranks_per_node;
        let my_local = ctx.local();
        let slot = self.slot;
        let slot_bytes = slot.bytes();
        let mut moved = false;
        for c in 0..ctx.channels {
            for i in (0..rpn).filter(|&i| i != my_local) {
                let idx = c * rpn + i;
                if self.recv_done[idx] == self.recv.expect_recv[idx] {
                    continue;
                }
                let ring = self.rings.intra_in[idx].as_ref().expect("intra ring").clone();
                let head0 = ring.head();
                let avail = ring.available(head0);
                if avail == 0 {
                    self.blocked.get_or_insert(Blocked {
                        channel: c,
                        role: Role::Receiver,
                        head: head0,
                        tail: ring.tail(),
                        detail: format!("waiting for rows from local rank {i}"),
                    });
                    continue;
                }
                for p in 0..avail as u64 {
                    // SAFETY: only consumer; head0 + p < tail.
                    let s = unsafe { ring.slot(head0 + p, slot_bytes) };
                    let (mut ids, mut w, mut sc) =
                        (std::mem::take(&mut self.ids), std::mem::take(&mut self.weights), std::mem::take(&mut self.scales));
                    slot.ids(s, &mut ids);
                    slot.weights(s, &mut w);
                    slot.scales(s, &mut sc);
                    let row = Arrived {
                        src: slot.src_rank(s),
                        token: slot.src_token(s),
                        pos: slot.pos(s, my_local),
                        payload: slot.payload(s),
                        scales: &sc,
                        ids: &ids,
                        weights: &w,
                    };
                    let r = self.place(c, i, row);
                    (self.ids, self.weights, self.scales) = (ids, w, sc);
                    r?;
                }
                ring.release(head0 + avail as u64);
                self.recv_done[idx] += avail;
                if self.recv_done[idx] > self.recv.expect_recv[idx] {
                    return Err(Error::Protocol {
                        rank: ctx.me,
                        detail: format!("more rows than announced from local rank {i} on channel {c}"),
                    });
                }
                moved = true;
            }
        }
        if moved {
            self.blocked = None;
        }
        Ok(moved)
    }

    fn finish(self) -> Result<Delivered> {
        self.out.check_complete()?;
        Ok(Delivered {
            x: self.out.x,
            topk_idx: self.out.topk_idx,
            topk_weights: self.out.topk_weights,
            source_rank: self.out.source_rank,
            source_token: self.out.source_token,
            record: self.record,
            traffic: self.traffic,
        })
    }
}

/// BF16 row view of slot payload bytes (slots are 16-byte aligned).
pub(super) fn as_bf16(bytes: &[u8]) -> &[bf16] {
    bytemuck::cast_slice(bytes)
}

/// Mutable BF16 row view of slot payload bytes.
pub(super) fn as_bf16_mut(bytes: &mut [u8]) -> &mut [bf16] {
    bytemuck::cast_slice_mut(bytes)
}
