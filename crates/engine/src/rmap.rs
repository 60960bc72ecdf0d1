//! rmap items, densely: the kernel's `struct ksm_rmap_item` is 64 bytes (mm, address, list and
//! tree links, checksum, age); here one page's item is 13 bytes in a chunk of 64 neighbouring
//! pages of one address space, whose position gives the address and the mm. One `link` field
//! serves as the unstable tree's bucket chain or the stable node's `hlist`: an item is in at
//! most one of them.
//!
//! The unstable tree is a hash index on the item's checksum (chained through `link`); candidates
//! are confirmed by comparing the pages, as the kernel's tree walk does with `memcmp`.

use crate::page::{MmId, PAGE_SIZE_U64};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// No item (end of a chain).
pub(crate) const NIL: u32 = u32::MAX;

const CHUNK_SHIFT: u32 = 6;
const CHUNK_PAGES: usize = 1 << CHUNK_SHIFT;
const CHUNK_SPAN: u64 = CHUNK_PAGES as u64 * PAGE_SIZE_U64;

/// Largest age kept: `should_skip_rmap_item` treats every age from 9 up alike.
const AGE_MAX: u8 = 15;

/// Where an rmap item is (the kernel keeps this in the low bits of `rmap_item->address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ItemState {
    /// Not in a tree (volatile, or just visited).
    Volatile,
    /// In the unstable tree of NUMA root `nid`, built in the pass whose `seqnr & 0xff` is
    /// `seqnr`.
    Unstable { nid: u32, seqnr: u8 },
    /// Mapped to the KSM page of stable node `node`.
    Stable { node: u32 },
}

impl ItemState {
    // Two tag bits; an unstable item keeps seqnr in 8 bits and its NUMA root in 22, a stable
    // one its node in 30.
    fn encode(self) -> u32 {
        match self {
            ItemState::Volatile => 0,
            ItemState::Unstable { nid, seqnr } => {
                debug_assert!(nid < 1 << 22, "NUMA node id fits in 22 bits");
                1 | (seqnr as u32) << 2 | nid << 10
            }
            ItemState::Stable { node } => {
                debug_assert!(node < 1 << 30, "stable node index fits in 30 bits");
                2 | node << 2
            }
        }
    }

    fn decode(v: u32) -> Self {
        match v & 3 {
            0 => ItemState::Volatile,
            1 => ItemState::Unstable {
                seqnr: (v >> 2) as u8,
                nid: v >> 10,
            },
            _ => ItemState::Stable { node: v >> 2 },
        }
    }
}

/// The items of 64 neighbouring pages of one mm.
#[derive(Clone, Debug)]
struct Chunk {
    mm: MmId,
    base: u64,
    present: u64,
    /// `oldchecksum`.
    checksum: [u32; CHUNK_PAGES],
    state: [u32; CHUNK_PAGES],
    link: [u32; CHUNK_PAGES],
    /// `age` in the low nibble (saturating at [`AGE_MAX`]), `remaining_skips` in the high one.
    age_skips: [u8; CHUNK_PAGES],
}

/// Bytes per item when a chunk is full: the `sizeof(struct ksm_rmap_item)` of the profit
/// formulas (64 in the kernel), rounded up.
pub const RMAP_ITEM_BYTES: usize = std::mem::size_of::<Chunk>().div_ceil(CHUNK_PAGES);

/// Every rmap item. An item's id is its chunk's index times 64 plus its slot.
#[derive(Clone, Debug, Default)]
pub(crate) struct Items {
    chunks: Vec<Chunk>,
    free_chunks: Vec<u32>,
    /// Each mm's chunks by base address: the kernel's per-mm `rmap_list`, sorted.
    by_mm: FxHashMap<MmId, BTreeMap<u64, u32>>,
    /// The chunk of the last lookup: the scan visits neighbouring pages in a row.
    hint: Option<(MmId, u64, u32)>,
    len: usize,
}

fn split(it: u32) -> (usize, usize) {
    (
        (it >> CHUNK_SHIFT) as usize,
        it as usize & (CHUNK_PAGES - 1),
    )
}

impl Items {
    pub fn len(&self) -> usize {
        self.len
    }

