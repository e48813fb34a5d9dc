//! Thin RAII wrappers over the CUDA driver (cudarc's `result`/`sys` layers).
//! Raw handles stay inside this module; everything returns our `Error::Cuda`.

use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use super::layout::SyParams;
use crate::error::{Error, Result};

fn err(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// Whether libcuda can be loaded. Check before any other driver call: cudarc panics without it.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// Initialize the driver and count devices.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(Error::BackendUnavailable { backend: "cuda", reason: "libcuda not found (no NVIDIA driver)".into() });
    }
    result::init().map_err(err("cuInit"))?;
    Ok(result::device::get_count().map_err(err("cuDeviceGetCount"))? as usize)
}

/// One GPU and its retained primary context.
pub struct Gpu {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUDA context may be used from any thread once made current there.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Retain the primary context of device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = result::device::get(ordinal as i32).map_err(err("cuDeviceGet"))?;
        // SAFETY: valid device.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(err("cuDevicePrimaryCtxRetain"))?;
        Ok(Self { ordinal, dev, ctx })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Make this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: context retained for our lifetime.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(err("cuCtxSetCurrent"))
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        use sys::CUdevice_attribute::*;
        // SAFETY: valid device.
        unsafe {
            let ma = result::device::get_attribute(self.dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .map_err(err("cuDeviceGetAttribute"))?;
            let mi = result::device::get_attribute(self.dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .map_err(err("cuDeviceGetAttribute"))?;
            Ok((ma, mi))
        }
    }

    /// Number of SMs.
    pub fn sm_count(&self) -> Result<usize> {
        // SAFETY: valid device.
        unsafe { result::device::get_attribute(self.dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) }
            .map(|v| v as usize)
            .map_err(err("cuDeviceGetAttribute"))
    }

    /// Device name.
    pub fn name(&self) -> String {
        result::device::get_name(self.dev).unwrap_or_else(|_| "?".into())
    }

    /// Whether this GPU can map `other`'s memory.
    pub fn can_access_peer(&self, other: &Gpu) -> Result<bool> {
        let mut ok = 0;
        // SAFETY: valid devices, valid out-pointer.
        unsafe { sys::cuDeviceCanAccessPeer(&mut ok, self.dev, other.dev) }.result().map_err(err("cuDeviceCanAccessPeer"))?;
        Ok(ok != 0)
    }

    /// Map `other`'s allocations into this context (idempotent).
    pub fn enable_peer_access(&self, other: &Gpu) -> Result<()> {
        self.bind()?;
        // SAFETY: both contexts are retained.
        let r = unsafe { sys::cuCtxEnablePeerAccess(other.ctx, 0) };
        match r {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            e => Err(Error::Cuda(format!("cuCtxEnablePeerAccess({} -> {}): {e:?}", self.ordinal, other.ordinal))),
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: retained in new().
        unsafe {
            let _ = result::primary_ctx::release(self.dev);
        }
    }
}

/// A non-blocking stream of one GPU.
pub struct Stream {
    raw: sys::CUstream,
    /// Destroyed on drop (false: the caller's stream, borrowed).
    owned: bool,
}

// SAFETY: streams may be used from any thread with their context current.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// A new stream in the current context.
    pub fn new() -> Result<Self> {
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(err("cuStreamCreate"))?;
        Ok(Self { raw, owned: true })
    }

    /// A stream someone else owns (a framework's current stream), by its raw handle; it is
    /// not destroyed on drop. Unsafe-free because every use goes through the driver, which
    /// rejects a handle that is not a stream of the current context.
    pub fn borrowed(raw: sys::CUstream) -> Self {
        Self { raw, owned: false }
    }

    /// Wait for all work on the stream.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { result::stream::synchronize(self.raw) }.map_err(err("cuStreamSynchronize"))
    }

    /// Wait for all work on the stream, polling, until `deadline`: `Ok(false)` when the
    /// work is still running then (for work that waits on another process, such as NCCL's,
    /// which a plain synchronize would wait for forever).
    pub fn sync_until(&self, deadline: std::time::Instant) -> Result<bool> {
        loop {
            // SAFETY: valid stream.
            match unsafe { sys::cuStreamQuery(self.raw) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(true),
                sys::CUresult::CUDA_ERROR_NOT_READY if std::time::Instant::now() < deadline => std::thread::yield_now(),
                sys::CUresult::CUDA_ERROR_NOT_READY => return Ok(false),
                e => return Err(err("cuStreamQuery")(result::DriverError(e))),
            }
        }
    }

