//! CUDA intra-node dispatch / cached dispatch / combine against the serial oracle,
//! bit-exact (FP8 bytes and scales included, combine sums included).
//!
//! Runs world 2 (and world = GPUs when there are more): on one GPU both ranks share
//! it (`CudaCluster::on_gpus`, kernels side by side, channels capped to fit its SMs).
//! Without a GPU the test prints why and passes, unless `SWITCHYARD_REQUIRE_CUDA=1` (or 2),
//! where it fails.
//!
//!   SWITCHYARD_REQUIRE_CUDA=1 cargo test --release --test cuda_intranode -- --nocapture

use half::bf16;
use switchyard::backend::cuda::driver::{dtoh, htod, CapturedGraph, DeviceBuffer, Stream};
use switchyard::backend::cuda::{driver, CallerStream, CudaCluster, CudaRank, DeviceRows};
use switchyard::backend::{ResidentInputs, ResidentOp};
use switchyard::workload::{expert_outputs, RankInput, RoutingKind, WorkloadSpec};
use switchyard::{oracle, Communicator, Config, DType, DispatchOptions, Layout, Rows, Topology};

fn gpus_or_skip() -> Option<usize> {
    // 1: one GPU or more; 2: two (tests/cuda_rail.rs needs them), so one at least here too.
    let required = std::env::var("SWITCHYARD_REQUIRE_CUDA").is_ok_and(|v| v == "1" || v == "2");
    let n = if driver::driver_available() { driver::device_count().unwrap_or(0) } else { 0 };
    if n < 1 {
        assert!(!required, "SWITCHYARD_REQUIRE_CUDA=1 but no GPU is usable");
        eprintln!("SKIPPED: no GPU");
        return None;
    }
    Some(n.min(8))
}

struct Case {
    name: &'static str,
    tokens: usize,
    hidden: usize,
    topk: usize,
    experts: usize,
    dtype: DType,
    fp8_on_wire: bool,
    channels: usize,
    hole_rate: f64,
    alignment: usize,
}

/// Ranks of `world` on `gpus` GPUs (round robin), and the channels each may take so
/// that every channel of the ranks sharing a GPU has an SM.
fn placement(world: usize, gpus: usize, channels: usize) -> Result<(Vec<usize>, usize), String> {
    let sms = driver::Gpu::new(0).and_then(|g| g.sm_count()).map_err(|e| e.to_string())?;
    let per_gpu = world.div_ceil(gpus);
    Ok(((0..world).map(|r| r % gpus).collect(), channels.min(sms / per_gpu)))
}