    fn chunk_of(&mut self, mm: MmId, base: u64) -> Option<u32> {
        if let Some((hmm, hbase, c)) = self.hint {
            if hmm == mm && hbase == base {
                return Some(c);
            }
        }
        let c = *self.by_mm.get(&mm)?.get(&base)?;
        self.hint = Some((mm, base, c));
        Some(c)
    }

    /// The item for `(mm, addr)`, made (volatile, checksum 0, age 0) if there is none; the
    /// flag says whether it was made.
    pub fn get_or_insert(&mut self, mm: MmId, addr: u64) -> (u32, bool) {
        let base = addr & !(CHUNK_SPAN - 1);
        let slot = ((addr - base) / PAGE_SIZE_U64) as usize;
        let c = match self.chunk_of(mm, base) {
            Some(c) => c,
            None => {
                let chunk = Chunk {
                    mm,
                    base,
                    present: 0,
                    checksum: [0; CHUNK_PAGES],
                    state: [0; CHUNK_PAGES],
                    link: [NIL; CHUNK_PAGES],
                    age_skips: [0; CHUNK_PAGES],
                };
                let c = match self.free_chunks.pop() {
                    Some(c) => {
                        self.chunks[c as usize] = chunk;
                        c
                    }
                    None => {
                        self.chunks.push(chunk);
                        u32::try_from(self.chunks.len() - 1)
                            .ok()
                            .filter(|&c| c < 1 << (32 - CHUNK_SHIFT))
                            .expect("fewer than 2^26 rmap chunks")
                    }
                };
                self.by_mm.entry(mm).or_default().insert(base, c);
                self.hint = Some((mm, base, c));
                c
            }
        };
        let it = c << CHUNK_SHIFT | slot as u32;
        let ch = &mut self.chunks[c as usize];
        if ch.present & 1 << slot != 0 {
            return (it, false);
        }
        ch.present |= 1 << slot;
        ch.checksum[slot] = 0;
        ch.state[slot] = 0;
        ch.link[slot] = NIL;
        ch.age_skips[slot] = 0;
        self.len += 1;
        (it, true)
    }

    /// The item for `(mm, addr)`, if there is one.
    pub fn find(&mut self, mm: MmId, addr: u64) -> Option<u32> {
        let base = addr & !(CHUNK_SPAN - 1);
        let slot = ((addr - base) / PAGE_SIZE_U64) as usize;
        let c = self.chunk_of(mm, base)?;
        (self.chunks[c as usize].present & 1 << slot != 0).then_some(c << CHUNK_SHIFT | slot as u32)
    }

    /// Free a volatile item.
    pub fn remove(&mut self, it: u32) {
        let (c, s) = split(it);
        let ch = &mut self.chunks[c];
        debug_assert!(ch.present & 1 << s != 0, "item {it} in use");
        debug_assert_eq!(ch.state[s], 0, "only volatile items are freed");
        ch.present &= !(1 << s);
        self.len -= 1;
        if ch.present == 0 {
            let (mm, base) = (ch.mm, ch.base);
            if let Some(m) = self.by_mm.get_mut(&mm) {
                m.remove(&base);
                if m.is_empty() {
                    self.by_mm.remove(&mm);
                }
            }
            if self.hint.is_some_and(|(_, _, h)| h as usize == c) {
                self.hint = None;
            }
            self.free_chunks.push(c as u32);
        }
    }

    /// Give back the memory of free chunks at the end of the chunk list (ids stay valid: only
    /// chunks after the last one in use go). Called between passes, as the kernel's slab
    /// would shrink.
    pub fn trim(&mut self) {
        if self.free_chunks.len() * 4 < self.chunks.len() {
            return;
        }
        // Descending: the trailing chunks come first, and `pop` reuses the lowest index,
        // which keeps the tail free for the next trim.
        self.free_chunks.sort_unstable_by(|a, b| b.cmp(a));
        let mut k = 0;
        while k < self.free_chunks.len() && self.free_chunks[k] as usize + 1 == self.chunks.len() {
            self.chunks.pop();
            k += 1;
        }
        self.free_chunks.drain(..k);
        if self.chunks.capacity() > 2 * self.chunks.len() {
            self.chunks.shrink_to_fit();
            self.free_chunks.shrink_to_fit();
        }
    }

