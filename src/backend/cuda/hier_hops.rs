//! The two hops of cached dispatch and combine on several CUDA nodes, on the device:
//! rows are packed per destination node by a gather kernel, cross the rail by NCCL
//! straight into the node-local dispatch's input, go through the node's NVLink
//! kernels, and are put into (source rank, source token) order by another gather;
//! combine reorders, combines inside the node into per-node partial sums, sends them
//! back over the rail and sums them per token with a kernel. Everything is enqueued
//! on one stream: no host copy between the hops and no host collective, only NCCL.
//!
//! The hops run one after the other (no chunk pipeline yet). The first dispatch, FP8
//! quantization on the way and graph capture stay on the host path of
//! [`crate::backend::hier::HierRank`].

use std::time::Instant;

use half::bf16;

use super::compile::KernelSpec;
use super::driver::{dtoh, htod, DeviceBuffer, Event, Kernels, Scratch, Stream};
use super::nccl::{NcclExchange, Piece};
use super::{CallerStream, CudaHandleState, CudaRank, DeviceRows};
use crate::backend::hier::{DeviceHops, HopsAt, RouteState};
use crate::backend::{Communicator, DispatchOptions, ResidentInputs, ResidentOp};
use crate::error::{Error, Result, Role, WaitDiagnostic};
use crate::handle::Handle;
use crate::tensor::{DType, Rows, RowsRef};

/// Row counts and offsets of a route, in rows.
struct Geometry {
    me: usize,
    /// `[nodes]` this rank's tokens that go to each node (its own node's: dispatched here).
    sent: Vec<usize>,
    /// `[nodes]` where each other node's rows start in the rail buffer (packed rows going
    /// out in dispatch, partial sums coming back in combine; own node: unused).
    rail_at: Vec<usize>,
    /// Rows in the rail buffer.
    rail_rows: usize,
    /// `[nodes]` tokens forwarded for each node's rail peer, and where they start in the
    /// node-local input (own node: this rank's own tokens).
    forwarded: Vec<usize>,
    node_at: Vec<usize>,
    /// Rows of the node-local input.
    node_rows: usize,
    /// Rows this rank receives.
    out_rows: usize,
    /// This rank's tokens.
    tokens: usize,
}

impl Geometry {
    fn of(route: &RouteState, me: usize, tokens: usize) -> Self {
        let sent: Vec<usize> = route.sent.iter().map(Vec::len).collect();
        let starts = |counts: &[usize], skip: Option<usize>| -> (Vec<usize>, usize) {
            let mut at = 0;
            let v = counts
                .iter()
                .enumerate()
                .map(|(n, &c)| {
                    let start = at;
                    at += if Some(n) == skip { 0 } else { c };
                    start
                })
                .collect();
            (v, at)
        };
        let (rail_at, rail_rows) = starts(&sent, Some(me));
        let (node_at, node_rows) = starts(&route.forwarded, None);
        Self {
            me,
            sent,
            rail_at,
            rail_rows,
            forwarded: route.forwarded.clone(),
            node_at,
            node_rows,
            out_rows: route.perm.len(),
            tokens,
        }
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.sent.len()).filter(move |&n| n != self.me)
    }
}

/// A route's index lists on the device.
struct Plan {
    id: u64,
    geo: Geometry,
    /// `sent[n]` of every other node, node by node: the rows packed into the rail buffer.
    pack: DeviceBuffer,
    /// `sent[me]`: this rank's rows for its own node.
    own: DeviceBuffer,
    /// Node-local output row of each output row.
    perm: DeviceBuffer,
    /// Output row of each node-local output row.
    unperm: DeviceBuffer,
    /// `[tokens, nodes]` the partial-sum rows of each token (-1: none): below `node_rows`
    /// rows of the node-local combine's output, above it rows of the rail buffer.
    sum_src: DeviceBuffer,
}

