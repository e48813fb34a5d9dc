//! CPU reference backend: threads as ranks, grouped into emulated nodes.
//!
//! It runs the route the GPU path runs: a token bound for another node crosses
//! the inter-node hop once per destination node, to the rank with the same
//! local index there, which forwards it to the ranks of its node that host the
//! token's experts; combine reverses the route and the forwarding rank sums its
//! node's rows per token (f32) before the single row crosses back. Data moves
//! through bounded per-channel rings of `buffer_tokens` slots, `chunk_tokens` at
//! a time, with head/tail flow control; every wait has a deadline.

mod combine;
mod dispatch;
mod output;
mod process;
mod progress;
mod ring;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use half::bf16;

use self::dispatch::{CallRings, DispatchInput, RankCtx, Record, RecvPlan, SendPlan};
use self::ring::Ring;
use self::slots::{CombineSlot, DispatchSlot};
use crate::backend::{checks, CombineOutput, Communicator, DispatchOptions, DispatchOutput, TrafficLog};
use crate::bootstrap::threads::Board;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::quant;
use crate::routing::Layout;
use crate::tensor::{DType, Rows, RowsRef};
use crate::topology::Topology;

pub use self::process::CpuProcessRank;

/// A group of CPU ranks sharing memory; split it into per-rank endpoints with [`CpuCluster::into_ranks`].
pub struct CpuCluster {
    topology: Topology,
    config: Config,
}

impl CpuCluster {
    /// A group of `topology.world()` ranks; the config is validated here.
    pub fn new(topology: Topology, config: Config) -> Result<Self> {
        Topology::new(topology.num_nodes, topology.ranks_per_node)?;
        config.validate()?;
        Ok(Self { topology, config })
    }

    /// One endpoint per rank, in rank order; move each to its own thread.
    pub fn into_ranks(self) -> Vec<CpuRank> {
        let board = Arc::new(Board::new(self.topology.world()));
        let comm_id = rand::random::<u64>();
        tracing::debug!(topology = %self.topology, config = ?self.config, "cpu cluster");
        (0..self.topology.world())
            .map(|rank| CpuRank {
                rank,
                topology: self.topology,
                config: self.config.clone(),
                comm_id,
                board: board.clone(),
                traffic: TrafficLog::default(),
                dispatch_rings: RingSet::default(),
                combine_rings: RingSet::default(),
                combine_scratch: combine::Scratch::default(),
                spare_rows: None,
            })
            .collect()
    }
}

/// Incoming rings a rank owns (it is their consumer), kept across calls and
/// re-made only when a call needs larger slots.
#[derive(Default)]
struct RingSet {
    intra_in: Vec<Option<Arc<Ring>>>,
    inter_in: Vec<Option<Arc<Ring>>>,
}

/// One rank of a [`CpuCluster`].
pub struct CpuRank {
    rank: usize,
    topology: Topology,
    config: Config,
    comm_id: u64,
    board: Arc<Board>,
    traffic: TrafficLog,
    dispatch_rings: RingSet,
    combine_rings: RingSet,
    combine_scratch: combine::Scratch,
    /// Rows handed back with `recycle_rows`, reused by the next dispatch.
    spare_rows: Option<Rows>,
}

/// What every rank must agree on in one collective call.
#[derive(Debug, Clone, PartialEq)]
struct Signature {
    op: &'static str,
    hidden: usize,
    dtype: Option<DType>,
    topk: usize,
    num_experts: usize,
    weights: bool,
    /// Channels, chunk and buffer tokens.
    knobs: [usize; 3],
}

/// Counts a source announces in the notify step.
struct Counts {
    num_tokens: usize,
    counts: Vec<u32>,
    node_counts: Vec<u32>,
    tokens_per_expert: Vec<usize>,
}

struct Post {
    sig: Signature,
    intra_in: Vec<Option<Arc<Ring>>>,
    inter_in: Vec<Option<Arc<Ring>>>,
    counts: Option<Counts>,
}

type Posted = std::result::Result<Post, String>;

/// What the CPU backend keeps in a [`Handle`].
struct CpuHandleState {
    plan: SendPlan,
    recv: RecvPlan,
    record: Record,
    rail_tokens: Vec<usize>,
    channels: usize,
}

impl CpuRank {
    /// The context of a call over `channels` channels.
    fn ctx(&self, channels: usize) -> RankCtx {
        RankCtx {
            me: self.rank,
            topo: self.topology,
            channels,
            chunk: self.config.chunk_tokens,
            timeout: Duration::from_millis(self.config.timeout_ms),
        }
    }

