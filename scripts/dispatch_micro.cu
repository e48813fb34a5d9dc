// Dispatch micro-benchmark on 2 GPUs of one process (a perf-investigation tool, not part of the runtime).
//
// Builds the real `sy_dispatch` from kernels/intranode.cu next to stripped-down copies of its inner
// loop, launches both GPUs' kernels from one host thread (no host skew), and prints the device time
// per variant, so the cost of each piece of the real kernel can be read off as a difference:
//   probe        grid-stride 16-byte copy of the remote rows (the link with nothing else)
//   warp/R       one warp per token, rows to the remote rank only, rows at t (no position lookup)
//   warp/RL      ... to both ranks (the local copy included)
//   warp/RL+pos  ... with the per-token position lookup of the real kernel
//   real         sy_dispatch as the runtime launches it (cached: no metadata; meta: with it)
// Build (on the GPU machine; -D values as the runtime passes them):
//   nvcc -O3 -arch=sm_90a --expt-relaxed-constexpr -Ikernels -DSY_WORLD=2 -DSY_HIDDEN=7168 -DSY_TOPK=8 -DSY_NUM_EXPERTS=256 \
//        -DSY_X_FP8=0 -DSY_WIRE_FP8=0 -DSY_THREADS=512 scripts/dispatch_micro.cu -o dispatch_micro
// Without a GPU (to carry the binary to one): the same command with the nvcc of the pip wheels
// nvidia-cuda-nvcc, nvidia-nvvm and nvidia-cuda-crt (13.0.x, unpacked into one tree) and
// `-L<nvidia-cuda-runtime>/lib -cudart static`.
// Run: ./dispatch_micro [tokens=4096] [iters=20]
// MICRO_COMBINE=1: combine instead, of the rows one real dispatch delivered: sy_combine (pull)
// against sy_combine_bulk (bulk-copy loads into shared-memory stages), whose output must match
// sy_combine's bit for bit. -DSY_CB_STAGES=N and -DSY_THREADS=N vary the bulk kernel's shape.
// MICRO_PROFILE=cached|cached-peers|bulk: only that kernel (cached dispatch, the same without my own
// rows as when a copy engine moves them, or the bulk combine) at the SM counts of MICRO_SMS (default
// 12), for Nsight Compute: GPU 0's kernel is launched before GPU 1's, so `ncu --devices 1
// --replay-mode application` profiles GPU 1's while GPU 0's runs beside it, as in a real call.
// MICRO_TMA_ONLY=1: only the bulk-copy (TMA) dispatch variants (tma_copy), own rows included;
// with MICRO_TMA_PEERS=1 peer rows only, against sy_dispatch with SY_FLAG_SKIP_LOCAL.
// MICRO_SMS=a,b,...: the SM counts to time (all modes). MICRO_TIMEOUT_S: the kernels' wait deadline
// (default 10). -DSY_X_FP8=1 -DSY_WIRE_FP8=1: FP8 rows with their scales.
#include "intranode.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <atomic>
#include <thread>
#include <unistd.h>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

enum { M_LOCAL = 1, M_REMOTE = 2, M_POS = 4 };

template <int MODE>
__global__ void __launch_bounds__(SY_THREADS, 1) exp_copy(const SyParams p) {
    const int ch = blockIdx.x, nch = gridDim.x, me = (int)p.rank;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int T = (int)p.num_tokens;
    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    const int t_begin = (int)((i64)T * ch / nch), t_end = (int)((i64)T * (ch + 1) / nch);
    for (int t = t_begin + warp; t < t_end; t += SY_WARPS) {
        i64 row[SY_WORLD];
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            const bool want = d == me ? (MODE & M_LOCAL) : (MODE & M_REMOTE);
            if (MODE & M_POS) {
                const i32 q = pos[(i64)t * SY_WORLD + d];
                row[d] = (want && q >= 0) ? (i64)send_base[d] + q : -1;
            } else {
                row[d] = want ? (i64)t + (i64)me * T : -1;
            }
        }
        const v4u32* src = reinterpret_cast<const v4u32*>(reinterpret_cast<const u8*>(p.x) + (i64)t * SY_X_ROW_BYTES);
        for (int i0 = lane; i0 < SY_WIRE_V4; i0 += 32 * SY_DUNROLL) {
            v4u32 v[SY_DUNROLL];
#pragma unroll
            for (int u = 0; u < SY_DUNROLL; ++u)
                if (i0 + u * 32 < SY_WIRE_V4) v[u] = ld_nc_v4(src + i0 + u * 32);
#pragma unroll
            for (int d = 0; d < SY_WORLD; ++d) {
                if (row[d] < 0) continue;
                v4u32* dst = reinterpret_cast<v4u32*>(region<u8>(p, d, p.off_recv_x) + row[d] * SY_WIRE_ROW_BYTES);
#pragma unroll
                for (int u = 0; u < SY_DUNROLL; ++u)
                    if (i0 + u * 32 < SY_WIRE_V4) st_na_v4(dst + i0 + u * 32, v[u]);
            }
        }
    }
}

