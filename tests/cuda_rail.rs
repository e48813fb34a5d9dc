//! The NCCL rail's deadline: a rail peer that never takes part makes the waiting rank's
//! exchange end at its deadline with a timeout that names it (no hang), the communicator
//! is aborted so later calls fail at once, and the peer that comes late fails too instead
//! of hanging on the aborted communicator.
//!
//! Needs 2 GPUs and NCCL (one rank per GPU, as threads of this process). Without them
//! the test prints why and passes, unless `SWITCHYARD_REQUIRE_CUDA=2`, where it fails.
//!
//!   SWITCHYARD_REQUIRE_CUDA=2 cargo test --release --test cuda_rail -- --nocapture

use std::net::TcpListener;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use switchyard::backend::cuda::{driver, nccl};
use switchyard::backend::hier::Rail;
use switchyard::bootstrap::TcpGroup;
use switchyard::Error;

fn two_gpus_or_skip() -> bool {
    let required = std::env::var("SWITCHYARD_REQUIRE_CUDA").is_ok_and(|v| v == "2");
    let gpus = if driver::driver_available() { driver::device_count().unwrap_or(0) } else { 0 };
    let ok = gpus >= 2 && nccl::nccl_available();
    if !ok {
        assert!(!required, "SWITCHYARD_REQUIRE_CUDA=2 but {gpus} GPU(s), NCCL available: {}", nccl::nccl_available());
        eprintln!("SKIPPED: needs 2 GPUs and NCCL ({gpus} GPU(s))");
    }
    ok
}

#[test]
fn a_rail_peer_that_never_comes_times_out_and_aborts_without_hanging() {
    if !two_gpus_or_skip() {
        return;
    }
    const DEADLINE: Duration = Duration::from_secs(2);
    // Rank 0 creates the group on this listener; rank 1 joins it at its address.
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().unwrap().to_string();
    let id = nccl::unique_id().expect("NCCL unique id");
    let joined = Arc::new(Barrier::new(2));
    let (first_done, wait_first) = mpsc::channel::<()>();
    let rank =
        |r: usize, root: Option<TcpListener>, first_done: Option<mpsc::Sender<()>>, wait_first: Option<mpsc::Receiver<()>>| {
            let (addr, joined) = (addr.clone(), joined.clone());
            std::thread::spawn(move || {
                let gpu = driver::Gpu::new(r).expect("GPU");
                gpu.bind().expect("bind");
                let mut group = match root {
                    Some(l) => TcpGroup::root(l, 2, Duration::from_secs(30)),
                    None => TcpGroup::join(&addr, r, 2, Duration::from_secs(30)),
                }
                .expect("group");
                let mut rail = nccl::NcclExchange::new(r, 2, &id).expect("NCCL communicator");
                joined.wait();
                if let Some(rx) = wait_first {
                    // The late peer: comes only after rank 0 gave up.
                    rx.recv_timeout(Duration::from_secs(60)).expect("rank 0 finished");
                }
                let parts = vec![vec![r as u8; 64]; 2];
                let t = Instant::now();
                let first = rail.exchange(&mut group, parts.clone(), DEADLINE);
                let took = t.elapsed();
                let t = Instant::now();
                let again = rail.exchange(&mut group, parts, DEADLINE);
                let again_took = t.elapsed();
                if let Some(tx) = first_done {
                    tx.send(()).unwrap();
                }
                (first, took, again, again_took)
            })
        };
    let r0 = rank(0, Some(listener), Some(first_done), None);
    let r1 = rank(1, None, None, Some(wait_first));
    let (first, took0, again, again_took) = r0.join().expect("rank 0");
    match &first {
        Err(Error::Timeout { timeout_ms, diag }) => {
            assert_eq!(diag.rank, 0, "{diag:?}");
            assert!(*timeout_ms <= DEADLINE.as_millis() as u64, "{timeout_ms}");
            assert!(diag.detail.contains("NCCL"), "{}", diag.detail);
        }
        other => panic!("rank 0: want a timeout, got {other:?}"),
    }
    assert!(took0 >= DEADLINE && took0 < DEADLINE * 3, "rank 0 gave up after {took0:?}");
    assert!(matches!(again, Err(Error::Cuda(ref m)) if m.contains("aborted")), "rank 0 again: {again:?}");
    assert!(again_took < Duration::from_millis(100), "an aborted rail fails at once, took {again_took:?}");
    let (first, took, _again, _) = r1.join().expect("rank 1");
    assert!(first.is_err(), "rank 1 exchanged with an aborted peer: {first:?}");
    assert!(took < DEADLINE * 3, "rank 1 gave up after {took:?}");
    eprintln!("rank 0: timed out after {took0:?}; rank 1: failed after {took:?} with {:?}", first.err());
}
