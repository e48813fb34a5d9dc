//! The NCCL baseline in the same process: one grouped `ncclSend`/`ncclRecv` to and
//! from every rank (itself included, as an all-to-all does) that moves the bytes a
//! cached dispatch or a combine moves, timed with events on a stream of its own.

use cudarc::nccl::{result, sys};

use super::driver::{DeviceBuffer, EventPairs, Stream};
use crate::error::{Error, Result};

/// Whether libnccl loads (cudarc panics on use when it does not).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the library.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

fn err(what: &'static str) -> impl FnOnce(result::NcclError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// A fresh NCCL unique id (rank 0 makes it and sends it to the others).
pub fn unique_id() -> Result<[u8; 128]> {
    let id = result::get_uniqueid().map_err(err("ncclGetUniqueId"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator, its stream and its buffers.
pub struct NcclExchange {
    comm: sys::ncclComm_t,
    stream: Stream,
    world: usize,
    send: Option<DeviceBuffer>,
    recv: Option<DeviceBuffer>,
}

// SAFETY: used by one thread at a time (its rank's), with the context current.
unsafe impl Send for NcclExchange {}

impl NcclExchange {
    /// Join the communicator `id` as `rank` of `world` (collective; the GPU's context current).
    pub fn new(rank: usize, world: usize, id: &[u8; 128]) -> Result<Self> {
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank calls with the same id.
        unsafe { result::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }.map_err(err("ncclCommInitRank"))?;
        Ok(Self { comm, stream: Stream::new()?, world, send: None, recv: None })
    }

    fn buffer(slot: &mut Option<DeviceBuffer>, bytes: usize) -> Result<u64> {
        if slot.as_ref().map_or(true, |b| b.len() < bytes) {
            *slot = None;
            *slot = Some(DeviceBuffer::new(bytes)?);
        }
        Ok(slot.as_ref().expect("allocated").ptr())
    }

    /// Time `iters` grouped exchanges (after 2 untimed ones) that send `send_bytes[d]` to
    /// each rank `d` and receive `recv_bytes[s]` from each rank `s`; seconds per exchange.
    pub fn time(&mut self, send_bytes: &[usize], recv_bytes: &[usize], iters: usize) -> Result<Vec<f64>> {
        assert_eq!((send_bytes.len(), recv_bytes.len()), (self.world, self.world));
        let send = Self::buffer(&mut self.send, send_bytes.iter().sum())?;
        let recv = Self::buffer(&mut self.recv, recv_bytes.iter().sum())?;
        let stream = self.stream.raw() as sys::cudaStream_t;
        let exchange = || -> Result<()> {
            result::group_start().map_err(err("ncclGroupStart"))?;
            let (mut so, mut ro) = (0usize, 0usize);
            for peer in 0..self.world {
                // SAFETY: the ranges lie in the buffers sized above; the stream and comm are valid.
                unsafe {
                    if send_bytes[peer] > 0 {
                        result::send(
                            (send + so as u64) as *const _,
                            send_bytes[peer],
                            sys::ncclDataType_t::ncclUint8,
                            peer as i32,
                            self.comm,
                            stream,
                        )
                        .map_err(err("ncclSend"))?;
                    }
                    if recv_bytes[peer] > 0 {
                        result::recv(
                            (recv + ro as u64) as *mut _,
                            recv_bytes[peer],
                            sys::ncclDataType_t::ncclUint8,
                            peer as i32,
                            self.comm,
                            stream,
                        )
                        .map_err(err("ncclRecv"))?;
                    }
                }
                so += send_bytes[peer];
                ro += recv_bytes[peer];
            }
            result::group_end().map_err(err("ncclGroupEnd")).map(|_| ())
        };
        exchange()?;
        exchange()?;
        let events = EventPairs::new(iters)?;
        for (a, b) in events.iter() {
            a.record(&self.stream)?;
            exchange()?;
            b.record(&self.stream)?;
        }
        self.stream.sync()?;
        events.seconds()
    }
}

impl Drop for NcclExchange {
    fn drop(&mut self) {
        // SAFETY: created in new(), destroyed once, after its stream's work (the last call synced).
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}
