//! The store of canonical pages of one security domain: a memfd that ksmd writes and every
//! agent of the domain maps read-only. A canonical page is written once, before anything
//! refers to it, and is never written again while referenced; its memory is released
//! (`FALLOC_FL_PUNCH_HOLE`) when the last reference goes, and its offset is then reused.
//!
//! References are counted per target (the process whose pages stand for it) and in all,
//! plus the merges queued but not carried out yet, so that an agent that lies about its
//! pages can only keep pages alive, never release one another process still uses.

use crate::sys::{self, FileView, PAGE};
use rustc_hash::FxHashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Offsets below this many pages are usable (the page states encode the others).
pub(crate) const MAX_PAGES: u32 = crate::agent::state::MAX_STORE_OFFSET;
/// The file grows in steps of this many pages.
const GROW_PAGES: u64 = 1 << 14;

/// The canonical pages of one domain.
#[derive(Debug)]
pub(crate) struct Store {
    fd: OwnedFd,
    view: FileView,
    /// File size, in pages.
    size: u64,
    /// Offsets never used yet start here.
    next: u32,
    /// Offsets released, to use again.
    free: Vec<u32>,
    /// How many times each offset was released (wrapping): part of the frame id the engine
    /// knows a canonical page by, so that an id it still holds for a released page never
    /// names the page its offset holds next.
    gens: Vec<u8>,
    /// References of pages that stand for each canonical page, from every target.
    refs: FxHashMap<u32, u32>,
    /// Merges queued (not carried out yet) into each canonical page.
    pending: FxHashMap<u32, u32>,
    /// Canonical pages released so far.
    pub released: u64,
    /// Offsets `0..max` are usable.
    max: u32,
}

impl Store {
    /// An empty store.
    pub fn new(name: &str) -> io::Result<Self> {
        Self::with_capacity(name, MAX_PAGES)
    }

    /// An empty store of at most `max` canonical pages at a time.
    pub fn with_capacity(name: &str, max: u32) -> io::Result<Self> {
        let fd = sys::memfd_create(name)?;
        let view = FileView::new(fd.as_fd(), 64 << 20)?;
        Ok(Self {
            fd,
            view,
            size: 0,
            next: 0,
            free: Vec::new(),
            gens: Vec::new(),
            refs: FxHashMap::default(),
            pending: FxHashMap::default(),
            released: 0,
            max: max.min(MAX_PAGES),
        })
    }

    /// A read-only descriptor of the store, for an agent.
    pub fn reader(&self) -> io::Result<OwnedFd> {
        sys::reopen_read_only(self.fd.as_fd())
    }

    /// Write `content` to a free offset and return it, with one pending reference held for
    /// the merge about to be queued.
    pub fn alloc(&mut self, content: &[u8]) -> io::Result<u32> {
        let k = match self.free.pop() {
            Some(k) => k,
            None if self.next < self.max => {
                self.next += 1;
                self.gens.push(0);
                self.next - 1
            }
            None => {
                return Err(io::Error::other(format!(
                    "the store holds {} canonical pages already",
                    self.max
                )))
            }
        };
        if let Err(e) = self.write(k, content) {
            self.free.push(k);
            return Err(e);
        }
        *self.pending.entry(k).or_default() += 1;
        Ok(k)
    }

    fn write(&mut self, k: u32, content: &[u8]) -> io::Result<()> {
        if k as u64 >= self.size {
            let size = (k as u64 / GROW_PAGES + 1) * GROW_PAGES;
            sys::ftruncate(self.fd.as_fd(), size * PAGE)?;
            self.size = size;
            if self.view.len() < size * PAGE {
                self.view.grow((size * PAGE).next_power_of_two())?;
            }
        }
        sys::pwrite_page(self.fd.as_fd(), content, k as u64 * PAGE)
    }

    /// Is `k` a canonical page something refers to (or is about to)?
    pub fn alive(&self, k: u32) -> bool {
        self.refs.contains_key(&k) || self.pending.contains_key(&k)
    }

    /// A merge into `k` was queued.
    pub fn queue(&mut self, k: u32) {
        *self.pending.entry(k).or_default() += 1;
    }

