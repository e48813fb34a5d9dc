//! Cached dispatch and combine on device pointers, enqueued on the caller's stream:
//! no host copy, no host synchronization and no host collective, so a model can put
//! them in its own stream order and capture them in a CUDA graph.
//!
//! What the host calls check together (that every rank makes the same call, with
//! good input) is the caller's contract here, as in DeepEP: every rank of the node
//! must make the same calls in the same order, on inputs of the handle's shape. A
//! device wait that times out is reported by [`CudaRank::device_error`] once the
//! caller has synchronized. The first call of a shape compiles its kernels, and the
//! first call with a handle uploads its plan: make those calls before any capture.

use super::compile::{KernelSpec, THREADS};
use super::driver::{dtoh, htod, DeviceBuffer, Stream};
use super::layout::{meta, SyDiag};
use super::{CudaHandleState, CudaRank};
use crate::backend::DispatchOptions;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::tensor::{DType, Rows, RowsRef};

/// A stream the caller owns (a framework's current stream), by its raw `CUstream`
/// handle, in the context of the rank's GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerStream(pub u64);

/// Rows in device memory: `[num_rows, hidden]` payload (BF16, or E4M3 bytes) at
/// `data` and, for FP8, `[num_rows, hidden / 128]` f32 scales at `scales`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRows {
    /// Device address of the payload.
    pub data: u64,
    /// Device address of the scales (FP8; 0 for BF16).
    pub scales: u64,
    /// Payload type.
    pub dtype: DType,
    /// Elements per row.
    pub hidden: usize,
    /// Rows.
    pub num_rows: usize,
}

impl DeviceRows {
    /// Copy host rows of this shape here, and wait.
    pub(super) fn upload(&self, x: RowsRef<'_>, stream: &Stream) -> Result<()> {
        match x {
            RowsRef::Bf16 { data, .. } => htod(self.data, data, stream),
            RowsRef::Fp8 { data, scales, .. } => {
                htod(self.data, data, stream)?;
                htod(self.scales, scales, stream)
            }
        }
    }

    /// These rows on the host (waits for the stream).
    pub(super) fn download(&self, stream: &Stream) -> Result<Rows> {
        let mut rows = Rows::zeros(self.dtype, self.num_rows, self.hidden);
        match &mut rows {
            Rows::Bf16 { data, .. } => dtoh(data, self.data, stream)?,
            Rows::Fp8 { data, scales, .. } => {
                dtoh(data, self.data, stream)?;
                dtoh(scales, self.scales, stream)?;
            }
        }
        Ok(rows)
    }
}

/// A handle's plan in device memory.
struct DevicePlan {
    id: u64,
    pos: DeviceBuffer,
    send_base: DeviceBuffer,
}

/// The plans of the last few handles used on the caller's stream (a model alternates
/// a few layers' handles); older ones are freed.
#[derive(Default)]
pub(super) struct PlanCache(Vec<DevicePlan>);

const PLANS_KEPT: usize = 8;

impl PlanCache {
    /// The device plan of `st` (uploaded now if it is not here: not while capturing).
    fn get(&mut self, st: &CudaHandleState, stream: &Stream) -> Result<(u64, u64)> {
        if let Some(i) = self.0.iter().position(|p| p.id == st.id) {
            let p = self.0.remove(i);
            self.0.push(p);
        } else {
            let pos = DeviceBuffer::new(st.pos.len().max(1) * 4)?;
            htod(pos.ptr(), &st.pos, stream)?;
            let send_base = DeviceBuffer::new(st.send_base.len().max(1) * 4)?;
            htod(send_base.ptr(), &st.send_base, stream)?;
            if self.0.len() == PLANS_KEPT {
                self.0.remove(0);
            }
            self.0.push(DevicePlan { id: st.id, pos, send_base });
        }
        let p = self.0.last().expect("pushed above");
        Ok((p.pos.ptr(), p.send_base.ptr()))
    }
}

