//! Helpers shared by the integration tests: run one closure per rank of a CPU
//! cluster on its own thread (with a watchdog, so a hang fails the test instead
//! of stalling the suite), deterministic test data, and BF16 comparisons with
//! an explicit error bound.
//!
//! Every helper compares against values computed here or by the serial oracle,
//! never against the backend under test.

#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use half::bf16;
use switchyard::backend::cpu::{CpuCluster, CpuRank};
use switchyard::bootstrap::TcpGroup;
use switchyard::{Config, Topology};

/// Config for tests: small buffers and a short deadline so a stuck protocol fails fast.
pub fn test_config(timeout_ms: u64) -> Config {
    Config { num_channels: 2, chunk_tokens: 4, buffer_tokens: 8, timeout_ms }
}

/// Run `f(rank_endpoint)` on one thread per rank of a fresh CPU cluster and
/// return the results in rank order. Panics (naming `what`) if the whole run
/// takes longer than `deadline`, or if a rank thread panics.
pub fn run_cluster<R, F>(what: &str, topo: Topology, config: Config, deadline: Duration, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(&mut CpuRank) -> R + Send + Sync + 'static,
{
    let ranks = CpuCluster::new(topo, config).unwrap_or_else(|e| panic!("{what}: CpuCluster::new({topo}): {e}")).into_ranks();
    run_ranks(what, ranks, deadline, f)
}

/// Like [`run_cluster`], on endpoints the caller already has (returned with the results,
/// so the caller can make further calls on the same ranks).
pub fn run_ranks<R, F>(what: &str, ranks: Vec<CpuRank>, deadline: Duration, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(&mut CpuRank) -> R + Send + Sync + 'static,
{
    run_ranks_keep(what, ranks, deadline, f).into_iter().map(|(_, r)| r).collect()
}

/// Run `f` on every rank (one thread each) and give the endpoints back with the results.
pub fn run_ranks_keep<R, F>(what: &str, ranks: Vec<CpuRank>, deadline: Duration, f: F) -> Vec<(CpuRank, R)>
where
    R: Send + 'static,
    F: Fn(&mut CpuRank) -> R + Send + Sync + 'static,
{
    let f = std::sync::Arc::new(f);
    let n = ranks.len();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(n);
    for (i, mut comm) in ranks.into_iter().enumerate() {
        let f = f.clone();
        let tx = tx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("rank{i}"))
                .spawn(move || {
                    let r = f(&mut comm);
                    let _ = tx.send(i);
                    (comm, r)
                })
                .expect("spawn rank thread"),
        );
    }
    drop(tx);
    let start = std::time::Instant::now();
    let mut done = vec![false; n];
    for _ in 0..n {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(i) => done[i] = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let stuck: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
                panic!("{what}: ranks {stuck:?} did not return within {deadline:?} (hang)");
            }
            // A thread panicked before sending: join below reports it.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| h.join().unwrap_or_else(|_| panic!("{what}: rank {i} thread panicked")))
        .collect()
}

/// Deterministic BF16 test values in [-2, 2), a function of `(seed, index)` only.
pub fn bf16_values(seed: u64, n: usize) -> Vec<bf16> {
    (0..n).map(|i| bf16::from_f32(unit(seed, i as u64) * 4.0 - 2.0)).collect()
}

