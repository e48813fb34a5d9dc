//! The TCP bootstrap with ranks as threads of this test (and once as real
//! processes): collectives compared with vectors built here, and every failure
//! path (missing rank, dead rank, mismatched group) checked for its typed error.

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard::bootstrap::{LaunchEnv, Launcher, TcpGroup};
use switchyard::{Error, Result};

const LONG: Duration = Duration::from_secs(20);
/// Slack on top of a deadline before a test calls the wait unbounded (the host may be busy).
const SLACK: Duration = Duration::from_secs(3);

type Job<R> = Box<dyn FnOnce() -> R + Send>;

/// Run each job on its own thread; results in job order. Panics if they take longer than a minute.
fn run_all<R: Send + 'static>(jobs: Vec<Job<R>>) -> Vec<R> {
    let (tx, rx) = mpsc::channel();
    let n = jobs.len();
    for (i, job) in jobs.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((i, job()));
        });
    }
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (i, r) = rx.recv_timeout(Duration::from_secs(60)).expect("a rank thread hung or panicked");
        out[i] = Some(r);
    }
    out.into_iter().map(|r| r.expect("every job reported")).collect()
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local_addr").to_string();
    (l, addr)
}

/// One job per rank of a `world`-rank group: rank 0 on a fresh listener, the others joining it.
fn group_jobs<R: Send + 'static>(world: usize, f: impl Fn(usize, Result<TcpGroup>) -> R + Send + Sync + 'static) -> Vec<Job<R>> {
    let (l, addr) = listener();
    let f = std::sync::Arc::new(f);
    let mut l = Some(l);
    (0..world)
        .map(|r| {
            let (f, addr, l) = (f.clone(), addr.clone(), l.take());
            Box::new(move || {
                let g = match l {
                    Some(l) => TcpGroup::root(l, world, LONG),
                    None => TcpGroup::join(&addr, r, world, LONG),
                };
                f(r, g)
            }) as Job<R>
        })
        .collect()
}

/// Rank `r`'s part in round `k`: lengths 0, 100, 200, 300 in turn, and one large part.
fn part(r: usize, k: usize) -> Vec<u8> {
    let len = if (r, k) == (1, 3) { 3 << 20 } else { (r + k) % 4 * 100 };
    (0..len).map(|i| (i * 31 + r * 7 + k) as u8).collect()
}

#[test]
fn three_and_four_ranks_gather_barrier_and_broadcast_in_rank_order() {
    for world in [3, 4] {
        let results = run_all(group_jobs(world, move |r, g| {
            let mut g = g.unwrap();
            assert_eq!((g.rank(), g.world_size(), g.hostnames().len()), (r, world, world));
            let mut rounds = Vec::new();
            for k in 0..5 {
                rounds.push(g.all_gather(&part(r, k), LONG).unwrap());
                g.barrier(LONG).unwrap();
                let root = format!("round {k}").into_bytes();
                let got = g.broadcast((r == 0).then_some(&root[..]), LONG).unwrap();
                assert_eq!(got, root);
            }
            (rounds, g.hostnames().to_vec())
        }));
        let me = &results[0].1[0];
        for (r, (rounds, hosts)) in results.iter().enumerate() {
            assert!(!me.is_empty() && hosts.iter().all(|h| h == me), "rank {r}: host names {hosts:?}");
            for (k, got) in rounds.iter().enumerate() {
                let want: Vec<Vec<u8>> = (0..world).map(|src| part(src, k)).collect();
                assert!(got == &want, "world {world} rank {r} round {k}: wrong parts");
            }
        }
    }
}

/// Rank `src`'s part for rank `dst` in round `k`: some empty, one large.
fn addressed(src: usize, dst: usize, k: usize) -> Vec<u8> {
    let len = if (src, dst, k) == (2, 1, 1) { 2 << 20 } else { (src * 3 + dst + k) % 4 * 50 };
    (0..len).map(|i| (i * 13 + src * 5 + dst * 3 + k) as u8).collect()
}