    /// A queued merge into `k` is over (carried out or not): `merged` says whether a page
    /// now stands for it.
    pub fn dequeue(&mut self, k: u32, merged: bool) {
        if !self.pending.contains_key(&k) {
            // Nothing was queued into k: there is nothing to settle.
            return;
        }
        if merged {
            *self.refs.entry(k).or_default() += 1;
        }
        if dec(&mut self.pending, k) {
            self.maybe_release(k);
        }
    }

    /// A page stopped standing for `k`.
    pub fn unref(&mut self, k: u32) {
        // Only the last reference going releases k: a reference that was never there (an
        // agent's lie, or a change told twice) must not release it again, which would put
        // its offset on the free list twice.
        if dec(&mut self.refs, k) {
            self.maybe_release(k);
        }
    }

    fn maybe_release(&mut self, k: u32) {
        if self.alive(k) || k >= self.next {
            return;
        }
        if sys::punch_hole(self.fd.as_fd(), k as u64 * PAGE, PAGE).is_ok() {
            self.released += 1;
            self.gens[k as usize] = self.gens[k as usize].wrapping_add(1);
            self.free.push(k);
        }
    }

    /// The generation of offset `k`: how many times it was released (wrapping).
    pub fn gen(&self, k: u32) -> u8 {
        self.gens.get(k as usize).copied().unwrap_or(0)
    }

    /// Copy canonical page `k` into `buf`.
    pub fn read(&self, k: u32, buf: &mut [u8; PAGE as usize]) -> bool {
        (k as u64) < self.size && self.view.read_page(k as u64 * PAGE, buf)
    }

    /// Canonical pages referred to now.
    pub fn live_pages(&self) -> usize {
        self.refs.len()
    }

    /// Offsets in use (referred to or pending), for tests.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let mut ks: Vec<u32> = self
            .refs
            .keys()
            .chain(self.pending.keys())
            .copied()
            .collect();
        ks.sort_unstable();
        ks.dedup();
        ks.len()
    }
}

/// Take one from `k`'s count; true when that was the last.
fn dec(m: &mut FxHashMap<u32, u32>, k: u32) -> bool {
    if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_recycled_past_the_offset_space() {
        let mut s = Store::with_capacity("test", 8).unwrap();
        let page = [7u8; PAGE as usize];
        // Far more promotions than the offset space holds: each is merged, then its last
        // reference goes, and its offset is reused.
        for i in 0..100_000u32 {
            let k = s.alloc(&page).unwrap();
            assert!(k < 8);
            if i % 3 == 0 {
                s.dequeue(k, false); // the merge failed: released at once
            } else {
                s.dequeue(k, true);
                s.unref(k);
            }
        }
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.released, 100_000);
        let held: Vec<u32> = (0..8).map(|_| s.alloc(&page).unwrap()).collect();
        assert_eq!(held.len(), 8);
        assert!(s.alloc(&page).is_err(), "full while all 8 are in use");
    }

    #[test]
    fn a_referenced_page_is_never_released() {
        let mut s = Store::new("test").unwrap();
        let mut page = [0u8; PAGE as usize];
        page[0] = 42;
        let k = s.alloc(&page).unwrap();
        s.queue(k);
        s.dequeue(k, true);
        s.dequeue(k, true);
        s.unref(k);
        let mut buf = [0u8; PAGE as usize];
        assert!(s.read(k, &mut buf) && buf[0] == 42, "one reference left");
        s.unref(k);
        s.unref(k); // a lie (no reference left) changes nothing
        s.dequeue(k, true); // nor does a merge that was never queued
        assert!(!s.alive(k));
        assert_eq!(s.released, 1);
        let k2 = s.alloc(&[1u8; PAGE as usize]).unwrap();
        assert_eq!(k2, k, "the offset is reused");
        assert_eq!(s.gen(k2), 1, "in its next generation");
        let k3 = s.alloc(&[2u8; PAGE as usize]).unwrap();
        assert_ne!(k3, k2, "once: a released offset is on the free list once");
        assert!(s.read(k2, &mut buf) && buf == [1u8; PAGE as usize]);
    }
}
