// switchyard: shared device code for the intra-node kernels.
//
// Compiled by NVRTC with no CUDA headers: every type and primitive used here is
// defined below (raw integer types, bf16 as u16 bits, inline PTX for flags,
// timers and the FP8 cast). Shapes and topology arrive as -D constants:
//   SY_WORLD        ranks in the node (2..8)
//   SY_HIDDEN       elements per row
//   SY_TOPK         top-k slots per token
//   SY_NUM_EXPERTS  experts over all ranks
//   SY_X_FP8        1: dispatch input is FP8 (+ scales); 0: BF16
//   SY_WIRE_FP8     1: rows travel and land as FP8 (+ scales); 0: BF16
//   SY_MAX_CHANNELS upper bound of gridDim.x for dispatch/combine (flag slots)
//   SY_THREADS      threads per block of dispatch/combine
// The host (src/backend/cuda/layout.rs) mirrors SyParams, the signal area and
// the host-meta layout; change both sides together.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

struct __align__(16) v4u32 {
    u32 x, y, z, w;
};

#ifndef SY_WORLD
#error "SY_WORLD must be defined"
#endif
#ifndef SY_MAX_CHANNELS
#define SY_MAX_CHANNELS 256
#endif
#ifndef SY_THREADS
#define SY_THREADS 512
#endif

#define SY_MAX_WORLD 8
#define SY_EPR (SY_NUM_EXPERTS / SY_WORLD)
#define SY_GROUPS (SY_HIDDEN / 128)
#define SY_WARPS (SY_THREADS / 32)
// 16-byte vectors each lane loads ahead of its stores in dispatch.
#ifndef SY_DUNROLL
#define SY_DUNROLL 8
#endif
#define SY_NOTIFY_THREADS 512

static_assert(SY_WORLD >= 1 && SY_WORLD <= SY_MAX_WORLD, "world must be 1..8");
static_assert(SY_NUM_EXPERTS % SY_WORLD == 0, "experts must split evenly over ranks");
static_assert(SY_NUM_EXPERTS <= 4096, "notify keeps per-expert counts in shared memory");
static_assert(SY_HIDDEN % 8 == 0, "rows move as 16-byte vectors: hidden must be a multiple of 8");
static_assert(!(SY_WIRE_FP8 || SY_X_FP8) || SY_HIDDEN % 128 == 0, "FP8 needs hidden % 128 == 0");
static_assert(SY_THREADS % 32 == 0 && SY_THREADS <= 1024, "bad block size");

// Roles, as numbered by the host's Role mapping (diag.role).
#define SY_ROLE_SENDER 0
#define SY_ROLE_FORWARDER 1
#define SY_ROLE_RECEIVER 2
#define SY_ROLE_NOTIFY 3

// What a wait was for (diag.what); the host turns it into text.
#define SY_WAIT_NOTIFY 1
#define SY_WAIT_RECV_READY 2
#define SY_WAIT_DISPATCH_ARRIVE 3
#define SY_WAIT_COMBINE_READY 4
#define SY_WAIT_COMBINE_DONE 5
#define SY_WAIT_COMBINE_PUSHED 6
#define SY_WAIT_COMBINE_BULK 7
#define SY_WAIT_DISPATCH_BULK 8

// One parameter block for every kernel, passed by value. Every field is 8 bytes
// so the C and Rust layouts cannot disagree on padding.
struct SyParams {
    u64 peers[SY_MAX_WORLD];  // base of each rank's communication buffer (peer-mapped); peers[rank] is ours
    u64 x;                    // [T, H] input payload (bf16 or e4m3 bytes)
    u64 x_scales;             // [T, H/128] f32 (FP8 input only)
    u64 topk_idx;             // [T, k] i64
    u64 topk_weights;         // [T, k] f32
    u64 pos;                  // [T, W] i32: row of token t among those sent to rank d, -1 if not sent
    u64 send_base;            // [W] i32: where my rows start in rank d's receive area
    u64 out;                  // combine: [T, H] bf16
    u64 out_weights;          // combine: [T, k] f32
    u64 host_meta;            // mapped pinned host memory: diagnostics and notify results
    u64 timeout_ns;           // deadline of every wait
    u64 num_tokens;           // T
    u64 rank;                 // my rank in the node
    u64 max_recv;             // capacity of the receive area in rows
    u64 flags;                // SY_FLAG_*
    // Byte offsets inside every rank's communication buffer.
    u64 off_counts;           // i32 rank_counts[W][W], then i32 expert_counts[W][EPR]
    u64 off_recv_x;           // [max_recv, wire row bytes]
    u64 off_recv_scales;      // [max_recv, H/128] f32
    u64 off_recv_idx;         // [max_recv, k] i32 (local ids, -1 elsewhere)
    u64 off_recv_w;           // [max_recv, k] f32
    u64 off_recv_src;         // [max_recv] i32x2 (source rank, source token)
    u64 off_y;                // [max_recv, H] bf16: combine input rows
    u64 off_y_w;              // [max_recv, k] f32: combine input weights
    u64 num_recv;             // combine: rows this rank received in the dispatch (rows of y)
    u64 src_info;             // combine: [num_recv] i32x2 (source rank, source token) of each y row
    u64 off_comb;             // push combine: [T * W, H] bf16: row of (token t, from rank d) at t * W + d
    u64 off_comb_w;           // push combine: [T * W, k] f32
};

