//! `samepage daemon` and `samepage run` with unmodified programs (`programs/mergeable.c`,
//! compiled here with the system's C compiler): exact counts across processes, writes,
//! fork and exec, security domains, and what happens when a client or the daemon dies.
//! They need root (userfaultfd, ptrace access to the clients) and `cc`; without either,
//! each says so and is skipped.

mod common;
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one answer of a program, or a count the daemon should reach, may take.
const PATIENCE: Duration = Duration::from_secs(60);

fn skip(test: &str, why: &str) {
    eprintln!("{test}: skipped: {why}");
}

/// The compiled test program, or why there is none.
fn program() -> Result<&'static Path, &'static str> {
    static BIN: OnceLock<Result<PathBuf, &'static str>> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/mergeable.c");
        let out = tmpdir("daemon-program").join("mergeable");
        match Command::new("cc")
            .args(["-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
        {
            Ok(s) if s.success() => Ok(out),
            Ok(_) => Err("cc could not compile tests/programs/mergeable.c"),
            Err(_) => Err("there is no C compiler (cc) here"),
        }
    })
    .as_deref()
    .map_err(|e| *e)
}

/// The preload library `cargo test` built: in `deps/` next to the binary, where cargo
/// leaves a dependency's cdylib (`samepage run` itself looks beside the binary).
fn preload() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_samepage"))
        .with_file_name("deps")
        .join("libsamepage_preload.so")
}

/// Root and a compiler, or the test is skipped.
fn ready(test: &str) -> Option<&'static Path> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            test,
            "not root: the daemon needs userfaultfd and ptrace access",
        );
        return None;
    }
    assert!(
        preload().is_file(),
        "cargo test builds {} (samepage-preload is a dev-dependency)",
        preload().display()
    );
    match program() {
        Ok(p) => Some(p),
        Err(why) => {
            skip(test, why);
            None
        }
    }
}

/// A process this test started: killed (by pid) and reaped when dropped.
struct Started(Child);

impl Started {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon of this test, on a socket of its own.
struct Daemon {
    child: Started,
    socket: PathBuf,
    log: Receiver<String>,
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Daemon {
    fn start(name: &str, knobs: &[&str]) -> Daemon {
        let socket = tmpdir(&format!("daemon-{name}")).join("samepage.sock");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_samepage"));
        cmd.arg("daemon").arg("--socket").arg(&socket);
        for k in [
            "run=1",
            "use_zero_pages=1",
            "pages_to_scan=4000",
            "sleep_millisecs=5",
        ]
        .iter()
        .chain(knobs)
        {
            cmd.args(["--set", k]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage daemon");
        let log = lines_of(child.stderr.take().unwrap());
        let d = Daemon {
            child: Started(child),
            socket,
            log,
        };
        d.expect_log(&["listening on"]);
        d
    }

    /// Wait for a line of the daemon's log that contains each of `what`.
    fn expect_log(&self, what: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if what.iter().all(|w| l.contains(w)) => return l,
                Ok(_) => {}
                Err(e) => panic!("the daemon never logged {what:?}: {e:?}"),
            }
        }
    }

    /// Wait for the log line that says client `pid` `connected` or `exited`.
    fn expect_client(&self, pid: u32, what: &str) -> String {
        self.expect_log(&[&format!("pid {pid} "), what])
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    fn stat(&self) -> Value {
        json(&["stat", "--daemon", "--socket", self.sock()])
    }

    /// Wait until the daemon's counters satisfy `f`; the last reading otherwise.
    fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.stat();
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never reached {what}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        self.child.kill();
    }
}

impl Drop for Daemon {
    /// A failing test shows what the daemon logged that no check read.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for l in self.log.try_iter() {
                eprintln!("daemon log: {l}");
            }
        }
    }
}

/// One `mergeable` program run under `samepage run`.
struct Program {
    child: Started,
    stdin: ChildStdin,
    out: Receiver<String>,
    pid: u32,
}

/// What one program holds: `pages` pages, every fourth zero, the others of `distinct`
/// values (told apart from other programs' by `salt`).
#[derive(Clone, Copy)]
struct Spec {
    pages: u64,
    distinct: u64,
    salt: u64,
}

impl Spec {
    fn values(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages)
            .filter(|i| i % 4 != 0)
            .map(|i| (1 + i % self.distinct) | (self.salt << 32))
    }
}

