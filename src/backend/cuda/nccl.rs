//! NCCL in the same process: grouped `ncclSend`/`ncclRecv` on a stream of its own.
//! The same-run baseline sends to and receives from every rank (itself included, as
//! an all-to-all does) the bytes a cached dispatch or a combine moves, timed with
//! events; the inter-node rail moves the hierarchical route's parts between rail peers.

use std::time::{Duration, Instant};

use cudarc::nccl::{result, sys};

use super::driver::{dtoh, htod, DeviceBuffer, EventPairs, Stream};
use crate::backend::gather_outcomes_by;
use crate::backend::hier::{Rail, RailPlace};
use crate::bootstrap::ProcessGroup;
use crate::error::{Error, Result, Role, WaitDiagnostic};

/// Whether libnccl loads (cudarc panics on use when it does not).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the library.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

fn err(what: &'static str) -> impl FnOnce(result::NcclError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// NCCL's variable for the host identity it groups ranks by (read once per process).
pub const HOST_ID_ENV: &str = "NCCL_HOSTID";

/// Where nodes are emulated on one host (several nodes share a host name), give this
/// process a host identity of its own for NCCL, unless `NCCL_HOSTID` is set: NCCL then
/// takes its rail peers for other hosts and carries the rail over its network
/// transport (sockets, or IB), as between real nodes. Without it NCCL refuses two
/// ranks on one GPU (rail peers of emulated nodes that share a GPU) and would move
/// the others over NVLink. NCCL reads the identity once, at its first use in the
/// process, so this must run before any NCCL call; one identity per process (not per
/// node) keeps it right for every layout the process joins later.
pub fn emulate_hosts_if_needed(hostnames: &[String], rank: usize, ranks_per_node: usize) {
    if std::env::var_os(HOST_ID_ENV).is_some() {
        return;
    }
    let Some(id) = emulated_host_id(hostnames, rank, ranks_per_node, std::process::id()) else { return };
    tracing::info!(rank, host_id = %id, "nodes emulated on one host: NCCL sees each process as a host of its own");
    // Before any NCCL call of this process (see above); no other thread reads it now.
    std::env::set_var(HOST_ID_ENV, id);
}

/// The NCCL host identity of process `pid` (rank `rank`) when some nodes of blocks of
/// `ranks_per_node` ranks share a host name; `None` when every node has a host of its own.
fn emulated_host_id(hostnames: &[String], rank: usize, ranks_per_node: usize, pid: u32) -> Option<String> {
    let rpn = ranks_per_node.max(1);
    let node_host = |n: usize| &hostnames[n * rpn];
    let nodes = hostnames.len() / rpn;
    let shared = (0..nodes).any(|a| (0..a).any(|b| node_host(a) == node_host(b)));
    shared.then(|| format!("{}-switchyard-process-{pid}-{rank}", hostnames[rank]))
}

/// This rank's end of its rail: a NCCL communicator over the ranks with its local index,
/// one per node, ranked by node. The rank on node 0 makes the id; every rank says first
/// whether it can go on, so none waits in NCCL for one that cannot. Needs this GPU's
/// context current. Collective over the whole group.
pub fn join_rail(place: RailPlace, world: &mut dyn ProcessGroup, timeout: Duration) -> Result<NcclExchange> {
    let (rank, local, topo) = (place.rank, place.local(), place.topology);
    let id = if !nccl_available() {
        Err(Error::BackendUnavailable { backend: "cuda", reason: "libnccl not found (SWITCHYARD_RAIL=host avoids NCCL)".into() })
    } else if place.node() == 0 {
        unique_id().map(|i| i.to_vec())
    } else {
        Ok(Vec::new())
    };
    let mine = id.as_ref().map_err(|e| e.to_string());
    let all = gather_outcomes_by::<Vec<u8>>(rank, |b| world.all_gather(b, timeout), mine)?;
    id?;
    let all = all.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
    let id: [u8; 128] = all[topo.rank_of(0, local)]
        .as_slice()
        .try_into()
        .map_err(|_| Error::Protocol { rank, detail: format!("rail {local} got no NCCL id from node 0") })?;
    NcclExchange::new(place.node(), topo.num_nodes, &id)
}

/// A fresh NCCL unique id (rank 0 makes it and sends it to the others).
pub fn unique_id() -> Result<[u8; 128]> {
    let id = result::get_uniqueid().map_err(err("ncclGetUniqueId"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator, its stream and its buffers. Serves the same-run
/// baseline (a communicator over the node's ranks) and, as a [`Rail`], the inter-node
/// hop (a communicator over one rail: the ranks with one local index, one per node).
pub struct NcclExchange {
    comm: sys::ncclComm_t,
    stream: Stream,
    rank: usize,
    world: usize,
    send: Option<DeviceBuffer>,
    recv: Option<DeviceBuffer>,
    /// Device seconds of the last rail transfer's rows.
    last_transfer: Option<f64>,
    /// Set when a wait passed its deadline: the communicator was aborted.
    aborted: bool,
}

// SAFETY: used by one thread at a time (its rank's), with the context current.
unsafe impl Send for NcclExchange {}

impl NcclExchange {
    /// Join the communicator `id` as `rank` of `world` (collective; the GPU's context current),
    /// then connect to every peer with a first small exchange. NCCL connects peers lazily, in
    /// the group end of the first transfer to each, and that blocks until the peer takes part:
    /// done here, while every rank is joining anyway, no later transfer blocks on the host, so
    /// their deadlines ([`Rail::exchange`]) cover all of their waiting.
    pub fn new(rank: usize, world: usize, id: &[u8; 128]) -> Result<Self> {
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank calls with the same id.
        unsafe { result::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }.map_err(err("ncclCommInitRank"))?;
        let mut rail =
            Self { comm, stream: Stream::new()?, rank, world, send: None, recv: None, last_transfer: None, aborted: false };
        let words = rail.word_to_every_peer();
        let send = Self::buffer(&mut rail.send, 8 * world)?;
        let recv = Self::buffer(&mut rail.recv, 8 * world)?;
        rail.enqueue(send, &words, recv, &words)?;
        rail.wait(CONNECT_TIMEOUT, "first exchange (connecting the peers)")?;
        Ok(rail)
    }

    /// Bytes per rank of a transfer that moves one 8-byte word to every peer but this rank.
    fn word_to_every_peer(&self) -> Vec<usize> {
        (0..self.world).map(|p| if p == self.rank { 0 } else { 8 }).collect()
    }

    fn buffer(slot: &mut Option<DeviceBuffer>, bytes: usize) -> Result<u64> {
        if slot.as_ref().map_or(true, |b| b.len() < bytes) {
            *slot = None;
            *slot = Some(DeviceBuffer::new(bytes.next_power_of_two())?);
        }
        Ok(slot.as_ref().expect("allocated").ptr())
    }

    /// Enqueue one grouped transfer: `send_bytes[d]` bytes from `send` (peers' parts one
    /// after another) to each rank `d`, `recv_bytes[s]` bytes from each rank `s` into `recv`.
    fn enqueue(&self, send: u64, send_bytes: &[usize], recv: u64, recv_bytes: &[usize]) -> Result<()> {
        let parts = |base: u64, bytes: &[usize]| -> Vec<Piece> {
            let mut at = base;
            bytes
                .iter()
                .enumerate()
                .map(|(peer, &n)| {
                    at += n as u64;
                    Piece { peer, ptr: at - n as u64, bytes: n }
                })
                .collect()
        };
        self.enqueue_pieces(&parts(send, send_bytes), &parts(recv, recv_bytes), &self.stream)
    }

    /// Enqueue one grouped transfer of `sends` and `recvs` (empty pieces skipped) on
    /// `stream`. The caller keeps the ranges valid until the stream passes it.
    pub fn enqueue_pieces(&self, sends: &[Piece], recvs: &[Piece], stream: &Stream) -> Result<()> {
        self.usable()?;
        let stream = stream.raw() as sys::cudaStream_t;
        result::group_start().map_err(err("ncclGroupStart"))?;
        let u8s = sys::ncclDataType_t::ncclUint8;
        for p in sends.iter().filter(|p| p.bytes > 0) {
            // SAFETY: the caller guarantees the range; the stream and comm are valid.
            unsafe { result::send(p.ptr as *const _, p.bytes, u8s, p.peer as i32, self.comm, stream) }
                .map_err(err("ncclSend"))?;
        }
        for p in recvs.iter().filter(|p| p.bytes > 0) {
            // SAFETY: as above.
            unsafe { result::recv(p.ptr as *mut _, p.bytes, u8s, p.peer as i32, self.comm, stream) }.map_err(err("ncclRecv"))?;
        }
        result::group_end().map_err(err("ncclGroupEnd")).map(|_| ())
    }

    /// After a wait on another stream passed its deadline: abort the communicator (its
    /// peers' transfers then fail or time out too); every later use fails.
    pub fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is valid; after the abort it is not used again.
            unsafe {
                let _ = result::comm_abort(self.comm);
            }
        }
    }

    /// Wait for the stream until `timeout`; past it, abort the communicator (its peers'
    /// transfers then fail or time out too) and report what was waited for.
    fn wait(&mut self, timeout: Duration, what: &str) -> Result<()> {
        if self.stream.sync_until(Instant::now() + timeout)? {
            return Ok(());
        }
        self.abort();
        Err(Error::Timeout {
            timeout_ms: timeout.as_millis() as u64,
            diag: WaitDiagnostic {
                rank: self.rank,
                channel: 0,
                role: Role::Sender,
                head: 0,
                tail: 0,
                detail: format!("NCCL {what} with the other {} ranks of the communicator", self.world - 1),
            },
        })
    }

    /// This rank in the communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn usable(&self) -> Result<()> {
        match self.aborted {
            true => Err(Error::Cuda("the NCCL communicator was aborted after a timeout".into())),
            false => Ok(()),
        }
    }

    /// Time `iters` grouped exchanges (after 2 untimed ones) that send `send_bytes[d]` to
    /// each rank `d` and receive `recv_bytes[s]` from each rank `s`; seconds per exchange.
    pub fn time(&mut self, send_bytes: &[usize], recv_bytes: &[usize], iters: usize) -> Result<Vec<f64>> {
        assert_eq!((send_bytes.len(), recv_bytes.len()), (self.world, self.world));
        self.usable()?;
        let send = Self::buffer(&mut self.send, send_bytes.iter().sum())?;
        let recv = Self::buffer(&mut self.recv, recv_bytes.iter().sum())?;
        self.enqueue(send, send_bytes, recv, recv_bytes)?;
        self.enqueue(send, send_bytes, recv, recv_bytes)?;
        let events = EventPairs::new(iters)?;
        for (a, b) in events.iter() {
            a.record(&self.stream)?;
            self.enqueue(send, send_bytes, recv, recv_bytes)?;
            b.record(&self.stream)?;
        }
        self.wait(RAW_TIMEOUT, "baseline exchange")?;
        events.seconds()
    }
}

/// Part of a grouped transfer: `bytes` at device address `ptr`, to or from rail rank `peer`.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    /// The peer's rank in the communicator.
    pub peer: usize,
    /// Device address.
    pub ptr: u64,
    /// Length.
    pub bytes: usize,
}