#define SY_FLAG_WRITE_META 1u    // dispatch: also write idx/weights/src (not needed by cached dispatch)
#define SY_FLAG_WITH_WEIGHTS 2u  // combine: also sum weights
#define SY_FLAG_SKIP_LOCAL 4u    // dispatch (same type in and out): a copy engine moves my own rows (and scales)

// Signal area at offset 0 of every buffer, in u64 slots. A slot holds the seq
// of the last call that set it, so nothing is ever reset between calls.
#define SY_SIG_NOTIFY 0                                     // [W]: source s posted its counts
#define SY_SIG_RECV_READY (SY_SIG_NOTIFY + SY_MAX_WORLD)    // [W]: rank d's receive area is free for this call
#define SY_SIG_COMBINE_READY (SY_SIG_RECV_READY + SY_MAX_WORLD)  // [W]: rank d's y rows are in place
#define SY_SIG_DIAG_CLAIM (SY_SIG_COMBINE_READY + SY_MAX_WORLD)  // one slot: first timed-out wait of a call wins
#define SY_SIG_CALL (SY_SIG_DIAG_CLAIM + 1)                 // one slot: this rank's call count (see sy_advance)
#define SY_SIG_DISPATCH_ARRIVE (SY_SIG_DIAG_CLAIM + 8)      // [W][MAX_CH]: source s channel c finished its rows
#define SY_SIG_COMBINE_DONE (SY_SIG_DISPATCH_ARRIVE + SY_MAX_WORLD * SY_MAX_CHANNELS)  // [W][MAX_CH]
#define SY_SIG_SLOTS (SY_SIG_COMBINE_DONE + SY_MAX_WORLD * SY_MAX_CHANNELS)

// Host meta (mapped pinned), byte offsets.
#define SY_META_DIAG 0            // SyDiag
#define SY_META_NUM_RECV 64       // i32: rows I receive
#define SY_META_MAX_RECV_ANY 68   // i32: the most rows any rank receives (overflow check, same on all ranks)
#define SY_META_RECV_BASE 72      // i32[8]: where source s's rows start in my receive area
#define SY_META_SEND_BASE 104     // i32[8]: where my rows start in rank d's receive area
#define SY_META_STAMPS 136       // u64[3]: block 0's entry, peers-ready and rows-done global-timer stamps
#define SY_META_TPE 192           // i32[EPR]: received (token, slot) pairs per local expert

struct SyDiag {
    u32 timed_out;  // 1 when a wait gave up in this call (host clears it before launching)
    u32 rank;
    u32 channel;
    u32 role;
    u64 head;       // value seen in the flag
    u64 tail;       // value waited for
    u32 peer;       // rank whose flag it was
    u32 what;       // SY_WAIT_*
    u64 seq;
};

// ---------------------------------------------------------------- primitives

__device__ __forceinline__ u64* sig(u64 base) { return reinterpret_cast<u64*>(base); }

__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
    u64 v;
    // Acquire at system scope: pairs with a peer GPU's st.release.sys on this slot.
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
    // Release at system scope: orders our earlier (fenced) row writes before the flag for peer GPUs.
    asm volatile("st.release.sys.global.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() {
    // Cumulative fence: writes this thread made (or saw via bar.sync) are visible system-wide before later flags.
    asm volatile("fence.acq_rel.sys;" : : : "memory");
}

