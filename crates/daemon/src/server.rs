//! The daemon: its socket, its clients, and the link from ksmd to each client's agent.

use rustc_hash::FxHashMap;
use samepage_engine::{MmId, COUNTER_NAMES, TUNABLE_NAMES};
use samepage_linux::ipc::{self, EventFd};
use samepage_linux::ksmd::{AgentLink, Ksmd};
use samepage_linux::ops::{Change, Op};
use samepage_linux::wire::{self, ClientStat, Envelope, Message, Request, Response, StatReply};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long ksmd waits for a client's agent to finish a batch before it stops sending it
/// batches (until the batch's end comes back): a stopped or stuck client must not hold up
/// merging for everyone else.
const BATCH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// Users besides the daemon's own allowed to connect.
    pub allow_uids: Vec<u32>,
    /// Groups whose members may connect.
    pub allow_gids: Vec<u32>,
    /// Knobs to write before listening (`run=1` starts scanning).
    pub knobs: Vec<(String, String)>,
    /// Print what happens (connections, refusals, ignored ranges) on standard error.
    pub log: bool,
}

/// Why the daemon cannot start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Another daemon listens on the socket already.
    #[error(
        "another samepage daemon already listens on {0}: stop it first, or give --socket another path"
    )]
    InUse(PathBuf),
    /// The socket could not be made.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A knob given on the command line was refused.
    #[error("--set {name}={value}: {source}")]
    Knob {
        /// The knob.
        name: String,
        /// Its value.
        value: String,
        /// Why.
        #[source]
        source: samepage_engine::KnobError,
    },
    /// Starting ksmd or a thread failed.
    #[error("{what}: {source}")]
    Io {
        /// What the daemon was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Makes the daemon stop (from a signal handler's thread, say).
#[derive(Clone, Debug)]
pub struct Stop(Arc<EventFd>);

impl Stop {
    /// A new stop switch.
    pub fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(EventFd::new()?)))
    }
    /// Stop the daemon.
    pub fn stop(&self) {
        self.0.signal();
    }
}

/// Changes an agent sent, and how far its batches got.
#[derive(Default)]
struct Inbox {
    changes: Vec<Change>,
    /// Parts of each batch whose end came back.
    done: FxHashMap<u64, u32>,
    closed: bool,
}

/// One client connection.
struct Conn {
    sock: OwnedFd,
    send_lock: Mutex<()>,
    inbox: Mutex<Inbox>,
    cv: Condvar,
}

impl Conn {
    fn send(&self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
        let _g = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        ipc::send_with_fds(self.sock.as_fd(), bytes, fds)
    }

    fn reply(&self, id: u32, r: Response) {
        let _ = self.send(&wire::encode_json(&Envelope::Reply(id, r)), &[]);
    }

    fn close(&self) {
        let mut i = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        i.closed = true;
        drop(i);
        self.cv.notify_all();
        ipc::shutdown(self.sock.as_fd());
    }
}

/// ksmd's link to a client's agent, across its socket.
struct RemoteLink(Arc<Conn>);

