//! The two hops of cached dispatch and combine on several CUDA nodes, on the device,
//! overlapped. Inside each node the route is split in two node-local parts: the
//! rank's own tokens, which need no rail, and the tokens it forwards for its rail
//! peers. Dispatch: a gather kernel packs each other node's rows; NCCL moves them,
//! on a stream of its own, straight into the forwarded part's input while the NVLink
//! kernels dispatch the own part; then the forwarded part; gathers put each part's
//! rows in (source rank, source token) order. Combine: the forwarded part is combined
//! first into per-node partial sums, which NCCL sends back while the own part is
//! combined; a kernel sums each token's partials. No host copy between the hops and
//! no host collective, only NCCL and stream order.
//!
//! The split parts are node-local dispatches of their own, made once per route (on
//! its first call here: collective over the node). With FP8 on the wire, BF16 rows are
//! quantized as they are packed, so the rail and the node carry FP8. The first
//! dispatch and graph capture stay on the host path of [`crate::backend::hier::HierRank`].

use std::time::Instant;

use half::bf16;

use super::compile::KernelSpec;
use super::driver::{dtoh, htod, DeviceBuffer, Event, Kernels, Scratch, Stream};
use super::nccl::{NcclExchange, Piece};
use super::{CallerStream, CudaHandleState, CudaRank, DeviceRows};
use crate::backend::hier::{CallInfo, DeviceHops, HopsAt, RouteState, STAND_IN_HIDDEN};
use crate::backend::{Communicator, DispatchOptions, ResidentInputs, ResidentOp};
use crate::error::{Error, Result, Role, WaitDiagnostic};
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{DType, Rows, RowsRef};
use crate::topology::Topology;

/// Row counts and offsets of a route, in rows.
struct Geometry {
    me: usize,
    /// `[nodes]` this rank's tokens that go to each node (its own node's: its own part).
    sent: Vec<usize>,
    /// `[nodes]` where each other node's rows start in the rail buffer (packed rows going
    /// out in dispatch, partial sums coming back in combine; own node: unused).
    rail_at: Vec<usize>,
    /// Rows in the rail buffer.
    rail_rows: usize,
    /// `[nodes]` tokens forwarded for each node's rail peer, and where they start in the
    /// forwarded part's input (own node: unused).
    forwarded: Vec<usize>,
    fwd_at: Vec<usize>,
    /// Rows of the forwarded part's input.
    fwd_rows: usize,
    /// Rows of the own part's input (`sent[me]`).
    own_rows: usize,
    /// Rows this rank receives.
    out_rows: usize,
    /// This rank's tokens.
    tokens: usize,
}

/// Where each of `counts` starts when those not skipped are laid one after another; the total.
fn starts(counts: &[usize], skip: usize) -> (Vec<usize>, usize) {
    let mut at = 0;
    let v = counts
        .iter()
        .enumerate()
        .map(|(n, &c)| {
            let start = at;
            at += if n == skip { 0 } else { c };
            start
        })
        .collect();
    (v, at)
}

impl Geometry {
    fn of(route: &RouteState, me: usize, tokens: usize) -> Self {
        let sent: Vec<usize> = route.sent.iter().map(Vec::len).collect();
        let (rail_at, rail_rows) = starts(&sent, me);
        let (fwd_at, fwd_rows) = starts(&route.forwarded, me);
        Self {
            me,
            own_rows: sent[me],
            sent,
            rail_at,
            rail_rows,
            forwarded: route.forwarded.clone(),
            fwd_at,
            fwd_rows,
            out_rows: route.perm.len(),
            tokens,
        }
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.sent.len()).filter(move |&n| n != self.me)
    }

    /// Rows of the node-local input (own and forwarded, node by node) of the forwarded part.
    fn forwarded_input_rows(&self) -> Vec<usize> {
        let mut at = 0;
        let mut rows = Vec::with_capacity(self.fwd_rows);
        for (n, &c) in self.forwarded.iter().enumerate() {
            if n != self.me {
                rows.extend(at..at + c);
            }
            at += c;
        }
        rows
    }

    /// Rows of the node-local input of the own part.
    fn own_input_rows(&self) -> std::ops::Range<usize> {
        let start: usize = self.forwarded[..self.me].iter().sum();
        start..start + self.own_rows
    }
}

/// A route on the device: its index lists and its two node-local parts.
struct Plan {
    id: u64,
    geo: Geometry,
    /// `sent[n]` of every other node, node by node: the rows packed into the rail buffer.
    pack: DeviceBuffer,
    /// `sent[me]`: this rank's rows of the own part.
    own: DeviceBuffer,
    /// The own part: its node-local handle and the output row of each row it delivers.
    own_part: Part,
    /// The forwarded part.
    fwd_part: Part,
    /// `[tokens, nodes]` the partial-sum rows of each token (-1: none): below `own_rows`
    /// rows of the own part's combine output, above it rows of the rail buffer.
    sum_src: DeviceBuffer,
}