__device__ __forceinline__ u64 globaltimer_ns() {
    u64 t;
    // Global nanosecond timer: deadlines independent of SM clock changes.
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ v4u32 ld_nc_v4(const v4u32* p) {
    v4u32 v;
    // Input rows are read once and never written by this kernel: skip L1 so they do not evict
    // the flags and metadata we do reuse (the DeepSeek-V3 "no_allocate" trick).
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void st_na_v4(v4u32* p, const v4u32& v) {
    // Stores to a peer's receive area are never read back by us: do not allocate in L1.
    asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1, %2, %3, %4};"
                 : : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ v4u32 ld_v4(const v4u32* p) {
    // Plain (coherent) load: used on peer y rows, which were written after this kernel may have started.
    v4u32 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

__device__ __forceinline__ void st_v4(v4u32* p, const v4u32& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" : : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xFFFF0000u); }

// f32 -> bf16 bits, round to nearest even; NaN kept quiet. Same rule as `half::bf16::from_f32`.
__device__ __forceinline__ u32 f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ((x >> 16) | 0x0040u) & 0xFFFFu;
    const u32 round_bit = 0x00008000u;
    u32 r = x >> 16;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) r += 1;
    return r & 0xFFFFu;
}

#ifndef SY_HW_BF16
#define SY_HW_BF16 1
#endif

// Two f32 -> two bf16 (lo in bits 0..15), round to nearest even. With SY_HW_BF16 one native
// convert (sm_80+), which matches f32_to_bf16_bits except that a NaN comes out as the canonical
// NaN rather than keeping its payload; combine promises a bound, not bits, and NaN stays NaN.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
#if SY_HW_BF16
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return f32_to_bf16_bits(lo) | (f32_to_bf16_bits(hi) << 16);
#endif
}

// Add 8 BF16 values (one 16-byte piece of a row) to 8 f32 accumulators.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const v4u32& v) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        acc[2 * k] += bf16_lo(w[k]);
        acc[2 * k + 1] += bf16_hi(w[k]);
    }
}

// 8 f32 accumulators rounded once to BF16, as one 16-byte piece.
__device__ __forceinline__ v4u32 pack_bf16x8(const float (&acc)[8]) {
    v4u32 o;
    o.x = f32x2_to_bf16x2(acc[0], acc[1]);
    o.y = f32x2_to_bf16x2(acc[2], acc[3]);
    o.z = f32x2_to_bf16x2(acc[4], acc[5]);
    o.w = f32x2_to_bf16x2(acc[6], acc[7]);
    return o;
}

// Two f32 -> two E4M3 bytes (lo in bits 0..7), round to nearest even, saturating to +-448.
// cvt...satfinite is exactly the reference rule (src/quant.rs) for finite and infinite inputs.
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
    u16 r;
    // Native FP8 convert (sm_89+): operand a lands in the upper byte, b in the lower.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return (u32)r;
}