impl AgentLink for RemoteLink {
    fn execute(&mut self, seq: u64, ops: &[Op]) -> io::Result<()> {
        let parts: Vec<&[Op]> = ops.chunks(wire::MAX_RECORDS).collect();
        for p in &parts {
            self.0.send(&wire::encode_execute(seq, p), &[])?;
        }
        let deadline = Instant::now() + BATCH_TIMEOUT;
        let mut i = self.0.inbox.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if i.done.get(&seq).copied().unwrap_or(0) as usize >= parts.len() {
                i.done.remove(&seq);
                return Ok(());
            }
            if i.closed {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            i = self
                .0
                .cv
                .wait_timeout(i, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn drain(&mut self, out: &mut Vec<Change>) {
        out.append(
            &mut self
                .0
                .inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .changes,
        );
    }

    fn zero_pages(&self, _mm: MmId) -> Option<i64> {
        None
    }

    fn gone(&self) -> bool {
        self.0
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed
    }
}

/// What the daemon knows of a client with an agent.
struct Client {
    pid: u32,
    /// Its address space in the engine: one per connection, never the pid, since after an
    /// exec the same pid has a new address space while the old one's state is still freed.
    mm: MmId,
    /// The process's start time: with `pid`, it names the process across exec.
    started: u64,
    comm: String,
    domain: String,
    target: usize,
    conn: Arc<Conn>,
    /// Ranges it registered, sorted.
    regions: Vec<(u64, u64)>,
    /// Ranges it advised that cannot be merged, as sentences.
    ignored: Vec<String>,
}

struct Shared {
    ksmd: Ksmd,
    cfg: Config,
    stop: EventFd,
    clients: Mutex<FxHashMap<u64, Client>>,
    /// Notified when a client leaves `clients`.
    client_left: Condvar,
    next_client: AtomicU64,
    next_mm: AtomicU32,
    /// Security domains by (uid, name).
    domains: Mutex<FxHashMap<(u32, String), u32>>,
    /// Processes that asked for PR_SET_MEMORY_MERGE, by (pid, start time): an exec keeps
    /// both, so a process that execs keeps merging everything, as the kernel's does.
    merge_any: Mutex<FxHashMap<(u32, u64), ()>>,
    /// Clients whose connection ended while their process lives.
    departed: Mutex<Vec<Departed>>,
    departed_kick: EventFd,
    stopping: AtomicBool,
}

impl Shared {
    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.cfg.log {
            eprintln!("samepage daemon: {msg}");
        }
    }

    /// The id of a security domain, new or known; `None` once there are as many as the
    /// engine can tell apart.
    fn domain(&self, uid: u32, name: &str) -> Option<u32> {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let n = d.len() as u32;
        match d.entry((uid, name.to_string())) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(_)
                if n >= samepage_linux::ksmd::MAX_DOMAINS =>
            {
                None
            }
            std::collections::hash_map::Entry::Vacant(e) => Some(*e.insert(n)),
        }
    }

    fn stat(&self) -> StatReply {
        let c = self.ksmd.counters();
        let mut ksm = std::collections::BTreeMap::new();
        for &n in COUNTER_NAMES {
            if let Some(v) = c.get(n) {
                ksm.insert(n.to_string(), v.to_string());
            }
        }
        for &n in TUNABLE_NAMES {
            if let Some(v) = self.ksmd.knob(n) {
                ksm.insert(n.to_string(), v);
            }
        }
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut ksm_stat: Vec<ClientStat> = clients
            .values()
            .map(|cl| {
                let s = self.ksmd.ksm_stat(cl.mm);
                ClientStat {
                    pid: cl.pid,
                    comm: cl.comm.clone(),
                    domain: cl.domain.clone(),
                    ksm_rmap_items: s.ksm_rmap_items,
                    ksm_zero_pages: s.ksm_zero_pages,
                    ksm_merging_pages: s.ksm_merging_pages,
                    ksm_process_profit: s.ksm_process_profit,
                    ksm_merge_any: s.ksm_merge_any,
                    ksm_mergeable: s.ksm_mergeable,
                    ignored: cl.ignored.clone(),
                }
            })
            .collect();
        ksm_stat.sort_by_key(|s| s.pid);
        StatReply {
            ksm,
            ksm_stat,
            ksmd: self.ksmd.stats(),
        }
    }
}

/// A running daemon.
pub struct Daemon {
    sh: Arc<Shared>,
    socket: PathBuf,
}

impl Daemon {
    /// The state `samepage stat --daemon` shows.
    pub fn stat(&self) -> StatReply {
        self.sh.stat()
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The engine (for reports).
    pub fn ksmd(&self) -> &Ksmd {
        &self.sh.ksmd
    }
}

impl Drop for Daemon {
    /// Stop listening and close every connection. Clients keep running with all their data:
    /// their agents resolve faults on merged pages from the stores they hold.
    fn drop(&mut self) {
        self.sh.stopping.store(true, Ordering::Release);
        self.sh.stop.signal();
        let _ = std::fs::remove_file(&self.socket);
        for c in self
            .sh
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            c.conn.close();
        }
    }
}

/// Start the daemon: bind the socket, write the knobs, accept clients. It runs until
/// `stop` is triggered; then it returns, having stopped listening and closed every
/// connection.
pub fn serve(
    cfg: Config,
    stop: &Stop,
    mut every_second: impl FnMut(&Daemon),
) -> Result<(), DaemonError> {
    let d = start(cfg)?;
    loop {
        let r = ipc::poll(&[stop.0.fd()], 1000).map_err(|source| DaemonError::Io {
            what: "waiting for a signal",
            source,
        })?;
        if r[0] != 0 {
            break;
        }
        every_second(&d);
    }
    every_second(&d);
    drop(d);
    Ok(())
}

fn start(cfg: Config) -> Result<Daemon, DaemonError> {
    let path = cfg.socket.clone();
    if path.exists() {
        // A live daemon answers; a file left by a killed one does not.
        if ipc::seqpacket_connect(&path).is_ok() {
            return Err(DaemonError::InUse(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = ipc::seqpacket_listen(&path).map_err(|source| DaemonError::Socket {
        path: path.clone(),
        source,
    })?;
    // Anyone may connect to the file; who is served is decided by SO_PEERCRED.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    let ksmd = Ksmd::new().map_err(|source| DaemonError::Io {
        what: "starting ksmd",
        source,
    })?;
    for (k, v) in &cfg.knobs {
        ksmd.write_knob(k, v).map_err(|source| DaemonError::Knob {
            name: k.clone(),
            value: v.clone(),
            source,
        })?;
    }
    let io = |what| move |source| DaemonError::Io { what, source };
    let sh = Arc::new(Shared {
        ksmd,
        cfg,
        stop: EventFd::new().map_err(io("creating an eventfd"))?,
        clients: Mutex::new(FxHashMap::default()),
        client_left: Condvar::new(),
        next_client: AtomicU64::new(1),
        next_mm: AtomicU32::new(1),
        domains: Mutex::new(FxHashMap::default()),
        merge_any: Mutex::new(FxHashMap::default()),
        departed: Mutex::new(Vec::new()),
        departed_kick: EventFd::new().map_err(io("creating an eventfd"))?,
        stopping: AtomicBool::new(false),
    });
    let s = sh.clone();
    std::thread::Builder::new()
        .name("samepage-accept".into())
        .spawn(move || accept_loop(&s, listener))
        .map_err(io("starting the accepting thread"))?;
    let s = sh.clone();
    std::thread::Builder::new()
        .name("samepage-reaper".into())
        .spawn(move || reap_loop(&s))
        .map_err(io("starting the reaping thread"))?;
    sh.log(format_args!("listening on {}", path.display()));
    Ok(Daemon { sh, socket: path })
}

fn accept_loop(sh: &Arc<Shared>, listener: OwnedFd) {
    loop {
        let Ok(r) = ipc::poll(&[listener.as_fd(), sh.stop.fd()], -1) else {
            return;
        };
        if r[1] != 0 || sh.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(sock) = ipc::accept(listener.as_fd()) else {
            continue;
        };
        let s = sh.clone();
        let _ = std::thread::Builder::new()
            .name("samepage-client".into())
            .spawn(move || serve_client(&s, sock));
    }
}

/// Groups of process `pid` (its primary and supplementary ones), from /proc.
fn groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat`: when the process started (kept across exec).
fn start_time(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            after.split_whitespace().nth(19)?.parse().ok()
        })
        .unwrap_or(0)
}

fn serve_client(sh: &Arc<Shared>, sock: OwnedFd) {
    let Ok(cred) = ipc::peer_cred(sock.as_fd()) else {
        return;
    };
    let conn = Arc::new(Conn {
        sock,
        send_lock: Mutex::new(()),
        inbox: Mutex::new(Inbox::default()),
        cv: Condvar::new(),
    });
    let me = ipc::euid();
    let allowed = cred.uid == me
        || me == 0 && cred.uid == 0
        || sh.cfg.allow_uids.contains(&cred.uid)
        || std::iter::once(cred.gid)
            .chain(groups(cred.pid))
            .any(|g| sh.cfg.allow_gids.contains(&g));
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    // The first message must be a hello, and come soon.
    let hello = match recv(&conn, &mut buf, Some(HELLO_TIMEOUT)) {
        Some(Ok(Message::Json(Envelope::Request(
            0,
            Request::Hello {
                version,
                domain,
                agent,
                merge_any,
            },
        )))) => (version, domain, agent, merge_any),
        _ => {
            sh.log(format_args!(
                "pid {}: no hello; connection closed",
                cred.pid
            ));
            conn.close();
            return;
        }
    };
    if !allowed {
        sh.log(format_args!(
            "pid {} (uid {}, {}) refused: only uid {me} and the users and groups of --allow-uid / --allow-gid may connect",
            cred.pid,
            cred.uid,
            comm(cred.pid)
        ));
        conn.reply(
            0,
            Response::Error {
                errno: libc_eperm(),
                message: format!(
                    "samepage daemon serves uid {me} only (and those given with --allow-uid \
                     or --allow-gid); this process runs as uid {}",
                    cred.uid
                ),
            },
        );
        conn.close();
        return;
    }
    let (version, domain, agent, merge_any) = hello;
    if version != wire::VERSION {
        conn.reply(
            0,
            Response::Error {
                errno: libc_einval(),
                message: format!(
                    "this samepage daemon speaks protocol {}, the client {version}: use the same samepage for both",
                    wire::VERSION
                ),
            },
        );
        conn.close();
        return;
    }
    if !agent {
        // A control client (`samepage ctl`, `stat --daemon`, or a program under
        // `samepage run` asking whether it merges everything since before an exec):
        // requests only.
        let inherited = sh
            .merge_any
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(cred.pid, start_time(cred.pid)));
        conn.reply(
            0,
            Response::Welcome {
                pid: cred.pid,
                merge_any: inherited,
            },
        );
        while let Some(Ok(Message::Json(Envelope::Request(id, r)))) = recv(&conn, &mut buf, None) {
            let resp = handle(sh, None, r);
            conn.reply(id, resp);
        }
        conn.close();
        return;
    }
    serve_agent(sh, conn, cred, domain, merge_any, &mut buf);
}

fn libc_eperm() -> i32 {
    1
}
fn libc_einval() -> i32 {
    22
}
fn libc_enospc() -> i32 {
    28
}

/// Receive one message; `None` when the connection ended (or timed out).
fn recv(
    conn: &Conn,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> Option<Result<Message, wire::WireError>> {
    if let Some(t) = timeout {
        let r = ipc::poll(&[conn.sock.as_fd()], t.as_millis() as i32).ok()?;
        if r[0] == 0 {
            return None;
        }
    }
    match ipc::recv_with_fds(conn.sock.as_fd(), buf) {
        Ok((0, _)) | Err(_) => None,
        // Descriptors a client sends are dropped (closed) here: the daemon takes none.
        Ok((n, _fds)) => Some(wire::decode(&buf[..n])),
    }
}

fn serve_agent(
    sh: &Arc<Shared>,
    conn: Arc<Conn>,
    cred: ipc::PeerCred,
    domain: Option<String>,
    merge_any: bool,
    buf: &mut [u8],
) {
    let pid = cred.pid;
    let dname = match &domain {
        Some(d) => format!("uid{}:{d}", cred.uid),
        None => format!("uid{}", cred.uid),
    };
    let Some(dom) = sh.domain(cred.uid, domain.as_deref().unwrap_or("")) else {
        conn.reply(
            0,
            Response::Error {
                errno: libc_enospc(),
                message: format!(
                    "samepage daemon serves {} security domains already, the most it can; \
                     run this program without --domain, or in a domain that exists",
                    samepage_linux::ksmd::MAX_DOMAINS
                ),
            },
        );
        conn.close();
        return;
    };
    let Ok(pidfd) = ipc::pidfd_open(pid) else {
        conn.close();
        return;
    };
    let started = start_time(pid);
    {
        // An exec closed the old image's connection before the new image could connect,
        // but its end may not be handled yet: wait for it (briefly: it is closed).
        let cl = sh.clients.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sh
            .client_left
            .wait_timeout_while(cl, Duration::from_secs(5), |cl| {
                cl.values().any(|c| c.pid == pid && c.started == started)
            });
    }
    // The same process connecting again has exec'd (its connection closed on exec): the
    // address space its old image had is gone, and what only it used goes with it.
    let old: Vec<Departed> = {
        let mut d = sh.departed.lock().unwrap_or_else(|e| e.into_inner());
        let (old, keep) = d
            .drain(..)
            .partition(|x: &Departed| x.pid == pid && x.started == started);
        *d = keep;
        old
    };
    for gone in old {
        sh.ksmd.exit_target(gone.target);
        sh.log(format_args!(
            "pid {pid} ({}) exec'd; the state of its old image is freed",
            gone.comm
        ));
    }
    let (target, store) = match sh
        .ksmd
        .add_target(pid, dom, Box::new(RemoteLink(conn.clone())))
    {
        Ok(t) => t,
        Err(e) => {
            conn.reply(
                0,
                Response::Error {
                    errno: e.raw_os_error().unwrap_or(libc_eperm()),
                    message: format!(
                        "samepage daemon cannot read the memory of pid {pid} ({e}): it needs \
                         ptrace access to its clients (the same uid, or root)"
                    ),
                },
            );
            conn.close();
            return;
        }
    };
    let mm = MmId(sh.next_mm.fetch_add(1, Ordering::Relaxed));
    if sh.ksmd.bind_mm(mm, target, dom).is_err() {
        sh.ksmd.exit_target(target);
        conn.close();
        return;
    }
    let execed = sh
        .merge_any
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&(pid, started));
    let merge_any = merge_any || execed;
    let id = sh.next_client.fetch_add(1, Ordering::Relaxed);
    sh.clients.lock().unwrap_or_else(|e| e.into_inner()).insert(
        id,
        Client {
            pid,
            mm,
            started,
            comm: comm(pid),
            domain: dname.clone(),
            target,
            conn: conn.clone(),
            regions: Vec::new(),
            ignored: Vec::new(),
        },
    );
    let welcome = wire::encode_json(&Envelope::Reply(0, Response::Welcome { pid, merge_any }));
    if conn.send(&welcome, &[store.as_fd()]).is_err() {
        departed(sh, id, pidfd);
        return;
    }
    // Only after the welcome: from here on the scanner may send this client batches.
    if merge_any {
        let _ = sh.ksmd.set_memory_merge(mm, true);
    }
    drop(store);
    sh.log(format_args!(
        "pid {pid} ({}) connected in domain {dname}{}",
        comm(pid),
        if merge_any {
            ", merging all its memory"
        } else {
            ""
        }
    ));
    // Requests go to a worker: they take the engine, which the scanner may hold while it
    // waits for this very connection to bring a batch's end back.
    let (tx, rx) = mpsc::channel::<(u32, Request)>();
    let s = sh.clone();
    let c = conn.clone();
    let worker = std::thread::Builder::new()
        .name("samepage-requests".into())
        .spawn(move || {
            for (rid, r) in rx {
                let resp = handle(&s, Some((id, started)), r);
                c.reply(rid, resp);
            }
        });
    if worker.is_err() {
        departed(sh, id, pidfd);
        return;
    }
    loop {
        match recv(&conn, buf, None) {
            Some(Ok(Message::Changes(ch))) => {
                let mut i = conn.inbox.lock().unwrap_or_else(|e| e.into_inner());
                for c in &ch {
                    if let Change::BatchDone { seq, .. } = c {
                        *i.done.entry(*seq).or_default() += 1;
                    }
                }
                i.changes.extend(ch);
                drop(i);
                conn.cv.notify_all();
                sh.ksmd.changes_notifier()();
            }
            Some(Ok(Message::Json(Envelope::Request(rid, r)))) => {
                if tx.send((rid, r)).is_err() {
                    break;
                }
            }
            Some(other) => {
                sh.log(format_args!(
                    "pid {pid}: {}; connection closed",
                    match other {
                        Err(e) => e.to_string(),
                        Ok(m) => format!("unexpected message {m:?}"),
                    }
                ));
                break;
            }
            None => break,
        }
    }
    drop(tx);
    departed(sh, id, pidfd);
}

/// A client's connection ended: it gets no more batches; once its process has exited, what
/// only it used is released.
fn departed(sh: &Shared, id: u64, pidfd: OwnedFd) {
    let Some((pid, started, comm, target, conn)) = sh
        .clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .map(|c| (c.pid, c.started, c.comm.clone(), c.target, c.conn.clone()))
    else {
        return;
    };
    conn.close();
    if ipc::pidfd_exited(pidfd.as_fd()) {
        sh.ksmd.exit_target(target);
        sh.log(format_args!(
            "pid {pid} ({comm}) exited; its state is freed"
        ));
    } else {
        sh.ksmd.detach_target(target);
        sh.log(format_args!(
            "pid {pid} ({comm}) disconnected; its merged pages stay valid until it exits"
        ));
        sh.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Departed {
                pidfd,
                target,
                pid,
                started,
                comm,
            });
        sh.departed_kick.signal();
    }
    // Only now: a new image of this process (after exec) waits for its old one to be
    // either freed or in `departed`.
    sh.clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    sh.client_left.notify_all();
}

/// A client whose connection ended before its process did: its pidfd says when to free
/// its state.
struct Departed {
    pidfd: OwnedFd,
    target: usize,
    pid: u32,
    started: u64,
    comm: String,
}

/// Release the state of departed clients as their processes exit.
fn reap_loop(sh: &Shared) {
    loop {
        // Poll copies of the pidfds: a client departing meanwhile must not wait for the
        // lock this thread would hold while it sleeps.
        let watched: Vec<OwnedFd> = sh
            .departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|d| d.pidfd.try_clone().ok())
            .collect();
        let mut fds = vec![sh.departed_kick.fd(), sh.stop.fd()];
        fds.extend(watched.iter().map(|p| p.as_fd()));
        let Ok(ready) = ipc::poll(&fds, -1) else {
            return;
        };
        if ready[1] != 0 {
            return;
        }
        sh.departed_kick.clear();
        let mut d = sh.departed.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = 0;
        while i < d.len() {
            if ipc::pidfd_exited(d[i].pidfd.as_fd()) {
                let gone = d.remove(i);
                sh.ksmd.exit_target(gone.target);
                sh.log(format_args!(
                    "pid {} ({}) exited; its state is freed",
                    gone.pid, gone.comm
                ));
            } else {
                i += 1;
            }
        }
    }
}

/// One request.
fn handle(sh: &Shared, client: Option<(u64, u64)>, r: Request) -> Response {
    let err = |errno: i32, message: String| Response::Error { errno, message };
    let with_client = |f: &mut dyn FnMut(&mut Client) -> Response| -> Response {
        let Some((id, _)) = client else {
            return err(
                libc_einval(),
                "only a process with an agent can ask this".into(),
            );
        };
        let mut cl = sh.clients.lock().unwrap_or_else(|e| e.into_inner());
        match cl.get_mut(&id) {
            Some(c) => f(c),
            None => err(libc_einval(), "the connection is closing".into()),
        }
    };
    match r {
        Request::Hello { .. } => err(libc_einval(), "hello twice".into()),
        Request::Register {
            start,
            end,
            mergeable,
        } => {
            if start >= end
                || start % samepage_engine::PAGE_SIZE_U64 != 0
                || end % samepage_engine::PAGE_SIZE_U64 != 0
                || end > 0x7fff_ffff_f000
            {
                return err(
                    libc_einval(),
                    format!("{start:#x}-{end:#x} is not a page-aligned range of user space"),
                );
            }
            let target = match with_client(&mut |c| {
                if c.regions.iter().any(|&(s, e)| s < end && e > start) {
                    return err(
                        16,
                        format!("{start:#x}-{end:#x} overlaps a range registered already"),
                    );
                }
                let i = c.regions.partition_point(|&(s, _)| s < start);
                c.regions.insert(i, (start, end));
                Response::Welcome {
                    pid: c.target as u32,
                    merge_any: false,
                }
            }) {
                Response::Welcome { pid, .. } => pid as usize,
                e => return e,
            };
            let (id, _) = client.expect("checked above");
            let mm = sh
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .map(|c| c.mm);
            let Some(mm) = mm else {
                return err(libc_einval(), "the connection is closing".into());
            };
            sh.ksmd.add_region(target, mm, start, end, mergeable);
            Response::Ok
        }
        Request::Madvise { start, end, on } => {
            let Some((_, mm)) = client_mm(sh, client) else {
                return err(
                    libc_einval(),
                    "only a process with an agent can ask this".into(),
                );
            };
            match sh.ksmd.madvise(mm, start, end, on) {
                Ok(()) => Response::Ok,
                Err(e) => err(12, format!("unmerging failed: {e}")),
            }
        }
        Request::SetMemoryMerge { on } => {
            let Some((pid, mm)) = client_mm(sh, client) else {
                return err(
                    libc_einval(),
                    "only a process with an agent can ask this".into(),
                );
            };
            let started = client.map(|c| c.1).unwrap_or(0);
            {
                let mut m = sh.merge_any.lock().unwrap_or_else(|e| e.into_inner());
                if on {
                    m.insert((pid, started), ());
                } else {
                    m.remove(&(pid, started));
                }
            }
            match sh.ksmd.set_memory_merge(mm, on) {
                Ok(()) => Response::Ok,
                Err(e) => err(12, format!("unmerging failed: {e}")),
            }
        }
        Request::GetMemoryMerge => match client_mm(sh, client) {
            Some((_, mm)) => Response::MemoryMerge(sh.ksmd.memory_merge(mm)),
            None => err(
                libc_einval(),
                "only a process with an agent can ask this".into(),
            ),
        },
        Request::WriteKnob { name, value } => match sh.ksmd.write_knob(&name, &value) {
            Ok(()) => {
                sh.log(format_args!("{name}={value}"));
                Response::Ok
            }
            Err(e) => err(knob_errno(&e), e.to_string()),
        },
        Request::Stat => Response::Stat(sh.stat()),
        Request::Costs => Response::Costs(samepage_linux::wire::Costs {
            metadata: sh.ksmd.metadata(),
            footprint: samepage_linux::footprint::of_self().ok(),
        }),
        Request::Ignored { start, end, reason } => {
            let msg = format!("{start:#x}-{end:#x}: {reason}");
            let pid = client_mm(sh, client).map_or(0, |c| c.0);
            sh.log(format_args!(
                "pid {pid} advised {msg}; ignored, as the kernel's KSM ignores it"
            ));
            with_client(&mut |c| {
                if c.ignored.len() < 64 {
                    c.ignored.push(msg.clone());
                }
                Response::Ok
            })
        }
        Request::Wait { n, timeout_ms } => {
            let t = Duration::from_millis(timeout_ms.min(24 * 3600 * 1000));
            let ok = if n == 0 {
                let c = sh.ksmd.snapshot().chunks;
                sh.ksmd.wait_chunk_after(c, t)
            } else {
                sh.ksmd.wait_full_scans(n, t)
            };
            if ok {
                Response::Ok
            } else {
                err(110, "timed out".into())
            }
        }
    }
}

fn client_mm(sh: &Shared, client: Option<(u64, u64)>) -> Option<(u32, MmId)> {
    let (id, _) = client?;
    sh.clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .map(|c| (c.pid, c.mm))
}

/// The errno `echo` into `/sys/kernel/mm/ksm` would report for a knob error.
fn knob_errno(e: &samepage_engine::KnobError) -> i32 {
    match e {
        samepage_engine::KnobError::Busy(_) => 16,
        _ => 22,
    }
}
