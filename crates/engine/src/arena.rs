//! A vector with a free list: stable `u32` indices for the stable nodes (rmap items live in
//! the dense chunks of `rmap.rs`).

/// Slots are reused after `remove`; indices stay valid while the value lives.
#[derive(Clone, Debug)]
pub(crate) struct Arena<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Arena<T> {
    pub fn insert(&mut self, v: T) -> u32 {
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(v);
            i
        } else {
            self.slots.push(Some(v));
            u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 entries")
        }
    }

    pub fn remove(&mut self, i: u32) -> T {
        let v = self.slots[i as usize].take().expect("arena slot in use");
        self.free.push(i);
        v
    }

    pub fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize).and_then(Option::as_ref)
    }

    /// Heap bytes of the slots and the free list.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<T>>() + self.free.capacity() * 4
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|v| (i as u32, v)))
    }
}

impl<T> std::ops::Index<u32> for Arena<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        self.slots[i as usize].as_ref().expect("arena slot in use")
    }
}

impl<T> std::ops::IndexMut<u32> for Arena<T> {
    fn index_mut(&mut self, i: u32) -> &mut T {
        self.slots[i as usize].as_mut().expect("arena slot in use")
    }
}
