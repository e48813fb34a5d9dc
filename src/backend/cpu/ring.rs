//! A bounded single-producer single-consumer ring of fixed-size slots: the
//! channel buffer of the CPU backend, with the head/tail flow control the GPU
//! kernels use (the producer publishes `tail` with release, the consumer
//! publishes `head` with release, each reads the other's with acquire).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::utils::CachePadded;

/// Slot granularity: payloads start 16-byte aligned, as vector copies want.
const SLOT_ALIGN: usize = 16;

pub(crate) struct Ring {
    slots: usize,
    slot_bytes: usize,
    data: Box<[UnsafeCell<u128>]>,
    head: CachePadded<AtomicU64>,
    tail: CachePadded<AtomicU64>,
}

// SAFETY: slots are handed over between exactly one producer and one consumer
// through the head/tail protocol; a slot is written only while it is between
// head + slots and tail (producer side) and read only between head and tail.
unsafe impl Sync for Ring {}
unsafe impl Send for Ring {}

impl Ring {
    /// A ring of `slots` slots of at least `slot_bytes` bytes each.
    pub(crate) fn new(slots: usize, slot_bytes: usize) -> Self {
        let slot_bytes = slot_bytes.max(1).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
        let words = slots * slot_bytes / SLOT_ALIGN;
        let data = (0..words).map(|_| UnsafeCell::new(0u128)).collect();
        Self { slots, slot_bytes, data, head: CachePadded::new(AtomicU64::new(0)), tail: CachePadded::new(AtomicU64::new(0)) }
    }

    /// Whether this ring can carry `slots` slots of `slot_bytes` bytes.
    pub(crate) fn fits(&self, slots: usize, slot_bytes: usize) -> bool {
        self.slots == slots && self.slot_bytes >= slot_bytes
    }

    /// Consumer position.
    pub(crate) fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Producer position.
    pub(crate) fn tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// Slots the producer may still fill, given its own unpublished tail.
    pub(crate) fn free(&self, local_tail: u64) -> usize {
        self.slots - (local_tail - self.head()) as usize
    }

    /// Slots the consumer may read, given its own unreleased head.
    pub(crate) fn available(&self, local_head: u64) -> usize {
        (self.tail() - local_head) as usize
    }

    fn slot_ptr(&self, pos: u64) -> *mut u8 {
        let index = (pos % self.slots as u64) as usize;
        // SAFETY: index < slots, so the offset stays inside `data`.
        unsafe { UnsafeCell::raw_get(self.data.as_ptr()).cast::<u8>().add(index * self.slot_bytes) }
    }

    /// The slot at `pos`, for writing.
    ///
    /// # Safety
    /// Only the ring's single producer may call this, for a `pos` in
    /// `[tail, head + slots)` (checked with [`Ring::free`]) not yet published.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slot_mut(&self, pos: u64, len: usize) -> &mut [u8] {
        debug_assert!(len <= self.slot_bytes);
        std::slice::from_raw_parts_mut(self.slot_ptr(pos), len)
    }

    /// The slot at `pos`, for reading.
    ///
    /// # Safety
    /// Only the ring's single consumer may call this, for a `pos` in `[head, tail)`
    /// (checked with [`Ring::available`]) not yet released.
    pub(crate) unsafe fn slot(&self, pos: u64, len: usize) -> &[u8] {
        debug_assert!(len <= self.slot_bytes);
        std::slice::from_raw_parts(self.slot_ptr(pos), len)
    }

    /// Make every slot before `tail` visible to the consumer.
    pub(crate) fn publish(&self, tail: u64) {
        self.tail.store(tail, Ordering::Release);
    }

    /// Hand every slot before `head` back to the producer.
    pub(crate) fn release(&self, head: u64) {
        self.head.store(head, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn producer_and_consumer_threads_see_every_slot_in_order() {
        let ring = Arc::new(Ring::new(4, 8));
        let n = 10_000u64;
        let prod = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                let mut tail = ring.tail();
                for v in 0..n {
                    while ring.free(tail) == 0 {
                        std::thread::yield_now();
                    }
                    unsafe { ring.slot_mut(tail, 8) }.copy_from_slice(&v.to_le_bytes());
                    tail += 1;
                    ring.publish(tail);
                }
            })
        };
        let mut head = ring.head();
        for v in 0..n {
            while ring.available(head) == 0 {
                std::thread::yield_now();
            }
            let got = u64::from_le_bytes(unsafe { ring.slot(head, 8) }.try_into().unwrap());
            assert_eq!(got, v);
            head += 1;
            ring.release(head);
        }
        prod.join().unwrap();
        assert!(ring.fits(4, 16) && !ring.fits(4, 17) && !ring.fits(5, 8));
    }
}
