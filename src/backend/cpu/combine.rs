//! The combine exchange of the CPU backend: dispatch's route in reverse.
//!
//! Each rank sends every received row back the way it came (in the order it
//! arrived, per channel and peer). A row whose token lives on another node goes
//! to the forwarding rank of this node, which sums that node's rows per token in
//! f32 and sends one BF16 row over the inter-node hop once all of them are in.
//! The source rank sums everything per token in f32 and writes BF16 once.

use std::collections::{HashMap, VecDeque};

use half::bf16;

use super::dispatch::{as_bf16, as_bf16_mut, CallRings, RankCtx, Record};
use super::progress::{Blocked, Progress};
use super::slots::CombineSlot;
use crate::backend::Traffic;
use crate::error::{Error, Result, Role};

/// Inputs of one combine exchange.
pub(super) struct CombineInput<'a> {
    /// `[R, H]` one row per received row.
    pub y: &'a [bf16],
    pub hidden: usize,
    /// `[R, k]` weights to sum back, if any.
    pub weights: Option<&'a [f32]>,
    pub topk: usize,
    pub num_tokens: usize,
    pub source_rank: &'a [u32],
    pub source_token: &'a [u32],
    pub record: &'a Record,
}

/// f32 sums reused across calls, so a combine does not page-fault fresh memory each time.
#[derive(Default)]
pub(super) struct Scratch {
    out: Vec<f32>,
    out_weights: Vec<f32>,
}

/// Sums for this rank's tokens.
pub(super) struct Combined {
    pub x: Vec<bf16>,
    pub weights: Option<Vec<f32>>,
    pub traffic: Traffic,
}

pub(super) fn run(ctx: &RankCtx, rings: &CallRings, input: &CombineInput<'_>, scratch: &mut Scratch) -> Result<Combined> {
    let mut ex = Exchange::new(ctx, rings, input, scratch);
    let mut progress = Progress::new(ctx.me, ctx.timeout);
    loop {
        let mut moved = ex.send_step()?;
        moved |= ex.drain_intra_step()?;
        moved |= ex.flush_partials_step()?;
        moved |= ex.drain_inter_step()?;
        if ex.done() {
            break;
        }
        progress.step(moved, || ex.blocked.clone())?;
    }
    ex.finish()
}

/// A forwarded token's partial sum, waiting for the rest of its node's rows.
struct Partial {
    acc: Vec<f32>,
    weights: Vec<f32>,
    remaining: u8,
}

struct Exchange<'a> {
    scratch: &'a mut Scratch,
    ctx: &'a RankCtx,
    rings: &'a CallRings,
    input: &'a CombineInput<'a>,
    slot: CombineSlot,
    kw: usize,
    out: Vec<f32>,
    out_weights: Vec<f32>,
    partials: HashMap<(u32, u32), Partial>,
    /// `[C, nodes]` finished partial sums, ready to cross back: (token, sum).
    ready: Vec<VecDeque<(u32, Partial)>>,
    spare: Vec<Partial>,
    send_cursor: Vec<usize>,
    intra_done: Vec<usize>,
    flushed: Vec<usize>,
    inter_done: Vec<usize>,
    traffic: Traffic,
    blocked: Option<Blocked>,
    wscratch: Vec<f32>,
}

/// f32 to BF16, rounding to nearest even (NaN stays NaN): the same result as
/// `bf16::from_f32`, written with integer ops so the loop vectorizes.
pub(super) fn to_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    if v.is_nan() {
        return bf16::from_bits(((b >> 16) as u16) | 0x0040);
    }
    bf16::from_bits((b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16)
}

/// `acc += row` in f32. BF16 widens exactly by a 16-bit shift, which vectorizes
/// (`bf16::to_f32` goes through a branchy conversion).
pub(super) fn add_row(acc: &mut [f32], row: &[bf16]) {
    for (a, v) in acc.iter_mut().zip(row) {
        *a += f32::from_bits((v.to_bits() as u32) << 16);
    }
}

pub(super) fn add_weights(acc: &mut [f32], w: &[f32]) {
    for (a, v) in acc.iter_mut().zip(w) {
        *a += v;
    }
}