#[test]
fn all_to_all_delivers_each_part_to_its_rank_in_source_order() {
    for world in [1, 2, 4] {
        let results = run_all(group_jobs(world, move |r, g| {
            let mut g = g.unwrap();
            (0..3)
                .map(|k| {
                    let parts: Vec<Vec<u8>> = (0..world).map(|dst| addressed(r, dst, k)).collect();
                    g.all_to_all(&parts, LONG).unwrap()
                })
                .collect::<Vec<_>>()
        }));
        for (r, rounds) in results.iter().enumerate() {
            for (k, got) in rounds.iter().enumerate() {
                let want: Vec<Vec<u8>> = (0..world).map(|src| addressed(src, r, k)).collect();
                assert!(got == &want, "world {world} rank {r} round {k}: wrong parts");
            }
        }
    }
}

#[test]
fn all_to_all_with_the_wrong_number_of_parts_is_refused_before_sending() {
    let results = run_all(group_jobs(1, |_, g| g.unwrap().all_to_all(&[vec![1], vec![2]], LONG)));
    assert!(matches!(&results[0], Err(Error::InvalidArgument { arg, .. }) if arg == "parts"), "{:?}", results[0]);
}

#[test]
fn a_group_of_one_needs_no_peers_and_checks_the_broadcast_root() {
    let (l, _) = listener();
    let mut g = TcpGroup::root(l, 1, LONG).unwrap();
    assert_eq!(g.all_gather(b"solo", LONG).unwrap(), vec![b"solo".to_vec()]);
    g.barrier(LONG).unwrap();
    assert!(matches!(g.broadcast(None, LONG), Err(Error::InvalidArgument { .. })));
    assert_eq!(g.broadcast(Some(b"x"), LONG).unwrap(), b"x");
    assert!(matches!(TcpGroup::join("127.0.0.1:1", 0, 2, LONG), Err(Error::InvalidArgument { .. })));
}

#[test]
fn a_rank_missing_at_rendezvous_times_out_in_time_with_a_count() {
    let timeout = Duration::from_millis(600);
    let (l, addr) = listener();
    let mut jobs: Vec<Job<(Result<TcpGroup>, Duration)>> = vec![Box::new(move || {
        let t = Instant::now();
        (TcpGroup::root(l, 4, timeout), t.elapsed())
    })];
    for r in 1..3 {
        let addr = addr.clone();
        jobs.push(Box::new(move || (TcpGroup::join(&addr, r, 4, LONG), Duration::ZERO)));
    }
    let results = run_all(jobs);
    let (root, elapsed) = &results[0];
    assert!(*elapsed >= timeout && *elapsed < timeout + SLACK, "root waited {elapsed:?}");
    match root {
        Err(Error::Timeout { diag, .. }) => {
            assert_eq!((diag.rank, diag.head, diag.tail), (0, 3, 4), "{diag}");
            assert!(diag.detail.contains("3 of 4 ranks arrived") && diag.detail.contains("[3]"), "{diag}");
        }
        other => panic!("root: expected a timeout, got {other:?}"),
    }
    for (r, (res, _)) in results.iter().enumerate().skip(1) {
        assert!(matches!(res, Err(Error::PeerFailed { rank: 3, .. })), "rank {r}: {res:?}");
    }
}

#[test]
fn a_joiner_without_rank_0_times_out_in_time() {
    let (l, addr) = listener();
    drop(l); // nobody listens there now
    let timeout = Duration::from_millis(500);
    let t = Instant::now();
    let res = TcpGroup::join(&addr, 1, 2, timeout);
    assert!(t.elapsed() < timeout + SLACK, "{:?}", t.elapsed());
    assert!(matches!(&res, Err(Error::Timeout { diag, .. }) if diag.detail.contains("could not reach rank 0")), "{res:?}");
}

#[test]
fn joiners_retry_until_rank_0_listens() {
    let (l, addr) = listener();
    drop(l);
    let a = addr.clone();
    let joiner = std::thread::spawn(move || TcpGroup::join(&a, 1, 2, LONG).map(|mut g| g.all_gather(b"1", LONG)));
    std::thread::sleep(Duration::from_millis(300));
    let mut root = TcpGroup::root(TcpListener::bind(&addr).unwrap(), 2, LONG).unwrap();
    assert_eq!(root.all_gather(b"0", LONG).unwrap(), vec![b"0".to_vec(), b"1".to_vec()]);
    assert_eq!(joiner.join().unwrap().unwrap().unwrap(), vec![b"0".to_vec(), b"1".to_vec()]);
}

