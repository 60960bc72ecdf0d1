//! # samepage-workload: what samepage merges
//!
//! A [`Workload`] is a list of address spaces, each a sequence of 4096-byte pages loaded in
//! order into one mergeable region: either a raw memory image read from a file, or a generated
//! mix of zero-filled, duplicated and unique pages ([`GenSpec`]) whose converged KSM counters
//! are known in advance ([`GenSpec::expected`]).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use samepage_engine::PAGE_SIZE;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a workload could not be built.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// An image file could not be read.
    #[error("cannot read image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An image's length is not a whole number of pages.
    #[error(
        "image {path} is {len} bytes, not a multiple of the 4096-byte page size; pad or trim it"
    )]
    NotPageMultiple {
        /// The file.
        path: PathBuf,
        /// Its length, bytes.
        len: u64,
    },
    /// An image file is empty.
    #[error(
        "image {0} is empty (0 bytes); give a file of at least one 4096-byte page (files of \
         pseudo file systems report no size and cannot be images)"
    )]
    Empty(PathBuf),
    /// An image is not a regular file.
    #[error(
        "image {path} is {kind}, not a regular file: an image is a file of 4096-byte pages \
         (FIFOs, devices, sockets, directories and the files of /proc and /sys are refused)"
    )]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The workload would not fit in the machine's available memory.
    #[error(
        "{what} would take about {need} of memory, and this machine has {available} available \
         (MemAvailable in /proc/meminfo), of which samepage leaves {keep} to the rest of the \
         system; use a smaller --size or smaller images"
    )]
    TooLarge {
        /// What was to be loaded.
        what: String,
        /// Memory it needs.
        need: Bytes,
        /// Memory available.
        available: Bytes,
        /// Memory left to the rest of the system.
        keep: Bytes,
    },
    /// Ctrl-C came while images were read.
    #[error("interrupted while reading the images")]
    Interrupted,
    /// The parameters of a generated workload are out of range (the message says which).
    #[error("invalid workload: {0}")]
    Invalid(String),
}

/// A size in bytes, shown in MiB or GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1 << 30 {
            write!(f, "{:.1} GiB", b / (1u64 << 30) as f64)
        } else {
            write!(f, "{:.0} MiB", b / (1u64 << 20) as f64)
        }
    }
}

/// Memory a page takes once an engine holds it (the simulator's frame, or the live region's
/// page), with a generous allowance for the bookkeeping around it: what the loaders check
/// against the machine's available memory before allocating anything.
pub const LOADED_BYTES_PER_PAGE: u64 = PAGE_SIZE as u64 + 512;

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where there is no such file).
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Refuse `need` bytes for `what` unless they fit in `available` minus what is left to the
/// rest of the system (a tenth of it, and at least 256 MiB).
pub fn fits_in(need: u64, available: u64, what: &str) -> Result<(), WorkloadError> {
    let keep = (available / 10).max(256 << 20);
    if need > available.saturating_sub(keep) {
        return Err(WorkloadError::TooLarge {
            what: what.to_string(),
            need: Bytes(need),
            available: Bytes(available),
            keep: Bytes(keep),
        });
    }
    Ok(())
}

/// [`fits_in`] the machine's available memory now (no check where it cannot be read).
pub fn check_fits(need: u64, what: &str) -> Result<(), WorkloadError> {
    match mem_available() {
        Some(a) => fits_in(need, a, what),
        None => Ok(()),
    }
}

