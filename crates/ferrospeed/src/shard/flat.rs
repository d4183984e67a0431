//! FlatParam: where each parameter of a block lives inside the block's one contiguous buffer.

use super::layout::ShardLayout;
use super::param::ParamSpec;
use std::ops::Range;

/// Alignment of shards, in elements: keeps shard boundaries on cache lines and SIMD widths.
pub const SHARD_ALIGN: usize = 64;

/// The layout of one block's parameters in a flat buffer padded to split evenly over the world.
#[derive(Debug, Clone)]
pub struct FlatParam {
    specs: Vec<ParamSpec>,
    offsets: Vec<usize>,
    layout: ShardLayout,
}

impl FlatParam {
    /// Parameters in declaration order, back to back, padded for `world_size` ranks.
    pub fn new(specs: &[ParamSpec], world_size: usize) -> Self {
        let mut offsets = Vec::with_capacity(specs.len());
        let mut numel = 0;
        for s in specs {
            offsets.push(numel);
            numel += s.numel();
        }
        Self { specs: specs.to_vec(), offsets, layout: ShardLayout::new(numel, world_size, SHARD_ALIGN) }
    }

    /// The block's parameters, in declaration (and buffer) order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Range of parameter `i` in the flat buffer.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.specs[i].numel()
    }

    /// The shard layout of the padded buffer.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// Real elements (without padding).
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Buffer length including padding.
    pub fn padded_numel(&self) -> usize {
        self.layout.padded_numel()
    }

    /// The parts of the parameters that fall inside `window` of the flat buffer, as
    /// `(parameter index, range in the flat buffer)`, in order.
    pub fn params_in(&self, window: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        (0..self.specs.len()).filter_map(move |i| {
            let r = self.range(i);
            let start = r.start.max(window.start);
            let end = r.end.min(window.end);
            (start < end).then_some((i, start..end))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Init;

    #[test]
    fn params_are_packed_and_windows_clip_them() {
        let specs = vec![
            ParamSpec::new("w", &[10, 10], Init::Zeros, true),
            ParamSpec::new("b", &[10], Init::Zeros, false),
        ];
        let flat = FlatParam::new(&specs, 3);
        assert_eq!(flat.range(0), 0..100);
        assert_eq!(flat.range(1), 100..110);
        assert_eq!(flat.numel(), 110);
        assert_eq!(flat.padded_numel() % (3 * SHARD_ALIGN), 0);
        let parts: Vec<_> = flat.params_in(64..128).collect();
        assert_eq!(parts, vec![(0, 64..100), (1, 100..110)]);
        assert_eq!(flat.params_in(110..192).count(), 0, "padding holds no parameter");
    }
}
