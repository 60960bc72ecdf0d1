//! rmap items, densely: the kernel's `struct ksm_rmap_item` is 64 bytes (mm, address, list and
//! tree links, checksum, age); here one page's item is 9 bytes in a chunk of 256 neighbouring
//! pages of one address space, whose position gives the address and the mm.
//!
//! A chunk stores only the items of the pages it tracks, in address order, ranked by its
//! `present` bitmap: an item's id stays (chunk, slot) while its storage moves. Memory that is
//! mostly zero pages placed by KSM (which lose their rmap item, as in the kernel) costs only
//! the bitmap for its untracked pages.
//!
//! What an item holds depends on its state, as the kernel's fields do:
//!
//! - volatile: `oldchecksum`;
//! - unstable: `oldchecksum` and the link of the unstable tree's bucket chain;
//! - stable: its stable node (`rmap_item->head`) and the link of the node's `hlist`. The
//!   checksum is its node's (the low half of the content's hash, which is what the page held
//!   when it merged); the few items whose checksum was not (a page found already a KSM page,
//!   after a fork) keep theirs on the side, so that it is back when the item leaves the node.
//!
//! The unstable tree is a hash index on the item's checksum (chained through `link`), one per
//! NUMA root; candidates are confirmed by comparing the pages, as the kernel's tree walk does
//! with `memcmp`.

use crate::heap::hash_map_bytes;
use crate::page::{MmId, PAGE_SIZE_U64};
use rustc_hash::FxHashMap;

/// No item (end of a chain).
pub(crate) const NIL: u32 = u32::MAX;

const CHUNK_SHIFT: u32 = 8;
const CHUNK_PAGES: usize = 1 << CHUNK_SHIFT;
/// Words of a chunk's `present` bitmap.
const WORDS: usize = CHUNK_PAGES / 64;
const CHUNK_SPAN: u64 = CHUNK_PAGES as u64 * PAGE_SIZE_U64;

/// Largest age kept: `should_skip_rmap_item` treats every age from 9 up alike.
const AGE_MAX: u8 = 9;

/// Stable node ids fit in 30 bits: a stable item's `word` keeps where its checksum is in the
/// top two.
const NODE_BITS: u32 = 30;
const NODE_MASK: u32 = (1 << NODE_BITS) - 1;
/// A stable item's checksum is its node's.
const SUM_NODE: u32 = 0;
/// A stable item's checksum is 0 (a fresh item attached to a KSM page it found mapped).
const SUM_ZERO: u32 = 1;
/// A stable item's checksum is in [`Items::stable_sums`].
const SUM_SIDE: u32 = 2;

/// Where an rmap item is (the kernel keeps this in the low bits of `rmap_item->address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ItemState {
    /// Not in a tree (volatile, or just visited).
    Volatile,
    /// In the unstable tree built in a pass whose `seqnr` is odd (`odd`) or even. An unstable
    /// item is at most one pass old (every pass visits or frees it), so the parity says
    /// whether it is in this pass's tree; its NUMA root is the tree it is in.
    Unstable { odd: bool },
    /// Mapped to the KSM page of stable node `node`.
    Stable { node: u32 },
}

// `meta`: the state's tag in the low two bits, age and remaining skips in the six above.
const TAG_VOLATILE: u8 = 0;
const TAG_UNSTABLE_EVEN: u8 = 1;
const TAG_UNSTABLE_ODD: u8 = 2;
const TAG_STABLE: u8 = 3;

/// Age and `remaining_skips` in six bits: skips are set only from age 4 on (up to 8), and ages
/// from 9 up are one, so the pairs that occur number 4 + 6 × 9 = 58.
#[inline]
fn age_code(age: u8, skips: u8) -> u8 {
    debug_assert!(age <= AGE_MAX && skips <= 8);
    if age < 4 {
        debug_assert_eq!(skips, 0, "no skips before age 4");
        age
    } else {
        4 + (age - 4) * 9 + skips
    }
}

#[inline]
fn age_decode(code: u8) -> (u8, u8) {
    if code < 4 {
        (code, 0)
    } else {
        (4 + (code - 4) / 9, (code - 4) % 9)
    }
}

/// One page's rmap item: 9 bytes, unaligned.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed)]
struct Item {
    /// Volatile or unstable: `oldchecksum`. Stable: the node in the low 30 bits, where the
    /// checksum is (`SUM_*`) in the top two.
    word: u32,
    /// Unstable: the next item of the bucket chain. Stable: the next item on the node's
    /// `hlist`. [`NIL`] otherwise.
    link: u32,
    /// The state's tag (`TAG_*`) in bits 0–1; [`age_code`] of `age` and `remaining_skips` in
    /// bits 2–7.
    meta: u8,
}

const FRESH: Item = Item {
    word: 0,
    link: NIL,
    meta: TAG_VOLATILE,
};

/// The items of up to 256 neighbouring pages of one mm.
#[derive(Clone, Debug)]
struct Chunk {
    /// The present items, in address order (the `k`-th set bit of `present` is `items[k]`).
    items: Vec<Item>,
    /// Address of the chunk's first page.
    base: u64,
    /// Which pages have an item.
    present: [u64; WORDS],
    /// The address space.
    mm: MmId,
    /// Set bits of `present` in the words before each word (the rank's prefix).
    before: [u8; WORDS],
}

