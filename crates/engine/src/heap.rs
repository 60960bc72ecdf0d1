//! What a container holds on the heap, for [`Ksm::metadata_bytes`](crate::Ksm::metadata_bytes).

use std::collections::HashMap;

/// Heap bytes of a hash map (hashbrown's layout): a power-of-two number of buckets, at most
/// 7/8 of them used (all but one below eight), each an entry and a control byte, plus one
/// group (16) of control bytes more.
pub(crate) fn hash_map_bytes<K, V, S>(m: &HashMap<K, V, S>) -> usize {
    let cap = m.capacity();
    if cap == 0 {
        return 0;
    }
    let buckets = if cap < 8 {
        (cap + 1).next_power_of_two()
    } else {
        (cap * 8 / 7).next_power_of_two()
    };
    buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_as_hashbrown_makes_them() {
        // The capacity hashbrown reports for 4, 8, 16, 1024 buckets.
        for (cap, buckets) in [(3, 4), (7, 8), (14, 16), (896, 1024)] {
            let m: HashMap<u32, u32> = HashMap::with_capacity(cap);
            assert_eq!(m.capacity(), cap);
            assert_eq!(hash_map_bytes(&m), buckets * 9 + 16);
        }
        assert_eq!(hash_map_bytes(&HashMap::<u32, u32>::new()), 0);
    }
}
