//! The two-hop route over any node-local communicator: ranks that are processes
//! (one per GPU under a launcher), grouped into nodes; inside each node a
//! single-node communicator of any backend (the CUDA backend's NVLink kernels, or
//! the CPU backend) moves rows between the node's ranks.
//!
//! Dispatch: each rank sends each token once to every other node that hosts one of
//! its experts, to its rail peer there (the rank with the same local index), with
//! the top-k entries that belong to that node. The rail peer adds what it received
//! to its own tokens and dispatches them inside its node, with expert ids made
//! node-local; the rows that arrive are put back in (source rank, source token)
//! order. Combine is the reverse: the node-local combine sums each forwarded
//! token's rows in f32 and rounds once to BF16 (the partial sum), one row per token
//! crosses back to its source, which sums its nodes' partials in f32 and rounds.
//!
//! Rows are gathered on the host into one part per rail peer, and the [`Rail`] moves
//! them: by default the process group's personalized exchange (MPI, or the TCP
//! rendezvous); the CUDA backend puts NCCL there ([`HierRank::use_rail`]), which
//! stages each part through device memory. The two hops run one after the other:
//! no chunk pipeline overlaps them yet.

mod batch;
mod rail;

pub use self::rail::{GroupRail, Rail, RailPlace};

use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use serde::{Deserialize, Serialize};

use self::batch::{partials_from_bytes, partials_to_bytes, BatchFormat, TokenBatch};
use super::checks::{agree_on_nodes, call_name};
use super::cpu::wire_rows;
use super::{
    checks, gather_outcomes_by, CombineOutput, Communicator, DispatchOptions, DispatchOutput, HopCount, ResidentInputs,
    ResidentOp, TrafficLog,
};
use crate::bootstrap::{ProcessGroup, SharedGroup};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::routing::Layout;
use crate::tensor::{DType, Rows, RowsRef};
use crate::topology::Topology;

/// Makes the communicator of one node from the node's view of the process group
/// (its ranks renumbered from 0) and the config. Collective over the node.
pub type NodeMaker<'a> = dyn FnMut(Box<dyn ProcessGroup>, &Config) -> Result<Box<dyn Communicator>> + 'a;

/// One rank of a multi-node group: a node-local communicator plus the rail hop.
pub struct HierRank {
    world: Box<dyn ProcessGroup>,
    node: Box<dyn Communicator>,
    rail: Box<dyn Rail>,
    rank: usize,
    topology: Topology,
    config: Config,
    comm_id: u64,
    traffic: TrafficLog,
    /// `[inter-node transfer, node-local op]` device seconds of each call since the last
    /// [`Communicator::take_hop_seconds`], where both were timed.
    hop_log: Vec<[f64; 2]>,
    /// The device path of cached dispatch and combine, where the backend has one.
    device: Option<Box<dyn DeviceHops>>,
    /// Why a call failed once data moved; the ranks are out of step, so every later call fails with it.
    broken: Option<String>,
}

/// What a [`HierRank`] keeps in a [`Handle`]: the route of its tokens.
pub(crate) struct RouteState {
    /// Names this route in a device path's cache of plans (unique per process).
    pub id: u64,
    /// The node-local dispatch's handle.
    pub node: Handle,
    /// Row `i` of this rank's output is row `perm[i]` of the node-local output.
    pub perm: Vec<u32>,
    /// `[nodes]` this rank's tokens that went to each node (its own node's: those
    /// it dispatched inside the node itself), ascending.
    pub sent: Vec<Vec<u32>>,
    /// `[nodes]` tokens this rank forwarded for its rail peer on each node (its own
    /// node: its own tokens), in the order of the node-local dispatch's input.
    pub forwarded: Vec<usize>,
    /// `[F, k]` expert ids of the node-local dispatch's input, node-local (-1: elsewhere).
    pub node_ids: Vec<i64>,
    /// `[F]` (source rank, source token) of each row of the node-local dispatch's input.
    pub sources: Vec<[u32; 2]>,
}

