//! The CPU backend with ranks that are processes (`CpuProcessRank`), here joined
//! through the TCP rendezvous with each rank on a thread of this test (the data
//! path is the same as under mpirun: only the group differs). Results are
//! compared with the serial oracle; failures are checked for their typed errors.

mod common;

use std::time::Duration;

use common::{on_tcp_groups, on_threads, test_config, tokens_touching_node};
use switchyard::backend::cpu::CpuProcessRank;
use switchyard::conformance::{self, run_case_on, standard_cases};
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{Communicator, Config, DType, DispatchOptions, Error, Layout, Result, Rows, Topology};

const LONG: Duration = Duration::from_secs(30);

/// `world` process-style ranks over a fresh TCP rendezvous, nodes of `ranks_per_node`.
fn process_ranks(world: usize, ranks_per_node: Option<usize>, config: Config) -> Vec<Result<CpuProcessRank>> {
    on_tcp_groups(world, LONG, move |group| CpuProcessRank::new(Box::new(group), ranks_per_node, config.clone()))
}

fn ok_ranks(world: usize, rpn: usize, config: Config) -> Vec<CpuProcessRank> {
    process_ranks(world, Some(rpn), config).into_iter().map(|r| r.expect("rank set-up")).collect()
}

/// Ranks made together, each taken by its own thread.
struct Handout(std::sync::Mutex<Vec<Option<CpuProcessRank>>>);

impl Handout {
    fn new(ranks: Vec<CpuProcessRank>) -> Self {
        Self(std::sync::Mutex::new(ranks.into_iter().map(Some).collect()))
    }
    fn take(&self, r: usize) -> CpuProcessRank {
        self.0.lock().unwrap()[r].take().expect("each rank taken once")
    }
}

#[test]
fn every_conformance_case_passes_with_ranks_as_processes() {
    let mut failed = Vec::new();
    for case in standard_cases() {
        let topo = case.spec.topology;
        let ranks = ok_ranks(topo.world(), topo.ranks_per_node, case.config.clone());
        assert!(ranks.iter().all(|r| r.topology() == topo), "{}: topology", case.name);
        let report = run_case_on(&case, ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect());
        if !report.passed() {
            failed.push(format!("{}: {} wrong, error {:?}", report.name, report.wrong, report.error));
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}

#[test]
fn the_inter_node_hop_carries_each_token_once_per_destination_node() {
    let topo = Topology::new(3, 2).unwrap();
    let spec = WorkloadSpec {
        topology: topo,
        tokens: 40,
        hidden: 128,
        topk: 4,
        num_experts: 24,
        dtype: DType::Bf16,
        routing: RoutingKind::Uniform,
        max_nodes: 3,
        hole_rate: 0.1,
        seed: 7,
    };
    let inputs = std::sync::Arc::new(spec.generate().unwrap());
    let ranks = Handout::new(ok_ranks(6, 2, test_config(20_000)));
    let ins = inputs.clone();
    let got = on_threads(6, move |r| {
        let mut comm = ranks.take(r);
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, 4, 24, topo).unwrap();
        comm.dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default()).unwrap();
        comm.traffic().dispatch.clone()
    });
    for (r, t) in got.iter().enumerate() {
        for n in 0..3 {
            let want = if n == topo.node_of(r) { 0 } else { tokens_touching_node(&inputs[r].topk_idx, 4, 8, n) };
            assert_eq!(t.inter_node_rows_to_node[n], want as u64, "rank {r} to node {n}");
        }
        assert_eq!(t.inter_node.rows, t.inter_node_rows_to_node.iter().sum::<u64>(), "rank {r}");
    }
}

/// Inputs of one small dispatch on rank `r` of a 2x2 group: 8 tokens, hidden 128, top-2 of 8.
fn small_input(r: usize) -> (Rows, Vec<i64>, Vec<f32>) {
    let x = Rows::Bf16 { hidden: 128, data: common::bf16_values(r as u64, 8 * 128) };
    let idx: Vec<i64> = (0..8).flat_map(|t| [(t % 8) as i64, ((t + 3) % 8) as i64]).collect();
    (x, idx, vec![0.5; 16])
}

