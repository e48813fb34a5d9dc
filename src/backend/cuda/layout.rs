//! Host mirror of the device-side layouts in `kernels/common.cuh`: the kernel
//! parameter block, the communication buffer's regions, the host-meta slots, and a
//! host reference of the notify kernel's position math.

use super::compile::{KernelSpec, MAX_CHANNELS};

/// Largest node the kernels support (size of `SyParams::peers`).
pub const MAX_WORLD: usize = 8;

/// Byte offset of the rank's call count in its own buffer; mirrors `SY_SIG_CALL`
/// (the slot after the diagnostic claim, `3 * MAX_WORLD + 1`).
pub const CALL_COUNT_OFFSET: usize = (3 * MAX_WORLD + 1) * 8;

/// Signal slots (u64) at the start of every buffer; mirrors `SY_SIG_SLOTS`.
pub const SIGNAL_SLOTS: usize = 3 * MAX_WORLD + 8 + 2 * MAX_WORLD * MAX_CHANNELS;

/// Host-meta byte offsets; mirror `SY_META_*`.
pub mod meta {
    /// `SyDiag`.
    pub const DIAG: usize = 0;
    /// i32: rows this rank receives.
    pub const NUM_RECV: usize = 64;
    /// i32: most rows any rank receives.
    pub const MAX_RECV_ANY: usize = 68;
    /// `i32[8]`: start of each source's rows in my receive area.
    pub const RECV_BASE: usize = 72;
    /// `i32[8]`: start of my rows in each destination's receive area.
    pub const SEND_BASE: usize = 104;
    /// `u64[3]`: global-timer stamps (ns) of block 0 of the last dispatch/combine: entry, every
    /// peer ready, own rows done (the kernel's end is the event time).
    pub const STAMPS: usize = 136;
    /// i32[experts per rank]: received (token, slot) pairs per local expert.
    pub const TPE: usize = 192;
    /// Bytes of host meta for `epr` experts per rank.
    pub fn bytes(epr: usize) -> usize {
        TPE + 4 * epr
    }
}

/// Wait kinds (`SY_WAIT_*`), for diagnostics.
pub fn wait_name(what: u32) -> &'static str {
    match what {
        1 => "notify: counts of a peer",
        2 => "dispatch entry: peer's receive area free",
        3 => "dispatch completion: peer channel's rows",
        4 => "combine entry: peer's y rows in place",
        5 => "combine exit: peer channel done reading my y",
        6 => "push combine: peer channel's rows arrived",
        7 => "bulk combine: bulk copies of y rows into shared memory",
        8 => "bulk dispatch: bulk copy of an input row into shared memory",
        _ => "unknown wait",
    }
}

/// `SyDiag` as the kernel writes it into host meta.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyDiag {
    /// 1 when a wait timed out during the call.
    pub timed_out: u32,
    /// Rank that gave up.
    pub rank: u32,
    /// Channel (block).
    pub channel: u32,
    /// `SY_ROLE_*`.
    pub role: u32,
    /// Value seen.
    pub head: u64,
    /// Value waited for.
    pub tail: u64,
    /// Rank whose flag it was.
    pub peer: u32,
    /// `SY_WAIT_*`.
    pub what: u32,
    /// Call sequence number.
    pub seq: u64,
}

/// Kernel parameter block; mirrors `struct SyParams` field for field (all 8 bytes wide).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyParams {
    /// Buffer base of each rank (peer-mapped); `peers[rank]` is our own.
    pub peers: [u64; MAX_WORLD],
    /// Input payload.
    pub x: u64,
    /// Input scales (FP8 input).
    pub x_scales: u64,
    /// `[T, k]` i64 expert ids.
    pub topk_idx: u64,
    /// `[T, k]` f32 weights.
    pub topk_weights: u64,
    /// `[T, W]` i32 positions.
    pub pos: u64,
    /// `[W]` i32 send bases.
    pub send_base: u64,
    /// Combine output rows.
    pub out: u64,
    /// Combine output weights.
    pub out_weights: u64,
    /// Device pointer of the mapped pinned host meta.
    pub host_meta: u64,
    /// Deadline of every wait, ns.
    pub timeout_ns: u64,
    /// Tokens on this rank.
    pub num_tokens: u64,
    /// This rank.
    pub rank: u64,
    /// Receive capacity in rows.
    pub max_recv: u64,
    /// `SY_FLAG_*`.
    pub flags: u64,
    /// Region offsets (bytes) in every buffer.
    pub off_counts: u64,
    /// Received rows.
    pub off_recv_x: u64,
    /// Received scales.
    pub off_recv_scales: u64,
    /// Received ids.
    pub off_recv_idx: u64,
    /// Received weights.
    pub off_recv_w: u64,
    /// Received (source rank, source token).
    pub off_recv_src: u64,
    /// Combine input rows.
    pub off_y: u64,
    /// Combine input weights.
    pub off_y_w: u64,
    /// Rows this rank received (rows of y).
    pub num_recv: u64,
    /// `[num_recv]` i32x2 (source rank, source token) of each y row.
    pub src_info: u64,
    /// Push combine: `[T * W, H]` bf16 rows from each rank.
    pub off_comb: u64,
    /// Push combine: `[T * W, k]` f32 weights from each rank.
    pub off_comb_w: u64,
}

