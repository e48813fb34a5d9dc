//! FP8 E4M3 with one f32 scale per 1x128 group: the reference cast and dequant.
//!
//! Format: OCP E4M3 ("fn" variant): 1 sign, 4 exponent (bias 7), 3 mantissa
//! bits; no infinities; `S.1111.111` is NaN; largest finite 448; smallest
//! normal 2^-6; subnormals are multiples of 2^-9.
//!
//! Quantization of one group of 128 values, exactly as every backend must do it:
//! `amax = max |x|`; if `amax == 0` the scale is 1 and every byte is +0;
//! otherwise `scale = amax / 448` and each byte is `encode(x * (448 / amax))`
//! (f32 arithmetic, round to nearest even, saturating at +-448). The value a
//! byte stands for is `decode(byte) * scale`.

use half::bf16;

/// Elements sharing one scale.
pub const SCALE_GROUP: usize = 128;
/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// The E4M3 NaN byte (positive sign).
pub const E4M3_NAN: u8 = 0x7F;

/// Cast one f32 to E4M3, rounding to nearest even and saturating to +-448; NaN stays NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Subnormal range (below 2^-6): multiples of 2^-9; a count of 8 is the smallest normal, whose bits are 8 too.
    if a < 2f32.powi(-6) {
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let e = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    // a / 2^(e-3) lies in [8, 16): exact power-of-two scaling, then one rounding.
    let mut q = (a * 2f32.powi(3 - e)).round_ties_even() as u32;
    let mut e = e;
    if q == 16 {
        q = 8;
        e += 1;
    }
    let bits = (((e + 7) as u32) << 3) | (q - 8);
    if bits > 0x7E {
        return sign | 0x7E;
    }
    sign | bits as u8
}

/// Value of one E4M3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0F) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        return sign * man * 2f32.powi(-9);
    }
    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
}

/// Quantize one row (`hidden` a multiple of 128) into `out` bytes and `scales` (one per group).
pub fn quantize_row(row: &[bf16], out: &mut [u8], scales: &mut [f32]) {
    debug_assert_eq!(row.len(), out.len());
    debug_assert_eq!(row.len(), scales.len() * SCALE_GROUP);
    for ((group, dst), scale) in row.chunks_exact(SCALE_GROUP).zip(out.chunks_exact_mut(SCALE_GROUP)).zip(scales.iter_mut()) {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
        if amax == 0.0 || !amax.is_finite() {
            // Zero group: scale 1, all +0. (Non-finite inputs are the caller's bug; saturate them.)
            *scale = if amax == 0.0 { 1.0 } else { f32::MAX / E4M3_MAX };
            let inv = if amax == 0.0 { 1.0 } else { E4M3_MAX / f32::MAX };
            for (d, v) in dst.iter_mut().zip(group) {
                *d = e4m3_from_f32(v.to_f32() * inv);
            }
            continue;
        }
        *scale = amax / E4M3_MAX;
        let inv = E4M3_MAX / amax;
        for (d, v) in dst.iter_mut().zip(group) {
            *d = e4m3_from_f32(v.to_f32() * inv);
        }
    }
}

/// Quantize `[rows, hidden]` BF16 into E4M3 bytes and `[rows, hidden / 128]` scales.
pub fn quantize(x: &[bf16], hidden: usize) -> (Vec<u8>, Vec<f32>) {
    let rows = x.len().checked_div(hidden).unwrap_or(0);
    let mut data = vec![0u8; rows * hidden];
    let mut scales = vec![0f32; rows * (hidden / SCALE_GROUP)];
    let groups = hidden / SCALE_GROUP;
    for r in 0..rows {
        quantize_row(
            &x[r * hidden..(r + 1) * hidden],
            &mut data[r * hidden..(r + 1) * hidden],
            &mut scales[r * groups..(r + 1) * groups],
        );
    }
    (data, scales)
}

