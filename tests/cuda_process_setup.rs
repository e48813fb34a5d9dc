//! One-process-per-GPU set-up on a machine without a usable GPU: the ranks still
//! meet over TCP, exchange their set-up errors, and every rank returns an error
//! (its own first) instead of waiting for a peer's buffer handle.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use switchyard::backend::cuda::CudaRank;
use switchyard::bootstrap::{LaunchEnv, Launcher};
use switchyard::{Config, Error};

#[test]
fn every_rank_fails_fast_and_names_the_problem_when_cuda_is_not_usable() {
    if switchyard::probe::probe().cuda_usable {
        eprintln!("a usable GPU is present: this test covers machines without one (tests/cuda_intranode.rs covers GPUs)");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = |rank| LaunchEnv {
        rank,
        world_size: 2,
        local_rank: Some(rank),
        local_world_size: Some(2),
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: Launcher::Torchrun,
    };
    let t = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let e = env(r);
                s.spawn(move || CudaRank::from_launch_env(&e, Config::default()).map(|_| ()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Err(Error::BackendUnavailable { backend: "cuda", reason }) => {
                assert!(reason.contains("not found") || reason.contains("present"), "rank {rank}: {reason}")
            }
            other => panic!("rank {rank}: expected its own BackendUnavailable, got {other:?}"),
        }
    }
}
