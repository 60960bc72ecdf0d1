//! A page pinned for I/O (an io_uring fixed buffer) is never merged: write protection does not
//! stop the device, so samepage detects the pin (UFFDIO_MOVE answers EBUSY) and skips it. The
//! I/O into it after the merge pass lands where the application reads it.

mod common;

use common::full_scans;
use samepage_linux::LiveKsm;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::PS;

#[test]
fn pinned_page_is_skipped_and_its_io_is_not_lost() {
    let ksm = LiveKsm::new().expect("live engine");
    ksm.set_knob("pages_to_scan", "1000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 8 * PS).unwrap();
    for i in 0..8 {
        r.write(i * PS, &[0x77; 4096]).unwrap();
    }
    let pinned = r.start() + 3 * PS;
    let mut ring = io_uring::IoUring::new(4).expect("io_uring");
    let iov = libc::iovec {
        iov_base: pinned as *mut libc::c_void,
        iov_len: PS as usize,
    };
    // SAFETY: the buffer is a page of a region that stays mapped until the buffers are
    // unregistered below.
    unsafe { ring.submitter().register_buffers(&[iov]) }.expect("register_buffers");

    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 3);
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 6), "{c:?}");
    assert!(ksm.stats().agent.pinned_skipped > 0);

    // The device writes into the pinned page now; the application must see it.
    let path = std::env::temp_dir().join(format!("samepage-pinned-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"NEWDATA!").unwrap();
    drop(f);
    let f = std::fs::File::open(&path).unwrap();
    let sqe = io_uring::opcode::ReadFixed::new(
        io_uring::types::Fd(f.as_raw_fd()),
        pinned as *mut u8,
        8,
        0,
    )
    .offset(0)
    .build()
    .user_data(7);
    // SAFETY: the target is the registered buffer (index 0), which stays mapped.
    unsafe { ring.submission().push(&sqe) }.expect("submission queue");
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().expect("completion");
    assert_eq!(cqe.result(), 8);
    let mut buf = [0u8; 4096];
    r.read(3 * PS, &mut buf).unwrap();
    assert_eq!(&buf[..8], b"NEWDATA!");
    assert_eq!(buf[8], 0x77);
    std::fs::remove_file(&path).unwrap();
    assert!(ksm.verify().problems().is_empty());

    // Unpinned and identical again: it merges (once smart scan, which has been skipping the
    // page it could not merge for more and more passes, looks at it again).
    ring.submitter().unregister_buffers().unwrap();
    r.write(3 * PS, &[0x77; 8]).unwrap();
    ksm.set_knob("run", "1").unwrap();
    let mut scans = 0;
    while ksm.counters().pages_sharing < 7 && scans < 64 {
        assert!(ksm.wait_full_scans(1, Duration::from_secs(30)));
        scans += 1;
    }
    ksm.set_knob("run", "0").unwrap();
    assert_eq!(
        ksm.counters().pages_sharing,
        7,
        "after {scans} more full scans"
    );
}