/// Bytes per item when a chunk is full: the `sizeof(struct ksm_rmap_item)` of the profit
/// formulas (64 in the kernel), rounded up.
pub const RMAP_ITEM_BYTES: usize = (std::mem::size_of::<Chunk>()
    + CHUNK_PAGES * std::mem::size_of::<Item>())
.div_ceil(CHUNK_PAGES);

impl Chunk {
    fn empty(mm: MmId, base: u64) -> Self {
        Chunk {
            items: Vec::new(),
            base,
            present: [0; WORDS],
            mm,
            before: [0; WORDS],
        }
    }

    #[inline]
    fn has(&self, s: usize) -> bool {
        self.present[s >> 6] & 1 << (s & 63) != 0
    }

    /// Index in `items` of slot `s` (present or where it would go).
    #[inline]
    fn rank(&self, s: usize) -> usize {
        if self.items.len() == CHUNK_PAGES {
            return s; // a full chunk (most are, where pages are not zero): no counting
        }
        let w = s >> 6;
        self.before[w] as usize + (self.present[w] & ((1u64 << (s & 63)) - 1)).count_ones() as usize
    }

    fn insert(&mut self, s: usize) {
        let r = self.rank(s);
        if self.items.len() == self.items.capacity() {
            // Double (a chunk fills in address order during the first pass), but never past
            // a full chunk: a full chunk holds no spare room, and `Items::trim` takes back
            // that of the others between passes.
            let n = self.items.len();
            self.items.reserve_exact(n.max(8).min(CHUNK_PAGES - n));
        }
        self.items.insert(r, FRESH);
        self.present[s >> 6] |= 1 << (s & 63);
        for b in &mut self.before[(s >> 6) + 1..] {
            *b += 1;
        }
    }