#[test]
fn a_rank_missing_from_a_collective_times_out_and_breaks_the_group() {
    let timeout = Duration::from_millis(600);
    let results = run_all(group_jobs(3, move |r, g| {
        let mut g = g.unwrap();
        g.all_gather(&[r as u8], LONG).unwrap();
        if r == 2 {
            // Late: by now rank 0 has given up on this rank and said so.
            std::thread::sleep(timeout + SLACK);
        }
        // Rank 1 waits longer than rank 0, so it hears rank 0's verdict instead of timing out itself.
        let t = Instant::now();
        let first = g.all_gather(&[r as u8], if r == 1 { LONG } else { timeout });
        let elapsed = t.elapsed();
        let t = Instant::now();
        let later = g.barrier(LONG);
        (first, elapsed, later, t.elapsed(), g)
    }));
    let (first, elapsed, later, later_elapsed, _) = &results[0];
    assert!(*elapsed >= timeout && *elapsed < timeout + SLACK, "rank 0 waited {elapsed:?}");
    match first {
        Err(Error::Timeout { diag, .. }) => assert_eq!((diag.head, diag.tail), (2, 3), "{diag}"),
        other => panic!("rank 0: expected a timeout, got {other:?}"),
    }
    // Broken for good: the next call fails at once, naming the missing rank.
    assert!(matches!(later, Err(Error::PeerFailed { rank: 2, .. })), "{later:?}");
    assert!(*later_elapsed < Duration::from_millis(100));
    assert!(matches!(&results[1].0, Err(Error::PeerFailed { rank: 2, .. })), "rank 1: {:?}", results[1].0);
    assert!(results[1].1 < timeout + SLACK);
    assert!(matches!(&results[2].0, Err(Error::Protocol { rank: 2, .. })), "rank 2: {:?}", results[2].0);
}

#[test]
fn a_rank_waiting_on_a_silent_rank_0_times_out_in_time() {
    let timeout = Duration::from_millis(400);
    let results = run_all(group_jobs(2, move |r, g| {
        let mut g = g.unwrap();
        if r == 0 {
            std::thread::sleep(timeout + SLACK); // keep the link open, but never call
            return (Ok(Vec::new()), Duration::ZERO);
        }
        let t = Instant::now();
        (g.all_gather(b"x", timeout), t.elapsed())
    }));
    let (res, elapsed) = &results[1];
    assert!(*elapsed >= timeout && *elapsed < timeout + SLACK, "{elapsed:?}");
    assert!(matches!(res, Err(Error::Timeout { diag, .. }) if diag.rank == 1 && diag.tail == 2), "{res:?}");
}

#[test]
fn a_rank_that_drops_its_group_makes_the_others_fail_naming_it() {
    for dead in [2, 0] {
        let results = run_all(group_jobs(4, move |r, g| {
            let mut g = g.unwrap();
            for k in 0..2 {
                g.all_gather(&part(r, k), LONG).unwrap();
            }
            if r == dead {
                drop(g);
                return None;
            }
            let t = Instant::now();
            let first = g.all_gather(b"after", LONG);
            assert!(t.elapsed() < SLACK, "rank {r} noticed rank {dead}'s death only after {:?}", t.elapsed());
            let later = g.barrier(LONG);
            Some((first, later, g))
        }));
        for (r, res) in results.iter().enumerate().filter(|(r, _)| *r != dead) {
            let (first, later, _) = res.as_ref().unwrap();
            assert!(matches!(first, Err(Error::PeerFailed { rank, .. }) if *rank == dead), "rank {r}: {first:?}");
            assert!(matches!(later, Err(Error::PeerFailed { rank, .. }) if *rank == dead), "rank {r}: {later:?}");
        }
    }
}

#[test]
fn ranks_calling_different_collectives_fail_with_a_protocol_error() {
    let results = run_all(group_jobs(3, |r, g| {
        let mut g = g.unwrap();
        let res = if r == 1 { g.barrier(LONG).map(|()| Vec::new()) } else { g.all_gather(b"x", LONG) };
        (res, g)
    }));
    assert!(
        matches!(&results[0].0, Err(Error::Protocol { rank: 0, detail }) if detail.contains("barrier")),
        "{:?}",
        results[0].0
    );
    assert!(matches!(&results[1].0, Err(Error::Protocol { rank: 1, .. })), "{:?}", results[1].0);
    assert!(matches!(&results[2].0, Err(Error::PeerFailed { rank: 1, .. })), "{:?}", results[2].0);
}