impl<'a> Exchange<'a> {
    fn new(ctx: &'a RankCtx, rings: &'a CallRings, input: &'a CombineInput<'a>, scratch: &'a mut Scratch) -> Self {
        let (rpn, nodes, c) = (ctx.topo.ranks_per_node, ctx.topo.num_nodes, ctx.channels);
        let kw = if input.weights.is_some() { input.topk } else { 0 };
        let mut out = std::mem::take(&mut scratch.out);
        out.clear();
        out.resize(input.num_tokens * input.hidden, 0.0);
        let mut out_weights = std::mem::take(&mut scratch.out_weights);
        out_weights.clear();
        out_weights.resize(input.num_tokens * kw, 0.0);
        Self {
            scratch,
            ctx,
            rings,
            input,
            slot: CombineSlot::new(kw, input.hidden * 2),
            kw,
            out,
            out_weights,
            partials: HashMap::new(),
            ready: (0..c * nodes).map(|_| VecDeque::new()).collect(),
            spare: Vec::new(),
            send_cursor: vec![0; c * rpn],
            intra_done: vec![0; c * rpn],
            flushed: vec![0; c * nodes],
            inter_done: vec![0; c * nodes],
            traffic: Traffic::new(ctx.topo),
            blocked: None,
            wscratch: vec![0.0; kw],
        }
    }

    fn done(&self) -> bool {
        let r = self.input.record;
        self.send_cursor.iter().zip(&r.arrival).all(|(&c, a)| c == a.len())
            && self.intra_done == r.sent_intra
            && self.flushed == r.fwd_tokens
            && self.inter_done == r.sent_inter
    }

    /// Add one row for `(src, token)`: into the output if the token is ours, else into its node's partial.
    fn absorb(&mut self, channel: usize, src: u32, token: u32, row: &[bf16], weights: &[f32]) -> Result<()> {
        let ctx = self.ctx;
        let (h, kw) = (self.input.hidden, self.kw);
        if src as usize == ctx.me {
            let t = token as usize;
            if t >= self.input.num_tokens {
                return Err(Error::Protocol { rank: ctx.me, detail: format!("combine row for token {t} out of range") });
            }
            add_row(&mut self.out[t * h..(t + 1) * h], row);
            add_weights(&mut self.out_weights[t * kw..(t + 1) * kw], weights);
            return Ok(());
        }
        let node = ctx.topo.node_of(src as usize) as u32;
        let expected = self.input.record.fwd_count.get(node as usize).and_then(|v| v.get(token as usize)).copied().unwrap_or(0);
        if expected == 0 || ctx.topo.local_of(src as usize) != ctx.local() || node as usize == ctx.node() {
            return Err(Error::Protocol {
                rank: ctx.me,
                detail: format!("combine row for rank {src} token {token} was never forwarded here"),
            });
        }
        let spare = &mut self.spare;
        let p = self.partials.entry((node, token)).or_insert_with(|| {
            let mut p = spare.pop().unwrap_or_else(|| Partial { acc: vec![0.0; h], weights: vec![0.0; kw], remaining: 0 });
            p.acc.iter_mut().for_each(|v| *v = 0.0);
            p.weights.iter_mut().for_each(|v| *v = 0.0);
            p.remaining = expected;
            p
        });
        add_row(&mut p.acc, row);
        add_weights(&mut p.weights, weights);
        p.remaining -= 1;
        if p.remaining == 0 {
            let p = self.partials.remove(&(node, token)).expect("present");
            self.ready[channel * ctx.topo.num_nodes + node as usize].push_back((token, p));
        }
        Ok(())
    }