    /// Take out the items of `slots` (ascending), moving the others once.
    fn remove(&mut self, slots: impl Iterator<Item = usize>) {
        // The ranks going, as a bitmap, from `present` as it was.
        let (mut going, mut gone) = ([0u64; WORDS], [0u64; WORDS]);
        for s in slots {
            debug_assert!(self.has(s));
            let r = self.rank(s);
            going[r >> 6] |= 1 << (r & 63);
            gone[s >> 6] |= 1 << (s & 63);
        }
        for (p, g) in self.present.iter_mut().zip(gone) {
            *p &= !g;
        }
        let mut r = 0;
        self.items.retain(|_| {
            let keep = going[r >> 6] & 1 << (r & 63) == 0;
            r += 1;
            keep
        });
        let mut n = 0;
        for w in 0..WORDS {
            self.before[w] = n as u8;
            n += self.present[w].count_ones();
        }
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Slots in `[lo, hi)` that have an item, in order.
    fn slots_in(&self, lo: usize, hi: usize, out: &mut Vec<usize>) {
        for w in lo >> 6..hi.div_ceil(64) {
            let mut bits = self.present[w];
            let first = w * 64;
            if lo > first {
                bits &= !0u64 << (lo - first);
            }
            if hi < first + 64 {
                bits &= (1u64 << (hi - first)) - 1;
            }
            while bits != 0 {
                out.push(first + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }
}

/// Every rmap item. An item's id is its chunk's index times 256 plus its slot.
#[derive(Clone, Debug, Default)]
pub(crate) struct Items {
    /// Every chunk, by index (free ones have no items).
    chunks: Vec<Chunk>,
    /// Indexes of the free chunks, reused first.
    free_chunks: Vec<u32>,
    /// Each mm's chunks by base address, sorted: the kernel's per-mm `rmap_list`.
    by_mm: FxHashMap<MmId, Vec<(u64, u32)>>,
    /// The chunk of the last lookup: the scan visits neighbouring pages in a row.
    hint: Option<(MmId, u64, u32)>,
    /// Checksums of the stable items whose checksum is neither their node's nor 0.
    stable_sums: FxHashMap<u32, u32>,
    /// The last item changed and its index in its chunk's `items`: the scan reads and
    /// changes one page's item several times in a row. (Item 0 is at index 0 if it exists,
    /// so the default is right too.)
    last: (u32, u32),
    len: usize,
}

#[inline]
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

    #[inline]
    fn chunk_of(&mut self, mm: MmId, base: u64) -> Option<u32> {
        if let Some((hmm, hbase, c)) = self.hint {
            if hmm == mm && hbase == base {
                return Some(c);
            }
        }
        let v = self.by_mm.get(&mm)?;
        let c = v[v.binary_search_by_key(&base, |e| e.0).ok()?].1;
        self.hint = Some((mm, base, c));
        Some(c)
    }

    #[inline]
    fn item(&self, it: u32) -> &Item {
        let (c, s) = split(it);
        let ch = &self.chunks[c];
        debug_assert!(ch.has(s), "item {it} in use");
        let r = if self.last.0 == it {
            self.last.1 as usize
        } else {
            ch.rank(s)
        };
        &ch.items[r]
    }

    #[inline]
    fn item_mut(&mut self, it: u32) -> &mut Item {
        let (c, s) = split(it);
        let ch = &mut self.chunks[c];
        debug_assert!(ch.has(s), "item {it} in use");
        let r = if self.last.0 == it {
            self.last.1 as usize
        } else {
            let r = ch.rank(s);
            self.last = (it, r as u32);
            r
        };
        &mut ch.items[r]
    }

    /// The item for `(mm, addr)`, made (volatile, checksum 0, age 0) if there is none; the
    /// flag says whether it was made.
    pub fn get_or_insert(&mut self, mm: MmId, addr: u64) -> (u32, bool) {
        let base = addr & !(CHUNK_SPAN - 1);
        let slot = ((addr - base) / PAGE_SIZE_U64) as usize;
        let c = match self.chunk_of(mm, base) {
            Some(c) => c,
            None => {
                let chunk = Chunk::empty(mm, base);
                let c = match self.free_chunks.pop() {
                    Some(c) => {
                        self.chunks[c as usize] = chunk;
                        c
                    }
                    None => {
                        self.chunks.push(chunk);
                        // The last chunk's last slot would be NIL.
                        u32::try_from(self.chunks.len() - 1)
                            .ok()
                            .filter(|&c| c < (1 << (32 - CHUNK_SHIFT)) - 1)
                            .expect("fewer than 2^24 - 1 rmap chunks")
                    }
                };
                let v = self.by_mm.entry(mm).or_default();
                let at = v.partition_point(|e| e.0 < base);
                v.insert(at, (base, c));
                self.hint = Some((mm, base, c));
                c
            }
        };
        let it = c << CHUNK_SHIFT | slot as u32;
        let ch = &mut self.chunks[c as usize];
        if ch.has(slot) {
            return (it, false);
        }
        ch.insert(slot);
        self.last = (it, ch.rank(slot) as u32);
        self.len += 1;
        (it, true)
    }

    /// The item for `(mm, addr)`, if there is one.
    pub fn find(&mut self, mm: MmId, addr: u64) -> Option<u32> {
        let base = addr & !(CHUNK_SPAN - 1);
        let slot = ((addr - base) / PAGE_SIZE_U64) as usize;
        let c = self.chunk_of(mm, base)?;
        self.chunks[c as usize]
            .has(slot)
            .then_some(c << CHUNK_SHIFT | slot as u32)
    }

    /// Free a volatile item.
    #[cfg(test)]
    pub fn remove(&mut self, it: u32) {
        self.remove_many(&[it]);
    }

    /// Free volatile items, in address order (as [`Items::ids_in`] lists them): each chunk's
    /// storage moves once, however many of its items go (a pass frees whole runs of pages
    /// that became zero pages).
    pub fn remove_many(&mut self, ids: &[u32]) {
        for &it in ids {
            debug_assert_eq!(
                self.state(it),
                ItemState::Volatile,
                "only volatile items are freed"
            );
        }
        let mut emptied: Vec<(MmId, u64)> = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let c = split(ids[i]).0;
            let n = ids[i..].iter().take_while(|&&it| split(it).0 == c).count();
            if let Some(e) = self.remove_from_chunk(c, &ids[i..i + n]) {
                emptied.push(e);
            }
            i += n;
        }
        // Emptied chunks leave their mm's list in one sweep per mm: one at a time, an exit
        // of an mm with many chunks would shift the list once per chunk.
        emptied.sort_unstable();
        let mut i = 0;
        while i < emptied.len() {
            let mm = emptied[i].0;
            let n = emptied[i..].iter().take_while(|e| e.0 == mm).count();
            let gone = &emptied[i..i + n];
            if let Some(v) = self.by_mm.get_mut(&mm) {
                if let [(_, base)] = gone {
                    if let Ok(k) = v.binary_search_by_key(base, |e| e.0) {
                        v.remove(k);
                    }
                } else {
                    v.retain(|e| gone.binary_search(&(mm, e.0)).is_err());
                }
                if v.is_empty() {
                    self.by_mm.remove(&mm);
                } else if v.capacity() > 2 * v.len() {
                    v.shrink_to(v.len() + v.len() / 4);
                }
            }
            i += n;
        }
    }

    /// Free `ids` of chunk `c`; the chunk's mm and base if that emptied it (its entry in
    /// the mm's list is the caller's to remove).
    fn remove_from_chunk(&mut self, c: usize, ids: &[u32]) -> Option<(MmId, u64)> {
        let ch = &mut self.chunks[c];
        ch.remove(ids.iter().map(|&it| split(it).1));
        self.last = (0, 0);
        self.len -= ids.len();
        if !ch.is_empty() {
            return None;
        }
        let (mm, base) = (ch.mm, ch.base);
        ch.items = Vec::new();
        if self.hint.is_some_and(|(_, _, h)| h as usize == c) {
            self.hint = None;
        }
        self.free_chunks.push(c as u32);
        Some((mm, base))
    }

    /// Give back memory the items no longer need: free chunks at the end of the chunk list
    /// (ids stay valid: only chunks after the last one in use go), and the spare room of
    /// chunks that stopped growing. Called between passes, as the kernel's slab would shrink.
    pub fn trim(&mut self) {
        for ch in &mut self.chunks {
            if ch.items.capacity() > ch.items.len() {
                ch.items.shrink_to_fit();
            }
        }
        if self.stable_sums.capacity() > 2 * self.stable_sums.len().max(4) {
            self.stable_sums.shrink_to_fit();
        }
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
        let mut slots = Vec::new();
        let mut collect = |c: u32, ch: &Chunk| {
            let lo = from.saturating_sub(ch.base).div_ceil(PAGE_SIZE_U64);
            let hi = ((to - ch.base.min(to)).div_ceil(PAGE_SIZE_U64)).min(CHUNK_PAGES as u64);
            slots.clear();
            ch.slots_in(lo.min(CHUNK_PAGES as u64) as usize, hi as usize, &mut slots);
            out.extend(slots.iter().map(|&s| c << CHUNK_SHIFT | s as u32));
        };
        let base = from & !(CHUNK_SPAN - 1);
        if to - 1 < base + CHUNK_SPAN {
            // Within one chunk (the scan stepping over a few pages): no search of the list.
            if let Some(c) = self.chunk_of(mm, base) {
                collect(c, &self.chunks[c as usize]);
            }
            return out;
        }
        let Some(v) = self.by_mm.get(&mm) else {
            return out;
        };
        let first = v.partition_point(|e| e.0 < base);
        for &(b, c) in &v[first..] {
            if b >= to {
                break;
            }
            collect(c, &self.chunks[c as usize]);
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
            let mut slots = Vec::new();
            ch.slots_in(0, CHUNK_PAGES, &mut slots);
            slots
                .into_iter()
                .map(move |s| (c as u32) << CHUNK_SHIFT | s as u32)
        })
    }

    #[inline]
    pub fn mm(&self, it: u32) -> MmId {
        self.chunks[split(it).0].mm
    }

    #[inline]
    pub fn address(&self, it: u32) -> u64 {
        let (c, s) = split(it);
        self.chunks[c].base + s as u64 * PAGE_SIZE_U64
    }

    /// `oldchecksum` of a volatile or unstable item (a stable item's is its node's, see
    /// [`Items::unset_stable`]).
    #[inline]
    pub fn checksum(&self, it: u32) -> u32 {
        let item = self.item(it);
        debug_assert!(
            item.meta & 3 != TAG_STABLE,
            "stable item {it} has no checksum of its own"
        );
        item.word
    }

    #[inline]
    pub fn set_checksum(&mut self, it: u32, v: u32) {
        let item = self.item_mut(it);
        debug_assert!(item.meta & 3 != TAG_STABLE);
        item.word = v;
    }

    #[inline]
    pub fn state(&self, it: u32) -> ItemState {
        let item = self.item(it);
        match item.meta & 3 {
            TAG_VOLATILE => ItemState::Volatile,
            TAG_UNSTABLE_EVEN => ItemState::Unstable { odd: false },
            TAG_UNSTABLE_ODD => ItemState::Unstable { odd: true },
            _ => ItemState::Stable {
                node: item.word & NODE_MASK,
            },
        }
    }

    /// Make a volatile item unstable, or an unstable one volatile (which clears its link) or
    /// unstable of another pass (stable items come and go by [`Items::set_stable`] and
    /// [`Items::unset_stable`]).
    #[inline]
    pub fn set_state(&mut self, it: u32, st: ItemState) {
        let item = self.item_mut(it);
        debug_assert!(
            item.meta & 3 != TAG_STABLE,
            "item {it} leaves its node by unset_stable"
        );
        let tag = match st {
            ItemState::Volatile => {
                item.link = NIL;
                TAG_VOLATILE
            }
            ItemState::Unstable { odd: false } => TAG_UNSTABLE_EVEN,
            ItemState::Unstable { odd: true } => TAG_UNSTABLE_ODD,
            ItemState::Stable { .. } => unreachable!("items become stable by set_stable"),
        };
        item.meta = item.meta & !3 | tag;
    }

    /// Make the volatile item `it` an item of stable node `node`, whose checksum (the low
    /// half of its content's hash) is `node_sum`. The caller links it into the node's
    /// `hlist`.
    pub fn set_stable(&mut self, it: u32, node: u32, node_sum: u32) {
        debug_assert!(node <= NODE_MASK, "stable node index fits in 30 bits");
        let item = self.item_mut(it);
        debug_assert_eq!(item.meta & 3, TAG_VOLATILE);
        let sum = item.word;
        let kind = match sum {
            s if s == node_sum => SUM_NODE,
            0 => SUM_ZERO,
            _ => SUM_SIDE,
        };
        item.word = kind << NODE_BITS | node;
        item.meta = item.meta & !3 | TAG_STABLE;
        if kind == SUM_SIDE {
            self.stable_sums.insert(it, sum);
        }
    }

    /// Make the stable item `it` volatile again, with the checksum it had (`node_sum` is its
    /// node's); its link is cleared (the caller unlinked it from the node).
    pub fn unset_stable(&mut self, it: u32, node_sum: u32) {
        let item = self.item_mut(it);
        debug_assert_eq!(item.meta & 3, TAG_STABLE);
        let kind = item.word >> NODE_BITS;
        item.word = match kind {
            SUM_NODE => node_sum,
            SUM_ZERO => 0,
            _ => 0, // filled in below
        };
        item.link = NIL;
        item.meta &= !3;
        if kind == SUM_SIDE {
            let sum = self
                .stable_sums
                .remove(&it)
                .expect("a stable item's own checksum is kept aside");
            self.item_mut(it).word = sum;
        }
    }

    #[inline]
    pub fn link(&self, it: u32) -> u32 {
        self.item(it).link
    }

    #[inline]
    pub fn set_link(&mut self, it: u32, next: u32) {
        self.item_mut(it).link = next;
    }

    /// `age` and `remaining_skips`.
    #[cfg(test)]
    fn age_skips(&self, it: u32) -> (u8, u8) {
        age_decode(self.item(it).meta >> 2)
    }

    #[cfg(test)]
    fn set_age_skips(&mut self, it: u32, age: u8, skips: u8) {
        self.update_age_skips(it, |_, _| (age, skips));
    }

    /// Replace `age` and `remaining_skips` by what `f` makes of them (the age saturates at
    /// 9, which smart scan treats as any older age).
    #[inline]
    pub fn update_age_skips(&mut self, it: u32, f: impl FnOnce(u8, u8) -> (u8, u8)) {
        let item = self.item_mut(it);
        let (age, skips) = age_decode(item.meta >> 2);
        let (age, skips) = f(age, skips);
        item.meta = item.meta & 3 | age_code(age.min(AGE_MAX), skips) << 2;
    }

    /// Heap bytes held: the chunks (free ones included) and their items, the per-mm lists,
    /// and the stable items' checksums kept aside (every container at its capacity).
    pub fn heap_bytes(&self) -> usize {
        let items: usize = self.chunks.iter().map(|c| c.items.capacity()).sum();
        let lists: usize = self.by_mm.values().map(Vec::capacity).sum();
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + items * std::mem::size_of::<Item>()
            + self.free_chunks.capacity() * 4
            + lists * std::mem::size_of::<(u64, u32)>()
            + hash_map_bytes(&self.by_mm)
            + hash_map_bytes(&self.stable_sums)
    }
}

/// The unstable tree: items by checksum, chained through their `link`, one tree per NUMA root
/// (`root_unstable_tree[nid]`; only root 0 with `merge_across_nodes=1`).
///
/// The index grows (doubles) when its items number four times its `size`, and is cleared to
/// a size of a quarter of the items it held: the growths of a pass, which reverse the chains,
/// depend on the items of all roots together, so the items of one checksum and root keep the
/// order one index of every item keeps them in (newest first, reversed by each growth), and
/// the scan meets them in that order. Every root has `2 × size` buckets: chains of two items
/// at most on average, which a search walks item by item.
#[derive(Clone, Debug)]
pub(crate) struct UnstableIndex {
    /// `(nid, bucket heads)` of every root that had an item since the last clear.
    roots: Vec<(u32, Vec<u32>)>,
    /// The size the growth rule counts (a power of two).
    size: usize,
    /// Items in all the roots.
    len: usize,
}

const MIN_SIZE: usize = 64;

impl Default for UnstableIndex {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            size: MIN_SIZE,
            len: 0,
        }
    }
}