/// Why a path cannot be read as an input file.
#[derive(Debug)]
pub enum InputFileError {
    /// It could not be opened or its metadata read.
    Io(std::io::Error),
    /// Not a regular file: what it is ("a FIFO", "a character device", ...).
    NotRegular(&'static str),
}

/// Open `path` for reading as an input file of known size: a regular file, not one of `/proc`
/// or `/sys` (whose sizes mean nothing). Opening never blocks (`O_NONBLOCK`: a FIFO without a
/// writer would wait in `open` forever), and the type is checked on the open file. Returns the
/// file and its size.
pub fn open_input_file(path: &Path) -> Result<(File, u64), InputFileError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // A directory opens for reading; EISDIR comes only from other paths, but say it.
            Some(libc::EISDIR) => InputFileError::NotRegular("a directory"),
            // A socket cannot be opened at all.
            Some(libc::ENXIO) => InputFileError::NotRegular("a socket"),
            _ => InputFileError::Io(e),
        })?;
    let m = f.metadata().map_err(InputFileError::Io)?;
    let t = m.file_type();
    let kind = if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else if !t.is_file() {
        Some("not a regular file")
    } else if std::fs::metadata("/proc").is_ok_and(|p| p.dev() == m.dev()) {
        Some("a file of /proc")
    } else if std::fs::metadata("/sys").is_ok_and(|p| p.dev() == m.dev()) {
        Some("a file of /sys")
    } else {
        None
    };
    match kind {
        Some(k) => Err(InputFileError::NotRegular(k)),
        None => Ok((f, m.len())),
    }
}

/// Where the pages of an address space come from.
#[derive(Clone, Debug)]
enum Source {
    Image(Vec<u8>),
    Generated { layout: Vec<u32>, seed: u64 },
}

/// One address space: `pages` pages, loaded in order into one region.
#[derive(Clone, Debug)]
pub struct Space {
    /// A label for reports: the image path, or "generated".
    pub name: String,
    source: Source,
}

/// Content class 0 is the zero page; other classes are distinct contents.
const ZERO_CLASS: u32 = 0;

impl Space {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        match &self.source {
            Source::Image(d) => (d.len() / PAGE_SIZE) as u64,
            Source::Generated { layout, .. } => layout.len() as u64,
        }
    }

    /// Write page `i` into `buf`.
    pub fn fill_page(&self, i: u64, buf: &mut [u8; PAGE_SIZE]) {
        match &self.source {
            Source::Image(d) => {
                let o = i as usize * PAGE_SIZE;
                buf.copy_from_slice(&d[o..o + PAGE_SIZE]);
            }
            Source::Generated { layout, seed } => fill_class(layout[i as usize], *seed, buf),
        }
    }
}

/// SplitMix64: a cheap, well-mixed stream for page contents (and for anything else a
/// workload's user wants to draw deterministically).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The contents of class `class`: zeros for class 0, otherwise a pseudo-random page whose
/// first word is the class number (so two classes never collide).
fn fill_class(class: u32, seed: u64, buf: &mut [u8; PAGE_SIZE]) {
    if class == ZERO_CLASS {
        buf.fill(0);
        return;
    }
    let base = splitmix64(seed ^ ((class as u64) << 20));
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = if i == 0 {
            class as u64
        } else {
            splitmix64(base.wrapping_add(i as u64))
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// A generated workload: `size` bytes of one address space, `zero_pct` percent zero-filled
/// pages, `dup_pct` percent pages in groups of `group` identical pages, the rest unique,
/// shuffled with `seed`.
///
/// ```
/// use samepage_workload::{GenSpec, Workload};
/// let spec = GenSpec { size: 1000 * 4096, zero_pct: 30, dup_pct: 40, group: 16, seed: 7 };
/// let c = spec.counts().unwrap();
/// assert_eq!((c.zero, c.groups, c.unique), (300, 25, 300));
/// // Converged with max_page_sharing=256 and use_zero_pages=1:
/// let e = spec.expected(256, true).unwrap();
/// assert_eq!((e.pages_shared, e.pages_sharing, e.ksm_zero_pages), (25, 375, 300));
/// let w = Workload::generated(&spec).unwrap();
/// assert_eq!(w.total_pages(), 1000);
/// let mut page = [1u8; 4096];
/// w.spaces[0].fill_page(0, &mut page);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenSpec {
    /// Bytes, a positive multiple of 4096.
    pub size: u64,
    /// Percentage of zero-filled pages.
    pub zero_pct: u32,
    /// Percentage of pages in duplicate groups (with `zero_pct`, at most 100).
    pub dup_pct: u32,
    /// Identical pages per duplicate group, at least 2.
    pub group: u32,
    /// Seeds the contents and the shuffle.
    pub seed: u64,
}

/// The page counts of a generated workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenCounts {
    /// All pages.
    pub pages: u64,
    /// Zero-filled pages.
    pub zero: u64,
    /// Duplicate groups.
    pub groups: u64,
    /// Pages in duplicate groups (`groups * group`).
    pub dup: u64,
    /// Pages of their own.
    pub unique: u64,
}