/// A deterministic value in [0, 1) (splitmix64 of `seed` and `i`).
pub fn unit(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Unit roundoff of BF16 (8 significant bits): rounding to BF16 moves a value by at most `u * |v|`.
pub const BF16_U: f32 = 1.0 / 256.0;

/// Combine's error allowance per unit of `sum |contributions|`, for [`check_close`]:
/// f32 summation in another order (at most `world` terms), plus, on multi-node
/// topologies, one BF16 rounding of each node's partial sum before it crosses the
/// inter-node hop (documented in `switchyard::conformance`; the partials of all
/// nodes together are at most `sum |contributions|`). On one node the result is
/// an f32 sum rounded once.
pub fn combine_rel_of_abs_sum(topo: Topology) -> f32 {
    let reorder = topo.world() as f32 * f32::EPSILON;
    if topo.num_nodes > 1 {
        reorder + BF16_U
    } else {
        reorder
    }
}

/// Compare a BF16 result with an f32 reference: element `i` may differ by one
/// BF16 rounding of the reference plus `rel_of_abs_sum * abs_sum[i]` (f32
/// summation-order error, or earlier BF16 roundings of partial terms). Returns
/// the first offending element as a message.
pub fn check_close(what: &str, got: &[bf16], want: &[f32], abs_sum: &[f32], rel_of_abs_sum: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, expected {}", got.len(), want.len()));
    }
    for i in 0..got.len() {
        let g = got[i].to_f32();
        let w = want[i];
        let tol = BF16_U * w.abs() + rel_of_abs_sum * abs_sum[i] + 1e-30;
        if !((g - w).abs() <= tol) {
            return Err(format!("{what}: element {i}: got {g}, expected {w} (tolerance {tol}, abs sum {})", abs_sum[i]));
        }
    }
    Ok(())
}

/// Tokens per rank that go to at least one expert on `node` (from `topk_idx` alone).
pub fn tokens_touching_node(topk_idx: &[i64], topk: usize, experts_per_node: usize, node: usize) -> usize {
    topk_idx.chunks_exact(topk).filter(|row| row.iter().any(|&e| e >= 0 && e as usize / experts_per_node == node)).count()
}

use std::sync::Arc;

use switchyard::workload::{expert_outputs, RankInput, WorkloadSpec};
use switchyard::{oracle, CombineOutput, Communicator, DispatchOptions, DispatchOutput, Layout};

/// Expected combine of every rank computed directly in f32 from the oracle's
/// dispatch: for each token, the sum of the rows that come back for it, and the
/// sum of their absolute values (for the error bound); weights likewise.
pub struct CombineExpectation {
    pub x: Vec<Vec<f32>>,
    pub abs_sum: Vec<Vec<f32>>,
    pub weights: Vec<Vec<f32>>,
    pub weights_abs_sum: Vec<Vec<f32>>,
}

/// `want[d]` is the oracle dispatch of rank `d`, `y[d]` its `[R_d, H]` rows, `w[d]` its `[R_d, k]` weights.
pub fn expected_combine(
    num_tokens: &[usize],
    hidden: usize,
    topk: usize,
    want: &[DispatchOutput],
    y: &[Vec<half::bf16>],
    w: &[Vec<f32>],
) -> CombineExpectation {
    let mut e = CombineExpectation {
        x: num_tokens.iter().map(|&t| vec![0f32; t * hidden]).collect(),
        abs_sum: num_tokens.iter().map(|&t| vec![0f32; t * hidden]).collect(),
        weights: num_tokens.iter().map(|&t| vec![0f32; t * topk]).collect(),
        weights_abs_sum: num_tokens.iter().map(|&t| vec![0f32; t * topk]).collect(),
    };
    for (d, out) in want.iter().enumerate() {
        for i in 0..out.source_rank.len() {
            let (s, t) = (out.source_rank[i] as usize, out.source_token[i] as usize);
            for h in 0..hidden {
                let v = y[d][i * hidden + h].to_f32();
                e.x[s][t * hidden + h] += v;
                e.abs_sum[s][t * hidden + h] += v.abs();
            }
            for j in 0..topk {
                let v = w[d][i * topk + j];
                e.weights[s][t * topk + j] += v;
                e.weights_abs_sum[s][t * topk + j] += v.abs();
            }
        }
    }
    e
}