impl Program {
    fn start(d: &Daemon, mode: &str, s: Spec, domain: Option<&str>) -> Program {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_samepage"));
        cmd.args(["run", "--socket", d.sock()])
            .env("SAMEPAGE_PRELOAD", preload());
        if let Some(dom) = domain {
            cmd.args(["--domain", dom]);
        }
        let mut child = cmd
            .arg("--")
            .arg(program().unwrap())
            .args([
                mode,
                &s.pages.to_string(),
                &s.distinct.to_string(),
                &s.salt.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start samepage run");
        let stdin = child.stdin.take().unwrap();
        let out = lines_of(child.stdout.take().unwrap());
        let mut p = Program {
            child: Started(child),
            stdin,
            out,
            pid: 0,
        };
        let ready = p.line();
        p.pid = ready
            .strip_prefix("ready ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("expected \"ready PID\", got {ready:?}"));
        p
    }

    fn line(&mut self) -> String {
        match self.out.recv_timeout(PATIENCE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!("pid {} did not answer in time", self.pid),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("pid {} ended: {:?}", self.pid, self.child.0.wait())
            }
        }
    }

    /// Send one command; its answer.
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("the program reads its commands");
        self.line()
    }

    fn verify(&mut self) {
        assert_eq!(self.ask("verify"), "verify ok", "pid {}", self.pid);
    }

    fn kill(&mut self) {
        self.child.kill();
    }
}

/// The kernel's counters for these programs, each group of them in a domain of its own
/// (no value is held by 256 pages or more, so `max_page_sharing` plays no part).
fn expected(domains: &[&[Spec]]) -> (u64, u64, u64) {
    let (mut shared, mut sharing, mut zero) = (0, 0, 0);
    for specs in domains {
        let mut count: HashMap<u64, u64> = HashMap::new();
        for s in specs.iter() {
            zero += s.pages.div_ceil(4);
            for v in s.values() {
                *count.entry(v).or_default() += 1;
            }
        }
        for &n in count.values().filter(|&&n| n > 1) {
            assert!(n < 256, "keep the test away from max_page_sharing");
            shared += 1;
            sharing += n - 1;
        }
    }
    (shared, sharing, zero)
}

/// How many pages `write K` rewrites.
fn written(s: Spec, k: u64) -> u64 {
    (0..s.pages).filter(|i| i % k == 1).count() as u64
}

fn counters(v: &Value) -> (u64, u64, u64) {
    let k = &v["ksm"];
    (
        k["pages_shared"].as_u64().unwrap(),
        k["pages_sharing"].as_u64().unwrap(),
        k["ksm_zero_pages"].as_u64().unwrap(),
    )
}

