//! Stable nodes (`struct ksm_stable_node`) and the two ways to find one: by content (the
//! stable tree, here an index on the content's 64-bit hash) and by KSM page (the kernel's
//! `page_stable_node`, which reads `folio->mapping`).
//!
//! A node is 28 bytes; the indexes are open-addressing tables of node ids with one byte of
//! hash beside each, keyed by fields the node holds already. Chains (rare: a content with
//! more than `max_page_sharing` mappings) keep their list of dups on the side.

use crate::heap::hash_map_bytes;
use crate::page::{DomainId, FrameId};
use crate::rmap::NIL;
use rustc_hash::FxHashMap;

/// Key of the stable tree's index: the full XXH64 of the contents, the NUMA root (always 0
/// with `merge_across_nodes=1`) and the security domain: one stable tree per root and domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// XXH64 of the contents.
    pub hash: u64,
    /// The NUMA root.
    pub nid: u32,
    /// The security domain.
    pub domain: DomainId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeKind {
    /// A KSM page in the index.
    Regular,
    /// Stands in the index for a content that reached `max_page_sharing`; holds dups
    /// ([`StableNodes::dups`]).
    Chain,
    /// A KSM page hanging in a chain.
    Dup { chain: u32 },
}

// `StableNode::meta`: the kind in the low two bits, then `SHADOWED`, then the payload.
const KIND_REGULAR: u32 = 0;
const KIND_DUP: u32 = 1;
const KIND_CHAIN: u32 = 2;
const KIND_FREE: u32 = 3;
/// A newer node has the same KSM page: the page belongs to that one (`page_stable_node`),
/// not to this one. Only a backend that broke the `FrameId` contract (an id reused while the
/// engine may still hold it) makes one; the live backend did until its canonical frame ids
/// carried a generation. Kept so that such a backend costs a lost merge, not a wrong one.
const SHADOWED: u32 = 4;
/// The payload's bits.
const PAYLOAD_SHIFT: u32 = 3;
/// No next free node; also the bound of node ids.
const NO_NODE: u32 = NIL >> PAYLOAD_SHIFT;

#[inline]
fn kind_of(meta: u32) -> u32 {
    meta & 3
}

#[inline]
fn payload(meta: u32) -> u32 {
    meta >> PAYLOAD_SHIFT
}

#[inline]
fn pack(kind: u32, payload: u32) -> u32 {
    payload << PAYLOAD_SHIFT | kind
}

/// `struct ksm_stable_node`, 28 bytes (the 64-bit fields as halves, so that it packs).
#[derive(Clone, Copy, Debug)]
struct StableNode {
    /// The KSM page (a chain: `prune_time` in milliseconds).
    kpfn: [u32; 2],
    /// The content's XXH64 (a dup: its chain's).
    hash: [u32; 2],
    /// First rmap item mapping the page (`hlist`, chained through the items' links).
    head: u32,
    /// `rmap_hlist_len`.
    len: u32,
    /// The kind (`KIND_*`) in bits 0–1, [`SHADOWED`] in bit 2; above them, the key's (nid,
    /// domain) as an index into [`StableNodes::classes`] (regular, chain), the chain (dup), or
    /// the next free node.
    meta: u32,
}

#[inline]
fn join(v: [u32; 2]) -> u64 {
    (v[1] as u64) << 32 | v[0] as u64
}

