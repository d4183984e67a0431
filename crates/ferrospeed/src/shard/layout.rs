//! Pure shard arithmetic: `(numel, world_size, rank, align) → (offset, len)`.
//!
//! A flat buffer of `numel` elements is padded to `padded_numel = shard_len × world_size`, where
//! `shard_len` is the smallest multiple of `align` with `shard_len × world_size ≥ numel`. Rank `r` owns
//! the padded range `[r·shard_len, (r+1)·shard_len)`; of it, only the part below `numel` holds real
//! elements. With `align = 1` this is also how the collectives split a buffer that does not divide
//! evenly: the first ranks get `ceil(numel / world_size)` elements, the last ones fewer, possibly none.

use std::ops::Range;

/// How a flat buffer of `numel` elements is split over `world_size` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    numel: usize,
    world_size: usize,
    shard_len: usize,
}

/// One rank's part of a [`ShardLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Offset of the shard in the padded flat buffer.
    pub offset: usize,
    /// Number of real (non-padding) elements in the shard.
    pub len: usize,
    /// Length of the shard including padding; the same on every rank.
    pub padded_len: usize,
}

impl ShardLayout {
    /// The layout of `numel` elements over `world_size` ranks with shards a multiple of `align`.
    ///
    /// `world_size` and `align` of 0 are treated as 1: they are programming errors, not user input.
    pub fn new(numel: usize, world_size: usize, align: usize) -> Self {
        debug_assert!(world_size > 0 && align > 0, "world_size and align must be positive");
        let world_size = world_size.max(1);
        let align = align.max(1);
        let per_rank = numel.div_ceil(world_size);
        let shard_len = per_rank.div_ceil(align) * align;
        Self { numel, world_size, shard_len }
    }

    /// Number of real elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Per-rank shard length including padding.
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Total length including padding: `shard_len × world_size`.
    pub fn padded_numel(&self) -> usize {
        self.shard_len * self.world_size
    }

    /// The shard of `rank`.
    pub fn shard(&self, rank: usize) -> Shard {
        let offset = rank * self.shard_len;
        let len = self.numel.saturating_sub(offset).min(self.shard_len);
        Shard { offset, len, padded_len: self.shard_len }
    }

    /// `rank`'s shard with its padding, as a range of the padded buffer.
    pub fn padded_range(&self, rank: usize) -> Range<usize> {
        let s = self.shard(rank);
        s.offset..s.offset + s.padded_len
    }

    /// The real elements of `rank` as a range into the unpadded buffer.
    pub fn range(&self, rank: usize) -> Range<usize> {
        let s = self.shard(rank);
        let start = s.offset.min(self.numel);
        start..start + s.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_exactly_once() {
        for numel in [0, 1, 2, 3, 7, 64, 100, 1001] {
            for world in 1..=7 {
                for align in [1, 2, 4, 64] {
                    let l = ShardLayout::new(numel, world, align);
                    assert_eq!(l.shard_len() % align, 0);
                    assert!(l.padded_numel() >= numel);
                    assert!(l.padded_numel() - numel < world * align, "{numel} {world} {align}");
                    let mut next = 0;
                    for r in 0..world {
                        let range = l.range(r);
                        assert_eq!(range.start, next, "contiguous at rank {r}");
                        next = range.end;
                        assert!(l.shard(r).len <= l.shard(r).padded_len);
                    }
                    assert_eq!(next, numel);
                }
            }
        }
    }

    #[test]
    fn known_layouts() {
        // (numel, world, align, rank) → (offset, len, padded_len)
        let cases = [
            ((10, 4, 1, 0), (0, 3, 3)),
            ((10, 4, 1, 3), (9, 1, 3)),
            ((3, 5, 1, 2), (2, 1, 1)),
            ((3, 5, 1, 4), (4, 0, 1)),
            ((100, 3, 8, 2), (80, 20, 40)),
            ((0, 2, 4, 1), (0, 0, 0)),
        ];
        for ((numel, world, align, rank), (offset, len, padded_len)) in cases {
            let s = ShardLayout::new(numel, world, align).shard(rank);
            assert_eq!(s, Shard { offset, len, padded_len }, "{numel} {world} {align} {rank}");
        }
    }

    #[test]
    fn fewer_elements_than_ranks_leaves_trailing_ranks_empty() {
        let l = ShardLayout::new(3, 5, 1);
        let lens: Vec<usize> = (0..5).map(|r| l.range(r).len()).collect();
        assert_eq!(lens, vec![1, 1, 1, 0, 0]);
        assert_eq!(l.range(4), 3..3);
    }
}
