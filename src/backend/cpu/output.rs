//! Where a dispatched row lands on its receiver: row `recv_prefix[source] +
//! position`, so the output is ordered by (source rank, source token), with the
//! expert ids translated to the receiver's local ids. Shared by the ring engine
//! (threads) and the process engine.

use crate::error::{Error, Result};
use crate::tensor::{DType, Rows};

/// One row as it arrives, with what came along with it.
pub(super) struct Arrived<'a> {
    pub src: u32,
    pub token: u32,
    /// Position among the rows its source sends to this rank.
    pub pos: u32,
    pub payload: &'a [u8],
    pub scales: &'a [f32],
    /// `[k]` global expert ids (ignored without metadata).
    pub ids: &'a [i64],
    /// `[k]` gate weights (ignored without metadata).
    pub weights: &'a [f32],
}

/// The received rows and metadata of one dispatch, filled as rows arrive.
pub(super) struct Output {
    me: usize,
    recv_prefix: Vec<usize>,
    topk: usize,
    experts_per_rank: usize,
    with_meta: bool,
    pub x: Rows,
    pub topk_idx: Vec<i64>,
    pub topk_weights: Vec<f32>,
    pub source_rank: Vec<u32>,
    pub source_token: Vec<u32>,
    filled: Vec<bool>,
    placed: usize,
}

impl Output {
    /// Room for `num_recv` rows (reusing `spare`); `recv_prefix[s]` is source `s`'s first row.
    /// Without metadata (cached dispatch) only the rows are kept.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: usize,
        recv_prefix: Vec<usize>,
        num_recv: usize,
        spare: Option<Rows>,
        dtype: DType,
        hidden: usize,
        topk: usize,
        experts_per_rank: usize,
        with_meta: bool,
    ) -> Self {
        let (n, k) = (num_recv, topk);
        Self {
            me,
            recv_prefix,
            topk,
            experts_per_rank,
            with_meta,
            x: Rows::reuse(spare, dtype, n, hidden),
            topk_idx: if with_meta { vec![-1; n * k] } else { Vec::new() },
            topk_weights: if with_meta { vec![0.0; n * k] } else { Vec::new() },
            source_rank: if with_meta { vec![0; n] } else { Vec::new() },
            source_token: if with_meta { vec![0; n] } else { Vec::new() },
            filled: vec![false; n],
            placed: 0,
        }
    }

    /// Put one row into its final place; returns its output index. A row with no free
    /// place (a position out of range, or one taken) is a protocol error.
    pub fn place(&mut self, row: &Arrived<'_>) -> Result<usize> {
        let n = self.filled.len();
        let idx = self.recv_prefix.get(row.src as usize).map(|p| p + row.pos as usize).filter(|&i| i < n);
        let idx = match idx {
            Some(i) if !self.filled[i] => i,
            _ => {
                return Err(Error::Protocol {
                    rank: self.me,
                    detail: format!("row from rank {} token {} position {} has no free output slot", row.src, row.token, row.pos),
                })
            }
        };
        self.filled[idx] = true;
        self.placed += 1;
        self.x.row_payload_mut(idx).copy_from_slice(row.payload);
        self.x.row_scales_mut(idx).copy_from_slice(row.scales);
        if self.with_meta {
            let k = self.topk;
            let first = (self.me * self.experts_per_rank) as i64;
            let last = first + self.experts_per_rank as i64;
            for j in 0..k {
                let e = row.ids[j];
                let local = e >= first && e < last;
                self.topk_idx[idx * k + j] = if local { e - first } else { -1 };
                self.topk_weights[idx * k + j] = if local { row.weights[j] } else { 0.0 };
            }
            self.source_rank[idx] = row.src;
            self.source_token[idx] = row.token;
        }
        Ok(idx)
    }

    /// Fails unless every announced row arrived.
    pub fn check_complete(&self) -> Result<()> {
        if self.placed != self.filled.len() {
            return Err(Error::Protocol {
                rank: self.me,
                detail: format!("received {} rows, {} announced", self.placed, self.filled.len()),
            });
        }
        Ok(())
    }
}
