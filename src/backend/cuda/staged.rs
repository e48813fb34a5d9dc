//! The staged combine: copy engines bring each peer's rows of this rank's tokens into
//! local slots, while the combine kernel sums every token whose rows have landed.
//!
//! Every pulling combine reads the peers' y rows with SM loads over NVLink, which flatten at
//! ~285 GB/s per direction on 2x H200 (HT-A: 195 us from 16 SMs on); pushing them with SM
//! stores needed every warp of 12 SMs for the stores alone (a push kernel with half its warps
//! sending measured 352 us). A copy engine moves them without any SM. A peer's rows of my
//! tokens are one contiguous block of its y (they land in token order), so they go as a few
//! large copies on this rank's side stream, in chunks of [`STAGE_ROWS`] rows:
//!
//! `sy_stage_wait` (every peer's y is in place), then per chunk a copy and `sy_stage_mark`
//! (the chunk count, tagged with the call's seq, in the rank's signal area). The combine
//! kernel (`sy_combine_bulk` with `SY_FLAG_STAGED`) waits for the chunk of each row it sums.

use super::local_copy::CopyOp;

/// Rows per copied chunk: small enough that the sums start soon after the first chunk,
/// large enough that the copies and marks cost little on the host.
pub const STAGE_ROWS: usize = 256;

/// Environment variable overriding [`STAGE_ROWS`] (rows per chunk, at least 1).
pub const STAGE_ROWS_ENV: &str = "SWITCHYARD_STAGE_ROWS";

/// Rows per chunk: `SWITCHYARD_STAGE_ROWS` if set to a positive number, else [`STAGE_ROWS`]
/// (other values are logged and ignored).
pub fn stage_rows_from_env() -> usize {
    match std::env::var(STAGE_ROWS_ENV) {
        Err(_) => STAGE_ROWS,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::warn!(value = v, "{STAGE_ROWS_ENV}: expected rows per chunk (>= 1); using {STAGE_ROWS}");
                STAGE_ROWS
            }
        },
    }
}

/// One step on a rank's side stream, beside its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideOp {
    /// A device-to-device copy.
    Copy(CopyOp),
    /// `sy_stage_wait`: every peer's y of this call is in place.
    WaitPeers,
    /// `sy_stage_mark`: the first `chunks` chunks of `peer`'s rows have landed.
    Mark {
        /// The peer whose rows they are.
        peer: usize,
        /// Chunks landed so far.
        chunks: usize,
    },
}

/// Where one peer's rows of my tokens are and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerBlock {
    /// The peer.
    pub peer: usize,
    /// Address of my first row in the peer's y.
    pub src: u64,
    /// Address of my slot 0 for this peer.
    pub dst: u64,
    /// My rows at the peer.
    pub rows: usize,
}

/// The side-stream steps of a staged combine: the wait, then chunk by chunk (every peer's
/// chunk c before any chunk c + 1, so no peer waits behind another) a copy and its mark.
pub fn side_ops(blocks: &[PeerBlock], row_bytes: usize, stage_rows: usize) -> Vec<SideOp> {
    let mut ops = vec![SideOp::WaitPeers];
    let most = blocks.iter().map(|b| b.rows.div_ceil(stage_rows)).max().unwrap_or(0);
    for c in 0..most {
        for b in blocks.iter().filter(|b| c * stage_rows < b.rows) {
            let first = c * stage_rows;
            let rows = stage_rows.min(b.rows - first);
            let at = (first * row_bytes) as u64;
            ops.push(SideOp::Copy(CopyOp { dst: b.dst + at, src: b.src + at, bytes: rows * row_bytes }));
            ops.push(SideOp::Mark { peer: b.peer, chunks: c + 1 });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_in_order_with_a_mark_each() {
        let blocks = [
            PeerBlock { peer: 0, src: 1000, dst: 50_000, rows: 5 },
            PeerBlock { peer: 2, src: 9000, dst: 70_000, rows: 2 },
            PeerBlock { peer: 3, src: 4000, dst: 90_000, rows: 0 },
        ];
        let ops = side_ops(&blocks, 10, 2);
        let copy = |dst, src, bytes| SideOp::Copy(CopyOp { dst, src, bytes });
        let mark = |peer, chunks| SideOp::Mark { peer, chunks };
        assert_eq!(
            ops,
            vec![
                SideOp::WaitPeers,
                copy(50_000, 1000, 20),
                mark(0, 1),
                copy(70_000, 9000, 20),
                mark(2, 1),
                copy(50_020, 1020, 20),
                mark(0, 2),
                copy(50_040, 1040, 10),
                mark(0, 3),
            ]
        );
        // No peers: only the wait.
        assert_eq!(side_ops(&[], 10, 2), vec![SideOp::WaitPeers]);
    }
}
