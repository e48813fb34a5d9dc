//! Top-k validation, the dispatch layout, and routing helpers (plain and node-limited top-k).

use crate::error::{Error, Result};
use crate::tensor::check_len;
use crate::topology::Topology;

/// Number of experts each rank hosts; experts are split evenly, rank `r` hosts
/// `r * per_rank .. (r + 1) * per_rank`.
pub fn experts_per_rank(num_experts: usize, world: usize) -> Result<usize> {
    if num_experts == 0 || world == 0 || num_experts % world != 0 {
        return Err(Error::ExpertsNotDivisible { num_experts, world });
    }
    Ok(num_experts / world)
}

/// Check `topk_idx` (`[T, k]`, ids in `0..num_experts` or -1, no expert twice in a row).
pub fn validate_topk_idx(topk_idx: &[i64], num_tokens: usize, topk: usize, num_experts: usize) -> Result<()> {
    if topk == 0 {
        return Err(Error::InvalidArgument { arg: "topk".into(), reason: "k must be >= 1".into() });
    }
    check_len("topk_idx", topk_idx.len(), num_tokens * topk, format!("[T={num_tokens}, k={topk}]"))?;
    for (token, row) in topk_idx.chunks_exact(topk).enumerate() {
        for (slot, &expert) in row.iter().enumerate() {
            if expert == -1 {
                continue;
            }
            if expert < 0 || expert as u64 >= num_experts as u64 {
                return Err(Error::ExpertOutOfRange { token, slot, expert, num_experts });
            }
            if let Some(first) = row[..slot].iter().position(|&e| e == expert) {
                return Err(Error::DuplicateExpert { token, expert, first, second: slot });
            }
        }
    }
    Ok(())
}

/// Check gate weights (`[rows, k]`, finite); `arg` names the argument in errors.
pub fn validate_weights(arg: &'static str, weights: &[f32], num_rows: usize, topk: usize) -> Result<()> {
    check_len(arg, weights.len(), num_rows * topk, format!("[rows={num_rows}, k={topk}]"))?;
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(Error::NonFiniteWeight { arg, token: i / topk, slot: i % topk, value: weights[i] });
    }
    Ok(())
}

/// Who gets what: counts per rank, node and expert, and which tokens go to which rank.
///
/// Computed from `topk_idx` alone, apart from dispatch (as in DeepEP), so it can
/// be inspected, reused, or computed on another device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    /// Topology the layout was computed for.
    pub topology: Topology,
    /// Total number of experts.
    pub num_experts: usize,
    /// Tokens on this rank (T).
    pub num_tokens: usize,
    /// Slots per token (k).
    pub topk: usize,
    /// `[world]`: tokens of this rank that go to each rank (each token once per rank).
    pub tokens_per_rank: Vec<usize>,
    /// `[num_nodes]`: tokens of this rank that go to each node (each token once per node).
    pub tokens_per_node: Vec<usize>,
    /// `[num_experts]`: tokens of this rank routed to each expert.
    pub tokens_per_expert: Vec<usize>,
    /// `[T, world]`, row-major: token `t` goes to rank `r`.
    pub token_in_rank: Vec<bool>,
}