// One lane's 16 elements of a 1x128 group of a BF16 row, quantized to E4M3: lanes 8j..8j+7 of
// the warp hold group `g` (sub = lane % 8 picks the 16 elements), every lane of the warp must
// call (the group's amax is a shuffle over its 8 lanes). Lanes whose g >= groups contribute
// zeros, leave `q` as it is and write nothing. Returns the group's scale; `q` gets the lane's
// 16 E4M3 bytes.
// The reference rule (src/quant.rs), operation for operation, in IEEE f32.
__device__ __forceinline__ float quantize_piece(const u8* xrow, int g, int groups, int sub, v4u32& q) {
    float v[16];
    float amax = 0.f;
    if (g < groups) {
        const v4u32* src = reinterpret_cast<const v4u32*>(xrow + g * 256 + sub * 32);
        const v4u32 a = ld_nc_v4(src), b = ld_nc_v4(src + 1);
        const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[2 * i] = bf16_lo(w[i]);
            v[2 * i + 1] = bf16_hi(w[i]);
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = 0.f;
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float scale, inv;
    if (amax == 0.f) {
        scale = 1.f;
        inv = 1.f;
    } else if (!(amax <= 3.402823466e+38f)) {
        scale = 3.402823466e+38f / 448.f;
        inv = 448.f / 3.402823466e+38f;
    } else {
        scale = amax / 448.f;
        inv = 448.f / amax;
    }
    if (g < groups) {
        q.x = f32x2_to_e4m3x2(v[0] * inv, v[1] * inv) | (f32x2_to_e4m3x2(v[2] * inv, v[3] * inv) << 16);
        q.y = f32x2_to_e4m3x2(v[4] * inv, v[5] * inv) | (f32x2_to_e4m3x2(v[6] * inv, v[7] * inv) << 16);
        q.z = f32x2_to_e4m3x2(v[8] * inv, v[9] * inv) | (f32x2_to_e4m3x2(v[10] * inv, v[11] * inv) << 16);
        q.w = f32x2_to_e4m3x2(v[12] * inv, v[13] * inv) | (f32x2_to_e4m3x2(v[14] * inv, v[15] * inv) << 16);
    }
    return scale;
}

// --------------------------------------------------------------- diagnostics

// Block 0 thread 0 stamps the global timer into host meta (SY_META_STAMPS + 8 * which): where the
// time of a call goes (waiting for peers to start vs moving rows), read by the host at debug level.
__device__ __forceinline__ void sy_stamp(const SyParams& p, int which) {
    if (blockIdx.x == 0 && threadIdx.x == 0)
        reinterpret_cast<volatile u64*>(p.host_meta + SY_META_STAMPS)[which] = globaltimer_ns();
}

// What a wait needs to report a timeout, by value: taking the address of the kernel's
// parameter block would copy all of it to the stack.
struct SyWaitCtx {
    u64 claim;      // device slot for "first timeout of this call wins"
    u64 host_meta;  // mapped pinned SyDiag
    u64 seq;
    u64 timeout_ns;
    u32 rank;
};

// This call's sequence number: the rank's call count in its own buffer, which
// `sy_advance` (launched on the same stream before each call's first kernel) raised.
// On the device rather than in the parameters, so a call captured in a CUDA graph
// takes a fresh number on every replay. Every rank makes the same calls, so the
// counts agree across ranks.
__device__ __forceinline__ u64 sy_call_seq(const SyParams& p) {
    return *reinterpret_cast<const volatile u64*>(p.peers[p.rank] + SY_SIG_CALL * 8);
}

__device__ __forceinline__ SyWaitCtx sy_wait_ctx(const SyParams& p) {
    SyWaitCtx c;
    c.claim = p.peers[p.rank] + SY_SIG_DIAG_CLAIM * 8;
    c.host_meta = p.host_meta;
    c.seq = sy_call_seq(p);
    c.timeout_ns = p.timeout_ns;
    c.rank = (u32)p.rank;
    return c;
}

// Record the first timed-out wait of this call in host-visible memory. The claim is
// an atomicMax on a device-memory slot (seq-based: no reset), so no atomics touch host memory.
__device__ __noinline__ void sy_record_timeout(SyWaitCtx c, u32 channel, u32 role, u32 peer, u32 what, u64 head,
                                               u64 tail) {
    u64 old;
    // 64-bit atomic max in our own device memory.
    asm volatile("atom.global.max.u64 %0, [%1], %2;" : "=l"(old) : "l"(c.claim), "l"(c.seq) : "memory");
    if (old >= c.seq) return;
    volatile SyDiag* d = reinterpret_cast<volatile SyDiag*>(c.host_meta + SY_META_DIAG);
    d->rank = c.rank;
    d->channel = channel;
    d->role = role;
    d->head = head;
    d->tail = tail;
    d->peer = peer;
    d->what = what;
    d->seq = c.seq;
    __threadfence_system();
    d->timed_out = 1;
    __threadfence_system();
}

// Spin until *flag >= target or the deadline passes; false (and a diagnostic) on timeout.
__device__ __forceinline__ bool sy_wait(const u64* flag, u64 target, const SyWaitCtx& c, u32 channel, u32 role,
                                        u32 peer, u32 what) {
    u64 v = ld_acquire_sys(flag);
    if (v >= target) return true;
    const u64 start = globaltimer_ns();
    while (true) {
        v = ld_acquire_sys(flag);
        if (v >= target) return true;
        if (globaltimer_ns() - start > c.timeout_ns) {
            sy_record_timeout(c, channel, role, peer, what, v, target);
            return false;
        }
    }
}

// ---------------------------------------------------------------- bulk copies (sm_90)

// Bulk copies (cp.async.bulk) and mbarrier transaction counts: sm_90 and later. A kernel built
// without them states 0 bytes of shared memory, and the host falls back to its register twin.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SY_HAS_BULK 1
#else
#define SY_HAS_BULK 0
#endif
// Dynamic shared memory a block may take on sm_90 (227 KB), less 1 KB for the static variables.
#define SY_BULK_SMEM_LIMIT (227 * 1024 - 1024)

// Shared-memory address of a generic pointer into shared memory, as bulk copies and mbarriers take it.
__device__ __forceinline__ u32 smem_u32(const void* ptr) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(ptr));
    return r;
}