/// One node-local part of a route.
struct Part {
    handle: Handle,
    /// Output row (in this rank's (source rank, source token) order) of each row the
    /// part delivers to this rank.
    to: DeviceBuffer,
    rows: usize,
}

/// A route's index lists on the host (see [`Plan`]).
#[derive(Debug, PartialEq)]
struct Indices {
    pack: Vec<i32>,
    own: Vec<i32>,
    sum_src: Vec<i32>,
}

impl Indices {
    fn of(route: &RouteState, geo: &Geometry) -> Self {
        let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let nodes = route.sent.len();
        let mut sum_src = vec![-1i32; geo.tokens * nodes];
        for (n, tokens_of_n) in route.sent.iter().enumerate() {
            for (i, &t) in tokens_of_n.iter().enumerate() {
                let row = if n == geo.me { i } else { geo.own_rows + geo.rail_at[n] + i };
                sum_src[t as usize * nodes + n] = row as i32;
            }
        }
        Self { pack: geo.others().flat_map(|n| as_i32(&route.sent[n])).collect(), own: as_i32(&route.sent[geo.me]), sum_src }
    }
}

/// The rows of a node-local part: `(source rank, source token)` of each input row, and
/// the `[rows, k]` expert ids, taken from the node-local input's `rows`.
fn part_of(route: &RouteState, rows: impl Iterator<Item = usize>, k: usize) -> (Vec<[u32; 2]>, Vec<i64>) {
    let (mut names, mut ids) = (Vec::new(), Vec::new());
    for r in rows {
        names.push(route.sources[r]);
        ids.extend_from_slice(&route.node_ids[r * k..(r + 1) * k]);
    }
    (names, ids)
}

/// For each row a node-local part delivered (`forwarder`, `row` of its part input), its
/// position in this rank's output, given every node rank's part input names and the
/// output position of each name; a name missing or delivered twice is a protocol error.
fn positions(
    delivered: (&[u32], &[u32]),
    names: &[Vec<[u32; 2]>],
    out: &std::collections::HashMap<[u32; 2], usize>,
    seen: &mut [bool],
    rank: usize,
) -> Result<Vec<i32>> {
    let (forwarder, row) = delivered;
    forwarder
        .iter()
        .zip(row)
        .map(|(&f, &v)| {
            let name = names.get(f as usize).and_then(|n| n.get(v as usize));
            let at = name.and_then(|n| out.get(n)).copied().filter(|&i| !std::mem::replace(&mut seen[i], true));
            at.map(|i| i as i32).ok_or_else(|| Error::Protocol {
                rank,
                detail: format!("a node-local part delivered forwarder {f}'s row {v}, which is not one of this rank's rows"),
            })
        })
        .collect()
}