impl Layout {
    /// Compute the layout of `topk_idx` (`[T, k]`), validating it first.
    pub fn new(topk_idx: &[i64], topk: usize, num_experts: usize, topology: Topology) -> Result<Self> {
        let world = topology.world();
        let per_rank = experts_per_rank(num_experts, world)?;
        if topk == 0 {
            return Err(Error::InvalidArgument { arg: "topk".into(), reason: "k must be >= 1".into() });
        }
        let num_tokens = topk_idx.len() / topk;
        validate_topk_idx(topk_idx, num_tokens, topk, num_experts)?;
        let mut layout = Layout {
            topology,
            num_experts,
            num_tokens,
            topk,
            tokens_per_rank: vec![0; world],
            tokens_per_node: vec![0; topology.num_nodes],
            tokens_per_expert: vec![0; num_experts],
            token_in_rank: vec![false; num_tokens * world],
        };
        let mut in_node = vec![false; topology.num_nodes];
        for (t, row) in topk_idx.chunks_exact(topk).enumerate() {
            in_node.iter_mut().for_each(|v| *v = false);
            for &e in row.iter().filter(|&&e| e >= 0) {
                let e = e as usize;
                layout.tokens_per_expert[e] += 1;
                let rank = e / per_rank;
                layout.token_in_rank[t * world + rank] = true;
                in_node[topology.node_of(rank)] = true;
            }
            for r in 0..world {
                layout.tokens_per_rank[r] += layout.token_in_rank[t * world + r] as usize;
            }
            for (n, &hit) in in_node.iter().enumerate() {
                layout.tokens_per_node[n] += hit as usize;
            }
        }
        Ok(layout)
    }

    /// Whether token `t` goes to rank `r`.
    pub fn token_in_rank(&self, t: usize, r: usize) -> bool {
        self.token_in_rank[t * self.topology.world() + r]
    }

    /// Whether token `t` goes to any rank of `node`.
    pub fn token_in_node(&self, t: usize, node: usize) -> bool {
        self.topology.ranks_of_node(node).any(|r| self.token_in_rank(t, r))
    }
}

/// Plain top-k: for each token, the `k` experts with the largest scores, best first
/// (ties go to the lower expert id). `scores` is `[T, E]`.
pub fn topk(scores: &[f32], num_experts: usize, k: usize) -> Result<Vec<i64>> {
    check_routing_args(scores, num_experts, k)?;
    let mut out = Vec::with_capacity(scores.len() / num_experts * k);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for row in scores.chunks_exact(num_experts) {
        order.clear();
        order.extend(0..num_experts);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.extend(order[..k].iter().map(|&e| e as i64));
    }
    Ok(out)
}

/// Node-limited top-k, the DeepSeek-V3 rule: for each token, score every node by
/// the sum of its best `max(1, k / max_nodes)` expert scores, keep the
/// `max_nodes` best nodes, then take the top-`k` experts among those nodes only.
/// Experts are placed on nodes as they are on ranks (evenly, in id order).
/// With `max_nodes >= num_nodes` this is plain top-k.
pub fn node_limited_topk(scores: &[f32], num_experts: usize, k: usize, topology: Topology, max_nodes: usize) -> Result<Vec<i64>> {
    check_routing_args(scores, num_experts, k)?;
    let nodes = topology.num_nodes;
    let per_node = experts_per_rank(num_experts, topology.world())? * topology.ranks_per_node;
    if max_nodes == 0 {
        return Err(Error::InvalidArgument { arg: "max_nodes".into(), reason: "must be >= 1".into() });
    }
    if max_nodes >= nodes {
        return topk(scores, num_experts, k);
    }
    if k > max_nodes * per_node {
        return Err(Error::InvalidArgument {
            arg: "topk".into(),
            reason: format!("k={k} exceeds the {per_node} experts on each of the {max_nodes} allowed nodes"),
        });
    }
    let best_per_node = (k / max_nodes).max(1);
    let mut out = Vec::with_capacity(scores.len() / num_experts * k);
    let mut node_score: Vec<(f32, usize)> = Vec::with_capacity(nodes);
    let mut buf: Vec<f32> = Vec::with_capacity(per_node);
    let mut cand: Vec<usize> = Vec::with_capacity(num_experts);
    for row in scores.chunks_exact(num_experts) {
        node_score.clear();
        for n in 0..nodes {
            buf.clear();
            buf.extend_from_slice(&row[n * per_node..(n + 1) * per_node]);
            buf.sort_by(|a, b| b.total_cmp(a));
            node_score.push((buf[..best_per_node.min(per_node)].iter().sum(), n));
        }
        node_score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        cand.clear();
        for &(_, n) in &node_score[..max_nodes] {
            cand.extend(n * per_node..(n + 1) * per_node);
        }
        cand.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.extend(cand[..k].iter().map(|&e| e as i64));
    }
    Ok(out)
}