fn run_case(world: usize, gpus: usize, c: &Case) -> Result<(), String> {
    let spec = WorkloadSpec {
        topology: Topology::new(1, world).unwrap(),
        tokens: c.tokens,
        hidden: c.hidden,
        topk: c.topk,
        num_experts: c.experts,
        dtype: c.dtype,
        routing: RoutingKind::Uniform,
        max_nodes: 1,
        hole_rate: c.hole_rate,
        seed: 42,
    };
    let inputs: Vec<RankInput> = spec.generate().map_err(|e| e.to_string())?;
    let options = DispatchOptions { fp8_on_wire: c.fp8_on_wire, expert_alignment: c.alignment };
    let want = oracle::dispatch(spec.topology, c.experts, c.topk, &inputs, &options);
    let ys: Vec<Vec<half::bf16>> = want.iter().enumerate().map(|(r, o)| expert_outputs(&o.x, r)).collect();
    let ws: Vec<Vec<f32>> = want.iter().map(|o| o.topk_weights.iter().map(|w| w * 0.5 + 0.25).collect()).collect();
    let want_combine = oracle::combine(&vec![c.tokens; world], c.hidden, c.topk, &want, &ys, Some(&ws));

    let (on, channels) = placement(world, gpus, c.channels)?;
    let config = Config { num_channels: channels, timeout_ms: 10_000, ..Config::default() };
    let ranks: Vec<CudaRank> = CudaCluster::on_gpus(&on, config).and_then(|cl| cl.into_ranks()).map_err(|e| e.to_string())?;
    let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .enumerate()
            .map(|(r, mut comm)| {
                let (inp, want, y, w, wc) = (&inputs[r], &want[r], &ys[r], &ws[r], &want_combine[r]);
                s.spawn(move || -> Result<u64, String> {
                    let layout = Layout::new(&inp.topk_idx, c.topk, c.experts, comm.topology()).map_err(|e| e.to_string())?;
                    let mut last = None;
                    for round in 0..2 {
                        let (got, handle) = comm
                            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &options)
                            .map_err(|e| format!("rank {r} dispatch: {e}"))?;
                        if &got != want {
                            return Err(format!(
                                "rank {r} round {round}: dispatch differs from the oracle ({})",
                                diff(&got, want)
                            ));
                        }
                        let cached = comm
                            .dispatch_cached(inp.x.as_ref(), &handle, &options)
                            .map_err(|e| format!("rank {r} cached: {e}"))?;
                        if cached != want.x {
                            return Err(format!("rank {r}: cached dispatch rows differ"));
                        }
                        let out = comm.combine(y, c.hidden, &handle, Some(w)).map_err(|e| format!("rank {r} combine: {e}"))?;
                        if &out != wc {
                            let bad = out.x.iter().zip(&wc.x).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                            return Err(format!(
                                "rank {r}: combine differs in {bad} of {} elements (weights equal: {})",
                                out.x.len(),
                                out.topk_weights == wc.topk_weights
                            ));
                        }
                        last = Some(handle);
                    }
                    // Calls captured in a CUDA graph: each replay must be a call of its own on the
                    // device (the call count, and so the flags' epoch, goes up by one), and the
                    // host calls after them must still agree with the oracle.
                    let handle = last.expect("two rounds ran");
                    let before = comm.calls_on_device().map_err(|e| e.to_string())?;
                    let resident = ResidentInputs {
                        x: inp.x.as_ref(),
                        y,
                        hidden: c.hidden,
                        handle: &handle,
                        options: &options,
                        graph: true,
                    };
                    for op in [ResidentOp::DispatchCached, ResidentOp::Combine] {
                        let times = comm.time_device_resident(op, &resident, 3).expect("cuda times device-resident calls");
                        times.map_err(|e| format!("rank {r} {op:?} as a graph: {e}"))?;
                    }
                    let replayed = comm.calls_on_device().map_err(|e| e.to_string())? - before;
                    if replayed != 6 {
                        return Err(format!("rank {r}: 6 graph replays raised the call count by {replayed}"));
                    }
                    let cached = comm
                        .dispatch_cached(inp.x.as_ref(), &handle, &options)
                        .map_err(|e| format!("rank {r} cached after graphs: {e}"))?;
                    if cached != want.x {
                        return Err(format!("rank {r}: cached dispatch rows differ after the graph replays"));
                    }
                    if !c.fp8_on_wire {
                        on_stream_in_a_graph(&mut comm, &inp.x, &want.x, y, w, wc, &handle, &options)
                            .map_err(|e| format!("rank {r} on the caller's stream: {e}"))?;
                    }
                    comm.barrier().map_err(|e| e.to_string())?;
                    comm.calls_on_device().map_err(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank thread panicked".into()))).collect()
    });
    let errs: Vec<String> = results.iter().filter_map(|r| r.clone().err()).collect();
    if !errs.is_empty() {
        return Err(errs.join("; "));
    }
    // Every rank made the same calls, so their counts agree.
    let counts: Vec<u64> = results.into_iter().map(|r| r.expect("no errors")).collect();
    if counts.iter().any(|&n| n != counts[0]) {
        return Err(format!("call counts differ across ranks: {counts:?}"));
    }
    Ok(())
}

/// `rows` with every value's sign flipped (BF16 bit 15, E4M3 bit 7; scales kept).
fn negated(rows: &Rows) -> Rows {
    match rows {
        Rows::Bf16 { hidden, data } => {
            Rows::Bf16 { hidden: *hidden, data: data.iter().map(|v| bf16::from_bits(v.to_bits() ^ 0x8000)).collect() }
        }
        Rows::Fp8 { hidden, data, scales } => {
            Rows::Fp8 { hidden: *hidden, data: data.iter().map(|b| b ^ 0x80).collect(), scales: scales.clone() }
        }
    }
}

/// Rows `x` into a fresh device buffer (payload, then scales); the buffer and the `DeviceRows` naming it.
fn upload(x: &Rows, s: &Stream) -> Result<(DeviceBuffer, DeviceRows), String> {
    let e = |e: switchyard::Error| e.to_string();
    let payload = x.num_rows() * x.dtype().row_bytes(x.hidden());
    let scales = if x.dtype() == DType::Fp8 { x.num_rows() * x.hidden() / 128 * 4 } else { 0 };
    let buf = DeviceBuffer::new(payload.next_multiple_of(16) + scales + 16).map_err(e)?;
    let rows = DeviceRows {
        data: buf.ptr(),
        scales: if scales > 0 { buf.ptr() + payload.next_multiple_of(16) as u64 } else { 0 },
        dtype: x.dtype(),
        hidden: x.hidden(),
        num_rows: x.num_rows(),
    };
    write_rows(x, &rows, s)?;
    Ok((buf, rows))
}

/// Rows `x` over the device rows `at` (same shape). Host-to-device copies only: no device
/// memory is allocated or freed, which would wait for the other rank's kernels on a shared
/// GPU while they wait for this rank.
fn write_rows(x: &Rows, at: &DeviceRows, s: &Stream) -> Result<(), String> {
    let e = |e: switchyard::Error| e.to_string();
    match x {
        Rows::Bf16 { data, .. } => htod(at.data, data, s).map_err(e),
        Rows::Fp8 { data, scales, .. } => {
            htod(at.data, data, s).map_err(e)?;
            htod(at.scales, scales, s).map_err(e)
        }
    }
}

/// The calls on device pointers, on a stream of the test's own, captured together in a
/// CUDA graph, replayed with the input and then with its negation written in between:
/// each replay's rows and sums must match the oracle's (negated for the second).
#[allow(clippy::too_many_arguments)] // the rank, its inputs and what the oracle expects of each
fn on_stream_in_a_graph(
    comm: &mut CudaRank,
    x: &Rows,
    want_rows: &Rows,
    y: &[bf16],
    w: &[f32],
    want_combined: &switchyard::CombineOutput,
    handle: &switchyard::Handle,
    options: &DispatchOptions,
) -> Result<(), String> {
    let want_out = &want_combined.x;
    let want_w = want_combined.topk_weights.as_ref().ok_or("the expected combine has weights")?;
    let e = |e: switchyard::Error| e.to_string();
    comm.calls_on_device().map_err(e)?; // binds the rank's GPU on this thread
    let s = Stream::new().map_err(e)?;
    let hidden = x.hidden();
    let (_x_buf, x_dev) = upload(x, &s)?; // held until the end: the graph reads it
    let y_rows = Rows::Bf16 { hidden, data: y.to_vec() };
    let (y_buf, y_dev) = upload(&y_rows, &s)?;
    let out = DeviceBuffer::new((want_out.len() * 2).max(16)).map_err(e)?;
    let w_buf = DeviceBuffer::new((w.len() * 4).max(16)).map_err(e)?;
    htod(w_buf.ptr(), w, &s).map_err(e)?;
    let out_w = DeviceBuffer::new((want_w.len() * 4).max(16)).map_err(e)?;
    let weights = Some([w_buf.ptr(), out_w.ptr()]);
    let on = CallerStream(s.raw() as u64);
    // Outside any capture first: kernels compiled, the handle's plan uploaded.
    comm.dispatch_cached_on(x_dev, handle, options, on).map_err(e)?;
    comm.combine_on(y_buf.ptr(), hidden, handle, out.ptr(), weights, on).map_err(e)?;
    s.sync().map_err(e)?;
    comm.device_error().map_err(e)?;
    CapturedGraph::begin_capture(&s).map_err(e)?;
    let enqueued = comm.dispatch_cached_on(x_dev, handle, options, on).and_then(|recv| {
        comm.combine_on(y_buf.ptr(), hidden, handle, out.ptr(), weights, on)?;
        Ok(recv)
    });
    let graph = CapturedGraph::end_capture(&s, enqueued.as_ref().map(|_| ()).map_err(|e| switchyard::Error::Cuda(e.to_string())));
    let recv = enqueued.map_err(e)?;
    let graph = graph.map_err(e)?;
    for round in 0..2 {
        let (x_now, y_now) = if round == 0 { (x.clone(), y_rows.clone()) } else { (negated(x), negated(&y_rows)) };
        // Same addresses as captured: the new input goes over the old.
        write_rows(&x_now, &x_dev, &s)?;
        write_rows(&y_now, &y_dev, &s)?;
        graph.launch(&s).map_err(e)?;
        s.sync().map_err(e)?;
        comm.device_error().map_err(e)?;
        let want = if round == 0 { want_rows.clone() } else { negated(want_rows) };
        let got = match want.dtype() {
            DType::Bf16 => {
                let mut data = vec![bf16::ZERO; recv.num_rows * hidden];
                dtoh(&mut data, recv.data, &s).map_err(e)?;
                Rows::Bf16 { hidden, data }
            }
            DType::Fp8 => {
                let mut data = vec![0u8; recv.num_rows * hidden];
                dtoh(&mut data, recv.data, &s).map_err(e)?;
                let mut scales = vec![0f32; recv.num_rows * hidden / 128];
                dtoh(&mut scales, recv.scales, &s).map_err(e)?;
                Rows::Fp8 { hidden, data, scales }
            }
        };
        if got != want {
            return Err(format!("replay {round}: received rows differ from the oracle"));
        }
        let mut sums = vec![bf16::ZERO; want_out.len()];
        dtoh(&mut sums, out.ptr(), &s).map_err(e)?;
        let sign = if round == 0 { 1.0 } else { -1.0 };
        let bad = sums.iter().zip(want_out).filter(|(g, w)| g.to_f32() != sign * w.to_f32()).count();
        if bad > 0 {
            return Err(format!("replay {round}: {bad} of {} combined values differ from the oracle", sums.len()));
        }
        let mut got_w = vec![0f32; want_w.len()];
        dtoh(&mut got_w, out_w.ptr(), &s).map_err(e)?;
        if &got_w != want_w {
            return Err(format!("replay {round}: combined weights differ from the oracle"));
        }
    }
    Ok(())
}

fn diff(a: &switchyard::DispatchOutput, b: &switchyard::DispatchOutput) -> String {
    let mut d = Vec::new();
    if a.x != b.x {
        d.push(format!("x (rows {} vs {})", a.x.num_rows(), b.x.num_rows()));
    }
    if a.topk_idx != b.topk_idx {
        d.push("topk_idx".into());
    }
    if a.topk_weights != b.topk_weights {
        d.push("topk_weights".into());
    }
    if a.tokens_per_expert != b.tokens_per_expert {
        d.push(format!(
            "tokens_per_expert {:?} vs {:?}",
            &a.tokens_per_expert[..a.tokens_per_expert.len().min(8)],
            &b.tokens_per_expert[..b.tokens_per_expert.len().min(8)]
        ));
    }
    if a.source_rank != b.source_rank || a.source_token != b.source_token {
        d.push("source".into());
    }
    d.join(", ")
}

#[test]
fn intranode_matches_the_oracle() {
    let Some(n) = gpus_or_skip() else { return };
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let cases = [
        Case {
            name: "tiny-bf16",
            tokens: 7,
            hidden: 128,
            topk: 2,
            experts: 8,
            dtype: DType::Bf16,
            fp8_on_wire: false,
            channels: 3,
            hole_rate: 0.2,
            alignment: 0,
        },
        Case {
            name: "tiny-fp8-wire",
            tokens: 7,
            hidden: 128,
            topk: 2,
            experts: 8,
            dtype: DType::Bf16,
            fp8_on_wire: true,
            channels: 2,
            hole_rate: 0.2,
            alignment: 4,
        },
        Case {
            name: "odd-hidden-bf16",
            tokens: 33,
            hidden: 72,
            topk: 3,
            experts: 12,
            dtype: DType::Bf16,
            fp8_on_wire: false,
            channels: 5,
            hole_rate: 0.1,
            alignment: 0,
        },
        Case {
            name: "fp8-in",
            tokens: 100,
            hidden: 384,
            topk: 4,
            experts: 24,
            dtype: DType::Fp8,
            fp8_on_wire: false,
            channels: 4,
            hole_rate: 0.05,
            alignment: 0,
        },
        Case {
            name: "one-channel",
            tokens: 64,
            hidden: 2048,
            topk: 6,
            experts: 64,
            dtype: DType::Bf16,
            fp8_on_wire: true,
            channels: 1,
            hole_rate: 0.0,
            alignment: 0,
        },
        Case {
            name: "ht-a-bf16",
            tokens: 4096,
            hidden: 7168,
            topk: 8,
            experts: 256,
            dtype: DType::Bf16,
            fp8_on_wire: false,
            channels: 24,
            hole_rate: 0.0,
            alignment: 0,
        },
        Case {
            name: "ht-a-fp8",
            tokens: 4096,
            hidden: 7168,
            topk: 8,
            experts: 256,
            dtype: DType::Bf16,
            fp8_on_wire: true,
            channels: 24,
            hole_rate: 0.0,
            alignment: 128,
        },
        Case {
            name: "ll-b",
            tokens: 128,
            hidden: 7168,
            topk: 8,
            experts: 256,
            dtype: DType::Bf16,
            fp8_on_wire: false,
            channels: 132,
            hole_rate: 0.0,
            alignment: 0,
        },
    ];
    let mut worlds = vec![2];
    if n > 2 {
        worlds.push(n);
    }
    let mut failed = Vec::new();
    for &world in &worlds {
        for c in &cases {
            let t = std::time::Instant::now();
            match run_case(world, n, c) {
                Ok(()) => eprintln!("ok    world={world} {:18} {:?}", c.name, t.elapsed()),
                Err(e) => {
                    eprintln!("FAIL  world={world} {:18} {e}", c.name);
                    failed.push(format!("world={world} {}: {e}", c.name));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{} case(s) failed:\n{}", failed.len(), failed.join("\n"));
}
