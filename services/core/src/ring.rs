//! Consistent-hash ring over shard ids, shared by web (to route a key to its
//! comet) and comets (to know which keys they own).
//!
//! Ring members are shard ids, not addresses: a failover changes a shard's
//! address but moves no key. Each shard is placed at `vnodes` points; a key
//! belongs to the first point at or after its hash, wrapping around.

use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per shard: at 16 shards the busiest holds ~1.1x the mean.
pub const DEFAULT_VNODES: u32 = 160;

/// An immutable ring; build a new one when membership changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

/// Hash of a key's position on the ring; stable across processes and releases.
pub fn key_hash(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

fn point_hash(shard: u32, vnode: u32) -> u64 {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&shard.to_be_bytes());
    buf[4..].copy_from_slice(&vnode.to_be_bytes());
    xxh3_64(&buf)
}

impl Ring {
    /// Builds a ring from the shards present now.
    pub fn new(shards: impl IntoIterator<Item = u32>, vnodes: u32) -> Self {
        let mut points: Vec<(u64, u32)> = shards
            .into_iter()
            .flat_map(|s| (0..vnodes).map(move |v| (point_hash(s, v), s)))
            .collect();
        // Sorting by (hash, shard) makes ties deterministic on every node.
        points.sort_unstable();
        points.dedup();
        Self { points }
    }

    /// A ring of shards `0..count`, every one present (static membership).
    pub fn with_shard_count(count: u32) -> Self {
        Self::new(0..count, DEFAULT_VNODES)
    }

    /// The shard that owns `key`, or `None` when the ring is empty.
    pub fn shard_for(&self, key: &str) -> Option<u32> {
        if self.points.is_empty() {
            return None;
        }
        let h = key_hash(key);
        let i = self.points.partition_point(|&(p, _)| p < h);
        let (_, shard) = self.points[i % self.points.len()];
        Some(shard)
    }

    /// True when no shard is present.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn empty_ring_owns_nothing() {
        assert_eq!(Ring::new([], 10).shard_for("a"), None);
    }

    #[test]
    fn lookups_are_stable() {
        let a = Ring::with_shard_count(8);
        let b = Ring::new((0..8).rev(), DEFAULT_VNODES);
        for k in keys(1000) {
            assert_eq!(a.shard_for(&k), b.shard_for(&k));
        }
    }

    #[test]
    fn load_is_even_at_16_shards() {
        let ring = Ring::with_shard_count(16);
        let n = 200_000;
        let mut load: HashMap<u32, usize> = HashMap::new();
        for k in keys(n) {
            *load.entry(ring.shard_for(&k).unwrap()).or_default() += 1;
        }
        assert_eq!(load.len(), 16);
        let mean = n as f64 / 16.0;
        let max = *load.values().max().unwrap() as f64;
        let min = *load.values().min().unwrap() as f64;
        eprintln!(
            "16 shards: max/mean {:.3}, min/mean {:.3}",
            max / mean,
            min / mean
        );
        assert!(max / mean < 1.25, "max/mean {}", max / mean);
        assert!(min / mean > 0.75, "min/mean {}", min / mean);
    }

    #[test]
    fn adding_a_shard_moves_about_one_in_n_plus_one() {
        let n = 100_000;
        for shards in [4u32, 8, 16] {
            let before = Ring::with_shard_count(shards);
            let after = Ring::with_shard_count(shards + 1);
            let mut moved = 0;
            for k in keys(n) {
                let (a, b) = (before.shard_for(&k).unwrap(), after.shard_for(&k).unwrap());
                if a != b {
                    // A key only ever moves to the new shard.
                    assert_eq!(b, shards);
                    moved += 1;
                }
            }
            let frac = moved as f64 / n as f64;
            let ideal = 1.0 / (shards as f64 + 1.0);
            eprintln!(
                "{shards}->{}: moved {frac:.4}, ideal {ideal:.4}",
                shards + 1
            );
            assert!(
                (frac - ideal).abs() < ideal * 0.3,
                "moved {frac}, ideal {ideal}"
            );
        }
    }

    #[test]
    fn a_missing_shard_only_moves_its_own_keys() {
        let full = Ring::with_shard_count(4);
        let without_2 = Ring::new([0, 1, 3], DEFAULT_VNODES);
        for k in keys(10_000) {
            let a = full.shard_for(&k).unwrap();
            let b = without_2.shard_for(&k).unwrap();
            if a != 2 {
                assert_eq!(a, b);
            } else {
                assert_ne!(b, 2);
            }
        }
    }
}