/// The rows of a first dispatch: on the host, riding with the metadata, or left to the
/// device path (the caller's rows, quantized there with FP8 on the wire).
enum FirstRows<'a> {
    Host(RowsRef<'a>),
    Device(RowsRef<'a>),
}

/// Row width of the stand-in rows of a node-local dispatch that only makes a route
/// (a first dispatch whose rows take the device path, the device path's parts).
pub(crate) const STAND_IN_HIDDEN: usize = 128;

/// A fresh [`RouteState::id`].
fn next_route_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a device path of the two hops works with, for one call.
pub(crate) struct HopsAt<'a> {
    /// The node-local communicator.
    pub node: &'a mut dyn Communicator,
    /// This rank's rail.
    pub rail: &'a mut dyn Rail,
    /// The rest of what it knows of the call.
    pub call: CallInfo<'a>,
}

/// What a device path knows of one call besides the node and the rail.
pub(crate) struct CallInfo<'a> {
    /// The call's route.
    pub route: &'a RouteState,
    /// This rank's tokens in the call.
    pub tokens: usize,
    /// `[R]` source rank of each row this rank receives, in output order.
    pub source_rank: &'a [u32],
    /// `[R]` token index on its source rank of each row this rank receives.
    pub source_token: &'a [u32],
    /// Nodes and ranks per node.
    pub topology: Topology,
    /// This rank.
    pub rank: usize,
    /// Deadline of each wait.
    pub timeout: Duration,
}

/// A device path for cached dispatch and combine (the CUDA backend's: rows packed, sent
/// and reordered on the GPU, NCCL between rail peers), in place of the host path. Every
/// method answers `None` for a call it does not take; the host path runs it then.
pub(crate) trait DeviceHops: Send {
    /// Cached dispatch of `x` (BF16 rows quantized to FP8 on the way with `fp8_on_wire`);
    /// the rows and `[rail transfer, node op]` seconds.
    fn dispatch_cached(&mut self, at: HopsAt<'_>, x: RowsRef<'_>, fp8_on_wire: bool) -> Option<Result<(Rows, [f64; 2])>>;
    /// Combine of `y` (and `weights`); the sums, the summed weights and `[rail transfer, node op]` seconds.
    #[allow(clippy::type_complexity)]
    fn combine(
        &mut self,
        at: HopsAt<'_>,
        y: &[bf16],
        hidden: usize,
        weights: Option<&[f32]>,
    ) -> Option<Result<(Vec<bf16>, Option<Vec<f32>>, [f64; 2])>>;
    /// [`Communicator::time_device_resident`], with each call's `[rail transfer, node op]` seconds.
    #[allow(clippy::type_complexity)]
    fn time_resident(
        &mut self,
        at: HopsAt<'_>,
        op: ResidentOp,
        inputs: &ResidentInputs<'_>,
        iters: usize,
    ) -> Option<Result<(Vec<f64>, Vec<[f64; 2]>)>>;
}

#[derive(Serialize, Deserialize)]
struct Notice {
    call: String,
}

impl HierRank {
    /// This process's rank of `group`, grouped into nodes by host, or into blocks of
    /// `ranks_per_node` consecutive ranks (each on one host) to emulate several nodes on
    /// one host. `make_node` builds each node's communicator over the node's ranks.
    /// Collective: one rank's failure fails every rank.
    pub fn new(
        group: &SharedGroup,
        ranks_per_node: Option<usize>,
        config: Config,
        make_node: &mut NodeMaker<'_>,
    ) -> Result<Self> {
        let mut world = group.whole();
        let rank = group.rank();
        let timeout = Duration::from_millis(config.timeout_ms);
        let (topology, comm_id) = agree_on_nodes(world.as_mut(), ranks_per_node, &config)?;
        let members = topology.ranks_of_node(topology.node_of(rank)).collect();
        let node = group.subset(members).and_then(|view| make_node(view, &config));
        // Every node's outcome, so a node that could not start fails the others too.
        let outcome = node.as_ref().map(|_| ()).map_err(|e| e.to_string());
        let got = gather_outcomes_by(rank, |b| world.all_gather(b, timeout), outcome.as_ref().map_err(Clone::clone))?;
        let node = node?;
        got.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
        tracing::info!(rank, topology = %topology, node_backend = node.backend_name(), transport = world.transport(), "hierarchical rank ready");
        let rail = Box::new(GroupRail::new(RailPlace { topology, rank }));
        let traffic = TrafficLog::default();
        Ok(Self { world, node, rail, rank, topology, config, comm_id, traffic, hop_log: Vec::new(), device: None, broken: None })
    }

