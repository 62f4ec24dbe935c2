//! The deterministic, resumable, shardable sampler: one permutation per epoch drawn from
//! (seed, epoch) with a PRNG written here, so the order is the same on every platform and version.

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele et al. 2014): tiny, well-mixed, and fully specified by its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = self.next_u64() as u128 * n as u128;
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A permutation of `0..n` from `(seed, stream)`: Fisher-Yates driven by SplitMix64.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    // Mix the stream in through one SplitMix step so (seed, epoch) pairs do not collide trivially.
    let mut rng = SplitMix64::new(seed ^ SplitMix64::new(stream).next_u64());
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Where the loader stands: the next record to read is `position` in this rank's order of `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: usize,
}

/// Which records a rank reads, in which order, for each epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSampler {
    pub len: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub rank: usize,
    pub world: usize,
    /// Cut each epoch to a multiple of `world` so all ranks read as many records.
    pub even_shards: bool,
}

impl EpochSampler {
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        Self { len, seed, shuffle, rank: 0, world: 1, even_shards: true }
    }

    pub fn sharded(mut self, rank: usize, world: usize) -> Self {
        assert!(world >= 1 && rank < world, "rank {rank} out of world {world}");
        self.rank = rank;
        self.world = world;
        self
    }

    /// The full epoch order before sharding.
    pub fn global_order(&self, epoch: u64) -> Vec<usize> {
        if self.shuffle {
            permutation(self.len, self.seed, epoch)
        } else {
            (0..self.len).collect()
        }
    }

    /// This rank's records of `epoch`, in order: every `world`-th of the global order, from `rank`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut global = self.global_order(epoch);
        if self.even_shards {
            global.truncate(self.len / self.world * self.world);
        }
        global.into_iter().skip(self.rank).step_by(self.world).collect()
    }

    /// Records this rank reads per epoch.
    pub fn epoch_len(&self) -> usize {
        let n = if self.even_shards { self.len / self.world * self.world } else { self.len };
        n / self.world + usize::from(self.rank < n % self.world)
    }

    /// Where this rank's `local` cursor stands in the epoch's global order: the next record it
    /// would read. The run's cursor is the smallest of these over all ranks: every record before
    /// it has been read, so it does not depend on the world size.
    pub fn global_cursor(&self, local: DataCursor) -> DataCursor {
        DataCursor { epoch: local.epoch, position: local.position * self.world + self.rank }
    }

    /// This rank's cursor for a run-wide cursor (see [`EpochSampler::global_cursor`]): the first of
    /// its records at or after `global`. A run resumed at another world size thus reads every
    /// record after the cursor once (when the ranks stopped together, as they do unless bad
    /// records were skipped unevenly).
    pub fn local_cursor(&self, global: DataCursor) -> DataCursor {
        DataCursor { epoch: global.epoch, position: (global.position + self.world - 1 - self.rank) / self.world }
    }

    /// Record indices from `cursor` to the end of its epoch.
    pub fn remaining(&self, cursor: DataCursor) -> Vec<usize> {
        let order = self.epoch_order(cursor.epoch);
        order[cursor.position.min(order.len())..].to_vec()
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn cursors_carry_over_between_world_sizes() {
        let s = |rank, world| EpochSampler::new(20, 3, true).sharded(rank, world);
        // Four ranks that each read 3 records have read global positions 0..12.
        let global = (0..4).map(|r| s(r, 4).global_cursor(DataCursor { epoch: 1, position: 3 })).min_by_key(|c| c.position).unwrap();
        assert_eq!(global, DataCursor { epoch: 1, position: 12 });
        // On two ranks each starts at 6: together they read global positions 12.. next.
        for r in 0..2 {
            let local = s(r, 2).local_cursor(global);
            assert_eq!(local.position, 6);
            let next = s(r, 2).remaining(local)[0];
            assert_eq!(next, s(0, 1).global_order(1)[12 + r]);
        }
        // One rank: the cursor is its own position.
        assert_eq!(s(0, 1).local_cursor(global), global);
        assert_eq!(s(0, 1).global_cursor(global), global);
        // Ranks out of step: rank 2 of 3 is one record behind, so its next record is the cursor.
        let behind = (0..3).map(|r| s(r, 3).global_cursor(DataCursor { epoch: 0, position: if r == 2 { 1 } else { 2 } })).min_by_key(|c| c.position).unwrap();
        assert_eq!(behind.position, 5);
        assert_eq!(s(2, 3).local_cursor(behind).position, 1);
    }
}
