//! Backward pass: dispatch and combine are each other's adjoints.
//!
//! **Gradient of dispatch is a combine.** Dispatch copies token `t` of rank `s`
//! into one received row on every rank `d` that hosts one of its experts:
//! `y_d[i] = x_s[t]` for each row `i` with source `(s, t)`. With an upstream
//! gradient `g_d` on the received rows (`[R_d, H]`), the chain rule gives
//!
//! ```text
//! dL/dx_s[t] = sum over all (d, i) with source(d, i) = (s, t) of g_d[i]
//! ```
//!
//! which is exactly `combine(g, handle, None)` with the dispatch's handle
//! (combine sums, per token, the rows that come back for it; no gate weights in
//! the sum, since the forward copy had none).
//!
//! **Gradient of combine is a cached dispatch.** Combine computes
//! `out_s[t] = sum over (d, i) with source (s, t) of y_d[i]`, so with an upstream
//! gradient `grad_out_s` (`[T_s, H]`)
//!
//! ```text
//! dL/dy_d[i] = grad_out_s[t]   where (s, t) = source(d, i)
//! ```
//!
//! which is `dispatch_cached(grad_out, handle)`: the gradient of every token
//! goes to every row that was made from it, in the same row order.
//!
//! Both are checked here in BF16 against gradients computed directly from the
//! definitions above (a plain loop over the rows, with the row order and
//! sources taken from the serial oracle), never from the backend's own output.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bf16_values, check_close, combine_rel_of_abs_sum, run_cluster, test_config, unit};
use half::bf16;
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{oracle, Communicator, DType, DispatchOptions, Layout, Rows, RowsRef, Topology};

const DEADLINE: Duration = Duration::from_secs(60);

fn spec(topology: Topology, seed: u64) -> WorkloadSpec {
    WorkloadSpec {
        topology,
        tokens: 21,
        hidden: 256,
        topk: 4,
        num_experts: 2 * topology.world(),
        dtype: DType::Bf16,
        routing: RoutingKind::Uniform,
        max_nodes: topology.num_nodes,
        hole_rate: 0.2,
        seed,
    }
}

/// Upstream gradient on the row of token `(s, t)` received by rank `d`: a
/// deterministic function of `(d, s, t, h)` only, so the expected gradient can
/// be computed without knowing the backend's row order.
fn g_value(d: usize, s: usize, t: usize, h: usize) -> bf16 {
    let key = ((d as u64) << 48) ^ ((s as u64) << 32) ^ ((t as u64) << 12) ^ h as u64;
    bf16::from_f32(unit(0xbac4_3a2d, key) * 2.0 - 1.0)
}