fn clients(v: &Value) -> Vec<u64> {
    let mut p: Vec<u64> = v["ksm_stat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    p.sort_unstable();
    p
}

fn stat_of(v: &Value, pid: u32) -> Value {
    v["ksm_stat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["pid"] == pid)
        .cloned()
        .unwrap_or_else(|| panic!("no ksm_stat for pid {pid}: {v:#}"))
}

const A: Spec = Spec {
    pages: 1024,
    distinct: 10,
    salt: 0,
};

#[test]
fn programs_merge_across_processes_to_the_kernels_counts() {
    if ready("across processes").is_none() {
        return;
    }
    let d = Daemon::start("across", &[]);
    let mut a = Program::start(&d, "madvise", A, None);
    let mut b = Program::start(&d, "madvise", A, None);
    let want = expected(&[&[A, A]]);
    let v = d.wait_for("the kernel's counts", |v| counters(v) == want);
    let pids = {
        let mut p = vec![a.pid as u64, b.pid as u64];
        p.sort_unstable();
        p
    };
    assert_eq!(
        clients(&v),
        pids,
        "one ksm_stat per client, under its real pid"
    );
    for p in [&a, &b] {
        let s = stat_of(&v, p.pid);
        assert_eq!(s["ksm_zero_pages"], A.pages / 4);
        assert_eq!(s["ksm_mergeable"], true);
        assert_eq!(s["ksm_merge_any"], false);
    }
    a.verify();
    b.verify();

    // Writes break sharing where they land; the rest stays merged and nothing is lost.
    assert_eq!(a.ask("write 4"), format!("written {}", written(A, 4)));
    a.verify();
    b.verify();
    // Every written page was a duplicate; its group still has copies in b.
    let written = written(A, 4);
    d.wait_for("the counts after the writes", |v| {
        let (sh, sg, z) = counters(v);
        sh == want.0 && sg == want.1 - written && z == want.2
    });

    // MADV_UNMERGEABLE gives a its pages back, and the zero pages it held.
    assert_eq!(a.ask("unmerge"), "unmerged");
    a.verify();
    // a's ksm_zero_pages is read from its page tables, the rest from the scanner's last
    // published counters: both must show b alone, which they may not at the same instant.
    d.wait_for("a's pages unmerged, the counts b's alone", |v| {
        stat_of(v, a.pid)["ksm_zero_pages"] == 0
            && stat_of(v, a.pid)["ksm_merging_pages"] == 0
            && counters(v) == expected(&[&[A]])
    });
    b.verify();
    writeln!(a.stdin, "quit").unwrap();
    assert!(a.child.0.wait().unwrap().success());
    d.expect_client(a.pid, "exited");
    // The scan takes a's exit in (as ksmd does), then the counts are b's alone again.
    d.wait_for("a forgotten, b's counts", |v| {
        clients(v) == vec![b.pid as u64] && counters(v) == expected(&[&[A]])
    });
    b.verify();
}

#[test]
fn a_killed_client_is_forgotten_and_the_others_keep_their_pages() {
    if ready("killed client").is_none() {
        return;
    }
    let d = Daemon::start("killed-client", &[]);
    let mut a = Program::start(&d, "madvise", A, None);
    let mut b = Program::start(&d, "madvise", A, None);
    d.wait_for("the kernel's counts", |v| {
        counters(v) == expected(&[&[A, A]])
    });
    let gone = a.pid;
    a.kill();
    d.expect_client(gone, "exited");
    d.wait_for("b alone, with its own counts", |v| {
        clients(v) == vec![b.pid as u64] && counters(v) == expected(&[&[A]])
    });
    b.verify();
    assert_eq!(b.ask("write 2"), format!("written {}", written(A, 2)));
    b.verify();
}

#[test]
fn domains_never_share_a_page() {
    if ready("domains").is_none() {
        return;
    }
    let d = Daemon::start("domains", &[]);
    let mut a = Program::start(&d, "madvise", A, Some("tenant-a"));
    let mut b = Program::start(&d, "madvise", A, Some("tenant-b"));
    let mut c = Program::start(&d, "madvise", A, Some("tenant-b"));
    let want = expected(&[&[A], &[A, A]]);
    d.wait_for("one set of canonical pages per domain", |v| {
        counters(v) == want
    });
    for p in [&mut a, &mut b, &mut c] {
        p.verify();
    }
}

#[test]
fn the_daemon_killed_mid_merge_loses_nothing() {
    if ready("daemon killed").is_none() {
        return;
    }
    // Slow scanning so that the kill lands while merging is under way.
    let big = Spec {
        pages: 16384,
        distinct: 200,
        salt: 7,
    };
    let mut d = Daemon::start("killed-daemon", &["pages_to_scan=256", "sleep_millisecs=1"]);
    let mut a = Program::start(&d, "madvise", big, None);
    let mut b = Program::start(&d, "madvise", big, None);
    let want = expected(&[&[big, big]]);
    let v = d.wait_for("merging under way", |v| {
        let (sh, sg, z) = counters(v);
        sh > 0 && sg > 0 && z > 0
    });
    assert_ne!(counters(&v), want, "the kill should land before the end");
    d.kill();
    for p in [&mut a, &mut b] {
        // Every merged, zero and untouched page reads back; writes and forks still work.
        p.verify();
        assert_eq!(p.ask("write 3"), format!("written {}", written(big, 3)));
        p.verify();
        let forked = p.ask("fork");
        assert!(forked.starts_with("forked "), "{forked}");
        assert!(p.line().ends_with("verify ok"));
        assert!(p.ask("release").ends_with("verify2 ok"));
        assert_eq!(p.line(), "child exit 0");
    }
    // A new program is told the daemon is gone, in a sentence.
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["run", "--socket", d.sock(), "--", "true"])
        .env("SAMEPAGE_PRELOAD", preload())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "unavailable: {e}");
    assert!(e.contains("cannot reach samepage daemon"), "{e}");
}