    /// The driver handle, for libraries that enqueue on it (cuBLAS).
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Make later work on this stream wait for `event`'s last recording (no host wait).
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        // SAFETY: valid stream and event of the current context.
        unsafe { result::stream::wait_event(self.raw, event.raw, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(err("cuStreamWaitEvent"))
    }
}

/// Enqueue a device-to-device copy of `bytes` on `stream` (a copy engine moves it, no SM).
pub fn dtod_async(dst: u64, src: u64, bytes: usize, stream: &Stream) -> Result<()> {
    // SAFETY: the caller guarantees both ranges are live device memory of `bytes` bytes.
    unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.raw) }.map_err(err("cuMemcpyDtoDAsync"))
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: created in new().
            unsafe {
                let _ = result::stream::destroy(self.raw);
            }
        }
    }
}

/// A timing event of the current context (for device-side durations).
pub struct Event {
    raw: sys::CUevent,
}

// SAFETY: events may be used from any thread with their context current.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// A new timing event in the current context.
    pub fn new() -> Result<Self> {
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(err("cuEventCreate"))?;
        Ok(Self { raw })
    }

    /// Record on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: valid event and stream of the current context.
        unsafe { result::event::record(self.raw, stream.raw) }.map_err(err("cuEventRecord"))
    }

    /// Milliseconds from `start` to `self`; both must have completed.
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32> {
        // SAFETY: both events recorded and completed (the caller synchronized the stream).
        unsafe { result::event::elapsed(start.raw, self.raw) }.map_err(err("cuEventElapsedTime"))
    }
}

/// Start and end events, one pair per timed piece of work on a stream.
pub struct EventPairs(Vec<(Event, Event)>);

impl EventPairs {
    /// `n` pairs in the current context.
    pub fn new(n: usize) -> Result<Self> {
        (0..n).map(|_| Ok((Event::new()?, Event::new()?))).collect::<Result<_>>().map(Self)
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = &(Event, Event)> {
        self.0.iter()
    }

    /// Seconds from start to end of each pair; every event must have completed.
    pub fn seconds(&self) -> Result<Vec<f64>> {
        self.0.iter().map(|(a, b)| b.elapsed_ms_since(a).map(|ms| ms as f64 * 1e-3)).collect()
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in new().
        unsafe {
            let _ = result::event::destroy(self.raw);
        }
    }
}

/// Another process's allocation mapped into this one through a CUDA IPC handle;
/// unmapped on drop (with the context that opened it current).
pub struct IpcMapping {
    ptr: sys::CUdeviceptr,
}

// SAFETY: a device address is plain data; the driver is thread-safe.
unsafe impl Send for IpcMapping {}
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    /// Map the allocation behind `handle` into the current context, with peer access
    /// enabled for it (the lazy flag the driver requires for IPC mappings).
    pub fn open(handle: &[u8; 64]) -> Result<Self> {
        let h = sys::CUipcMemHandle { reserved: handle.map(|b| b as _) };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the driver validates the handle.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32) }
            .result()
            .map_err(err("cuIpcOpenMemHandle"))?;
        Ok(Self { ptr })
    }

    /// Address of the mapping in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: opened in open().
        unsafe {
            let _ = sys::cuIpcCloseMemHandle(self.ptr);
        }
    }
}

/// Device memory of one GPU.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