/// Run one valid dispatch (with `options`) and a weighted combine of
/// `expert_outputs` on every rank, and check both against the serial oracle:
/// dispatch bit-exact, combine within one BF16 rounding plus f32 reordering.
/// Returns the ranks for further calls. `what` names the case in every message.
pub fn check_valid_round(
    what: &str,
    ranks: Vec<CpuRank>,
    spec: &WorkloadSpec,
    inputs: Arc<Vec<RankInput>>,
    options: DispatchOptions,
    deadline: Duration,
) -> Vec<CpuRank> {
    let (topk, num_experts, hidden) = (spec.topk, spec.num_experts, spec.hidden);
    let ins = inputs.clone();
    let results = run_ranks_keep(what, ranks, deadline, move |comm| {
        let r = comm.rank();
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, topk, num_experts, comm.topology()).map_err(|e| format!("layout: {e}"))?;
        let (recv, handle) = comm
            .dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &options)
            .map_err(|e| format!("dispatch: {e}"))?;
        let y = expert_outputs(&recv.x, r);
        let out = comm.combine(&y, hidden, &handle, Some(&recv.topk_weights)).map_err(|e| format!("combine: {e}"))?;
        Ok::<(DispatchOutput, CombineOutput), String>((recv, out))
    });
    let topo = spec.topology;
    let want = oracle::dispatch(topo, num_experts, topk, &inputs, &options);
    let y: Vec<Vec<half::bf16>> = want.iter().enumerate().map(|(d, o)| expert_outputs(&o.x, d)).collect();
    let w: Vec<Vec<f32>> = want.iter().map(|o| o.topk_weights.clone()).collect();
    let num_tokens: Vec<usize> = inputs.iter().map(|i| i.topk_idx.len() / topk).collect();
    let exp = expected_combine(&num_tokens, hidden, topk, &want, &y, &w);
    let world = topo.world() as f32;
    let mut ranks = Vec::new();
    for (r, (comm, res)) in results.into_iter().enumerate() {
        let (got, comb) = res.unwrap_or_else(|e| panic!("{what}: rank {r}: valid call failed: {e}"));
        assert!(
            got == want[r],
            "{what}: rank {r}: dispatch differs from the oracle:\n got {}\nwant {}",
            summarize(&got),
            summarize(&want[r])
        );
        check_close(&format!("{what}: rank {r}: combine x"), &comb.x, &exp.x[r], &exp.abs_sum[r], combine_rel_of_abs_sum(topo))
            .unwrap_or_else(|m| panic!("{m}"));
        let cw = comb.topk_weights.unwrap_or_else(|| panic!("{what}: rank {r}: combine with weights returned no weights"));
        assert_eq!(cw.len(), exp.weights[r].len(), "{what}: rank {r}: combined weights length");
        for (i, (&g, &e)) in cw.iter().zip(&exp.weights[r]).enumerate() {
            let tol = world * f32::EPSILON * exp.weights_abs_sum[r][i];
            assert!((g - e).abs() <= tol, "{what}: rank {r}: combined weight {i}: got {g}, expected {e}");
        }
        ranks.push(comm);
    }
    ranks
}

/// A short description of a dispatch output for failure messages (not the whole payload).
pub fn summarize(o: &DispatchOutput) -> String {
    format!(
        "rows={} source_rank={:?} source_token={:?} topk_idx={:?} tokens_per_expert={:?} dtype={}",
        o.source_rank.len(),
        o.source_rank,
        o.source_token,
        o.topk_idx,
        o.tokens_per_expert,
        o.x.dtype()
    )
}

/// Run `f(rank)` on one thread per rank; results in rank order. Panics after two minutes (a hang).
pub fn on_threads<R: Send + 'static>(world: usize, f: impl Fn(usize) -> R + Send + Sync + 'static) -> Vec<R> {
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for r in 0..world {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("rank{r}"))
            .spawn(move || {
                let _ = tx.send((r, f(r)));
            })
            .expect("spawn");
    }
    let mut out: Vec<Option<R>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (r, v) = rx.recv_timeout(Duration::from_secs(120)).expect("a rank hung or panicked");
        out[r] = Some(v);
    }
    out.into_iter().map(|v| v.expect("every rank reported")).collect()
}

