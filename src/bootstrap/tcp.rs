//! All-gather, all-to-all, barrier and broadcast of bytes for ranks that are separate
//! processes, over a TCP star: rank 0 listens, the others connect to it, every
//! collective goes through rank 0. Blocking `std::net` with a total deadline on
//! every call; no async runtime. Rank 0 waits on all its peers at once with
//! `poll(2)` (so this module is Unix-only), which lets it see a dead rank as soon as
//! its connection closes and count who arrived when it times out.
//!
//! Failure model: the first failure breaks the group for good. Rank 0 blames a rank
//! (one whose connection closed, or that was missing at the deadline, or that broke
//! the protocol) and sends every peer an error frame naming it, so they fail with
//! `PeerFailed { rank: blamed }` instead of waiting for their own deadline.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::env::LaunchEnv;
use super::wire::{
    accept_by, connect_by, hello_payload, hostname, notify, pack_parts, read_frame, read_hello, unpack_parts, wait_readable,
    write_frame, Frame, Kind, VERSION,
};
use crate::error::{Error, Result, Role, WaitDiagnostic};

/// A connection that has not said hello by then is not one of ours; stop waiting on it.
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// A group of processes joined through rank 0 over TCP: control-plane exchanges
/// (buffer handles, counts, host names) and, for the CPU backend without MPI, its
/// data (relayed by rank 0).
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    world: usize,
    hostnames: Vec<String>,
    /// Rank 0: rank `r`'s connection at `r - 1`. Other ranks: the connection to rank 0.
    links: Vec<TcpStream>,
    /// Blamed rank and reason of the failure that broke the group.
    broken: Option<(usize, String)>,
    /// Collectives begun, for the logs and diagnostics.
    calls: u64,
}

impl TcpGroup {
    /// Form the group described by a launcher's environment: rank 0 binds
    /// `master_addr:master_port` and waits for the others; they connect to it, retrying
    /// until rank 0 listens. `timeout` bounds the whole rendezvous.
    pub fn from_env(env: &LaunchEnv, timeout: Duration) -> Result<Self> {
        let endpoint = env.master_endpoint();
        if env.rank == 0 {
            let listener =
                TcpListener::bind(&endpoint).map_err(|source| Error::Io { path: format!("tcp://{endpoint}").into(), source })?;
            Self::root(listener, env.world_size, timeout)
        } else {
            Self::join(&endpoint, env.rank, env.world_size, timeout)
        }
    }

    /// Rank 0 of a group of `world_size` ranks, on a listener the caller bound (port 0 is
    /// fine: pass `listener.local_addr()` to the others). Returns once every rank has
    /// joined, or fails after `timeout` with a diagnostic counting the ranks that arrived.
    pub fn root(listener: TcpListener, world_size: usize, timeout: Duration) -> Result<Self> {
        if world_size == 0 {
            return Err(Error::InvalidArgument { arg: "world_size".into(), reason: "a group has at least one rank".into() });
        }
        let deadline = Instant::now() + timeout;
        let me = hostname().map_err(|source| Error::Io { path: "gethostname".into(), source })?;
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let mut slots: Vec<Option<(TcpStream, String)>> = (0..world_size).map(|_| None).collect();
        let mut arrived = 1;
        while arrived < world_size {
            let (mut stream, from) = match accept_by(&listener, deadline) {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    let missing: Vec<usize> = (1..world_size).filter(|&r| slots[r].is_none()).collect();
                    let detail =
                        format!("rendezvous on {at}: {arrived} of {world_size} ranks arrived; missing ranks {missing:?}");
                    notify(slots.iter_mut().flatten().map(|(s, _)| s), missing[0], &format!("rank 0 timed out: {detail}"));
                    return Err(timeout_error(0, world_size, timeout, arrived, detail));
                }
                Err(source) => return Err(Error::Io { path: format!("tcp://{at}").into(), source }),
            };
            let hello = match read_hello(&mut stream, deadline.min(Instant::now() + HELLO_WAIT)) {
                Ok(hello) => hello,
                // Not one of ours (a port scanner, a health check): it must not break the group.
                Err(e) => {
                    warn!("tcp bootstrap: ignoring a connection from {from}: {e}");
                    continue;
                }
            };
            let problem = if hello.version != VERSION {
                Some(format!("rank {} speaks bootstrap version {}, rank 0 speaks {VERSION}", hello.rank, hello.version))
            } else if hello.world != world_size {
                Some(format!("rank {} was started with world size {}, rank 0 with {world_size}", hello.rank, hello.world))
            } else if hello.rank == 0 || hello.rank >= world_size {
                Some(format!("a process at {from} claims rank {} in a group of {world_size}", hello.rank))
            } else if slots[hello.rank].is_some() {
                Some(format!("rank {} joined twice (again from {from})", hello.rank))
            } else {
                None
            };
            if let Some(detail) = problem {
                let others = slots.iter_mut().flatten().map(|(s, _)| s);
                notify(others.chain(std::iter::once(&mut stream)), hello.rank, &format!("rank 0 rejected the group: {detail}"));
                return Err(Error::Protocol { rank: 0, detail });
            }
            slots[hello.rank] = Some((stream, hello.host));
            arrived += 1;
        }