    /// Move the inter-node hop onto the rail `make` builds for this rank's place (given
    /// the whole group, to agree on what the rail needs). Collective: when any rank
    /// cannot make its rail, every rank fails and keeps the rail it had.
    pub fn use_rail(&mut self, make: impl FnOnce(RailPlace, &mut dyn ProcessGroup) -> Result<Box<dyn Rail>>) -> Result<()> {
        let place = RailPlace { topology: self.topology, rank: self.rank };
        let rail = make(place, self.world.as_mut());
        let (me, timeout) = (self.rank, self.timeout());
        let outcome = rail.as_ref().map(|_| ()).map_err(|e| e.to_string());
        let got = gather_outcomes_by(me, |b| self.world.all_gather(b, timeout), outcome.as_ref().map_err(Clone::clone))?;
        let rail = rail?;
        got.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
        tracing::info!(rank = me, rail = rail.name(), "inter-node hop");
        self.rail = rail;
        Ok(())
    }

    /// The rail the inter-node hop takes.
    pub fn rail_name(&self) -> &'static str {
        self.rail.name()
    }

    /// Run cached dispatch and combine through `device` where it takes them.
    pub(crate) fn use_device_hops(&mut self, device: Box<dyn DeviceHops>) {
        self.device = Some(device);
    }

    /// Run `f` with the device path and what it works with, if there is a device path.
    fn with_device<T>(
        &mut self,
        route: &RouteState,
        handle: &Handle,
        f: impl FnOnce(&mut dyn DeviceHops, HopsAt<'_>) -> Option<T>,
    ) -> Option<T> {
        self.with_device_for(route, (handle.num_tokens, &handle.source_rank, &handle.source_token), f)
    }

    /// [`HierRank::with_device`] for a call of `tokens` tokens receiving rows named by
    /// (source rank, source token), before there is a handle.
    fn with_device_for<T>(
        &mut self,
        route: &RouteState,
        (tokens, source_rank, source_token): (usize, &[u32], &[u32]),
        f: impl FnOnce(&mut dyn DeviceHops, HopsAt<'_>) -> Option<T>,
    ) -> Option<T> {
        let timeout = self.timeout();
        let device = self.device.as_mut()?;
        let call = CallInfo { route, tokens, source_rank, source_token, topology: self.topology, rank: self.rank, timeout };
        let at = HopsAt { node: self.node.as_mut(), rail: self.rail.as_mut(), call };
        f(device.as_mut(), at)
    }

    /// Count what a call on the device path put on the rail: each token's row of
    /// `row_bytes`; `rows_too` false: bytes only (the rows were counted with their metadata).
    fn count_rail(&mut self, route: &RouteState, row_bytes: usize, dispatch: bool, rows_too: bool) {
        for n in 0..self.topology.num_nodes {
            let rows = if dispatch { route.sent[n].len() } else { route.forwarded[n] };
            self.count_inter_node(dispatch, n, if rows_too { rows } else { 0 }, rows * row_bytes);
        }
    }

    /// Count `rows` rows and `bytes` bytes sent to node `n` over the rail (nothing for this
    /// rank's own node, whose part never leaves it).
    fn count_inter_node(&mut self, dispatch: bool, n: usize, rows: usize, bytes: usize) {
        let (nodes, me) = (self.topology.num_nodes, self.my_node());
        let into = if dispatch { &mut self.traffic.dispatch } else { &mut self.traffic.combine };
        into.inter_node_rows_to_node.resize(nodes, 0);
        if n == me {
            return;
        }
        into.inter_node += HopCount { rows: rows as u64, bytes: bytes as u64 };
        into.inter_node_rows_to_node[n] += rows as u64;
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn my_node(&self) -> usize {
        self.topology.node_of(self.rank)
    }

    /// Agree that every rank makes this call with good input: its own error here,
    /// `PeerFailed` for another rank's, a mismatch error if the calls differ.
    fn agree_call(&mut self, call: String, local: Result<()>) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(Error::PeerFailed { rank: self.rank, reason: format!("an earlier call failed: {reason}") });
        }
        let (me, timeout) = (self.rank, self.timeout());
        let mine = local.as_ref().map(|_| Notice { call: call.clone() }).map_err(|e| e.to_string());
        let got = gather_outcomes_by(me, |b| self.world.all_gather(b, timeout), mine.as_ref().map_err(Clone::clone))?;
        local?;
        let all = got.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
        if let Some((r, n)) = all.iter().enumerate().find(|(_, n)| n.call != call) {
            return Err(Error::InvalidArgument {
                arg: "collective arguments".into(),
                reason: format!("rank {r} called {} while rank {me} called {call}", n.call),
            });
        }
        Ok(())
    }

    /// A failure once data moves leaves the ranks out of step: remember it.
    fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    /// Send `parts[n]` to the rail peer on node `n` (this node's part stays empty) and
    /// return what each rail peer sent, by node; counts the bytes as inter-node traffic.
    fn rail_exchange(&mut self, parts: Vec<Vec<u8>>, rows: &[usize], dispatch: bool) -> Result<Vec<Vec<u8>>> {
        for (n, p) in parts.iter().enumerate() {
            self.count_inter_node(dispatch, n, rows[n], p.len());
        }
        let timeout = self.timeout();
        self.rail.exchange(self.world.as_mut(), parts, timeout)
    }

    /// Note the two hops' device times of the call that just ended (the rail's transfer
    /// and the node communicator's last op), when both were timed.
    fn note_hops(&mut self) {
        let node = self.node.device_time_us().map(|us| us * 1e-6);
        let hops = self.rail.last_transfer_seconds().zip(node).map(|(r, n)| [r, n]);
        self.log_hops(hops);
    }

    /// Keep calls' hop times for [`Communicator::take_hop_seconds`] (the last few thousand
    /// when nobody takes them).
    fn log_hops(&mut self, hops: impl IntoIterator<Item = [f64; 2]>) {
        const KEPT: usize = 4096;
        self.hop_log.extend(hops);
        if self.hop_log.len() > KEPT {
            self.hop_log.drain(..self.hop_log.len() - KEPT);
        }
    }

    /// Move the node communicator's traffic since its last reset into this rank's log.
    fn take_node_traffic(&mut self, dispatch: bool) {
        let t = self.node.traffic().clone();
        self.node.reset_traffic();
        let (from, into) =
            if dispatch { (&t.dispatch, &mut self.traffic.dispatch) } else { (&t.combine, &mut self.traffic.combine) };
        into.intra_node += from.intra_node;
        into.local += from.local;
    }

    /// The batches this rank sends: per node, the tokens in `sent[n]`; returns this
    /// node's batch and every other node's bytes.
    fn pack(
        &self,
        fmt: &BatchFormat,
        x: RowsRef<'_>,
        sent: &[Vec<u32>],
        topk_idx: &[i64],
        topk_weights: &[f32],
        experts_per_node: usize,
    ) -> (TokenBatch, Vec<Vec<u8>>) {
        let me = self.my_node();
        let mut own = None;
        let mut parts = Vec::with_capacity(sent.len());
        for (n, tokens) in sent.iter().enumerate() {
            let on_node = |e: i64| e as usize / experts_per_node == n;
            let b = TokenBatch::gather(fmt, x, tokens, topk_idx, topk_weights, on_node);
            if n == me {
                own = Some(b);
                parts.push(Vec::new());
            } else {
                parts.push(b.to_bytes(fmt));
            }
        }
        (own.expect("this rank's node is one of the nodes"), parts)
    }

    /// What this rank forwards inside its node: its rail peers' batches and its own,
    /// in node order (so in source-rank order).
    fn unpack(&self, fmt: &BatchFormat, own: TokenBatch, got: Vec<Vec<u8>>) -> Result<Vec<TokenBatch>> {
        let (me, local) = (self.my_node(), self.topology.local_of(self.rank));
        let mut own = Some(own);
        got.iter()
            .enumerate()
            .map(|(n, bytes)| match n == me {
                true => Ok(own.take().expect("one own batch")),
                false => TokenBatch::from_bytes(fmt, bytes, self.rank, self.topology.rank_of(n, local)),
            })
            .collect()
    }
}