/// Converged counters a generated workload must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// `pages_shared`.
    pub pages_shared: u64,
    /// `pages_sharing`.
    pub pages_sharing: u64,
    /// `ksm_zero_pages`.
    pub ksm_zero_pages: u64,
}

/// What a group of identical pages ends up as ([`group_outcome`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupOutcome {
    /// KSM pages.
    pub pages_shared: u64,
    /// Mappings of them beyond the first of each.
    pub pages_sharing: u64,
}

/// What `n` identical pages end up as with `max_page_sharing` `m` (the formula of the
/// kernel's `ksm_tests.c`, `assert_ksm_pages_count`).
///
/// ```
/// use samepage_workload::{group_outcome, GroupOutcome};
/// // 16 pages, at most 5 mappings per KSM page: 16 % 5 == 1, so 3 full KSM pages and one
/// // page left alone.
/// assert_eq!(group_outcome(16, 5), GroupOutcome { pages_shared: 3, pages_sharing: 12 });
/// assert_eq!(group_outcome(1, 256), GroupOutcome::default());
/// ```
pub fn group_outcome(n: u64, m: u64) -> GroupOutcome {
    let (pages_shared, pages_sharing) = if n < 2 {
        (0, 0)
    } else if n.is_multiple_of(m) || n % m == 1 {
        (n / m, n / m * (m - 1))
    } else {
        (n / m + 1, n - (n / m + 1))
    };
    GroupOutcome {
        pages_shared,
        pages_sharing,
    }
}

impl GenSpec {
    /// Validate and count.
    pub fn counts(&self) -> Result<GenCounts, WorkloadError> {
        if self.size == 0 || !self.size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(WorkloadError::Invalid(format!(
                "--size {} is not a positive multiple of 4096 bytes",
                self.size
            )));
        }
        if self.zero_pct > 100 || self.dup_pct > 100 || self.zero_pct + self.dup_pct > 100 {
            return Err(WorkloadError::Invalid(format!(
                "--zero {} and --dup {} must be percentages adding up to at most 100",
                self.zero_pct, self.dup_pct
            )));
        }
        if self.group < 2 {
            return Err(WorkloadError::Invalid(format!(
                "--group {} must be at least 2 (identical pages per duplicate group)",
                self.group
            )));
        }
        let pages = self.size / PAGE_SIZE as u64;
        let zero = pages * self.zero_pct as u64 / 100;
        let groups = pages * self.dup_pct as u64 / 100 / self.group as u64;
        let dup = groups * self.group as u64;
        if pages - zero - dup + groups >= u32::MAX as u64 {
            return Err(WorkloadError::Invalid("--size is too large".into()));
        }
        Ok(GenCounts {
            pages,
            zero,
            groups,
            dup,
            unique: pages - zero - dup,
        })
    }

    /// Converged counters with the given `max_page_sharing` and `use_zero_pages`.
    pub fn expected(
        &self,
        max_page_sharing: u64,
        use_zero_pages: bool,
    ) -> Result<Expected, WorkloadError> {
        let c = self.counts()?;
        let g = group_outcome(self.group as u64, max_page_sharing);
        let (mut shared, mut sharing) = (c.groups * g.pages_shared, c.groups * g.pages_sharing);
        let mut zero = 0;
        if use_zero_pages {
            zero = c.zero;
        } else {
            let z = group_outcome(c.zero, max_page_sharing);
            shared += z.pages_shared;
            sharing += z.pages_sharing;
        }
        Ok(Expected {
            pages_shared: shared,
            pages_sharing: sharing,
            ksm_zero_pages: zero,
        })
    }

    fn space(&self) -> Result<Space, WorkloadError> {
        let c = self.counts()?;
        check_fits(
            c.pages * (LOADED_BYTES_PER_PAGE + 4),
            &format!("a generated workload of {}", Bytes(self.size)),
        )?;
        let mut layout = Vec::with_capacity(c.pages as usize);
        layout.extend(std::iter::repeat_n(ZERO_CLASS, c.zero as usize));
        for g in 0..c.groups {
            layout.extend(std::iter::repeat_n(1 + g as u32, self.group as usize));
        }
        let first_unique = 1 + c.groups as u32;
        layout.extend((0..c.unique as u32).map(|u| first_unique + u));
        layout.shuffle(&mut Pcg64Mcg::seed_from_u64(self.seed));
        Ok(Space {
            name: format!(
                "generated: {} bytes, {}% zero, {}% in groups of {}, seed {}",
                self.size, self.zero_pct, self.dup_pct, self.group, self.seed
            ),
            source: Source::Generated {
                layout,
                seed: self.seed,
            },
        })
    }
}

