//! Images that are not images, or too large for the machine, are refused with a sentence,
//! before anything is read or allocated, and without ever blocking.

use samepage_workload::{fits_in, Bytes, Workload, WorkloadError};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("samepage-inputs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Load `path` on another thread: a loader that blocks (a FIFO in `open`) fails the test
/// instead of hanging it.
fn load(path: &Path) -> Result<Workload, WorkloadError> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Workload::from_images(&[p]));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("loading {} blocked", path.display()))
}

fn refused_as(path: &Path, kind: &str) {
    match load(path) {
        Err(e @ WorkloadError::NotRegular { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains(&format!("is {kind}, not a regular file")),
                "{}: {s}",
                path.display()
            );
        }
        other => panic!("{}: {other:?}", path.display()),
    }
}

#[test]
fn only_regular_files_are_images() {
    let dir = tmpdir("kinds");
    refused_as(Path::new("/dev/zero"), "a character device");
    refused_as(Path::new("/dev/urandom"), "a character device");
    refused_as(&dir, "a directory");
    refused_as(Path::new("/proc/self/pagemap"), "a file of /proc");
    refused_as(Path::new("/proc/self/status"), "a file of /proc");
    if Path::new("/sys/kernel/mm").exists() {
        refused_as(
            Path::new("/sys/kernel/mm/transparent_hugepage/enabled"),
            "a file of /sys",
        );
    }
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        // Nobody writes to it: open(2) without O_NONBLOCK would wait forever.
        refused_as(&fifo, "a FIFO");
    } else {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "FIFO case skipped: no mkfifo here");
    }
    let empty = dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(load(&empty), Err(WorkloadError::Empty(_))));
    let missing = dir.join("missing.img");
    let e = load(&missing).unwrap_err().to_string();
    assert!(e.starts_with("cannot read image"), "{e}");
    let ok = dir.join("ok.img");
    std::fs::write(&ok, [7u8; 8192]).unwrap();
    assert_eq!(load(&ok).unwrap().total_pages(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_image_larger_than_the_machine_is_refused_before_it_is_read() {
    let dir = tmpdir("huge");
    let huge = dir.join("huge.img");
    // Sparse: its size is all that is read before the refusal.
    let f = std::fs::File::create(&huge).unwrap();
    let twice = samepage_workload::mem_available().unwrap_or(0) * 2;
    f.set_len(twice.max(1 << 40)).unwrap();
    drop(f);
    let e = load(&huge).unwrap_err();
    assert!(matches!(e, WorkloadError::TooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains("MemAvailable"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reading_stops_when_cancelled() {
    let dir = tmpdir("cancel");
    let img = dir.join("a.img");
    std::fs::write(&img, vec![1u8; 1 << 20]).unwrap();
    let e = Workload::from_images_until(&[&img], &|| true).unwrap_err();
    assert!(matches!(e, WorkloadError::Interrupted), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn workloads_must_leave_room_for_the_rest_of_the_system() {
    let gib = 1u64 << 30;
    assert!(fits_in(8 * gib, 10 * gib, "x").is_ok());
    let e = fits_in(9 * gib + 1, 10 * gib, "x").unwrap_err().to_string();
    assert!(e.contains("x would take about 9.0 GiB"), "{e}");
    assert!(e.contains("leaves 1.0 GiB"), "{e}");
    // At least 256 MiB stay free on a small machine.
    assert!(fits_in(800 << 20, gib, "x").is_err());
    assert!(fits_in(700 << 20, gib, "x").is_ok());
    assert_eq!(Bytes(512 << 20).to_string(), "512 MiB");
    // A generated workload far beyond any machine is refused before its layout is built.
    let spec = samepage_workload::GenSpec {
        size: 1 << 43,
        zero_pct: 30,
        dup_pct: 40,
        group: 16,
        seed: 1,
    };
    let e = Workload::generated(&spec).unwrap_err();
    assert!(matches!(e, WorkloadError::TooLarge { .. }), "{e:?}");
}
