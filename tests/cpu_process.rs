//! The CPU backend with ranks that are processes (`CpuProcessRank`), here joined
//! through the TCP rendezvous with each rank on a thread of this test (the data
//! path is the same as under mpirun: only the group differs). Results are
//! compared with the serial oracle; failures are checked for their typed errors.

mod common;

use std::time::Duration;

use common::{on_tcp_groups, on_threads, test_config};
use switchyard::backend::cpu::CpuProcessRank;
use switchyard::conformance::standard_cases;
use switchyard::{Communicator, Config, DispatchOptions, Error, Layout, Result, Rows, Topology};

const LONG: Duration = Duration::from_secs(30);

/// `world` process-style ranks over a fresh TCP rendezvous, nodes of `ranks_per_node`.
fn process_ranks(world: usize, ranks_per_node: Option<usize>, config: Config) -> Vec<Result<CpuProcessRank>> {
    on_tcp_groups(world, LONG, move |group| CpuProcessRank::new(Box::new(group), ranks_per_node, config.clone()))
}

fn ok_ranks(world: usize, rpn: usize, config: Config) -> Vec<CpuProcessRank> {
    process_ranks(world, Some(rpn), config).into_iter().map(|r| r.expect("rank set-up")).collect()
}

#[test]
fn every_conformance_case_passes_with_ranks_as_processes() {
    let failed = common::failed_cases(standard_cases(), |case| {
        let topo = case.spec.topology;
        let ranks = ok_ranks(topo.world(), topo.ranks_per_node, case.config.clone());
        ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect()
    });
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}

#[test]
fn the_inter_node_hop_carries_each_token_once_per_destination_node() {
    let ranks = ok_ranks(6, 2, test_config(20_000));
    common::traffic_of_one_round(
        ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect(),
        &common::three_node_workload(7),
    );
}

#[test]
fn bad_input_on_one_rank_fails_every_rank_and_the_group_keeps_working() {
    let ranks = ok_ranks(4, 2, test_config(20_000));
    common::bad_input_fails_every_rank_and_the_group_keeps_working(
        ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect(),
        1,
    );
}

#[test]
fn ranks_calling_with_different_shapes_all_fail_with_invalid_argument() {
    let topo = Topology::new(1, 2).unwrap();
    let ranks = common::Handout::new(ok_ranks(2, 2, test_config(20_000)));
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
    let ranks = ok_ranks(2, 1, test_config(1_500));
    common::a_silent_peer_times_out(ranks.into_iter().map(|r| Box::new(r) as Box<dyn Communicator>).collect());
}