#[inline]
fn bucket(checksum: u32, size: usize) -> usize {
    let buckets = 2 * size;
    // Fibonacci hashing: the checksum is already uniform.
    ((checksum as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - buckets.trailing_zeros()))
        as usize
}

impl UnstableIndex {
    fn root(&self, nid: u32) -> Option<&Vec<u32>> {
        self.roots.iter().find(|r| r.0 == nid).map(|r| &r.1)
    }

    /// An empty tree, sized for as many items as this one held.
    pub fn clear(&mut self) {
        if self.len == 0 {
            return; // every chain is empty already
        }
        self.size = (self.len / 4).next_power_of_two().max(MIN_SIZE);
        for (_, heads) in &mut self.roots {
            heads.clear();
            heads.shrink_to(2 * self.size);
            heads.resize(2 * self.size, NIL);
        }
        self.len = 0;
    }

    /// An empty tree of the least size, with no root (every item is gone: run=2).
    pub fn reset(&mut self) {
        debug_assert_eq!(self.len, 0, "only an empty tree is reset");
        *self = Self::default();
    }

    /// The first item that may hold `checksum` in the tree of `nid`; follow [`Items::link`].
    #[inline]
    pub fn head(&self, checksum: u32, nid: u32) -> u32 {
        self.root(nid)
            .map_or(NIL, |h| h[bucket(checksum, self.size)])
    }

