//! The two-hop route over node-local communicators (`HierRank`), here with the CPU
//! backend inside each node and the ranks on threads of this test joined through
//! the TCP rendezvous (the CUDA backend plugs into the same place on a GPU machine).
//! Results are compared with the serial oracle; traffic with counts made here.

mod common;

use std::time::Duration;

use common::{on_tcp_groups, on_threads, test_config, tokens_touching_node};
use switchyard::backend::cpu::CpuProcessRank;
use switchyard::backend::hier::HierRank;
use switchyard::bootstrap::SharedGroup;
use switchyard::conformance::{self, run_case_on, standard_cases};
use switchyard::workload::{RoutingKind, WorkloadSpec};
use switchyard::{Communicator, Config, DType, DispatchOptions, Error, Layout, Result, Rows, Topology};

const LONG: Duration = Duration::from_secs(30);

/// `world` hierarchical ranks in nodes of `rpn`, each node a CPU process group.
fn hier_ranks(world: usize, rpn: usize, config: Config) -> Vec<Result<HierRank>> {
    on_tcp_groups(world, LONG, move |group| {
        let shared = SharedGroup::new(Box::new(group));
        HierRank::new(&shared, Some(rpn), config.clone(), &mut |view, cfg| {
            Ok(Box::new(CpuProcessRank::new(view, None, cfg.clone())?) as Box<dyn Communicator>)
        })
    })
}

fn ok_ranks(world: usize, rpn: usize, config: Config) -> Vec<HierRank> {
    hier_ranks(world, rpn, config).into_iter().map(|r| r.expect("rank set-up")).collect()
}

/// Ranks made together, each taken by its own thread.
struct Handout(std::sync::Mutex<Vec<Option<HierRank>>>);

impl Handout {
    fn new(ranks: Vec<HierRank>) -> Self {
        Self(std::sync::Mutex::new(ranks.into_iter().map(Some).collect()))
    }
    fn take(&self, r: usize) -> HierRank {
        self.0.lock().unwrap()[r].take().expect("each rank taken once")
    }
}

#[test]
fn every_multi_node_conformance_case_passes() {
    let mut failed = Vec::new();
    let cases: Vec<_> = standard_cases().into_iter().filter(|c| c.spec.topology.num_nodes > 1).collect();
    assert!(cases.len() >= 5, "the standard cases lost their multi-node shapes");
    for case in cases {
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
fn each_token_crosses_to_each_other_node_once_and_partials_come_back_once() {
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
        seed: 11,
    };
    let inputs = std::sync::Arc::new(spec.generate().unwrap());
    let ranks = Handout::new(ok_ranks(6, 2, test_config(20_000)));
    let ins = inputs.clone();
    let got = on_threads(6, move |r| {
        let mut comm = ranks.take(r);
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, 4, 24, topo).unwrap();
        let (out, handle) =
            comm.dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default()).unwrap();
        let y = switchyard::workload::expert_outputs(&out.x, r);
        comm.combine(&y, 128, &handle, None).unwrap();
        comm.traffic().clone()
    });
    let mut back_rows = vec![0u64; 6];
    for (r, t) in got.iter().enumerate() {
        for n in 0..3 {
            let want = if n == topo.node_of(r) { 0 } else { tokens_touching_node(&inputs[r].topk_idx, 4, 8, n) };
            assert_eq!(t.dispatch.inter_node_rows_to_node[n], want as u64, "rank {r} to node {n}");
        }
        // Each forwarded token's partial sum goes back to its source: one row per token per node.
        for n in 0..3 {
            back_rows[topo.rank_of(n, topo.local_of(r))] += t.combine.inter_node_rows_to_node[n];
        }
    }
    for (r, t) in got.iter().enumerate() {
        assert_eq!(back_rows[r], t.dispatch.inter_node.rows, "rank {r}: partial rows back vs tokens out");
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
        let bad_w = if r == 2 { &w[..15] } else { &w[..] };
        let first = comm.dispatch(x.as_ref(), &idx, bad_w, &layout, &DispatchOptions::default()).map(drop);
        let (recv, handle) = comm.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).unwrap();
        let y = switchyard::workload::expert_outputs(&recv.x, r);
        let back = comm.combine(&y, 128, &handle, None).map(|c| c.x.len());
        (first, recv, back)
    });
    for (r, (first, _, back)) in got.iter().enumerate() {
        match (r, first) {
            (2, Err(Error::ShapeMismatch { arg, .. })) => assert_eq!(*arg, "topk_weights"),
            (_, Err(Error::PeerFailed { rank: 2, .. })) if r != 2 => {}
            other => panic!("rank {r}: {other:?}"),
        }
        assert_eq!(back.as_ref().ok(), Some(&(8 * 128)), "rank {r}: combine after the failure");
    }
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
fn a_handle_of_another_communicator_is_refused_on_every_rank() {
    let topo = Topology::new(2, 1).unwrap();
    let a = Handout::new(ok_ranks(2, 1, test_config(20_000)));
    let b = Handout::new(ok_ranks(2, 1, test_config(20_000)));
    let got = on_threads(2, move |r| {
        let (mut a, mut b) = (a.take(r), b.take(r));
        let (x, idx, w) = small_input(r);
        let idx: Vec<i64> = idx.chunks(2).flat_map(|_| [0, 1]).collect();
        let layout = Layout::new(&idx, 2, 2, topo).unwrap();
        let (_, handle) = a.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).unwrap();
        b.dispatch_cached(x.as_ref(), &handle, &DispatchOptions::default()).map(drop)
    });
    for (r, g) in got.iter().enumerate() {
        assert!(matches!(g, Err(Error::HandleMismatch { .. })), "rank {r}: {g:?}");
    }
}

#[test]
fn a_node_view_sees_only_its_members_renumbered() {
    let got = on_tcp_groups(4, LONG, |group| {
        let shared = SharedGroup::new(Box::new(group));
        let me = shared.rank();
        // Nodes {0, 2} and {1, 3}: members need not be consecutive.
        let members = if me % 2 == 0 { vec![0, 2] } else { vec![1, 3] };
        let mut view = shared.subset(members)?;
        let gathered = view.all_gather(&[me as u8], LONG)?;
        let parts: Vec<Vec<u8>> = (0..2).map(|to| vec![me as u8, to as u8]).collect();
        let got = view.all_to_all(&parts, LONG)?;
        let refused = shared.subset(vec![(me + 1) % 4]).is_err() && view.all_to_all(&parts[..1], LONG).is_err();
        Ok((view.rank(), view.world_size(), gathered, got, refused))
    });
    for (r, g) in got.into_iter().enumerate() {
        let (rank, size, gathered, got, refused) = g.unwrap();
        let peers = if r % 2 == 0 { [0u8, 2] } else { [1, 3] };
        assert_eq!((rank, size), (r / 2, 2), "rank {r}");
        assert_eq!(gathered, vec![vec![peers[0]], vec![peers[1]]], "rank {r}");
        assert_eq!(got, vec![vec![peers[0], (r / 2) as u8], vec![peers[1], (r / 2) as u8]], "rank {r}");
        assert!(refused, "rank {r}: a view without this rank, or parts of the wrong count, must be refused");
    }
}

#[test]
fn a_node_split_that_does_not_divide_the_ranks_fails_on_every_rank() {
    for (r, got) in hier_ranks(3, 2, test_config(20_000)).into_iter().enumerate() {
        assert!(matches!(&got, Err(Error::InvalidArgument { .. })), "rank {r}: {:?}", got.err());
    }
}