/// A route's index lists on the host (see [`Plan`]).
#[derive(Debug, PartialEq)]
struct Indices {
    pack: Vec<i32>,
    own: Vec<i32>,
    perm: Vec<i32>,
    unperm: Vec<i32>,
    sum_src: Vec<i32>,
}

impl Indices {
    fn of(route: &RouteState, geo: &Geometry) -> Self {
        let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let mut unperm = vec![0i32; route.perm.len()];
        for (i, &p) in route.perm.iter().enumerate() {
            unperm[p as usize] = i as i32;
        }
        let nodes = route.sent.len();
        let mut sum_src = vec![-1i32; geo.tokens * nodes];
        for (n, tokens_of_n) in route.sent.iter().enumerate() {
            for (i, &t) in tokens_of_n.iter().enumerate() {
                let row = if n == geo.me { geo.node_at[n] + i } else { geo.node_rows + geo.rail_at[n] + i };
                sum_src[t as usize * nodes + n] = row as i32;
            }
        }
        Self {
            pack: geo.others().flat_map(|n| as_i32(&route.sent[n])).collect(),
            own: as_i32(&route.sent[geo.me]),
            perm: as_i32(&route.perm),
            unperm,
            sum_src,
        }
    }
}

impl Plan {
    fn new(route: &RouteState, me: usize, tokens: usize, stream: &Stream) -> Result<Self> {
        let geo = Geometry::of(route, me, tokens);
        let upload = |v: &[i32]| -> Result<DeviceBuffer> {
            let b = DeviceBuffer::new(v.len().max(1) * 4)?;
            htod(b.ptr(), v, stream)?;
            Ok(b)
        };
        let ix = Indices::of(route, &geo);
        Ok(Self {
            id: route.id,
            pack: upload(&ix.pack)?,
            own: upload(&ix.own)?,
            perm: upload(&ix.perm)?,
            unperm: upload(&ix.unperm)?,
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

/// Events of one call.
struct CallEvents {
    start: Event,
    rail_begin: Event,
    rail_end: Event,
    node_begin: Event,
    node_end: Event,
    end: Event,
}

impl CallEvents {
    fn new() -> Result<Self> {
        let e = Event::new;
        Ok(Self { start: e()?, rail_begin: e()?, rail_end: e()?, node_begin: e()?, node_end: e()?, end: e()? })
    }

    /// `(whole call, [rail transfer, node op])` in seconds.
    fn seconds(&self) -> Result<(f64, [f64; 2])> {
        let s = |a: &Event, b: &Event| -> Result<f64> { Ok(b.elapsed_ms_since(a)? as f64 * 1e-3) };
        Ok((s(&self.start, &self.end)?, [s(&self.rail_begin, &self.rail_end)?, s(&self.node_begin, &self.node_end)?]))
    }
}

/// The CUDA backend's [`DeviceHops`]: owns a stream, the route plans and the buffers.
pub(super) struct CudaHops {
    stream: Stream,
    plans: Vec<Plan>,
    input: RowBuf,
    rail: RowBuf,
    node_in: RowBuf,
    out: RowBuf,
    sums: Scratch,
    /// Combine's weights, as its rows: input, reordered, node partial sums, back over the rail, sums.
    weights: [Scratch; 5],
}

// SAFETY: used by its rank's thread only, with the context current.
unsafe impl Send for CudaHops {}

const PLANS_KEPT: usize = 8;

impl CudaHops {
    /// Made on the thread whose context is the node rank's GPU.
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            stream: Stream::new()?,
            plans: Vec::new(),
            input: RowBuf::default(),
            rail: RowBuf::default(),
            node_in: RowBuf::default(),
            out: RowBuf::default(),
            sums: Scratch::default(),
            weights: Default::default(),
        })
    }

    fn plan(&mut self, route: &RouteState, me: usize, tokens: usize) -> Result<usize> {
        if let Some(i) = self.plans.iter().position(|p| p.id == route.id) {
            return Ok(i);
        }
        if self.plans.len() == PLANS_KEPT {
            self.plans.remove(0);
        }
        self.plans.push(Plan::new(route, me, tokens, &self.stream)?);
        Ok(self.plans.len() - 1)
    }

    /// Enqueue a cached dispatch of `x` (`[tokens, hidden]` rows on the device); the rows
    /// land in `self.out`.
    fn enqueue_dispatch(
        &mut self,
        node: &mut CudaRank,
        rail: &NcclExchange,
        plan: usize,
        route: &RouteState,
        x: DeviceRows,
        ev: &CallEvents,
    ) -> Result<DeviceRows> {
        let fmt = RowFormat::of(x.dtype, x.hidden);
        let g = &self.plans[plan].geo;
        let (send, into, out) =
            (self.rail.rows(fmt, g.rail_rows)?, self.node_in.rows(fmt, g.node_rows)?, self.out.rows(fmt, g.out_rows)?);
        let p = &self.plans[plan];
        let spec = node_spec(node, &route.node, x.dtype, x.hidden);
        let s = &self.stream;
        ev.start.record(s)?;
        {
            let k = node.kernels_for(&spec)?;
            for ((dst, rb), ((src, _), (into_base, _))) in
                fmt.arrays(&send).into_iter().zip(fmt.arrays(&x).into_iter().zip(fmt.arrays(&into)))
            {
                k.gather_rows(dst, src, p.pack.ptr(), g.rail_rows, rb, s)?;
                k.gather_rows(into_base + (g.node_at[g.me] * rb) as u64, src, p.own.ptr(), g.sent[g.me], rb, s)?;
            }
        }
        ev.rail_begin.record(s)?;
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        for ((from, rb), (to, _)) in fmt.arrays(&send).into_iter().zip(fmt.arrays(&into)) {
            for n in g.others() {
                sends.push(Piece { peer: n, ptr: from + (g.rail_at[n] * rb) as u64, bytes: g.sent[n] * rb });
                recvs.push(Piece { peer: n, ptr: to + (g.node_at[n] * rb) as u64, bytes: g.forwarded[n] * rb });
            }
        }
        rail.enqueue_pieces(&sends, &recvs, s)?;
        ev.rail_end.record(s)?;
        ev.node_begin.record(s)?;
        let opts = DispatchOptions { fp8_on_wire: false, expert_alignment: 0 };
        let got = node.dispatch_cached_on(into, &route.node, &opts, CallerStream(s.raw() as u64))?;
        ev.node_end.record(s)?;
        {
            let k = node.kernels_for(&spec)?;
            for ((dst, rb), (src, _)) in fmt.arrays(&out).into_iter().zip(fmt.arrays(&got)) {
                k.gather_rows(dst, src, p.perm.ptr(), g.out_rows, rb, s)?;
            }
        }
        ev.end.record(s)?;
        Ok(out)
    }

    /// Enqueue a combine of `y` (`[out_rows, hidden]` BF16 on the device) and, with
    /// `weights`, of the `[out_rows, k]` f32 weights at `weights[0]` (uploaded there by the
    /// caller: `self.weights[0]`); the sums land in `self.sums` (`[tokens, hidden]` BF16)
    /// and `self.weights[4]` (`[tokens, k]`), whose addresses it returns.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_combine(
        &mut self,
        node: &mut CudaRank,
        rail: &NcclExchange,
        plan: usize,
        route: &RouteState,
        y: u64,
        weights: Option<u64>,
        hidden: usize,
        ev: &CallEvents,
    ) -> Result<(u64, u64)> {
        let fmt = RowFormat::of(DType::Bf16, hidden);
        let g = &self.plans[plan].geo;
        let k = route.node.topk;
        let rows = |buf: &mut RowBuf, n: usize| buf.rows(fmt, n).map(|r| r.data);
        let (y_node, partial, back) =
            (rows(&mut self.out, g.out_rows)?, rows(&mut self.node_in, g.node_rows)?, rows(&mut self.rail, g.rail_rows)?);
        let sums = self.sums.get(g.tokens.max(1) * fmt.payload)?;
        // Weights go the same way, as rows of k f32.
        let wb = k * 4;
        let [_, w_node, w_partial, w_back, w_sums] = &mut self.weights;
        let w = match weights {
            Some(w) => Some([
                w,
                w_node.get(g.out_rows.max(1) * wb)?,
                w_partial.get(g.node_rows.max(1) * wb)?,
                w_back.get(g.rail_rows.max(1) * wb)?,
                w_sums.get(g.tokens.max(1) * wb)?,
            ]),
            None => None,
        };
        let p = &self.plans[plan];
        let spec = node_spec(node, &route.node, DType::Bf16, hidden);
        let s = &self.stream;
        ev.start.record(s)?;
        {
            let kernels = node.kernels_for(&spec)?;
            kernels.gather_rows(y_node, y, p.unperm.ptr(), g.out_rows, fmt.payload, s)?;
            if let Some([w, w_node, ..]) = w {
                kernels.gather_rows(w_node, w, p.unperm.ptr(), g.out_rows, wb, s)?;
            }
        }
        ev.node_begin.record(s)?;
        let node_weights = w.map(|[_, w_node, w_partial, ..]| [w_node, w_partial]);
        node.combine_on(y_node, hidden, &route.node, partial, node_weights, CallerStream(s.raw() as u64))?;
        ev.node_end.record(s)?;
        ev.rail_begin.record(s)?;
        let mut arrays = vec![(partial, back, fmt.payload)];
        arrays.extend(w.map(|[_, _, w_partial, w_back, _]| (w_partial, w_back, wb)));
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        for &(from, to, rb) in &arrays {
            for n in g.others() {
                sends.push(Piece { peer: n, ptr: from + (g.node_at[n] * rb) as u64, bytes: g.forwarded[n] * rb });
                recvs.push(Piece { peer: n, ptr: to + (g.rail_at[n] * rb) as u64, bytes: g.sent[n] * rb });
            }
        }
        rail.enqueue_pieces(&sends, &recvs, s)?;
        ev.rail_end.record(s)?;
        let nodes = g.sent.len();
        let kernels = node.kernels_for(&spec)?;
        kernels.sum_rows(false, sums, [partial, back], p.sum_src.ptr(), g.node_rows, g.tokens, nodes, hidden, s)?;
        if let Some([_, _, w_partial, w_back, w_sums]) = w {
            kernels.sum_rows(true, w_sums, [w_partial, w_back], p.sum_src.ptr(), g.node_rows, g.tokens, nodes, k, s)?;
        }
        ev.end.record(s)?;
        Ok((sums, w.map_or(0, |w| w[4])))
    }