    pub fn insert(&mut self, items: &mut Items, it: u32, nid: u32) {
        if self.len >= self.size * 4 {
            self.grow(items);
        }
        let k = match self.roots.iter().position(|r| r.0 == nid) {
            Some(k) => k,
            None => {
                self.roots.push((nid, vec![NIL; 2 * self.size]));
                self.roots.len() - 1
            }
        };
        let heads = &mut self.roots[k].1;
        let b = bucket(items.checksum(it), self.size);
        items.set_link(it, heads[b]);
        heads[b] = it;
        self.len += 1;
    }

    /// Unlink `it` (an unstable item of this pass) from whichever tree holds it.
    pub fn remove(&mut self, items: &mut Items, it: u32) {
        let b = bucket(items.checksum(it), self.size);
        let next = items.link(it);
        for (_, heads) in &mut self.roots {
            if heads[b] == it {
                heads[b] = next;
            } else {
                let mut p = heads[b];
                while p != NIL && items.link(p) != it {
                    p = items.link(p);
                }
                if p == NIL {
                    continue; // another root's
                }
                items.set_link(p, next);
            }
            items.set_link(it, NIL);
            self.len -= 1;
            return;
        }
        debug_assert!(false, "unstable item {it} is in its bucket");
    }

    /// Mark every item in the index as an unstable item of a pass of parity `odd` (an older
    /// pass: the caller clears the index next).
    pub fn retag_all(&mut self, items: &mut Items, odd: bool) {
        for (_, heads) in &self.roots {
            for &head in heads {
                let mut it = head;
                while it != NIL {
                    debug_assert!(matches!(items.state(it), ItemState::Unstable { .. }));
                    items.set_state(it, ItemState::Unstable { odd });
                    it = items.link(it);
                }
            }
        }
    }