impl CudaRank {
    /// Cached dispatch of `x` along `handle`, enqueued on `stream`: the rows land in
    /// this rank's communication buffer, returned as `[handle.num_recv(), hidden]` rows
    /// (FP8 with scales when `x` is FP8 or `options.fp8_on_wire`), valid until the next
    /// dispatch on this rank. Returns once enqueued. See the module docs for the contract.
    pub fn dispatch_cached_on(
        &mut self,
        x: DeviceRows,
        handle: &Handle,
        options: &DispatchOptions,
        stream: CallerStream,
    ) -> Result<DeviceRows> {
        let x_fp8 = x.dtype == DType::Fp8;
        let spec = KernelSpec {
            world: self.world,
            hidden: x.hidden,
            topk: handle.topk,
            num_experts: handle.num_experts,
            x_fp8,
            wire_fp8: x_fp8 || options.fp8_on_wire,
        };
        let st = self.ready_for(&spec, handle, Some(x.num_rows))?;
        if x.data == 0 || (x_fp8 && x.scales == 0) {
            return Err(Error::InvalidArgument { arg: "x".into(), reason: "null device address".into() });
        }
        let stream = Stream::borrowed(stream.0 as _);
        let (pos, send_base) = self.plans.get(st, &stream)?;
        let (mut p, lay) = self.base_params(&spec, handle.num_tokens);
        (p.x, p.x_scales, p.pos, p.send_base) = (x.data, x.scales, pos, send_base);
        let (kernel, side_ops) = self.cached_dispatch_plan(&spec, &lay, &st.own_runs, &mut p)?;
        if !side_ops.is_empty() {
            self.ensure_side()?;
        }
        self.advance_on(&stream, &spec, &p)?;
        self.enqueue_on(&stream, &spec, kernel, self.channels(), THREADS as u32, &p, &side_ops)?;
        let own = self.shared.peers.bases[self.rank];
        Ok(DeviceRows {
            data: own + lay.recv_x as u64,
            scales: if spec.wire_fp8 { own + lay.recv_scales as u64 } else { 0 },
            dtype: if spec.wire_fp8 { DType::Fp8 } else { DType::Bf16 },
            hidden: x.hidden,
            num_rows: handle.num_recv(),
        })
    }

    /// Combine of `y` (`[handle.num_recv(), hidden]` BF16 at device address `y`) along
    /// `handle` into `out` (`[handle.num_tokens(), hidden]` BF16), enqueued on `stream`.
    /// With `weights = Some([w, out_w])` the `[num_recv, k]` f32 weights at `w` are summed
    /// back into `[num_tokens, k]` at `out_w` too. `y` (and `w`) are copied into this rank's
    /// buffer (where the peers read them) on the stream first. Returns once enqueued. See
    /// the module docs for the contract.
    pub fn combine_on(
        &mut self,
        y: u64,
        hidden: usize,
        handle: &Handle,
        out: u64,
        weights: Option<[u64; 2]>,
        stream: CallerStream,
    ) -> Result<()> {
        let spec = KernelSpec {
            world: self.world,
            hidden,
            topk: handle.topk,
            num_experts: handle.num_experts,
            x_fp8: false,
            wire_fp8: false,
        };
        let st = self.ready_for(&spec, handle, None)?;
        let null = |a: u64, n: usize| a == 0 && n > 0;
        let (r, t) = (handle.num_recv(), handle.num_tokens);
        if null(y, r) || null(out, t) || weights.is_some_and(|[w, ow]| null(w, r) || null(ow, t)) {
            return Err(Error::InvalidArgument { arg: "y/out/weights".into(), reason: "null device address".into() });
        }
        let stream = Stream::borrowed(stream.0 as _);
        let (pos, send_base) = self.plans.get(st, &stream)?;
        let (mut p, lay) = self.base_params(&spec, handle.num_tokens);
        (p.pos, p.send_base, p.out) = (pos, send_base, out);
        let own = self.shared.peers.bases[self.rank];
        super::driver::dtod_async(own + lay.y as u64, y, r * hidden * 2, &stream)?;
        if let Some([w, out_w]) = weights {
            super::driver::dtod_async(own + lay.y_w as u64, w, r * handle.topk * 4, &stream)?;
            p.out_weights = out_w;
            p.flags |= super::layout::FLAG_WITH_WEIGHTS;
        }
        let kernel = self.pull_kernel(&spec)?;
        self.advance_on(&stream, &spec, &p)?;
        self.enqueue_on(&stream, &spec, kernel, self.channels(), THREADS as u32, &p, &[])
    }

    /// After the caller synchronized the streams of earlier `*_on` calls: the first device
    /// wait that timed out since the last check, as [`Error::Timeout`] (and the
    /// communicator is unusable afterwards), or `Ok`.
    pub fn device_error(&mut self) -> Result<()> {
        let r = self.check_device_timeout();
        self.meta.write(meta::DIAG, SyDiag::default());
        r
    }

    /// The local checks of a call on the caller's stream, the kernels of `spec` loaded,
    /// and the handle's state. `num_tokens`: the rows of `x` (dispatch).
    fn ready_for<'h>(&mut self, spec: &KernelSpec, handle: &'h Handle, num_tokens: Option<usize>) -> Result<&'h CudaHandleState> {
        if let Some(p) = &self.poisoned {
            return Err(Error::Cuda(format!("communicator unusable after an earlier failure: {p}")));
        }
        handle.check_owner(self.shared.comm_id, self.rank, num_tokens)?;
        if spec.hidden == 0 {
            return Err(Error::InvalidArgument { arg: "hidden".into(), reason: "must be >= 1".into() });
        }
        spec.validate()?;
        let st = handle.state::<CudaHandleState>("cuda")?;
        self.check_fits(spec, st.max_recv_any)?;
        self.gpu().bind()?;
        self.ensure_kernels(spec)?;
        Ok(st)
    }
}
