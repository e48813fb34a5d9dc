// switchyard: intra-node dispatch and combine ("senders write straight into final rows").
//
// Every rank owns one communication buffer, peer-mapped into every rank of the node:
//   [signal slots | counts | recv x | recv scales | recv idx | recv w | recv src | y | y w]
// (offsets in SyParams). A call is three steps on one stream:
//   sy_notify   (1 block)   counts per destination and per expert, each token's row position per
//                           destination (exclusive scan over tokens), exchange of counts, receive prefix.
//   sy_dispatch (C blocks)  each block (channel) copies its slice of tokens straight into the final
//                           rows of every destination: recv_x[send_base[d] + pos[t][d]].
//   sy_combine  (C blocks)  each source pulls, per token, the y rows from the ranks it went to and sums
//                           them in f32 in destination-rank order (deterministic, no atomics).
// Flags hold the call's seq and are compared with >=, so buffers are reused without memsets.
#include "common.cuh"

// Pointer to a typed region of rank r's buffer.
template <typename T>
__device__ __forceinline__ T* region(const SyParams& p, int r, u64 off) {
    return reinterpret_cast<T*>(p.peers[r] + off);
}

// ------------------------------------------------------------------ notify

// Start a call: raise this rank's call count by one. One thread; launched on the
// rank's stream before the call's first kernel, which stream order makes see it.
extern "C" __global__ void sy_advance(const SyParams p) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        volatile u64* count = reinterpret_cast<volatile u64*>(p.peers[p.rank] + SY_SIG_CALL * 8);
        *count = *count + 1;
    }
}

extern "C" __global__ void __launch_bounds__(SY_NOTIFY_THREADS, 1) sy_notify(const SyParams p) {
    const int tid = threadIdx.x;
    const int me = (int)p.rank;
    const int T = (int)p.num_tokens;
    const i64* idx = reinterpret_cast<const i64*>(p.topk_idx);
    i32* pos = reinterpret_cast<i32*>(p.pos);

    __shared__ i32 s_cnt[SY_WORLD][SY_NOTIFY_THREADS];  // per thread, then exclusive prefix
    __shared__ i32 s_exp[SY_NUM_EXPERTS];
    __shared__ i32 s_total[SY_WORLD];
    __shared__ i32 s_failed;

    for (int e = tid; e < SY_NUM_EXPERTS; e += SY_NOTIFY_THREADS) s_exp[e] = 0;
    if (tid == 0) s_failed = 0;
    __syncthreads();

    // Pass 1: each thread counts a contiguous run of tokens, so positions come out in token order.
    const int per = (T + SY_NOTIFY_THREADS - 1) / SY_NOTIFY_THREADS;
    const int t0 = min(T, tid * per), t1 = min(T, t0 + per);
    i32 cnt[SY_WORLD];
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) cnt[d] = 0;
    for (int t = t0; t < t1; ++t) {
        u32 mask = 0;
#pragma unroll
        for (int j = 0; j < SY_TOPK; ++j) {
            const i64 e = idx[(i64)t * SY_TOPK + j];
            if (e >= 0) {
                mask |= 1u << (int)(e / SY_EPR);
                atomicAdd(&s_exp[(int)e], 1);
            }
        }
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) cnt[d] += (mask >> d) & 1;
    }
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) s_cnt[d][tid] = cnt[d];
    __syncthreads();

    // Exclusive scan of each destination's column: warp d scans column d, 32 entries per step.
    const int warp = tid / 32, lane = tid % 32;
    if (warp < SY_WORLD) {
        i32 carry = 0;
        for (int base = 0; base < SY_NOTIFY_THREADS; base += 32) {
            const i32 v = s_cnt[warp][base + lane];
            i32 incl = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const i32 n = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += n;
            }
            s_cnt[warp][base + lane] = carry + incl - v;
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) s_total[warp] = carry;
    }
    __syncthreads();

    // Pass 2: positions.
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) cnt[d] = s_cnt[d][tid];
    for (int t = t0; t < t1; ++t) {
        u32 mask = 0;
#pragma unroll
        for (int j = 0; j < SY_TOPK; ++j) {
            const i64 e = idx[(i64)t * SY_TOPK + j];
            if (e >= 0) mask |= 1u << (int)(e / SY_EPR);
        }
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            const bool hit = (mask >> d) & 1;
            pos[(i64)t * SY_WORLD + d] = hit ? cnt[d] : -1;
            cnt[d] += hit;
        }
    }

    // Post my counts into every rank's counts area: my full row of per-destination counts
    // (every rank needs the whole matrix for its send bases) and rank d's slice of my expert counts.
    for (int i = tid; i < SY_WORLD * SY_WORLD; i += SY_NOTIFY_THREADS) {
        const int d = i / SY_WORLD, j = i % SY_WORLD;
        region<i32>(p, d, p.off_counts)[me * SY_WORLD + j] = s_total[j];
    }
    for (int i = tid; i < SY_WORLD * SY_EPR; i += SY_NOTIFY_THREADS) {
        const int d = i / SY_EPR, e = i % SY_EPR;
        region<i32>(p, d, p.off_counts)[SY_WORLD * SY_WORLD + me * SY_EPR + e] = s_exp[d * SY_EPR + e];
    }
    fence_acq_rel_sys();
    __syncthreads();
    if (tid < SY_WORLD) st_release_sys(sig(p.peers[tid]) + SY_SIG_NOTIFY + me, sy_call_seq(p));

    // Wait for every rank's counts (ours included: same path, no special case).
    if (tid < SY_WORLD) {
        if (!sy_wait(sig(p.peers[me]) + SY_SIG_NOTIFY + tid, sy_call_seq(p), sy_wait_ctx(p), 0, SY_ROLE_NOTIFY, tid, SY_WAIT_NOTIFY))
            atomicExch(&s_failed, 1);
    }
    __syncthreads();
    if (s_failed) return;
    fence_acq_rel_sys();

    const volatile i32* rc = region<i32>(p, me, p.off_counts);  // [src][dest]
    const volatile i32* ec = rc + SY_WORLD * SY_WORLD;           // [src][local expert]
    u8* meta = reinterpret_cast<u8*>(p.host_meta);
    if (tid == 0) {
        i32 recv_base = 0, max_any = 0;
        for (int s = 0; s < SY_WORLD; ++s) {
            reinterpret_cast<volatile i32*>(meta + SY_META_RECV_BASE)[s] = recv_base;
            recv_base += rc[s * SY_WORLD + me];
        }
        for (int d = 0; d < SY_WORLD; ++d) {
            i32 base = 0, col = 0;
            for (int s = 0; s < SY_WORLD; ++s) {
                if (s < me) base += rc[s * SY_WORLD + d];
                col += rc[s * SY_WORLD + d];
            }
            reinterpret_cast<i32*>(p.send_base)[d] = base;
            reinterpret_cast<volatile i32*>(meta + SY_META_SEND_BASE)[d] = base;
            max_any = max(max_any, col);
        }
        *reinterpret_cast<volatile i32*>(meta + SY_META_NUM_RECV) = recv_base;
        *reinterpret_cast<volatile i32*>(meta + SY_META_MAX_RECV_ANY) = max_any;
    }
    for (int e = tid; e < SY_EPR; e += SY_NOTIFY_THREADS) {
        i32 sum = 0;
        for (int s = 0; s < SY_WORLD; ++s) sum += ec[s * SY_EPR + e];
        reinterpret_cast<volatile i32*>(meta + SY_META_TPE)[e] = sum;
    }
    __threadfence_system();
}