/// The `[_, k]` rows `perm` of `v`, in that order.
fn select_k<T: Copy>(v: &[T], perm: &[u32], k: usize) -> Vec<T> {
    perm.iter().flat_map(|&i| &v[i as usize * k..(i as usize + 1) * k]).copied().collect()
}

impl Communicator for HierRank {
    fn backend_name(&self) -> &'static str {
        self.node.backend_name()
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
        let (t, k, e) = (layout.num_tokens, layout.topk, layout.num_experts);
        let checked = checks::dispatch(topo, &x, topk_idx, topk_weights, layout, options);
        let wire_dtype = if options.fp8_on_wire { DType::Fp8 } else { x.dtype() };
        self.agree_call(call_name("dispatch", x.hidden(), Some(wire_dtype), k, e, true), checked)?;
        // With a device path only the metadata crosses through the host; the rows go as in
        // a cached dispatch. Otherwise the (quantized) rows ride with the metadata.
        let quantized = if self.device.is_none() { wire_rows(x, options) } else { None };
        let rows = match self.device {
            Some(_) => FirstRows::Device(x),
            None => FirstRows::Host(quantized.as_ref().map_or(x, |q| q.as_ref())),
        };
        let r = self.dispatch_agreed(rows, topk_idx, topk_weights, layout, options);
        let (out, state) = self.guard(r)?;
        let handle = Handle {
            comm_id: self.comm_id,
            rank: self.rank,
            topology: topo,
            num_tokens: t,
            topk: k,
            num_experts: e,
            source_rank: out.source_rank.clone(),
            source_token: out.source_token.clone(),
            backend_state: Arc::new(state),
        };
        Ok((out, handle))
    }

    fn dispatch_cached(&mut self, x: RowsRef<'_>, handle: &Handle, options: &DispatchOptions) -> Result<Rows> {
        let checked = checks::dispatch_cached(self.comm_id, self.rank, &x, handle, options);
        let state = handle.state::<RouteState>("hierarchical");
        let checked = checked.and(state.map(|_| ()));
        let wire_dtype = if options.fp8_on_wire { DType::Fp8 } else { x.dtype() };
        let call = call_name("dispatch_cached", x.hidden(), Some(wire_dtype), handle.topk, handle.num_experts, false);
        self.agree_call(call, checked)?;
        let st = handle.state::<RouteState>("hierarchical")?;
        if let Some(got) = self.with_device(st, handle, |d, at| d.dispatch_cached(at, x, options.fp8_on_wire)) {
            let r = got.map(|(rows, hops)| {
                self.count_rail(st, wire_dtype.row_bytes(x.hidden()), true, true);
                self.take_node_traffic(true);
                self.log_hops([hops]);
                rows
            });
            return self.guard(r);
        }
        let quantized = wire_rows(x, options);
        let wire = quantized.as_ref().map(|q| q.as_ref()).unwrap_or(x);
        let r = (|| {
            let fmt =
                BatchFormat { dtype: wire.dtype(), hidden: wire.hidden(), topk: handle.topk, with_meta: false, with_rows: true };
            let per_node = handle.num_experts / self.topology.num_nodes;
            let (own, parts) = self.pack(&fmt, wire, &st.sent, &[], &[], per_node);
            let rows: Vec<usize> = st.sent.iter().map(Vec::len).collect();
            let got = self.rail_exchange(parts, &rows, true)?;
            let batches = self.unpack(&fmt, own, got)?;
            let input = TokenBatch::concat(&fmt, &batches);
            let opts = DispatchOptions { fp8_on_wire: false, ..*options };
            let rows = self.node.dispatch_cached(input.x.as_ref(), &st.node, &opts)?;
            self.take_node_traffic(true);
            self.note_hops();
            Ok(rows.as_ref().select(&st.perm))
        })();
        self.guard(r)
    }

    fn combine(&mut self, y: &[bf16], hidden: usize, handle: &Handle, topk_weights: Option<&[f32]>) -> Result<CombineOutput> {
        let checked = checks::combine(self.comm_id, self.rank, y, hidden, handle, topk_weights);
        let checked = checked.and(handle.state::<RouteState>("hierarchical").map(|_| ()));
        let call = call_name("combine", hidden, None, handle.topk, handle.num_experts, topk_weights.is_some());
        self.agree_call(call, checked)?;
        let st = handle.state::<RouteState>("hierarchical")?;
        if let Some(got) = self.with_device(st, handle, |d, at| d.combine(at, y, hidden, topk_weights)) {
            let r = got.map(|(x, topk_weights, hops)| {
                self.count_rail(st, hidden * 2 + topk_weights.as_ref().map_or(0, |_| handle.topk * 4), false, true);
                self.take_node_traffic(false);
                self.log_hops([hops]);
                CombineOutput { x, topk_weights }
            });
            return self.guard(r);
        }
        let r = self.combine_agreed(y, hidden, handle, st, topk_weights);
        self.note_hops();
        self.guard(r)
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        // Every node tries it (collective inside the node), then all nodes agree; if any
        // node could not take it, those that did go back to the old one.
        let old = self.config.clone();
        let tried = self.node.set_config(config.clone());
        let agreed = checks::agree_on_config(self, &config, tried);
        match agreed {
            Ok(()) => {
                self.config = config;
                Ok(())
            }
            Err(e) => {
                let back = self.node.set_config(old);
                back.map_err(|b| Error::Protocol { rank: self.rank, detail: format!("{e}; and going back failed: {b}") })?;
                Err(e)
            }
        }
    }

    fn barrier(&mut self) -> Result<()> {
        let timeout = self.timeout();
        self.world.barrier(timeout)
    }

    fn traffic(&self) -> &TrafficLog {
        &self.traffic
    }

    fn reset_traffic(&mut self) {
        self.traffic = TrafficLog::default();
        self.node.reset_traffic();
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let timeout = self.timeout();
        self.world.all_gather(bytes, timeout)
    }

    fn take_hop_seconds(&mut self) -> Vec<[f64; 2]> {
        std::mem::take(&mut self.hop_log)
    }

    fn time_device_resident(&mut self, op: ResidentOp, inputs: &ResidentInputs<'_>, iters: usize) -> Option<Result<Vec<f64>>> {
        let route = match inputs.handle.state::<RouteState>("hierarchical") {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let got = self.with_device(route, inputs.handle, |d, at| d.time_resident(at, op, inputs, iters))?;
        Some(got.map(|(times, hops)| {
            let dispatch = op == ResidentOp::DispatchCached;
            let wire = if inputs.options.fp8_on_wire { DType::Fp8 } else { inputs.x.dtype() };
            let row_bytes = if dispatch { wire.row_bytes(inputs.hidden) } else { inputs.hidden * 2 };
            for _ in 0..iters {
                self.count_rail(route, row_bytes, dispatch, true);
            }
            self.take_node_traffic(dispatch);
            self.log_hops(hops);
            times
        }))
    }

    /// The baseline of the inter-node hop: plain transfers on the rail of the bytes the
    /// rail carries in a cached dispatch on the device path (one row per token) and in a
    /// combine without weights (one partial row per token).
    fn time_nccl_exchange(&mut self, handle: &Handle, row_bytes: [usize; 2], iters: usize) -> Option<Result<[Vec<f64>; 2]>> {
        let st = match handle.state::<RouteState>("hierarchical") {
            Ok(st) => st,
            Err(e) => return Some(Err(e)),
        };
        let me = self.my_node();
        let bytes = |rows: &[usize], per: usize| -> Vec<usize> {
            rows.iter().enumerate().map(|(n, &r)| if n == me { 0 } else { r * per }).collect()
        };
        let sent: Vec<usize> = st.sent.iter().map(Vec::len).collect();
        let dispatch = self.rail.time_raw(&bytes(&sent, row_bytes[0]), &bytes(&st.forwarded, row_bytes[0]), iters)?;
        let combine = dispatch.and_then(|d| {
            let c = self.rail.time_raw(&bytes(&st.forwarded, row_bytes[1]), &bytes(&sent, row_bytes[1]), iters);
            c.expect("the rail timed the dispatch bytes").map(|c| [d, c])
        });
        Some(combine)
    }
}

