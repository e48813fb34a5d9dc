//! What dispatch learned, reused by combine and by cached dispatch.

use std::any::Any;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::topology::Topology;

/// The result of a dispatch's counting: reused by [`combine`](crate::Communicator::combine)
/// and by [`dispatch_cached`](crate::Communicator::dispatch_cached) so neither
/// recomputes the layout nor talks to the host again.
///
/// A handle belongs to one rank of one communicator and one routing; passing it
/// anywhere else is an [`Error::HandleMismatch`].
#[derive(Clone)]
pub struct Handle {
    pub(crate) comm_id: u64,
    pub(crate) rank: usize,
    pub(crate) topology: Topology,
    pub(crate) num_tokens: usize,
    pub(crate) topk: usize,
    pub(crate) num_experts: usize,
    /// `[R]` source rank of each received row.
    pub(crate) source_rank: Vec<u32>,
    /// `[R]` token index on the source rank of each received row.
    pub(crate) source_token: Vec<u32>,
    /// Backend-specific plan (arrival orders, forwarding lists, device buffers).
    pub(crate) backend_state: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("comm_id", &self.comm_id)
            .field("rank", &self.rank)
            .field("topology", &self.topology)
            .field("num_tokens", &self.num_tokens)
            .field("topk", &self.topk)
            .field("num_experts", &self.num_experts)
            .field("num_recv", &self.source_rank.len())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Rows this rank received in the dispatch that made the handle.
    pub fn num_recv(&self) -> usize {
        self.source_rank.len()
    }

    /// Tokens on this rank (T) when the handle was made.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Slots per token (k).
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// Source rank of each received row.
    pub fn source_rank(&self) -> &[u32] {
        &self.source_rank
    }

    /// Source token index of each received row.
    pub fn source_token(&self) -> &[u32] {
        &self.source_token
    }

    /// Check that this handle belongs to `comm_id`/`rank` and, if given, to `num_tokens` tokens.
    pub(crate) fn check_owner(&self, comm_id: u64, rank: usize, num_tokens: Option<usize>) -> Result<()> {
        if self.comm_id != comm_id || self.rank != rank {
            return Err(Error::HandleMismatch {
                reason: format!(
                    "made by communicator {:#x} rank {}, used on communicator {:#x} rank {}",
                    self.comm_id, self.rank, comm_id, rank
                ),
            });
        }
        if let Some(t) = num_tokens {
            if t != self.num_tokens {
                return Err(Error::HandleMismatch {
                    reason: format!("made for {} tokens, used with {} tokens", self.num_tokens, t),
                });
            }
        }
        Ok(())
    }

    /// The backend's own state, or a mismatch error if another backend made the handle.
    pub(crate) fn state<T: Any + Send + Sync>(&self, backend: &str) -> Result<&T> {
        self.backend_state
            .downcast_ref::<T>()
            .ok_or_else(|| Error::HandleMismatch { reason: format!("not made by the {backend} backend") })
    }
}