/// The demo's machine: `guests` guest-like address spaces of `size / guests` bytes each, laid
/// out in runs as a virtual machine's memory is. Every guest holds the same OS image (kernel,
/// libraries, page cache of the same files) at the same addresses (`shared_pct` percent of its
/// pages), data of its own (`unique_pct`), and free memory that the guest zeroed (the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// Bytes of all guests together.
    pub size: u64,
    /// Number of guests, 1 to 64.
    pub guests: u32,
    /// Percentage of each guest's pages that are the common OS image.
    pub shared_pct: u32,
    /// Percentage that are the guest's own data (with `shared_pct`, at most 100).
    pub unique_pct: u32,
    /// Seeds the layout and the contents.
    pub seed: u64,
}

/// What a page of a guest is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPage {
    /// Part of the OS image every guest has.
    Shared,
    /// The guest's own data.
    Unique,
    /// Free memory, zero-filled.
    Free,
}

impl GuestSpec {
    /// Pages per guest, checked.
    pub fn pages_per_guest(&self) -> Result<u64, WorkloadError> {
        if self.guests == 0 || self.guests > 64 {
            return Err(WorkloadError::Invalid(format!(
                "--guests {} must be between 1 and 64",
                self.guests
            )));
        }
        if self.shared_pct + self.unique_pct > 100 {
            return Err(WorkloadError::Invalid(
                "shared and unique percentages add up to more than 100".into(),
            ));
        }
        let pages = self.size / PAGE_SIZE as u64 / self.guests as u64;
        if pages < 16 || pages >= (u32::MAX as u64) / 128 {
            return Err(WorkloadError::Invalid(format!(
                "--size {} gives {} pages per guest; use at least 64K per guest and less than \
                 a few TiB in all",
                self.size, pages
            )));
        }
        Ok(pages)
    }

