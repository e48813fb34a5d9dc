//! Rows a rank dispatches to itself, moved by a copy engine instead of the SMs.
//!
//! Measured on 2x H200 (scripts/dispatch_micro.cu, HT-A, 12 SMs): the dispatch
//! kernel takes ~182 us when it writes only the peer's rows and ~208 us when it
//! also copies the rank's own rows, which on 2 ranks are half of all rows. The
//! own rows land in token order at consecutive receive rows, so they form a few
//! long runs that `cuMemcpyDtoDAsync` on a side stream can move while the kernel
//! pushes the rest over NVLink. Many short runs (sparse routing, many ranks)
//! would cost more in copy calls than they save: then the kernel keeps them.

/// One run of consecutive tokens that land in consecutive rows of this rank's receive area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First source token.
    pub token: usize,
    /// Receive row of that token.
    pub row: usize,
    /// Tokens in the run.
    pub len: usize,
}

/// More runs than this and the kernel copies the own rows itself.
pub const MAX_RUNS: usize = 64;

/// From this many channels on, `Auto` leaves the own rows to the kernel. 2x H200, HT-A BF16
/// cached dispatch, same run (copy engine / kernel): 8 channels 199 / 301 us (the kernel is
/// short of SMs), 12 channels 213 / 205, 16 channels 225 / 202 (beside the kernel's extra
/// channels the copy engine only adds HBM/L2 traffic). In between (session 9, another run):
/// 10 channels 195-198 / 243 us, 11 channels 201 / 223; 9 with the copy engine 194.
pub const KERNEL_FROM_CHANNELS: usize = 12;

/// From this many tokens on, `Auto` lets a copy engine move the own rows beside the bulk-copy
/// dispatch kernel at any channel count. 2x H200, BF16, 12 channels, same day: HT-A (4096
/// tokens) 192.5-196 us with the bulk kernel and the copy engine against 205.5 with `sy_dispatch`
/// copying the own rows; LL-B (128 tokens) 24.0 against 20.2, where the copy engine's fork and
/// join (~4 us) outweigh the rows. Between the two shapes nothing was measured: the gain scaled
/// with the tokens (~13 us per 4096) meets the ~4 us near 1300 tokens, so 2048 keeps a margin.
pub const BULK_FROM_TOKENS: usize = 2048;

/// Environment variable forcing where own rows are copied: `kernel`, `copy-engine` or `auto` (default).
pub const LOCAL_COPY_ENV: &str = "SWITCHYARD_LOCAL_COPY";

/// Who copies a rank's own rows in dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCopy {
    /// The dispatch kernel, like every other row.
    Kernel,
    /// Copy-engine copies on a side stream, one per run.
    CopyEngine,
    /// Copy engine when there are at most [`MAX_RUNS`] runs, the dispatch has fewer than
    /// [`KERNEL_FROM_CHANNELS`] channels and the rows are eligible (BF16 in and on the wire,
    /// see `CudaRank::own_row_copies`).
    Auto,
}

impl LocalCopy {
    /// The policy from `SWITCHYARD_LOCAL_COPY` (unset or unknown: `Auto`; unknown values are logged).
    pub fn from_env() -> Self {
        match std::env::var(LOCAL_COPY_ENV).as_deref() {
            Ok("kernel") => Self::Kernel,
            Ok("copy-engine") => Self::CopyEngine,
            Ok("auto") | Err(_) => Self::Auto,
            Ok(other) => {
                tracing::warn!(value = other, "{LOCAL_COPY_ENV}: expected kernel, copy-engine or auto; using auto");
                Self::Auto
            }
        }
    }

    /// Whether the copy engine moves these runs in a dispatch on `channels` channels.
    /// `eligible`: a plain copy is right for these rows (a copy engine cannot quantize BF16
    /// to FP8) and worth it.
    pub fn use_copy_engine(self, runs: &[Run], eligible: bool, channels: usize) -> bool {
        eligible
            && !runs.is_empty()
            && match self {
                Self::Kernel => false,
                Self::CopyEngine => true,
                Self::Auto => runs.len() <= MAX_RUNS && channels < KERNEL_FROM_CHANNELS,
            }
    }

    /// Whether a copy engine moves the own rows so that the bulk-copy dispatch kernel (which
    /// moves only the peers' rows) can run, in a dispatch of `tokens` tokens on `channels`
    /// channels: `Auto` where the copy engine pays anyway (fewer than [`KERNEL_FROM_CHANNELS`]
    /// channels) or the call is large enough ([`BULK_FROM_TOKENS`]). The caller checks the runs.
    pub fn allows_bulk_dispatch(self, channels: usize, tokens: usize) -> bool {
        match self {
            Self::Kernel => false,
            Self::CopyEngine => true,
            Self::Auto => channels < KERNEL_FROM_CHANNELS || tokens >= BULK_FROM_TOKENS,
        }
    }
}

