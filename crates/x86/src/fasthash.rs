//! A multiplicative hasher for the CPU's internal maps (blocks by guest
//! address, TLB large-page keys, chain sites). Their keys are addresses
//! the guest chooses, but a guest that forces collisions only slows its
//! own vCPU, and SipHash showed up in profiles of the boot.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

pub(crate) type BuildKeyHasher = BuildHasherDefault<KeyHasher>;
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, BuildKeyHasher>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, BuildKeyHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn nearby_keys_spread_over_buckets() {
        // Block keys differ in low address bits: both ends of the hash
        // (bucket index and control byte) must still differ.
        let b = BuildKeyHasher::default();
        let hashes: Vec<u64> = (0..4096u64)
            .map(|i| b.hash_one((0x40_1000 + 3 * i, 0xffff_ffff_8100_0000u64 + 3 * i, 64u32)))
            .collect();
        let low: FastSet<u64> = hashes.iter().map(|h| h & 0xfff).collect();
        let top: FastSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            low.len() > 2000,
            "only {} distinct low-12-bit hashes",
            low.len()
        );
        assert_eq!(top.len(), 128, "top 7 bits");
    }
}
