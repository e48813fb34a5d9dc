//! Host-side token rows: BF16, or FP8 E4M3 with one f32 scale per 128 channels.

use half::bf16;

use crate::error::{Error, Result};
use crate::quant::SCALE_GROUP;

/// Element type of token rows as they travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// bfloat16, 2 bytes per element.
    Bf16,
    /// FP8 E4M3, 1 byte per element, plus one f32 scale per 128 elements.
    Fp8,
}

impl DType {
    /// Payload bytes of one row of `hidden` elements, scales included.
    pub fn row_bytes(self, hidden: usize) -> usize {
        match self {
            DType::Bf16 => hidden * 2,
            DType::Fp8 => hidden + hidden / SCALE_GROUP * 4,
        }
    }

    /// Lower-case name, as used on the CLI and in results.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::Fp8 => "fp8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Owned token rows, row-major `[num_rows, hidden]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// BF16 rows.
    Bf16 {
        /// Elements per row.
        hidden: usize,
        /// `[num_rows * hidden]` values.
        data: Vec<bf16>,
    },
    /// FP8 E4M3 rows with 1x128 scales.
    Fp8 {
        /// Elements per row (a multiple of 128).
        hidden: usize,
        /// `[num_rows * hidden]` E4M3 bytes.
        data: Vec<u8>,
        /// `[num_rows * hidden / 128]` scales: value = e4m3 * scale.
        scales: Vec<f32>,
    },
}

/// Borrowed token rows, row-major `[num_rows, hidden]`; what operations take as input.
#[derive(Debug, Clone, Copy)]
pub enum RowsRef<'a> {
    /// BF16 rows.
    Bf16 {
        /// Elements per row.
        hidden: usize,
        /// `[num_rows * hidden]` values.
        data: &'a [bf16],
    },
    /// FP8 E4M3 rows with 1x128 scales.
    Fp8 {
        /// Elements per row (a multiple of 128).
        hidden: usize,
        /// `[num_rows * hidden]` E4M3 bytes.
        data: &'a [u8],
        /// `[num_rows * hidden / 128]` scales.
        scales: &'a [f32],
    },
}

impl Rows {
    /// Zero-filled rows of the given type and shape.
    pub fn zeros(dtype: DType, num_rows: usize, hidden: usize) -> Self {
        match dtype {
            DType::Bf16 => Rows::Bf16 { hidden, data: vec![bf16::ZERO; num_rows * hidden] },
            DType::Fp8 => {
                Rows::Fp8 { hidden, data: vec![0; num_rows * hidden], scales: vec![0.0; num_rows * (hidden / SCALE_GROUP)] }
            }
        }
    }

    /// Rows of the given type and shape in the memory of `spare` when it has the
    /// same type (contents unspecified: the caller overwrites every row), else new zeroed rows.
    pub fn reuse(spare: Option<Rows>, dtype: DType, num_rows: usize, hidden: usize) -> Self {
        match (spare, dtype) {
            (Some(Rows::Bf16 { mut data, .. }), DType::Bf16) => {
                data.resize(num_rows * hidden, bf16::ZERO);
                Rows::Bf16 { hidden, data }
            }
            (Some(Rows::Fp8 { mut data, mut scales, .. }), DType::Fp8) => {
                data.resize(num_rows * hidden, 0);
                scales.resize(num_rows * (hidden / SCALE_GROUP), 0.0);
                Rows::Fp8 { hidden, data, scales }
            }
            _ => Rows::zeros(dtype, num_rows, hidden),
        }
    }

    /// A borrowed view.
    pub fn as_ref(&self) -> RowsRef<'_> {
        match self {
            Rows::Bf16 { hidden, data } => RowsRef::Bf16 { hidden: *hidden, data },
            Rows::Fp8 { hidden, data, scales } => RowsRef::Fp8 { hidden: *hidden, data, scales },
        }
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.as_ref().num_rows()
    }

    /// Elements per row.
    pub fn hidden(&self) -> usize {
        self.as_ref().hidden()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.as_ref().dtype()
    }

    /// Mutable payload bytes of row `i` (BF16 as little-endian bytes, FP8 as E4M3 bytes).
    pub fn row_payload_mut(&mut self, i: usize) -> &mut [u8] {
        match self {
            Rows::Bf16 { hidden, data } => {
                let h = *hidden;
                bytemuck::cast_slice_mut(&mut data[i * h..(i + 1) * h])
            }
            Rows::Fp8 { hidden, data, .. } => {
                let h = *hidden;
                &mut data[i * h..(i + 1) * h]
            }
        }
    }

    /// Mutable scales of row `i` (empty for BF16).
    pub fn row_scales_mut(&mut self, i: usize) -> &mut [f32] {
        match self {
            Rows::Bf16 { .. } => &mut [],
            Rows::Fp8 { hidden, scales, .. } => {
                let g = *hidden / SCALE_GROUP;
                &mut scales[i * g..(i + 1) * g]
            }
        }
    }

    /// Row `i` as f32 values (FP8 dequantized with its scales).
    pub fn row_f32(&self, i: usize) -> Vec<f32> {
        self.as_ref().row_f32(i)
    }
}