        let (links, mut hostnames): (Vec<TcpStream>, Vec<String>) = slots.into_iter().skip(1).flatten().unzip();
        hostnames.insert(0, me);
        let mut group = Self { rank: 0, world: world_size, hostnames, links, broken: None, calls: 0 };
        let welcome = serde_json::to_vec(&group.hostnames).map_err(|e| Error::Protocol { rank: 0, detail: e.to_string() })?;
        for r in 1..world_size {
            if let Err(e) = write_frame(&mut group.links[r - 1], Kind::Welcome, 0, &welcome, deadline) {
                let err = group.link_error(r, "rendezvous (welcome)", e, timeout, world_size);
                return Err(group.fail(r, err));
            }
        }
        info!(world = world_size, listen = %at, hosts = ?group.hostnames, "tcp bootstrap: group formed (rank 0)");
        Ok(group)
    }

    /// Rank `rank` (not 0) of a group of `world_size`: connect to rank 0 at `master`
    /// (`host:port`), retrying until it listens, and wait until every rank has joined.
    /// `timeout` bounds the whole rendezvous.
    pub fn join(master: &str, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        if rank == 0 || rank >= world_size {
            let reason = format!("{rank}: must be in 1..{world_size} (rank 0 creates the group with `TcpGroup::root`)");
            return Err(Error::InvalidArgument { arg: "rank".into(), reason });
        }
        let deadline = Instant::now() + timeout;
        let me = hostname().map_err(|source| Error::Io { path: "gethostname".into(), source })?;
        let stream = connect_by(master, deadline).map_err(|last| {
            let detail = format!("rendezvous: rank {rank} could not reach rank 0 at {master} (last error: {last})");
            timeout_error(rank, world_size, timeout, 0, detail)
        })?;
        let mut group = Self { rank, world: world_size, hostnames: Vec::new(), links: vec![stream], broken: None, calls: 0 };

        let hello = hello_payload(world_size, &me);
        let welcome = write_frame(&mut group.links[0], Kind::Hello, rank, &hello, deadline)
            .and_then(|()| read_frame(&mut group.links[0], deadline, u64::MAX));
        let frame = match welcome {
            Ok(frame) => frame,
            Err(e) => {
                let err = group.link_error(0, "rendezvous (waiting for the other ranks)", e, timeout, 0);
                return Err(group.fail(0, err));
            }
        };
        let frame = group.expect(frame, Kind::Welcome, 0)?;
        match serde_json::from_slice::<Vec<String>>(&frame.payload) {
            Ok(names) if names.len() == world_size => group.hostnames = names,
            _ => {
                let err = group.protocol(format!("rank 0's welcome does not list {world_size} host names"));
                return Err(group.fail(0, err));
            }
        }
        info!(rank, world = world_size, master, hosts = ?group.hostnames, "tcp bootstrap: group formed");
        Ok(group)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Every rank's host name (`gethostname`), in rank order, gathered when the group formed.
    pub fn hostnames(&self) -> &[String] {
        &self.hostnames
    }

    /// Every rank's `bytes`, in rank order (lengths may differ, empty is fine).
    pub fn all_gather(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.exchange(Kind::Gather, bytes, timeout)
    }

    /// Return once every rank has called `barrier`.
    pub fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.exchange(Kind::Barrier, &[], timeout).map(drop)
    }

    /// Personalized exchange: `parts[r]` goes to rank `r`; returns the part every rank
    /// addressed to this one, in source-rank order. Every part passes through rank 0
    /// (a star, not a mesh): right for the CPU backend's reference runs, not fast.
    pub fn all_to_all(&mut self, parts: &[Vec<u8>], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        if parts.len() != self.world {
            let reason = format!("{} parts for a group of {}", parts.len(), self.world);
            return Err(Error::InvalidArgument { arg: "parts".into(), reason });
        }
        self.exchange(Kind::AllToAll, &pack_parts(parts), timeout)
    }

    /// Rank 0's bytes on every rank. Rank 0 passes `Some(bytes)`, every other rank `None`;
    /// passing the wrong one is an `InvalidArgument` here, before anything is sent (the
    /// other ranks then time out unless the caller stops them).
    pub fn broadcast(&mut self, root_bytes: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
        if root_bytes.is_some() != (self.rank == 0) {
            let reason = format!("rank 0 is the root and passes Some(bytes); rank {} passed the other", self.rank);
            return Err(Error::InvalidArgument { arg: "root_bytes".into(), reason });
        }
        let mut got = self.exchange(Kind::Broadcast, root_bytes.unwrap_or(&[]), timeout)?;
        Ok(got.pop().unwrap_or_default())
    }

    /// One collective: every rank sends `payload` to rank 0, which answers with all parts
    /// (gather), an empty release (barrier) or its own payload (broadcast).
    fn exchange(&mut self, kind: Kind, payload: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        if let Some((rank, reason)) = &self.broken {
            return Err(Error::PeerFailed { rank: *rank, reason: reason.clone() });
        }
        self.calls += 1;
        let deadline = Instant::now() + timeout;
        let what = format!("{} #{}", op_name(kind), self.calls);
        if self.rank == 0 {
            self.exchange_root(kind, payload, deadline, timeout, &what)
        } else {
            self.exchange_leaf(kind, payload, deadline, timeout, &what)
        }
    }

    fn exchange_root(
        &mut self,
        kind: Kind,
        payload: &[u8],
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Vec<Vec<u8>>> {
        let world = self.world;
        let mut parts: Vec<Vec<u8>> = vec![Vec::new(); world];
        parts[0] = payload.to_vec();
        let mut pending: Vec<usize> = (1..world).collect();
        while !pending.is_empty() {
            let fds: Vec<_> = pending.iter().map(|&r| self.links[r - 1].as_raw_fd()).collect();
            let ready = match wait_readable(&fds, deadline) {
                Ok(ready) => ready,
                Err(e) => {
                    let err = self.protocol(format!("{what}: poll failed: {e}"));
                    return Err(self.fail(0, err));
                }
            };
            let arrived = world - pending.len();
            if ready.is_empty() {
                let detail = format!("{what}: {arrived} of {world} ranks arrived; missing ranks {pending:?}");
                let err = timeout_error(0, world, timeout, arrived, detail);
                return Err(self.fail(pending[0], err));
            }
            // Highest index first, so removing from `pending` keeps the other indices valid.
            for &i in ready.iter().rev() {
                let r = pending[i];
                let frame = match read_frame(&mut self.links[r - 1], deadline, u64::MAX) {
                    Ok(frame) => frame,
                    Err(e) => {
                        let err = self.link_error(r, what, e, timeout, arrived);
                        return Err(self.fail(r, err));
                    }
                };
                parts[r] = self.expect(frame, kind, r)?.payload;
                pending.remove(i);
            }
        }
        // All-to-all: every rank's payload split into its per-destination parts.
        let split: Vec<Vec<&[u8]>> = if kind == Kind::AllToAll {
            let mut split = Vec::with_capacity(world);
            for (r, p) in parts.iter().enumerate() {
                match unpack_parts(p, world) {
                    Some(s) => split.push(s),
                    None => {
                        let err = self.protocol(format!("{what}: rank {r} sent a malformed all-to-all payload"));
                        return Err(self.fail(r, err));
                    }
                }
            }
            split
        } else {
            Vec::new()
        };
        for r in 1..world {
            let sent = match kind {
                Kind::Gather => parts
                    .iter()
                    .enumerate()
                    .try_for_each(|(src, part)| write_frame(&mut self.links[r - 1], kind, src, part, deadline)),
                Kind::AllToAll => split
                    .iter()
                    .enumerate()
                    .try_for_each(|(src, p)| write_frame(&mut self.links[r - 1], kind, src, p[r], deadline)),
                _ => write_frame(&mut self.links[r - 1], kind, 0, &parts[0], deadline),
            };
            if let Err(e) = sent {
                let err = self.link_error(r, &format!("{what} (sending results)"), e, timeout, world);
                return Err(self.fail(r, err));
            }
        }
        Ok(match kind {
            Kind::Gather => parts,
            Kind::AllToAll => split.iter().map(|p| p[0].to_vec()).collect(),
            _ => vec![parts.swap_remove(0)],
        })
    }

    fn exchange_leaf(
        &mut self,
        kind: Kind,
        payload: &[u8],
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Vec<Vec<u8>>> {
        let per_source = matches!(kind, Kind::Gather | Kind::AllToAll);
        let replies = if per_source { self.world } else { 1 };
        let mut parts = Vec::with_capacity(replies);
        // If the send fails, rank 0 may have said why before closing: read that before giving up.
        let mut send_err = write_frame(&mut self.links[0], kind, self.rank, payload, deadline).err();
        for src in 0..replies {
            let frame = match read_frame(&mut self.links[0], deadline, u64::MAX) {
                Ok(frame) => frame,
                Err(e) => {
                    let e = send_err.take().unwrap_or(e);
                    let err = self.link_error(0, &format!("{what} (waiting for rank 0)"), e, timeout, 0);
                    return Err(self.fail(0, err));
                }
            };
            parts.push(self.expect(frame, kind, if per_source { src } else { 0 })?.payload);
            if let Some(e) = send_err.take() {
                // Rank 0 answered although our part never left: the stream is out of step.
                let err = self.protocol(format!("{what}: rank 0 replied to a part that failed to send ({e})"));
                return Err(self.fail(0, err));
            }
        }
        Ok(parts)
    }

    /// Check a received frame is `kind` from rank `from`; an error frame becomes the failure it reports.
    fn expect(&mut self, frame: Frame, kind: Kind, from: usize) -> Result<Frame> {
        if frame.kind == Kind::Error {
            let reason = String::from_utf8_lossy(&frame.payload).into_owned();
            let err = if frame.rank == self.rank {
                Error::Protocol { rank: self.rank, detail: format!("rank 0 reports: {reason}") }
            } else {
                Error::PeerFailed { rank: frame.rank, reason }
            };
            return Err(self.fail(frame.rank, err));
        }
        if frame.kind != kind || frame.rank != from {
            let detail = format!(
                "expected {} from rank {from}, got {} from rank {} (the ranks called different collectives)",
                op_name(kind),
                op_name(frame.kind),
                frame.rank
            );
            let err = self.protocol(detail);
            return Err(self.fail(if self.rank == 0 { from } else { 0 }, err));
        }
        Ok(frame)
    }

    /// What an I/O failure on the link to `peer` means: its deadline passed, or it is gone.
    fn link_error(&self, peer: usize, what: &str, e: io::Error, timeout: Duration, arrived: usize) -> Error {
        match e.kind() {
            io::ErrorKind::TimedOut => {
                let detail = if self.rank == 0 {
                    format!("{what}: waiting for rank {peer}")
                } else {
                    format!("{what}: rank {} is waiting for rank 0, which counts the arrivals", self.rank)
                };
                timeout_error(self.rank, self.world, timeout, arrived, detail)
            }
            _ if self.rank == 0 => {
                Error::PeerFailed { rank: peer, reason: format!("{what}: rank 0 lost its connection to rank {peer} ({e})") }
            }
            _ => Error::PeerFailed {
                rank: peer,
                reason: format!("{what}: rank {} lost its connection to rank 0 ({e})", self.rank),
            },
        }
    }

    fn protocol(&self, detail: String) -> Error {
        Error::Protocol { rank: self.rank, detail }
    }

    /// Break the group, blaming `blamed`; rank 0 also tells every peer. Returns `err` for `?`.
    fn fail(&mut self, blamed: usize, err: Error) -> Error {
        // A peer's failure already reads "rank N failed ...": keep only its reason, not the wrapper twice.
        let reason = match &err {
            Error::PeerFailed { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        if self.rank == 0 {
            notify(self.links.iter_mut(), blamed, &reason);
        }
        self.broken = Some((blamed, reason));
        err
    }
}

fn timeout_error(rank: usize, world: usize, timeout: Duration, arrived: usize, detail: String) -> Error {
    let diag = WaitDiagnostic { rank, channel: 0, role: Role::Notify, head: arrived as u64, tail: world as u64, detail };
    Error::Timeout { timeout_ms: timeout.as_millis() as u64, diag }
}

fn op_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Hello => "hello",
        Kind::Welcome => "welcome",
        Kind::Gather => "all_gather",
        Kind::Barrier => "barrier",
        Kind::Broadcast => "broadcast",
        Kind::Error => "an error",
        Kind::AllToAll => "all_to_all",
    }
}