/// `world` ranks that are threads standing in for processes: each joins a fresh TCP
/// rendezvous (waiting at most `timeout`) and runs `f` on its group; results in rank order.
pub fn on_tcp_groups<R: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(TcpGroup) -> switchyard::Result<R> + Send + Sync + 'static,
) -> Vec<switchyard::Result<R>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let listener = std::sync::Mutex::new(Some(listener));
    on_threads(world, move |r| {
        let group = if r == 0 {
            TcpGroup::root(listener.lock().unwrap().take().expect("one root"), world, timeout)
        } else {
            TcpGroup::join(&addr, r, world, timeout)
        }?;
        f(group)
    })
}

/// Inputs of one small dispatch on rank `r`: 8 tokens, hidden 128, top-2 of 8 experts.
pub fn small_input(r: usize) -> (switchyard::Rows, Vec<i64>, Vec<f32>) {
    let x = switchyard::Rows::Bf16 { hidden: 128, data: bf16_values(r as u64, 8 * 128) };
    let idx: Vec<i64> = (0..8).flat_map(|t| [(t % 8) as i64, ((t + 3) % 8) as i64]).collect();
    (x, idx, vec![0.5; 16])
}

/// Bad weights on rank `bad` of `ranks` (a group of 8 experts, [`small_input`]): that
/// rank must get the typed error, every other rank `PeerFailed` naming it; then the
/// same call with good input must work on every rank and match the oracle.
pub fn bad_input_fails_every_rank_and_the_group_keeps_working(ranks: Vec<Box<dyn switchyard::Communicator>>, bad: usize) {
    use switchyard::{DispatchOptions, Error, Layout};
    let world = ranks.len();
    let topo = ranks[0].topology();
    let ranks = std::sync::Mutex::new(ranks.into_iter().map(Some).collect::<Vec<_>>());
    let got = on_threads(world, move |r| {
        let mut comm = ranks.lock().unwrap()[r].take().expect("each rank taken once");
        let (x, idx, w) = small_input(r);
        let layout = Layout::new(&idx, 2, 8, topo).unwrap();
        let bad_w = if r == bad { &w[..15] } else { &w[..] };
        let first = comm.dispatch(x.as_ref(), &idx, bad_w, &layout, &DispatchOptions::default()).map(drop);
        let (recv, handle) = comm.dispatch(x.as_ref(), &idx, &w, &layout, &DispatchOptions::default()).unwrap();
        let y = switchyard::workload::expert_outputs(&recv.x, r);
        let back = comm.combine(&y, 128, &handle, None).map(|c| c.x.len());
        (first, recv, back)
    });
    for (r, (first, _, back)) in got.iter().enumerate() {
        match first {
            Err(Error::ShapeMismatch { arg, .. }) if r == bad => assert_eq!(*arg, "topk_weights"),
            Err(Error::PeerFailed { rank, .. }) if r != bad && *rank == bad => {}
            other => panic!("rank {r}: {other:?}"),
        }
        assert_eq!(back.as_ref().ok(), Some(&(8 * 128)), "rank {r}: combine after the failure");
    }
    let inputs: Vec<_> = (0..world)
        .map(|r| {
            let (x, topk_idx, topk_weights) = small_input(r);
            switchyard::workload::RankInput { x, topk_idx, topk_weights }
        })
        .collect();
    let want = switchyard::oracle::dispatch(topo, 8, 2, &inputs, &DispatchOptions::default());
    for (r, (_, recv, _)) in got.iter().enumerate() {
        assert_eq!(switchyard::conformance::count_wrong_dispatch(recv, &want[r]), 0, "rank {r}");
    }
}

/// Every case of `cases` on the ranks `make` builds for it (one thread per rank),
/// checked against the oracle; the failures, one line each.
pub fn failed_cases(
    cases: Vec<switchyard::conformance::Case>,
    make: impl Fn(&switchyard::conformance::Case) -> Vec<Box<dyn switchyard::Communicator>>,
) -> Vec<String> {
    let mut failed = Vec::new();
    for case in cases {
        let ranks = make(&case);
        assert!(ranks.iter().all(|r| r.topology() == case.spec.topology), "{}: topology", case.name);
        let report = switchyard::conformance::run_case_on(&case, ranks);
        if !report.passed() {
            failed.push(format!("{}: {} wrong, error {:?}", report.name, report.wrong, report.error));
        }
    }
    failed
}

