//! A cuBLAS BF16 GEMM on a stream of its own: the expert computation that
//! dispatch and combine run beside in a MoE layer, for the interference bench
//! ([`crate::backend::Communicator::measure_interference`]).

use cudarc::cublas::{result, sys};

use super::driver::{DeviceBuffer, Stream};
use crate::error::{Error, Result};

/// `C[m, n] = A[m, k] x B[k, n]` in BF16 with f32 accumulation, column-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GemmShape {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// The shared dimension.
    pub k: usize,
}

impl GemmShape {
    /// Floating-point operations of one GEMM.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Whether libcublas loads (cudarc panics on use when it does not).
pub fn cublas_available() -> bool {
    // SAFETY: only tries to open the library.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// A cuBLAS handle bound to its own stream, with its operands, in the current context.
pub struct Gemm {
    handle: sys::cublasHandle_t,
    stream: Stream,
    shape: GemmShape,
    a: DeviceBuffer,
    b: DeviceBuffer,
    c: DeviceBuffer,
}

// SAFETY: the handle is used by one thread at a time (the owner's), with its context current.
unsafe impl Send for Gemm {}

fn err(what: &'static str) -> impl FnOnce(result::CublasError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

impl Gemm {
    /// Operands of `shape` (A and B filled with 1.0), a stream and a handle on it.
    pub fn new(shape: GemmShape) -> Result<Self> {
        if !cublas_available() {
            return Err(Error::BackendUnavailable { backend: "cuda", reason: "libcublas not found (LD_LIBRARY_PATH)".into() });
        }
        let stream = Stream::new()?;
        let (a, b, c) = (
            DeviceBuffer::new(shape.m * shape.k * 2)?,
            DeviceBuffer::new(shape.k * shape.n * 2)?,
            DeviceBuffer::new(shape.m * shape.n * 2)?,
        );
        // BF16 1.0: the values do not change the work, and finite ones keep the sums finite.
        a.fill_u16(0x3F80)?;
        b.fill_u16(0x3F80)?;
        let handle = result::create_handle().map_err(err("cublasCreate"))?;
        // SAFETY: valid handle and stream of the current context (the driver and runtime stream types are the same handle).
        unsafe { result::set_stream(handle, stream.raw() as sys::cudaStream_t) }.map_err(err("cublasSetStream"))?;
        Ok(Self { handle, stream, shape, a, b, c })
    }

    /// The stream the GEMMs run on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Let the GEMMs use at most `sms` SMs (`0`: all), as a MoE layer leaves the
    /// communication its SMs (`cublasSetSmCountTarget`).
    pub fn set_sm_target(&self, sms: usize) -> Result<()> {
        let n = i32::try_from(sms).map_err(|_| Error::InvalidArgument { arg: "sms".into(), reason: format!("{sms}") })?;
        // SAFETY: valid handle.
        unsafe { sys::cublasSetSmCountTarget(self.handle, n) }.result().map_err(err("cublasSetSmCountTarget"))
    }

    /// Enqueue one GEMM.
    pub fn enqueue(&self) -> Result<()> {
        let s = self.shape;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dim =
            |v: usize| i32::try_from(v).map_err(|_| Error::InvalidArgument { arg: "gemm".into(), reason: format!("{v} > i32") });
        let (m, n, k) = (dim(s.m)?, dim(s.n)?, dim(s.k)?);
        // SAFETY: the operands hold m*k, k*n and m*n BF16 values; alpha and beta are host scalars.
        unsafe {
            result::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                self.a.ptr() as *const std::ffi::c_void,
                sys::cudaDataType::CUDA_R_16BF,
                m,
                self.b.ptr() as *const std::ffi::c_void,
                sys::cudaDataType::CUDA_R_16BF,
                k,
                (&beta as *const f32).cast(),
                self.c.ptr() as *mut std::ffi::c_void,
                sys::cudaDataType::CUDA_R_16BF,
                m,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err("cublasGemmEx"))
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: created in new(), destroyed once; its stream outlives this call.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
