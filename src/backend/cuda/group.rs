//! How the ranks of a node agree on the host: ranks that are threads of one
//! process share a [`Board`]; ranks that are processes (one per GPU) go through
//! their [`ProcessGroup`] (MPI or the TCP rendezvous). Both carry small messages only (readiness, buffer handles,
//! bench results), each wait with a deadline.

use std::sync::Mutex;
use std::time::Duration;

use crate::bootstrap::threads::Board;
use crate::bootstrap::ProcessGroup;
use crate::error::{Error, Result};

/// The host-side group of a node's ranks.
pub(crate) enum HostGroup {
    /// Ranks are threads of this process.
    Threads(Board),
    /// Ranks are processes; this is this process's end of their group.
    Processes(Mutex<Box<dyn ProcessGroup>>),
}

impl HostGroup {
    /// Every rank's `bytes`, in rank order.
    pub(crate) fn all_gather(&self, rank: usize, bytes: Vec<u8>, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        match self {
            Self::Threads(board) => Ok(board.all_gather(rank, bytes, timeout)?.iter().map(|b| b.as_ref().clone()).collect()),
            Self::Processes(group) => {
                let mut g = group.lock().map_err(|_| Error::Protocol { rank, detail: "host group lock poisoned".into() })?;
                g.all_gather(&bytes, timeout)
            }
        }
    }

    /// Every rank's failure text (`None`: ready), in rank order.
    pub(crate) fn gather_status(&self, rank: usize, status: Option<String>, timeout: Duration) -> Result<Vec<Option<String>>> {
        let bytes = status.map_or_else(Vec::new, |s| {
            let mut b = vec![1u8];
            b.extend_from_slice(s.as_bytes());
            b
        });
        Ok(self
            .all_gather(rank, bytes, timeout)?
            .into_iter()
            .map(|b| (!b.is_empty()).then(|| String::from_utf8_lossy(&b[1..]).into_owned()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn status_round_trips_through_the_thread_board() {
        let g = Arc::new(HostGroup::Threads(Board::new(2)));
        let g1 = g.clone();
        let h = std::thread::spawn(move || g1.gather_status(1, Some("bad x".into()), Duration::from_secs(5)).unwrap());
        let got0 = g.gather_status(0, None, Duration::from_secs(5)).unwrap();
        let got1 = h.join().unwrap();
        assert_eq!(got0, vec![None, Some("bad x".to_string())]);
        assert_eq!(got0, got1);
    }
}