    /// Wait for the stream until `deadline`; a device wait of the node's kernels that
    /// timed out, or the deadline passing (then the rail is aborted), is the error.
    fn finish(
        &self,
        node: &mut CudaRank,
        rail: &mut NcclExchange,
        deadline: Instant,
        timeout_ms: u64,
        rank: usize,
    ) -> Result<()> {
        if !self.stream.sync_until(deadline)? {
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

/// The CUDA parts of `at`, or `None` when the node is not a CUDA rank or the rail not NCCL.
fn cuda_parts<'a>(
    node: &'a mut dyn Communicator,
    rail: &'a mut dyn crate::backend::hier::Rail,
) -> Option<(&'a mut CudaRank, &'a mut NcclExchange)> {
    let node = node.as_any_mut()?.downcast_mut::<CudaRank>()?;
    let rail = rail.as_any_mut().downcast_mut::<NcclExchange>()?;
    Some((node, rail))
}

/// Copy host rows to device rows of the same shape.
fn upload_rows(x: RowsRef<'_>, to: &DeviceRows, stream: &Stream) -> Result<()> {
    match x {
        RowsRef::Bf16 { data, .. } => htod(to.data, data, stream),
        RowsRef::Fp8 { data, scales, .. } => {
            htod(to.data, data, stream)?;
            htod(to.scales, scales, stream)
        }
    }
}

/// Copy device rows to the host.
fn download_rows(from: &DeviceRows, stream: &Stream) -> Result<Rows> {
    let mut rows = Rows::zeros(from.dtype, from.num_rows, from.hidden);
    match &mut rows {
        Rows::Bf16 { data, .. } => dtoh(data, from.data, stream)?,
        Rows::Fp8 { data, scales, .. } => {
            dtoh(data, from.data, stream)?;
            dtoh(scales, from.scales, stream)?;
        }
    }
    Ok(rows)
}

impl DeviceHops for CudaHops {
    fn dispatch_cached(&mut self, at: HopsAt<'_>, x: RowsRef<'_>) -> Option<Result<(Rows, [f64; 2])>> {
        let (node, rail) = cuda_parts(at.node, at.rail)?;
        let me = at.topology.node_of(at.rank);
        Some((|| {
            node.gpu().bind()?;
            let plan = self.plan(at.route, me, at.tokens)?;
            let fmt = RowFormat::of(x.dtype(), x.hidden());
            let dev = self.input.rows(fmt, x.num_rows())?;
            upload_rows(x, &dev, &self.stream)?;
            let ev = CallEvents::new()?;
            let deadline = Instant::now() + at.timeout;
            let out = self.enqueue_dispatch(node, rail, plan, at.route, dev, &ev)?;
            self.finish(node, rail, deadline, at.timeout.as_millis() as u64, at.rank)?;
            node.count_on_stream(&at.route.node, fmt.dtype.row_bytes(fmt.hidden), 1, true)?;
            Ok((download_rows(&out, &self.stream)?, ev.seconds()?.1))
        })())
    }

    fn combine(
        &mut self,
        at: HopsAt<'_>,
        y: &[bf16],
        hidden: usize,
        weights: Option<&[f32]>,
    ) -> Option<Result<(Vec<bf16>, Option<Vec<f32>>, [f64; 2])>> {
        let (node, rail) = cuda_parts(at.node, at.rail)?;
        let me = at.topology.node_of(at.rank);
        Some((|| {
            node.gpu().bind()?;
            let plan = self.plan(at.route, me, at.tokens)?;
            let dev = self.input.rows(RowFormat::of(DType::Bf16, hidden), y.len() / hidden.max(1))?;
            htod(dev.data, y, &self.stream)?;
            let w_dev = match weights {
                Some(w) => {
                    let at = self.weights[0].get(w.len().max(1) * 4)?;
                    htod(at, w, &self.stream)?;
                    Some(at)
                }
                None => None,
            };
            let ev = CallEvents::new()?;
            let deadline = Instant::now() + at.timeout;
            let (sums, w_sums) = self.enqueue_combine(node, rail, plan, at.route, dev.data, w_dev, hidden, &ev)?;
            self.finish(node, rail, deadline, at.timeout.as_millis() as u64, at.rank)?;
            node.count_on_stream(&at.route.node, hidden * 2, 1, false)?;
            let tokens = self.plans[plan].geo.tokens;
            let mut out = vec![bf16::ZERO; tokens * hidden];
            dtoh(&mut out, sums, &self.stream)?;
            let out_w = match weights {
                Some(_) => {
                    let mut w = vec![0f32; tokens * at.route.node.topk];
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
        let bf16_with_fp8_wire = inputs.options.fp8_on_wire && inputs.x.dtype() == DType::Bf16;
        if inputs.graph || (op == ResidentOp::DispatchCached && bf16_with_fp8_wire) {
            return None;
        }
        let (node, rail) = cuda_parts(at.node, at.rail)?;
        let me = at.topology.node_of(at.rank);
        let tokens = inputs.handle.num_tokens;
        Some((|| {
            node.gpu().bind()?;
            let plan = self.plan(at.route, me, tokens)?;
            let events = (0..iters).map(|_| CallEvents::new()).collect::<Result<Vec<_>>>()?;
            let input = match op {
                ResidentOp::DispatchCached => {
                    let dev = self.input.rows(RowFormat::of(inputs.x.dtype(), inputs.hidden), tokens)?;
                    upload_rows(inputs.x, &dev, &self.stream)?;
                    dev
                }
                ResidentOp::Combine => {
                    let dev = self.input.rows(RowFormat::of(DType::Bf16, inputs.hidden), inputs.y.len() / inputs.hidden)?;
                    htod(dev.data, inputs.y, &self.stream)?;
                    dev
                }
            };
            let deadline = Instant::now() + at.timeout * iters.max(1) as u32;
            for ev in &events {
                match op {
                    ResidentOp::DispatchCached => self.enqueue_dispatch(node, rail, plan, at.route, input, ev).map(|_| ())?,
                    ResidentOp::Combine => {
                        self.enqueue_combine(node, rail, plan, at.route, input.data, None, inputs.hidden, ev).map(|_| ())?
                    }
                }
            }
            self.finish(node, rail, deadline, (at.timeout * iters.max(1) as u32).as_millis() as u64, at.rank)?;
            let (row_bytes, dispatch) = match op {
                ResidentOp::DispatchCached => (inputs.x.dtype().row_bytes(inputs.hidden), true),
                ResidentOp::Combine => (inputs.hidden * 2, false),
            };
            node.count_on_stream(&at.route.node, row_bytes, iters, dispatch)?;
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
                topology: crate::topology::Topology { num_nodes: 1, ranks_per_node: 1 },
                num_tokens: 6,
                topk: 1,
                num_experts: 1,
                source_rank: Vec::new(),
                source_token: Vec::new(),
                backend_state: std::sync::Arc::new(()),
            },
            // Node-local output rows 2, 0, 1 are this rank's rows 0, 1, 2.
            perm: vec![2, 0, 1],
            // Tokens to node 0: 1, 4; own node: 0, 4; node 2: 3.
            sent: vec![vec![1, 4], vec![0, 4], vec![3]],
            // Forwarded for node 0's rail peer: 3 tokens; own: 2; node 2's: 1.
            forwarded: vec![3, 2, 1],
        }
    }

    #[test]
    fn geometry_places_each_nodes_rows_in_node_order() {
        let g = Geometry::of(&route(), 1, 5);
        // Rail buffer: node 0's two rows, then node 2's one (no own section).
        assert_eq!((g.rail_at.clone(), g.rail_rows), (vec![0, 2, 2], 3));
        // Node-local input: node 0's 3 forwarded, own 2, node 2's 1.
        assert_eq!((g.node_at.clone(), g.node_rows), (vec![0, 3, 5], 6));
        assert_eq!((g.out_rows, g.tokens, g.others().collect::<Vec<_>>()), (3, 5, vec![0, 2]));
    }

    #[test]
    fn indices_pack_reorder_and_name_each_tokens_partial_sums() {
        let r = route();
        let ix = Indices::of(&r, &Geometry::of(&r, 1, 5));
        assert_eq!(ix.pack, vec![1, 4, 3]);
        assert_eq!(ix.own, vec![0, 4]);
        assert_eq!(ix.perm, vec![2, 0, 1]);
        // unperm[perm[i]] = i.
        assert_eq!(ix.unperm, vec![1, 2, 0]);
        // [token][node]: own partials at node-local rows 3.. (the own section), others in the
        // rail buffer after the 6 node-local rows (node 0 at 6.., node 2 at 8..).
        #[rustfmt::skip]
        let want = vec![
            -1, 3, -1, // token 0: own node only
            6, -1, -1, // token 1: node 0
            -1, -1, -1, // token 2: nowhere
            -1, -1, 8, // token 3: node 2
            7, 4, -1, // token 4: node 0 and own
        ];
        assert_eq!(ix.sum_src, want);
    }
}