/// 3 nodes x 2 ranks, 40 tokens, top-4 of 24 experts (8 per node), some holes.
pub fn three_node_workload(seed: u64) -> switchyard::workload::WorkloadSpec {
    switchyard::workload::WorkloadSpec {
        topology: Topology::new(3, 2).unwrap(),
        tokens: 40,
        hidden: 128,
        topk: 4,
        num_experts: 24,
        dtype: switchyard::DType::Bf16,
        routing: switchyard::workload::RoutingKind::Uniform,
        max_nodes: 3,
        hole_rate: 0.1,
        seed,
    }
}

/// One dispatch and one combine of `spec`'s workload on `ranks` (one thread each);
/// each rank's traffic afterwards. Also checks, per rank, that the inter-node hop of
/// dispatch carried each token once to each other node it goes to (counted here from
/// the inputs), and no row to the rank's own node.
pub fn traffic_of_one_round(
    ranks: Vec<Box<dyn switchyard::Communicator>>,
    spec: &switchyard::workload::WorkloadSpec,
) -> Vec<switchyard::TrafficLog> {
    use switchyard::{DispatchOptions, Layout};
    let (topo, k, e) = (spec.topology, spec.topk, spec.num_experts);
    let inputs = std::sync::Arc::new(spec.generate().unwrap());
    let ranks = std::sync::Mutex::new(ranks.into_iter().map(Some).collect::<Vec<_>>());
    let ins = inputs.clone();
    let got = on_threads(topo.world(), move |r| {
        let mut comm = ranks.lock().unwrap()[r].take().expect("each rank taken once");
        let inp = &ins[r];
        let layout = Layout::new(&inp.topk_idx, k, e, topo).unwrap();
        let (out, handle) =
            comm.dispatch(inp.x.as_ref(), &inp.topk_idx, &inp.topk_weights, &layout, &DispatchOptions::default()).unwrap();
        let y = switchyard::workload::expert_outputs(&out.x, r);
        comm.combine(&y, out.x.hidden(), &handle, None).unwrap();
        comm.traffic().clone()
    });
    let per_node = e / topo.num_nodes;
    for (r, t) in got.iter().enumerate() {
        for n in 0..topo.num_nodes {
            let want = if n == topo.node_of(r) { 0 } else { tokens_touching_node(&inputs[r].topk_idx, k, per_node, n) };
            assert_eq!(t.dispatch.inter_node_rows_to_node[n], want as u64, "rank {r} to node {n}");
        }
        assert_eq!(t.dispatch.inter_node.rows, t.dispatch.inter_node_rows_to_node.iter().sum::<u64>(), "rank {r}");
    }
    got
}

/// Ranks made together, each taken by its own thread.
pub struct Handout<T>(std::sync::Mutex<Vec<Option<T>>>);

impl<T> Handout<T> {
    pub fn new(ranks: Vec<T>) -> Self {
        Self(std::sync::Mutex::new(ranks.into_iter().map(Some).collect()))
    }
    pub fn take(&self, r: usize) -> T {
        self.0.lock().unwrap()[r].take().expect("each rank taken once")
    }
}

/// Two ranks (2 nodes x 1, 4 experts, made with a 1.5 s deadline); rank 1 stays in the
/// group but never calls. Rank 0's dispatch must fail with `Timeout` after about the
/// deadline, not hang.
pub fn a_silent_peer_times_out(ranks: Vec<Box<dyn switchyard::Communicator>>) {
    use switchyard::{DispatchOptions, Error, Layout};
    assert_eq!(ranks.len(), 2);
    let topo = ranks[0].topology();
    let ranks = Handout::new(ranks);
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
