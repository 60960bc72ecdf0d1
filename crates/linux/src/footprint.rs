//! What samepage's own mappings cost a process in kernel memory, which `general_profit` does
//! not show: the views of the stores of canonical pages, the executor's scratch area, the
//! stacks of samepage's threads, and the splits its userfaultfd registration makes in
//! mappings of the application (a registered range that is part of a larger mapping becomes
//! a mapping of its own). Each mapping costs a `vm_area_struct`, its share of the maple tree
//! and, once it holds anonymous pages, an `anon_vma_chain`; the pages it maps cost page
//! tables.

use crate::eligibility::{parse_smaps, Mapping};
use serde::{Deserialize, Serialize};
use std::io;

/// samepage's own mappings in one process, and what they cost the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Mappings samepage made: store views, the scratch area, its threads' stacks.
    pub mappings: u64,
    /// Mappings of the application split in two by samepage's registration.
    pub splits: u64,
    /// Estimated bytes of the kernel's structures for both (`vm_area_struct`, maple tree,
    /// `anon_vma_chain`), at the object sizes of `/proc/slabinfo` where it can be read.
    pub mapping_bytes: u64,
    /// Estimated bytes of the page tables that map the resident pages of samepage's own
    /// mappings (one page of entries per 512 pages, per mapping).
    pub page_table_bytes: u64,
}

impl Footprint {
    /// The kernel memory in all.
    pub fn kernel_bytes(&self) -> u64 {
        self.mapping_bytes + self.page_table_bytes
    }

    /// Add another process's footprint.
    pub fn add(&mut self, o: &Footprint) {
        self.mappings += o.mappings;
        self.splits += o.splits;
        self.mapping_bytes += o.mapping_bytes;
        self.page_table_bytes += o.page_table_bytes;
    }
}

/// Sizes of the kernel objects a mapping costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ObjectSizes {
    vma: u64,
    anon_vma_chain: u64,
    /// A maple tree node's share per mapping (a node holds up to 16 entries).
    maple_share: u64,
}

impl ObjectSizes {
    /// The sizes of Linux 6.18 on x86-64 (read off `/proc/slabinfo` here): used where the
    /// file cannot be read (it is root's).
    const DEFAULT: Self = Self {
        vma: 192,
        anon_vma_chain: 64,
        maple_share: 256 / 16,
    };

    fn read() -> Self {
        match std::fs::read_to_string("/proc/slabinfo") {
            Ok(t) => Self::parse(&t),
            Err(_) => Self::DEFAULT,
        }
    }

    fn parse(slabinfo: &str) -> Self {
        let size = |name: &str| {
            slabinfo.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                // name active_objs num_objs objsize ...
                (f.next() == Some(name))
                    .then(|| f.nth(2).and_then(|v| v.parse::<u64>().ok()))
                    .flatten()
            })
        };
        let d = Self::DEFAULT;
        Self {
            vma: size("vm_area_struct").unwrap_or(d.vma),
            anon_vma_chain: size("anon_vma_chain").unwrap_or(d.anon_vma_chain),
            maple_share: size("maple_node").map_or(d.maple_share, |n| n / 16),
        }
    }

    fn mapping(&self, m: &Mapping) -> u64 {
        self.vma
            + self.maple_share
            + if m.anonymous_kib > 0 {
                self.anon_vma_chain
            } else {
                0
            }
    }
}

/// Is `m` a view of one of samepage's stores?
fn is_store_view(m: &Mapping) -> bool {
    m.path.starts_with("/memfd:samepage")
}

/// The userfaultfd flags of `/proc/PID/smaps`.
fn is_uffd_flag(f: &str) -> bool {
    matches!(f, "um" | "uw" | "ui")
}

/// `a` ends where `b` starts, both anonymous with the same protection, and their flags
/// differ only in userfaultfd registration: without it they would be one mapping.
fn split_by_registration(a: &Mapping, b: &Mapping) -> bool {
    fn rest(m: &Mapping) -> Vec<&str> {
        let mut f: Vec<&str> = m
            .flags
            .iter()
            .map(String::as_str)
            .filter(|f| !is_uffd_flag(f))
            .collect();
        f.sort_unstable();
        f
    }
    let registered = |m: &Mapping| m.flags.iter().any(|f| is_uffd_flag(f));
    a.end == b.start
        && a.path.is_empty()
        && b.path.is_empty()
        && a.perms == b.perms
        && registered(a) != registered(b)
        && rest(a) == rest(b)
}