// ---------------------------------------------------------------- dispatch

#if SY_WIRE_FP8
#define SY_WIRE_ROW_BYTES SY_HIDDEN
#else
#define SY_WIRE_ROW_BYTES (SY_HIDDEN * 2)
#endif
#if SY_X_FP8
#define SY_X_ROW_BYTES SY_HIDDEN
#else
#define SY_X_ROW_BYTES (SY_HIDDEN * 2)
#endif
#define SY_WIRE_V4 (SY_WIRE_ROW_BYTES / 16)

static_assert(!(SY_X_FP8 && !SY_WIRE_FP8), "FP8 input travels as FP8");

// Signal that my receive area is free for this call, then wait until every destination's is.
// Guards cached dispatch (no notify step before it) against overwriting rows a slow rank still reads.
__device__ __forceinline__ bool dispatch_entry(const SyParams& p, int ch) {
    return sy_meet_all(p, SY_SIG_RECV_READY, ch, SY_ROLE_SENDER, SY_WAIT_RECV_READY);
}

// Row of a token in rank d's receive area (dispatch) or y (combine), from its position q there and
// where my rows start there (base); -1 where it was not sent. Never a row past the capacity (the
// host refuses such calls; this is the backstop).
__device__ __forceinline__ i64 holder_row(const SyParams& p, i32 q, i32 base) {
    const i64 r = q >= 0 ? (i64)base + q : -1;
    return r >= (i64)p.max_recv ? -1 : r;
}

// Destination rows of a token from its positions (-1: not sent there). False when it goes nowhere.
__device__ __forceinline__ bool dest_rows(const SyParams& p, const i32 (&q)[SY_WORLD], const i32* send_base, i64 (&row)[SY_WORLD]) {
    bool any = false;
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) {
        row[d] = holder_row(p, q[d], send_base[d]);
        any |= row[d] >= 0;
    }
    return any;
}

// A token's top-k ids, translated to each destination's local ids (-1 elsewhere), its weights
// (0 where -1) and its (source rank, source token), into every destination row.
__device__ __forceinline__ void write_meta(const SyParams& p, int t, const i64 (&row)[SY_WORLD], int lane) {
    const i64* idx = reinterpret_cast<const i64*>(p.topk_idx);
    const float* wts = reinterpret_cast<const float*>(p.topk_weights);
    for (int j = lane; j < SY_TOPK; j += 32) {
        const i64 e = idx[(i64)t * SY_TOPK + j];
        const float w = wts[(i64)t * SY_TOPK + j];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            if (row[d] < 0) continue;
            const bool mine = e >= (i64)d * SY_EPR && e < (i64)(d + 1) * SY_EPR;
            region<i32>(p, d, p.off_recv_idx)[row[d] * SY_TOPK + j] = mine ? (i32)(e - (i64)d * SY_EPR) : -1;
            region<float>(p, d, p.off_recv_w)[row[d] * SY_TOPK + j] = mine ? w : 0.f;
        }
    }
    // Constant indices keep row[] in registers (row[lane] would put it on the stack).
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) {
        if (lane == d && row[d] >= 0) {
            i32* srcinfo = region<i32>(p, d, p.off_recv_src) + row[d] * 2;
            srcinfo[0] = (i32)p.rank;
            srcinfo[1] = t;
        }
    }
}

#if SY_WIRE_FP8 && !SY_X_FP8
// BF16 in, FP8 out, one token per warp step: 8 lanes per 128-element group (16 elements each),
// 4 groups per warp step, stored to every destination row of the token.
__device__ __forceinline__ void dispatch_quantized(const SyParams& p, int t_begin, int t_end, int warp, int lane) {
    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    for (int t = t_begin + warp; t < t_end; t += SY_WARPS) {
        i32 q[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) q[d] = pos[(i64)t * SY_WORLD + d];
        i64 row[SY_WORLD];
        if (!dest_rows(p, q, send_base, row)) continue;
        const u8* xrow = reinterpret_cast<const u8*>(p.x) + (i64)t * SY_X_ROW_BYTES;
        const int sub = lane % 8;
        for (int g0 = 0; g0 < SY_GROUPS; g0 += 4) {
            const int g = g0 + lane / 8;
            float v[16];
            float amax = 0.f;
            if (g < SY_GROUPS) {
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
            // The reference rule (src/quant.rs), operation for operation, in IEEE f32. The same as
            // quantize_piece (common.cuh), kept inline here: through the helper this kernel measured
            // 0.7% slower (world-1 HT-A, 8 SMs, 340 vs 342 us, three rounds alternating).
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
            if (g < SY_GROUPS) {
                v4u32 e;
                e.x = f32x2_to_e4m3x2(v[0] * inv, v[1] * inv) | (f32x2_to_e4m3x2(v[2] * inv, v[3] * inv) << 16);
                e.y = f32x2_to_e4m3x2(v[4] * inv, v[5] * inv) | (f32x2_to_e4m3x2(v[6] * inv, v[7] * inv) << 16);
                e.z = f32x2_to_e4m3x2(v[8] * inv, v[9] * inv) | (f32x2_to_e4m3x2(v[10] * inv, v[11] * inv) << 16);
                e.w = f32x2_to_e4m3x2(v[12] * inv, v[13] * inv) | (f32x2_to_e4m3x2(v[14] * inv, v[15] * inv) << 16);
#pragma unroll
                for (int d = 0; d < SY_WORLD; ++d) {
                    if (row[d] < 0) continue;
                    u8* dst = region<u8>(p, d, p.off_recv_x) + row[d] * SY_WIRE_ROW_BYTES + g * 128 + sub * 16;
                    st_na_v4(reinterpret_cast<v4u32*>(dst), e);
                    if (sub == 0) region<float>(p, d, p.off_recv_scales)[row[d] * SY_GROUPS + g] = scale;
                }
            }
        }
        if (p.flags & SY_FLAG_WRITE_META) write_meta(p, t, row, lane);
    }
}
#else
// Same type in and out. A warp's work is a stream of items, (token, batch of SY_DUNROLL 16-byte
// vectors per lane); the loads of item i + 1 (with, at a token's first item, its positions and
// FP8 scales) go out before the stores of item i, so a warp always has loads in flight across its
// stores and across tokens. Loads never depend on where the row goes, only the stores do.
// One token at a time, with the positions, each batch and the scales loaded in turn, a warp
// waited one load latency per step (4 per FP8 row, 5 per BF16 row). 2x H200, HT-A, same run:
// cached FP8 dispatch at 12 SMs 120.7 -> 113.4 us, cached BF16 at 8 SMs 207.8 -> 198.2 us; a first
// dispatch's FP8 rows with metadata, block 0's row work at 12 SMs ~200 -> ~103 us.
// Every warp of the grid takes an equal contiguous range of the call's items (within one), where
// whole tokens were dealt out before (4096 tokens over 12 x 16 warps left a third of the warps a
// 22nd token). Same runs, before / after: BF16 at 8 SMs 197.9-198.3 / 196.5-196.6 us, FP8 at 12
// SMs 113.3-113.4 / 112.9-113.4.
#define SY_DBATCH_V4 (32 * SY_DUNROLL)
#define SY_DBATCHES ((SY_WIRE_V4 + SY_DBATCH_V4 - 1) / SY_DBATCH_V4)
#define SY_SCALE_SLOTS (SY_X_FP8 ? (SY_GROUPS + 31) / 32 : 1)

// What one item brings into registers.
struct CopyItem {
    v4u32 v[SY_DUNROLL];
    i32 q[SY_WORLD];           // positions: a token's first item in this warp only
    float s[SY_SCALE_SLOTS];   // FP8 scales (lane + 32 * i): the token's first batch only
};

// Item (t, b); `head`: the token's first item in this warp (its positions are needed).
__device__ __forceinline__ void load_item(const SyParams& p, int t, int b, bool head, int lane, CopyItem& it) {
    const v4u32* src = reinterpret_cast<const v4u32*>(reinterpret_cast<const u8*>(p.x) + (i64)t * SY_X_ROW_BYTES);
    const int i0 = b * SY_DBATCH_V4 + lane;
#pragma unroll
    for (int u = 0; u < SY_DUNROLL; ++u)
        if (i0 + u * 32 < SY_WIRE_V4) it.v[u] = ld_nc_v4(src + i0 + u * 32);
    if (head) {
        const i32* pos = reinterpret_cast<const i32*>(p.pos);
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) it.q[d] = pos[(i64)t * SY_WORLD + d];
    }
#if SY_X_FP8
    if (b == 0) {
        const float* xs = reinterpret_cast<const float*>(p.x_scales) + (i64)t * SY_GROUPS;
#pragma unroll
        for (int i = 0; i < SY_SCALE_SLOTS; ++i) it.s[i] = lane + 32 * i < SY_GROUPS ? xs[lane + 32 * i] : 0.f;
    }
#endif
}