impl Plan {
    /// The route's plan: its two node-local parts are dispatched once here (narrow rows
    /// of zeros: only their handles are kept, and a handle serves any row width),
    /// collective over the node's ranks.
    fn new(node: &mut CudaRank, at: &CallInfo<'_>, stream: &Stream) -> Result<Self> {
        let route = at.route;
        let me = at.topology.node_of(at.rank);
        let geo = Geometry::of(route, me, at.tokens);
        let upload = |v: &[i32]| -> Result<DeviceBuffer> {
            let b = DeviceBuffer::new(v.len().max(1) * 4)?;
            htod(b.ptr(), v, stream)?;
            Ok(b)
        };
        let (k, experts) = (route.node.topk, route.node.num_experts);
        let node_topo = Topology { num_nodes: 1, ranks_per_node: node.world };
        let (own_names, own_ids) = part_of(route, geo.own_input_rows(), k);
        let (fwd_names, fwd_ids) = part_of(route, geo.forwarded_input_rows().into_iter(), k);
        let mut dispatch = |ids: &[i64]| -> Result<(Vec<u32>, Vec<u32>, Handle)> {
            let n = ids.len() / k;
            let x = Rows::zeros(DType::Bf16, n, STAND_IN_HIDDEN);
            let layout = Layout::new(ids, k, experts, node_topo)?;
            let (out, h) = node.dispatch(x.as_ref(), ids, &vec![0.0; ids.len()], &layout, &DispatchOptions::default())?;
            Ok((out.source_rank, out.source_token, h))
        };
        let (own_from, own_row, own_handle) = dispatch(&own_ids)?;
        let (fwd_from, fwd_row, fwd_handle) = dispatch(&fwd_ids)?;
        // Every node rank's part inputs, by name, to place the rows each part delivers.
        let mine: Vec<u8> = bytemuck::cast_slice(&[own_names.len() as u32])
            .iter()
            .chain(bytemuck::cast_slice(&own_names))
            .chain(bytemuck::cast_slice(&fwd_names))
            .copied()
            .collect();
        let all = node.all_gather_bytes(&mine)?;
        let (mut own_of, mut fwd_of) = (Vec::new(), Vec::new());
        for b in &all {
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(b);
            let n_own =
                *words.first().ok_or_else(|| Error::Protocol { rank: at.rank, detail: "empty part names".into() })? as usize;
            let names: Vec<[u32; 2]> = words[1..].chunks_exact(2).map(|w| [w[0], w[1]]).collect();
            own_of.push(names[..n_own].to_vec());
            fwd_of.push(names[n_own..].to_vec());
        }
        let out: std::collections::HashMap<[u32; 2], usize> =
            at.source_rank.iter().zip(at.source_token).enumerate().map(|(i, (&r, &t))| ([r, t], i)).collect();
        let mut seen = vec![false; geo.out_rows];
        let own_to = positions((&own_from, &own_row), &own_of, &out, &mut seen, at.rank)?;
        let fwd_to = positions((&fwd_from, &fwd_row), &fwd_of, &out, &mut seen, at.rank)?;
        if own_to.len() + fwd_to.len() != geo.out_rows {
            return Err(Error::Protocol {
                rank: at.rank,
                detail: format!(
                    "the node-local parts delivered {} rows, the route {}",
                    own_to.len() + fwd_to.len(),
                    geo.out_rows
                ),
            });
        }
        let ix = Indices::of(route, &geo);
        Ok(Self {
            id: route.id,
            pack: upload(&ix.pack)?,
            own: upload(&ix.own)?,
            own_part: Part { handle: own_handle, to: upload(&own_to)?, rows: own_to.len() },
            fwd_part: Part { handle: fwd_handle, to: upload(&fwd_to)?, rows: fwd_to.len() },
            sum_src: upload(&ix.sum_src)?,
            geo,
        })
    }
}

/// Device rows in scratch buffers: payload and (FP8) scales.
#[derive(Default)]
struct RowBuf {
    data: Scratch,
    scales: Scratch,
}

impl RowBuf {
    fn rows(&mut self, fmt: RowFormat, n: usize) -> Result<DeviceRows> {
        let data = self.data.get(n.max(1) * fmt.payload)?;
        let scales = if fmt.scales > 0 { self.scales.get(n.max(1) * fmt.scales)? } else { 0 };
        Ok(DeviceRows { data, scales, dtype: fmt.dtype, hidden: fmt.hidden, num_rows: n })
    }
}

/// Bytes per row of a row type, payload and scales apart.
#[derive(Debug, Clone, Copy)]
struct RowFormat {
    dtype: DType,
    hidden: usize,
    payload: usize,
    scales: usize,
}

impl RowFormat {
    fn of(dtype: DType, hidden: usize) -> Self {
        let payload = if dtype == DType::Fp8 { hidden } else { hidden * 2 };
        Self { dtype, hidden, payload, scales: dtype.row_bytes(hidden) - payload }
    }

    /// (address, bytes per row) of the payload and, for FP8, the scales of `rows`.
    fn arrays(&self, rows: &DeviceRows) -> Vec<(u64, usize)> {
        let mut v = vec![(rows.data, self.payload)];
        if self.scales > 0 {
            v.push((rows.scales, self.scales));
        }
        v
    }
}

/// Events of one call (those of the rail on the NCCL stream).
struct CallEvents {
    start: Event,
    rail_begin: Event,
    rail_end: Event,
    own_begin: Event,
    own_end: Event,
    fwd_begin: Event,
    fwd_end: Event,
    end: Event,
}

impl CallEvents {
    fn new() -> Result<Self> {
        let e = Event::new;
        Ok(Self {
            start: e()?,
            rail_begin: e()?,
            rail_end: e()?,
            own_begin: e()?,
            own_end: e()?,
            fwd_begin: e()?,
            fwd_end: e()?,
            end: e()?,
        })
    }

    /// `(whole call, [rail transfer, node ops])` in seconds; the node ops are the two
    /// parts' node-local kernels together.
    fn seconds(&self) -> Result<(f64, [f64; 2])> {
        let s = |a: &Event, b: &Event| -> Result<f64> { Ok(b.elapsed_ms_since(a)? as f64 * 1e-3) };
        let node = s(&self.own_begin, &self.own_end)? + s(&self.fwd_begin, &self.fwd_end)?;
        Ok((s(&self.start, &self.end)?, [s(&self.rail_begin, &self.rail_end)?, node]))
    }
}