    /// The kind of every page of a guest (the same for all guests): runs of 1 to 256 pages.
    pub fn layout(&self) -> Result<Vec<GuestPage>, WorkloadError> {
        let n = self.pages_per_guest()?;
        let mut rng = Pcg64Mcg::seed_from_u64(self.seed);
        let mut left = [
            n * self.shared_pct as u64 / 100,
            n * self.unique_pct as u64 / 100,
            0,
        ];
        left[2] = n - left[0] - left[1];
        let kinds = [GuestPage::Shared, GuestPage::Unique, GuestPage::Free];
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            // Pick a kind in proportion to what is left of it, then a run of it.
            let total: u64 = left.iter().sum();
            let mut r = rng.random_range(0..total);
            let k = (0..3)
                .find(|&k| {
                    if r < left[k] {
                        true
                    } else {
                        r -= left[k];
                        false
                    }
                })
                .expect("some kind has pages left");
            let run = rng.random_range(1..=256u64).min(left[k]);
            out.extend(std::iter::repeat_n(kinds[k], run as usize));
            left[k] -= run;
        }
        Ok(out)
    }

    /// Counters the guests converge to with `use_zero_pages=1` and `max_page_sharing` at
    /// least `guests`: one KSM page per OS-image page, shared by every guest.
    pub fn expected(&self) -> Result<Expected, WorkloadError> {
        let l = self.layout()?;
        let shared = l.iter().filter(|&&k| k == GuestPage::Shared).count() as u64;
        let free = l.iter().filter(|&&k| k == GuestPage::Free).count() as u64;
        let g = self.guests as u64;
        Ok(if g > 1 {
            Expected {
                pages_shared: shared,
                pages_sharing: shared * (g - 1),
                ksm_zero_pages: free * g,
            }
        } else {
            Expected {
                pages_shared: 0,
                pages_sharing: 0,
                ksm_zero_pages: free,
            }
        })
    }
}

impl Workload {
    /// The guests of `spec`, one address space each.
    pub fn guests(spec: &GuestSpec) -> Result<Self, WorkloadError> {
        let per_guest = spec.pages_per_guest()?;
        check_fits(
            per_guest * spec.guests as u64 * (LOADED_BYTES_PER_PAGE + 4),
            &format!(
                "{} guests of {} each",
                spec.guests,
                Bytes(per_guest * PAGE_SIZE as u64)
            ),
        )?;
        let kinds = spec.layout()?;
        let n = kinds.len() as u32;
        let spaces = (0..spec.guests)
            .map(|g| {
                // Class numbers: OS-image pages by position (the same in every guest), then
                // each guest's own data in its own range.
                let own = 1 + n + g * n;
                let layout = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| match k {
                        GuestPage::Shared => 1 + i as u32,
                        GuestPage::Unique => own + i as u32,
                        GuestPage::Free => ZERO_CLASS,
                    })
                    .collect();
                Space {
                    name: format!("guest{g}"),
                    source: Source::Generated {
                        layout,
                        seed: spec.seed,
                    },
                }
            })
            .collect();
        Ok(Self { spaces })
    }
}

/// Address spaces to load.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// One per address space, in load order.
    pub spaces: Vec<Space>,
}

impl Workload {
    /// One address space per image file.
    pub fn from_images<P: AsRef<Path>>(paths: &[P]) -> Result<Self, WorkloadError> {
        Self::from_images_until(paths, &|| false)
    }