/// `SY_FLAG_WRITE_META`.
pub const FLAG_WRITE_META: u64 = 1;
/// `SY_FLAG_WITH_WEIGHTS`.
pub const FLAG_WITH_WEIGHTS: u64 = 2;
/// `SY_FLAG_SKIP_LOCAL`: dispatch leaves the rank's own rows (and scales) to copy-engine copies.
pub const FLAG_SKIP_LOCAL: u64 = 4;

/// Where each region of a communication buffer lies for one kernel spec. Every
/// rank computes the same layout from the same (spec, capacity), so offsets agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLayout {
    /// `[W][W] + [W][EPR]` i32 counts.
    pub counts: usize,
    /// Received rows.
    pub recv_x: usize,
    /// Received scales.
    pub recv_scales: usize,
    /// Received ids.
    pub recv_idx: usize,
    /// Received weights.
    pub recv_w: usize,
    /// Received source info.
    pub recv_src: usize,
    /// Combine input rows (BF16).
    pub y: usize,
    /// Combine input weights.
    pub y_w: usize,
    /// Push combine: rows from each rank, `max_recv` slots (token t from rank d at t * W + d).
    pub comb: usize,
    /// Push combine: weights from each rank, `max_recv` slots.
    pub comb_w: usize,
    /// Rows the receive area holds (and slots of the push-combine area).
    pub max_recv: usize,
    /// Bytes used.
    pub total: usize,
}

fn align(x: usize) -> usize {
    x.div_ceil(256) * 256
}

impl BufferLayout {
    /// Bytes each received row costs in the buffer (rows, scales, metadata, y, y weights,
    /// push-combine slot and its weights).
    pub fn bytes_per_row(spec: &KernelSpec) -> usize {
        let wire = if spec.wire_fp8 { spec.hidden } else { spec.hidden * 2 };
        let scales = if spec.wire_fp8 { spec.hidden / 128 * 4 } else { 0 };
        wire + scales + spec.topk * 4 * 2 + 8 + 2 * (spec.hidden * 2 + spec.topk * 4)
    }

    /// Fixed bytes before the row regions (signals, counts) plus alignment slack.
    pub fn fixed_bytes(spec: &KernelSpec) -> usize {
        align(SIGNAL_SLOTS * 8) + align(4 * (spec.world * spec.world + spec.num_experts)) + 8 * 256
    }

    /// Carve a buffer of `capacity` bytes for `spec`: as many receive rows as fit.
    pub fn new(spec: &KernelSpec, capacity: usize) -> Self {
        let rows = capacity.saturating_sub(Self::fixed_bytes(spec)) / Self::bytes_per_row(spec);
        Self::with_rows(spec, rows)
    }

    /// The layout for exactly `max_recv` receive rows.
    pub fn with_rows(spec: &KernelSpec, max_recv: usize) -> Self {
        let wire = if spec.wire_fp8 { spec.hidden } else { spec.hidden * 2 };
        let mut at = align(SIGNAL_SLOTS * 8);
        let mut take = |bytes: usize| {
            let o = at;
            at = align(at + bytes);
            o
        };
        let counts = take(4 * (spec.world * spec.world + spec.num_experts));
        let recv_x = take(max_recv * wire);
        let recv_scales = take(if spec.wire_fp8 { max_recv * spec.hidden / 128 * 4 } else { 0 });
        let recv_idx = take(max_recv * spec.topk * 4);
        let recv_w = take(max_recv * spec.topk * 4);
        let recv_src = take(max_recv * 8);
        let y = take(max_recv * spec.hidden * 2);
        let y_w = take(max_recv * spec.topk * 4);
        let comb = take(max_recv * spec.hidden * 2);
        let comb_w = take(max_recv * spec.topk * 4);
        Self { counts, recv_x, recv_scales, recv_idx, recv_w, recv_src, y, y_w, comb, comb_w, max_recv, total: at }
    }

    /// Fill the offset fields of a parameter block.
    pub fn apply(&self, p: &mut SyParams) {
        p.off_counts = self.counts as u64;
        p.off_recv_x = self.recv_x as u64;
        p.off_recv_scales = self.recv_scales as u64;
        p.off_recv_idx = self.recv_idx as u64;
        p.off_recv_w = self.recv_w as u64;
        p.off_recv_src = self.recv_src as u64;
        p.off_y = self.y as u64;
        p.off_y_w = self.y_w as u64;
        p.off_comb = self.comb as u64;
        p.off_comb_w = self.comb_w as u64;
        p.max_recv = self.max_recv as u64;
    }
}

/// What the notify kernel computes, on the host: for every source rank's `topk_idx`,
/// each token's row position per destination (-1 if not sent), and the send base of
/// each (source, destination). Used by tests as the reference of the device math.
pub struct PositionPlan {
    /// `[src][T_src * W]` positions.
    pub pos: Vec<Vec<i32>>,
    /// `[src][W]` where src's rows start in dest's receive area.
    pub send_base: Vec<Vec<i32>>,
    /// `[dest]` rows received.
    pub num_recv: Vec<usize>,
}