// With SY_FLAG_SKIP_LOCAL the host has a copy engine move my own rows (src/backend/cuda/local_copy.rs).
__device__ __forceinline__ void dispatch_copy(const SyParams& p, int warp, int lane) {
    const int me = (int)p.rank;
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    const bool skip_local = (p.flags & SY_FLAG_SKIP_LOCAL) != 0;
    const i64 total = (i64)p.num_tokens * SY_DBATCHES;
    const i64 g = (i64)blockIdx.x * SY_WARPS + warp, G = (i64)gridDim.x * SY_WARPS;
    const i64 i_begin = total * g / G, i_end = total * (g + 1) / G;
    CopyItem cur, next;
    i64 row[SY_WORLD];
#if SY_X_FP8
    float scales[SY_SCALE_SLOTS];
#endif
    bool any = false;
    if (i_begin < i_end) load_item(p, (int)(i_begin / SY_DBATCHES), (int)(i_begin % SY_DBATCHES), true, lane, cur);
    for (i64 i = i_begin; i < i_end; ++i) {
        const int t = (int)(i / SY_DBATCHES), b = (int)(i % SY_DBATCHES);
        if (b == 0 || i == i_begin) any = dest_rows(p, cur.q, send_base, row);
#if SY_X_FP8
        if (b == 0) {
#pragma unroll
            for (int j = 0; j < SY_SCALE_SLOTS; ++j) scales[j] = cur.s[j];
        }
#endif
        if (i + 1 < i_end) {
            const int b1 = (int)((i + 1) % SY_DBATCHES);
            load_item(p, (int)((i + 1) / SY_DBATCHES), b1, b1 == 0, lane, next);
        }
        if (any) {
            const int i0 = b * SY_DBATCH_V4 + lane;
#pragma unroll
            for (int d = 0; d < SY_WORLD; ++d) {
                if (row[d] < 0 || (d == me && skip_local)) continue;
                v4u32* dst = reinterpret_cast<v4u32*>(region<u8>(p, d, p.off_recv_x) + row[d] * SY_WIRE_ROW_BYTES);
#pragma unroll
                for (int u = 0; u < SY_DUNROLL; ++u)
                    if (i0 + u * 32 < SY_WIRE_V4) st_na_v4(dst + i0 + u * 32, cur.v[u]);
            }
            if (b == 0) {
#if SY_X_FP8
#pragma unroll
                for (int j = 0; j < SY_SCALE_SLOTS; ++j) {
                    const int g = lane + 32 * j;
                    if (g >= SY_GROUPS) continue;
#pragma unroll
                    for (int d = 0; d < SY_WORLD; ++d)
                        if (row[d] >= 0 && !(d == me && skip_local))
                            region<float>(p, d, p.off_recv_scales)[row[d] * SY_GROUPS + g] = scales[j];
                }
#endif
                if (p.flags & SY_FLAG_WRITE_META) write_meta(p, t, row, lane);
            }
        }
        cur = next;
    }
}
#endif

extern "C" __global__ void __launch_bounds__(SY_THREADS, 1) sy_dispatch(const SyParams p) {
    const int ch = blockIdx.x, nch = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    sy_stamp(p, 0);
    if (!dispatch_entry(p, ch)) return;
    sy_stamp(p, 1);

#if SY_WIRE_FP8 && !SY_X_FP8
    const int T = (int)p.num_tokens;
    const int t_begin = (int)((i64)T * ch / nch), t_end = (int)((i64)T * (ch + 1) / nch);
    dispatch_quantized(p, t_begin, t_end, warp, lane);
#else
    dispatch_copy(p, warp, lane);
#endif

    // Completion: this channel's rows are out; block 0 waits for every peer's channels.
    sy_channel_done(p, SY_SIG_DISPATCH_ARRIVE, ch, nch, false, SY_ROLE_RECEIVER, SY_WAIT_DISPATCH_ARRIVE);
}