    fn grow(&mut self, items: &mut Items) {
        let size = self.size * 2;
        for (_, heads) in &mut self.roots {
            let old = std::mem::replace(heads, vec![NIL; 2 * size]);
            for mut it in old {
                while it != NIL {
                    let next = items.link(it);
                    let b = bucket(items.checksum(it), size);
                    items.set_link(it, heads[b]);
                    heads[b] = it;
                    it = next;
                }
            }
        }
        self.size = size;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn heap_bytes(&self) -> usize {
        self.roots.capacity() * std::mem::size_of::<(u32, Vec<u32>)>()
            + self.roots.iter().map(|r| r.1.capacity() * 4).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_is_9_bytes_and_a_full_chunk_rounds_to_10() {
        assert_eq!(std::mem::size_of::<Item>(), 9);
        assert_eq!(std::mem::size_of::<Chunk>(), 72);
        assert_eq!(RMAP_ITEM_BYTES, 10);
    }

    #[test]
    fn freeing_many_chunks_at_once_keeps_the_others() {
        let mut items = Items::default();
        let (a, b) = (MmId(1), MmId(2));
        let span = CHUNK_PAGES as u64 * PAGE_SIZE_U64;
        // One item in each of 1000 chunks of a, and of b.
        for i in 0..1000u64 {
            items.get_or_insert(a, i * span);
            items.get_or_insert(b, i * span);
        }
        // Free a's items of every other chunk, and all of b's, in one call each.
        let mut gone: Vec<u32> = (0..1000u64)
            .step_by(2)
            .filter_map(|i| items.find(a, i * span))
            .collect();
        gone.sort_unstable_by_key(|&it| split(it));
        items.remove_many(&gone);
        let all_b = items.ids_in(b, 0, 1000 * span);
        items.remove_many(&all_b);
        assert_eq!(items.len(), 500);
        for i in 0..1000u64 {
            assert_eq!(
                items.find(a, i * span).is_some(),
                i % 2 == 1,
                "chunk {i} of a"
            );
            assert!(items.find(b, i * span).is_none());
        }
        assert_eq!(items.ids_in(a, 0, 1000 * span).len(), 500);
        assert!(
            !items.by_mm.contains_key(&b),
            "an mm without chunks leaves the map"
        );
        // Freed chunks are used again, and found again.
        let (it, new) = items.get_or_insert(b, 7 * span);
        assert!(new);
        assert_eq!(items.find(b, 7 * span), Some(it));
    }

    #[test]
    fn age_and_skips_round_trip() {
        for age in 0..=AGE_MAX {
            for skips in 0..=8 {
                if age < 4 && skips > 0 {
                    continue;
                }
                let c = age_code(age, skips);
                assert!(c < 64);
                assert_eq!(age_decode(c), (age, skips));
            }
        }
    }

    #[test]
    fn states_and_stable_checksums() {
        let mut items = Items::default();
        let mm = MmId(1);
        let ids: Vec<u32> = (0..3u64)
            .map(|i| items.get_or_insert(mm, i * PAGE_SIZE_U64).0)
            .collect();
        items.set_age_skips(ids[0], 6, 3);
        items.set_state(ids[0], ItemState::Unstable { odd: true });
        assert_eq!(items.state(ids[0]), ItemState::Unstable { odd: true });
        assert_eq!(items.age_skips(ids[0]), (6, 3));
        items.set_state(ids[0], ItemState::Volatile);
        // The node's checksum, 0, and another: each comes back when the item leaves.
        for (&it, sum) in ids.iter().zip([7u32, 0, 9]) {
            items.set_checksum(it, sum);
            items.set_stable(it, (1 << 30) - 1, 7);
            assert_eq!(
                items.state(it),
                ItemState::Stable {
                    node: (1 << 30) - 1
                }
            );
        }
        assert_eq!(items.stable_sums.len(), 1);
        for (&it, sum) in ids.iter().zip([7u32, 0, 9]) {
            items.set_link(it, 5);
            items.unset_stable(it, 7);
            assert_eq!(items.state(it), ItemState::Volatile);
            assert_eq!((items.checksum(it), items.link(it)), (sum, NIL));
        }
        assert_eq!(items.age_skips(ids[0]), (6, 3));
        assert!(items.stable_sums.is_empty());
    }

    #[test]
    fn items_by_address_and_freeing() {
        let mut items = Items::default();
        let mm = MmId(1);
        let a = 0x7000_0000_0000u64;
        let far = 257 * PAGE_SIZE_U64;
        let (i0, new0) = items.get_or_insert(mm, a);
        let (i1, _) = items.get_or_insert(mm, a + far);
        let (again, new_again) = items.get_or_insert(mm, a);
        assert!(new0 && !new_again && again == i0);
        assert_eq!(items.address(i1), a + far);
        assert_eq!(items.mm(i1), mm);
        assert_eq!(items.ids_in(mm, a, a + far + PAGE_SIZE_U64), vec![i0, i1]);
        assert_eq!(items.ids_in(mm, a + PAGE_SIZE_U64, a + far), vec![]);
        items.set_age_skips(i0, 200, 8);
        assert_eq!(items.age_skips(i0), (AGE_MAX, 8));
        items.remove(i0);
        items.remove(i1);
        assert_eq!(items.len(), 0);
        assert!(!items.has_items(mm));
        assert_eq!(items.iter().count(), 0);
        // A freed chunk is reused, and its items start fresh.
        let (i2, new2) = items.get_or_insert(MmId(2), a);
        assert!(new2);
        assert_eq!((items.age_skips(i2).0, items.checksum(i2)), (0, 0));
        assert_eq!(items.iter().collect::<Vec<_>>(), vec![i2]);
    }

    #[test]
    fn items_keep_their_fields_while_their_neighbours_come_and_go() {
        let mut items = Items::default();
        let mm = MmId(1);
        let p = PAGE_SIZE_U64;
        // Out of address order, across the bitmap's words.
        let order = [200u64, 3, 64, 255, 0, 127, 128, 63, 65];
        let ids: Vec<u32> = order
            .iter()
            .map(|&s| {
                let it = items.get_or_insert(mm, s * p).0;
                items.set_checksum(it, s as u32 + 1000);
                it
            })
            .collect();
        for (k, &it) in ids.iter().enumerate() {
            assert_eq!(items.checksum(it), order[k] as u32 + 1000);
            assert_eq!(items.address(it), order[k] * p);
        }
        items.remove(ids[1]);
        items.remove(ids[5]);
        for (k, &it) in ids.iter().enumerate() {
            if k != 1 && k != 5 {
                assert_eq!(items.checksum(it), order[k] as u32 + 1000);
            }
        }
        let mut sorted: Vec<u64> = order.to_vec();
        sorted.retain(|&s| s != 3 && s != 127);
        sorted.sort();
        let got: Vec<u64> = items
            .ids_in(mm, 0, 256 * p)
            .iter()
            .map(|&it| items.address(it) / p)
            .collect();
        assert_eq!(got, sorted);
        items.trim();
        assert_eq!(items.chunks[0].items.capacity(), 7);
    }

    #[test]
    fn a_trimmed_chunk_grows_again_but_never_past_full() {
        let mut items = Items::default();
        let mm = MmId(1);
        for s in 0..252u64 {
            items.get_or_insert(mm, s * PAGE_SIZE_U64);
        }
        items.trim();
        assert_eq!(items.chunks[0].items.capacity(), 252);
        for s in 252..256u64 {
            let (it, made) = items.get_or_insert(mm, s * PAGE_SIZE_U64);
            assert!(made);
            items.set_checksum(it, s as u32);
        }
        assert_eq!(items.chunks[0].items.capacity(), 256);
        assert_eq!(items.checksum(255), 255);
    }

    #[test]
    fn removing_many_keeps_the_others_in_place() {
        let mut items = Items::default();
        let mm = MmId(1);
        let p = PAGE_SIZE_U64;
        // Two full chunks and a third with one item.
        for s in 0..513u64 {
            let (it, _) = items.get_or_insert(mm, s * p);
            items.set_checksum(it, s as u32);
        }
        // Every page from 100 to 400 but 200 and 300 goes, and all of the first chunk.
        let mut going = items.ids_in(mm, 100 * p, 400 * p);
        going.retain(|&it| items.address(it) != 200 * p && items.address(it) != 300 * p);
        items.remove_many(&going);
        let first = items.ids_in(mm, 0, 100 * p);
        items.remove_many(&first);
        assert_eq!(items.len(), 513 - 298 - 100);
        let left: Vec<u64> = items
            .ids_in(mm, 0, 600 * p)
            .iter()
            .map(|&it| {
                assert_eq!(items.checksum(it) as u64 * p, items.address(it));
                items.address(it) / p
            })
            .collect();
        let want: Vec<u64> = [200, 300].into_iter().chain(400..513).collect();
        assert_eq!(left, want);
        assert_eq!(items.free_chunks.len(), 0);
        let rest = items.ids_in(mm, 0, 600 * p);
        items.remove_many(&rest);
        assert_eq!((items.len(), items.free_chunks.len()), (0, 3));
        assert!(!items.has_items(mm));
    }

    #[test]
    fn items_agree_with_a_map_of_addresses() {
        // Random items over three chunks of two address spaces, freed by random ranges:
        // every item keeps its checksum, and ids_in lists what a map of addresses says.
        use std::collections::BTreeMap;
        let p = PAGE_SIZE_U64;
        let mut items = Items::default();
        let mut model: BTreeMap<(u32, u64), u32> = BTreeMap::new();
        let mut x = 99u64;
        let mut rnd = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for step in 0..20_000u32 {
            let mm = 1 + rnd(2) as u32;
            if rnd(3) > 0 {
                let a = rnd(3 * 256) * p;
                let (it, made) = items.get_or_insert(MmId(mm), a);
                assert_eq!(made, !model.contains_key(&(mm, a)));
                items.set_checksum(it, step);
                model.insert((mm, a), step);
            } else {
                let from = rnd(3 * 256) * p;
                let to = from + rnd(300) * p;
                let ids = items.ids_in(MmId(mm), from, to);
                let want: Vec<u64> = model
                    .range((mm, from)..(mm, to))
                    .map(|(&(_, a), _)| a)
                    .collect();
                let got: Vec<u64> = ids.iter().map(|&it| items.address(it)).collect();
                assert_eq!(got, want, "step {step}");
                items.remove_many(&ids);
                for a in want {
                    model.remove(&(mm, a));
                }
            }
            if step % 1000 == 0 {
                items.trim();
            }
            assert_eq!(items.len(), model.len());
        }
        for (&(mm, a), &sum) in &model {
            let it = items.find(MmId(mm), a).unwrap();
            assert_eq!(items.checksum(it), sum);
        }
    }

    #[test]
    fn ids_within_one_chunk() {
        let mut items = Items::default();
        let mm = MmId(3);
        let a = 0x1000_0000u64;
        let ids: Vec<u32> = [3u64, 5, 9, 63, 64, 200]
            .iter()
            .map(|&s| items.get_or_insert(mm, a + s * PAGE_SIZE_U64).0)
            .collect();
        let p = PAGE_SIZE_U64;
        assert_eq!(items.ids_in(mm, a + 4 * p, a + 9 * p), vec![ids[1]]);
        assert_eq!(
            items.ids_in(mm, a + 4 * p, a + 10 * p),
            vec![ids[1], ids[2]]
        );
        assert_eq!(items.ids_in(mm, a, a + 256 * p), ids);
        assert_eq!(items.ids_in(mm, a + 10 * p, a + 63 * p), vec![]);
        assert_eq!(items.ids_in(mm, a + 63 * p, a + 201 * p), ids[3..].to_vec());
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
    fn roots_keep_the_order_of_one_index() {
        // The same inserts and removals into three roots and into one: the items of a
        // checksum and root come in the same order from both (the scan merges with the
        // first identical page it meets).
        let mut items = Items::default();
        let (mut roots, mut one) = (UnstableIndex::default(), UnstableIndex::default());
        let mut one_items = Items::default();
        let mut root_of = FxHashMap::default();
        let mut x = 12345u64;
        let mut live = Vec::new();
        for i in 0..5000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (sum, nid) = ((x >> 33) as u32 % 50, (x >> 40) as u32 % 3);
            for (its, idx, nid) in [(&mut items, &mut roots, nid), (&mut one_items, &mut one, 0)] {
                let (it, _) = its.get_or_insert(MmId(1), i * PAGE_SIZE_U64);
                its.set_checksum(it, sum);
                its.set_state(it, ItemState::Unstable { odd: false });
                idx.insert(its, it, nid);
            }
            let (it, _) = items.get_or_insert(MmId(1), i * PAGE_SIZE_U64);
            root_of.insert(it, nid);
            live.push(it);
            if x >> 60 == 0 {
                let k = (x >> 20) as usize % live.len();
                let gone = live.swap_remove(k);
                roots.remove(&mut items, gone);
                one.remove(&mut one_items, gone);
            }
        }
        let chain = |its: &Items, idx: &UnstableIndex, sum: u32, nid: u32| {
            let mut v = Vec::new();
            let mut t = idx.head(sum, nid);
            while t != NIL {
                if its.checksum(t) == sum {
                    v.push(t);
                }
                t = its.link(t);
            }
            v
        };
        for sum in 0..50 {
            for nid in 0..3 {
                let all = chain(&one_items, &one, sum, 0);
                let want: Vec<u32> = all.into_iter().filter(|t| root_of[t] == nid).collect();
                assert_eq!(
                    chain(&items, &roots, sum, nid),
                    want,
                    "checksum {sum} root {nid}"
                );
            }
        }
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
                items.set_state(it, ItemState::Unstable { odd: false });
                idx.insert(&mut items, it, (i / 300 % 2) as u32);
                it
            })
            .collect();
        assert!(idx.size >= 256, "grew: {}", idx.size);
        let find = |items: &Items, idx: &UnstableIndex, sum: u32, nid: u32| {
            let mut v = Vec::new();
            let mut t = idx.head(sum, nid);
            while t != NIL {
                if items.checksum(t) == sum {
                    v.push(t);
                }
                t = items.link(t);
            }
            v.sort();
            v
        };
        // Checksum 7 went in at i = 7 and 607 (root 0), 307 and 907 (root 1).
        assert_eq!(find(&items, &idx, 7, 0), vec![ids[7], ids[607]]);
        assert_eq!(find(&items, &idx, 7, 1), vec![ids[307], ids[907]]);
        idx.remove(&mut items, ids[607]);
        idx.remove(&mut items, ids[307]);
        assert_eq!(idx.len(), 998);
        assert_eq!(find(&items, &idx, 7, 0), vec![ids[7]]);
        assert_eq!(find(&items, &idx, 7, 1), vec![ids[907]]);
        idx.retag_all(&mut items, true);
        assert_eq!(items.state(ids[7]), ItemState::Unstable { odd: true });
        idx.clear();
        assert_eq!(find(&items, &idx, 7, 1), vec![]);
        assert_eq!(idx.size, 256);
    }
}