    /// Make sure this rank's incoming rings can carry `slot_bytes`-byte slots.
    fn ensure_rings(set: &mut RingSet, topo: Topology, me: usize, channels: usize, slots: usize, slot_bytes: usize) {
        let (rpn, nodes) = (topo.ranks_per_node, topo.num_nodes);
        let (my_node, my_local) = (topo.node_of(me), topo.local_of(me));
        let fits =
            |v: &Vec<Option<Arc<Ring>>>, len: usize| v.len() == len && v.iter().flatten().all(|r| r.fits(slots, slot_bytes));
        if !fits(&set.intra_in, channels * rpn) {
            set.intra_in =
                (0..channels * rpn).map(|i| (i % rpn != my_local).then(|| Arc::new(Ring::new(slots, slot_bytes)))).collect();
        }
        if !fits(&set.inter_in, channels * nodes) {
            set.inter_in =
                (0..channels * nodes).map(|i| (i % nodes != my_node).then(|| Arc::new(Ring::new(slots, slot_bytes)))).collect();
        }
    }

    /// The notify step: post this rank's rings and counts (or its error) and collect everyone's.
    fn exchange_posts(&mut self, mine: Result<Post>) -> Result<Vec<Arc<Posted>>> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let (item, own_err) = match mine {
            Ok(p) => (Ok(p), None),
            Err(e) => (Err(e.to_string()), Some(e)),
        };
        let posts = self.board.all_gather(self.rank, item, timeout)?;
        if let Some(e) = own_err {
            return Err(e);
        }
        for (r, p) in posts.iter().enumerate() {
            if let Err(reason) = p.as_ref() {
                return Err(Error::PeerFailed { rank: r, reason: reason.clone() });
            }
        }
        let mine = posts[self.rank].as_ref().as_ref().expect("checked").sig.clone();
        for (r, p) in posts.iter().enumerate() {
            let sig = &p.as_ref().as_ref().expect("checked").sig;
            if *sig != mine {
                return Err(Error::InvalidArgument {
                    arg: "collective arguments".into(),
                    reason: format!("rank {r} called {sig:?} while rank {} called {mine:?}", self.rank),
                });
            }
        }
        Ok(posts)
    }

    /// The rings this rank produces into and consumes from in this call.
    fn call_rings(&self, posts: &[Arc<Posted>], own: &RingSet, channels: usize) -> CallRings {
        let topo = self.topology;
        let (rpn, nodes) = (topo.ranks_per_node, topo.num_nodes);
        let (my_node, my_local) = (topo.node_of(self.rank), topo.local_of(self.rank));
        let post = |r: usize| posts[r].as_ref().as_ref().expect("checked");
        CallRings {
            intra_out: (0..channels * rpn)
                .map(|i| {
                    let (c, j) = (i / rpn, i % rpn);
                    (j != my_local)
                        .then(|| post(topo.rank_of(my_node, j)).intra_in[c * rpn + my_local].clone().expect("peer ring"))
                })
                .collect(),
            inter_out: (0..channels * nodes)
                .map(|i| {
                    let (c, n) = (i / nodes, i % nodes);
                    (n != my_node)
                        .then(|| post(topo.rank_of(n, my_local)).inter_in[c * nodes + my_node].clone().expect("peer ring"))
                })
                .collect(),
            intra_in: own.intra_in.clone(),
            inter_in: own.inter_in.clone(),
        }
    }

    fn recv_plan(&self, posts: &[Arc<Posted>]) -> (RecvPlan, Vec<usize>, Vec<usize>) {
        let topo = self.topology;
        let (rpn, nodes, world, channels) = (topo.ranks_per_node, topo.num_nodes, topo.world(), self.config.num_channels);
        let (me, my_node, my_local) = (self.rank, topo.node_of(self.rank), topo.local_of(self.rank));
        let counts = |r: usize| posts[r].as_ref().as_ref().expect("checked").counts.as_ref().expect("dispatch counts");
        let mut recv_prefix = Vec::with_capacity(world);
        let mut total = 0usize;
        for s in 0..world {
            recv_prefix.push(total);
            total += (0..channels).map(|c| counts(s).counts[c * world + me] as usize).sum::<usize>();
        }
        let mut expect_fwd = vec![0usize; channels * nodes];
        let mut expect_recv = vec![0usize; channels * rpn];
        for c in 0..channels {
            for n in (0..nodes).filter(|&n| n != my_node) {
                expect_fwd[c * nodes + n] = counts(topo.rank_of(n, my_local)).node_counts[c * nodes + my_node] as usize;
            }
            for i in (0..rpn).filter(|&i| i != my_local) {
                expect_recv[c * rpn + i] = (0..nodes).map(|n| counts(topo.rank_of(n, i)).counts[c * world + me] as usize).sum();
            }
        }
        let rail_tokens = (0..nodes).map(|n| counts(topo.rank_of(n, my_local)).num_tokens).collect();
        let per_rank = counts(me).tokens_per_expert.len() / world;
        let tokens_per_expert =
            (0..per_rank).map(|e| (0..world).map(|s| counts(s).tokens_per_expert[me * per_rank + e]).sum()).collect();
        (RecvPlan { recv_prefix, num_recv: total, expect_fwd, expect_recv }, rail_tokens, tokens_per_expert)
    }

    fn dispatch_slot_bytes(&self, x: &RowsRef<'_>, topk: usize) -> usize {
        let groups = if x.dtype() == DType::Fp8 { x.hidden() / quant::SCALE_GROUP } else { 0 };
        DispatchSlot::new(self.topology.ranks_per_node, topk, groups, x.dtype().row_bytes(x.hidden()) - 4 * groups).bytes()
    }

    /// A failed data exchange leaves rings half-used: mark the group broken so
    /// every rank's next call fails at once, naming this rank.
    fn give_up_on_error<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.board.mark_broken(self.rank, e);
        }
        r
    }

    /// Channels of a call that follows `handle`'s routing: the split of the dispatch
    /// that made it, whatever the config says now (its plan is per channel). The
    /// config's count when the handle is not this backend's (the checks reject it).
    fn handle_channels(&self, handle: &Handle) -> usize {
        handle.state::<CpuHandleState>("cpu").map(|s| s.channels).unwrap_or(self.config.num_channels)
    }

    /// The knobs every rank must share in a call.
    fn knobs(&self, channels: usize) -> [usize; 3] {
        [channels, self.config.chunk_tokens, self.config.buffer_tokens]
    }
}