// ------------------------------------------------------------ bulk-copy dispatch (sm_90)
//
// Cached BF16 dispatch of the rows for my peers through the copy unit (cp.async.bulk, the TMA
// unit); a copy engine moves my own rows (SY_FLAG_SKIP_LOCAL, which the host always sets with this
// kernel). Each block runs SY_DB_PIPES pipes of one thread each (lane 0 of the block's first
// warps; every other thread only meets the block at the start and the end). A pipe bulk-copies a
// token's row into one of SY_DB_STAGES shared-memory stages, SY_DB_AHEAD tokens ahead, and
// bulk-stores each landed stage into the receive area of every peer the token goes to. The stores
// bypass the SM's queue of global stores, which bounds sy_dispatch (ncu, HT-A, 2x H200: "LG
// throttle" about half its stall cycles). 2x H200, HT-A BF16, medians of same-day runs, this /
// sy_dispatch: 195.6-198.0 / 196.5-196.6 us at 8 SMs (a copy engine moves the own rows in both),
// 194.0-196.3 / 205.5-205.7 at 12 (where sy_dispatch copies the own rows itself: beside its extra
// warps a copy engine only adds HBM traffic). Tried and slower: the own rows through the pipes
// (FP8 182 / 162 us at 8 SMs, 126 / 113 at 12) or by the block's other warps with 16-byte stores
// beside the pipes (FP8 199 / 162, 149 / 113; BF16 340 and 232): the local traffic then slows the
// pipes' bulk stores; and session 10's pipes, whose whole warp waited on every stage. Pipe shapes
// 2x6, 3x5, 4x3, 4x4 and 6x2 (stages) measured within noise. The host keeps sy_dispatch for a
// first dispatch (metadata), FP8 (the own rows' scales make a copy engine slow: a second copy per
// run), own rows in too many runs for a copy engine, and input that is not 16-byte aligned;
// sy_dispatch_bulk_smem is 0 where this kernel was not built (not sm_90, or FP8).
#ifndef SY_DB_PIPES
#define SY_DB_PIPES 3
#endif
#ifndef SY_DB_STAGES
#define SY_DB_STAGES 5
#endif
#ifndef SY_DB_AHEAD
#define SY_DB_AHEAD 3
#endif
#define SY_DB_STAGE_BYTES SY_WIRE_ROW_BYTES
// Stages per pipe: SY_DB_STAGES, or as many as fit; loads ahead at most that many.
#define SY_DB_FIT ((SY_BULK_SMEM_LIMIT - SY_DB_PIPES * SY_DB_STAGES * 8) / (SY_DB_PIPES * SY_DB_STAGE_BYTES))
#define SY_DB_S (SY_DB_FIT < SY_DB_STAGES ? SY_DB_FIT : SY_DB_STAGES)
#define SY_DB_L (SY_DB_AHEAD < SY_DB_S ? SY_DB_AHEAD : SY_DB_S)
#define SY_DB_BUILT (SY_HAS_BULK && !SY_X_FP8 && !SY_WIRE_FP8 && SY_DB_S >= 1 && SY_DB_L >= 1 && SY_DB_PIPES * 32 <= SY_THREADS)

// Dynamic shared memory of sy_dispatch_bulk in bytes (stages, then an mbarrier per stage); 0: not built.
__device__ u32 sy_dispatch_bulk_smem = SY_DB_BUILT ? SY_DB_PIPES * SY_DB_S * (SY_DB_STAGE_BYTES + 8) : 0;

#if SY_DB_BUILT
// Pipe `pipe` of block `ch` (one thread): an equal contiguous range of the call's tokens (within
// one) per pipe of the grid.
__device__ __forceinline__ void dispatch_bulk_pipe(const SyParams& p, int ch, int pipe, u8* smem) {
    const int me = (int)p.rank;
    const i64 T = (i64)p.num_tokens, g = (i64)ch * SY_DB_PIPES + pipe, G = (i64)gridDim.x * SY_DB_PIPES;
    const i64 t0 = T * g / G;
    const int n = (int)(T * (g + 1) / G - t0);
    u8* stages = smem + (size_t)pipe * SY_DB_S * SY_DB_STAGE_BYTES;
    const u32 bar0 = smem_u32(reinterpret_cast<u64*>(smem + (size_t)SY_DB_PIPES * SY_DB_S * SY_DB_STAGE_BYTES) + pipe * SY_DB_S);
    for (int s = 0; s < SY_DB_S; ++s) sy_mbar_init(bar0 + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    // The receive areas were acquired in the entry meeting (generic proxy); the stores go
    // through the async proxy.
    asm volatile("fence.proxy.async.global;" ::: "memory");

    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    i32 base[SY_WORLD];
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) base[d] = send_base[d];
    auto load = [&](int j) {  // token t0 + j's row into stage j % S
        const u32 bar = bar0 + 8 * (j % SY_DB_S), dst = smem_u32(stages + (size_t)(j % SY_DB_S) * SY_DB_STAGE_BYTES);
        sy_mbar_expect(bar, SY_DB_STAGE_BYTES);
        sy_bulk_g2s(dst, reinterpret_cast<const u8*>(p.x) + (t0 + j) * SY_X_ROW_BYTES, SY_WIRE_ROW_BYTES, bar);
    };
    for (int j = 0; j < SY_DB_L && j < n; ++j) load(j);
    // Positions of the next token, loaded a token ahead: their L2 round trip hides behind the wait.
    i32 q_next[SY_WORLD];
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) q_next[d] = n > 0 ? pos[t0 * SY_WORLD + d] : -1;
    for (int j = 0; j < n; ++j) {
        i32 q[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            q[d] = q_next[d];
            if (j + 1 < n) q_next[d] = pos[(t0 + j + 1) * SY_WORLD + d];
        }
        const int s = j % SY_DB_S;
        // Only the copy unit completes the barrier; the deadline is a backstop. On a timeout the
        // diagnostic is written, and the pipe stops and still meets the block at the end.
        if (!sy_mbar_wait(bar0 + 8 * s, (u32)((j / SY_DB_S) & 1), p.timeout_ns)) {
            sy_record_timeout(sy_wait_ctx(p), (u32)ch, SY_ROLE_SENDER, (u32)me, SY_WAIT_DISPATCH_BULK, (u64)j, (u64)n);
            break;
        }
        const u32 src = smem_u32(stages + (size_t)s * SY_DB_STAGE_BYTES);
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            const i64 row = holder_row(p, q[d], base[d]);
            if (row < 0 || d == me) continue;
            sy_bulk_s2g(region<u8>(p, d, p.off_recv_x) + row * SY_WIRE_ROW_BYTES, src, SY_WIRE_ROW_BYTES);
        }
        sy_bulk_commit();
        // Stage (j + L) % S was last read by the stores of token j + L - S: let them finish reading.
        const int jn = j + SY_DB_L;
        if (jn < n) {
            if (jn >= SY_DB_S) sy_bulk_wait_read<SY_DB_S - SY_DB_L>();
            load(jn);
        }
    }
    // The rows must have landed before the completion flag (sy_channel_done) goes up.
    sy_bulk_wait_writes();
}
#endif