impl HierRank {
    /// Dispatch once every rank agreed: rail hop, node-local dispatch, reorder; the rows
    /// either ride with the metadata ([`FirstRows::Host`]: the wire rows) or go through the
    /// device path once the route stands ([`FirstRows::Device`]: the caller's rows).
    fn dispatch_agreed(
        &mut self,
        rows_in: FirstRows<'_>,
        topk_idx: &[i64],
        topk_weights: &[f32],
        layout: &Layout,
        options: &DispatchOptions,
    ) -> Result<(DispatchOutput, RouteState)> {
        let topo = self.topology;
        let (me, my_node, rpn) = (self.rank, self.my_node(), topo.ranks_per_node);
        let (k, e) = (layout.topk, layout.num_experts);
        let per_node = e / topo.num_nodes;
        let (wire, with_rows) = match rows_in {
            FirstRows::Host(x) => (x, true),
            FirstRows::Device(x) => (x, false),
        };
        let fmt = BatchFormat { dtype: wire.dtype(), hidden: wire.hidden(), topk: k, with_meta: true, with_rows };
        let sent: Vec<Vec<u32>> = (0..topo.num_nodes)
            .map(|n| (0..layout.num_tokens).filter(|&t| layout.token_in_node(t, n)).map(|t| t as u32).collect())
            .collect();
        let (own, parts) = self.pack(&fmt, wire, &sent, topk_idx, topk_weights, per_node);
        let rows: Vec<usize> = sent.iter().map(Vec::len).collect();
        let got = self.rail_exchange(parts, &rows, true)?;
        let batches = self.unpack(&fmt, own, got)?;
        let forwarded: Vec<usize> = batches.iter().map(TokenBatch::len).collect();
        // Who each forwarded token is: (source rank, token), in the node-local input's order.
        let local = topo.local_of(me);
        let sources: Vec<[u32; 2]> = batches
            .iter()
            .enumerate()
            .flat_map(|(n, b)| b.tokens.iter().map(move |&t| [topo.rank_of(n, local) as u32, t]))
            .collect();
        let mut input = TokenBatch::concat(&fmt, &batches);
        if !with_rows {
            // Only the route is made here: rows of zeros, narrow, stand in for the real ones.
            input.x = Rows::zeros(DType::Bf16, input.len(), STAND_IN_HIDDEN);
        }
        // Expert ids of this node, made node-local (the rest are -1 already).
        let first = (my_node * per_node) as i64;
        input.ids.iter_mut().filter(|e| **e >= 0).for_each(|e| *e -= first);
        let node_topo = Topology { num_nodes: 1, ranks_per_node: rpn };
        let node_layout = Layout::new(&input.ids, k, per_node, node_topo)?;
        let opts = DispatchOptions { fp8_on_wire: false, ..*options };
        let (out, node_handle) = self.node.dispatch(input.x.as_ref(), &input.ids, &input.weights, &node_layout, &opts)?;
        if with_rows {
            self.take_node_traffic(true);
        } else {
            // The stand-in rows are not traffic; the device path counts the real ones.
            self.node.reset_traffic();
        }
        // Every rank's forwarded tokens, to name the rows that arrive (only this node's are read).
        let timeout = self.timeout();
        let all = self.world.all_gather(bytemuck::cast_slice(&sources), timeout)?;
        let node_first = topo.rank_of(my_node, 0);
        let names: Vec<Vec<[u32; 2]>> = (0..rpn).map(|l| bytemuck::pod_collect_to_vec(&all[node_first + l])).collect();
        let mut named = Vec::with_capacity(out.source_rank.len());
        for (i, (&f, &v)) in out.source_rank.iter().zip(&out.source_token).enumerate() {
            let name = names.get(f as usize).and_then(|n| n.get(v as usize)).ok_or_else(|| Error::Protocol {
                rank: me,
                detail: format!("row {i} names forwarder {f} token {v}, which it did not forward"),
            })?;
            named.push((*name, i as u32));
        }
        named.sort_unstable();
        let perm: Vec<u32> = named.iter().map(|&(_, i)| i).collect();
        let mut output = DispatchOutput {
            x: if with_rows { out.x.as_ref().select(&perm) } else { Rows::zeros(wire.dtype(), 0, wire.hidden()) },
            topk_idx: select_k(&out.topk_idx, &perm, k),
            topk_weights: select_k(&out.topk_weights, &perm, k),
            tokens_per_expert: out.tokens_per_expert,
            source_rank: named.iter().map(|&([s, _], _)| s).collect(),
            source_token: named.iter().map(|&([_, t], _)| t).collect(),
        };
        let route = RouteState { id: next_route_id(), node: node_handle, perm, sent, forwarded, node_ids: input.ids, sources };
        if with_rows {
            self.note_hops();
        } else {
            let names = (layout.num_tokens, &output.source_rank[..], &output.source_token[..]);
            let fp8_on_wire = options.fp8_on_wire;
            let got = self.with_device_for(&route, names, |d, at| d.dispatch_cached(at, wire, fp8_on_wire));
            let (x, hops) =
                got.ok_or_else(|| Error::Protocol { rank: me, detail: "the device path did not take the rows".into() })??;
            let row_bytes = x.dtype().row_bytes(x.hidden());
            self.count_rail(&route, row_bytes, true, false);
            self.take_node_traffic(true);
            self.log_hops([hops]);
            output.x = x;
        }
        Ok((output, route))
    }

