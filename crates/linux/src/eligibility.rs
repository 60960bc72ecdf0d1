//! Which ranges samepage can manage: private anonymous memory only, like the kernel's
//! `vma_ksm_compatible`, but refused loudly with the reason instead of silently ignored.

use crate::live::LiveError;

/// One mapping of `/proc/PID/smaps` (or `maps`, which leaves the sizes and flags out).
#[derive(Debug, Default)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
    pub flags: Vec<String>,
    /// `Rss:`, in KiB.
    pub rss_kib: u64,
    /// `Anonymous:`, in KiB.
    pub anonymous_kib: u64,
}

pub(crate) fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = parts.next().unwrap_or("").to_string();
                let path = parts.skip(3).collect::<Vec<_>>().join(" ");
                out.push(Mapping {
                    start,
                    end,
                    perms,
                    path,
                    ..Mapping::default()
                });
                continue;
            }
        }
        let Some(m) = out.last_mut() else { continue };
        let kib = |mut p: std::str::SplitWhitespace<'_>| {
            p.next().and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        match first {
            "VmFlags:" => m.flags = parts.map(str::to_string).collect(),
            "Rss:" => m.rss_kib = kib(parts),
            "Anonymous:" => m.anonymous_kib = kib(parts),
            _ => {}
        }
    }
    out
}

/// Why a mapping cannot be merged, if it cannot.
fn refusal(m: &Mapping) -> Option<String> {
    let has = |f: &str| m.flags.iter().any(|x| x == f);
    if has("ht") {
        return Some("it is hugetlb memory".into());
    }
    if m.perms.as_bytes().get(3) == Some(&b's') || has("sh") {
        return Some(
            "it is shared memory (MAP_SHARED); only private anonymous memory can be merged".into(),
        );
    }
    let anonymous = m.path.is_empty()
        || m.path.starts_with("[anon")
        || m.path == "[heap]"
        || m.path == "[stack]";
    if !anonymous {
        return Some(format!(
            "it maps the file {}; only private anonymous memory can be merged",
            m.path
        ));
    }
    if has("lo") {
        return Some(
            "it is locked (mlock); merging would replace its pages and drop the lock".into(),
        );
    }
    // VM_IO, VM_PFNMAP, VM_MIXEDMAP and VM_DONTEXPAND, as `vma_ksm_compatible` refuses
    // them. ("dc" is MADV_DONTFORK, which QEMU sets on guest RAM: the kernel merges it.)
    if has("io") || has("pf") || has("mm") || has("de") {
        return Some("it is device or PFN memory".into());
    }
    if has("um") || has("uw") || has("ui") {
        return Some("another userfaultfd already manages it".into());
    }
    if has("mg") {
        return Some(
            "the kernel's KSM manages it (MADV_MERGEABLE or PR_SET_MEMORY_MERGE); samepage and \
             the kernel's KSM must not merge the same memory"
                .into(),
        );
    }
    None
}

/// A piece of `[start, end)` within one mapping.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub start: u64,
    pub end: u64,
    /// Why it cannot be merged, if it cannot.
    pub refusal: Option<String>,
    /// It is the main thread's stack.
    pub stack: bool,
    /// It is writable.
    pub writable: bool,
    /// It is anonymous memory that starts where a file mapping ends: a shared object's
    /// `.bss` (or a program's, below `[heap]`), the data its loader and libc keep.
    pub bss: bool,
}

/// The mappings inside `[start, end)`, clipped to it, and whether some of the range is not
/// mapped at all.
pub(crate) fn pieces(start: u64, end: u64) -> Result<(Vec<Piece>, bool), LiveError> {
    let text = std::fs::read_to_string("/proc/self/smaps").map_err(|source| LiveError::Io {
        what: "reading /proc/self/smaps",
        source,
    })?;
    let maps = parse_smaps(&text);
    let mut out = Vec::new();
    let mut covered = start;
    let mut gaps = false;
    let is_file = |m: &Mapping| m.path.starts_with('/');
    for (i, m) in maps.iter().enumerate() {
        if m.end <= start || m.start >= end {
            continue;
        }
        if m.start > covered {
            gaps = true;
        }
        let bss = m.path.is_empty() && i > 0 && maps[i - 1].end == m.start && is_file(&maps[i - 1]);
        out.push(Piece {
            start: m.start.max(start),
            end: m.end.min(end),
            refusal: refusal(m),
            stack: m.path == "[stack]",
            writable: m.perms.as_bytes().get(1) == Some(&b'w'),
            bss,
        });
        covered = m.end;
    }
    Ok((out, gaps || covered < end))
}

/// The whole mapping that contains `addr`, if one does.
pub(crate) fn mapping_around(addr: u64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    parse_smaps(&text)
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end)
        .map(|m| (m.start, m.end))
}

/// Check that `[start, end)` is entirely private anonymous memory samepage can manage.
pub(crate) fn check(start: u64, end: u64) -> Result<(), LiveError> {
    let text = std::fs::read_to_string("/proc/self/smaps").map_err(|source| LiveError::Io {
        what: "reading /proc/self/smaps",
        source,
    })?;
    check_in(&parse_smaps(&text), start, end)
}

fn check_in(maps: &[Mapping], start: u64, end: u64) -> Result<(), LiveError> {
    let mut covered = start;
    for m in maps.iter().filter(|m| m.end > start && m.start < end) {
        if m.start > covered {
            break;
        }
        if let Some(reason) = refusal(m) {
            return Err(LiveError::Ineligible { start, end, reason });
        }
        covered = m.end;
    }
    if covered < end {
        return Err(LiveError::Ineligible {
            start,
            end,
            reason: format!("{covered:#x} is not mapped"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
10000-12000 rw-p 00000000 00:00 0 
Size:                  8 kB
VmFlags: rd wr mr mw me ac 
12000-13000 rw-s 00000000 00:01 5                          /memfd:x (deleted)
VmFlags: rd wr sh mr mw me ms 
13000-14000 rw-p 00000000 08:01 77                         /usr/lib/libc.so.6
VmFlags: rd wr mr mw me ac 
20000-21000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me lo ac 
30000-31000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac mg 
";

    #[test]
    fn refuses_with_the_reason() {
        let maps = parse_smaps(SMAPS);
        assert!(check_in(&maps, 0x10000, 0x12000).is_ok());
        let msg = |s, e| check_in(&maps, s, e).unwrap_err().to_string();
        assert!(msg(0x10000, 0x13000).contains("shared memory"));
        assert!(msg(0x13000, 0x14000).contains("/usr/lib/libc.so.6"));
        assert!(msg(0x20000, 0x21000).contains("locked"));
        assert!(msg(0x30000, 0x31000).contains("kernel's KSM"));
        assert!(msg(0x14000, 0x15000).contains("not mapped"));
        assert!(msg(0x11000, 0x16000).contains("shared memory"));
    }
}