extern "C" __global__ void __launch_bounds__(SY_THREADS, 1) sy_dispatch_bulk(const SyParams p) {
#if SY_DB_BUILT
    extern __shared__ __align__(128) u8 db_smem[];
    const int ch = blockIdx.x, nch = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    sy_stamp(p, 0);
    if (!dispatch_entry(p, ch)) return;
    sy_stamp(p, 1);
    if (warp < SY_DB_PIPES) {
        if (lane == 0) dispatch_bulk_pipe(p, ch, warp, db_smem);
        __syncwarp();  // the warp meets the block below as one
    }
    sy_channel_done(p, SY_SIG_DISPATCH_ARRIVE, ch, nch, false, SY_ROLE_RECEIVER, SY_WAIT_DISPATCH_ARRIVE);
#endif
}

// ----------------------------------------------------------------- combine

#define SY_Y_V4 (SY_HIDDEN * 2 / 16)
// Vectors per row loaded ahead in combine (registers: 4 x SY_CUNROLL x SY_WORLD). 2 ranks: 8
// (HT-A, 12 SMs: 234 us vs 272 us with 4, same run); more ranks keep the older, untimed values.
#ifndef SY_CUNROLL
#define SY_CUNROLL (SY_WORLD <= 2 ? 8 : (SY_WORLD <= 4 ? 2 : 1))
#endif

// One token's combine: the sum of its rows (rows[d] == nullptr: not sent to rank d) in f32, in rank
// order as the oracle sums, written as one BF16 row. Each batch of SY_CUNROLL vectors of every row is
// loaded before any is used (a peer row costs an NVLink round trip per load batch).
__device__ __forceinline__ void sum_rows_to_bf16(const v4u32* const (&rows)[SY_WORLD], v4u32* out_row, int lane) {
    for (int i0 = lane; i0 < SY_Y_V4; i0 += 32 * SY_CUNROLL) {
        v4u32 v[SY_CUNROLL][SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            if (rows[d] == nullptr) continue;
#pragma unroll
            for (int u = 0; u < SY_CUNROLL; ++u)
                if (i0 + u * 32 < SY_Y_V4) v[u][d] = ld_v4(rows[d] + i0 + u * 32);
        }
#pragma unroll
        for (int u = 0; u < SY_CUNROLL; ++u) {
            const int i = i0 + u * 32;
            if (i >= SY_Y_V4) continue;
            float acc[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] = 0.f;
#pragma unroll
            for (int d = 0; d < SY_WORLD; ++d) {
                if (rows[d] == nullptr) continue;
                add_bf16x8(acc, v[u][d]);
            }
            st_v4(out_row + i, pack_bf16x8(acc));
        }
    }
}

extern "C" __global__ void __launch_bounds__(SY_THREADS, 1) sy_combine(const SyParams p) {
    const int ch = blockIdx.x, nch = gridDim.x;
    const int me = (int)p.rank;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int T = (int)p.num_tokens;

    // Before: my y rows were copied in (stream order); tell every rank, then wait for all of theirs.
    sy_stamp(p, 0);
    if (!sy_meet_all(p, SY_SIG_COMBINE_READY, ch, SY_ROLE_RECEIVER, SY_WAIT_COMBINE_READY)) return;
    sy_stamp(p, 1);

    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    u16* out = reinterpret_cast<u16*>(p.out);
    float* out_w = reinterpret_cast<float*>(p.out_weights);
    const int t_begin = (int)((i64)T * ch / nch), t_end = (int)((i64)T * (ch + 1) / nch);

    for (int t = t_begin + warp; t < t_end; t += SY_WARPS) {
        i64 row[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) row[d] = holder_row(p, pos[(i64)t * SY_WORLD + d], send_base[d]);
        const v4u32* rows[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d)
            rows[d] = row[d] < 0 ? nullptr : reinterpret_cast<const v4u32*>(region<u8>(p, d, p.off_y) + row[d] * (SY_HIDDEN * 2));
        sum_rows_to_bf16(rows, reinterpret_cast<v4u32*>(out + (i64)t * SY_HIDDEN), lane);
        if (p.flags & SY_FLAG_WITH_WEIGHTS) {
            for (int j = lane; j < SY_TOPK; j += 32) {
                float acc = 0.f;
#pragma unroll
                for (int d = 0; d < SY_WORLD; ++d) {
                    if (row[d] < 0) continue;
                    acc += *reinterpret_cast<const volatile float*>(region<float>(p, d, p.off_y_w) + row[d] * SY_TOPK + j);
                }
                out_w[(i64)t * SY_TOPK + j] = acc;
            }
        }
    }

    // After: tell every rank this channel is done reading its y; block 0 waits for all channels of all
    // ranks before the kernel ends, so the host may overwrite y in the next call.
    sy_channel_done(p, SY_SIG_COMBINE_DONE, ch, nch, false, SY_ROLE_NOTIFY, SY_WAIT_COMBINE_DONE);
}

// ------------------------------------------------------------- bulk-copy combine (sm_90)
//
// The pull combine with its peer loads out of registers: each warp keeps a ring of SY_CB_STAGES
// shared-memory stages, and its lane 0 bulk-copies (cp.async.bulk, the TMA unit) one piece of
// every holder's row of a token into a stage while the warp sums the piece that landed before.
// Loads in flight hold no registers, so a warp keeps a whole piece of every row in flight where
// the register pull keeps SY_CUNROLL vectors (2x H200, HT-A, 12 SMs: 211-212 us against 243-248
// for the register pull, scripts/dispatch_micro.cu). Fewer, larger stages measured best: 2
// stages of quarter rows on every warp. A token's positions are read once, a token ahead, and its
// rows handed to the summing lanes through shared memory (micro, same process: 8 SMs 303-309 ->
// 264-268 us where every piece re-read them; no change at 12 SMs, where ncu's stall mix stayed
// the same: there the warps wait for the copies themselves).
// Same sums in the same order as sy_combine: same bits.
// Needs sm_90 (bulk copies, mbarrier transaction counts); the host reads sy_combine_bulk_smem,
// 0 where the kernel was compiled without them, and falls back to sy_combine.
#ifndef SY_CB_STAGES
#define SY_CB_STAGES 2
#endif
#define SY_Y_ROW_BYTES (SY_HIDDEN * 2)
// Per warp and stage, after the ring: an mbarrier and the holders' rows of the stage's token.
#define SY_CB_META_BYTES (SY_WARPS * SY_CB_STAGES * (8 + 8 * SY_WORLD))