    /// Combine once every rank agreed: node-local combine into partial sums, rail hop
    /// back, sum per token.
    fn combine_agreed(
        &mut self,
        y: &[bf16],
        hidden: usize,
        handle: &Handle,
        st: &RouteState,
        topk_weights: Option<&[f32]>,
    ) -> Result<CombineOutput> {
        let topo = self.topology;
        let (k, my_node, local) = (handle.topk, self.my_node(), topo.local_of(self.rank));
        // Back into the node-local output's order.
        let mut y_node = vec![bf16::ZERO; y.len()];
        let mut w_node = topk_weights.map(|w| vec![0f32; w.len()]);
        for (i, &p) in st.perm.iter().enumerate() {
            let p = p as usize;
            y_node[p * hidden..(p + 1) * hidden].copy_from_slice(&y[i * hidden..(i + 1) * hidden]);
            if let (Some(wn), Some(w)) = (w_node.as_mut(), topk_weights) {
                wn[p * k..(p + 1) * k].copy_from_slice(&w[i * k..(i + 1) * k]);
            }
        }
        let partial = self.node.combine(&y_node, hidden, &st.node, w_node.as_deref())?;
        self.take_node_traffic(false);
        // Split the partial sums by the node their tokens came from.
        let mut parts = Vec::with_capacity(topo.num_nodes);
        let mut own = (Vec::new(), Vec::new());
        let mut at = 0;
        for (n, &count) in st.forwarded.iter().enumerate() {
            let x = &partial.x[at * hidden..(at + count) * hidden];
            let w = partial.topk_weights.as_ref().map(|w| &w[at * k..(at + count) * k]);
            at += count;
            if n == my_node {
                own = (x.to_vec(), w.map_or_else(Vec::new, <[f32]>::to_vec));
                parts.push(Vec::new());
            } else {
                parts.push(partials_to_bytes(x, w));
            }
        }
        let got = self.rail_exchange(parts, &st.forwarded, false)?;
        let t = handle.num_tokens;
        let mut acc = vec![0f32; t * hidden];
        let mut wacc = vec![0f32; t * k];
        let with_w = topk_weights.map(|_| k);
        for (n, bytes) in got.iter().enumerate() {
            let tokens = &st.sent[n];
            let (x, w) = match n == my_node {
                true => std::mem::take(&mut own),
                false => partials_from_bytes(bytes, tokens.len(), hidden, with_w, self.rank, topo.rank_of(n, local))?,
            };
            for (i, &tok) in tokens.iter().enumerate() {
                let tok = tok as usize;
                for (a, v) in acc[tok * hidden..(tok + 1) * hidden].iter_mut().zip(&x[i * hidden..(i + 1) * hidden]) {
                    *a += v.to_f32();
                }
                if with_w.is_some() {
                    for (a, v) in wacc[tok * k..(tok + 1) * k].iter_mut().zip(&w[i * k..(i + 1) * k]) {
                        *a += v;
                    }
                }
            }
        }
        Ok(CombineOutput { x: acc.into_iter().map(bf16::from_f32).collect(), topk_weights: with_w.map(|_| wacc) })
    }
}
