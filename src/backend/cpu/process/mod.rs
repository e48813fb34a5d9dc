//! The CPU backend with ranks that are processes, one per rank, started by a
//! launcher (mpirun, srun, torchrun) and joined through a [`ProcessGroup`]: MPI
//! with the `mpi` feature, else the TCP rendezvous. The route is the two-hop
//! route of the thread backend (inter-node once per destination node to the rail
//! peer, then forwarded inside the node; combine reversed, with each node's rows
//! summed before they cross back), and the results are the same; each hop moves
//! as one personalized exchange of the group instead of through chunked rings, so
//! `num_channels`, `chunk_tokens` and `buffer_tokens` are checked but not used.

mod combine;
mod dispatch;

use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use serde::{Deserialize, Serialize};

use self::dispatch::Positions;
use super::dispatch::DispatchInput;
use super::wire_rows;
use crate::backend::checks::{agree_on_nodes, call_name};
use crate::backend::{checks, gather_outcomes, CombineOutput, Communicator, DispatchOptions, DispatchOutput, TrafficLog};
use crate::bootstrap::{LaunchEnv, ProcessGroup};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{Rows, RowsRef};
use crate::topology::Topology;

/// One rank of a CPU group whose ranks are processes.
pub struct CpuProcessRank {
    group: Box<dyn ProcessGroup>,
    rank: usize,
    topology: Topology,
    config: Config,
    comm_id: u64,
    traffic: TrafficLog,
    /// Rows handed back with `recycle_rows`, reused by the next dispatch.
    spare_rows: Option<Rows>,
    /// Why an exchange failed half-way; the ranks are out of step, so every later call fails with it.
    broken: Option<String>,
}

/// What a rank announces before a call moves data: what it is calling (every rank
/// must call the same) and, for dispatch, its counts.
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    call: String,
    counts: Option<Counts>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Counts {
    num_tokens: usize,
    /// `[world]` rows this rank sends to each rank.
    to_rank: Vec<u32>,
    /// `[num_experts]` this rank's tokens per expert.
    tokens_per_expert: Vec<usize>,
}

/// What the process backend keeps in a [`Handle`].
struct ProcessHandleState {
    positions: Positions,
    recv_prefix: Vec<usize>,
    rail_tokens: Vec<usize>,
    fwd_reach: Vec<Vec<u8>>,
    /// `[nodes]` this rank's tokens that went to each other node.
    tokens_to_node: Vec<usize>,
}

impl CpuProcessRank {
    /// This process's rank of a CPU group over `group`. Nodes are the hosts of the
    /// group's ranks, or blocks of `ranks_per_node` consecutive ranks (each on one
    /// host) to emulate several nodes on one host. Collective: if one rank cannot
    /// join (bad config, bad node split), every rank fails.
    pub fn new(mut group: Box<dyn ProcessGroup>, ranks_per_node: Option<usize>, config: Config) -> Result<Self> {
        let (topology, comm_id) = agree_on_nodes(group.as_mut(), ranks_per_node, &config)?;
        let rank = group.rank();
        tracing::info!(rank, topology = %topology, transport = group.transport(), "cpu rank ready (one process per rank)");
        Ok(Self { group, rank, topology, config, comm_id, traffic: TrafficLog::default(), spare_rows: None, broken: None })
    }

    /// This process's rank of the job its launcher started (see
    /// [`crate::bootstrap::join_launched`] for how the processes meet); nodes as in [`CpuProcessRank::new`].
    pub fn from_launch_env(env: &LaunchEnv, ranks_per_node: Option<usize>, config: Config) -> Result<Self> {
        let group = crate::bootstrap::join_launched(env, Duration::from_millis(config.timeout_ms))?;
        Self::new(group, ranks_per_node, config)
    }

    /// Regroup the same processes into nodes of `ranks_per_node` (each on one host).
    /// Collective; on failure every rank keeps its nodes. Handles made before belong
    /// to the old grouping and are refused afterwards.
    pub fn set_ranks_per_node(&mut self, ranks_per_node: usize) -> Result<()> {
        let (topology, comm_id) = agree_on_nodes(self.group.as_mut(), Some(ranks_per_node), &self.config)?;
        (self.topology, self.comm_id) = (topology, comm_id);
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// Every rank's notice (after checking all call the same thing), or the first failure.
    fn notify(&mut self, mine: Result<Notice>) -> Result<Vec<Notice>> {
        if let Some(reason) = &self.broken {
            return Err(Error::PeerFailed { rank: self.rank, reason: format!("an earlier call failed: {reason}") });
        }
        let (sent, own_err) = match mine {
            Ok(n) => (Ok(n), None),
            Err(e) => (Err(e.to_string()), Some(e)),
        };
        let got = gather_outcomes(self, sent.as_ref().map_err(Clone::clone))?;
        if let Some(e) = own_err {
            return Err(e);
        }
        let all = got.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
        let call = &all[self.rank].call;
        if let Some((r, n)) = all.iter().enumerate().find(|(_, n)| n.call != *call) {
            return Err(Error::InvalidArgument {
                arg: "collective arguments".into(),
                reason: format!("rank {r} called {} while rank {} called {call}", n.call, self.rank),
            });
        }
        Ok(all)
    }

    /// A failure once data moves leaves the ranks out of step: remember it.
    fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }
}

