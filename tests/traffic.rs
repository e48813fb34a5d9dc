//! Traffic counters show the two-hop route of the DeepSeek-V3 design.
//!
//! Dispatch, for rank `r` on node `n` with local index `l`:
//! - for every node `m != n`, the inter-node rows `r` sends to `m` equal the
//!   number of `r`'s tokens with at least one expert on `m`: a token crosses the
//!   inter-node hop once per destination node, never twice, and no row goes to
//!   `r`'s own node over that hop;
//! - rows a rank puts on the intra-node hop plus rows it delivers to itself
//!   equal, over the tokens that enter its node through it (its own tokens and
//!   those its rail peers sent it), the number of ranks of its node each goes to.
//!   This only holds if the inter-node hop lands on the rank with the same local
//!   index (a rail peer), which is how the totals check the rail alignment.
//!
//! Combine reverses the route: every received row goes back once (to its
//! source, to itself, or to its node's forwarder), and the forwarder `(m, l)`
//! sends one reduced row per token back over the inter-node hop to `(n, l)` —
//! exactly as many rows as `(n, l)` sent to node `m` in dispatch. Summed over
//! the rail peers: the rows that come back to `r` equal the rows `r` sent out.
//!
//! On one-node topologies the inter-node hop carries nothing.
//! Expectations are computed from `topk_idx` alone, never from the backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{run_cluster, test_config, tokens_touching_node};
use switchyard::workload::{expert_outputs, RankInput, RoutingKind, WorkloadSpec};
use switchyard::{Communicator, DType, DispatchOptions, Layout, Topology, TrafficLog};

const DEADLINE: Duration = Duration::from_secs(60);

/// What every rank did: traffic after dispatch, after a cached dispatch, after combine,
/// each measured alone (counters reset before each call), plus rows received.
#[derive(Debug, Clone)]
struct Measured {
    dispatch: TrafficLog,
    cached: TrafficLog,
    combine: TrafficLog,
    num_recv: usize,
}

fn measure(what: &str, spec: &WorkloadSpec, inputs: Arc<Vec<RankInput>>, options: DispatchOptions) -> Vec<Measured> {
    let s = spec.clone();
    let what_owned = what.to_string();
    run_cluster(what, spec.topology, test_config(20_000), DEADLINE, move |comm| {
        let r = comm.rank();
        let inp = &inputs[r];
        let fail = |step: &str, e: switchyard::Error| -> ! { panic!("{what_owned}: rank {r}: {step}: {e}") };
        let layout = Layout::new(&inp.topk_idx, s.topk, s.num_experts, comm.topology()).unwrap_or_else(|e| fail("layout", e));
        comm.reset_traffic();
        let (recv, handle) = comm
            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &options)
            .unwrap_or_else(|e| fail("dispatch", e));
        let dispatch = comm.traffic().clone();
        comm.reset_traffic();
        comm.dispatch_cached(inp.x.as_ref(), &handle, &options).unwrap_or_else(|e| fail("cached dispatch", e));
        let cached = comm.traffic().clone();
        comm.reset_traffic();
        let y = expert_outputs(&recv.x, r);
        comm.combine(&y, s.hidden, &handle, Some(&recv.topk_weights)).unwrap_or_else(|e| fail("combine", e));
        let combine = comm.traffic().clone();
        Measured { dispatch, cached, combine, num_recv: recv.source_rank.len() }
    })
}

fn spec(topology: Topology, routing: RoutingKind, max_nodes: usize, seed: u64) -> WorkloadSpec {
    WorkloadSpec {
        topology,
        tokens: 37,
        hidden: 128,
        topk: 6,
        num_experts: 8 * topology.world(),
        dtype: DType::Bf16,
        routing,
        max_nodes,
        hole_rate: 0.1,
        seed,
    }
}