#[inline]
fn halves(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

/// Open addressing with linear probing: `u32` ids whose keys live elsewhere (the caller
/// hashes and compares them), with a tag byte per slot (0: empty; else the top bit and seven
/// bits of the hash). A probe reads the tags eight at a time, so that a search for a key
/// that is not there (most searches of the stable tree) looks at a group or two of tags and
/// at no id. Deletion shifts the following entries back, so there are no tombstones.
///
/// The number of slots is any multiple of eight (a hash picks its home slot by
/// multiplication, not masking), so that the table grows by a quarter at a time and is 70 to
/// 87.5% full once [`IdTable::trim`] has run, where doubling would leave it half empty.
#[derive(Clone, Debug, Default)]
struct IdTable {
    /// One per slot, then a copy of the first [`GROUP`] (a group read near the end wraps).
    tags: Vec<u8>,
    /// The id in each slot (meaningless where the tag is 0).
    ids: Vec<u32>,
    /// Ids in the table.
    len: usize,
}

/// Tags read at once.
const GROUP: usize = 8;
const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

#[inline]
fn mix(h: u64) -> u64 {
    (h ^ h >> 29).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Slots for `len` entries at 80% (at least one group).
fn slots_for(len: usize) -> usize {
    (len * 5 / 4 + 1).next_multiple_of(GROUP).max(2 * GROUP)
}

impl IdTable {
    #[inline]
    fn slots(&self) -> usize {
        self.ids.len()
    }

    #[inline]
    fn home(&self, m: u64) -> usize {
        (((m >> 32) * self.slots() as u64) >> 32) as usize
    }

    #[inline]
    fn tag(m: u64) -> u8 {
        0x80 | (m >> 20) as u8 & 0x7f
    }

    #[inline]
    fn next(&self, i: usize, by: usize) -> usize {
        let j = i + by;
        if j >= self.slots() {
            j - self.slots()
        } else {
            j
        }
    }

    #[inline]
    fn group(&self, i: usize) -> u64 {
        let mut g = [0; GROUP];
        g.copy_from_slice(&self.tags[i..i + GROUP]);
        u64::from_le_bytes(g)
    }

    fn set_tag(&mut self, i: usize, t: u8) {
        self.tags[i] = t;
        if i < GROUP {
            let n = self.slots();
            self.tags[n + i] = t;
        }
    }

    /// The slot of the first id under hash `h` for which `eq` holds, or the first empty slot
    /// of the probe (`Err`).
    #[inline]
    fn probe(&self, h: u64, mut eq: impl FnMut(u32) -> bool) -> Result<usize, usize> {
        let m = mix(h);
        let tag = Self::tag(m);
        let mut pos = self.home(m);
        loop {
            let g = self.group(pos);
            // Empty tags are the only ones with the top bit clear.
            let empty = !g & HI;
            let x = g ^ (LO * tag as u64);
            // Bytes of x that are zero (and a few false ones, which `eq` weeds out).
            let mut hits = x.wrapping_sub(LO) & !x & HI;
            if empty != 0 {
                // Strictly below the first empty tag.
                hits &= (empty.wrapping_sub(1) ^ empty) >> 1;
            }
            while hits != 0 {
                let i = self.next(pos, hits.trailing_zeros() as usize / 8);
                if eq(self.ids[i]) {
                    return Ok(i);
                }
                hits &= hits - 1;
            }
            if empty != 0 {
                return Err(self.next(pos, empty.trailing_zeros() as usize / 8));
            }
            pos = self.next(pos, GROUP);
        }
    }

    /// The first id under hash `h` for which `eq` holds.
    #[inline]
    fn find(&self, h: u64, eq: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        self.probe(h, eq).ok().map(|i| self.ids[i])
    }

    /// Put `id` under hash `h`, in place of the first id for which `eq` holds if there is one
    /// (that id is returned). `hash_of` gives the hash of any id in the table, to resize it.
    fn insert(
        &mut self,
        h: u64,
        id: u32,
        eq: impl FnMut(u32) -> bool,
        hash_of: impl Fn(u32) -> u64,
    ) -> Option<u32> {
        if (self.len + 1) * 8 > self.slots() * 7 {
            let grown = (self.slots() * 5 / 4).next_multiple_of(GROUP);
            self.resize(slots_for(self.len + 1).max(grown), &hash_of);
        }
        match self.probe(h, eq) {
            Ok(i) => Some(std::mem::replace(&mut self.ids[i], id)),
            Err(i) => {
                self.set_tag(i, Self::tag(mix(h)));
                self.ids[i] = id;
                self.len += 1;
                None
            }
        }
    }

    /// Take `id` (under hash `h`) out; false if it is not there.
    fn remove(&mut self, h: u64, id: u32, hash_of: impl Fn(u32) -> u64) -> bool {
        if self.len == 0 {
            return false;
        }
        let Ok(mut i) = self.probe(h, |o| o == id) else {
            return false;
        };
        // Backward shift: move up every following entry that may sit in the hole.
        let mut j = i;
        loop {
            j = self.next(j, 1);
            if self.tags[j] == 0 {
                break;
            }
            let k = self.home(mix(hash_of(self.ids[j])));
            // The entry at j stays if its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.set_tag(i, self.tags[j]);
                self.ids[i] = self.ids[j];
                i = j;
            }
        }
        self.set_tag(i, 0);
        self.len -= 1;
        if self.len * 4 < self.slots() && self.slots() > 2 * GROUP {
            self.resize(slots_for(self.len), &hash_of);
        }
        true
    }

    /// Give back room the table no longer needs (it is under 70% full). Called between
    /// passes.
    fn trim(&mut self, hash_of: impl Fn(u32) -> u64) {
        if self.len == 0 {
            *self = Self::default();
        } else if self.len * 10 < self.slots() * 7 && slots_for(self.len) < self.slots() {
            self.resize(slots_for(self.len), &hash_of);
        }
    }

    fn resize(&mut self, slots: usize, hash_of: &impl Fn(u32) -> u64) {
        let tags = std::mem::replace(&mut self.tags, vec![0; slots + GROUP]);
        let ids = std::mem::replace(&mut self.ids, vec![0; slots]);
        for (&t, id) in tags.iter().zip(ids) {
            if t == 0 {
                continue;
            }
            let m = mix(hash_of(id));
            let mut i = self.home(m);
            while self.tags[i] != 0 {
                i = self.next(i, 1);
            }
            self.set_tag(i, Self::tag(m));
            self.ids[i] = id;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.tags.capacity() + self.ids.capacity() * 4
    }
}

/// Every stable node, and the indexes that find them.
#[derive(Clone, Debug, Default)]
pub(crate) struct StableNodes {
    /// Every node by id, free ones included.
    nodes: Vec<StableNode>,
    /// First free node (`None`: none), the others chained through `meta` (ending at
    /// `NO_NODE`).
    free: Option<u32>,
    /// Nodes in use.
    live: usize,
    /// The (nid, domain) pairs of keys, each once; the first is (0, domain 0), if any.
    classes: Vec<(u32, DomainId)>,
    /// Each pair's index in `classes`: a daemon may serve many domains, and every lookup
    /// of the stable tree finds its pair first.
    class_ids: FxHashMap<(u32, DomainId), u32>,
    /// `root_stable_tree`: the regular nodes and chains by key.
    by_key: IdTable,
    /// `page_stable_node`: the regular nodes and dups by KSM page (the newest, if a backend
    /// reused a frame id while an older node of it lingered: [`SHADOWED`]).
    by_kpfn: IdTable,
    /// Each chain's dups, the one to try first in front.
    dups: FxHashMap<u32, Vec<u32>>,
}

#[inline]
fn key_hash(hash: u64, class: u32) -> u64 {
    hash ^ (class as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// The hash a regular node or chain is under in the index (dups are never there).
fn index_hash(nodes: &[StableNode], id: u32) -> u64 {
    let n = &nodes[id as usize];
    debug_assert!(
        matches!(kind_of(n.meta), KIND_REGULAR | KIND_CHAIN),
        "only regular nodes and chains are in the index"
    );
    key_hash(join(n.hash), payload(n.meta))
}

impl StableNodes {
    fn class_of(&mut self, nid: u32, domain: DomainId) -> u32 {
        if let Some(k) = self.find_class(nid, domain) {
            return k;
        }
        self.classes.push((nid, domain));
        let k = u32::try_from(self.classes.len() - 1)
            .ok()
            .filter(|&k| k < NO_NODE)
            .expect("fewer than 2^29 (nid, domain) pairs");
        self.class_ids.insert((nid, domain), k);
        k
    }

    #[inline]
    fn find_class(&self, nid: u32, domain: DomainId) -> Option<u32> {
        // The one pair of a machine with one node and one domain needs no hashing.
        match self.classes.first() {
            Some(&c) if c == (nid, domain) => Some(0),
            _ => self.class_ids.get(&(nid, domain)).copied(),
        }
    }

    #[inline]
    fn node(&self, id: u32) -> &StableNode {
        let n = &self.nodes[id as usize];
        debug_assert!(kind_of(n.meta) != KIND_FREE, "stable node {id} in use");
        n
    }

    #[inline]
    fn node_mut(&mut self, id: u32) -> &mut StableNode {
        let n = &mut self.nodes[id as usize];
        debug_assert!(kind_of(n.meta) != KIND_FREE, "stable node {id} in use");
        n
    }

    /// The class of a regular node or chain.
    fn class(&self, id: u32) -> u32 {
        payload(self.node(id).meta)
    }

    fn alloc(&mut self, n: StableNode) -> u32 {
        self.live += 1;
        match self.free {
            Some(id) => {
                let next = payload(self.nodes[id as usize].meta);
                self.free = (next != NO_NODE).then_some(next);
                self.nodes[id as usize] = n;
                id
            }
            None => {
                if self.nodes.len() == self.nodes.capacity() {
                    // A quarter more, not twice: nodes are most of what duplicates cost.
                    self.nodes.reserve_exact((self.nodes.len() / 4).max(16));
                }
                self.nodes.push(n);
                u32::try_from(self.nodes.len() - 1)
                    .ok()
                    .filter(|&id| id < NO_NODE)
                    .expect("fewer than 2^29 - 1 stable nodes")
            }
        }
    }

    /// Whether `id` is a node in use.
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        self.nodes
            .get(id as usize)
            .is_some_and(|n| kind_of(n.meta) != KIND_FREE)
    }

    #[inline]
    pub fn kind(&self, id: u32) -> NodeKind {
        let meta = self.node(id).meta;
        match kind_of(meta) {
            KIND_REGULAR => NodeKind::Regular,
            KIND_CHAIN => NodeKind::Chain,
            _ => NodeKind::Dup {
                chain: payload(meta),
            },
        }
    }

    #[inline]
    pub fn is_chain(&self, id: u32) -> bool {
        kind_of(self.node(id).meta) == KIND_CHAIN
    }

    /// The node's key (a dup's is its chain's).
    pub fn key(&self, id: u32) -> Key {
        let n = self.node(id);
        let class = match kind_of(n.meta) {
            KIND_DUP => payload(self.node(payload(n.meta)).meta),
            _ => payload(n.meta),
        };
        let (nid, domain) = self.classes[class as usize];
        Key {
            hash: join(n.hash),
            nid,
            domain,
        }
    }

    /// The low half of the content's hash: the checksum of the pages merged into it.
    #[inline]
    pub fn checksum(&self, id: u32) -> u32 {
        self.node(id).hash[0]
    }

    /// The KSM page (not for chains).
    #[inline]
    pub fn kpfn(&self, id: u32) -> FrameId {
        debug_assert!(!self.is_chain(id));
        FrameId(join(self.node(id).kpfn))
    }

    #[inline]
    pub fn head(&self, id: u32) -> u32 {
        self.node(id).head
    }

    #[inline]
    pub fn set_head(&mut self, id: u32, head: u32) {
        self.node_mut(id).head = head;
    }

    /// `rmap_hlist_len`.
    #[inline]
    pub fn len(&self, id: u32) -> u32 {
        self.node(id).len
    }

    #[inline]
    pub fn set_len(&mut self, id: u32, len: u32) {
        self.node_mut(id).len = len;
    }

    /// A regular node for the KSM page `kpfn` under `key`, with no item yet, found by its
    /// page from now on (the caller puts it in the stable tree's index or a chain).
    pub fn insert_page_node(&mut self, kpfn: FrameId, key: Key) -> u32 {
        let class = self.class_of(key.nid, key.domain);
        let id = self.alloc(StableNode {
            kpfn: halves(kpfn.0),
            hash: halves(key.hash),
            head: NIL,
            len: 0,
            meta: pack(KIND_REGULAR, class),
        });
        let nodes = &self.nodes;
        let replaced = self.by_kpfn.insert(
            kpfn.0,
            id,
            |o| join(nodes[o as usize].kpfn) == kpfn.0,
            |o| join(nodes[o as usize].kpfn),
        );
        if let Some(old) = replaced {
            self.nodes[old as usize].meta |= SHADOWED;
        }
        id
    }

    /// `alloc_stable_node_chain`: a chain under `key` holding `dup`, the regular node in the
    /// index under `key`, whose place in the index it takes; pruned last at `now_ms`.
    pub fn insert_chain(&mut self, key: Key, now_ms: u64, dup: u32) -> u32 {
        let class = self.class_of(key.nid, key.domain);
        let chain = self.alloc(StableNode {
            kpfn: halves(now_ms),
            hash: halves(key.hash),
            head: NIL,
            len: 0,
            meta: pack(KIND_CHAIN, class),
        });
        self.dups.insert(chain, vec![dup]);
        // While `dup` is still a regular node, which the chain replaces under their key.
        self.index_insert(chain);
        self.set_dup(dup, chain);
        chain
    }

    /// Make the regular node `id` a dup of `chain`.
    pub fn set_dup(&mut self, id: u32, chain: u32) {
        let n = self.node_mut(id);
        debug_assert_eq!(kind_of(n.meta), KIND_REGULAR);
        n.meta = pack(KIND_DUP, chain) | n.meta & SHADOWED;
    }

    /// Make the dup `id` a regular node again, under `key` (its chain's, the chain going).
    pub fn set_regular(&mut self, id: u32, key: Key) {
        let class = self.class_of(key.nid, key.domain);
        let n = self.node_mut(id);
        n.meta = pack(KIND_REGULAR, class) | n.meta & SHADOWED;
    }

    /// A chain's dups.
    pub fn dups(&self, chain: u32) -> &[u32] {
        self.dups.get(&chain).map_or(&[], Vec::as_slice)
    }

    pub fn dups_mut(&mut self, chain: u32) -> &mut Vec<u32> {
        self.dups
            .get_mut(&chain)
            .expect("a chain has a list of dups")
    }

    /// A chain's `prune_time`, in milliseconds.
    pub fn prune_time_ms(&self, chain: u32) -> u64 {
        debug_assert!(self.is_chain(chain));
        join(self.node(chain).kpfn)
    }

    pub fn set_prune_time_ms(&mut self, chain: u32, ms: u64) {
        debug_assert!(self.is_chain(chain));
        self.node_mut(chain).kpfn = halves(ms);
    }

    /// Free node `id`: out of the stable tree's index if it is the node there, out of the
    /// page index (a chain: its list of dups goes).
    pub fn remove(&mut self, id: u32) {
        let n = *self.node(id);
        if kind_of(n.meta) != KIND_DUP && self.in_index(id) {
            self.index_remove(id);
        }
        if kind_of(n.meta) == KIND_CHAIN {
            self.dups.remove(&id);
        } else {
            let nodes = &self.nodes;
            self.by_kpfn
                .remove(join(n.kpfn), id, |o| join(nodes[o as usize].kpfn));
        }
        let next = self.free.unwrap_or(NO_NODE);
        self.nodes[id as usize] = StableNode {
            kpfn: [0; 2],
            hash: [0; 2],
            head: NIL,
            len: 0,
            meta: pack(KIND_FREE, next),
        };
        self.free = Some(id);
        self.live -= 1;
    }

    /// Whether a newer node has the same KSM page (see [`SHADOWED`]): [`StableNodes::by_page`]
    /// does not find this one.
    #[inline]
    pub fn is_shadowed(&self, id: u32) -> bool {
        self.node(id).meta & SHADOWED != 0
    }

    /// The node for KSM page `kpfn` (`page_stable_node`).
    #[inline]
    pub fn by_page(&self, kpfn: FrameId) -> Option<u32> {
        self.by_kpfn
            .find(kpfn.0, |o| join(self.nodes[o as usize].kpfn) == kpfn.0)
    }

    /// The regular node or chain in the stable tree's index under `key`.
    #[inline]
    pub fn lookup(&self, key: &Key) -> Option<u32> {
        let class = self.find_class(key.nid, key.domain)?;
        self.by_key.find(key_hash(key.hash, class), |o| {
            let n = &self.nodes[o as usize];
            join(n.hash) == key.hash && payload(n.meta) == class
        })
    }

    /// Put the regular node or chain `id` in the index under its key, in place of the node
    /// there.
    pub fn index_insert(&mut self, id: u32) {
        debug_assert!(!matches!(self.kind(id), NodeKind::Dup { .. }));
        let h = index_hash(&self.nodes, id);
        let (hash, class) = (self.nodes[id as usize].hash, self.class(id));
        let nodes = &self.nodes;
        self.by_key.insert(
            h,
            id,
            |o| nodes[o as usize].hash == hash && payload(nodes[o as usize].meta) == class,
            |o| index_hash(nodes, o),
        );
    }

    /// Take `id` out of the index (where it is the node under its key).
    fn index_remove(&mut self, id: u32) {
        let nodes = &self.nodes;
        self.by_key
            .remove(index_hash(nodes, id), id, |o| index_hash(nodes, o));
    }

    /// Whether `id` is the node in the index under its key.
    pub fn in_index(&self, id: u32) -> bool {
        let key = self.key(id);
        self.lookup(&key) == Some(id)
    }

    /// Every node in use.
    pub fn ids(&self) -> Vec<u32> {
        (0..self.nodes.len() as u32)
            .filter(|&id| kind_of(self.nodes[id as usize].meta) != KIND_FREE)
            .collect()
    }

    /// Heap bytes held: nodes (free ones included), the indexes, the chains' lists.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<StableNode>()
            + self.classes.capacity() * std::mem::size_of::<(u32, DomainId)>()
            + hash_map_bytes(&self.class_ids)
            + self.by_key.heap_bytes()
            + self.by_kpfn.heap_bytes()
            + hash_map_bytes(&self.dups)
            + self.dups.values().map(|d| d.capacity() * 4).sum::<usize>()
    }

    /// Give back memory no longer needed: spare room of the list of nodes and of the indexes.
    /// Called between passes. (Free nodes stay where they are, to be reused last freed
    /// first: node ids are given out as the kernel-faithful arena gave them out, which a
    /// batch's undo of a failed merge relies on to recognise its node.)
    pub fn trim(&mut self) {
        if self.live == 0 {
            // Nothing refers to a node id any more (run=2, every KSM page gone): the list
            // of free nodes goes too.
            self.nodes = Vec::new();
            self.free = None;
        }
        if self.nodes.capacity() > self.nodes.len() + self.nodes.len() / 8 {
            self.nodes.shrink_to_fit();
        }
        if self.dups.capacity() > 2 * self.dups.len() {
            self.dups.shrink_to_fit();
        }
        let nodes = &self.nodes;
        self.by_key.trim(|o| index_hash(nodes, o));
        self.by_kpfn.trim(|o| join(nodes[o as usize].kpfn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_28_bytes() {
        assert_eq!(std::mem::size_of::<StableNode>(), 28);
    }

    #[test]
    fn id_table_finds_replaces_and_removes() {
        // Keys collide on purpose (hash = id % 7) to exercise the probing and the shifts.
        let hash_of = |id: u32| (id % 7) as u64;
        let mut t = IdTable::default();
        for id in 0..200u32 {
            assert_eq!(t.insert(hash_of(id), id, |o| o == id, hash_of), None);
        }
        assert_eq!(t.len, 200);
        assert!(t.slots() >= 200 * 8 / 7);
        for id in (0..200u32).step_by(3) {
            assert!(t.remove(hash_of(id), id, hash_of));
            assert!(!t.remove(hash_of(id), id, hash_of));
        }
        for id in 0..200u32 {
            let found = t.find(hash_of(id), |o| o == id);
            assert_eq!(found.is_some(), id % 3 != 0, "{id}");
        }
        // Replace: key equality by hash.
        assert_eq!(t.insert(3, 1004, |o| o % 7 == 3, hash_of), Some(10));
        for id in 0..200u32 {
            if id % 3 != 0 && id != 10 {
                t.remove(hash_of(id), id, hash_of);
            }
        }
        assert_eq!(t.len, 1);
        assert_eq!(t.slots(), 2 * GROUP);
        assert_eq!(t.find(3, |o| o == 1004), Some(1004));
    }

    #[test]
    fn id_table_agrees_with_a_hash_map() {
        // Ids 0..4096 with keys id % 1000 (ten ids a key at most: long runs of one tag),
        // inserted and removed at random.
        let hash_of = |id: u32| ((id % 1000) as u64).wrapping_mul(0x1234_5678_9abc_def1);
        let mut t = IdTable::default();
        let mut model = std::collections::HashSet::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % 4096) as u32;
            if model.contains(&id) {
                assert!(t.remove(hash_of(id), id, hash_of), "step {step}");
                model.remove(&id);
            } else {
                assert_eq!(t.insert(hash_of(id), id, |o| o == id, hash_of), None);
                model.insert(id);
            }
            if step % 1000 == 0 {
                for id in 0..4096 {
                    let found = t.find(hash_of(id), |o| o == id);
                    assert_eq!(found.is_some(), model.contains(&id), "step {step} id {id}");
                }
                assert_eq!(t.len, model.len());
            }
        }
    }

    #[test]
    fn a_small_table_wraps_around_and_trims() {
        // Few slots, hashes that pile up near the end of the table: probes wrap and read
        // the copy of the first tags.
        let hash_of = |id: u32| u64::MAX - (id % 3) as u64;
        let mut t = IdTable::default();
        let mut model = std::collections::BTreeSet::new();
        let mut x = 7u64;
        for step in 0..50_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let id = (x >> 40) as u32 % 24;
            if model.remove(&id) {
                assert!(t.remove(hash_of(id), id, hash_of), "step {step}");
            } else {
                assert_eq!(t.insert(hash_of(id), id, |o| o == id, hash_of), None);
                model.insert(id);
            }
            if step % 97 == 0 {
                t.trim(hash_of);
            }
            for id in 0..24 {
                let found = t.find(hash_of(id), |o| o == id);
                assert_eq!(found.is_some(), model.contains(&id), "step {step} id {id}");
            }
            assert_eq!(t.len, model.len());
        }
    }

    #[test]
    fn nodes_by_key_and_page() {
        let mut s = StableNodes::default();
        let key = |hash, domain| Key {
            hash,
            nid: 0,
            domain: DomainId(domain),
        };
        let a = s.insert_page_node(FrameId(1 << 40 | 5), key(77, 0));
        s.index_insert(a);
        let b = s.insert_page_node(FrameId(6), key(77, 1));
        s.index_insert(b);
        assert_eq!(s.lookup(&key(77, 0)), Some(a));
        assert_eq!(s.lookup(&key(77, 1)), Some(b));
        assert_eq!(s.lookup(&key(78, 0)), None);
        assert_eq!(s.by_page(FrameId(1 << 40 | 5)), Some(a));
        assert_eq!(s.key(b), key(77, 1));
        assert_eq!(s.checksum(b), 77);
        // A chain takes a's place in the index; a dup keeps its page.
        let c = s.insert_page_node(FrameId(7), key(77, 0));
        let chain = s.insert_chain(key(77, 0), 123, a);
        s.dups_mut(chain).insert(0, c);
        s.set_dup(c, chain);
        assert_eq!(s.lookup(&key(77, 0)), Some(chain));
        assert_eq!(
            (s.kind(a), s.kind(chain)),
            (NodeKind::Dup { chain }, NodeKind::Chain)
        );
        assert_eq!(s.key(c), key(77, 0));
        assert_eq!((s.dups(chain), s.prune_time_ms(chain)), (&[c, a][..], 123));
        assert_eq!(s.by_page(FrameId(7)), Some(c));
        s.remove(c);
        assert_eq!(s.by_page(FrameId(7)), None);
        assert!(!s.contains(c));
        // A node for a page that has one already takes its place (in c's slot, free).
        let e = s.insert_page_node(FrameId(6), key(5, 0));
        assert_eq!(e, c);
        assert_eq!(s.by_page(FrameId(6)), Some(e));
        assert!(s.is_shadowed(b) && !s.is_shadowed(e));
        s.remove(b);
        assert_eq!(s.by_page(FrameId(6)), Some(e));
        s.remove(e);
        assert_eq!(s.by_page(FrameId(6)), None);
        // The freed node is reused.
        let d = s.insert_page_node(FrameId(8), key(1, 0));
        assert_eq!(d, c);
        assert_eq!(s.ids(), vec![a, d, chain]);
        for id in s.ids() {
            s.remove(id);
        }
        assert!(s.ids().is_empty());
        s.trim();
        assert_eq!(
            s.heap_bytes(),
            s.nodes.capacity() * 28 + s.classes.capacity() * 8 + hash_map_bytes(&s.class_ids)
        );
    }
}