__global__ void probe_copy(const v4u32* src, v4u32* dst, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) dst[i] = src[i];
}

// ---- bulk-copy (TMA) variant: one lane per pipe drives loads into shared stages and bulk stores out
// (common.cuh's bulk-copy helpers; the runtime's version of it is sy_dispatch_bulk).
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    sy_mbar_expect(bar, bytes);
    sy_bulk_g2s(dst, src, bytes, bar);
}

// PEERS: rows to the other ranks only (my own rows left to a copy engine, as SY_FLAG_SKIP_LOCAL).
template <int NP, int S, int L, bool PEERS = false>
__global__ void __launch_bounds__(32 * NP, 1) tma_copy(const SyParams p) {
    extern __shared__ __align__(128) u8 stage[];
    __shared__ __align__(8) u64 bars[NP * S];
    const int ch = blockIdx.x, nch = gridDim.x, me = (int)p.rank;
    const int pipe = threadIdx.x / 32;
    if (threadIdx.x % 32 != 0) return;
    const int T = (int)p.num_tokens;
    const i32* pos = reinterpret_cast<const i32*>(p.pos);
    const i32* send_base = reinterpret_cast<const i32*>(p.send_base);
    const int t_begin = (int)((i64)T * ch / nch), t_end = (int)((i64)T * (ch + 1) / nch);
    const u32 bar0 = smem_u32(&bars[pipe * S]);
    const u32 st0 = smem_u32(stage + (size_t)pipe * S * SY_WIRE_ROW_BYTES);
    for (int s = 0; s < S; ++s) sy_mbar_init(bar0 + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    // Tokens of this pipe: t_begin + pipe + NP * j.
    const int n = t_end - t_begin > pipe ? (t_end - t_begin - pipe + NP - 1) / NP : 0;
    auto src_of = [&](int j) { return reinterpret_cast<const u8*>(p.x) + (i64)(t_begin + pipe + NP * j) * SY_X_ROW_BYTES; };
    for (int j = 0; j < L && j < n; ++j) bulk_load(st0 + (j % S) * SY_WIRE_ROW_BYTES, src_of(j), SY_WIRE_ROW_BYTES, bar0 + 8 * (j % S));
    for (int j = 0; j < n; ++j) {
        const int t = t_begin + pipe + NP * j, s = j % S;
        while (!mbar_try(bar0 + 8 * s, (j / S) & 1)) {
        }
#pragma unroll
        for (int d = 0; d < SY_WORLD; ++d) {
            const i32 q = pos[(i64)t * SY_WORLD + d];
            if (q < 0 || (PEERS && d == me)) continue;
            sy_bulk_s2g(region<u8>(p, d, p.off_recv_x) + ((i64)send_base[d] + q) * SY_WIRE_ROW_BYTES, st0 + s * SY_WIRE_ROW_BYTES,
                       SY_WIRE_ROW_BYTES);
        }
        sy_bulk_commit();
        const int jn = j + L;
        if (jn < n) {
            if (jn >= S) sy_bulk_wait_read<S - L>();
            bulk_load(st0 + (jn % S) * SY_WIRE_ROW_BYTES, src_of(jn), SY_WIRE_ROW_BYTES, bar0 + 8 * (jn % S));
        }
    }
    sy_bulk_wait_writes();
}


struct Gpu {
    cudaStream_t s;
    cudaEvent_t a, b;
    u8* buf;
    u8* x;
    float* x_scales;
    i32* pos;
    i32* send_base;
    i64* idx;
    float* w;
    void* meta_dev;
    SyParams p;
};

int main(int argc, char** argv) {
    const int T = argc > 1 ? atoi(argv[1]) : 4096;
    const int iters = argc > 2 ? atoi(argv[2]) : 20;
    const int W = SY_WORLD;
    if (W != 2) {
        fprintf(stderr, "built for 2 GPUs only\n");
        return 1;
    }
    // Routing: each token picks SY_TOPK distinct experts uniformly (the bench's "uniform").
    std::mt19937_64 rng(7);
    std::vector<std::vector<i64>> idx(W, std::vector<i64>((size_t)T * SY_TOPK));
    std::vector<std::vector<i32>> pos(W, std::vector<i32>((size_t)T * W));
    std::vector<std::vector<i32>> cnt(W, std::vector<i32>(W, 0));
    for (int s = 0; s < W; ++s)
        for (int t = 0; t < T; ++t) {
            std::vector<int> e(SY_NUM_EXPERTS);
            for (int i = 0; i < SY_NUM_EXPERTS; ++i) e[i] = i;
            for (int j = 0; j < SY_TOPK; ++j) std::swap(e[j], e[j + rng() % (SY_NUM_EXPERTS - j)]);
            unsigned mask = 0;
            for (int j = 0; j < SY_TOPK; ++j) {
                idx[s][(size_t)t * SY_TOPK + j] = e[j];
                mask |= 1u << (e[j] / SY_EPR);
            }
            for (int d = 0; d < W; ++d) pos[s][(size_t)t * W + d] = (mask >> d & 1) ? cnt[s][d]++ : -1;
        }
    const size_t row = SY_WIRE_ROW_BYTES;
    const i64 max_recv = 2LL * T;
    const size_t off_recv_x = 256 * (((size_t)SY_SIG_SLOTS * 8 + 255) / 256);
    const size_t off_scales = off_recv_x + max_recv * row, off_idx = off_scales + max_recv * (SY_HIDDEN / 128) * 4,
                 off_w = off_idx + max_recv * SY_TOPK * 4, off_src = off_w + max_recv * SY_TOPK * 4, total = off_src + max_recv * 8;
    Gpu g[2];
    for (int d = 0; d < W; ++d) {
        CK(cudaSetDevice(d));
        CK(cudaDeviceEnablePeerAccess(1 - d, 0));
        CK(cudaStreamCreateWithFlags(&g[d].s, cudaStreamNonBlocking));
        CK(cudaEventCreate(&g[d].a));
        CK(cudaEventCreate(&g[d].b));
        CK(cudaMalloc(&g[d].buf, total));
        CK(cudaMemset(g[d].buf, 0, total));
        CK(cudaMalloc(&g[d].x, (size_t)T * row));
        std::vector<u8> hx((size_t)T * row);
        for (auto& b : hx) b = (u8)(rng() & 0x3f);
        CK(cudaMemcpy(g[d].x, hx.data(), hx.size(), cudaMemcpyHostToDevice));
        std::vector<float> hs((size_t)T * (SY_HIDDEN / 128));
        for (auto& v : hs) v = 1.0f + (float)(rng() % 1000) / 1000.f;
        CK(cudaMalloc(&g[d].x_scales, hs.size() * 4));
        CK(cudaMemcpy(g[d].x_scales, hs.data(), hs.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&g[d].pos, pos[d].size() * 4));
        CK(cudaMemcpy(g[d].pos, pos[d].data(), pos[d].size() * 4, cudaMemcpyHostToDevice));
        std::vector<i32> sb(W);
        for (int dd = 0; dd < W; ++dd) {
            sb[dd] = 0;
            for (int s = 0; s < d; ++s) sb[dd] += cnt[s][dd];
        }
        CK(cudaMalloc(&g[d].send_base, W * 4));
        CK(cudaMemcpy(g[d].send_base, sb.data(), W * 4, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&g[d].idx, idx[d].size() * 8));
        CK(cudaMemcpy(g[d].idx, idx[d].data(), idx[d].size() * 8, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&g[d].w, (size_t)T * SY_TOPK * 4));
        CK(cudaMemset(g[d].w, 0, (size_t)T * SY_TOPK * 4));
        void* hm;
        CK(cudaHostAlloc(&hm, 4096, cudaHostAllocMapped | cudaHostAllocPortable));
        memset(hm, 0, 4096);
        CK(cudaHostGetDevicePointer(&g[d].meta_dev, hm, 0));
    }
    for (int d = 0; d < W; ++d) {
        SyParams& p = g[d].p;
        memset(&p, 0, sizeof p);
        for (int r = 0; r < W; ++r) p.peers[r] = (u64)g[r].buf;
        p.x = (u64)g[d].x;
        p.x_scales = (u64)g[d].x_scales;
        p.topk_idx = (u64)g[d].idx;
        p.topk_weights = (u64)g[d].w;
        p.pos = (u64)g[d].pos;
        p.send_base = (u64)g[d].send_base;
        p.host_meta = (u64)g[d].meta_dev;
        p.timeout_ns = (u64)((getenv("MICRO_TIMEOUT_S") ? atof(getenv("MICRO_TIMEOUT_S")) : 10.0) * 1e9);
        p.num_tokens = T;
        p.rank = d;
        p.max_recv = max_recv;
        p.off_recv_x = off_recv_x;
        p.off_recv_scales = off_scales;
        p.off_recv_idx = off_idx;
        p.off_recv_w = off_w;
        p.off_recv_src = off_src;
    }
    const double remote_bytes = (double)cnt[0][1] * row;  // rank 0 -> rank 1 (the other way is within 1%)
    printf("T=%d hidden=%d threads=%d dunroll=%d: rows 0->1 %d, 1->0 %d, remote MB per direction %.1f\n", T, SY_HIDDEN,
           SY_THREADS, SY_DUNROLL, cnt[0][1], cnt[1][0], remote_bytes / 1e6);

    auto time_it = [&](const char* name, int sms, auto launch) {
        std::vector<float> worst;
        const int gap_ms = getenv("MICRO_GAP_MS") ? atoi(getenv("MICRO_GAP_MS")) : 0;
        const bool threads = getenv("MICRO_THREADS") != nullptr;
        for (int it = 0; it < iters + 2; ++it) {
            if (gap_ms > 0) usleep(gap_ms * 1000);
            auto one = [&](int d) {
                CK(cudaSetDevice(d));
                CK(cudaEventRecord(g[d].a, g[d].s));
                sy_advance<<<1, 1, 0, g[d].s>>>(g[d].p);  // the call's sequence number, as the runtime does
                launch(d);
                CK(cudaEventRecord(g[d].b, g[d].s));
            };
            if (threads) {
                // One host thread per GPU, released together by a spin barrier (the runtime's shape).
                std::atomic<int> ready{0};
                auto body = [&](int d) {
                    ready.fetch_add(1);
                    while (ready.load() < W) {
                    }
                    one(d);
                };
                std::thread t1(body, 1);
                body(0);
                t1.join();
            } else {
                for (int d = 0; d < W; ++d) one(d);
            }
            float m = 0;
            for (int d = 0; d < W; ++d) {
                CK(cudaSetDevice(d));
                CK(cudaStreamSynchronize(g[d].s));
                CK(cudaGetLastError());
                float ms;
                CK(cudaEventElapsedTime(&ms, g[d].a, g[d].b));
                m = std::max(m, ms);
            }
            if (it >= 2) worst.push_back(m * 1e3f);
        }
        std::sort(worst.begin(), worst.end());
        const float med = worst[worst.size() / 2];
        printf("%-14s sms=%3d threads=%4d dunroll=%2d  min %8.1f us  median %8.1f us  %6.1f GB/s remote per direction\n",
               name, sms, SY_THREADS, SY_DUNROLL, worst[0], med, remote_bytes / (med * 1e-6) / 1e9);
    };

    // Weighted sum of `bytes` of device memory on GPU d: equal sums, equal contents (to a 64-bit hash).
    auto device_sum = [&](int d, const void* ptr, size_t bytes) {
        std::vector<u64> h(bytes / 8);
        CK(cudaSetDevice(d));
        CK(cudaMemcpy(h.data(), ptr, h.size() * 8, cudaMemcpyDeviceToHost));
        u64 c = 0;
        for (size_t i = 0; i < h.size(); ++i) c += h[i] * (i * 2 + 1);
        return c;
    };
    auto checksum = [&](int d) { return device_sum(d, g[d].buf + off_recv_x, (size_t)(cnt[0][d] + cnt[1][d]) * row); };
    // SM counts: MICRO_SMS=a,b,... or the mode's default list.
    auto sm_list = [&](std::vector<int> fallback) {
        const char* e = getenv("MICRO_SMS");
        if (e == nullptr) return fallback;
        std::vector<int> v;
        for (const char* c = e; *c;) {
            v.push_back(atoi(c));
            while (*c && *c != ',') ++c;
            if (*c == ',') ++c;
        }
        return v;
    };
    const char* profile = getenv("MICRO_PROFILE");
    auto clear = [&]() {
        for (int d = 0; d < W; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaMemset(g[d].buf + off_recv_x, 0, max_recv * row));
            CK(cudaDeviceSynchronize());
        }
    };
    u64 ref[2];
    auto tma_variant = [&](const char* name, auto kern, int np, int stages) {
        const int bytes = np * stages * (int)row;
        for (int d = 0; d < W; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        }
        for (int sms : sm_list({4, 8, 12, 16, 24})) {
            clear();
            time_it(name, sms, [&](int d) { kern<<<sms, 32 * np, bytes, g[d].s>>>(g[d].p); });
            const bool ok = checksum(0) == ref[0] && checksum(1) == ref[1];
            printf("%-14s sms=%3d rows %s\n", name, sms, ok ? "match the real kernel" : "DIFFER FROM THE REAL KERNEL");
        }
    };
    {
        clear();
        time_it("real/reference", 16, [&](int d) {
            g[d].p.flags = 0;
            sy_dispatch<<<16, SY_THREADS, 0, g[d].s>>>(g[d].p);
        });
        ref[0] = checksum(0);
        ref[1] = checksum(1);
    }
    if (profile != nullptr && strncmp(profile, "cached", 6) == 0) {
        const u64 flags = strcmp(profile, "cached-peers") == 0 ? SY_FLAG_SKIP_LOCAL : 0;
        for (int sms : sm_list({12})) {
            clear();
            time_it(profile, sms, [&](int d) {
                g[d].p.flags = flags;
                sy_dispatch<<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p);
            });
        }
        return 0;
    }
    const bool profile_bulk = profile != nullptr && strcmp(profile, "bulk") == 0;
    if (profile != nullptr && !profile_bulk) {
        fprintf(stderr, "MICRO_PROFILE: cached, cached-peers or bulk\n");
        return 1;
    }
    if (getenv("MICRO_COMBINE") != nullptr || profile_bulk) {
        // Combine of the rows the dispatch above delivered (its receive region serves as y).
        std::vector<u16*> out(W);
        for (int d = 0; d < W; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaMalloc(&out[d], (size_t)T * SY_HIDDEN * 2));
            g[d].p.off_y = off_recv_x;
            g[d].p.out = (u64)out[d];
            g[d].p.flags = 0;
        }
        auto out_sum = [&](int d) { return device_sum(d, out[d], (size_t)T * SY_HIDDEN * 2); };
        auto clear_out = [&]() {
            for (int d = 0; d < W; ++d) {
                CK(cudaSetDevice(d));
                CK(cudaMemset(out[d], 0, (size_t)T * SY_HIDDEN * 2));
                CK(cudaDeviceSynchronize());
            }
        };
        u64 want[2] = {0, 0};
        for (int sms : profile_bulk ? std::vector<int>{} : sm_list({8, 12, 16, 24})) {
            clear_out();
            time_it("combine/pull", sms, [&](int d) { sy_combine<<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p); });
            if (want[0] == 0 && want[1] == 0) want[0] = out_sum(0), want[1] = out_sum(1);
        }
        auto variant = [&](const char* name, auto kern, int bytes) {
            for (int d = 0; d < W; ++d) {
                CK(cudaSetDevice(d));
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
            }
            for (int sms : sm_list(profile_bulk ? std::vector<int>{12} : std::vector<int>{8, 12, 16, 24})) {
                clear_out();
                time_it(name, sms, [&](int d) { kern<<<sms, SY_THREADS, bytes, g[d].s>>>(g[d].p); });
                if (profile_bulk) continue;  // no pull reference was run
                const bool ok = out_sum(0) == want[0] && out_sum(1) == want[1];
                printf("%-14s sms=%3d output %s\n", name, sms, ok ? "matches sy_combine" : "DIFFERS FROM sy_combine");
            }
        };
        // The runtime's kernel (kernels/intranode.cu), same data, same process. Its shape comes
        // from -DSY_CB_STAGES (stages; the piece size follows) and -DSY_THREADS (warps). The
        // templated stage/piece/warp variants of session 7 (benches/results/h200x2-combine-micro/)
        // were folded into it; git history has them.
        char name[32];
        snprintf(name, sizeof name, "bulk/%dx%dx%d", SY_CB_STAGES, (int)SY_CB_PIECE, SY_WARPS);
        variant(name, sy_combine_bulk, SY_CB_RING_BYTES + SY_CB_META_BYTES);
        return 0;
    }
    if (getenv("MICRO_TMA_ONLY") == nullptr) {
    for (int sms : sm_list({4, 8, 12, 16, 24, 32})) {
        time_it("probe", sms, [&](int d) {
            const long long n = (long long)(remote_bytes / 16);
            probe_copy<<<sms, SY_THREADS, 0, g[d].s>>>(reinterpret_cast<const v4u32*>(g[d].x),
                                                      reinterpret_cast<v4u32*>(g[1 - d].buf + off_recv_x), n);
        });
        time_it("warp/R", sms, [&](int d) { exp_copy<M_REMOTE><<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p); });
        time_it("warp/RL", sms, [&](int d) { exp_copy<M_REMOTE | M_LOCAL><<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p); });
        time_it("warp/R+pos", sms, [&](int d) { exp_copy<M_REMOTE | M_POS><<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p); });
        time_it("warp/RL+pos", sms, [&](int d) { exp_copy<M_REMOTE | M_LOCAL | M_POS><<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p); });
        time_it("real/cached", sms, [&](int d) {
            g[d].p.flags = 0;
            sy_dispatch<<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p);
        });
        time_it("real/meta", sms, [&](int d) {
            g[d].p.flags = SY_FLAG_WRITE_META;
            sy_dispatch<<<sms, SY_THREADS, 0, g[d].s>>>(g[d].p);
        });
    }
    }
    if (getenv("MICRO_TMA_PEERS") != nullptr) {
        // Peer rows only: the reference is sy_dispatch with SY_FLAG_SKIP_LOCAL.
        clear();
        time_it("real/peers", 16, [&](int d) {
            g[d].p.flags = SY_FLAG_SKIP_LOCAL;
            sy_dispatch<<<16, SY_THREADS, 0, g[d].s>>>(g[d].p);
        });
        ref[0] = checksum(0);
        ref[1] = checksum(1);
        tma_variant("tmaP/2x6/3", tma_copy<2, 6, 3, true>, 2, 6);
        tma_variant("tmaP/4x3/2", tma_copy<4, 3, 2, true>, 4, 3);
        tma_variant("tmaP/8x1/1", tma_copy<8, 1, 1, true>, 8, 1);
        tma_variant("tmaP/6x2/1", tma_copy<6, 2, 1, true>, 6, 2);
        tma_variant("tmaP/3x5/3", tma_copy<3, 5, 3, true>, 3, 5);
        return 0;
    }
    tma_variant("tma/1x8/4", tma_copy<1, 8, 4>, 1, 8);
    tma_variant("tma/1x12/6", tma_copy<1, 12, 6>, 1, 12);
    tma_variant("tma/2x6/3", tma_copy<2, 6, 3>, 2, 6);
    tma_variant("tma/3x4/2", tma_copy<3, 4, 2>, 3, 4);
    tma_variant("tma/4x3/2", tma_copy<4, 3, 2>, 4, 3);
    tma_variant("tma/4x3/1", tma_copy<4, 3, 1>, 4, 3);
    tma_variant("tma/2x6/5", tma_copy<2, 6, 5>, 2, 6);
    return 0;
}