// Bytes per piece: the row cut into the fewest equal 16-byte-aligned pieces whose stages fit.
constexpr int sy_cb_piece() {
    const int most = (SY_BULK_SMEM_LIMIT - SY_CB_META_BYTES) / (SY_WARPS * SY_CB_STAGES * SY_WORLD) / 16 * 16;
    const int pieces = (SY_Y_ROW_BYTES + most - 1) / most;
    return ((SY_Y_ROW_BYTES + pieces - 1) / pieces + 15) / 16 * 16;
}
#define SY_CB_PIECE (sy_cb_piece())
#define SY_CB_PIECES ((SY_Y_ROW_BYTES + SY_CB_PIECE - 1) / SY_CB_PIECE)
#define SY_CB_RING_BYTES (SY_WARPS * SY_CB_STAGES * SY_WORLD * SY_CB_PIECE)
static_assert(SY_CB_PIECE % 16 == 0 && SY_CB_RING_BYTES + SY_CB_META_BYTES <= SY_BULK_SMEM_LIMIT,
              "bulk-combine stages must fit shared memory");

// Dynamic shared memory of sy_combine_bulk in bytes (ring, mbarriers, row table); 0: not built.
// The host reads it by name (a variable at namespace scope keeps its name unmangled).
__device__ u32 sy_combine_bulk_smem = SY_HAS_BULK ? SY_CB_RING_BYTES + SY_CB_META_BYTES : 0;

extern "C" __global__ void __launch_bounds__(SY_THREADS, 1) sy_combine_bulk(const SyParams p) {
#if SY_HAS_BULK
    extern __shared__ __align__(128) u8 cb_smem[];
    const int ch = blockIdx.x, nch = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int T = (int)p.num_tokens;

    sy_stamp(p, 0);
    if (!sy_meet_all(p, SY_SIG_COMBINE_READY, ch, SY_ROLE_RECEIVER, SY_WAIT_COMBINE_READY)) return;
    sy_stamp(p, 1);
    // The peers' y rows were published to the generic proxy (acquired in the meeting above);
    // bulk copies read through the async proxy.
    asm volatile("fence.proxy.async.global;" ::: "memory");

    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    u16* out = reinterpret_cast<u16*>(p.out);
    float* out_w = reinterpret_cast<float*>(p.out_weights);
    u8* ring = cb_smem + (size_t)warp * SY_CB_STAGES * SY_WORLD * SY_CB_PIECE;
    u64* bars = reinterpret_cast<u64*>(cb_smem + SY_CB_RING_BYTES) + warp * SY_CB_STAGES;
    // Holders' rows of each stage's token, written by lane 0 as it fills the stage, read by the
    // warp once the stage's barrier completes (the barrier orders the write before the reads).
    i64* stage_rows = reinterpret_cast<i64*>(cb_smem + SY_CB_RING_BYTES + SY_WARPS * SY_CB_STAGES * 8) + warp * SY_CB_STAGES * SY_WORLD;
    if (lane == 0) {
        for (int s = 0; s < SY_CB_STAGES; ++s) sy_mbar_init(smem_u32(bars + s), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();

    i32 base[SY_WORLD];  // send_base: where my rows start in each holder's y
#pragma unroll
    for (int d = 0; d < SY_WORLD; ++d) base[d] = send_base[d];
    auto piece_bytes = [](int j) { return SY_Y_ROW_BYTES - j * SY_CB_PIECE < SY_CB_PIECE ? SY_Y_ROW_BYTES - j * SY_CB_PIECE : SY_CB_PIECE; };
    // Items are (token, piece j), token-major; every warp of the grid takes an equal contiguous
    // range of them (within one), item i of the range filling stage i % SY_CB_STAGES. With whole
    // tokens dealt out, 4096 tokens over 12 x 16 warps left a third of the warps a 22nd token while
    // the others idled: 12 SMs 196.5-197.2 -> 195.4-195.6 us (same runs, 2x H200, HT-A).
    const i64 g = (i64)ch * SY_WARPS + warp, G = (i64)nch * SY_WARPS, all = (i64)T * SY_CB_PIECES;
    const i64 i_begin = all * g / G;
    const int items = (int)(all * (g + 1) / G - i_begin);
    // Positions of the next token to fill, loaded a token ahead, so their L2 round trip hides
    // behind the pieces in flight. Warp-uniform: every lane loads the same words.
    i32 next_q[SY_WORLD];
    auto load_q = [&](i64 t) {
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) next_q[d] = t < T ? pos[t * SY_WORLD + d] : -1;
    };
    load_q(i_begin / SY_CB_PIECES);
    i64 fill_row[SY_WORLD];  // holder d's row of the token being filled (-1: not sent to d)
    auto issue = [&](int i) {  // every lane (warp-uniform); lane 0 issues the copies
        const i64 t = (i_begin + i) / SY_CB_PIECES;
        const int j = (int)((i_begin + i) % SY_CB_PIECES), s = i % SY_CB_STAGES;
        if (j == 0 || i == 0) {
#pragma unroll
            for (int d = 0; d < SY_WORLD; ++d) fill_row[d] = holder_row(p, next_q[d], base[d]);
            load_q(t + 1);
        }
        if (lane != 0) return;
        const u32 bytes = (u32)piece_bytes(j);
        u32 total = 0;
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            stage_rows[s * SY_WORLD + d] = fill_row[d];
            if (fill_row[d] >= 0) total += bytes;
        }
        const u32 bar = smem_u32(bars + s);
        // Arrive once (the barrier's count; release: orders the row table) and expect `total`
        // bytes; a token sent nowhere completes at once.
        sy_mbar_expect(bar, total);
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            if (fill_row[d] < 0) continue;
            const u8* src = region<u8>(p, d, p.off_y) + fill_row[d] * SY_Y_ROW_BYTES + (size_t)j * SY_CB_PIECE;
            sy_bulk_g2s(smem_u32(ring + (size_t)(s * SY_WORLD + d) * SY_CB_PIECE), src, bytes, bar);
        }
    };
    constexpr int KW = (SY_TOPK + 31) / 32;
    float wv[KW][SY_WORLD];  // the token's weights per holder, loaded with its first piece, summed after its last
    for (int i = 0; i < SY_CB_STAGES - 1 && i < items; ++i) issue(i);
    for (int i = 0; i < items; ++i) {
        // The stage item i + STAGES - 1 fills was summed by the whole warp in item i - 1.
        __syncwarp();
        if (i + SY_CB_STAGES - 1 < items) issue(i + SY_CB_STAGES - 1);
        const i64 t = (i_begin + i) / SY_CB_PIECES;
        const int j = (int)((i_begin + i) % SY_CB_PIECES), s = i % SY_CB_STAGES;
        // On a timeout the diagnostic is written; leave the loop and still meet the block below.
        if (!sy_bulk_wait(smem_u32(bars + s), (u32)((i / SY_CB_STAGES) & 1), p, ch, (u64)i, (u64)items)) break;
        i64 row[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) row[d] = stage_rows[s * SY_WORLD + d];
        if ((j == 0 || i == 0) && (p.flags & SY_FLAG_WITH_WEIGHTS)) {
            // Issued at the token's first piece here, used after its last: the loads' latency
            // hides behind the pieces. The warp with a token's last piece writes its weights.
#pragma unroll
            for (int kw = 0; kw < KW; ++kw)
#pragma unroll
                for (int d = 0; d < SY_WORLD; ++d)
                    wv[kw][d] = row[d] >= 0 && lane + 32 * kw < SY_TOPK
                                    ? *reinterpret_cast<const volatile float*>(region<float>(p, d, p.off_y_w) + row[d] * SY_TOPK + lane + 32 * kw)
                                    : 0.f;
        }
        const int nv = piece_bytes(j) / 16;
        v4u32* dst = reinterpret_cast<v4u32*>(reinterpret_cast<u8*>(out + (i64)t * SY_HIDDEN) + (size_t)j * SY_CB_PIECE);
        for (int v = lane; v < nv; v += 32) {
            float acc[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] = 0.f;
#pragma unroll
            for (int d = 0; d < SY_WORLD; ++d) {
                if (row[d] < 0) continue;
                add_bf16x8(acc, reinterpret_cast<const v4u32*>(ring + (size_t)(s * SY_WORLD + d) * SY_CB_PIECE)[v]);
            }
            st_v4(dst + v, pack_bf16x8(acc));
        }
        if (j == SY_CB_PIECES - 1 && (p.flags & SY_FLAG_WITH_WEIGHTS)) {
#pragma unroll
            for (int kw = 0; kw < KW; ++kw) {
                if (lane + 32 * kw >= SY_TOPK) continue;
                float acc = 0.f;
#pragma unroll
                for (int d = 0; d < SY_WORLD; ++d)
                    if (row[d] >= 0) acc += wv[kw][d];
                out_w[(i64)t * SY_TOPK + lane + 32 * kw] = acc;
            }
        }
    }
    sy_channel_done(p, SY_SIG_COMBINE_DONE, ch, nch, false, SY_ROLE_NOTIFY, SY_WAIT_COMBINE_DONE);