    /// The items of `mm` at addresses in `[from, to)`, in address order.
    pub fn ids_in(&mut self, mm: MmId, from: u64, to: u64) -> Vec<u32> {
        let mut out = Vec::new();
        if from >= to {
            return out;
        }
        let base = from & !(CHUNK_SPAN - 1);
        if to - 1 < base + CHUNK_SPAN {
            // Within one chunk (the scan stepping over a few pages): no tree walk.
            let Some(c) = self.chunk_of(mm, base) else {
                return out;
            };
            let (lo, hi) = (
                (from - base) / PAGE_SIZE_U64,
                (to - base).div_ceil(PAGE_SIZE_U64),
            );
            let span = if hi - lo >= 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let mut bits = self.chunks[c as usize].present & span;
            while bits != 0 {
                out.push(c << CHUNK_SHIFT | bits.trailing_zeros());
                bits &= bits - 1;
            }
            return out;
        }
        let Some(m) = self.by_mm.get(&mm) else {
            return out;
        };
        for (_, &c) in m.range(from & !(CHUNK_SPAN - 1)..to) {
            let ch = &self.chunks[c as usize];
            let mut bits = ch.present;
            while bits != 0 {
                let s = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let a = ch.base + s * PAGE_SIZE_U64;
                if a >= from && a < to {
                    out.push(c << CHUNK_SHIFT | s as u32);
                }
            }
        }
        out
    }

    /// Whether `mm` has any item.
    pub fn has_items(&self, mm: MmId) -> bool {
        self.by_mm.contains_key(&mm)
    }

    /// Every item id.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        // Free chunks have no present bit.
        self.chunks.iter().enumerate().flat_map(|(c, ch)| {
            (0..CHUNK_PAGES)
                .filter(move |s| ch.present & 1 << s != 0)
                .map(move |s| (c as u32) << CHUNK_SHIFT | s as u32)
        })
    }

    pub fn mm(&self, it: u32) -> MmId {
        self.chunks[split(it).0].mm
    }

    pub fn address(&self, it: u32) -> u64 {
        let (c, s) = split(it);
        self.chunks[c].base + s as u64 * PAGE_SIZE_U64
    }

    pub fn checksum(&self, it: u32) -> u32 {
        let (c, s) = split(it);
        self.chunks[c].checksum[s]
    }

    pub fn set_checksum(&mut self, it: u32, v: u32) {
        let (c, s) = split(it);
        self.chunks[c].checksum[s] = v;
    }

    pub fn state(&self, it: u32) -> ItemState {
        let (c, s) = split(it);
        ItemState::decode(self.chunks[c].state[s])
    }

    pub fn set_state(&mut self, it: u32, st: ItemState) {
        let (c, s) = split(it);
        self.chunks[c].state[s] = st.encode();
    }

    pub fn link(&self, it: u32) -> u32 {
        let (c, s) = split(it);
        self.chunks[c].link[s]
    }

    pub fn set_link(&mut self, it: u32, next: u32) {
        let (c, s) = split(it);
        self.chunks[c].link[s] = next;
    }

    pub fn age(&self, it: u32) -> u8 {
        let (c, s) = split(it);
        self.chunks[c].age_skips[s] & 0xf
    }

    pub fn remaining_skips(&self, it: u32) -> u8 {
        let (c, s) = split(it);
        self.chunks[c].age_skips[s] >> 4
    }

    pub fn set_age_skips(&mut self, it: u32, age: u8, skips: u8) {
        debug_assert!(skips <= 0xf);
        let (c, s) = split(it);
        self.chunks[c].age_skips[s] = age.min(AGE_MAX) | skips << 4;
    }

    /// Heap bytes held: the chunks (free ones included), and an estimate for the per-mm maps
    /// (a B-tree leaf holds up to 11 entries of 12 bytes plus 32 bytes of header).
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.by_mm.values().map(BTreeMap::len).sum();
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.free_chunks.capacity() * 4
            + entries.div_ceil(6) * (11 * 12 + 32)
            + self.by_mm.capacity() * (std::mem::size_of::<(MmId, BTreeMap<u64, u32>)>() + 1)
    }
}

/// The unstable tree: items by `(checksum, nid)`, chained through their `link`.
#[derive(Clone, Debug)]
pub(crate) struct UnstableIndex {
    heads: Vec<u32>,
    len: usize,
}