impl Communicator for CpuProcessRank {
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
        let (world, me) = (topo.world(), self.rank);
        let checked = checks::dispatch(topo, &x, topk_idx, topk_weights, layout, options);
        let quantized = if checked.is_ok() { wire_rows(x, options) } else { None };
        let wire = quantized.as_ref().map(|q| q.as_ref()).unwrap_or(x);
        let positions = Positions::new(&layout.token_in_rank, world);
        let mine = checked.map(|_| Notice {
            call: call_name("dispatch", wire.hidden(), Some(wire.dtype()), layout.topk, layout.num_experts, true),
            counts: Some(Counts {
                num_tokens: layout.num_tokens,
                to_rank: positions.counts.clone(),
                tokens_per_expert: layout.tokens_per_expert.clone(),
            }),
        });
        let all = self.notify(mine)?;
        let counts: Vec<&Counts> = all.iter().map(|n| n.counts.as_ref().expect("dispatch notices carry counts")).collect();
        let mut recv_prefix = Vec::with_capacity(world);
        let mut num_recv = 0;
        for c in &counts {
            recv_prefix.push(num_recv);
            num_recv += c.to_rank[me] as usize;
        }
        let rail_tokens: Vec<usize> =
            (0..topo.num_nodes).map(|n| counts[topo.rank_of(n, topo.local_of(me))].num_tokens).collect();
        let per_rank = layout.num_experts / world;
        let tokens_per_expert: Vec<usize> =
            (0..per_rank).map(|e| counts.iter().map(|c| c.tokens_per_expert[me * per_rank + e]).sum()).collect();
        let plan = dispatch::Plan { me, topo, positions: &positions, recv_prefix, num_recv, timeout: self.timeout() };
        let input = DispatchInput {
            x: wire,
            topk_idx,
            topk_weights,
            topk: layout.topk,
            experts_per_rank: per_rank,
            with_meta: true,
            rail_tokens,
        };
        let spare = self.spare_rows.take();
        let got = dispatch::run(self.group.as_mut(), &plan, &input, spare);
        let got = self.guard(got)?;
        self.traffic.dispatch.accumulate(&got.traffic);
        // Hop 1 sent each token once to every other node it goes to: the partial rows combine gets back.
        let tokens_to_node = got.traffic.inter_node_rows_to_node.iter().map(|&rows| rows as usize).collect();
        let align = options.expert_alignment.max(1);
        let out = got.out;
        let output = DispatchOutput {
            x: out.x,
            topk_idx: out.topk_idx,
            topk_weights: out.topk_weights,
            tokens_per_expert: tokens_per_expert.iter().map(|c| c.div_ceil(align) * align).collect(),
            source_rank: out.source_rank.clone(),
            source_token: out.source_token.clone(),
        };
        let state = ProcessHandleState {
            recv_prefix: plan.recv_prefix,
            rail_tokens: input.rail_tokens,
            positions,
            fwd_reach: got.fwd_reach,
            tokens_to_node,
        };
        let handle = Handle {
            comm_id: self.comm_id,
            rank: me,
            topology: topo,
            num_tokens: layout.num_tokens,
            topk: layout.topk,
            num_experts: layout.num_experts,
            source_rank: out.source_rank,
            source_token: out.source_token,
            backend_state: Arc::new(state),
        };
        Ok((output, handle))
    }

    fn dispatch_cached(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<Rows> {
        let checked = checks::dispatch_cached(self.comm_id, self.rank, &x, handle, options)
            .and_then(|_| handle.state::<ProcessHandleState>("cpu").map(drop));
        let quantized = if checked.is_ok() { wire_rows(x, options) } else { None };
        let wire = quantized.as_ref().map(|q| q.as_ref()).unwrap_or(x);
        let call = call_name("dispatch_cached", wire.hidden(), Some(wire.dtype()), handle.topk, handle.num_experts, false);
        self.notify(checked.map(|_| Notice { call, counts: None }))?;
        let state: &ProcessHandleState = handle.state("cpu")?;
        let plan = dispatch::Plan {
            me: self.rank,
            topo: self.topology,
            positions: &state.positions,
            recv_prefix: state.recv_prefix.clone(),
            num_recv: handle.num_recv(),
            timeout: self.timeout(),
        };
        let input = DispatchInput {
            x: wire,
            topk_idx: &[],
            topk_weights: &[],
            topk: handle.topk,
            experts_per_rank: handle.num_experts / self.topology.world(),
            with_meta: false,
            rail_tokens: state.rail_tokens.clone(),
        };
        let spare = self.spare_rows.take();
        let got = dispatch::run(self.group.as_mut(), &plan, &input, spare);
        let got = self.guard(got)?;
        self.traffic.dispatch.accumulate(&got.traffic);
        Ok(got.out.x)
    }

    fn combine(&mut self, y: &[bf16], hidden: usize, handle: &Handle, topk_weights: Option<&[f32]>) -> Result<CombineOutput> {
        let checked = checks::combine(self.comm_id, self.rank, y, hidden, handle, topk_weights)
            .and_then(|_| handle.state::<ProcessHandleState>("cpu").map(drop));
        let call = call_name("combine", hidden, None, handle.topk, handle.num_experts, topk_weights.is_some());
        self.notify(checked.map(|_| Notice { call, counts: None }))?;
        let state: &ProcessHandleState = handle.state("cpu")?;
        let input = combine::Input {
            me: self.rank,
            topo: self.topology,
            y,
            hidden,
            weights: topk_weights,
            topk: handle.topk,
            num_tokens: handle.num_tokens,
            source_rank: &handle.source_rank,
            source_token: &handle.source_token,
            fwd_reach: &state.fwd_reach,
            tokens_to_node: &state.tokens_to_node,
            timeout: self.timeout(),
        };
        let got = combine::run(self.group.as_mut(), &input);
        let got = self.guard(got)?;
        self.traffic.combine.accumulate(&got.traffic);
        Ok(CombineOutput { x: got.x, topk_weights: got.weights })
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        checks::agree_on_config(self, &config, Ok(()))?;
        self.config = config;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let timeout = self.timeout();
        self.group.barrier(timeout)
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let timeout = self.timeout();
        self.group.all_gather(bytes, timeout)
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
