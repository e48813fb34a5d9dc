//! The two-hop route over node-local communicators (`HierRank`), here with the CPU
//! backend inside each node and the ranks on threads of this test joined through
//! the TCP rendezvous (the CUDA backend plugs into the same place on a GPU machine).
//! Results are compared with the serial oracle; traffic with counts made here.

mod common;

use std::time::Duration;

use common::{on_tcp_groups, on_threads, test_config};
use switchyard::backend::cpu::CpuProcessRank;
use switchyard::backend::hier::HierRank;
use switchyard::bootstrap::SharedGroup;
use switchyard::conformance::standard_cases;
use switchyard::{Communicator, Config, DispatchOptions, Error, Layout, Result, Topology};

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

#[test]
fn every_multi_node_conformance_case_passes() {
    let cases: Vec<_> = standard_cases().into_iter().filter(|c| c.spec.topology.num_nodes > 1).collect();
    assert!(cases.len() >= 5, "the standard cases lost their multi-node shapes");
    let failed = common::failed_cases(cases, |case| {
        let topo = case.spec.topology;
        let ranks = ok_ranks(topo.world(), topo.ranks_per_node, case.config.clone());
        ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect()
    });
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}

#[test]
fn each_token_crosses_to_each_other_node_once_and_partials_come_back_once() {
    let spec = common::three_node_workload(11);
    let topo = spec.topology;
    let ranks = ok_ranks(6, 2, test_config(20_000));
    let got = common::traffic_of_one_round(ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect(), &spec);
    // Each forwarded token's partial sum goes back to its source: one row per token per node.
    let mut back_rows = [0u64; 6];
    for (r, t) in got.iter().enumerate() {
        for n in 0..3 {
            back_rows[topo.rank_of(n, topo.local_of(r))] += t.combine.inter_node_rows_to_node[n];
        }
    }
    for (r, t) in got.iter().enumerate() {
        assert_eq!(back_rows[r], t.dispatch.inter_node.rows, "rank {r}: partial rows back vs tokens out");
    }
}

#[test]
fn bad_input_on_one_rank_fails_every_rank_and_the_group_keeps_working() {
    let ranks = ok_ranks(4, 2, test_config(20_000));
    common::bad_input_fails_every_rank_and_the_group_keeps_working(
        ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect(),
        2,
    );
}

#[test]
fn a_handle_of_another_communicator_is_refused_on_every_rank() {
    let topo = Topology::new(2, 1).unwrap();
    let a = common::Handout::new(ok_ranks(2, 1, test_config(20_000)));
    let b = common::Handout::new(ok_ranks(2, 1, test_config(20_000)));
    let got = on_threads(2, move |r| {
        let (mut a, mut b) = (a.take(r), b.take(r));
        let (x, idx, w) = common::small_input(r);
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

#[test]
fn a_rank_that_never_calls_makes_the_others_time_out_not_hang() {
    let ranks = ok_ranks(2, 1, test_config(1_500));
    common::a_silent_peer_times_out(ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect());
}