/// Check every rule of the module doc for one workload.
fn check_routes(what: &str, spec: &WorkloadSpec, options: DispatchOptions) {
    let inputs = Arc::new(spec.generate().unwrap_or_else(|e| panic!("{what}: bad spec: {e}")));
    let m = measure(what, spec, inputs.clone(), options);
    let topo = spec.topology;
    let (world, nodes, rpn) = (topo.world(), topo.num_nodes, topo.ranks_per_node);
    let per_rank = spec.num_experts / world;
    let per_node = per_rank * rpn;
    let k = spec.topk;
    let row_bytes = if options.fp8_on_wire { DType::Fp8 } else { spec.dtype }.row_bytes(spec.hidden) as u64;

    // sent[r][m]: tokens of r with an expert on node m (the expected inter-node rows for m != node(r)).
    let sent: Vec<Vec<u64>> = (0..world)
        .map(|r| (0..nodes).map(|n| tokens_touching_node(&inputs[r].topk_idx, k, per_node, n) as u64).collect())
        .collect();
    // ranks_hit(r, t, n): ranks of node n that token t of r goes to.
    let ranks_hit = |r: usize, t: usize, n: usize| -> u64 {
        let row = &inputs[r].topk_idx[t * k..(t + 1) * k];
        topo.ranks_of_node(n).filter(|&q| row.iter().any(|&e| e >= 0 && e as usize / per_rank == q)).count() as u64
    };

    for r in 0..world {
        let (n, l) = (topo.node_of(r), topo.local_of(r));
        for (label, log) in [("dispatch", &m[r].dispatch), ("cached dispatch", &m[r].cached)] {
            let d = &log.dispatch;
            assert_eq!(
                d.inter_node_rows_to_node.len(),
                nodes,
                "{what}: rank {r}: {label}: inter_node_rows_to_node has wrong length"
            );
            for node in 0..nodes {
                let want = if node == n { 0 } else { sent[r][node] };
                assert_eq!(
                    d.inter_node_rows_to_node[node], want,
                    "{what}: rank {r} (node {n}): {label}: inter-node rows to node {node}: got {}, expected {want} (tokens with an expert there)",
                    d.inter_node_rows_to_node[node]
                );
            }
            let want_inter: u64 = (0..nodes).filter(|&x| x != n).map(|x| sent[r][x]).sum();
            assert_eq!(d.inter_node.rows, want_inter, "{what}: rank {r}: {label}: total inter-node rows");
            assert!(
                d.inter_node.bytes >= d.inter_node.rows * row_bytes,
                "{what}: rank {r}: {label}: {} inter-node bytes for {} rows of {row_bytes} bytes",
                d.inter_node.bytes,
                d.inter_node.rows
            );
            // Tokens entering node n through r: its own, and its rail peers' that touch node n.
            let mut want_in_node = 0u64;
            for src_node in 0..nodes {
                let src = topo.rank_of(src_node, l);
                for t in 0..spec.tokens {
                    want_in_node += ranks_hit(src, t, n);
                }
            }
            assert_eq!(
                d.intra_node.rows + d.local.rows,
                want_in_node,
                "{what}: rank {r}: {label}: intra-node + local rows (intra {}, local {}) should equal the deliveries of the tokens entering node {n} through local index {l}",
                d.intra_node.rows,
                d.local.rows
            );
            // Combine counters untouched by a dispatch.
            assert_eq!(
                log.combine.inter_node.rows + log.combine.intra_node.rows + log.combine.local.rows,
                0,
                "{what}: rank {r}: {label} counted combine traffic"
            );
        }
        assert_eq!(
            m[r].cached.dispatch, m[r].dispatch.dispatch,
            "{what}: rank {r}: cached dispatch moved different traffic than dispatch"
        );

        // Combine.
        let c = &m[r].combine.combine;
        assert_eq!(
            c.intra_node.rows + c.local.rows,
            m[r].num_recv as u64,
            "{what}: rank {r}: combine intra-node + local rows should equal the rows it received"
        );
        assert_eq!(c.inter_node_rows_to_node.len(), nodes, "{what}: rank {r}: combine inter_node_rows_to_node length");
        for node in 0..nodes {
            // r forwards back to (node, l) one row per token (node, l) sent to r's node.
            let want = if node == n { 0 } else { sent[topo.rank_of(node, l)][n] };
            assert_eq!(
                c.inter_node_rows_to_node[node], want,
                "{what}: rank {r}: combine inter-node rows to node {node} should equal the dispatch rows its rail peer {} sent to node {n}",
                topo.rank_of(node, l)
            );
        }
        assert!(
            c.inter_node.bytes >= c.inter_node.rows * DType::Bf16.row_bytes(spec.hidden) as u64,
            "{what}: rank {r}: combine inter-node bytes too small"
        );
        let d = &m[r].combine.dispatch;
        assert_eq!(d.inter_node.rows + d.intra_node.rows + d.local.rows, 0, "{what}: rank {r}: combine counted dispatch traffic");
    }
    // Summed over the rail peers: rows back to r over the inter-node hop = rows r sent out.
    for r in 0..world {
        let (n, l) = (topo.node_of(r), topo.local_of(r));
        let back: u64 =
            (0..nodes).filter(|&x| x != n).map(|x| m[topo.rank_of(x, l)].combine.combine.inter_node_rows_to_node[n]).sum();
        assert_eq!(
            back, m[r].dispatch.dispatch.inter_node.rows,
            "{what}: rank {r}: combine rows back over the inter-node hop vs dispatch rows out"
        );
    }
}