/// The runs of tokens that `rank` sends to itself: `pos` is `[tokens][world]` (row among the
/// rows sent to each rank, -1 if not sent there) and `base` where this rank's rows start.
pub fn own_runs(pos: &[i32], world: usize, rank: usize, base: usize) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (t, per_dest) in pos.chunks_exact(world).enumerate() {
        let q = per_dest[rank];
        if q < 0 {
            continue;
        }
        let row = base + q as usize;
        match runs.last_mut() {
            Some(r) if r.token + r.len == t && r.row + r.len == row => r.len += 1,
            _ => runs.push(Run { token: t, row, len: 1 }),
        }
    }
    runs
}

/// One device-to-device copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    /// Destination address.
    pub dst: u64,
    /// Source address.
    pub src: u64,
    /// Bytes.
    pub bytes: usize,
}

/// Where one kind of per-row data comes from and goes to: `src` holds one `bytes`-sized
/// entry per source token, `dst` one per receive row.
#[derive(Debug, Clone, Copy)]
pub struct RowArrays {
    /// Source array base.
    pub src: u64,
    /// Destination array base.
    pub dst: u64,
    /// Bytes per row.
    pub bytes: usize,
}

/// The copies that move `runs` for each array (rows, and scales when FP8).
pub fn copy_ops(runs: &[Run], arrays: &[RowArrays]) -> Vec<CopyOp> {
    arrays
        .iter()
        .flat_map(|a| {
            runs.iter().map(move |r| CopyOp {
                dst: a.dst + (r.row * a.bytes) as u64,
                src: a.src + (r.token * a.bytes) as u64,
                bytes: r.len * a.bytes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_exactly_the_own_tokens_at_their_rows() {
        // 2 ranks, 7 tokens; rank 1's column: sent, sent, not, sent, not, not, sent.
        let col1 = [0, 1, -1, 2, -1, -1, 3];
        let pos: Vec<i32> = col1.iter().flat_map(|&q| [5, q]).collect();
        let runs = own_runs(&pos, 2, 1, 100);
        assert_eq!(
            runs,
            vec![Run { token: 0, row: 100, len: 2 }, Run { token: 3, row: 102, len: 1 }, Run { token: 6, row: 103, len: 1 }]
        );
        // Oracle: expand the runs and compare token -> row with the plain definition.
        let mut got = vec![None; col1.len()];
        for r in &runs {
            for i in 0..r.len {
                got[r.token + i] = Some(r.row + i);
            }
        }
        let want: Vec<Option<usize>> = col1.iter().map(|&q| (q >= 0).then(|| 100 + q as usize)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn copies_address_rows_and_scales_by_token_and_row() {
        let runs = [Run { token: 3, row: 10, len: 2 }];
        let ops = copy_ops(&runs, &[RowArrays { src: 1000, dst: 50_000, bytes: 16 }, RowArrays { src: 7, dst: 9, bytes: 4 }]);
        assert_eq!(
            ops,
            vec![CopyOp { dst: 50_000 + 160, src: 1000 + 48, bytes: 32 }, CopyOp { dst: 9 + 40, src: 7 + 12, bytes: 8 }]
        );
    }

    #[test]
    fn policy() {
        let one = [Run { token: 0, row: 0, len: 4 }];
        let many = vec![Run { token: 0, row: 0, len: 1 }; MAX_RUNS + 1];
        assert!(LocalCopy::Auto.use_copy_engine(&one, true, 8));
        assert!(!LocalCopy::Auto.use_copy_engine(&one, true, KERNEL_FROM_CHANNELS), "enough SMs: the kernel");
        assert!(!LocalCopy::Auto.use_copy_engine(&many, true, 8));
        assert!(!LocalCopy::Auto.use_copy_engine(&one, false, 8), "quantizing dispatch needs the kernel");
        assert!(!LocalCopy::Kernel.use_copy_engine(&one, true, 8));
        assert!(LocalCopy::CopyEngine.use_copy_engine(&many, true, 8));
        assert!(LocalCopy::CopyEngine.use_copy_engine(&one, true, 32));
        assert!(!LocalCopy::CopyEngine.use_copy_engine(&[], true, 8));
    }

    #[test]
    fn bulk_dispatch_policy() {
        assert!(LocalCopy::Auto.allows_bulk_dispatch(8, 128), "few channels: the copy engine pays anyway");
        assert!(!LocalCopy::Auto.allows_bulk_dispatch(KERNEL_FROM_CHANNELS, 128), "small call: the fork costs more");
        assert!(LocalCopy::Auto.allows_bulk_dispatch(KERNEL_FROM_CHANNELS, BULK_FROM_TOKENS));
        assert!(!LocalCopy::Auto.allows_bulk_dispatch(KERNEL_FROM_CHANNELS, BULK_FROM_TOKENS - 1));
        assert!(!LocalCopy::Kernel.allows_bulk_dispatch(8, 4096));
        assert!(LocalCopy::CopyEngine.allows_bulk_dispatch(32, 1));
    }
}