fn of_maps(maps: &[Mapping], own: &[(u64, u64)], sizes: ObjectSizes) -> Footprint {
    let mut f = Footprint::default();
    let is_own =
        |m: &Mapping| is_store_view(m) || own.iter().any(|&(s, e)| s < m.end && m.start < e);
    for (i, m) in maps.iter().enumerate() {
        if is_own(m) {
            f.mappings += 1;
            f.mapping_bytes += sizes.mapping(m);
            f.page_table_bytes += (m.rss_kib / 4).div_ceil(512) * 4096;
        } else if i > 0 && !is_own(&maps[i - 1]) && split_by_registration(&maps[i - 1], m) {
            f.splits += 1;
            f.mapping_bytes += sizes.mapping(m);
        }
    }
    f
}

/// The footprint of samepage in process `pid`, whose own ranges (scratch areas, thread
/// stacks: [`crate::sys::own_ranges`] in that process) are `own`; store views are found by
/// their name.
pub fn of_process(pid: u32, own: &[(u64, u64)]) -> io::Result<Footprint> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(of_maps(&parse_smaps(&text), own, ObjectSizes::read()))
}

/// The footprint of samepage in this process.
pub fn of_self() -> io::Result<Footprint> {
    of_process(std::process::id(), &crate::sys::own_ranges())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
10000-20000 rw-p 00000000 00:00 0 
Rss:                  64 kB
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac 
20000-30000 rw-p 00000000 00:00 0 
Rss:                   0 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me ac um uw 
30000-40000 rw-p 00000000 00:00 0 
Rss:                  16 kB
Anonymous:            16 kB
VmFlags: rd wr mr mw me ac 
40000-50000 r--s 00000000 00:01 5                          /memfd:samepage-canonical-0 (deleted)
Rss:                4096 kB
Anonymous:             0 kB
VmFlags: rd sh mr mw me ms 
60000-70000 rw-p 00000000 00:00 0 
Rss:                   8 kB
Anonymous:             8 kB
VmFlags: rd wr mr mw me ac um 
70000-80000 rw-p 00000000 00:00 0 
Rss:                   4 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac dc 
";

    #[test]
    fn counts_own_mappings_and_registration_splits() {
        let maps = parse_smaps(SMAPS);
        let f = of_maps(&maps, &[(0x60000, 0x61000)], ObjectSizes::DEFAULT);
        // The store view and the scratch area at 0x60000 are samepage's; the registered
        // range at 0x20000 split one application mapping into three (two splits). The
        // mapping at 0x70000 differs by more than registration (MADV_DONTFORK).
        assert_eq!(f.mappings, 2);
        assert_eq!(f.splits, 2);
        let d = ObjectSizes::DEFAULT;
        let base = d.vma + d.maple_share;
        assert_eq!(
            f.mapping_bytes,
            base + (base + d.anon_vma_chain) + base + (base + d.anon_vma_chain)
        );
        // 1024 resident pages of the store view need two pages of entries; 2 pages one.
        assert_eq!(f.page_table_bytes, 2 * 4096 + 4096);
        assert_eq!(f.kernel_bytes(), f.mapping_bytes + f.page_table_bytes);
    }

    #[test]
    fn object_sizes_come_from_slabinfo() {
        let s = ObjectSizes::parse(
            "slabinfo - version: 2.1\n\
             vm_area_struct       812   1428    200   21    1 : tunables    0    0    0\n\
             maple_node           736   1104    256   16    1 : tunables    0    0    0\n",
        );
        assert_eq!(s.vma, 200);
        assert_eq!(s.maple_share, 16);
        assert_eq!(s.anon_vma_chain, ObjectSizes::DEFAULT.anon_vma_chain);
    }
}
