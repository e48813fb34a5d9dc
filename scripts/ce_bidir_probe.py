"""Copy engines over NVLink, both directions at once (2 GPUs): what a combine whose rows are
moved by copy engines could reach. Each GPU moves BYTES (HT-A combine: 4081 rows x 14336 B)
to or from the other on a stream of its own, at the same time:
  push   each GPU's stream copies its buffer into the peer's
  pull   each GPU's stream copies the peer's buffer into its own
as one copy, as CHUNKS back-to-back copies, as CHUNKS copies each followed by a one-thread
kernel (what a per-chunk mark costs the copy engine), and as CHUNKS copies dealt round-robin
over several streams. Every GPU's streams are held behind a ~5 ms sleep kernel while the host
enqueues, so host enqueue gaps do not count. Prints the median us and GB/s per direction.
Needs cupy and 2 GPUs with peer access."""
import cupy as cp

BYTES = 4081 * 14336
ITERS = 20
MARK = r'''extern "C" __global__ void mark(unsigned long long* slot, unsigned long long v) { if (threadIdx.x == 0) *slot = v; }
extern "C" __global__ void hold(long long ns) { long long t0 = clock64(); while (clock64() - t0 < ns) { __nanosleep(1000); } }'''
MAX_STREAMS = 4


def main():
    for a, b in ((0, 1), (1, 0)):
        with cp.cuda.Device(a):
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(b)
            except Exception as e:  # already enabled
                print("peer access", a, b, e)
    buf, streams, kern, slot = {}, {}, {}, {}
    for d in (0, 1):
        with cp.cuda.Device(d):
            buf[d] = (cp.ones(BYTES // 4, dtype=cp.int32), cp.empty(BYTES // 4, dtype=cp.int32))
            streams[d] = [cp.cuda.Stream(non_blocking=True) for _ in range(MAX_STREAMS)]
            kern[d] = (cp.RawKernel(MARK, "mark"), cp.RawKernel(MARK, "hold"))
            slot[d] = cp.zeros(1, dtype=cp.uint64)

    def enqueue(d, mode, chunks, marks, nstreams):
        peer = 1 - d
        src, dst = (buf[d][0], buf[peer][1]) if mode == "push" else (buf[peer][0], buf[d][1])
        step = (BYTES + chunks - 1) // chunks // 16 * 16
        with cp.cuda.Device(d):
            for c in range(chunks):
                off = c * step
                n = min(step, BYTES - off)
                if n <= 0:
                    break
                st = streams[d][c % nstreams]
                cp.cuda.runtime.memcpyAsync(dst.data.ptr + off, src.data.ptr + off, n, cp.cuda.runtime.memcpyDefault, st.ptr)
                if marks:
                    kern[d][0]((1,), (32,), (slot[d], cp.uint64(c + 1)), stream=st)

    for mode in ("push", "pull"):
        for chunks, marks, nstreams in ((1, False, 1), (16, False, 1), (16, True, 1), (16, False, 2), (16, False, 4), (16, True, 4)):
            times = []
            for it in range(ITERS + 2):
                ev = {}
                for d in (0, 1):
                    with cp.cuda.Device(d):
                        for st in streams[d]:
                            st.synchronize()
                        # Hold every stream of this GPU until the host has enqueued everything.
                        kern[d][1]((1,), (32,), (cp.int64(10_000_000),), stream=streams[d][0])
                        ev[d] = (cp.cuda.Event(), cp.cuda.Event(), [cp.cuda.Event() for _ in range(nstreams)])
                        ev[d][0].record(streams[d][0])
                        for st in streams[d][1:nstreams]:
                            st.wait_event(ev[d][0])
                for d in (0, 1):
                    enqueue(d, mode, chunks, marks, nstreams)
                for d in (0, 1):
                    with cp.cuda.Device(d):
                        for i, st in enumerate(streams[d][:nstreams]):
                            ev[d][2][i].record(st)
                            streams[d][0].wait_event(ev[d][2][i])
                        ev[d][1].record(streams[d][0])
                for d in (0, 1):
                    with cp.cuda.Device(d):
                        ev[d][1].synchronize()
                if it >= 2:
                    times.append(max(cp.cuda.get_elapsed_time(ev[d][0], ev[d][1]) for d in (0, 1)) * 1e3)
            times.sort()
            med = times[len(times) // 2]
            print(f"{mode:4s} chunks {chunks:2d} marks {str(marks):5s} streams {nstreams}: {med:8.1f} us  {BYTES / med / 1e3:6.1f} GB/s per direction")

if __name__ == "__main__":
    main()
