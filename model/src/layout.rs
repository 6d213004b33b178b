//! How a layer stack is cut into contiguous shards.

use std::ops::Range;

/// Split `layers` into `shards` contiguous ranges as evenly as possible: the first
/// `layers % shards` ranges get one extra layer. Never changes the shard count; the caller
/// must reject `shards == 0` or `shards > layers` (returns None then).
pub fn layer_ranges(layers: usize, shards: usize) -> Option<Vec<Range<usize>>> {
    if shards == 0 || shards > layers {
        return None;
    }
    let (base, extra) = (layers / shards, layers % shards);
    let mut start = 0;
    Some(
        (0..shards)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let range = start..start + len;
                start += len;
                range
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::layer_ranges;

    #[test]
    fn spreads_remainder_over_the_first_shards() {
        assert_eq!(layer_ranges(10, 3).unwrap(), vec![0..4, 4..7, 7..10]);
        assert_eq!(layer_ranges(24, 2).unwrap(), vec![0..12, 12..24]);
        assert_eq!(layer_ranges(5, 5).unwrap().len(), 5);
    }

    #[test]
    fn rejects_impossible_counts() {
        assert!(layer_ranges(4, 0).is_none());
        assert!(layer_ranges(4, 5).is_none());
    }
}