/// The CUDA backend's [`DeviceHops`]: owns two streams (the calls' and NCCL's), the
/// route plans and the buffers.
pub(super) struct CudaHops {
    stream: Stream,
    rail_stream: Stream,
    plans: Vec<Plan>,
    input: RowBuf,
    rail: RowBuf,
    own_in: RowBuf,
    fwd_in: RowBuf,
    out: RowBuf,
    sums: Scratch,
    /// Combine's inputs on the device (expert outputs and weights).
    y_in: Scratch,
    w_in: Scratch,
    /// Combine's weights, as rows of k f32: per part reordered, per part partial sums,
    /// back over the rail, sums.
    weights: [Scratch; 6],
}

// SAFETY: used by its rank's thread only, with the context current.
unsafe impl Send for CudaHops {}

const PLANS_KEPT: usize = 8;

impl CudaHops {
    /// Made on the thread whose context is the node rank's GPU.
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            stream: Stream::new()?,
            rail_stream: Stream::new()?,
            plans: Vec::new(),
            input: RowBuf::default(),
            rail: RowBuf::default(),
            own_in: RowBuf::default(),
            fwd_in: RowBuf::default(),
            out: RowBuf::default(),
            sums: Scratch::default(),
            y_in: Scratch::default(),
            w_in: Scratch::default(),
            weights: Default::default(),
        })
    }

    /// The index of the route's plan, made on first use; the node's GPU is bound after,
    /// and its traffic counters start clean for the call.
    fn plan(&mut self, node: &mut CudaRank, at: &CallInfo<'_>) -> Result<usize> {
        node.gpu().bind()?;
        let i = match self.plans.iter().position(|p| p.id == at.route.id) {
            Some(i) => i,
            None => {
                if self.plans.len() == PLANS_KEPT {
                    self.plans.remove(0);
                }
                self.plans.push(Plan::new(node, at, &self.stream)?);
                self.plans.len() - 1
            }
        };
        // A new plan's node-local dispatches moved stand-in rows, not traffic.
        node.reset_traffic();
        Ok(i)
    }

    /// Enqueue a cached dispatch of `x` (`[tokens, hidden]` rows on the device; BF16 rows
    /// are quantized to FP8 as they are packed with `fp8_on_wire`); the rows land in `self.out`.
    fn enqueue_dispatch(
        &mut self,
        node: &mut CudaRank,
        rail: &NcclExchange,
        plan: usize,
        x: DeviceRows,
        fp8_on_wire: bool,
        ev: &CallEvents,
    ) -> Result<DeviceRows> {
        let quantize = fp8_on_wire && x.dtype == DType::Bf16;
        let fmt = RowFormat::of(if quantize { DType::Fp8 } else { x.dtype }, x.hidden);
        let g = &self.plans[plan].geo;
        let send = self.rail.rows(fmt, g.rail_rows)?;
        let (own_in, fwd_in) = (self.own_in.rows(fmt, g.own_rows)?, self.fwd_in.rows(fmt, g.fwd_rows)?);
        let out = self.out.rows(fmt, g.out_rows)?;
        let p = &self.plans[plan];
        let spec = node_spec(node, &p.own_part.handle, fmt.dtype, x.hidden);
        let (s, c) = (&self.stream, &self.rail_stream);
        ev.start.record(s)?;
        {
            let k = node.kernels_for(&spec)?;
            if quantize {
                k.gather_quantize([send.data, send.scales], [x.data, p.pack.ptr()], g.rail_rows, x.hidden, s)?;
                k.gather_quantize([own_in.data, own_in.scales], [x.data, p.own.ptr()], g.own_rows, x.hidden, s)?;
            } else {
                for (((dst, rb), (src, _)), (own, _)) in
                    fmt.arrays(&send).into_iter().zip(fmt.arrays(&x)).zip(fmt.arrays(&own_in))
                {
                    k.gather_rows([dst, 0], [src, p.pack.ptr()], g.rail_rows, rb, s)?;
                    k.gather_rows([own, 0], [src, p.own.ptr()], g.own_rows, rb, s)?;
                }
            }
        }
        // The rail: on its own stream, once the rows are packed.
        ev.rail_begin.record(s)?;
        c.wait_event(&ev.rail_begin)?;
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        for ((from, rb), (to, _)) in fmt.arrays(&send).into_iter().zip(fmt.arrays(&fwd_in)) {
            for n in g.others() {
                sends.push(Piece { peer: n, ptr: from + (g.rail_at[n] * rb) as u64, bytes: g.sent[n] * rb });
                recvs.push(Piece { peer: n, ptr: to + (g.fwd_at[n] * rb) as u64, bytes: g.forwarded[n] * rb });
            }
        }
        rail.enqueue_pieces(&sends, &recvs, c)?;
        ev.rail_end.record(c)?;
        // Meanwhile the own part inside the node, then the forwarded part once it arrived.
        let opts = DispatchOptions { fp8_on_wire: false, expert_alignment: 0 };
        for (part, input, begin, end) in
            [(&p.own_part, own_in, &ev.own_begin, &ev.own_end), (&p.fwd_part, fwd_in, &ev.fwd_begin, &ev.fwd_end)]
        {
            if std::ptr::eq(part, &p.fwd_part) {
                s.wait_event(&ev.rail_end)?;
            }
            begin.record(s)?;
            let got = node.dispatch_cached_on(input, &part.handle, &opts, CallerStream(s.raw() as u64))?;
            end.record(s)?;
            let k = node.kernels_for(&spec)?;
            for ((dst, rb), (src, _)) in fmt.arrays(&out).into_iter().zip(fmt.arrays(&got)) {
                k.gather_rows([dst, part.to.ptr()], [src, 0], part.rows, rb, s)?;
            }
        }
        ev.end.record(s)?;
        Ok(out)
    }

    /// Enqueue a combine of `y` (`[out_rows, hidden]` BF16 on the device) and, with
    /// `weights`, of the `[out_rows, k]` f32 weights there; the sums land in `self.sums`
    /// (`[tokens, hidden]` BF16) and `self.weights[5]` (`[tokens, k]`), whose addresses it
    /// returns (0 for the weights without them).
    #[allow(clippy::too_many_arguments)]
    fn enqueue_combine(
        &mut self,
        node: &mut CudaRank,
        rail: &NcclExchange,
        plan: usize,
        y: u64,
        weights: Option<u64>,
        hidden: usize,
        ev: &CallEvents,
    ) -> Result<(u64, u64)> {
        let fmt = RowFormat::of(DType::Bf16, hidden);
        let rb = fmt.payload;
        let g = &self.plans[plan].geo;
        let k = self.plans[plan].own_part.handle.topk;
        let wb = k * 4;
        let rows = |buf: &mut RowBuf, n: usize| buf.rows(fmt, n).map(|r| r.data);
        // Per part: the reordered rows and the partial sums.
        let (own_part_rows, fwd_part_rows) = (self.plans[plan].own_part.rows, self.plans[plan].fwd_part.rows);
        let y_parts = [rows(&mut self.own_in, own_part_rows)?, rows(&mut self.fwd_in, fwd_part_rows)?];
        let partials = [rows(&mut self.out, g.own_rows)?, rows(&mut self.input, g.fwd_rows)?];
        let back = rows(&mut self.rail, g.rail_rows)?;
        let sums = self.sums.get(g.tokens.max(1) * rb)?;
        let [w0, w1, w2, w3, w4, w5] = &mut self.weights;
        let w = match weights {
            Some(_) => Some((
                [w0.get(own_part_rows.max(1) * wb)?, w1.get(fwd_part_rows.max(1) * wb)?],
                [w2.get(g.own_rows.max(1) * wb)?, w3.get(g.fwd_rows.max(1) * wb)?],
                w4.get(g.rail_rows.max(1) * wb)?,
                w5.get(g.tokens.max(1) * wb)?,
            )),
            None => None,
        };
        let p = &self.plans[plan];
        let spec = node_spec(node, &p.own_part.handle, DType::Bf16, hidden);
        let (s, c) = (&self.stream, &self.rail_stream);
        ev.start.record(s)?;
        // The forwarded part first: its partial sums go back over the rail while the own part runs.
        let parts = [(&p.fwd_part, 1, &ev.fwd_begin, &ev.fwd_end), (&p.own_part, 0, &ev.own_begin, &ev.own_end)];
        for (part, i, begin, end) in parts {
            {
                let kernels = node.kernels_for(&spec)?;
                kernels.gather_rows([y_parts[i], 0], [y, part.to.ptr()], part.rows, rb, s)?;
                if let (Some(w), Some((wp, _, _, _))) = (weights, w) {
                    kernels.gather_rows([wp[i], 0], [w, part.to.ptr()], part.rows, wb, s)?;
                }
            }
            begin.record(s)?;
            let part_weights = w.map(|(wp, wpart, _, _)| [wp[i], wpart[i]]);
            node.combine_on(y_parts[i], hidden, &part.handle, partials[i], part_weights, CallerStream(s.raw() as u64))?;
            end.record(s)?;
            if i == 1 {
                c.wait_event(&ev.fwd_end)?;
                ev.rail_begin.record(c)?;
                let mut arrays = vec![(partials[1], back, rb)];
                arrays.extend(w.map(|(_, wpart, w_back, _)| (wpart[1], w_back, wb)));
                let (mut sends, mut recvs) = (Vec::new(), Vec::new());
                for &(from, to, rb) in &arrays {
                    for n in g.others() {
                        sends.push(Piece { peer: n, ptr: from + (g.fwd_at[n] * rb) as u64, bytes: g.forwarded[n] * rb });
                        recvs.push(Piece { peer: n, ptr: to + (g.rail_at[n] * rb) as u64, bytes: g.sent[n] * rb });
                    }
                }
                rail.enqueue_pieces(&sends, &recvs, c)?;
                ev.rail_end.record(c)?;
            }
        }
        s.wait_event(&ev.rail_end)?;
        let nodes = g.sent.len();
        let kernels = node.kernels_for(&spec)?;
        kernels.sum_rows(false, sums, [partials[0], back], p.sum_src.ptr(), g.own_rows, g.tokens, nodes, hidden, s)?;
        if let Some((_, wpart, w_back, w_sums)) = w {
            kernels.sum_rows(true, w_sums, [wpart[0], w_back], p.sum_src.ptr(), g.own_rows, g.tokens, nodes, k, s)?;
        }
        ev.end.record(s)?;
        Ok((sums, w.map_or(0, |w| w.3)))
    }

    /// Wait for both streams until `deadline`; a device wait of the node's kernels that
    /// timed out, or the deadline passing (then the rail is aborted), is the error.
    fn finish(
        &self,
        node: &mut CudaRank,
        rail: &mut NcclExchange,
        deadline: Instant,
        timeout_ms: u64,
        rank: usize,
    ) -> Result<()> {
        if !(self.stream.sync_until(deadline)? && self.rail_stream.sync_until(deadline)?) {
            rail.abort();
            return Err(Error::Timeout {
                timeout_ms,
                diag: WaitDiagnostic {
                    rank,
                    channel: 0,
                    role: Role::Forwarder,
                    head: 0,
                    tail: 0,
                    detail: format!("the two hops on the device (NCCL rail rank {})", rail.rank()),
                },
            });
        }
        node.device_error()
    }
}

