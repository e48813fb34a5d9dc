//! One error type for the whole crate: every failure is a value with context.

use std::path::PathBuf;

/// Which side of a two-hop exchange a waiting party plays; used in timeout diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    /// Pushes the rank's own rows (to its node directly, or to the inter-node hop).
    Sender,
    /// Takes rows from the inter-node hop and pushes them to the ranks of its node.
    Forwarder,
    /// Drains rows into the output (and, in combine, accumulates).
    Receiver,
    /// The notify step (count exchange) or a barrier.
    Notify,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Role::Sender => "sender",
            Role::Forwarder => "forwarder",
            Role::Receiver => "receiver",
            Role::Notify => "notify",
        };
        f.write_str(s)
    }
}

/// What a timed-out wait was waiting for: enough to find the stuck party.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaitDiagnostic {
    /// Rank that gave up waiting.
    pub rank: usize,
    /// Channel index (0 for the notify step).
    pub channel: usize,
    /// Role of the waiting party.
    pub role: Role,
    /// Consumer position of the buffer it was waiting on.
    pub head: u64,
    /// Producer position of the buffer it was waiting on.
    pub tail: u64,
    /// Free text: which buffer or peer.
    pub detail: String,
}

impl std::fmt::Display for WaitDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} channel {} role {} head {} tail {} ({})",
            self.rank, self.channel, self.role, self.head, self.tail, self.detail
        )
    }
}

/// Every way an operation of this crate can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong number of elements for the shape it must have.
    #[error("argument `{arg}`: expected {expected} elements ({shape}), got {got}")]
    ShapeMismatch {
        /// Argument name.
        arg: &'static str,
        /// Expected element count.
        expected: usize,
        /// Got element count.
        got: usize,
        /// Human readable expected shape, e.g. "[T=4, k=8]".
        shape: String,
    },
    /// The hidden size does not fit the FP8 1x128 scale grouping.
    #[error("argument `{arg}`: hidden size {hidden} is not a positive multiple of 128 (needed for FP8 1x128 scales)")]
    HiddenNotMultipleOf128 {
        /// Argument name.
        arg: &'static str,
        /// The bad hidden size.
        hidden: usize,
    },
    /// An expert id is neither -1 nor in `0..num_experts`.
    #[error("argument `topk_idx`: token {token} slot {slot} has expert id {expert}, outside -1 or 0..{num_experts}")]
    ExpertOutOfRange {
        /// Token index.
        token: usize,
        /// Slot inside the token's top-k row.
        slot: usize,
        /// The bad id.
        expert: i64,
        /// Number of experts.
        num_experts: usize,
    },
    /// The same expert appears twice in one token's row.
    #[error("argument `topk_idx`: token {token} names expert {expert} twice (slots {first} and {second})")]
    DuplicateExpert {
        /// Token index.
        token: usize,
        /// The repeated expert id.
        expert: i64,
        /// First slot.
        first: usize,
        /// Second slot.
        second: usize,
    },
    /// A gate weight is NaN or infinite.
    #[error("argument `{arg}`: row {token} slot {slot} is {value} (NaN and infinity are not allowed)")]
    NonFiniteWeight {
        /// Argument name.
        arg: &'static str,
        /// Row index.
        token: usize,
        /// Slot in the row.
        slot: usize,
        /// The bad value.
        value: f32,
    },
    /// Experts cannot be split evenly over the ranks.
    #[error("argument `num_experts`: {num_experts} experts cannot be split evenly over {world} ranks")]
    ExpertsNotDivisible {
        /// Number of experts.
        num_experts: usize,
        /// Number of ranks.
        world: usize,
    },
    /// A handle was passed that another shape or communicator produced.
    #[error("argument `handle`: {reason}")]
    HandleMismatch {
        /// What does not match.
        reason: String,
    },
    /// A parameter is out of its valid range (topology, config, options).
    #[error("invalid `{arg}`: {reason}")]
    InvalidArgument {
        /// Argument or config key.
        arg: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Another rank failed the same collective call (bad input there, or a timeout).
    #[error("rank {rank} failed this collective call: {reason}")]
    PeerFailed {
        /// The rank that reported the failure.
        rank: usize,
        /// Its error, as text.
        reason: String,
    },
    /// A wait passed its deadline.
    #[error("timed out after {timeout_ms} ms waiting: {diag}")]
    Timeout {
        /// The deadline in milliseconds.
        timeout_ms: u64,
        /// Where the wait was.
        diag: WaitDiagnostic,
    },
    /// The protocol saw something impossible (a bug or memory corruption); never expected.
    #[error("protocol violation on rank {rank}: {detail}")]
    Protocol {
        /// Rank that saw it.
        rank: usize,
        /// What was seen.
        detail: String,
    },
    /// A backend is not usable on this machine.
    #[error("backend `{backend}` unavailable: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// A CUDA driver, NVRTC or NCCL call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A config file could not be read or parsed, or holds a bad value.
    #[error("config file {path}: {reason}")]
    Config {
        /// File path.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// Input/output failure with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