#endif
}

// ------------------------------------------------------------ push combine
//
// The reverse of dispatch with the same "writes, not reads" shape: each rank pushes the y rows it
// holds for other ranks into their push-combine slots (token t from rank d lands at t * W + d) with
// 16-byte stores over NVLink, which go out without waiting for a round trip (the pull combine above
// waits one NVLink round trip per load batch). Then every rank sums, per token of its own, the row it
// keeps locally (in its own y) and the slots pushed to it, in rank order as the oracle does.
// Needs num_tokens * W <= max_recv (the host checks and falls back to the pull kernel).

extern "C" __global__ void __launch_bounds__(SY_THREADS, 1) sy_combine_push(const SyParams p) {
    const int ch = blockIdx.x, nch = gridDim.x;
    const int me = (int)p.rank;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int T = (int)p.num_tokens, R = (int)p.num_recv;

    // Entry: my slots are free for this call (my previous combine ended: stream order); tell every
    // rank, then wait until every rank's slots are free.
    sy_stamp(p, 0);
    if (!sy_meet_all(p, SY_SIG_COMBINE_READY, ch, SY_ROLE_SENDER, SY_WAIT_COMBINE_READY)) return;
    sy_stamp(p, 1);

    // Push: this channel's share of my y rows, one warp per row; rows of my own tokens stay put.
    const i32* src_info = reinterpret_cast<const i32*>(p.src_info);
    // Rows are dealt out cyclically: they are ordered by source, so contiguous slices would leave
    // the channels holding my own tokens' rows idle while the others push everything.
    for (int r = ch * SY_WARPS + warp; r < R; r += nch * SY_WARPS) {
        const int s = src_info[2 * r], t = src_info[2 * r + 1];
        if (s == me || s < 0 || s >= SY_WORLD || (i64)t * SY_WORLD + me >= (i64)p.max_recv) continue;
        const i64 slot = (i64)t * SY_WORLD + me;
        const v4u32* y = reinterpret_cast<const v4u32*>(region<u8>(p, me, p.off_y) + (i64)r * (SY_HIDDEN * 2));
        v4u32* dst = reinterpret_cast<v4u32*>(region<u8>(p, s, p.off_comb) + slot * (SY_HIDDEN * 2));
        for (int i0 = lane; i0 < SY_Y_V4; i0 += 32 * SY_DUNROLL) {
            v4u32 v[SY_DUNROLL];
#pragma unroll
            for (int u = 0; u < SY_DUNROLL; ++u)
                if (i0 + u * 32 < SY_Y_V4) v[u] = ld_nc_v4(y + i0 + u * 32);
#pragma unroll
            for (int u = 0; u < SY_DUNROLL; ++u)
                if (i0 + u * 32 < SY_Y_V4) st_na_v4(dst + i0 + u * 32, v[u]);
        }
        if (p.flags & SY_FLAG_WITH_WEIGHTS) {
            for (int j = lane; j < SY_TOPK; j += 32)
                region<float>(p, s, p.off_comb_w)[slot * SY_TOPK + j] = region<float>(p, me, p.off_y_w)[(i64)r * SY_TOPK + j];
        }
    }

    // Arrival: this channel's pushes are out; raise its flag on every peer. Then every channel waits
    // for every peer's channels: the rows of my tokens may come from any of them.
    if (!sy_channel_done(p, SY_SIG_COMBINE_DONE, ch, nch, true, SY_ROLE_RECEIVER, SY_WAIT_COMBINE_PUSHED)) return;
    fence_acq_rel_sys();

    // Reduce my tokens of this channel: f32 sums in rank order, BF16 out.
    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    u16* out = reinterpret_cast<u16*>(p.out);
    float* out_w = reinterpret_cast<float*>(p.out_weights);
    const int t_begin = (int)((i64)T * ch / nch), t_end = (int)((i64)T * (ch + 1) / nch);
    for (int t = t_begin + warp; t < t_end; t += SY_WARPS) {
        const v4u32* rows[SY_WORLD];
        const float* wrow[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            const i32 q = pos[(i64)t * SY_WORLD + d];
            const i64 own_row = (i64)send_base[d] + q;
            const bool sent = q >= 0 && !(d == me && own_row >= (i64)p.max_recv);
            const i64 slot = (i64)t * SY_WORLD + d;
            rows[d] = !sent ? nullptr
                      : d == me ? reinterpret_cast<const v4u32*>(region<u8>(p, me, p.off_y) + own_row * (SY_HIDDEN * 2))
                                : reinterpret_cast<const v4u32*>(region<u8>(p, me, p.off_comb) + slot * (SY_HIDDEN * 2));
            wrow[d] = !sent ? nullptr
                      : d == me ? region<float>(p, me, p.off_y_w) + own_row * SY_TOPK
                                : region<float>(p, me, p.off_comb_w) + slot * SY_TOPK;
        }
        sum_rows_to_bf16(rows, reinterpret_cast<v4u32*>(out + (i64)t * SY_HIDDEN), lane);
        if (p.flags & SY_FLAG_WITH_WEIGHTS) {
            for (int j = lane; j < SY_TOPK; j += 32) {
                float acc = 0.f;
#pragma unroll
                for (int d = 0; d < SY_WORLD; ++d)
                    if (wrow[d] != nullptr) acc += wrow[d][j];
                out_w[(i64)t * SY_TOPK + j] = acc;
            }
        }
    }
}