/// The node rank's kernel spec for rows of `dtype` along `node_handle`.
fn node_spec(node: &CudaRank, node_handle: &Handle, dtype: DType, hidden: usize) -> KernelSpec {
    let fp8 = dtype == DType::Fp8;
    KernelSpec {
        world: node.world,
        hidden,
        topk: node_handle.topk,
        num_experts: node_handle.num_experts,
        x_fp8: fp8,
        wire_fp8: fp8,
    }
}

/// The CUDA parts of a call, or `None` when the node is not a CUDA rank or the rail not NCCL.
fn cuda_parts<'a>(
    node: &'a mut dyn Communicator,
    rail: &'a mut dyn crate::backend::hier::Rail,
) -> Option<(&'a mut CudaRank, &'a mut NcclExchange)> {
    let node = node.as_any_mut()?.downcast_mut::<CudaRank>()?;
    let rail = rail.as_any_mut().downcast_mut::<NcclExchange>()?;
    Some((node, rail))
}

/// `at` as the CUDA node, the NCCL rail and the rest; `None` when the node is not a
/// CUDA rank or the rail not NCCL.
fn cuda_call(at: HopsAt<'_>) -> Option<(&mut CudaRank, &mut NcclExchange, CallInfo<'_>)> {
    let HopsAt { node, rail, call } = at;
    let (node, rail) = cuda_parts(node, rail)?;
    Some((node, rail, call))
}

