//! Views of one process group: the whole group, or a subset of its ranks (the
//! ranks of one node, for a node-local communicator inside a multi-node one).
//!
//! A view has no transport of its own. Each collective of a view runs as the same
//! collective of the whole parent group, in which ranks outside the view take part
//! with empty contributions, and the view keeps its members' parts. So the views of
//! one parent must make their calls in step: every rank makes the same sequence of
//! calls (each rank through its own view). The hierarchical backend, which runs the
//! same code on every node, does; a rank that falls out of step gets a protocol error
//! or a timeout, never a hang. The cost is the parent's (world-wide) collective.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ProcessGroup;
use crate::error::{Error, Result};

/// A process group several views share (clone it to hand out more views).
#[derive(Clone)]
pub struct SharedGroup {
    parent: Arc<Mutex<Box<dyn ProcessGroup>>>,
    rank: usize,
    hosts: Vec<String>,
    transport: &'static str,
}

impl SharedGroup {
    /// Share `group`.
    pub fn new(group: Box<dyn ProcessGroup>) -> Self {
        let (rank, hosts, transport) = (group.rank(), group.hostnames().to_vec(), group.transport());
        Self { parent: Arc::new(Mutex::new(group)), rank, hosts, transport }
    }

    /// This process's rank in the whole group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the whole group.
    pub fn world_size(&self) -> usize {
        self.hosts.len()
    }

    /// Every rank's host, in rank order.
    pub fn hostnames(&self) -> &[String] {
        &self.hosts
    }

    /// A view of the whole group.
    pub fn whole(&self) -> Box<dyn ProcessGroup> {
        let members: Vec<usize> = (0..self.world_size()).collect();
        Box::new(GroupView { shared: self.clone(), hosts: self.hosts.clone(), members, me: self.rank })
    }

    /// A view of `members` (ranks of the whole group, ascending, this rank among them),
    /// in which member `members[i]` is rank `i`.
    pub fn subset(&self, members: Vec<usize>) -> Result<Box<dyn ProcessGroup>> {
        let world = self.world_size();
        let ascending = members.windows(2).all(|w| w[0] < w[1]);
        let me = members.iter().position(|&m| m == self.rank);
        match me {
            Some(me) if ascending && members.iter().all(|&m| m < world) => {
                let hosts = members.iter().map(|&m| self.hosts[m].clone()).collect();
                Ok(Box::new(GroupView { shared: self.clone(), hosts, members, me }))
            }
            _ => Err(Error::InvalidArgument {
                arg: "members".into(),
                reason: format!("{members:?} is not an ascending set of ranks < {world} holding rank {}", self.rank),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn ProcessGroup) -> Result<T>) -> Result<T> {
        let mut g =
            self.parent.lock().map_err(|_| Error::Protocol { rank: self.rank, detail: "process group lock poisoned".into() })?;
        f(g.as_mut())
    }
}

/// Some ranks of a [`SharedGroup`], renumbered from 0.
struct GroupView {
    shared: SharedGroup,
    /// Each member's host.
    hosts: Vec<String>,
    /// Ranks of the whole group in this view, ascending.
    members: Vec<usize>,
    /// This rank's index in `members`.
    me: usize,
}

impl GroupView {
    fn keep_members(&self, mut all: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        self.members.iter().map(|&m| std::mem::take(&mut all[m])).collect()
    }
}

impl ProcessGroup for GroupView {
    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn hostnames(&self) -> &[String] {
        &self.hosts
    }

    fn all_gather(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let all = self.shared.with(|g| g.all_gather(bytes, timeout))?;
        Ok(self.keep_members(all))
    }

    fn all_to_all(&mut self, parts: &[Vec<u8>], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        if parts.len() != self.members.len() {
            return Err(Error::InvalidArgument {
                arg: "parts".into(),
                reason: format!("{} parts for a group of {}", parts.len(), self.members.len()),
            });
        }
        let mut full = vec![Vec::new(); self.shared.world_size()];
        for (&m, p) in self.members.iter().zip(parts) {
            full[m] = p.clone();
        }
        let got = self.shared.with(|g| g.all_to_all(&full, timeout))?;
        Ok(self.keep_members(got))
    }

    fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.shared.with(|g| g.barrier(timeout))
    }

    fn transport(&self) -> &'static str {
        self.shared.transport
    }
}
