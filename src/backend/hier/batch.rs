//! Tokens as they cross the rail hop: a batch of rows of one source rank with their
//! token indices and (on the first dispatch) expert ids and weights, in one flat
//! byte layout, plus the partial sums that cross back in combine.

use half::bf16;

use crate::error::{Error, Result};
use crate::tensor::{DType, Rows, RowsRef};

/// What every token of a batch carries; the same on every rank of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchFormat {
    pub dtype: DType,
    pub hidden: usize,
    pub topk: usize,
    /// Expert ids and weights ride along (dispatch), or only rows (cached dispatch).
    pub with_meta: bool,
    /// Rows ride along; without them a batch is metadata only (a device path moves the rows).
    pub with_rows: bool,
}

impl BatchFormat {
    /// Bytes of a token's index on its source rank, the first thing each token carries.
    const TOKEN_INDEX_BYTES: usize = 4;

    fn scale_groups(&self) -> usize {
        if self.dtype == DType::Fp8 {
            self.hidden / crate::quant::SCALE_GROUP
        } else {
            0
        }
    }

    /// Bytes one token takes in a batch.
    fn token_bytes(&self) -> usize {
        let meta = if self.with_meta { self.topk * (8 + 4) } else { 0 };
        let row = if self.with_rows { self.dtype.row_bytes(self.hidden) } else { 0 };
        Self::TOKEN_INDEX_BYTES + meta + row
    }
}

/// Some tokens of one source rank.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TokenBatch {
    /// Index of each token on its source rank.
    pub tokens: Vec<u32>,
    /// `[n, k]` expert ids (empty without metadata).
    pub ids: Vec<i64>,
    /// `[n, k]` weights (empty without metadata).
    pub weights: Vec<f32>,
    /// `[n, H]` rows.
    pub x: Rows,
}

impl TokenBatch {
    /// `tokens` of `x`. With metadata, each token's ids and weights come along, with
    /// the slots whose expert fails `keep` set to -1 and 0.
    pub fn gather(
        fmt: &BatchFormat,
        x: RowsRef<'_>,
        tokens: &[u32],
        topk_idx: &[i64],
        topk_weights: &[f32],
        keep: impl Fn(i64) -> bool,
    ) -> Self {
        let k = fmt.topk;
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        if fmt.with_meta {
            for &t in tokens {
                let t = t as usize;
                for j in t * k..(t + 1) * k {
                    let hit = topk_idx[j] >= 0 && keep(topk_idx[j]);
                    ids.push(if hit { topk_idx[j] } else { -1 });
                    weights.push(if hit { topk_weights[j] } else { 0.0 });
                }
            }
        }
        let x = if fmt.with_rows { x.select(tokens) } else { Rows::zeros(fmt.dtype, 0, fmt.hidden) };
        Self { tokens: tokens.to_vec(), ids, weights, x }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The flat layout: token indices, then ids and weights (with metadata), then
    /// payloads, then scales (FP8; both with rows), each little-endian and contiguous.
    pub fn to_bytes(&self, fmt: &BatchFormat) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * fmt.token_bytes());
        out.extend_from_slice(bytemuck::cast_slice(&self.tokens));
        if fmt.with_meta {
            out.extend_from_slice(bytemuck::cast_slice(&self.ids));
            out.extend_from_slice(bytemuck::cast_slice(&self.weights));
        }
        match &self.x {
            _ if !fmt.with_rows => {}
            Rows::Bf16 { data, .. } => out.extend_from_slice(bytemuck::cast_slice(data)),
            Rows::Fp8 { data, scales, .. } => {
                out.extend_from_slice(data);
                out.extend_from_slice(bytemuck::cast_slice(scales));
            }
        }
        out
    }

    /// Parse [`TokenBatch::to_bytes`]; `me` and `from` name the ranks in a protocol error.
    pub fn from_bytes(fmt: &BatchFormat, bytes: &[u8], me: usize, from: usize) -> Result<Self> {
        let per = fmt.token_bytes();
        if bytes.len() % per != 0 {
            return Err(Error::Protocol {
                rank: me,
                detail: format!("rank {from} sent {} bytes, not a whole number of {per}-byte tokens", bytes.len()),
            });
        }
        let n = bytes.len() / per;
        let mut at = 0;
        let mut take = |len: usize| {
            let s = &bytes[at..at + len];
            at += len;
            s
        };
        let tokens: Vec<u32> = bytemuck::pod_collect_to_vec(take(n * 4));
        let (ids, weights) = if fmt.with_meta {
            let ids: Vec<i64> = bytemuck::pod_collect_to_vec(take(n * fmt.topk * 8));
            (ids, bytemuck::pod_collect_to_vec(take(n * fmt.topk * 4)))
        } else {
            (Vec::new(), Vec::new())
        };
        let x = match fmt.dtype {
            _ if !fmt.with_rows => Rows::zeros(fmt.dtype, 0, fmt.hidden),
            DType::Bf16 => Rows::Bf16 { hidden: fmt.hidden, data: bytemuck::pod_collect_to_vec(take(n * fmt.hidden * 2)) },
            DType::Fp8 => {
                let data = take(n * fmt.hidden).to_vec();
                Rows::Fp8 { hidden: fmt.hidden, data, scales: bytemuck::pod_collect_to_vec(take(n * fmt.scale_groups() * 4)) }
            }
        };
        Ok(Self { tokens, ids, weights, x })
    }

    /// The batches one after another (without rows: as many rows of zeros).
    pub fn concat(fmt: &BatchFormat, batches: &[TokenBatch]) -> Self {
        let n = batches.iter().map(TokenBatch::len).sum();
        let mut x = Rows::zeros(fmt.dtype, n, fmt.hidden);
        let batches_rows = if fmt.with_rows { batches } else { &[] };
        let mut i = 0;
        for b in batches_rows {
            for r in 0..b.len() {
                x.row_payload_mut(i).copy_from_slice(b.x.as_ref().row_payload(r));
                x.row_scales_mut(i).copy_from_slice(b.x.as_ref().row_scales(r));
                i += 1;
            }
        }
        Self {
            tokens: batches.iter().flat_map(|b| b.tokens.iter().copied()).collect(),
            ids: batches.iter().flat_map(|b| b.ids.iter().copied()).collect(),
            weights: batches.iter().flat_map(|b| b.weights.iter().copied()).collect(),
            x,
        }
    }
}

