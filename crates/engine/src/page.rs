//! Pages, their identities and the kernel's page checksum.

use serde::{Deserialize, Serialize};

/// The page size samepage works with (x86_64 base pages).
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as a `u64`, for address arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// One address space (the kernel's `mm_struct`): a simulated process, or a live region group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MmId(pub u32);

/// A security domain: pages of address spaces in different domains are never compared or
/// merged (KSM pages are per domain; the shared zero page is everyone's). Every address space
/// starts in domain 0 (`DomainId::default()`); see [`Ksm::set_domain`](crate::Ksm::set_domain).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct DomainId(pub u32);

/// The identity of a physical page (the kernel's PFN), as the backend names it.
///
/// Two mappings share memory exactly when they map the same `FrameId`. Backends never reuse an
/// id while the engine may still hold it, so a stale id can be recognised (the kernel's
/// "keyhole reference" check in `ksm_get_folio`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrameId(pub u64);

/// The kernel's `calc_checksum` on 64-bit: `xxhash(addr, PAGE_SIZE, 0)` stored in a `u32`,
/// i.e. the low 32 bits of XXH64 with seed 0. samepage keeps the full 64 bits ([`page_hash`])
/// as its index key and uses the low half where the kernel's checksum is observable.
pub fn calc_checksum(page: &[u8]) -> u32 {
    page_hash(page) as u32
}

/// XXH64, seed 0, over the page: the full hash the checksum is cut from.
pub fn page_hash(page: &[u8]) -> u64 {
    // Load one byte of every cache line first: the loads go out to memory together, where
    // XXH64's serial loop would wait on each miss in turn (see `xxh64_cold_1gib` in
    // BENCHMARKS.md).
    let mut touch = 0u8;
    for b in page.iter().step_by(64) {
        touch |= *b;
    }
    std::hint::black_box(touch);
    // A zero-filled page hashes to a known value: checking for zeros runs at memory speed and
    // leaves other pages at their first non-zero 64 bytes, where XXH64 costs ~0.3 µs a page.
    if page.len() == PAGE_SIZE && is_zero_page(page) {
        return zero_page_hash();
    }
    xxhash_rust::xxh64::xxh64(page, 0)
}

/// XXH64 of a zero-filled page; its low 32 bits are the kernel's `zero_checksum`.
pub fn zero_page_hash() -> u64 {
    static ZERO_HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO_HASH.get_or_init(|| xxhash_rust::xxh64::xxh64(&[0u8; PAGE_SIZE], 0))
}

/// True if every byte of `bytes` is zero, for a slice of any length (the empty slice
/// included).
///
/// Whole 64-byte chunks are tested eight words at a time and the test stops at the first
/// chunk that holds a non-zero byte, so a zero-filled page is checked at memory speed and most
/// other pages after their first cache line; the bytes after the last whole chunk are tested
/// one by one.
///
/// ```
/// use samepage_engine::{is_zero_page, PAGE_SIZE};
/// let mut page = [0u8; PAGE_SIZE];
/// assert!(is_zero_page(&page));
/// page[PAGE_SIZE - 1] = 1;
/// assert!(!is_zero_page(&page));
/// assert!(!is_zero_page(&[1u8; 10]));
/// assert!(is_zero_page(&[]));
/// ```
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let (whole, tail) = bytes.split_at(bytes.len() / 64 * 64);
    whole.chunks_exact(64).all(|c| {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        acc == 0
    }) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_low_half_of_xxh64_seed_0() {
        let mut p = [0u8; PAGE_SIZE];
        p[17] = 0xcf;
        let full = xxhash_rust::xxh64::xxh64(&p, 0);
        assert_eq!(calc_checksum(&p), (full & 0xffff_ffff) as u32);
        assert_ne!(calc_checksum(&p), zero_page_hash() as u32);
    }

    #[test]
    fn zero_shortcut_gives_the_real_xxh64() {
        let zero = [0u8; PAGE_SIZE];
        assert_eq!(page_hash(&zero), xxhash_rust::xxh64::xxh64(&zero, 0));
        assert_eq!(
            calc_checksum(&zero),
            xxhash_rust::xxh64::xxh64(&zero, 0) as u32
        );
        let mut last = [0u8; PAGE_SIZE];
        last[PAGE_SIZE - 1] = 1;
        assert_eq!(page_hash(&last), xxhash_rust::xxh64::xxh64(&last, 0));
    }

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
        p[PAGE_SIZE - 1] = 0;
        p[0] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn zero_detection_for_every_length() {
        for len in [
            0usize, 1, 7, 8, 63, 64, 65, 127, 128, 4095, 4096, 4097, 8192,
        ] {
            let zeros = vec![0u8; len];
            assert!(is_zero_page(&zeros), "{len} zero bytes");
            // One non-zero byte anywhere makes it non-zero: first, last, in the tail after the
            // last whole 64-byte chunk, and inside a chunk.
            for at in [0, len / 2, len.saturating_sub(1), len / 64 * 64] {
                if at >= len {
                    continue;
                }
                let mut v = zeros.clone();
                v[at] = 0x80;
                assert!(!is_zero_page(&v), "len {len}, byte {at} set");
            }
        }
        assert!(!is_zero_page(&[1u8; 10]));
    }
}