// ---- Row moves of the two-hop route on one GPU (not specialized on the spec) ----

// Row moves: row dst_idx[i] of `dst` = row src_idx[i] of `src`, for i < n (an index array
// of 0 means the identity); rows of `row_bytes` bytes (a multiple of 4; 16-byte moves when it
// is a multiple of 16 and both bases are aligned). One warp per row. Packs the rail's send
// buffer, and puts each part's rows into (source rank, source token) order.
extern "C" __global__ void sy_gather_rows(u64 dst, u64 dst_idx, u64 src, u64 src_idx, u64 n_rows, u64 bytes_per_row) {
    const u32 n = (u32)n_rows, row_bytes = (u32)bytes_per_row;
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    const i32* to_index = reinterpret_cast<const i32*>(dst_idx);
    const i32* from_index = reinterpret_cast<const i32*>(src_idx);
    const bool wide = row_bytes % 16 == 0 && (dst | src) % 16 == 0;
    for (u32 i = blockIdx.x * warps + threadIdx.x / 32; i < n; i += gridDim.x * warps) {
        const u64 from_row = from_index != nullptr ? (u64)from_index[i] : i;
        const u64 to_row = to_index != nullptr ? (u64)to_index[i] : i;
        const u8* from = reinterpret_cast<const u8*>(src) + from_row * row_bytes;
        u8* to = reinterpret_cast<u8*>(dst) + to_row * row_bytes;
        if (wide) {
            for (u32 b = lane * 16; b < row_bytes; b += 32 * 16)
                st_v4(reinterpret_cast<v4u32*>(to + b), ld_nc_v4(reinterpret_cast<const v4u32*>(from + b)));
        } else {
            for (u32 b = lane * 4; b < row_bytes; b += 32 * 4)
                *reinterpret_cast<u32*>(to + b) = *reinterpret_cast<const u32*>(from + b);
        }
    }
}

// Quantizing gather: BF16 row src_idx[i] of `src` (`hidden` a multiple of 128) as E4M3 row i
// of `dst` with its 1x128 scales as row i of `dst_scales`, for i < n: the rule of sy_dispatch
// (src/quant.rs). One warp per row, 8 lanes per group. Packs BF16 rows as FP8 for the rail.
extern "C" __global__ void sy_gather_quantize(u64 dst, u64 dst_scales, u64 src, u64 src_idx, u64 n_rows, u64 hidden_size) {
    const u32 n = (u32)n_rows, hidden = (u32)hidden_size;
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32, sub = lane % 8;
    const i32* from_index = reinterpret_cast<const i32*>(src_idx);
    const int groups = (int)(hidden / 128);
    for (u32 i = blockIdx.x * warps + threadIdx.x / 32; i < n; i += gridDim.x * warps) {
        const u8* xrow = reinterpret_cast<const u8*>(src) + (u64)from_index[i] * hidden * 2;
        for (int g0 = 0; g0 < groups; g0 += 4) {
            const int g = g0 + lane / 8;
            v4u32 q;
            const float scale = quantize_piece(xrow, g, groups, sub, q);
            if (g < groups) {
                st_v4(reinterpret_cast<v4u32*>(reinterpret_cast<u8*>(dst) + (u64)i * hidden + g * 128 + sub * 16), q);
                if (sub == 0) reinterpret_cast<float*>(dst_scales)[(u64)i * groups + g] = scale;
            }
        }
    }
}

// Sum of partial rows: row t of `out` (BF16, `hidden` a multiple of 8) = the f32 sum of the
// BF16 rows src[t * n_src + j] (j < n_src; -1: none), rounded once; zero without any. A source
// s < split is row s of `a`, otherwise row s - split of `b`. One warp per token. Sums each
// token's per-node partial sums after the rail brought them back.
extern "C" __global__ void sy_sum_rows(u64 out, u64 a, u64 b, u64 src, u64 split_at, u64 tokens, u64 sources_per_token, u64 hidden_size) {
    const u32 split = (u32)split_at, n_tokens = (u32)tokens, n_src = (u32)sources_per_token, hidden = (u32)hidden_size;
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    const i32* sources = reinterpret_cast<const i32*>(src);
    const u32 v4_per_row = hidden / 8;
    for (u32 t = blockIdx.x * warps + threadIdx.x / 32; t < n_tokens; t += gridDim.x * warps) {
        v4u32* to = reinterpret_cast<v4u32*>(out) + (u64)t * v4_per_row;
        for (u32 i = lane; i < v4_per_row; i += 32) {
            float acc[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] = 0.f;
            for (u32 j = 0; j < n_src; ++j) {
                const i32 s = sources[(u64)t * n_src + j];
                if (s < 0) continue;
                const u64 base = (u32)s < split ? a + (u64)s * hidden * 2 : b + (u64)(s - split) * hidden * 2;
                add_bf16x8(acc, ld_nc_v4(reinterpret_cast<const v4u32*>(base) + i));
            }
            st_v4(to + i, pack_bf16x8(acc));
        }
    }
}

// Sum of partial weights: row t of `out` (`k` f32) = the sum of the f32 rows src[t * n_src + j]
// (j < n_src; -1: none), in j order; zero without any. Sources as in sy_sum_rows. One thread
// per (token, slot).
extern "C" __global__ void sy_sum_weights(u64 out, u64 a, u64 b, u64 src, u64 split_at, u64 tokens, u64 sources_per_token, u64 slots) {
    const u32 split = (u32)split_at, n_tokens = (u32)tokens, n_src = (u32)sources_per_token, k = (u32)slots;
    const i32* sources = reinterpret_cast<const i32*>(src);
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < (u64)n_tokens * k; e += (u64)gridDim.x * blockDim.x) {
        const u64 t = e / k, j = e % k;
        float acc = 0.f;
        for (u32 n = 0; n < n_src; ++n) {
            const i32 s = sources[t * n_src + n];
            if (s < 0) continue;
            const float* row = (u32)s < split ? reinterpret_cast<const float*>(a) + (u64)s * k
                                              : reinterpret_cast<const float*>(b) + (u64)(s - split) * k;
            acc += row[j];
        }
        reinterpret_cast<float*>(out)[e] = acc;
    }
}