impl DeviceHops for CudaHops {
    fn dispatch_cached(&mut self, at: HopsAt<'_>, x: RowsRef<'_>, fp8_on_wire: bool) -> Option<Result<(Rows, [f64; 2])>> {
        let (node, rail, at) = cuda_call(at)?;
        Some((|| {
            let plan = self.plan(node, &at)?;
            let fmt = RowFormat::of(x.dtype(), x.hidden());
            let dev = self.input.rows(fmt, x.num_rows())?;
            dev.upload(x, &self.stream)?;
            let ev = CallEvents::new()?;
            let deadline = Instant::now() + at.timeout;
            let out = self.enqueue_dispatch(node, rail, plan, dev, fp8_on_wire, &ev)?;
            self.finish(node, rail, deadline, at.timeout.as_millis() as u64, at.rank)?;
            let p = &self.plans[plan];
            for part in [&p.own_part, &p.fwd_part] {
                node.count_on_stream(&part.handle, out.dtype.row_bytes(fmt.hidden), 1, true)?;
            }
            Ok((out.download(&self.stream)?, ev.seconds()?.1))
        })())
    }

    fn combine(
        &mut self,
        at: HopsAt<'_>,
        y: &[bf16],
        hidden: usize,
        weights: Option<&[f32]>,
    ) -> Option<Result<(Vec<bf16>, Option<Vec<f32>>, [f64; 2])>> {
        let (node, rail, at) = cuda_call(at)?;
        Some((|| {
            let plan = self.plan(node, &at)?;
            let y_dev = self.y_in.get(y.len().max(1) * 2)?;
            htod(y_dev, y, &self.stream)?;
            let w_dev = match weights {
                Some(w) => {
                    let at = self.w_in.get(w.len().max(1) * 4)?;
                    htod(at, w, &self.stream)?;
                    Some(at)
                }
                None => None,
            };
            let ev = CallEvents::new()?;
            let deadline = Instant::now() + at.timeout;
            let (sums, w_sums) = self.enqueue_combine(node, rail, plan, y_dev, w_dev, hidden, &ev)?;
            self.finish(node, rail, deadline, at.timeout.as_millis() as u64, at.rank)?;
            let p = &self.plans[plan];
            for part in [&p.own_part, &p.fwd_part] {
                node.count_on_stream(&part.handle, hidden * 2, 1, false)?;
            }
            let tokens = p.geo.tokens;
            let mut out = vec![bf16::ZERO; tokens * hidden];
            dtoh(&mut out, sums, &self.stream)?;
            let out_w = match weights {
                Some(_) => {
                    let mut w = vec![0f32; tokens * p.own_part.handle.topk];
                    dtoh(&mut w, w_sums, &self.stream)?;
                    Some(w)
                }
                None => None,
            };
            Ok((out, out_w, ev.seconds()?.1))
        })())
    }

