//! # samepage-sim: a deterministic simulated memory manager for the KSM engine
//!
//! [`SimMemory`] implements [`samepage_engine::Memory`] over simulated address spaces;
//! [`SimSystem`] adds KSM and ksmd on a virtual clock, with system-call-like entry points
//! (`mmap`, `madvise`, `prctl`, `fork`, `exit`) that call KSM's hooks where Linux does.
//!
//! ```
//! use samepage_sim::{Advice, Prot, SimSystem};
//! let mut sys = SimSystem::new();
//! let p = sys.spawn();
//! let a = sys.mmap(p, 4 * 4096, Prot::RW).unwrap();
//! for i in 0..4 {
//!     sys.write(p, a + i * 4096, &[0xcf; 4096]).unwrap();
//! }
//! sys.madvise(p, a, 4 * 4096, Advice::Mergeable).unwrap();
//! sys.write_knob("pages_to_scan", "100").unwrap();
//! assert!(sys.ksm_start());
//! let c = sys.counters();
//! assert_eq!((c.pages_shared, c.pages_sharing), (1, 3));
//! ```
//!
//! It models what KSM's behaviour depends on (see [`mm`]), and on purpose the failures a real
//! backend meets: a machine with few frames ([`SimMemory::set_frame_limit`]: unmerging runs
//! out of memory), merges carried out at the end of the scan batch and failing
//! ([`SimMemory::defer_merges`], [`FailEvery`]), processes acting while a batch runs
//! ([`SimMemory::during_batch`]).
//!
//! ## Features
//!
//! - `test-hooks`: `SimSystem::mem_mut` and `SimSystem::parts_mut` (the parts of the
//!   machine, to act behind KSM's back), and the engine's own test hooks.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod mm;
pub mod system;

pub use mm::{BatchRace, FailEvery, Prot, Pte, SimError, SimMemory, Vma};
pub use system::{Advice, SimSystem, Spawned, SysError, VirtualClock, SIM_NS_PER_PAGE};