/// How long the first exchange, which connects the peers, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the baseline's timed loop may take.
const RAW_TIMEOUT: Duration = Duration::from_secs(120);

impl Rail for NcclExchange {
    fn name(&self) -> &'static str {
        "nccl"
    }

    /// Counts first (8 bytes to each peer), then the parts, both through NCCL; the parts
    /// are staged through device buffers (uploaded before, downloaded after).
    fn exchange(&mut self, _world: &mut dyn ProcessGroup, parts: Vec<Vec<u8>>, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        assert_eq!(parts.len(), self.world, "one part per node");
        self.usable()?;
        self.last_transfer = None;
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        // Every peer but this rank gets 8 bytes of count.
        let words = self.word_to_every_peer();
        let counts: Vec<u64> = parts.iter().enumerate().filter(|(p, _)| *p != self.rank).map(|(_, b)| b.len() as u64).collect();
        let count_bytes = 8 * self.world;
        let send = Self::buffer(&mut self.send, count_bytes)?;
        let recv = Self::buffer(&mut self.recv, count_bytes)?;
        htod(send, &counts, &self.stream)?;
        self.enqueue(send, &words, recv, &words)?;
        self.wait(left(), "count exchange")?;
        let mut got = vec![0u64; self.world - 1];
        dtoh(&mut got, recv, &self.stream)?;
        let mut recv_bytes: Vec<usize> = got.iter().map(|&c| c as usize).collect();
        recv_bytes.insert(self.rank, 0);
        let send_bytes: Vec<usize> = parts.iter().map(Vec::len).collect();

        let send = Self::buffer(&mut self.send, send_bytes.iter().sum())?;
        let recv = Self::buffer(&mut self.recv, recv_bytes.iter().sum())?;
        htod(send, &parts.concat(), &self.stream)?;
        let events = EventPairs::new(1)?;
        let (a, b) = events.iter().next().expect("one pair");
        a.record(&self.stream)?;
        self.enqueue(send, &send_bytes, recv, &recv_bytes)?;
        b.record(&self.stream)?;
        self.wait(left(), "rail transfer")?;
        self.last_transfer = events.seconds()?.first().copied();
        let mut all = vec![0u8; recv_bytes.iter().sum()];
        dtoh(&mut all, recv, &self.stream)?;
        let mut at = 0;
        Ok(recv_bytes
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn last_transfer_seconds(&self) -> Option<f64> {
        self.last_transfer
    }

    fn time_raw(&mut self, send_bytes: &[usize], recv_bytes: &[usize], iters: usize) -> Option<Result<Vec<f64>>> {
        Some(self.time(send_bytes, recv_bytes, iters))
    }
}

impl Drop for NcclExchange {
    fn drop(&mut self) {
        if self.aborted {
            return;
        }
        // SAFETY: created in new(), destroyed once, after its stream's work (every call waited).
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_that_share_a_host_get_host_identities() {
        let hosts = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Two real nodes of two ranks: NCCL's own identity stays.
        assert_eq!(emulated_host_id(&hosts(&["a", "a", "b", "b"]), 2, 2, 7), None);
        // Two nodes emulated on one host: one identity per process, distinct across ranks.
        let one = hosts(&["a", "a", "a", "a"]);
        let ids: Vec<_> = (0..4).map(|r| emulated_host_id(&one, r, 2, 7).unwrap()).collect();
        assert!(ids.iter().enumerate().all(|(i, x)| ids[..i].iter().all(|y| y != x)), "{ids:?}");
        // One node on a host: nothing is emulated.
        assert_eq!(emulated_host_id(&one, 1, 4, 7), None);
    }
}