/// Host reference of notify: rows land at `send_base[src][dest] + pos[src][t][dest]`,
/// which orders each destination's rows by (source rank, source token).
pub fn plan_positions(topk_idx: &[&[i64]], topk: usize, num_experts: usize) -> PositionPlan {
    let world = topk_idx.len();
    let epr = num_experts / world;
    let mut counts = vec![vec![0i32; world]; world];
    let mut pos = Vec::with_capacity(world);
    for (s, idx) in topk_idx.iter().enumerate() {
        let t = idx.len() / topk;
        let mut p = vec![-1i32; t * world];
        for (tok, row) in idx.chunks_exact(topk).enumerate() {
            for d in 0..world {
                if row.iter().any(|&e| e >= 0 && e as usize / epr == d) {
                    p[tok * world + d] = counts[s][d];
                    counts[s][d] += 1;
                }
            }
        }
        pos.push(p);
    }
    let send_base = (0..world).map(|s| (0..world).map(|d| (0..s).map(|s2| counts[s2][d]).sum()).collect()).collect();
    let num_recv = (0..world).map(|d| (0..world).map(|s| counts[s][d] as usize).sum()).collect();
    PositionPlan { pos, send_base, num_recv }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Layout;
    use crate::topology::Topology;

    fn spec() -> KernelSpec {
        KernelSpec { world: 2, hidden: 7168, topk: 8, num_experts: 256, x_fp8: false, wire_fp8: true }
    }

    #[test]
    fn params_are_packed_like_the_c_struct() {
        // The C struct's fields, read from the kernel source: the peers array plus scalar
        // u64s; all 8 bytes wide, so no padding anywhere and the sizes must agree.
        let src = super::super::compile::COMMON_CUH;
        let body = &src[src.find("struct SyParams {").expect("C struct")..];
        let body = &body[..body.find("};").expect("struct end")];
        let decls = body.lines().filter_map(|l| l.trim_start().strip_prefix("u64 ")).map(|l| l.split(';').next().unwrap_or(""));
        let scalars = decls.filter(|d| !d.contains('[')).count();
        assert!(body.contains("u64 peers[SY_MAX_WORLD];"));
        assert_eq!(std::mem::size_of::<SyParams>(), (MAX_WORLD + scalars) * 8);
        assert_eq!(std::mem::size_of::<SyDiag>(), 48);
        assert!(std::mem::size_of::<SyDiag>() <= meta::NUM_RECV);
        const { assert!(meta::SEND_BASE + 4 * MAX_WORLD <= meta::STAMPS) };
        const { assert!(meta::STAMPS + 3 * 8 <= meta::TPE) };
    }

    #[test]
    fn regions_are_aligned_disjoint_and_fit() {
        for s in [
            spec(),
            KernelSpec { wire_fp8: false, ..spec() },
            KernelSpec { world: 8, hidden: 72, topk: 3, num_experts: 24, x_fp8: false, wire_fp8: false },
        ] {
            let cap = 256 << 20;
            let l = BufferLayout::new(&s, cap);
            assert!(l.total <= cap, "{l:?}");
            assert!(l.max_recv > 0);
            let offs =
                [l.counts, l.recv_x, l.recv_scales, l.recv_idx, l.recv_w, l.recv_src, l.y, l.y_w, l.comb, l.comb_w, l.total];
            assert!(offs.windows(2).all(|w| w[0] <= w[1]), "{offs:?}");
            assert!(offs.iter().all(|o| o % 256 == 0));
            assert!(l.counts >= SIGNAL_SLOTS * 8);
            // One more row would not fit.
            assert!(
                BufferLayout::with_rows(&s, l.max_recv + 1).total > cap
                    || l.max_recv == (cap - BufferLayout::fixed_bytes(&s)) / BufferLayout::bytes_per_row(&s)
            );
        }
    }

    #[test]
    fn positions_order_rows_by_source_then_token_and_match_the_layout() {
        // 2 ranks, 8 experts (4 each), k = 2.
        let r0: Vec<i64> = vec![0, 5, /* t1 */ 1, 2, /* t2 */ 6, -1, /* t3 */ -1, -1];
        let r1: Vec<i64> = vec![7, -1, /* t1 */ 3, 4];
        let plan = plan_positions(&[&r0, &r1], 2, 8);
        assert_eq!(plan.pos[0], vec![0, 0, 1, -1, -1, 1, -1, -1]);
        assert_eq!(plan.pos[1], vec![-1, 0, 0, 1]);
        assert_eq!(plan.send_base, vec![vec![0, 0], vec![2, 2]]);
        assert_eq!(plan.num_recv, vec![3, 4]);
        let topo = Topology::new(1, 2).unwrap();
        for (s, idx) in [&r0, &r1].iter().enumerate() {
            let l = Layout::new(idx, 2, 8, topo).unwrap();
            for d in 0..2 {
                let sent = plan.pos[s].iter().skip(d).step_by(2).filter(|&&p| p >= 0).count();
                assert_eq!(sent, l.tokens_per_rank[d]);
            }
        }
    }
}