/// Rank 0 of a 3-rank group and rank 1 join at once; the third party joins 500 ms
/// later (so rank 0 has taken rank 1 in by then) with the given rank and world size.
fn rendezvous_with_a_bad_third(rank: usize, world: usize) -> Vec<Result<TcpGroup>> {
    let (l, addr) = listener();
    let a = addr.clone();
    run_all(vec![
        Box::new(move || TcpGroup::root(l, 3, LONG)),
        Box::new(move || TcpGroup::join(&a, 1, 3, LONG)),
        Box::new(move || {
            std::thread::sleep(Duration::from_millis(500));
            TcpGroup::join(&addr, rank, world, LONG)
        }),
    ])
}

#[test]
fn a_world_size_mismatch_is_rejected() {
    let res = rendezvous_with_a_bad_third(2, 4);
    assert!(matches!(&res[0], Err(Error::Protocol { rank: 0, detail }) if detail.contains("world size 4")), "{:?}", res[0]);
    assert!(matches!(&res[1], Err(Error::PeerFailed { rank: 2, .. })), "{:?}", res[1]);
    assert!(matches!(&res[2], Err(Error::Protocol { rank: 2, detail }) if detail.contains("world size")), "{:?}", res[2]);
}

#[test]
fn a_duplicate_rank_is_rejected() {
    let res = rendezvous_with_a_bad_third(1, 3);
    assert!(matches!(&res[0], Err(Error::Protocol { rank: 0, detail }) if detail.contains("joined twice")), "{:?}", res[0]);
    assert!(matches!(&res[1], Err(Error::Protocol { rank: 1, .. })), "{:?}", res[1]);
    assert!(matches!(&res[2], Err(Error::Protocol { rank: 1, .. })), "{:?}", res[2]);
}

#[test]
fn a_stray_connection_does_not_break_the_rendezvous() {
    use std::io::Write;
    let (l, addr) = listener();
    let mut stray = std::net::TcpStream::connect(&addr).unwrap();
    stray.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let a = addr.clone();
    let res = run_all(vec![
        Box::new(move || TcpGroup::root(l, 2, LONG).and_then(|mut g| g.all_gather(b"a", LONG))) as Job<_>,
        Box::new(move || TcpGroup::join(&a, 1, 2, LONG).and_then(|mut g| g.all_gather(b"b", LONG))),
    ]);
    for r in res {
        assert_eq!(r.unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    }
}

/// Set by the parent of `ranks_as_processes_meet_through_launcher_variables` in its children.
const CHILD: &str = "SWITCHYARD_TCP_TEST_CHILD";

#[test]
fn ranks_as_processes_meet_through_launcher_variables() {
    let (l, addr) = listener();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (1..3)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["--exact", "child_rank_process", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let res = TcpGroup::root(l, 3, LONG).and_then(|mut g| g.all_gather(b"rank 0", LONG).map(|v| (v, g)));
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, out) in outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {} exited with {}:\n{text}", r + 1, out.status);
    }
    let (got, mut g) = res.unwrap();
    assert_eq!(got, vec![b"rank 0".to_vec(), b"rank 1".to_vec(), b"rank 2".to_vec()]);
    // The children have exited: rank 0 sees them gone.
    assert!(matches!(g.barrier(LONG), Err(Error::PeerFailed { .. })));
}

/// The child side of the test above; does nothing in a normal test run.
#[test]
fn child_rank_process() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let env = LaunchEnv::from_env().unwrap().expect("launcher variables set by the parent");
    assert_eq!((env.launcher, env.world_size), (Launcher::Torchrun, 3));
    let mut g = TcpGroup::from_env(&env, LONG).unwrap();
    let got = g.all_gather(format!("rank {}", env.rank).as_bytes(), LONG).unwrap();
    assert_eq!(got, vec![b"rank 0".to_vec(), b"rank 1".to_vec(), b"rank 2".to_vec()]);
}
