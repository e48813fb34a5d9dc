//! The byte level of the TCP bootstrap: `[u32 kind][u32 rank][u64 len][payload]`
//! frames (little-endian) read and written against one total deadline, readiness
//! waits with `poll(2)`, the hello, connect with retry, accept with a deadline, and
//! the host name. Failures stay `io::Error`s here; `tcp.rs` decides which rank they
//! are blamed on.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use tracing::debug;

/// First word of a hello: tells our joiners from anything else that connects to the port.
pub(crate) const MAGIC: u32 = 0x5357_5944; // "SWYD"
/// Bumped whenever the frames change, so mixed builds fail at connect time.
pub(crate) const VERSION: u32 = 2;
/// A hello is magic, version, world size and a host name: small.
const HELLO_MAX: u64 = 4096;
/// Error frames are best effort: do not let a stalled peer delay the failure report.
const NOTIFY_WAIT: Duration = Duration::from_millis(500);

/// Bytes in a frame header.
const HEADER: usize = 16;
/// Payload bytes read per step: a corrupt length cannot make us allocate it all up front.
const READ_STEP: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Joiner to rank 0: magic, version, world size, host name.
    Hello = 1,
    /// Rank 0 to joiners once all arrived: every rank's host name (JSON list).
    Welcome = 2,
    /// One rank's part of an all-gather (to rank 0), or one of the parts sent back.
    Gather = 3,
    /// Arrival at (to rank 0) or release from (from rank 0) a barrier.
    Barrier = 4,
    /// Arrival at (to rank 0) or the root's bytes of (from rank 0) a broadcast.
    Broadcast = 5,
    /// Rank 0 aborts the group: the header's rank is the rank blamed, the payload the reason.
    Error = 6,
    /// One rank's parts for every rank (to rank 0, [`pack_parts`]), or one part addressed
    /// to the receiver, the header naming its source (from rank 0).
    AllToAll = 7,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Self> {
        [Kind::Hello, Kind::Welcome, Kind::Gather, Kind::Barrier, Kind::Broadcast, Kind::Error, Kind::AllToAll]
            .into_iter()
            .find(|k| *k as u32 == v)
    }
}

/// One payload holding a part per destination: `[u64 count][u64 len; count][bytes...]`.
pub(crate) fn pack_parts(parts: &[Vec<u8>]) -> Vec<u8> {
    let data: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(8 * (1 + parts.len()) + data);
    out.extend_from_slice(&(parts.len() as u64).to_le_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// The parts of a [`pack_parts`] payload, or `None` when it is not one of `count` parts.
pub(crate) fn unpack_parts(payload: &[u8], count: usize) -> Option<Vec<&[u8]>> {
    let word = |i: usize| payload.get(8 * i..8 * i + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if word(0)? != count as u64 {
        return None;
    }
    let mut at = 8 * (1 + count);
    let mut parts = Vec::with_capacity(count);
    for i in 0..count {
        let len = usize::try_from(word(1 + i)?).ok()?;
        let end = at.checked_add(len)?;
        parts.push(payload.get(at..end)?);
        at = end;
    }
    (at == payload.len()).then_some(parts)
}

/// One received frame.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    pub(crate) rank: usize,
    pub(crate) payload: Vec<u8>,
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

/// A socket timeout shows as `WouldBlock` on Linux and `TimedOut` elsewhere; make it one kind.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == ErrorKind::WouldBlock {
        io::Error::new(ErrorKind::TimedOut, "deadline passed")
    } else {
        e
    }
}

/// `read_exact` with one total deadline: the socket timeout is re-armed to what is left before each read.
fn read_full(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(buf) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed by the peer")),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(())
}

/// `write_all` with one total deadline (a stalled reader cannot stretch it write by write).
fn write_full(s: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(buf) {
            Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "connection closed by the peer")),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(())
}

/// Send one frame; the header and payload go in two writes (`TCP_NODELAY` is set by the caller).
pub(crate) fn write_frame(s: &mut TcpStream, kind: Kind, rank: usize, payload: &[u8], deadline: Instant) -> io::Result<()> {
    let mut header = [0u8; HEADER];
    header[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
    header[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    write_full(s, &header, deadline)?;
    write_full(s, payload, deadline)?;
    debug!(?kind, rank, len = payload.len(), "tcp bootstrap: sent frame");
    Ok(())
}

/// Receive one frame whose payload is at most `max_len` bytes (`InvalidData` otherwise, or for an unknown kind).
pub(crate) fn read_frame(s: &mut TcpStream, deadline: Instant, max_len: u64) -> io::Result<Frame> {
    let mut header = [0u8; HEADER];
    read_full(s, &mut header, deadline)?;
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (kind, rank) = (word(0), word(4) as usize);
    let len = u64::from_le_bytes([header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15]]);
    let kind =
        Kind::from_u32(kind).ok_or_else(|| io::Error::new(ErrorKind::InvalidData, format!("unknown frame kind {kind}")))?;
    if len > max_len {
        return Err(io::Error::new(ErrorKind::InvalidData, format!("{kind:?} frame of {len} bytes (at most {max_len} allowed)")));
    }
    let mut payload = Vec::new();
    let mut todo = len as usize;
    while todo > 0 {
        let start = payload.len();
        let step = todo.min(READ_STEP);
        payload.resize(start + step, 0);
        read_full(s, &mut payload[start..], deadline)?;
        todo -= step;
    }
    debug!(?kind, rank, len, "tcp bootstrap: received frame");
    Ok(Frame { kind, rank, payload })
}

/// Wait until one of `fds` is readable (data, end of stream or an error; for a
/// listener: a connection to accept). Returns the indices of the ready ones, empty
/// once the deadline has passed.
pub(crate) fn wait_readable(fds: &[RawFd], deadline: Instant) -> io::Result<Vec<usize>> {
    let mut polls: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Vec::new());
        }
        // Round up so a sub-millisecond remainder does not spin.
        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `polls` is a live, initialized array of `polls.len()` pollfd structs.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            return Ok(polls.iter().enumerate().filter(|(_, p)| p.revents != 0).map(|(i, _)| i).collect());
        }
    }
}

