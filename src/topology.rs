//! Ranks, nodes, local ranks and rails.

use crate::error::{Error, Result};

/// How ranks are grouped: `num_nodes` nodes of `ranks_per_node` ranks each.
///
/// Rank `r` lives on node `r / ranks_per_node` with local index `r % ranks_per_node`.
/// Ranks with the same local index on different nodes form a *rail*: the
/// inter-node hop only ever connects a rank to its rail peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    /// Number of nodes (NVLink domains, or emulated nodes on the CPU backend).
    pub num_nodes: usize,
    /// Ranks in each node.
    pub ranks_per_node: usize,
}

impl Topology {
    /// A topology, rejecting zero-sized ones.
    pub fn new(num_nodes: usize, ranks_per_node: usize) -> Result<Self> {
        if num_nodes == 0 || ranks_per_node == 0 {
            return Err(Error::InvalidArgument {
                arg: "topology".into(),
                reason: format!("{num_nodes} nodes x {ranks_per_node} ranks per node: both must be >= 1"),
            });
        }
        Ok(Self { num_nodes, ranks_per_node })
    }

    /// Total number of ranks.
    pub fn world(&self) -> usize {
        self.num_nodes * self.ranks_per_node
    }

    /// Node of a rank.
    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.ranks_per_node
    }

    /// Local index of a rank inside its node.
    pub fn local_of(&self, rank: usize) -> usize {
        rank % self.ranks_per_node
    }

    /// Rank of local index `local` on node `node`.
    pub fn rank_of(&self, node: usize, local: usize) -> usize {
        node * self.ranks_per_node + local
    }

    /// Ranks of a node, in local-index order.
    pub fn ranks_of_node(&self, node: usize) -> std::ops::Range<usize> {
        node * self.ranks_per_node..(node + 1) * self.ranks_per_node
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.num_nodes, self.ranks_per_node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_node_local_round_trip() {
        let t = Topology::new(4, 2).unwrap();
        assert_eq!(t.world(), 8);
        for r in 0..8 {
            assert_eq!(t.rank_of(t.node_of(r), t.local_of(r)), r);
        }
        assert_eq!(t.node_of(5), 2);
        assert_eq!(t.local_of(5), 1);
        assert_eq!(t.ranks_of_node(3), 6..8);
    }

    #[test]
    fn zero_sized_topology_is_rejected() {
        assert!(matches!(Topology::new(0, 2), Err(Error::InvalidArgument { .. })));
        assert!(matches!(Topology::new(2, 0), Err(Error::InvalidArgument { .. })));
    }
}