/// A forwarder's partial sums for one source rank: `[n, H]` BF16 rows and, when
/// combine carries weights, `[n, k]` summed weights, flat and little-endian.
pub(super) fn partials_to_bytes(x: &[bf16], weights: Option<&[f32]>) -> Vec<u8> {
    let mut out = bytemuck::cast_slice::<bf16, u8>(x).to_vec();
    if let Some(w) = weights {
        out.extend_from_slice(bytemuck::cast_slice(w));
    }
    out
}

/// Parse [`partials_to_bytes`] of `n` tokens.
pub(super) fn partials_from_bytes(
    bytes: &[u8],
    n: usize,
    hidden: usize,
    topk: Option<usize>,
    me: usize,
    from: usize,
) -> Result<(Vec<bf16>, Vec<f32>)> {
    let want = n * hidden * 2 + topk.map_or(0, |k| n * k * 4);
    if bytes.len() != want {
        return Err(Error::Protocol {
            rank: me,
            detail: format!("rank {from} sent {} bytes of partial sums for {n} tokens, {want} expected", bytes.len()),
        });
    }
    let (x, w) = bytes.split_at(n * hidden * 2);
    Ok((bytemuck::pod_collect_to_vec(x), bytemuck::pod_collect_to_vec(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_survives_its_bytes_in_both_dtypes() {
        let hidden = 128;
        let x16: Vec<bf16> = (0..3 * hidden).map(|i| bf16::from_f32(i as f32 * 0.5 - 7.0)).collect();
        let (q, s) = crate::quant::quantize(&x16, hidden);
        let ids = [0i64, 5, -1, 3, 7, 2, 6, 1, 4];
        let w = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        for x in [Rows::Bf16 { hidden, data: x16.clone() }, Rows::Fp8 { hidden, data: q.clone(), scales: s.clone() }] {
            for (with_meta, with_rows) in [(true, true), (false, true), (true, false)] {
                let fmt = BatchFormat { dtype: x.dtype(), hidden, topk: 3, with_meta, with_rows };
                // Tokens 2 and 0, keeping experts < 4.
                let b = TokenBatch::gather(&fmt, x.as_ref(), &[2, 0], &ids, &w, |e| e < 4);
                if with_rows {
                    assert_eq!(b.x.as_ref().row_payload(0), x.as_ref().row_payload(2));
                    assert_eq!(b.x.as_ref().row_scales(1), x.as_ref().row_scales(0));
                } else {
                    assert_eq!((b.x.num_rows(), b.to_bytes(&fmt).len()), (0, 2 * (4 + 3 * 12)));
                }
                if with_meta {
                    assert_eq!(b.ids, vec![-1, 1, -1, 0, -1, -1]);
                    assert_eq!(b.weights, vec![0.0, 0.8, 0.0, 0.1, 0.0, 0.0]);
                }
                let back = TokenBatch::from_bytes(&fmt, &b.to_bytes(&fmt), 0, 1).unwrap();
                assert_eq!(back, b);
                assert!(TokenBatch::from_bytes(&fmt, &b.to_bytes(&fmt)[1..], 0, 1).is_err());
            }
        }
    }

    #[test]
    fn partial_sums_survive_their_bytes() {
        let x: Vec<bf16> = (0..8).map(|i| bf16::from_f32(i as f32)).collect();
        let w = [1.0f32, 2.0, 3.0, 4.0];
        let (gx, gw) = partials_from_bytes(&partials_to_bytes(&x, Some(&w)), 2, 4, Some(2), 0, 1).unwrap();
        assert_eq!((gx, gw), (x.clone(), w.to_vec()));
        assert!(partials_from_bytes(&partials_to_bytes(&x, None), 2, 4, Some(2), 0, 1).is_err());
    }
}