/// What a joiner said in its hello.
pub(crate) struct Hello {
    pub(crate) rank: usize,
    pub(crate) version: u32,
    pub(crate) world: usize,
    pub(crate) host: String,
}

/// A hello's payload: magic, version and world size (u32 LE each), then the host name.
pub(crate) fn hello_payload(world: usize, host: &str) -> Vec<u8> {
    let mut hello = Vec::with_capacity(12 + host.len());
    for word in [MAGIC, VERSION, world as u32] {
        hello.extend_from_slice(&word.to_le_bytes());
    }
    hello.extend_from_slice(host.as_bytes());
    hello
}

/// Read a hello; `InvalidData` when the frame is not one (wrong kind, size or magic).
pub(crate) fn read_hello(stream: &mut TcpStream, deadline: Instant) -> io::Result<Hello> {
    let frame = read_frame(stream, deadline, HELLO_MAX)?;
    let p = &frame.payload;
    let word = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    if frame.kind != Kind::Hello || p.len() < 12 || word(0) != MAGIC {
        return Err(io::Error::new(ErrorKind::InvalidData, "not a switchyard hello"));
    }
    stream.set_nodelay(true)?;
    let host = String::from_utf8_lossy(&p[12..]).into_owned();
    Ok(Hello { rank: frame.rank, version: word(4), world: word(8) as usize, host })
}

/// Accept one connection, or `None` once the deadline passes.
pub(crate) fn accept_by(listener: &TcpListener, deadline: Instant) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    // Non-blocking, so a connection that vanishes between poll and accept cannot block us past the deadline.
    listener.set_nonblocking(true)?;
    loop {
        if wait_readable(&[listener.as_raw_fd()], deadline)?.is_empty() {
            return Ok(None);
        }
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false)?;
                return Ok(Some((stream, from)));
            }
            // The connection went away between poll and accept: keep waiting.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connect to `master`, retrying (rank 0 may not listen yet) until the deadline; returns the last error then.
pub(crate) fn connect_by(master: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let mut pause = Duration::from_millis(20);
    let mut last = "no attempt before the deadline".to_string();
    loop {
        // Resolve on every try: the master's name may only just have appeared in DNS.
        match master.to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(last);
                    }
                    match TcpStream::connect_timeout(&addr, left) {
                        Ok(s) => return s.set_nodelay(true).map(|()| s).map_err(|e| e.to_string()),
                        Err(e) => last = format!("{addr}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("resolving {master}: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Best effort: send each stream an error frame blaming `blamed`, then shut down only our
/// sending side: a full close with unread input would send a reset, which can make the
/// peer discard the error frame before reading it.
pub(crate) fn notify<'a>(streams: impl Iterator<Item = &'a mut TcpStream>, blamed: usize, reason: &str) {
    for s in streams {
        let _ = write_frame(s, Kind::Error, blamed, reason.as_bytes(), Instant::now() + NOTIFY_WAIT);
        let _ = s.shutdown(Shutdown::Write);
    }
}

/// This machine's host name (what `hostname` prints).
pub(crate) fn hostname() -> io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // POSIX does not promise a NUL when the name is truncated; stop at the buffer's end then.
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_malformed_payloads_are_refused() {
        let parts = vec![vec![], vec![1u8, 2, 3], vec![9u8; 1000]];
        let packed = pack_parts(&parts);
        let got = unpack_parts(&packed, 3).expect("well formed");
        assert_eq!(got, parts.iter().map(|p| &p[..]).collect::<Vec<_>>());
        assert!(unpack_parts(&packed, 2).is_none(), "wrong count");
        assert!(unpack_parts(&packed[..packed.len() - 1], 3).is_none(), "truncated");
        let mut longer = packed.clone();
        longer.push(0);
        assert!(unpack_parts(&longer, 3).is_none(), "trailing bytes");
        let mut huge = packed;
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(unpack_parts(&huge, 3).is_none(), "length past the end");
    }
}