/// The rows to put on the wire: BF16 input quantized when FP8 is asked for on the
/// wire (`None`: send `x` as it is).
pub(crate) fn wire_rows(x: RowsRef<'_>, options: &DispatchOptions) -> Option<Rows> {
    match x {
        RowsRef::Bf16 { hidden, data } if options.fp8_on_wire => {
            let (q, s) = quant::quantize(data, hidden);
            Some(Rows::Fp8 { hidden, data: q, scales: s })
        }
        _ => None,
    }
}

impl Communicator for CpuRank {
    fn backend_name(&self) -> &'static str {
        "cpu"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn topology(&self) -> Topology {
        self.topology
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn dispatch(
        &mut self,
        x: RowsRef<'_>,
        topk_idx: &[i64],
        topk_weights: &[f32],
        layout: &Layout,
        options: &DispatchOptions,
    ) -> Result<(DispatchOutput, Handle)> {
        let topo = self.topology;
        let channels = self.config.num_channels;
        let checked = checks::dispatch(topo, &x, topk_idx, topk_weights, layout, options);
        let quantized = if checked.is_ok() { wire_rows(x, options) } else { None };
        let wire = quantized.as_ref().map(|q| q.as_ref()).unwrap_or(x);
        let plan = SendPlan::new(layout.token_in_rank.clone(), layout.num_tokens, topo, channels);
        let slot_bytes = self.dispatch_slot_bytes(&wire, layout.topk);
        Self::ensure_rings(&mut self.dispatch_rings, topo, self.rank, channels, self.config.buffer_tokens, slot_bytes);
        let mine = checked.map(|_| Post {
            sig: Signature {
                op: "dispatch",
                hidden: wire.hidden(),
                dtype: Some(wire.dtype()),
                topk: layout.topk,
                num_experts: layout.num_experts,
                weights: true,
                knobs: self.knobs(channels),
            },
            intra_in: self.dispatch_rings.intra_in.clone(),
            inter_in: self.dispatch_rings.inter_in.clone(),
            counts: Some(Counts {
                num_tokens: layout.num_tokens,
                counts: plan.counts.clone(),
                node_counts: plan.node_counts.clone(),
                tokens_per_expert: layout.tokens_per_expert.clone(),
            }),
        });
        let posts = self.exchange_posts(mine)?;
        let (recv, rail_tokens, tokens_per_expert) = self.recv_plan(&posts);
        let rings = self.call_rings(&posts, &self.dispatch_rings, channels);
        drop(posts);
        let input = DispatchInput {
            x: wire,
            topk_idx,
            topk_weights,
            topk: layout.topk,
            experts_per_rank: layout.num_experts / topo.world(),
            with_meta: true,
            rail_tokens: rail_tokens.clone(),
        };
        let spare = self.spare_rows.take();
        let got = self.give_up_on_error(dispatch::run(&self.ctx(channels), &rings, &plan, &recv, &input, spare))?;
        self.traffic.dispatch.accumulate(&got.traffic);
        let align = options.expert_alignment.max(1);
        let output = DispatchOutput {
            x: got.x,
            topk_idx: got.topk_idx,
            topk_weights: got.topk_weights,
            tokens_per_expert: tokens_per_expert.iter().map(|c: &usize| c.div_ceil(align) * align).collect(),
            source_rank: got.source_rank.clone(),
            source_token: got.source_token.clone(),
        };
        let handle = Handle {
            comm_id: self.comm_id,
            rank: self.rank,
            topology: topo,
            num_tokens: layout.num_tokens,
            topk: layout.topk,
            num_experts: layout.num_experts,
            source_rank: got.source_rank,
            source_token: got.source_token,
            backend_state: Arc::new(CpuHandleState { plan, recv, record: got.record, rail_tokens, channels }),
        };
        Ok((output, handle))
    }

    fn dispatch_cached(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<Rows> {
        let topo = self.topology;
        let channels = self.handle_channels(handle);
        let checked = checks::dispatch_cached(self.comm_id, self.rank, &x, handle, options);
        let quantized = if checked.is_ok() { wire_rows(x, options) } else { None };
        let wire = quantized.as_ref().map(|q| q.as_ref()).unwrap_or(x);
        let slot_bytes = self.dispatch_slot_bytes(&wire, handle.topk);
        Self::ensure_rings(&mut self.dispatch_rings, topo, self.rank, channels, self.config.buffer_tokens, slot_bytes);
        let mine = checked.map(|_| Post {
            sig: Signature {
                op: "dispatch_cached",
                hidden: wire.hidden(),
                dtype: Some(wire.dtype()),
                topk: handle.topk,
                num_experts: handle.num_experts,
                weights: false,
                knobs: self.knobs(channels),
            },
            intra_in: self.dispatch_rings.intra_in.clone(),
            inter_in: self.dispatch_rings.inter_in.clone(),
            counts: None,
        });
        let posts = self.exchange_posts(mine)?;
        let rings = self.call_rings(&posts, &self.dispatch_rings, channels);
        drop(posts);
        let state: &CpuHandleState = handle.state("cpu")?;
        let input = DispatchInput {
            x: wire,
            topk_idx: &[],
            topk_weights: &[],
            topk: handle.topk,
            experts_per_rank: handle.num_experts / topo.world(),
            with_meta: false,
            rail_tokens: state.rail_tokens.clone(),
        };
        let spare = self.spare_rows.take();
        let got = self.give_up_on_error(dispatch::run(&self.ctx(channels), &rings, &state.plan, &state.recv, &input, spare))?;
        self.traffic.dispatch.accumulate(&got.traffic);
        Ok(got.x)
    }

    fn combine(&mut self, y: &[bf16], hidden: usize, handle: &Handle, topk_weights: Option<&[f32]>) -> Result<CombineOutput> {
        let topo = self.topology;
        let channels = self.handle_channels(handle);
        let checked = checks::combine(self.comm_id, self.rank, y, hidden, handle, topk_weights);
        let kw = if topk_weights.is_some() { handle.topk } else { 0 };
        let slot_bytes = CombineSlot::new(kw, hidden * 2).bytes();
        Self::ensure_rings(&mut self.combine_rings, topo, self.rank, channels, self.config.buffer_tokens, slot_bytes);
        let mine = checked.map(|_| Post {
            sig: Signature {
                op: "combine",
                hidden,
                dtype: None,
                topk: handle.topk,
                num_experts: handle.num_experts,
                weights: topk_weights.is_some(),
                knobs: self.knobs(channels),
            },
            intra_in: self.combine_rings.intra_in.clone(),
            inter_in: self.combine_rings.inter_in.clone(),
            counts: None,
        });
        let posts = self.exchange_posts(mine)?;
        let rings = self.call_rings(&posts, &self.combine_rings, channels);
        drop(posts);
        let state: &CpuHandleState = handle.state("cpu")?;
        let input = combine::CombineInput {
            y,
            hidden,
            weights: topk_weights,
            topk: handle.topk,
            num_tokens: handle.num_tokens,
            source_rank: &handle.source_rank,
            source_token: &handle.source_token,
            record: &state.record,
        };
        let got = combine::run(&self.ctx(channels), &rings, &input, &mut self.combine_scratch);
        let got = self.give_up_on_error(got)?;
        self.traffic.combine.accumulate(&got.traffic);
        Ok(CombineOutput { x: got.x, topk_weights: got.weights })
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        checks::agree_on_config(self, &config, Ok(()))?;
        self.config = config;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.board.barrier(self.rank, Duration::from_millis(self.config.timeout_ms))
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.board.all_gather(self.rank, bytes.to_vec(), Duration::from_millis(self.config.timeout_ms))?;
        Ok(all.iter().map(|b| b.as_ref().clone()).collect())
    }

    fn traffic(&self) -> &TrafficLog {
        &self.traffic
    }

    fn reset_traffic(&mut self) {
        self.traffic = TrafficLog::default();
    }

    fn recycle_rows(&mut self, rows: Rows) {
        self.spare_rows = Some(rows);
    }
}
