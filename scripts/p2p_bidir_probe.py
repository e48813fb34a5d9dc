"""Both directions at once: GPU 0 stores into GPU 1 while GPU 1 stores into GPU 0
(16-byte vector stores, `sms` blocks x `threads` threads each), the traffic
pattern of an intra-node dispatch. Prints GB/s per direction; compare with the
one-way figures of shared/baselines/p2p_sm_bw.py taken in the same run."""
import time, cupy as cp

N = 256 << 20
ITERS = 20
SRC = r'''
extern "C" __global__ void put(const int4* __restrict__ src, int4* dst, long long n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (; i < n; i += stride) dst[i] = src[i];
}'''

def main():
    for a, b in ((0, 1), (1, 0)):
        with cp.cuda.Device(a):
            try: cp.cuda.runtime.deviceEnablePeerAccess(b)
            except Exception as e: print('peer access', a, b, e)
    bufs, kern, streams = {}, {}, {}
    for d in (0, 1):
        with cp.cuda.Device(d):
            bufs[d] = (cp.ones(N // 4, dtype=cp.int32), cp.empty(N // 4, dtype=cp.int32))
            kern[d] = cp.RawKernel(SRC, 'put')
            streams[d] = cp.cuda.Stream(non_blocking=True)
    n = N // 16
    for threads in (512, 1024):
        for sms in (4, 8, 12, 16, 24, 32):
            def launch(d):
                with cp.cuda.Device(d):
                    kern[d]((sms,), (threads,), (bufs[d][0], bufs[1 - d][1], cp.int64(n)), stream=streams[d])
            def both():
                launch(0); launch(1)
            both()
            for d in (0, 1): streams[d].synchronize()
            t = time.perf_counter()
            for _ in range(ITERS): both()
            for d in (0, 1): streams[d].synchronize()
            dt = (time.perf_counter() - t) / ITERS
            print(f'bidir SM store, {sms:3d} SMs x {threads} threads per GPU: {N/dt/1e9:.1f} GB/s each direction')

if __name__ == '__main__':
    main()