// SAFETY: a device address is plain data; the driver is thread-safe.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocate `bytes` (at least 1) in the current context.
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: plain allocation.
        let ptr = unsafe { result::malloc_sync(bytes.max(256)) }.map_err(err("cuMemAlloc"))?;
        Ok(Self { ptr, bytes: bytes.max(256) })
    }

    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Never empty (allocations are at least 256 bytes).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A CUDA IPC handle of this allocation, for another process to map it
    /// ([`IpcMapping::open`]).
    pub fn ipc_handle(&self) -> Result<[u8; 64]> {
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: ptr is the base of a cuMemAlloc allocation; h is a valid out-pointer.
        unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) }.result().map_err(err("cuIpcGetMemHandle"))?;
        Ok(h.reserved.map(|c| c as u8))
    }

    /// Fill the buffer with copies of a 16-bit pattern (synchronously; odd trailing byte untouched).
    pub fn fill_u16(&self, value: u16) -> Result<()> {
        // SAFETY: in bounds.
        unsafe { sys::cuMemsetD16_v2(self.ptr, value, self.bytes / 2) }.result().map_err(err("cuMemsetD16"))?;
        // As in `zero`: the memset runs later on the legacy stream; wait for it.
        result::ctx::synchronize().map_err(err("cuCtxSynchronize"))
    }

    /// Zero the whole buffer, and wait until it is done. (`cuMemsetD8` on device memory
    /// returns before the memset ran, on the legacy stream, which our non-blocking
    /// streams do not wait for: without the wait, a first kernel could run before it
    /// and have its writes zeroed.)
    pub fn zero(&self) -> Result<()> {
        // SAFETY: in bounds.
        unsafe { result::memset_d8_sync(self.ptr, 0, self.bytes) }.map_err(err("cuMemsetD8"))?;
        result::ctx::synchronize().map_err(err("cuCtxSynchronize"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in new(); with unified addressing any context may free it.
        unsafe {
            let _ = result::memory_free(self.ptr);
        }
    }
}

/// A workspace that grows on demand (contents are not kept when it grows).
#[derive(Default)]
pub struct Scratch(Option<DeviceBuffer>);

impl Scratch {
    /// Device address of at least `bytes` bytes.
    pub fn get(&mut self, bytes: usize) -> Result<u64> {
        if self.0.as_ref().map_or(true, |b| b.len() < bytes) {
            self.0 = None;
            self.0 = Some(DeviceBuffer::new(bytes.next_power_of_two())?);
        }
        Ok(self.0.as_ref().map(|b| b.ptr()).unwrap_or(0))
    }
}

/// Pinned host memory mapped into the device address space (the kernels write
/// diagnostics and notify results there; the host reads it after a stream sync).
pub struct MappedHost {
    host: *mut c_void,
    dev: sys::CUdeviceptr,
    bytes: usize,
}

// SAFETY: plain memory; accesses are ordered by stream syncs.
unsafe impl Send for MappedHost {}
unsafe impl Sync for MappedHost {}

impl MappedHost {
    /// Allocate and zero `bytes` of portable, device-mapped pinned memory.
    pub fn new(bytes: usize) -> Result<Self> {
        const PORTABLE: u32 = 0x01;
        const DEVICEMAP: u32 = 0x02;
        // SAFETY: plain allocation; zeroed before use.
        let host = unsafe { result::malloc_host(bytes, PORTABLE | DEVICEMAP) }.map_err(err("cuMemHostAlloc"))?;
        unsafe { std::ptr::write_bytes(host as *mut u8, 0, bytes) };
        let mut dev = 0;
        // SAFETY: host pointer from cuMemHostAlloc with DEVICEMAP.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }.result().map_err(err("cuMemHostGetDevicePointer"))?;
        Ok(Self { host, dev, bytes })
    }

    /// Device address.
    pub fn dev_ptr(&self) -> u64 {
        self.dev
    }

    /// Read a plain value at byte `offset` (volatile: the device writes it).
    pub fn read<T: Copy>(&self, offset: usize) -> T {
        assert!(offset + std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: in bounds; T is plain data.
        unsafe { std::ptr::read_volatile((self.host as *const u8).add(offset) as *const T) }
    }

    /// Write a plain value at byte `offset`.
    pub fn write<T: Copy>(&self, offset: usize, v: T) {
        assert!(offset + std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: in bounds; T is plain data.
        unsafe { std::ptr::write_volatile((self.host as *mut u8).add(offset) as *mut T, v) }
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        // SAFETY: from cuMemHostAlloc.
        unsafe {
            let _ = result::free_host(self.host);
        }
    }
}

/// A loaded CUBIN and its kernels.
pub struct Kernels {
    module: sys::CUmodule,
    advance: sys::CUfunction,
    notify: sys::CUfunction,
    dispatch: sys::CUfunction,
    combine: sys::CUfunction,
    combine_push: sys::CUfunction,
    combine_bulk: sys::CUfunction,
    /// Dynamic shared memory of `sy_combine_bulk` (0: not built for this arch).
    combine_bulk_smem: u32,
    dispatch_bulk: sys::CUfunction,
    /// Dynamic shared memory of `sy_dispatch_bulk` (0: not built for this arch or spec).
    dispatch_bulk_smem: u32,
    gather_rows: sys::CUfunction,
    gather_quantize: sys::CUfunction,
    sum_rows: sys::CUfunction,
    sum_weights: sys::CUfunction,
}

// SAFETY: module handles are usable from any thread with the context current.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

/// Which kernel to launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `sy_advance`: starts a call (raises the rank's call count on the device).
    Advance,
    /// `sy_notify`.
    Notify,
    /// `sy_dispatch`.
    Dispatch,
    /// `sy_dispatch_bulk` (cached BF16 dispatch of the peers' rows through bulk copies; sm_90
    /// and later).
    DispatchBulk,
    /// `sy_combine` (pull).
    Combine,
    /// `sy_combine_push`.
    CombinePush,
    /// `sy_combine_bulk` (pull through bulk copies into shared memory; sm_90 and later).
    CombineBulk,
}

impl Kernels {
    /// Load a CUBIN into the current context.
    pub fn load(image: &[u8]) -> Result<Self> {
        // SAFETY: a valid ELF image from NVRTC (the driver validates it).
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(err("cuModuleLoadData"))?;
        let get = |n: &str| function(module, n);
        let (combine_bulk, combine_bulk_smem) = bulk_kernel(module, "sy_combine_bulk")?;
        let (dispatch_bulk, dispatch_bulk_smem) = bulk_kernel(module, "sy_dispatch_bulk")?;
        Ok(Self {
            combine_bulk,
            combine_bulk_smem,
            dispatch_bulk,
            dispatch_bulk_smem,
            advance: get("sy_advance")?,
            notify: get("sy_notify")?,
            dispatch: get("sy_dispatch")?,
            combine: get("sy_combine")?,
            combine_push: get("sy_combine_push")?,
            gather_rows: get("sy_gather_rows")?,
            gather_quantize: get("sy_gather_quantize")?,
            sum_rows: get("sy_sum_rows")?,
            sum_weights: get("sy_sum_weights")?,
            module,
        })
    }

    /// Whether `sy_combine_bulk` was built (the arch has bulk copies).
    pub fn has_combine_bulk(&self) -> bool {
        self.combine_bulk_smem > 0
    }

    /// Whether `sy_dispatch_bulk` was built (bulk copies, BF16 rows, stages that fit shared memory).
    pub fn has_dispatch_bulk(&self) -> bool {
        self.dispatch_bulk_smem > 0
    }

    /// Launch `which` with one parameter block on `stream`.
    pub fn launch(&self, which: Kernel, grid: u32, block: u32, params: &SyParams, stream: &Stream) -> Result<()> {
        let (f, smem) = match which {
            Kernel::Advance => (self.advance, 0),
            Kernel::Notify => (self.notify, 0),
            Kernel::Dispatch => (self.dispatch, 0),
            Kernel::DispatchBulk => {
                built(self.dispatch_bulk, self.dispatch_bulk_smem, "sy_dispatch_bulk", "sm_90 and BF16 rows")?
            }
            Kernel::Combine => (self.combine, 0),
            Kernel::CombinePush => (self.combine_push, 0),
            Kernel::CombineBulk => built(self.combine_bulk, self.combine_bulk_smem, "sy_combine_bulk", "sm_90")?,
        };
        let mut p = *params;
        let mut args = [&mut p as *mut SyParams as *mut c_void];
        // SAFETY: the kernel takes exactly one `SyParams` by value; the driver copies it before returning.
        unsafe { result::launch_kernel(f, (grid, 1, 1), (block, 1, 1), smem, stream.raw, &mut args) }
            .map_err(err("cuLaunchKernel"))
    }
}

/// A bulk-copy kernel with its shared memory, or the error of launching one that was not built
/// (0 bytes stated; it needs `needs`).
fn built(f: sys::CUfunction, smem: u32, name: &str, needs: &str) -> Result<(sys::CUfunction, u32)> {
    match smem {
        0 => Err(Error::Cuda(format!("{name} was not built for this GPU and shape (needs {needs})"))),
        _ => Ok((f, smem)),
    }
}

/// The kernel `name` of a loaded module.
fn function(module: sys::CUmodule, name: &str) -> Result<sys::CUfunction> {
    // SAFETY: module loaded.
    unsafe { result::module::get_function(module, CString::new(name).unwrap()) }.map_err(err("cuModuleGetFunction"))
}

/// A bulk-copy kernel and the dynamic shared memory its stages take, which the source states in
/// `<name>_smem` (0 where it was not built: no bulk copies on the arch, or a spec it does not
/// serve). Above 48 KB a kernel must be allowed its shared memory explicitly.
fn bulk_kernel(module: sys::CUmodule, name: &str) -> Result<(sys::CUfunction, u32)> {
    let f = function(module, name)?;
    let var = format!("{name}_smem");
    // SAFETY: module loaded; the symbol is a u32 the source defines.
    let (ptr, bytes) =
        unsafe { result::module::get_global(module, CString::new(var.as_str()).unwrap()) }.map_err(err("cuModuleGetGlobal"))?;
    if bytes != 4 {
        return Err(Error::Cuda(format!("{var} is {bytes} bytes, not a u32")));
    }
    let mut v = [0u32];
    // SAFETY: 4 bytes of device memory, context current.
    unsafe { result::memcpy_dtoh_sync(&mut v, ptr) }.map_err(err("cuMemcpyDtoH"))?;
    if v[0] > 0 {
        // SAFETY: a function of this module.
        unsafe {
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v[0] as i32,
            )
        }
        .map_err(err("cuFuncSetAttribute"))?;
    }
    Ok((f, v[0]))
}

/// Blocks of the row-move kernels (`sy_gather_rows`, `sy_sum_rows`): a warp per row,
/// enough blocks to cover `rows`, at most a few per SM's worth.
fn row_grid(rows: usize) -> (u32, u32) {
    const BLOCK: u32 = 256;
    let blocks = rows.div_ceil((BLOCK / 32) as usize).clamp(1, 1024);
    (blocks as u32, BLOCK)
}

impl Kernels {
    /// Launch one of the row-move kernels, whose parameters are all 64-bit, with a warp
    /// per row over `rows` rows; no rows, no launch.
    fn launch_rows(&self, f: sys::CUfunction, name: &str, rows: usize, mut params: Vec<u64>, stream: &Stream) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let mut args: Vec<*mut c_void> = params.iter_mut().map(|p| p as *mut u64 as *mut c_void).collect();
        let (grid, block) = row_grid(rows);
        // SAFETY: every caller passes exactly the kernel's (all-u64) parameters; the caller
        // guarantees the ranges; the driver copies the values before returning.
        unsafe { result::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, stream.raw, &mut args) }
            .map_err(|e| Error::Cuda(format!("cuLaunchKernel({name}): {e:?}")))
    }

    /// Enqueue `sy_gather_rows`: row `to[i]` of `dst` = row `from[i]` of `src`, for `i < n`
    /// (`to`, `from`: device `i32` index arrays, 0 for the identity), rows of `row_bytes`
    /// (a multiple of 4) bytes.
    pub fn gather_rows(
        &self,
        [dst, to]: [u64; 2],
        [src, from]: [u64; 2],
        n: usize,
        row_bytes: usize,
        stream: &Stream,
    ) -> Result<()> {
        assert!(row_bytes % 4 == 0, "rows of whole words");
        self.launch_rows(self.gather_rows, "sy_gather_rows", n, vec![dst, to, src, from, n as u64, row_bytes as u64], stream)
    }

    /// Enqueue `sy_gather_quantize`: BF16 row `from[i]` of `src` (`hidden` a multiple of 128)
    /// as E4M3 row `i` of `dst` with its 1x128 scales as row `i` of `dst_scales`, for `i < n`.
    pub fn gather_quantize(
        &self,
        [dst, dst_scales]: [u64; 2],
        [src, from]: [u64; 2],
        n: usize,
        hidden: usize,
        stream: &Stream,
    ) -> Result<()> {
        assert!(hidden % 128 == 0, "whole 1x128 groups");
        let params = vec![dst, dst_scales, src, from, n as u64, hidden as u64];
        self.launch_rows(self.gather_quantize, "sy_gather_quantize", n, params, stream)
    }

    /// Enqueue `sy_sum_rows` (`weights` false: BF16 row `t` of `out`, `t < n_tokens`, `width`
    /// = hidden, a multiple of 8) or `sy_sum_weights` (`weights` true: `width` f32 per row):
    /// the f32 sum of the rows `src[t * n_src + j]` (device `i32`s, -1: none), a source
    /// `s < split` being row `s` of `a`, others row `s - split` of `b`.
    #[allow(clippy::too_many_arguments)]
    pub fn sum_rows(
        &self,
        weights: bool,
        out: u64,
        [a, b]: [u64; 2],
        src: u64,
        split: usize,
        n_tokens: usize,
        n_src: usize,
        width: usize,
        stream: &Stream,
    ) -> Result<()> {
        assert!(weights || width % 8 == 0, "whole 16-byte pieces of BF16 rows");
        if width == 0 {
            return Ok(());
        }
        let params = vec![out, a, b, src, split as u64, n_tokens as u64, n_src as u64, width as u64];
        // Rows: a warp per token; weights: a thread per (token, slot), so a "row" of 32 of them.
        match weights {
            false => self.launch_rows(self.sum_rows, "sy_sum_rows", n_tokens, params, stream),
            true => self.launch_rows(self.sum_weights, "sy_sum_weights", (n_tokens * width).div_ceil(32), params, stream),
        }
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // SAFETY: loaded in load().
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

/// Work captured from a stream into a CUDA graph and instantiated: replaying it
/// launches the same kernels and copies with the same parameters, with no host work.
pub struct CapturedGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// SAFETY: graph handles may be used from any thread with their context current.
unsafe impl Send for CapturedGraph {}

impl CapturedGraph {
    /// Start capturing `stream`: what is enqueued on it (and on streams that join it
    /// through events) is recorded, not run, until [`CapturedGraph::end_capture`].
    /// Thread-local capture mode, so other threads of this process (other ranks) may
    /// use CUDA meanwhile.
    pub fn begin_capture(stream: &Stream) -> Result<()> {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: valid stream.
        unsafe { result::stream::begin_capture(stream.raw, mode) }.map_err(err("cuStreamBeginCapture"))
    }

    /// End the capture of `stream` begun by [`CapturedGraph::begin_capture`] and
    /// instantiate it; `enqueued` is how the enqueueing went (its error wins).
    pub fn end_capture(stream: &Stream, enqueued: Result<()>) -> Result<Self> {
        // Capture must end whatever happened, or the stream stays in capture mode.
        // SAFETY: the stream is capturing.
        let graph = unsafe { result::stream::end_capture(stream.raw) }.map_err(err("cuStreamEndCapture"));
        let graph = match (enqueued, graph) {
            (Ok(()), Ok(g)) => g,
            (Ok(()), Err(e)) => return Err(e),
            (Err(e), g) => {
                if let Ok(g) = g {
                    // SAFETY: a graph from end_capture, not instantiated.
                    unsafe {
                        let _ = result::graph::destroy(g);
                    }
                }
                return Err(e);
            }
        };
        // SAFETY: a complete captured graph.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Self { graph, exec }),
            Err(e) => {
                // SAFETY: as above.
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                Err(err("cuGraphInstantiate")(e))
            }
        }
    }

    /// Enqueue one replay on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<()> {
        // SAFETY: instantiated graph, valid stream.
        unsafe { result::graph::launch(self.exec, stream.raw) }.map_err(err("cuGraphLaunch"))
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // SAFETY: made in capture(); the caller binds the context.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// Copy host bytes to device address `dst` and wait.
pub fn htod<T: Copy>(dst: u64, src: &[T], stream: &Stream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: caller guarantees dst has room; we sync before src can move.
    unsafe { result::memcpy_htod_async(dst, src, stream.raw) }.map_err(err("cuMemcpyHtoDAsync"))?;
    stream.sync()
}

/// Copy device bytes at `src` into `dst` and wait.
pub fn dtoh<T: Copy>(dst: &mut [T], src: u64, stream: &Stream) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: caller guarantees src holds dst.len() elements; we sync before returning.
    unsafe { result::memcpy_dtoh_async(dst, src, stream.raw) }.map_err(err("cuMemcpyDtoHAsync"))?;
    stream.sync()
}
