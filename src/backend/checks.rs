//! Argument checks every backend runs before any data moves, so a bad input is
//! the same typed error whichever backend gets it.

use std::time::Duration;

use half::bf16;

use super::{gather_outcomes_by, DispatchOptions};
use crate::bootstrap::ProcessGroup;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::quant;
use crate::routing::{self, Layout};
use crate::tensor::{check_len, DType, RowsRef};
use crate::topology::Topology;

/// FP8 on the wire needs whole 1x128 scale groups.
fn check_wire(x: &RowsRef<'_>, options: &DispatchOptions) -> Result<()> {
    if options.fp8_on_wire && x.hidden() % quant::SCALE_GROUP != 0 {
        return Err(Error::HiddenNotMultipleOf128 { arg: "x", hidden: x.hidden() });
    }
    Ok(())
}

/// Inputs of a dispatch on a communicator of `topology`.
pub(crate) fn dispatch(
    topology: Topology,
    x: &RowsRef<'_>,
    topk_idx: &[i64],
    topk_weights: &[f32],
    layout: &Layout,
    options: &DispatchOptions,
) -> Result<()> {
    let world = topology.world();
    routing::experts_per_rank(layout.num_experts, world)?;
    if layout.topology != topology {
        return Err(Error::InvalidArgument {
            arg: "layout".into(),
            reason: format!("computed for topology {}, communicator has {topology}", layout.topology),
        });
    }
    let (t, k) = (layout.num_tokens, layout.topk);
    routing::validate_topk_idx(topk_idx, t, k, layout.num_experts)?;
    routing::validate_weights("topk_weights", topk_weights, t, k)?;
    x.validate("x", t)?;
    check_wire(x, options)?;
    // The layout must describe these ids (cheap: one pass).
    let per_rank = layout.num_experts / world;
    for (tok, ids) in topk_idx.chunks_exact(k).enumerate() {
        for r in 0..world {
            let hit = ids.iter().any(|&e| e >= 0 && e as usize / per_rank == r);
            if hit != layout.token_in_rank(tok, r) {
                return Err(Error::InvalidArgument {
                    arg: "layout".into(),
                    reason: format!("does not match topk_idx at token {tok} (rank {r})"),
                });
            }
        }
    }
    Ok(())
}

/// Inputs of a cached dispatch on rank `rank` of communicator `comm_id`.
pub(crate) fn dispatch_cached(
    comm_id: u64,
    rank: usize,
    x: &RowsRef<'_>,
    handle: &Handle,
    options: &DispatchOptions,
) -> Result<()> {
    handle.check_owner(comm_id, rank, Some(x.num_rows()))?;
    x.validate("x", handle.num_tokens)?;
    check_wire(x, options)
}

/// Inputs of a combine on rank `rank` of communicator `comm_id`.
pub(crate) fn combine(
    comm_id: u64,
    rank: usize,
    y: &[bf16],
    hidden: usize,
    handle: &Handle,
    topk_weights: Option<&[f32]>,
) -> Result<()> {
    handle.check_owner(comm_id, rank, None)?;
    if hidden == 0 {
        return Err(Error::InvalidArgument { arg: "hidden".into(), reason: "must be >= 1".into() });
    }
    let r = handle.num_recv();
    check_len("y", y.len(), r * hidden, format!("[R={r}, H={hidden}]"))?;
    if let Some(w) = topk_weights {
        routing::validate_weights("topk_weights", w, r, handle.topk)?;
    }
    Ok(())
}

/// The collective half of [`Communicator::set_config`](super::Communicator::set_config):
/// every rank sends its proposal (or why it cannot take it) to all, so all ranks
/// take the same config or all keep their old one with an error.
pub(crate) fn agree_on_config(
    comm: &mut dyn super::Communicator,
    proposed: &crate::config::Config,
    local: Result<()>,
) -> Result<()> {
    let me = comm.rank();
    let local = local.and_then(|_| proposed.validate());
    let mine: std::result::Result<&crate::config::Config, String> = local.as_ref().map(|_| proposed).map_err(|e| e.to_string());
    let all = comm.all_gather_bytes(&serde_json::to_vec(&mine).expect("config serializes"))?;
    local?;
    for (r, bytes) in all.iter().enumerate() {
        let theirs: std::result::Result<crate::config::Config, String> = serde_json::from_slice(bytes)
            .map_err(|e| Error::Protocol { rank: me, detail: format!("rank {r} sent an unreadable config: {e}") })?;
        match theirs {
            Err(reason) => return Err(Error::PeerFailed { rank: r, reason }),
            Ok(c) if c != *proposed => {
                return Err(Error::InvalidArgument {
                    arg: "config".into(),
                    reason: format!("rank {r} asked for {c:?} while rank {me} asked for {proposed:?}"),
                })
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// The nodes of `group` (its hosts, or blocks of `ranks_per_node`) and a fresh
/// communicator id from rank 0, agreed by every rank: one rank's failure fails all.
pub(crate) fn agree_on_nodes(
    group: &mut dyn ProcessGroup,
    ranks_per_node: Option<usize>,
    config: &Config,
) -> Result<(Topology, u64)> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let rank = group.rank();
    let mine = config.validate().and_then(|_| Topology::from_hostnames(group.hostnames(), ranks_per_node));
    let proposal: std::result::Result<(usize, u64), String> =
        mine.as_ref().map(|t| (t.ranks_per_node, rand::random::<u64>())).map_err(|e| e.to_string());
    let got = gather_outcomes_by(rank, |bytes| group.all_gather(bytes, timeout), proposal.as_ref().map_err(Clone::clone))?;
    let topology = mine?;
    let all = got.map_err(|(rank, reason)| Error::PeerFailed { rank, reason })?;
    if let Some((r, (rpn, _))) = all.iter().enumerate().find(|(_, (rpn, _))| *rpn != topology.ranks_per_node) {
        let reason = format!("rank {r} found {rpn} ranks per node, rank {rank} {}", topology.ranks_per_node);
        return Err(Error::InvalidArgument { arg: "--ranks-per-node".into(), reason });
    }
    // Rank 0's id names the communicator on every rank.
    let comm_id = all[0].1;
    Ok((topology, comm_id))
}

/// The call signature every rank must share.
pub(crate) fn call_name(op: &str, hidden: usize, wire: Option<DType>, topk: usize, experts: usize, weights: bool) -> String {
    let dtype = wire.map_or(String::new(), |d| format!(" {d:?}"));
    format!("{op}(hidden {hidden}{dtype}, top-{topk} of {experts}, weights {weights})")
}
