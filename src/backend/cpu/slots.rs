//! Byte layouts of the slots that travel through the CPU backend's rings.
//!
//! One dispatch slot format serves both hops, so a forwarder moves a slot from
//! its inter-node ring to an intra-node ring with one copy and no re-encoding.

const ALIGN: usize = 16;

fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn wr<T: bytemuck::Pod>(b: &mut [u8], off: usize, vals: &[T]) {
    let bytes: &[u8] = bytemuck::cast_slice(vals);
    b[off..off + bytes.len()].copy_from_slice(bytes);
}

fn rd<T: bytemuck::Pod>(b: &[u8], off: usize, out: &mut [T]) {
    let n = std::mem::size_of_val(out);
    bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(&b[off..off + n]);
}

/// Dispatch slot: `src_rank u32 | src_token u32 | pos[ranks_per_node] u32 |
/// ids[k] i64 | weights[k] f32 | scales[groups] f32 | payload`, where `pos[j]` is
/// the row's position among the rows its source sends to local rank `j` of the
/// destination node (`u32::MAX`: not sent there).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DispatchSlot {
    k: usize,
    groups: usize,
    off_ids: usize,
    off_weights: usize,
    off_scales: usize,
    off_payload: usize,
    payload_bytes: usize,
}

/// Position value meaning "not sent to that rank".
pub(crate) const NOT_SENT: u32 = u32::MAX;

impl DispatchSlot {
    pub(crate) fn new(ranks_per_node: usize, k: usize, groups: usize, payload_bytes: usize) -> Self {
        let off_ids = (8 + 4 * ranks_per_node).div_ceil(8) * 8;
        let off_weights = off_ids + 8 * k;
        let off_scales = off_weights + 4 * k;
        let off_payload = (off_scales + 4 * groups).div_ceil(ALIGN) * ALIGN;
        Self { k, groups, off_ids, off_weights, off_scales, off_payload, payload_bytes }
    }

    /// Bytes of one slot.
    pub(crate) fn bytes(&self) -> usize {
        self.off_payload + self.payload_bytes
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write(
        &self,
        s: &mut [u8],
        src_rank: u32,
        src_token: u32,
        pos: &[u32],
        ids: &[i64],
        weights: &[f32],
        scales: &[f32],
        payload: &[u8],
    ) {
        wr(s, 0, &[src_rank, src_token]);
        wr(s, 8, pos);
        wr(s, self.off_ids, ids);
        wr(s, self.off_weights, weights);
        wr(s, self.off_scales, scales);
        s[self.off_payload..self.off_payload + payload.len()].copy_from_slice(payload);
    }

    pub(crate) fn src_rank(&self, s: &[u8]) -> u32 {
        rd_u32(s, 0)
    }

    pub(crate) fn src_token(&self, s: &[u8]) -> u32 {
        rd_u32(s, 4)
    }

    /// Position for local rank `j` of the destination node.
    pub(crate) fn pos(&self, s: &[u8], j: usize) -> u32 {
        rd_u32(s, 8 + 4 * j)
    }

    pub(crate) fn ids(&self, s: &[u8], out: &mut [i64]) {
        rd(s, self.off_ids, &mut out[..self.k]);
    }

    pub(crate) fn weights(&self, s: &[u8], out: &mut [f32]) {
        rd(s, self.off_weights, &mut out[..self.k]);
    }

    pub(crate) fn scales(&self, s: &[u8], out: &mut [f32]) {
        rd(s, self.off_scales, &mut out[..self.groups]);
    }

    pub(crate) fn payload<'a>(&self, s: &'a [u8]) -> &'a [u8] {
        &s[self.off_payload..self.off_payload + self.payload_bytes]
    }
}

/// Combine slot: `src_rank u32 | src_token u32 | weights[kw] f32 | payload (BF16 row)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CombineSlot {
    kw: usize,
    off_payload: usize,
    payload_bytes: usize,
}

impl CombineSlot {
    pub(crate) fn new(weights: usize, payload_bytes: usize) -> Self {
        Self { kw: weights, off_payload: (8 + 4 * weights).div_ceil(ALIGN) * ALIGN, payload_bytes }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.off_payload + self.payload_bytes
    }

    pub(crate) fn write(&self, s: &mut [u8], src_rank: u32, src_token: u32, weights: &[f32], payload: &[u8]) {
        self.write_header(s, src_rank, src_token, weights);
        s[self.off_payload..self.off_payload + payload.len()].copy_from_slice(payload);
    }

    /// Everything but the payload (which the caller fills through [`CombineSlot::payload_mut`]).
    pub(crate) fn write_header(&self, s: &mut [u8], src_rank: u32, src_token: u32, weights: &[f32]) {
        wr(s, 0, &[src_rank, src_token]);
        wr(s, 8, &weights[..self.kw]);
    }

    pub(crate) fn payload_mut<'a>(&self, s: &'a mut [u8]) -> &'a mut [u8] {
        &mut s[self.off_payload..self.off_payload + self.payload_bytes]
    }

    pub(crate) fn src_rank(&self, s: &[u8]) -> u32 {
        rd_u32(s, 0)
    }

    pub(crate) fn src_token(&self, s: &[u8]) -> u32 {
        rd_u32(s, 4)
    }

    pub(crate) fn weights(&self, s: &[u8], out: &mut [f32]) {
        rd(s, 8, &mut out[..self.kw]);
    }

    pub(crate) fn payload<'a>(&self, s: &'a [u8]) -> &'a [u8] {
        &s[self.off_payload..self.off_payload + self.payload_bytes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_slot_round_trips_every_field() {
        let l = DispatchSlot::new(3, 2, 1, 256);
        assert_eq!(l.bytes() % 16, 0);
        let mut s = vec![0u8; l.bytes()];
        let payload: Vec<u8> = (0..=255).collect();
        l.write(&mut s, 7, 9, &[1, NOT_SENT, 4], &[-1, 42], &[0.0, 0.5], &[2.5], &payload);
        assert_eq!((l.src_rank(&s), l.src_token(&s)), (7, 9));
        assert_eq!((l.pos(&s, 0), l.pos(&s, 1), l.pos(&s, 2)), (1, NOT_SENT, 4));
        let (mut ids, mut w, mut sc) = ([0i64; 2], [0f32; 2], [0f32; 1]);
        l.ids(&s, &mut ids);
        l.weights(&s, &mut w);
        l.scales(&s, &mut sc);
        assert_eq!((ids, w, sc), ([-1, 42], [0.0, 0.5], [2.5]));
        assert_eq!(l.payload(&s), &payload[..]);
    }

    #[test]
    fn combine_slot_round_trips_every_field() {
        let l = CombineSlot::new(3, 32);
        let mut s = vec![0u8; l.bytes()];
        let payload = [5u8; 32];
        l.write(&mut s, 1, 2, &[0.25, 0.5, 0.75], &payload);
        let mut w = [0f32; 3];
        l.weights(&s, &mut w);
        assert_eq!((l.src_rank(&s), l.src_token(&s), w), (1, 2, [0.25, 0.5, 0.75]));
        assert_eq!(l.payload(&s), &payload);
    }
}