    fn time_resident(
        &mut self,
        at: HopsAt<'_>,
        op: ResidentOp,
        inputs: &ResidentInputs<'_>,
        iters: usize,
    ) -> Option<Result<(Vec<f64>, Vec<[f64; 2]>)>> {
        if inputs.graph {
            return None;
        }
        let fp8_on_wire = inputs.options.fp8_on_wire;
        let (node, rail, at) = cuda_call(at)?;
        Some((|| {
            let plan = self.plan(node, &at)?;
            let events = (0..iters).map(|_| CallEvents::new()).collect::<Result<Vec<_>>>()?;
            let input = match op {
                ResidentOp::DispatchCached => {
                    let dev = self.input.rows(RowFormat::of(inputs.x.dtype(), inputs.hidden), at.tokens)?;
                    dev.upload(inputs.x, &self.stream)?;
                    dev
                }
                ResidentOp::Combine => {
                    let at = self.y_in.get(inputs.y.len().max(1) * 2)?;
                    htod(at, inputs.y, &self.stream)?;
                    DeviceRows { data: at, scales: 0, dtype: DType::Bf16, hidden: inputs.hidden, num_rows: 0 }
                }
            };
            let limit = at.timeout * iters.max(1) as u32;
            let deadline = Instant::now() + limit;
            for ev in &events {
                match op {
                    ResidentOp::DispatchCached => self.enqueue_dispatch(node, rail, plan, input, fp8_on_wire, ev).map(|_| ())?,
                    ResidentOp::Combine => {
                        self.enqueue_combine(node, rail, plan, input.data, None, inputs.hidden, ev).map(|_| ())?
                    }
                }
            }
            self.finish(node, rail, deadline, limit.as_millis() as u64, at.rank)?;
            let wire = if fp8_on_wire { DType::Fp8 } else { inputs.x.dtype() };
            let (row_bytes, dispatch) = match op {
                ResidentOp::DispatchCached => (wire.row_bytes(inputs.hidden), true),
                ResidentOp::Combine => (inputs.hidden * 2, false),
            };
            let p = &self.plans[plan];
            for part in [&p.own_part, &p.fwd_part] {
                node.count_on_stream(&part.handle, row_bytes, iters, dispatch)?;
            }
            let mut times = Vec::with_capacity(iters);
            let mut hops = Vec::with_capacity(iters);
            for ev in &events {
                let (t, h) = ev.seconds()?;
                times.push(t);
                hops.push(h);
            }
            Ok((times, hops))
        })())
    }
}