#[test]
fn two_hop_route_2x2_uniform() {
    let s = spec(Topology::new(2, 2).unwrap(), RoutingKind::Uniform, 2, 1);
    check_routes("2x2 uniform", &s, DispatchOptions::default());
}

#[test]
fn two_hop_route_2x4_node_limited() {
    let s = spec(Topology::new(2, 4).unwrap(), RoutingKind::NodeLimited, 1, 2);
    check_routes("2x4 node-limited M=1", &s, DispatchOptions::default());
}

#[test]
fn two_hop_route_4x2_node_limited_fp8_wire() {
    let s = spec(Topology::new(4, 2).unwrap(), RoutingKind::NodeLimited, 2, 3);
    check_routes("4x2 node-limited M=2, FP8 on the wire", &s, DispatchOptions { fp8_on_wire: true, expert_alignment: 0 });
}

#[test]
fn two_hop_route_4x2_zipf() {
    let s = spec(Topology::new(4, 2).unwrap(), RoutingKind::Zipf, 4, 4);
    check_routes("4x2 zipf", &s, DispatchOptions::default());
}

#[test]
fn two_hop_route_4x1_one_rank_per_node() {
    // With one rank per node every rank is its own forwarder: nothing intra-node.
    let s = spec(Topology::new(4, 1).unwrap(), RoutingKind::Uniform, 4, 5);
    check_routes("4x1 uniform", &s, DispatchOptions::default());
}

#[test]
fn one_node_has_no_inter_node_traffic() {
    for (rpn, seed) in [(1usize, 6u64), (2, 7), (8, 8)] {
        let topo = Topology::new(1, rpn).unwrap();
        let s = spec(topo, RoutingKind::Uniform, 1, seed);
        let what = format!("1x{rpn} uniform");
        // The general rules (intra + local deliveries, combine rows back) hold too.
        check_routes(&what, &s, DispatchOptions::default());
        let inputs = Arc::new(s.generate().unwrap());
        let m = measure(&what, &s, inputs, DispatchOptions::default());
        for (r, mr) in m.iter().enumerate() {
            for (label, t) in [("dispatch", &mr.dispatch.dispatch), ("combine", &mr.combine.combine)] {
                assert_eq!(t.inter_node.rows, 0, "{what}: rank {r}: {label}: inter-node rows");
                assert_eq!(t.inter_node.bytes, 0, "{what}: rank {r}: {label}: inter-node bytes");
                assert!(t.inter_node_rows_to_node.iter().all(|&x| x == 0), "{what}: rank {r}: {label}: per-node inter-node rows");
            }
        }
    }
}