    fn send_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let input = self.input;
        let (rpn, h, k) = (ctx.topo.ranks_per_node, input.hidden, input.topk);
        let my_local = ctx.local();
        let slot_bytes = self.slot.bytes();
        let no_weights: Vec<f32> = Vec::new();
        let mut moved = false;
        for c in 0..ctx.channels {
            for i in 0..rpn {
                let idx = c * rpn + i;
                let list = &input.record.arrival[idx];
                let start = self.send_cursor[idx];
                if start == list.len() {
                    continue;
                }
                let end = (start + ctx.chunk).min(list.len());
                if i == my_local {
                    // Rows this rank delivered to itself: its own tokens, or ones it forwarded.
                    for &row in &list[start..end] {
                        let r = row as usize;
                        let w = input.weights.map(|w| &w[r * k..(r + 1) * k]).unwrap_or(&no_weights);
                        self.absorb(c, input.source_rank[r], input.source_token[r], &input.y[r * h..(r + 1) * h], w)?;
                        self.traffic.local.add(h * 2 + 4 * self.kw);
                    }
                } else {
                    let ring = self.rings.intra_out[idx].as_ref().expect("intra ring");
                    let tail = ring.tail();
                    if ring.free(tail) < end - start {
                        self.blocked.get_or_insert(Blocked {
                            channel: c,
                            role: Role::Sender,
                            head: ring.head(),
                            tail,
                            detail: format!("combine ring to local rank {i}"),
                        });
                        continue;
                    }
                    for (p, &row) in list[start..end].iter().enumerate() {
                        let r = row as usize;
                        let w = input.weights.map(|w| &w[r * k..(r + 1) * k]).unwrap_or(&no_weights);
                        // SAFETY: this rank is the ring's only producer in this call (its forward role
                        // writes inter-node rings only) and room was checked above.
                        let s = unsafe { ring.slot_mut(tail + p as u64, slot_bytes) };
                        self.slot.write(
                            s,
                            input.source_rank[r],
                            input.source_token[r],
                            w,
                            bytemuck::cast_slice(&input.y[r * h..(r + 1) * h]),
                        );
                        self.traffic.intra_node.add(slot_bytes);
                    }
                    ring.publish(tail + (end - start) as u64);
                }
                self.send_cursor[idx] = end;
                moved = true;
            }
        }
        Ok(moved)
    }

    fn drain_intra_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let rpn = ctx.topo.ranks_per_node;
        let slot = self.slot;
        let slot_bytes = slot.bytes();
        let mut moved = false;
        for c in 0..ctx.channels {
            for i in (0..rpn).filter(|&i| i != ctx.local()) {
                let idx = c * rpn + i;
                if self.intra_done[idx] == self.input.record.sent_intra[idx] {
                    continue;
                }
                let ring = self.rings.intra_in[idx].as_ref().expect("intra ring").clone();
                let head = ring.head();
                let avail = ring.available(head);
                if avail == 0 {
                    self.blocked.get_or_insert(Blocked {
                        channel: c,
                        role: Role::Receiver,
                        head,
                        tail: ring.tail(),
                        detail: format!("combine rows from local rank {i}"),
                    });
                    continue;
                }
                let mut w = std::mem::take(&mut self.wscratch);
                for p in 0..avail as u64 {
                    // SAFETY: only consumer; head + p < tail.
                    let s = unsafe { ring.slot(head + p, slot_bytes) };
                    slot.weights(s, &mut w);
                    let r = self.absorb(c, slot.src_rank(s), slot.src_token(s), as_bf16(slot.payload(s)), &w);
                    if r.is_err() {
                        self.wscratch = w;
                        return r.map(|_| false);
                    }
                }
                self.wscratch = w;
                ring.release(head + avail as u64);
                self.intra_done[idx] += avail;
                moved = true;
            }
        }
        Ok(moved)
    }

    fn flush_partials_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let nodes = ctx.topo.num_nodes;
        let slot = self.slot;
        let slot_bytes = slot.bytes();
        let mut moved = false;
        for c in 0..ctx.channels {
            for n in (0..nodes).filter(|&n| n != ctx.node()) {
                let idx = c * nodes + n;
                if self.ready[idx].is_empty() {
                    continue;
                }
                let ring = self.rings.inter_out[idx].as_ref().expect("inter ring");
                let tail = ring.tail();
                let count = self.ready[idx].len().min(ctx.chunk).min(ring.free(tail));
                if count == 0 {
                    self.blocked.get_or_insert(Blocked {
                        channel: c,
                        role: Role::Forwarder,
                        head: ring.head(),
                        tail,
                        detail: format!("combine ring to node {n}"),
                    });
                    continue;
                }
                let dest = ctx.topo.rank_of(n, ctx.local()) as u32;
                for p in 0..count as u64 {
                    let (token, partial) = self.ready[idx].pop_front().expect("counted");
                    // SAFETY: this rank is the only producer of its inter-node rings; room checked.
                    let s = unsafe { ring.slot_mut(tail + p, slot_bytes) };
                    slot.write_header(s, dest, token, &partial.weights);
                    for (d, &v) in as_bf16_mut(slot.payload_mut(s)).iter_mut().zip(&partial.acc) {
                        *d = to_bf16(v);
                    }
                    self.traffic.inter_node.add(slot_bytes);
                    self.traffic.inter_node_rows_to_node[n] += 1;
                    self.spare.push(partial);
                }
                ring.publish(tail + count as u64);
                self.flushed[idx] += count;
                moved = true;
            }
        }
        Ok(moved)
    }

    fn drain_inter_step(&mut self) -> Result<bool> {
        let ctx = self.ctx;
        let nodes = ctx.topo.num_nodes;
        let slot = self.slot;
        let slot_bytes = slot.bytes();
        let (h, kw) = (self.input.hidden, self.kw);
        let mut moved = false;
        for c in 0..ctx.channels {
            for n in (0..nodes).filter(|&n| n != ctx.node()) {
                let idx = c * nodes + n;
                if self.inter_done[idx] == self.input.record.sent_inter[idx] {
                    continue;
                }
                let ring = self.rings.inter_in[idx].as_ref().expect("inter ring").clone();
                let head = ring.head();
                let avail = ring.available(head);
                if avail == 0 {
                    self.blocked.get_or_insert(Blocked {
                        channel: c,
                        role: Role::Receiver,
                        head,
                        tail: ring.tail(),
                        detail: format!("combine rows from node {n}"),
                    });
                    continue;
                }
                for p in 0..avail as u64 {
                    // SAFETY: only consumer; head + p < tail.
                    let s = unsafe { ring.slot(head + p, slot_bytes) };
                    let t = slot.src_token(s) as usize;
                    if slot.src_rank(s) as usize != ctx.me || t >= self.input.num_tokens {
                        return Err(Error::Protocol {
                            rank: ctx.me,
                            detail: format!("inter-node combine row for rank {} token {t}", slot.src_rank(s)),
                        });
                    }
                    add_row(&mut self.out[t * h..(t + 1) * h], as_bf16(slot.payload(s)));
                    slot.weights(s, &mut self.wscratch);
                    add_weights(&mut self.out_weights[t * kw..(t + 1) * kw], &self.wscratch);
                }
                ring.release(head + avail as u64);
                self.inter_done[idx] += avail;
                moved = true;
            }
        }
        if moved {
            self.blocked = None;
        }
        Ok(moved)
    }

    fn finish(self) -> Result<Combined> {
        if !self.partials.is_empty() {
            return Err(Error::Protocol {
                rank: self.ctx.me,
                detail: format!("{} forwarded tokens still wait for rows", self.partials.len()),
            });
        }
        let x = self.out.iter().map(|&v| to_bf16(v)).collect();
        let weights = self.input.weights.map(|_| self.out_weights.clone());
        self.scratch.out = self.out;
        self.scratch.out_weights = self.out_weights;
        Ok(Combined { x, weights, traffic: self.traffic })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_bf16_rounding_matches_the_half_crate() {
        let mut v = 0x0123_4567u32;
        for _ in 0..200_000 {
            v = v.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = f32::from_bits(v);
            let (a, b) = (to_bf16(x), bf16::from_f32(x));
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{x:e}: {a} vs {b}");
        }
        for x in [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, 1.00390625, 1.01171875] {
            assert_eq!(to_bf16(x).to_bits(), bf16::from_f32(x).to_bits(), "{x}");
        }
    }
}