impl CudaRank {
    /// The loaded kernels of `spec` (compiled and loaded on first use).
    fn kernels_for(&mut self, spec: &KernelSpec) -> Result<&Kernels> {
        self.ensure_kernels(spec)?;
        Ok(&self.kernels[spec])
    }

    /// Count `calls` calls on the caller's stream along `handle` in this rank's traffic.
    fn count_on_stream(&mut self, handle: &Handle, row_bytes: usize, calls: usize, dispatch: bool) -> Result<()> {
        let st = handle.state::<CudaHandleState>("cuda")?;
        let rows = super::rows_per_destination(self.world, &st.pos);
        let into = if dispatch { &mut self.traffic.dispatch } else { &mut self.traffic.combine };
        super::count_traffic(self.rank, &rows, row_bytes, calls, into);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route of 5 tokens on node 1 of 3 (one rank per node), written out by hand.
    fn route() -> RouteState {
        RouteState {
            id: 1,
            node: Handle {
                comm_id: 0,
                rank: 0,
                topology: Topology { num_nodes: 1, ranks_per_node: 1 },
                num_tokens: 6,
                topk: 1,
                num_experts: 1,
                source_rank: Vec::new(),
                source_token: Vec::new(),
                backend_state: std::sync::Arc::new(()),
            },
            perm: vec![2, 0, 1],
            // Tokens to node 0: 1, 4; own node: 0, 4; node 2: 3.
            sent: vec![vec![1, 4], vec![0, 4], vec![3]],
            // Node-local input: node 0's rail peer's 3 tokens, this rank's 2, node 2's 1.
            forwarded: vec![3, 2, 1],
            node_ids: vec![10, 11, 12, 13, 14, 15],
            sources: vec![[0, 7], [0, 8], [0, 9], [1, 0], [1, 4], [2, 3]],
        }
    }

    #[test]
    fn geometry_places_each_nodes_rows_in_node_order() {
        let g = Geometry::of(&route(), 1, 5);
        // Rail buffer: node 0's two rows, then node 2's one (no own section).
        assert_eq!((g.rail_at.clone(), g.rail_rows), (vec![0, 2, 2], 3));
        // Forwarded part: node 0's 3 rows, then node 2's 1; the own part: 2 rows.
        assert_eq!((g.fwd_at.clone(), g.fwd_rows, g.own_rows), (vec![0, 3, 3], 4, 2));
        assert_eq!(g.forwarded_input_rows(), vec![0, 1, 2, 5]);
        assert_eq!(g.own_input_rows(), 3..5);
        assert_eq!((g.out_rows, g.tokens, g.others().collect::<Vec<_>>()), (3, 5, vec![0, 2]));
    }

    #[test]
    fn parts_take_their_rows_names_and_ids() {
        let r = route();
        let g = Geometry::of(&r, 1, 5);
        assert_eq!(part_of(&r, g.own_input_rows(), 1), (vec![[1, 0], [1, 4]], vec![13, 14]));
        assert_eq!(part_of(&r, g.forwarded_input_rows().into_iter(), 1).1, vec![10, 11, 12, 15]);
    }

    #[test]
    fn indices_pack_and_name_each_tokens_partial_sums() {
        let r = route();
        let ix = Indices::of(&r, &Geometry::of(&r, 1, 5));
        assert_eq!(ix.pack, vec![1, 4, 3]);
        assert_eq!(ix.own, vec![0, 4]);
        // [token][node]: own partials are the own part's rows 0..2, the others sit in the
        // rail buffer after them (node 0 at 2.., node 2 at 4..).
        #[rustfmt::skip]
        let want = vec![
            -1, 0, -1, // token 0: own node only
            2, -1, -1, // token 1: node 0
            -1, -1, -1, // token 2: nowhere
            -1, -1, 4, // token 3: node 2
            3, 1, -1, // token 4: node 0 and own
        ];
        assert_eq!(ix.sum_src, want);
    }

    #[test]
    fn delivered_rows_find_their_output_position_once() {
        // Two node ranks' part inputs; this rank's output is (0,7), (1,0), (0,9).
        let names = vec![vec![[0, 7], [0, 9]], vec![[1, 0]]];
        let out = [([0u32, 7u32], 0usize), ([1, 0], 1), ([0, 9], 2)].into_iter().collect();
        let mut seen = vec![false; 3];
        let got = positions((&[1, 0, 0], &[0, 1, 0]), &names, &out, &mut seen, 0).unwrap();
        assert_eq!(got, vec![1, 2, 0]);
        // The same row again, or a row nobody fed in, is an error.
        assert!(positions((&[0], &[0]), &names, &out, &mut seen, 0).is_err());
        assert!(positions((&[1], &[5]), &names, &out, &mut [false; 3], 0).is_err());
    }
}