#[test]
fn each_token_crosses_once_per_node_even_with_many_experts_there() {
    // Hand-made routing on 2 nodes x 2 ranks, 8 experts (2 per rank, 4 per node):
    // rank 0's token 0 picks all four experts of node 1 (ranks 2 and 3): it must
    // cross to node 1 once, and be forwarded there to both ranks.
    let topo = Topology::new(2, 2).unwrap();
    let hidden = 128;
    let idx: Vec<Vec<i64>> = vec![
        vec![4, 5, 6, 7, /* t1 */ 0, 1, -1, -1],
        vec![-1, -1, -1, -1, /* t1 */ -1, -1, -1, -1],
        vec![0, 2, -1, -1, /* t1 */ 4, 6, 7, -1],
        vec![-1, -1, -1, -1, /* t1 */ 1, -1, -1, -1],
    ];
    let idx = Arc::new(idx);
    let i2 = idx.clone();
    let m = run_cluster("hand-made 2x2", topo, test_config(20_000), DEADLINE, move |comm| {
        let r = comm.rank();
        let ids = &i2[r];
        let w: Vec<f32> = ids.iter().map(|&e| if e >= 0 { 0.25 } else { 0.0 }).collect();
        let x = common::bf16_values(r as u64, 2 * hidden);
        let layout = Layout::new(ids, 4, 8, comm.topology()).unwrap();
        comm.reset_traffic();
        let x = switchyard::RowsRef::Bf16 { hidden, data: &x };
        let (recv, handle) =
            comm.dispatch(x, ids, &w, &layout, &DispatchOptions::default()).unwrap_or_else(|e| panic!("rank {r}: dispatch: {e}"));
        let y = expert_outputs(&recv.x, r);
        comm.combine(&y, hidden, &handle, None).unwrap_or_else(|e| panic!("rank {r}: combine: {e}"));
        comm.traffic().clone()
    });
    // Rank 0: token 0 -> node 1 once; token 1 stays on node 0.
    assert_eq!(m[0].dispatch.inter_node_rows_to_node, vec![0, 1], "rank 0 dispatch inter-node rows per node");
    // Rank 2: token 0 -> node 0 once (experts 0 and 2 on ranks 0 and 1); token 1 stays.
    assert_eq!(m[2].dispatch.inter_node_rows_to_node, vec![1, 0], "rank 2 dispatch inter-node rows per node");
    // Rank 3: token 1 -> expert 1 on rank 0: one row to node 0 (to rank 1, its rail peer).
    assert_eq!(m[3].dispatch.inter_node_rows_to_node, vec![1, 0], "rank 3 dispatch inter-node rows per node");
    assert_eq!(m[1].dispatch.inter_node.rows, 0, "rank 1 has no routed tokens");
    // Rank 2 receives rank 0's token 0 (its rail peer) and forwards it to rank 3: 1 intra row
    // (+ its own token 1 to rank 3: experts 6, 7 -> 1 more), and delivers 2 rows to itself
    // (rank 0's token 0 for experts 4, 5 and its own token 1 for expert 4).
    assert_eq!(m[2].dispatch.intra_node.rows + m[2].dispatch.local.rows, 4, "rank 2 intra + local dispatch rows");
    // Combine: rank 2 sends back one reduced row to node 0 (for rank 0's token 0, summed over ranks 2 and 3).
    assert_eq!(m[2].combine.inter_node_rows_to_node, vec![1, 0], "rank 2 combine inter-node rows per node");
    assert_eq!(m[3].combine.inter_node_rows_to_node, vec![0, 0], "rank 3 combine: no rail peer sent it anything");
    // Rank 1 forwarded rank 3's token 1 to rank 0 and sends its sum back to node 1 (rank 3).
    assert_eq!(m[1].combine.inter_node_rows_to_node, vec![0, 1], "rank 1 combine inter-node rows per node");
    // Rank 0 forwarded rank 2's token 0 (to itself and rank 1) and sends one reduced row back.
    assert_eq!(m[0].combine.inter_node_rows_to_node, vec![0, 1], "rank 0 combine inter-node rows per node");
}

#[test]
fn reset_zeroes_counters() {
    let s = spec(Topology::new(2, 2).unwrap(), RoutingKind::Uniform, 2, 9);
    let inputs = Arc::new(s.generate().unwrap());
    let s2 = s.clone();
    let logs = run_cluster("reset", s.topology, test_config(20_000), DEADLINE, move |comm| {
        let r = comm.rank();
        let inp = &inputs[r];
        let layout = Layout::new(&inp.topk_idx, s2.topk, s2.num_experts, comm.topology()).unwrap();
        comm.dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default())
            .unwrap_or_else(|e| panic!("rank {r}: dispatch: {e}"));
        let before = comm.traffic().clone();
        comm.reset_traffic();
        (before, comm.traffic().clone())
    });
    let total: u64 =
        logs.iter().map(|(b, _)| b.dispatch.inter_node.rows + b.dispatch.intra_node.rows + b.dispatch.local.rows).sum();
    assert!(total > 0, "dispatch counted no traffic at all");
    for (r, (_, after)) in logs.iter().enumerate() {
        let z = |t: &switchyard::Traffic| {
            t.inter_node.rows
                + t.inter_node.bytes
                + t.intra_node.rows
                + t.intra_node.bytes
                + t.local.rows
                + t.local.bytes
                + t.inter_node_rows_to_node.iter().sum::<u64>()
        };
        assert_eq!(z(&after.dispatch) + z(&after.combine), 0, "rank {r}: counters not zero after reset_traffic: {after:?}");
    }
}
