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

impl Topology {
    /// The nodes of a group from the host name of each rank (in rank order): ranks on
    /// one host form a node. Each host's ranks must be consecutive and every host must
    /// have as many (what `mpirun --map-by ppr:N:node` and torchrun give). With
    /// `ranks_per_node` the nodes are emulated: consecutive blocks of that many ranks,
    /// each on one host (so one host can act as several nodes).
    pub fn from_hostnames(hosts: &[String], ranks_per_node: Option<usize>) -> Result<Self> {
        let bad = |reason: String| Err(Error::InvalidArgument { arg: "--ranks-per-node".into(), reason });
        let world = hosts.len();
        if world == 0 {
            return bad("no ranks".into());
        }
        if let Some(rpn) = ranks_per_node {
            if rpn == 0 || world % rpn != 0 {
                return bad(format!("{world} ranks do not split into nodes of {rpn}"));
            }
            for (n, block) in hosts.chunks(rpn).enumerate() {
                if let Some(h) = block.iter().find(|h| **h != block[0]) {
                    return bad(format!(
                        "emulated node {n} (ranks {}..{}) spans hosts {} and {h}",
                        n * rpn,
                        (n + 1) * rpn,
                        block[0]
                    ));
                }
            }
            return Self::new(world / rpn, rpn);
        }
        let mut runs: Vec<(&str, usize)> = Vec::new();
        for h in hosts {
            match runs.last_mut() {
                Some((last, n)) if *last == h.as_str() => *n += 1,
                _ => {
                    if runs.iter().any(|(seen, _)| *seen == h.as_str()) {
                        return bad(format!(
                            "the ranks of host {h} are not consecutive; place ranks by node (e.g. mpirun --map-by ppr:N:node)"
                        ));
                    }
                    runs.push((h, 1));
                }
            }
        }
        let rpn = runs[0].1;
        if let Some((h, n)) = runs.iter().find(|(_, n)| *n != rpn) {
            return bad(format!("host {} has {rpn} ranks but {h} has {n}; every node needs as many", runs[0].0));
        }
        Self::new(runs.len(), rpn)
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

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nodes_come_from_host_names() {
        let t = Topology::from_hostnames(&hosts(&["a", "a", "b", "b"]), None).unwrap();
        assert_eq!((t.num_nodes, t.ranks_per_node), (2, 2));
        let t = Topology::from_hostnames(&hosts(&["a"; 4]), None).unwrap();
        assert_eq!((t.num_nodes, t.ranks_per_node), (1, 4));
        // One host emulates two nodes.
        let t = Topology::from_hostnames(&hosts(&["a"; 4]), Some(2)).unwrap();
        assert_eq!((t.num_nodes, t.ranks_per_node), (2, 2));
        let t = Topology::from_hostnames(&hosts(&["a", "a", "b", "b"]), Some(1)).unwrap();
        assert_eq!((t.num_nodes, t.ranks_per_node), (4, 1));
        for (names, rpn, word) in [
            (&["a", "b", "a", "b"][..], None, "consecutive"),
            (&["a", "a", "b"][..], None, "as many"),
            (&["a", "a", "b", "b"][..], Some(4), "spans hosts"),
            (&["a", "a", "a"][..], Some(2), "do not split"),
            (&[][..], None, "no ranks"),
        ] {
            match Topology::from_hostnames(&hosts(names), rpn) {
                Err(Error::InvalidArgument { reason, .. }) => assert!(reason.contains(word), "{names:?}: {reason}"),
                other => panic!("{names:?} {rpn:?}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn zero_sized_topology_is_rejected() {
        assert!(matches!(Topology::new(0, 2), Err(Error::InvalidArgument { .. })));
        assert!(matches!(Topology::new(2, 0), Err(Error::InvalidArgument { .. })));
    }
}