    /// One address space per image file; gives up with [`WorkloadError::Interrupted`] as soon
    /// as `cancelled` says so (it is asked between reads of 16 MiB). Every image must be a
    /// regular file (checked on the open file, which opening never blocks for), a multiple of
    /// the page size, and all of them must fit in the machine's available memory, together
    /// with the copy an engine makes: all of it is checked before anything is read.
    pub fn from_images_until<P: AsRef<Path>>(
        paths: &[P],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Self, WorkloadError> {
        let mut files = Vec::new();
        let mut total: u64 = 0;
        for p in paths {
            let path = p.as_ref().to_path_buf();
            let (f, len) = open_input_file(&path).map_err(|e| match e {
                InputFileError::Io(source) => WorkloadError::Read {
                    path: path.clone(),
                    source,
                },
                InputFileError::NotRegular(kind) => WorkloadError::NotRegular {
                    path: path.clone(),
                    kind,
                },
            })?;
            if len == 0 {
                return Err(WorkloadError::Empty(path));
            }
            if len % PAGE_SIZE as u64 != 0 {
                return Err(WorkloadError::NotPageMultiple { len, path });
            }
            total = total.saturating_add(len);
            files.push((path, f, len));
        }
        let pages = total / PAGE_SIZE as u64;
        check_fits(
            total.saturating_add(pages.saturating_mul(LOADED_BYTES_PER_PAGE)),
            &format!(
                "{} of images (read into memory, then copied into the engine)",
                Bytes(total)
            ),
        )?;
        let mut spaces = Vec::new();
        for (path, f, len) in files {
            let read_err = |source| WorkloadError::Read {
                path: path.clone(),
                source,
            };
            let mut data = Vec::new();
            data.try_reserve_exact(len as usize)
                .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::OutOfMemory, e)))?;
            // Exactly the size fstat gave, whatever the file does meanwhile.
            let mut r = f.take(len);
            const CHUNK: usize = 16 << 20;
            loop {
                if cancelled() {
                    return Err(WorkloadError::Interrupted);
                }
                let n = (&mut r)
                    .take(CHUNK as u64)
                    .read_to_end(&mut data)
                    .map_err(read_err)?;
                if n == 0 {
                    break;
                }
            }
            if data.len() as u64 != len {
                return Err(read_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "it shrank from {len} to {} bytes while being read",
                        data.len()
                    ),
                )));
            }
            spaces.push(Space {
                name: path.display().to_string(),
                source: Source::Image(data),
            });
        }
        Ok(Self { spaces })
    }

    /// One generated address space.
    pub fn generated(spec: &GenSpec) -> Result<Self, WorkloadError> {
        Ok(Self {
            spaces: vec![spec.space()?],
        })
    }

    /// Pages in all address spaces.
    pub fn total_pages(&self) -> u64 {
        self.spaces.iter().map(Space::pages).sum()
    }
}

/// Parse a size such as `4096`, `64K`, `256M`, `1G`, `1GiB`, `512MB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 256M, 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn generated_workload_has_the_requested_mix() {
        let spec = GenSpec {
            size: 1000 * 4096,
            zero_pct: 30,
            dup_pct: 40,
            group: 16,
            seed: 7,
        };
        let c = spec.counts().unwrap();
        assert_eq!(
            (c.pages, c.zero, c.groups, c.dup, c.unique),
            (1000, 300, 25, 400, 300)
        );
        let w = Workload::generated(&spec).unwrap();
        let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..w.total_pages() {
            w.spaces[0].fill_page(i, &mut buf);
            *seen.entry(buf.to_vec()).or_default() += 1;
        }
        assert_eq!(seen[&vec![0u8; PAGE_SIZE]], 300);
        assert_eq!(seen.values().filter(|&&n| n == 16).count(), 25);
        assert_eq!(seen.values().filter(|&&n| n == 1).count(), 300);
    }

    #[test]
    fn expected_counters() {
        let spec = GenSpec {
            size: 1000 * 4096,
            zero_pct: 30,
            dup_pct: 40,
            group: 16,
            seed: 7,
        };
        let e = spec.expected(256, true).unwrap();
        assert_eq!(
            (e.pages_shared, e.pages_sharing, e.ksm_zero_pages),
            (25, 375, 300)
        );
        let e = spec.expected(256, false).unwrap();
        assert_eq!(
            (e.pages_shared, e.pages_sharing, e.ksm_zero_pages),
            (27, 375 + 298, 0)
        );
        let e = spec.expected(5, true).unwrap();
        // 16 pages with max 5 mappings per KSM page: 16 % 5 == 1, so 3 KSM pages and 12 more
        // mappings; one page stays alone.
        assert_eq!((e.pages_shared, e.pages_sharing), (75, 300));
    }

    #[test]
    fn bad_specs_are_refused() {
        let ok = GenSpec {
            size: 4096,
            zero_pct: 0,
            dup_pct: 0,
            group: 2,
            seed: 0,
        };
        assert!(ok.counts().is_ok());
        assert!(GenSpec { size: 4095, ..ok }.counts().is_err());
        assert!(GenSpec {
            zero_pct: 60,
            dup_pct: 50,
            ..ok
        }
        .counts()
        .is_err());
        assert!(GenSpec { group: 1, ..ok }.counts().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12Q").is_err());
    }
}