fn dispatch_gradient_is_combine(topo: Topology, seed: u64) {
    let what = format!("dispatch backward on {topo}");
    let s = spec(topo, seed);
    let inputs = Arc::new(s.generate().unwrap());
    let want = oracle::dispatch(topo, s.num_experts, s.topk, &inputs, &DispatchOptions::default());
    let (ins, s2) = (inputs.clone(), s.clone());
    let got = run_cluster(&what, topo, test_config(20_000), DEADLINE, move |comm| {
        let d = comm.rank();
        let inp = &ins[d];
        let layout = Layout::new(&inp.topk_idx, s2.topk, s2.num_experts, comm.topology()).unwrap();
        let (recv, handle) = comm
            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default())
            .unwrap_or_else(|e| panic!("rank {d}: dispatch: {e}"));
        // g on the received rows, built from each row's (source rank, source token).
        let mut g = Vec::with_capacity(recv.source_rank.len() * s2.hidden);
        for i in 0..recv.source_rank.len() {
            let (src, t) = (recv.source_rank[i] as usize, recv.source_token[i] as usize);
            g.extend((0..s2.hidden).map(|h| g_value(d, src, t, h)));
        }
        let grad_x = comm.combine(&g, s2.hidden, &handle, None).unwrap_or_else(|e| panic!("rank {d}: combine of gradients: {e}"));
        (recv.source_rank, recv.source_token, grad_x)
    });
    // Expected dL/dx directly from the routing: sum over the ranks d each token goes to.
    let per_rank = s.num_experts / topo.world();
    for (r, (src_rank, src_token, grad_x)) in got.iter().enumerate() {
        // The rows' sources must be the oracle's, or g was built for the wrong rows.
        assert_eq!(src_rank, &want[r].source_rank, "{what}: rank {r}: source_rank differs from the oracle");
        assert_eq!(src_token, &want[r].source_token, "{what}: rank {r}: source_token differs from the oracle");
        assert!(grad_x.topk_weights.is_none(), "{what}: rank {r}: combine without weights returned weights");
        let mut exp = vec![0f32; s.tokens * s.hidden];
        let mut abs = vec![0f32; s.tokens * s.hidden];
        for t in 0..s.tokens {
            let row = &inputs[r].topk_idx[t * s.topk..(t + 1) * s.topk];
            for d in 0..topo.world() {
                if row.iter().any(|&e| e >= 0 && e as usize / per_rank == d) {
                    for h in 0..s.hidden {
                        let v = g_value(d, r, t, h).to_f32();
                        exp[t * s.hidden + h] += v;
                        abs[t * s.hidden + h] += v.abs();
                    }
                }
            }
        }
        assert!(abs.iter().any(|&a| a > 0.0), "{what}: rank {r}: no token was routed anywhere (test would be vacuous)");
        check_close(&format!("{what}: rank {r}: dL/dx"), &grad_x.x, &exp, &abs, combine_rel_of_abs_sum(topo))
            .unwrap_or_else(|m| panic!("{m}"));
    }
}

fn combine_gradient_is_cached_dispatch(topo: Topology, seed: u64) {
    let what = format!("combine backward on {topo}");
    let s = spec(topo, seed);
    let inputs = Arc::new(s.generate().unwrap());
    let want = oracle::dispatch(topo, s.num_experts, s.topk, &inputs, &DispatchOptions::default());
    // Upstream gradient of combine's output, [T, H] per rank.
    let grad_out: Arc<Vec<Vec<bf16>>> =
        Arc::new((0..topo.world()).map(|r| bf16_values(1000 + r as u64, s.tokens * s.hidden)).collect());
    let (ins, s2, go) = (inputs.clone(), s.clone(), grad_out.clone());
    let got = run_cluster(&what, topo, test_config(20_000), DEADLINE, move |comm| {
        let r = comm.rank();
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, s2.topk, s2.num_experts, comm.topology()).unwrap();
        let (recv, handle) = comm
            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default())
            .unwrap_or_else(|e| panic!("rank {r}: dispatch: {e}"));
        // Forward combine (its output is not needed here, but the handle is used as in training).
        let y = switchyard::workload::expert_outputs(&recv.x, r);
        comm.combine(&y, s2.hidden, &handle, None).unwrap_or_else(|e| panic!("rank {r}: forward combine: {e}"));
        let g = RowsRef::Bf16 { hidden: s2.hidden, data: &go[r] };
        comm.dispatch_cached(g, &handle, &DispatchOptions::default())
            .unwrap_or_else(|e| panic!("rank {r}: cached dispatch of gradients: {e}"))
    });
    let mut rows_seen = 0;
    for (d, grad_y) in got.iter().enumerate() {
        // Direct: row i of rank d gets grad_out of its source token (sources from the oracle).
        let n = want[d].source_rank.len();
        rows_seen += n;
        let mut exp = Vec::with_capacity(n * s.hidden);
        for i in 0..n {
            let (src, t) = (want[d].source_rank[i] as usize, want[d].source_token[i] as usize);
            exp.extend_from_slice(&grad_out[src][t * s.hidden..(t + 1) * s.hidden]);
        }
        match grad_y {
            Rows::Bf16 { hidden, data } => {
                assert_eq!(*hidden, s.hidden, "{what}: rank {d}: dL/dy hidden");
                assert_eq!(data.len(), exp.len(), "{what}: rank {d}: dL/dy has {} elements, expected {}", data.len(), exp.len());
                if let Some(i) = (0..data.len()).find(|&i| data[i].to_bits() != exp[i].to_bits()) {
                    panic!(
                        "{what}: rank {d}: dL/dy row {} element {}: got {}, expected {} (BF16 copies must be exact)",
                        i / s.hidden,
                        i % s.hidden,
                        data[i],
                        exp[i]
                    );
                }
            }
            other => panic!("{what}: rank {d}: dL/dy came back as {}, expected BF16", other.dtype()),
        }
    }
    assert!(rows_seen > 0, "{what}: no rows were dispatched (test would be vacuous)");
}