// Set up an mbarrier for `count` arrivals per phase (one thread; fence before other threads use it).
__device__ __forceinline__ void sy_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Arrive on an mbarrier (release: orders this thread's earlier writes before the phase completes)
// and have the phase also wait for `bytes` of bulk copies.
__device__ __forceinline__ void sy_mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// Bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory (a
// peer's included) into shared memory, counted on mbarrier `bar`.
__device__ __forceinline__ void sy_bulk_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// Bulk copy from shared memory to global memory (a peer's included), in this thread's open bulk group.
__device__ __forceinline__ void sy_bulk_s2g(void* dst, u32 src, u32 bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
}

// Close this thread's open bulk group.
__device__ __forceinline__ void sy_bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until at most N of this thread's bulk groups still read their shared-memory sources.
template <int N>
__device__ __forceinline__ void sy_bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Wait until every bulk group of this thread has written its destination, then order those writes
// (async proxy) before this thread's later generic-proxy operations (the release of a flag).
__device__ __forceinline__ void sy_bulk_wait_writes() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

// One poll of an mbarrier: whether its phase of `parity` has completed.
__device__ __forceinline__ bool mbar_try(u32 bar, u32 parity) {
    u32 done;
    asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return done != 0;
}

// This thread polls an mbarrier until its phase of `parity` completes (true) or `timeout_ns`
// pass (false). Only the copy unit completes the barriers waited on here (the data was in place
// before the copies were issued), so the deadline is a backstop.
__device__ __forceinline__ bool sy_mbar_wait(u32 bar, u32 parity, u64 timeout_ns) {
    if (mbar_try(bar, parity)) return true;
    const u64 start = globaltimer_ns();
    while (!mbar_try(bar, parity))
        if (globaltimer_ns() - start > timeout_ns) return false;
    return true;
}

// The whole warp waits until the bulk copies of a stage have landed (mbarrier `bar`, phase
// `parity`); every lane polls on its own (a vote per poll measured slower). Past the deadline
// lane 0 writes a diagnostic (head, tail: the item and the warp's item count) and every lane
// returns false.
__device__ __forceinline__ bool sy_bulk_wait(u32 bar, u32 parity, const SyParams& p, int ch, u64 head, u64 tail) {
    const bool late = !sy_mbar_wait(bar, parity, p.timeout_ns);
    if (!__any_sync(0xffffffffu, late)) return true;
    if (threadIdx.x % 32 == 0)
        sy_record_timeout(sy_wait_ctx(p), (u32)ch, SY_ROLE_RECEIVER, (u32)p.rank, SY_WAIT_COMBINE_BULK, head, tail);
    return false;
}

// ---------------------------------------------------------------- meeting points of a call

// Start of a call's phase: channel 0 raises flag `slot + me` on every rank, then every block
// waits for `slot + s` from every rank s (itself included). False (and a diagnostic) on timeout.
__device__ __forceinline__ bool sy_meet_all(const SyParams& p, int slot, int ch, u32 role, u32 what) {
    __shared__ i32 s_failed;
    const int tid = threadIdx.x, me = (int)p.rank;
    if (tid == 0) s_failed = 0;
    __syncthreads();
    if (ch == 0 && tid < SY_WORLD) st_release_sys(sig(p.peers[tid]) + slot + me, sy_call_seq(p));
    if (tid < SY_WORLD) {
        if (!sy_wait(sig(p.peers[me]) + slot + tid, sy_call_seq(p), sy_wait_ctx(p), ch, role, tid, what))
            atomicExch(&s_failed, 1);
    }
    __syncthreads();
    return s_failed == 0;
}

// End of this channel's share of a call: every thread fences its writes, the block meets, one
// thread per peer raises this channel's flag `slot + me * SY_MAX_CHANNELS + ch` there; then block 0
// (every block with `all_wait`) waits for every peer's channels. False (and a diagnostic) if a
// wait timed out.
__device__ __forceinline__ bool sy_channel_done(const SyParams& p, int slot, int ch, int nch, bool all_wait, u32 role,
                                                u32 what) {
    __shared__ i32 s_late;
    const int me = (int)p.rank;
    if (threadIdx.x == 0) s_late = 0;
    fence_acq_rel_sys();
    __syncthreads();
    sy_stamp(p, 2);
    if (threadIdx.x < SY_WORLD && (int)threadIdx.x != me)
        st_release_sys(sig(p.peers[threadIdx.x]) + slot + me * SY_MAX_CHANNELS + ch, sy_call_seq(p));
    if (all_wait || ch == 0) {
        for (int i = threadIdx.x; i < SY_WORLD * nch; i += blockDim.x) {
            const int s = i / nch, c = i % nch;
            if (s == me) continue;
            if (!sy_wait(sig(p.peers[me]) + slot + s * SY_MAX_CHANNELS + c, sy_call_seq(p), sy_wait_ctx(p), c, role, s, what)) {
                atomicExch(&s_late, 1);
                break;
            }
        }
    }
    __syncthreads();
    return s_late == 0;
}