impl<'a> RowsRef<'a> {
    /// Number of rows (0 when hidden is 0).
    pub fn num_rows(&self) -> usize {
        match self {
            RowsRef::Bf16 { hidden, data } => data.len().checked_div(*hidden).unwrap_or(0),
            RowsRef::Fp8 { hidden, data, .. } => data.len().checked_div(*hidden).unwrap_or(0),
        }
    }

    /// Elements per row.
    pub fn hidden(&self) -> usize {
        match self {
            RowsRef::Bf16 { hidden, .. } | RowsRef::Fp8 { hidden, .. } => *hidden,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            RowsRef::Bf16 { .. } => DType::Bf16,
            RowsRef::Fp8 { .. } => DType::Fp8,
        }
    }

    /// Check that these are `num_rows` rows of a valid hidden size; `arg` names the argument in errors.
    pub fn validate(&self, arg: &'static str, num_rows: usize) -> Result<()> {
        let hidden = self.hidden();
        if hidden == 0 {
            return Err(Error::InvalidArgument { arg: arg.into(), reason: "hidden size must be >= 1".into() });
        }
        let shape = format!("[T={num_rows}, H={hidden}]");
        match self {
            RowsRef::Bf16 { data, .. } => check_len(arg, data.len(), num_rows * hidden, shape),
            RowsRef::Fp8 { data, scales, .. } => {
                if hidden % SCALE_GROUP != 0 {
                    return Err(Error::HiddenNotMultipleOf128 { arg, hidden });
                }
                check_len(arg, data.len(), num_rows * hidden, shape)?;
                let groups = hidden / SCALE_GROUP;
                check_len("x_scales", scales.len(), num_rows * groups, format!("[T={num_rows}, H/128={groups}]"))
            }
        }
    }

    /// Payload bytes of row `i`.
    pub fn row_payload(&self, i: usize) -> &'a [u8] {
        match *self {
            RowsRef::Bf16 { hidden, data } => bytemuck::cast_slice(&data[i * hidden..(i + 1) * hidden]),
            RowsRef::Fp8 { hidden, data, .. } => &data[i * hidden..(i + 1) * hidden],
        }
    }

    /// Scales of row `i` (empty for BF16).
    pub fn row_scales(&self, i: usize) -> &'a [f32] {
        match *self {
            RowsRef::Bf16 { .. } => &[],
            RowsRef::Fp8 { hidden, scales, .. } => {
                let g = hidden / SCALE_GROUP;
                &scales[i * g..(i + 1) * g]
            }
        }
    }

    /// Row `i` as f32 values (FP8 dequantized with its scales).
    pub fn row_f32(&self, i: usize) -> Vec<f32> {
        match *self {
            RowsRef::Bf16 { hidden, data } => data[i * hidden..(i + 1) * hidden].iter().map(|v| v.to_f32()).collect(),
            RowsRef::Fp8 { hidden, .. } => crate::quant::dequantize_row(self.row_payload(i), self.row_scales(i), hidden),
        }
    }

    /// Rows `indices`, in that order, as new rows (scales included).
    pub fn select(&self, indices: &[u32]) -> Rows {
        let mut out = Rows::zeros(self.dtype(), indices.len(), self.hidden());
        for (i, &r) in indices.iter().enumerate() {
            out.row_payload_mut(i).copy_from_slice(self.row_payload(r as usize));
            out.row_scales_mut(i).copy_from_slice(self.row_scales(r as usize));
        }
        out
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Rows {
        match *self {
            RowsRef::Bf16 { hidden, data } => Rows::Bf16 { hidden, data: data.to_vec() },
            RowsRef::Fp8 { hidden, data, scales } => Rows::Fp8 { hidden, data: data.to_vec(), scales: scales.to_vec() },
        }
    }
}

/// Shape check shared by every argument: a typed error naming the argument.
pub(crate) fn check_len(arg: &'static str, got: usize, expected: usize, shape: String) -> Result<()> {
    if got != expected {
        return Err(Error::ShapeMismatch { arg, expected, got, shape });
    }
    Ok(())
}