#[test]
fn bad_input_on_one_rank_fails_every_rank_and_the_group_keeps_working() {
    let topo = Topology::new(2, 2).unwrap();
    let ranks = Handout::new(ok_ranks(4, 2, test_config(20_000)));
    let got = on_threads(4, move |r| {
        let mut comm = ranks.take(r);
        let (x, idx, w) = small_input(r);
        let layout = Layout::new(&idx, 2, 8, topo).unwrap();
        let bad_w = if r == 1 { &w[..15] } else { &w[..] };
        let first = comm.dispatch(x.as_ref(), &idx, bad_w, &layout, &DispatchOptions::default()).map(drop);
        // The same call with good input afterwards: every rank gets its rows.
        let (recv, handle) = comm.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).unwrap();
        let y = switchyard::workload::expert_outputs(&recv.x, r);
        let back = comm.combine(&y, 128, &handle, None).map(|c| c.x.len());
        (first, recv, back)
    });
    for (r, (first, _, back)) in got.iter().enumerate() {
        match (r, first) {
            (1, Err(Error::ShapeMismatch { arg, .. })) => assert_eq!(*arg, "topk_weights"),
            (_, Err(Error::PeerFailed { rank: 1, .. })) if r != 1 => {}
            other => panic!("rank {r}: {other:?}"),
        }
        assert_eq!(back.as_ref().ok(), Some(&(8 * 128)), "rank {r}: combine after the failure");
    }
    // The second dispatch equals the oracle's.
    let inputs: Vec<_> = (0..4)
        .map(|r| {
            let (x, topk_idx, topk_weights) = small_input(r);
            switchyard::workload::RankInput { x, topk_idx, topk_weights }
        })
        .collect();
    let want = switchyard::oracle::dispatch(topo, 8, 2, &inputs, &DispatchOptions::default());
    for (r, (_, recv, _)) in got.iter().enumerate() {
        assert_eq!(conformance::count_wrong_dispatch(recv, &want[r]), 0, "rank {r}");
    }
}

#[test]
fn ranks_calling_with_different_shapes_all_fail_with_invalid_argument() {
    let topo = Topology::new(1, 2).unwrap();
    let ranks = Handout::new(ok_ranks(2, 2, test_config(20_000)));
    let got = on_threads(2, move |r| {
        let mut comm = ranks.take(r);
        let hidden = 128 * (r + 1);
        let x = Rows::Bf16 { hidden, data: common::bf16_values(1, 4 * hidden) };
        let idx = vec![0i64, 1, 2, 3];
        let layout = Layout::new(&idx, 1, 4, topo).unwrap();
        comm.dispatch(x.as_ref(), &idx, &[1.0; 4], &layout, &DispatchOptions::default()).map(drop)
    });
    for (r, g) in got.iter().enumerate() {
        assert!(matches!(g, Err(Error::InvalidArgument { arg, .. }) if arg == "collective arguments"), "rank {r}: {g:?}");
    }
}

#[test]
fn a_node_size_that_does_not_divide_the_ranks_fails_on_every_rank() {
    for (r, got) in process_ranks(3, Some(2), test_config(20_000)).into_iter().enumerate() {
        assert!(
            matches!(&got, Err(Error::InvalidArgument { arg, .. }) if arg == "--ranks-per-node"),
            "rank {r}: {:?}",
            got.err()
        );
    }
}

#[test]
fn nodes_default_to_hosts_so_one_host_is_one_node() {
    for got in process_ranks(4, None, test_config(20_000)) {
        assert_eq!(got.unwrap().topology(), Topology::new(1, 4).unwrap());
    }
}

#[test]
fn a_rank_that_never_calls_makes_the_others_time_out_not_hang() {
    let topo = Topology::new(2, 1).unwrap();
    let ranks = Handout::new(ok_ranks(2, 1, test_config(1_500)));
    let got = on_threads(2, move |r| {
        let mut comm = ranks.take(r);
        if r == 1 {
            // Stays in the group (its connection open) but never calls; released once rank 0 gave up.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let (x, idx, w) = small_input(0);
        let idx: Vec<i64> = idx.iter().map(|&e| e % 4).collect();
        let layout = Layout::new(&idx, 2, 4, topo).unwrap();
        let start = std::time::Instant::now();
        let got = comm.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).map(drop);
        Some((got, start.elapsed()))
    });
    let (got, took) = got[0].as_ref().expect("rank 0 reports");
    assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
    assert!(*took >= Duration::from_millis(1_400) && *took < Duration::from_secs(4), "took {took:?}");
}