impl Default for UnstableIndex {
    fn default() -> Self {
        Self {
            heads: vec![NIL; 64],
            len: 0,
        }
    }
}

fn bucket_hash(checksum: u32, nid: u32) -> u64 {
    // Fibonacci hashing: the checksum is already uniform, the multiply folds the nid in.
    ((checksum as u64) << 32 | nid as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl UnstableIndex {
    fn bucket(&self, checksum: u32, nid: u32) -> usize {
        let bits = self.heads.len().trailing_zeros();
        (bucket_hash(checksum, nid) >> (64 - bits)) as usize
    }

    /// An empty tree, sized for as many items as this one held.
    pub fn clear(&mut self) {
        if self.len == 0 {
            return; // every chain is empty already
        }
        let want = (self.len / 4).next_power_of_two().max(64);
        self.heads.clear();
        self.heads.shrink_to(want);
        self.heads.resize(want, NIL);
        self.len = 0;
    }

    /// The first item that may hold `checksum` under `nid`; follow [`Items::link`].
    pub fn head(&self, checksum: u32, nid: u32) -> u32 {
        self.heads[self.bucket(checksum, nid)]
    }

    pub fn insert(&mut self, items: &mut Items, it: u32, nid: u32) {
        if self.len >= self.heads.len() * 4 {
            self.grow(items);
        }
        let b = self.bucket(items.checksum(it), nid);
        items.set_link(it, self.heads[b]);
        self.heads[b] = it;
        self.len += 1;
    }

    /// Unlink `it` (an unstable item of this pass, under `nid`).
    pub fn remove(&mut self, items: &mut Items, it: u32, nid: u32) {
        let b = self.bucket(items.checksum(it), nid);
        let next = items.link(it);
        if self.heads[b] == it {
            self.heads[b] = next;
        } else {
            let mut p = self.heads[b];
            while p != NIL && items.link(p) != it {
                p = items.link(p);
            }
            debug_assert!(p != NIL, "unstable item {it} is in its bucket");
            if p == NIL {
                return;
            }
            items.set_link(p, next);
        }
        items.set_link(it, NIL);
        self.len -= 1;
    }

    /// Mark every item in the index as an unstable item of the pass whose `seqnr & 0xff` is
    /// `seqnr` (an older pass: the caller clears the index next).
    pub fn retag_all(&mut self, items: &mut Items, seqnr: u8) {
        for &head in &self.heads {
            let mut it = head;
            while it != NIL {
                let ItemState::Unstable { nid, .. } = items.state(it) else {
                    unreachable!("only unstable items are chained in the index")
                };
                items.set_state(it, ItemState::Unstable { nid, seqnr });
                it = items.link(it);
            }
        }
    }

    fn grow(&mut self, items: &mut Items) {
        let doubled = vec![NIL; self.heads.len() * 2];
        let old = std::mem::replace(&mut self.heads, doubled);
        for mut it in old {
            while it != NIL {
                let next = items.link(it);
                let ItemState::Unstable { nid, .. } = items.state(it) else {
                    unreachable!("only unstable items are chained in the index")
                };
                let b = self.bucket(items.checksum(it), nid);
                items.set_link(it, self.heads[b]);
                self.heads[b] = it;
                it = next;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn heap_bytes(&self) -> usize {
        self.heads.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_is_13_bytes_and_rounds_to_14() {
        assert_eq!(std::mem::size_of::<Chunk>(), 856);
        assert_eq!(RMAP_ITEM_BYTES, 14);
    }

    #[test]
    fn state_round_trips() {
        for st in [
            ItemState::Volatile,
            ItemState::Unstable { nid: 0, seqnr: 0 },
            ItemState::Unstable {
                nid: (1 << 22) - 1,
                seqnr: 255,
            },
            ItemState::Stable { node: 0 },
            ItemState::Stable {
                node: (1 << 30) - 1,
            },
        ] {
            assert_eq!(ItemState::decode(st.encode()), st);
        }
    }

    #[test]
    fn items_by_address_and_freeing() {
        let mut items = Items::default();
        let mm = MmId(1);
        let a = 0x7000_0000_0000u64;
        let (i0, new0) = items.get_or_insert(mm, a);
        let (i1, _) = items.get_or_insert(mm, a + 65 * PAGE_SIZE_U64);
        let (again, new_again) = items.get_or_insert(mm, a);
        assert!(new0 && !new_again && again == i0);
        assert_eq!(items.address(i1), a + 65 * PAGE_SIZE_U64);
        assert_eq!(items.mm(i1), mm);
        assert_eq!(items.ids_in(mm, a, a + 66 * PAGE_SIZE_U64), vec![i0, i1]);
        assert_eq!(
            items.ids_in(mm, a + PAGE_SIZE_U64, a + 65 * PAGE_SIZE_U64),
            vec![]
        );
        items.set_age_skips(i0, 200, 8);
        assert_eq!((items.age(i0), items.remaining_skips(i0)), (AGE_MAX, 8));
        items.remove(i0);
        items.remove(i1);
        assert_eq!(items.len(), 0);
        assert!(!items.has_items(mm));
        assert_eq!(items.iter().count(), 0);
        // A freed chunk is reused, and its items start fresh.
        let (i2, new2) = items.get_or_insert(MmId(2), a);
        assert!(new2);
        assert_eq!((items.age(i2), items.checksum(i2)), (0, 0));
        assert_eq!(items.iter().collect::<Vec<_>>(), vec![i2]);
    }

    #[test]
    fn ids_within_one_chunk() {
        let mut items = Items::default();
        let mm = MmId(3);
        let a = 0x1000_0000u64;
        let ids: Vec<u32> = [3u64, 5, 9, 63]
            .iter()
            .map(|&s| items.get_or_insert(mm, a + s * PAGE_SIZE_U64).0)
            .collect();
        let p = PAGE_SIZE_U64;
        assert_eq!(items.ids_in(mm, a + 4 * p, a + 9 * p), vec![ids[1]]);
        assert_eq!(
            items.ids_in(mm, a + 4 * p, a + 10 * p),
            vec![ids[1], ids[2]]
        );
        assert_eq!(items.ids_in(mm, a, a + 64 * p), ids);
        assert_eq!(items.ids_in(mm, a + 10 * p, a + 63 * p), vec![]);
        assert_eq!(items.ids_in(MmId(4), a, a + 64 * p), vec![]);
    }

    #[test]
    fn trim_gives_back_trailing_free_chunks() {
        let mut items = Items::default();
        let ids: Vec<u32> = (0..10u64)
            .map(|c| items.get_or_insert(MmId(1), c * CHUNK_SPAN).0)
            .collect();
        for &it in &ids[3..] {
            items.remove(it);
        }
        items.remove(ids[1]);
        items.trim();
        assert_eq!(items.chunks.len(), 3);
        assert_eq!(items.free_chunks, vec![1]);
        // The hole is reused first.
        let (it, _) = items.get_or_insert(MmId(1), 99 * CHUNK_SPAN);
        assert_eq!(split(it).0, 1);
        assert_eq!(items.address(ids[2]), 2 * CHUNK_SPAN);
    }

    #[test]
    fn unstable_index_chains_and_grows() {
        let mut items = Items::default();
        let mut idx = UnstableIndex::default();
        let mm = MmId(1);
        let ids: Vec<u32> = (0..1000u64)
            .map(|i| {
                let (it, _) = items.get_or_insert(mm, i * PAGE_SIZE_U64);
                items.set_checksum(it, (i % 300) as u32);
                items.set_state(it, ItemState::Unstable { nid: 0, seqnr: 0 });
                idx.insert(&mut items, it, 0);
                it
            })
            .collect();
        assert!(idx.heads.len() >= 256, "grew: {}", idx.heads.len());
        let find = |items: &Items, idx: &UnstableIndex, sum: u32| {
            let mut v = Vec::new();
            let mut t = idx.head(sum, 0);
            while t != NIL {
                if items.checksum(t) == sum {
                    v.push(t);
                }
                t = items.link(t);
            }
            v.sort();
            v
        };
        assert_eq!(
            find(&items, &idx, 7),
            vec![ids[7], ids[307], ids[607], ids[907]]
        );
        idx.remove(&mut items, ids[307], 0);
        assert_eq!(find(&items, &idx, 7), vec![ids[7], ids[607], ids[907]]);
        idx.clear();
        assert_eq!(find(&items, &idx, 7), vec![]);
    }
}