#[test]
fn merge_everything_is_inherited_by_fork_and_exec() {
    if ready("prctl, fork, exec").is_none() {
        return;
    }
    let d = Daemon::start("prctl", &[]);
    let mut a = Program::start(&d, "prctl", A, None);
    assert_eq!(a.ask("get"), "get_memory_merge 1");
    // The program's heap, allocated after the prctl, merges: at least its own zero pages
    // and duplicates (other anonymous memory of the process may add to them).
    let v = d.wait_for("the heap merged", |v| {
        let s = stat_of(v, a.pid);
        s["ksm_zero_pages"].as_u64().unwrap() >= A.pages / 4
            && s["ksm_merging_pages"].as_u64().unwrap() >= (A.pages - A.pages / 4)
    });
    assert_eq!(stat_of(&v, a.pid)["ksm_merge_any"], true);
    a.verify();

    // The child of a fork is a client of its own, with the flag.
    let forked = a.ask("fork");
    let child: u32 = forked
        .strip_prefix("forked ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{forked}"));
    assert_eq!(a.line(), format!("child {child} verify ok"));
    let v = d.wait_for("the child connected", |v| {
        clients(v).contains(&(child as u64))
    });
    assert_eq!(stat_of(&v, child)["ksm_merge_any"], true);
    a.verify();
    assert_eq!(a.ask("release"), format!("child {child} verify2 ok"));
    assert_eq!(a.line(), "child exit 0");
    d.wait_for("the child forgotten", |v| {
        !clients(v).contains(&(child as u64))
    });

    // exec keeps the flag: the new image's heap merges without asking.
    writeln!(a.stdin, "exec").unwrap();
    assert_eq!(a.line(), "exec get_memory_merge 1");
    assert_eq!(a.line(), format!("ready {}", a.pid));
    // The old image's state goes with its address space; the new image connects anew.
    d.expect_client(a.pid, "exec'd");
    d.expect_client(a.pid, "connected");
    d.wait_for("the new image merged", |v| {
        clients(v).contains(&(a.pid as u64))
            && stat_of(v, a.pid)["ksm_zero_pages"].as_u64().unwrap() >= A.pages / 4
    });
    a.verify();
    assert_eq!(a.ask("unmerge"), "unmerged");
    assert_eq!(a.ask("get"), "get_memory_merge 0");
    a.verify();
}

/// Connect to the daemon's socket (SOCK_SEQPACKET) and send `bytes` as one message.
fn send_raw(socket: &Path, bytes: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket calls on a descriptor this function owns and closes; the address
    // and the buffer are valid for the lengths given.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = socket.as_os_str().as_bytes();
        assert!(path.len() < addr.sun_path.len());
        for (d, &b) in addr.sun_path.iter_mut().zip(path) {
            *d = b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL);
        libc::close(fd);
    }
}

#[test]
fn garbage_and_foreign_users_cannot_hurt_the_daemon() {
    if ready("garbage").is_none() {
        return;
    }
    let d = Daemon::start("garbage", &[]);
    let mut a = Program::start(&d, "madvise", A, None);
    d.wait_for("a merged", |v| counters(v) == expected(&[&[A]]));
    for junk in [
        &b"hello daemon\n"[..],
        &[0xff; 64][..],
        &u32::MAX.to_le_bytes()[..],
        &[0u8; 4096][..],
    ] {
        send_raw(&d.socket, junk);
    }
    // Still serving, with a's pages as they were.
    let v = d.stat();
    assert_eq!(counters(&v), expected(&[&[A]]));
    a.verify();

    // Another user is refused with a sentence that says how to allow it.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_samepage"))
        .args(["stat", "--daemon", "--socket", d.sock()])
        .output();
    match out {
        Err(_) => skip("foreign user", "no setpriv here"),
        Ok(out) => {
            let e = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(77), "permission denied: {e}");
            assert!(e.contains("--allow-uid"), "{e}");
        }
    }
    a.verify();
}

#[test]
fn ctl_writes_knobs_with_the_kernels_validation() {
    if ready("ctl").is_none() {
        return;
    }
    let d = Daemon::start("ctl", &[]);
    let ok = samepage(&["ctl", "--socket", d.sock(), "pages_to_scan=1234"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(d.stat()["ksm"]["pages_to_scan"], 1234);
    let e = err_code(&["ctl", "--socket", d.sock(), "pages_to_scan=-1"], 2);
    assert!(e.contains("EINVAL"), "{e}");
    let e = err_code(&["ctl", "--socket", d.sock(), "no_such_knob=1"], 2);
    assert!(e.contains("no_such_knob"), "{e}");
    assert_eq!(d.stat()["ksm"]["pages_to_scan"], 1234);
    // A program `run` cannot start exits as a shell says it (127: not found).
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["run", "--socket", d.sock(), "--", "/no/such/program"])
        .env("SAMEPAGE_PRELOAD", preload())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{e}");
    assert!(e.contains("cannot run /no/such/program"), "{e}");
}