/// Dequantize one row of E4M3 bytes with its scales to f32.
pub fn dequantize_row(data: &[u8], scales: &[f32], hidden: usize) -> Vec<f32> {
    debug_assert_eq!(data.len(), hidden);
    data.iter().enumerate().map(|(i, &b)| e4m3_to_f32(b) * scales[i / SCALE_GROUP]).collect()
}

/// Largest error quantization may make on an element `x` of a group with scale `scale`:
/// half a unit in the last place (2^-4 relative) for normals, 2^-10 * scale for subnormals,
/// plus a few f32 roundings.
pub fn error_bound(x: f32, scale: f32) -> f32 {
    x.abs() * (1.0 / 16.0 + 1e-6) + scale * (1.0 / 1024.0) + f32::MIN_POSITIVE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_encode_and_decode() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-1.0, 0xB8),
            (448.0, 0x7E),
            (-448.0, 0xFE),
            (2f32.powi(-6), 0x08),       // smallest normal
            (2f32.powi(-9), 0x01),       // smallest subnormal
            (7.0 * 2f32.powi(-9), 0x07), // largest subnormal
            (1.75, 0x3E),
            (0.5, 0x30),
        ];
        for &(v, b) in cases {
            assert_eq!(e4m3_from_f32(v), b, "encode {v}");
            assert_eq!(e4m3_to_f32(b), v, "decode {b:#04x}");
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7F, E4M3_NAN);
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        assert_eq!(e4m3_from_f32(1e9), 0x7E);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_from_f32(f32::NEG_INFINITY), 0xFE);
        assert_eq!(e4m3_from_f32(464.0), 0x7E); // would round to 480, which does not exist
    }

    #[test]
    fn ties_round_to_even() {
        // Between 1.0 (0x38, even) and 1.125 (0x39): the tie goes to 1.0.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        // Between 1.125 (0x39) and 1.25 (0x3A, even): the tie goes to 1.25.
        assert_eq!(e4m3_from_f32(1.1875), 0x3A);
        // Subnormal ties: 0.5 * 2^-9 goes to 0, 1.5 * 2^-9 to 2 * 2^-9.
        assert_eq!(e4m3_from_f32(0.5 * 2f32.powi(-9)), 0x00);
        assert_eq!(e4m3_from_f32(1.5 * 2f32.powi(-9)), 0x02);
        // 7.5 * 2^-9 rounds up across the boundary into the smallest normal.
        assert_eq!(e4m3_from_f32(7.5 * 2f32.powi(-9)), 0x08);
    }

    #[test]
    fn every_finite_byte_round_trips() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = e4m3_from_f32(v);
            // +0 and -0 both decode to zero; keep the sign.
            assert_eq!(back, b, "byte {b:#04x} value {v}");
        }
    }

    #[test]
    fn group_scale_is_amax_over_448_and_dequant_is_within_bound() {
        let hidden = 256;
        let row: Vec<bf16> = (0..hidden).map(|i| bf16::from_f32(((i as f32) * 0.37).sin() * 3.0)).collect();
        let (q, s) = quantize(&row, hidden);
        for g in 0..2 {
            let amax = row[g * 128..(g + 1) * 128].iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
            assert_eq!(s[g], amax / 448.0);
        }
        let deq = dequantize_row(&q, &s, hidden);
        for (i, (&d, x)) in deq.iter().zip(&row).enumerate() {
            let x = x.to_f32();
            assert!((d - x).abs() <= error_bound(x, s[i / 128]), "elem {i}: {x} -> {d}");
        }
        // The largest element of each group maps to exactly +-448.
        let imax = (0..128).max_by(|&a, &b| row[a].to_f32().abs().total_cmp(&row[b].to_f32().abs())).unwrap();
        assert_eq!(e4m3_to_f32(q[imax]).abs(), 448.0);
    }

    #[test]
    fn zero_group_has_scale_one() {
        let row = vec![bf16::ZERO; 128];
        let (q, s) = quantize(&row, 128);
        assert_eq!(s, vec![1.0]);
        assert!(q.iter().all(|&b| b == 0));
    }
}
