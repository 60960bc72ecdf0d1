//! The application moves merged pages with mremap: they stay merged and keep their
//! contents wherever they go.

mod common;

use common::*;
use samepage_linux::PageKind;

fn move_page(old: u64, new: u64) {
    // SAFETY: both are pages this test owns; nothing refers into them.
    let p = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            PS as usize,
            PS as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new as *mut libc::c_void,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn merged_pages_moved_out_and_back_keep_their_contents() {
    let ksm = engine();
    let mm = ksm.new_mm();
    let a = mmap_anon(16 * PS);
    // SAFETY: the test owns the mapping and keeps it.
    let r = unsafe { ksm.adopt_region(mm, a, 16 * PS) }.unwrap();
    fill(&r, |i| [if i < 8 { 3 } else { 5 }; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 2);
    assert_eq!(merged_pages(&ksm, a, 16 * PS), 16);
    let park = mmap_anon(PS);
    move_page(a + 2 * PS, park);
    assert_eq!(
        ksm.page(park).kind,
        PageKind::Merged { canonical: 0 },
        "moved with its state"
    );
    move_page(park, a + 2 * PS);
    assert_eq!(ksm.page(a + 2 * PS).kind, PageKind::Merged { canonical: 0 });
    let mut buf = [0u8; 4096];
    r.read(2 * PS, &mut buf).unwrap();
    assert_eq!(buf, [3; 4096]);
    // Moved out for good: still its contents there.
    let park = mmap_anon(PS);
    move_page(a + 9 * PS, park);
    let mut b = [0u8; 4096];
    // SAFETY: reading 4096 bytes of the page the test just moved there.
    unsafe { std::ptr::copy_nonoverlapping(park as *const u8, b.as_mut_ptr(), 4096) };
    assert_eq!(b, [5; 4096]);
    assert!(
        ksm.verify().problems().is_empty(),
        "{:?}",
        ksm.verify().problems()
    );
}