fn check_routing_args(scores: &[f32], num_experts: usize, k: usize) -> Result<()> {
    if num_experts == 0 || scores.len() % num_experts != 0 {
        return Err(Error::ShapeMismatch {
            arg: "scores",
            expected: scores.len().div_ceil(num_experts.max(1)) * num_experts.max(1),
            got: scores.len(),
            shape: format!("[T, E={num_experts}]"),
        });
    }
    if k == 0 || k > num_experts {
        return Err(Error::InvalidArgument { arg: "topk".into(), reason: format!("k={k} must be in 1..={num_experts}") });
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::NonFiniteWeight { arg: "scores", token: i / num_experts, slot: i % num_experts, value: scores[i] });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_each_token_once_per_rank_and_node() {
        // 2 nodes x 2 ranks, 8 experts: 2 per rank, 4 per node.
        let topo = Topology::new(2, 2).unwrap();
        let idx = vec![0, 1, 5, -1, /* t1 */ 7, 6, -1, -1, /* t2 */ -1, -1, -1, -1];
        let l = Layout::new(&idx, 4, 8, topo).unwrap();
        assert_eq!(l.tokens_per_rank, vec![1, 0, 1, 1]);
        assert_eq!(l.tokens_per_node, vec![1, 2]);
        assert_eq!(l.tokens_per_expert, vec![1, 1, 0, 0, 0, 1, 1, 1]);
        assert!(l.token_in_rank(0, 0) && l.token_in_rank(0, 2) && !l.token_in_rank(0, 1));
        assert!(l.token_in_node(1, 1) && !l.token_in_node(1, 0));
        assert!(!l.token_in_node(2, 0) && !l.token_in_node(2, 1));
    }

    #[test]
    fn bad_ids_are_typed_errors() {
        let topo = Topology::new(1, 2).unwrap();
        assert!(matches!(Layout::new(&[0, 8], 2, 8, topo), Err(Error::ExpertOutOfRange { expert: 8, .. })));
        assert!(matches!(Layout::new(&[0, -2], 2, 8, topo), Err(Error::ExpertOutOfRange { expert: -2, .. })));
        assert!(matches!(Layout::new(&[3, 3], 2, 8, topo), Err(Error::DuplicateExpert { expert: 3, .. })));
        assert!(matches!(Layout::new(&[0, 1], 2, 7, topo), Err(Error::ExpertsNotDivisible { .. })));
        assert!(matches!(validate_weights("topk_weights", &[1.0, f32::NAN], 1, 2), Err(Error::NonFiniteWeight { slot: 1, .. })));
    }

    #[test]
    fn topk_picks_largest_scores_with_low_id_ties() {
        let scores = [0.1, 0.9, 0.5, 0.9];
        assert_eq!(topk(&scores, 4, 2).unwrap(), vec![1, 3]);
        assert_eq!(topk(&scores, 4, 3).unwrap(), vec![1, 3, 2]);
    }

    #[test]
    fn node_limited_topk_keeps_tokens_on_the_allowed_nodes() {
        // 4 nodes x 1 rank, 8 experts (2 per node), k = 4, at most 2 nodes.
        let topo = Topology::new(4, 1).unwrap();
        // Node scores (best k/M = 2 experts): n0 = 1.0+0.0, n1 = 0.6+0.6, n2 = 0.9+0.8, n3 = 0.1+0.1.
        let scores = [1.0, 0.0, 0.6, 0.6, 0.9, 0.8, 0.1, 0.1];
        let idx = node_limited_topk(&scores, 8, 4, topo, 2).unwrap();
        // Nodes 2 (1.7) and 1 (1.2) win; plain top-4 would have taken expert 0 from node 0.
        assert_eq!(idx, vec![4, 5, 2, 3]);
        assert_eq!(topk(&scores, 8, 4).unwrap(), vec![0, 4, 5, 2]);
    }
}