#[test]
fn dispatch_backward_2x2() {
    dispatch_gradient_is_combine(Topology::new(2, 2).unwrap(), 11);
}

#[test]
fn dispatch_backward_1x4() {
    dispatch_gradient_is_combine(Topology::new(1, 4).unwrap(), 12);
}

#[test]
fn dispatch_backward_4x2() {
    dispatch_gradient_is_combine(Topology::new(4, 2).unwrap(), 13);
}

#[test]
fn combine_backward_2x2() {
    combine_gradient_is_cached_dispatch(Topology::new(2, 2).unwrap(), 21);
}

#[test]
fn combine_backward_1x4() {
    combine_gradient_is_cached_dispatch(Topology::new(1, 4).unwrap(), 22);
}

#[test]
fn combine_backward_4x2() {
    combine_gradient_is_cached_dispatch(Topology::new(4, 2).unwrap(), 23);
}

/// The two rules together are the adjoint identity <dispatch(x), g> = <x, combine(g)>,
/// checked in f64 on both sides.
#[test]
fn dispatch_and_combine_are_adjoint() {
    let topo = Topology::new(2, 2).unwrap();
    let s = spec(topo, 31);
    let inputs = Arc::new(s.generate().unwrap());
    let (ins, s2) = (inputs.clone(), s.clone());
    let got = run_cluster("adjoint 2x2", topo, test_config(20_000), DEADLINE, move |comm| {
        let r = comm.rank();
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, s2.topk, s2.num_experts, comm.topology()).unwrap();
        let (recv, handle) = comm
            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default())
            .unwrap_or_else(|e| panic!("rank {r}: dispatch: {e}"));
        let g = bf16_values(2000 + r as u64, recv.source_rank.len() * s2.hidden);
        let cg = comm.combine(&g, s2.hidden, &handle, None).unwrap_or_else(|e| panic!("rank {r}: combine: {e}"));
        let y = match recv.x {
            Rows::Bf16 { data, .. } => data,
            _ => panic!("rank {r}: BF16 dispatch returned FP8"),
        };
        let lhs: f64 = y.iter().zip(&g).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
        let x = match &inp.x {
            Rows::Bf16 { data, .. } => data,
            _ => unreachable!(),
        };
        let rhs: f64 = x.iter().zip(&cg.x).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
        // |x| . |combine(g)| plus |x| . (sum of |g| per token) = sum |y * g|.
        let scale: f64 = x.iter().zip(&cg.x).map(|(a, b)| (a.to_f64() * b.to_f64()).abs()).sum::<f64>()
            + y.iter().zip(&g).map(|(a, b)| (a.to_f64() * b.to_f64()).abs()).sum::<f64>();
        (lhs, rhs, scale)
    });
    let lhs: f64 = got.iter().map(|g| g.0).sum();
    let rhs: f64 = got.iter().map(|g| g.1).sum();
    let scale: f64 = got.iter().map(|g| g.2).sum();
    assert!(scale > 0.0, "adjoint: nothing was routed (vacuous)");
    // Each element of combine(g) is within 2^-8 * (|combine(g)| + sum of |g|) of the exact sum
    // (one BF16 rounding of the result and one of each node's partial sum).
    assert!(
        (lhs - rhs).abs() <= scale / 256.0 + 1e-9,
        "adjoint: <dispatch(x), g> = {lhs}, <x, combine(g)> = {rhs} (scale {scale})"
    );
}
