//! Progress tracking for the CPU backend's polling loops: back off when idle,
//! and turn a stall longer than the deadline into a diagnostic error.

use std::time::{Duration, Instant};

use crate::error::{Error, Result, Role, WaitDiagnostic};

/// Where a role is waiting, for the timeout diagnostic.
#[derive(Debug, Clone)]
pub(crate) struct Blocked {
    pub(crate) channel: usize,
    pub(crate) role: Role,
    pub(crate) head: u64,
    pub(crate) tail: u64,
    pub(crate) detail: String,
}

pub(crate) struct Progress {
    rank: usize,
    timeout: Duration,
    last: Instant,
    idle: u32,
}

impl Progress {
    pub(crate) fn new(rank: usize, timeout: Duration) -> Self {
        Self { rank, timeout, last: Instant::now(), idle: 0 }
    }

    /// Record one pass of the loop; idle passes back off, and a stall past the
    /// deadline fails with where the first blocked role was waiting.
    pub(crate) fn step(&mut self, progressed: bool, blocked: impl FnOnce() -> Option<Blocked>) -> Result<()> {
        if progressed {
            self.last = Instant::now();
            self.idle = 0;
            return Ok(());
        }
        self.idle += 1;
        if self.idle < 64 {
            std::hint::spin_loop();
        } else if self.idle < 256 {
            // Other ranks share the cores: let them run.
            std::thread::yield_now();
        } else {
            // Long waits block instead of burning a core in sched_yield.
            std::thread::sleep(Duration::from_micros(20));
        }
        if self.idle % 64 == 0 && self.last.elapsed() > self.timeout {
            let b = blocked().unwrap_or(Blocked {
                channel: 0,
                role: Role::Receiver,
                head: 0,
                tail: 0,
                detail: "no role reported a wait".into(),
            });
            return Err(Error::Timeout {
                timeout_ms: self.timeout.as_millis() as u64,
                diag: WaitDiagnostic {
                    rank: self.rank,
                    channel: b.channel,
                    role: b.role,
                    head: b.head,
                    tail: b.tail,
                    detail: b.detail,
                },
            });
        }
        Ok(())
    }
}
