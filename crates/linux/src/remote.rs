//! A client's side of `samepage daemon`: the connection, and the link thread that runs
//! the daemon's batches on this process's agent and sends the agent's changes back.
//!
//! If the daemon goes away (killed, stopped), the link thread ends and the agent stays: its
//! fault handler keeps resolving every merged page from the store, which this process holds
//! a descriptor of, so nothing is lost and no fault waits forever. Merging stops.

use crate::agent::Agent;
use crate::sys::socket::{self, recv_with_fds, send_with_fds};
use crate::sys::{self, EventFd};
use crate::wire::{self, Envelope, Message, Request, Response};
use rustc_hash::FxHashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The socket could not be reached.
    #[error(
        "cannot reach samepage daemon at {path}: {source}. Start it with `samepage daemon \
         --socket {path}`, or give the socket it listens on"
    )]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon closed the connection or died.
    #[error("samepage daemon closed the connection")]
    Gone,
    /// The daemon refused the request.
    #[error("{message}")]
    Refused {
        /// The errno a system call would give.
        errno: i32,
        /// Its sentence.
        message: String,
    },
    /// The daemon answered something this client does not understand.
    #[error("samepage daemon answered something unexpected ({0})")]
    Protocol(String),
    /// A system call failed.
    #[error("talking to samepage daemon: {0}")]
    Io(#[from] io::Error),
}

/// A connection to `samepage daemon` that controls or reads it (`samepage ctl`,
/// `samepage stat --daemon`): it offers no memory.
pub struct Control(Arc<Connection>, bool);

impl Control {
    /// Connect to the daemon listening at `socket`.
    ///
    /// ```no_run
    /// use samepage_linux::{ConnectOptions, Control};
    /// use std::time::Duration;
    /// let ctl = Control::connect(&ConnectOptions::default_socket())?;
    /// ctl.write_knob("run", "1")?;
    /// if ctl.wait(1, Duration::from_secs(30))? {
    ///     let s = ctl.stat()?;
    ///     println!("pages_sharing {:?}, {} clients", s.ksm.get("pages_sharing"), s.ksm_stat.len());
    /// }
    /// # Ok::<(), samepage_linux::RemoteError>(())
    /// ```
    pub fn connect(socket: &Path) -> Result<Self, RemoteError> {
        let c = Connection::connect(socket)?;
        let (r, _) = c.hello(Request::Hello {
            version: wire::VERSION,
            domain: None,
            agent: false,
            merge_any: false,
        })?;
        c.start_link(None)?;
        Ok(Self(
            c,
            matches!(
                r,
                Response::Welcome {
                    merge_any: true,
                    ..
                }
            ),
        ))
    }

    /// This process asked the daemon for `PR_SET_MEMORY_MERGE` before an exec (the kernel
    /// keeps the flag across exec).
    pub fn merge_any_inherited(&self) -> bool {
        self.1
    }

    /// `echo value > /sys/kernel/mm/ksm/name` on the daemon, with the kernel's validation.
    pub fn write_knob(&self, name: &str, value: &str) -> Result<(), RemoteError> {
        self.0
            .request(Request::WriteKnob {
                name: name.into(),
                value: value.into(),
            })
            .map(drop)
    }

    /// The daemon's `/sys/kernel/mm/ksm` and its clients' `ksm_stat`.
    pub fn stat(&self) -> Result<wire::StatReply, RemoteError> {
        match self.0.request(Request::Stat)? {
            Response::Stat(s) => Ok(s),
            r => Err(RemoteError::Protocol(format!("{r:?}"))),
        }
    }

    /// What the daemon keeps for its bookkeeping and what its own mappings cost.
    pub fn costs(&self) -> Result<wire::Costs, RemoteError> {
        match self.0.request(Request::Costs)? {
            Response::Costs(c) => Ok(c),
            r => Err(RemoteError::Protocol(format!("{r:?}"))),
        }
    }

    /// Wait until the daemon's `full_scans` grew by `n` (0: one more scan chunk); false on
    /// timeout.
    pub fn wait(&self, n: u64, timeout: std::time::Duration) -> Result<bool, RemoteError> {
        match self.0.request(Request::Wait {
            n,
            timeout_ms: timeout.as_millis() as u64,
        }) {
            Ok(_) => Ok(true),
            Err(RemoteError::Refused { errno: 110, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Replies waited for, by request id.
#[derive(Default)]
struct Pending {
    replies: FxHashMap<u32, Response>,
    gone: bool,
}

/// One connection to the daemon.
pub(crate) struct Connection {
    sock: OwnedFd,
    send_lock: Mutex<()>,
    pending: Mutex<Pending>,
    replied: Condvar,
    next_id: AtomicU32,
    stop: EventFd,
    stopping: AtomicBool,
    link: Mutex<Option<JoinHandle<()>>>,
}

impl Connection {
    /// Connect to the socket at `path` (no handshake yet).
    pub fn connect(path: &Path) -> Result<Arc<Self>, RemoteError> {
        let sock = socket::seqpacket_connect(path).map_err(|source| RemoteError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let daemon_pid = socket::peer_cred(sock.as_fd())?.pid;
        // On hosts with Yama's ptrace_scope=1 the daemon may read this process's memory
        // only if named (it reads pages to hash them).
        socket::allow_ptracer(daemon_pid);
        Ok(Arc::new(Self {
            sock,
            send_lock: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            replied: Condvar::new(),
            next_id: AtomicU32::new(1),
            stop: EventFd::new()?,
            stopping: AtomicBool::new(false),
            link: Mutex::new(None),
        }))
    }

    fn send(&self, bytes: &[u8]) -> Result<(), RemoteError> {
        let _g = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        send_with_fds(self.sock.as_fd(), bytes, &[]).map_err(|e| match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => RemoteError::Gone,
            _ => RemoteError::Io(e),
        })
    }

    /// The handshake, before the link thread runs: `Hello`, then `Welcome` with the
    /// domain's store attached (for an agent).
    pub fn hello(&self, req: Request) -> Result<(Response, Option<OwnedFd>), RemoteError> {
        self.send(&wire::encode_json(&Envelope::Request(0, req)))?;
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let (n, mut fds) = recv_with_fds(self.sock.as_fd(), &mut buf)?;
        if n == 0 {
            return Err(RemoteError::Gone);
        }
        match wire::decode(&buf[..n]) {
            Ok(Message::Json(Envelope::Reply(0, Response::Error { errno, message }))) => {
                Err(RemoteError::Refused { errno, message })
            }
            Ok(Message::Json(Envelope::Reply(0, r))) => Ok((r, fds.pop())),
            other => Err(RemoteError::Protocol(format!("{other:?}"))),
        }
    }

    /// Send `req` and wait for its reply.
    pub fn request(&self, req: Request) -> Result<Response, RemoteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(&wire::encode_json(&Envelope::Request(id, req)))?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = p.replies.remove(&id) {
                return match r {
                    Response::Error { errno, message } => {
                        Err(RemoteError::Refused { errno, message })
                    }
                    r => Ok(r),
                };
            }
            if p.gone {
                return Err(RemoteError::Gone);
            }
            p = self.replied.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Start the link thread: it reads the daemon's messages (batches for `agent`, replies
    /// for requests) and sends the agent's changes.
    pub fn start_link(self: &Arc<Self>, agent: Option<Arc<Agent>>) -> io::Result<()> {
        let c = self.clone();
        let h = std::thread::Builder::new()
            .name("samepage-link".into())
            .spawn(move || {
                sys::block_all_signals();
                let _own = sys::note_own_stack();
                c.link_loop(agent.as_deref());
                let mut p = c.pending.lock().unwrap_or_else(|e| e.into_inner());
                p.gone = true;
                drop(p);
                c.replied.notify_all();
            })?;
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(())
    }

    fn link_loop(&self, agent: Option<&Agent>) {
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let mut changes = Vec::new();
        loop {
            let mut fds = vec![self.sock.as_fd(), self.stop.fd()];
            if let Some(a) = agent {
                fds.push(a.outbox_fd());
            }
            let Ok(ready) = sys::poll(&fds, -1) else {
                return;
            };
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if ready[0] != 0 {
                let n = match recv_with_fds(self.sock.as_fd(), &mut buf) {
                    Ok((0, _)) | Err(_) => return, // the daemon is gone
                    Ok((n, _)) => n,
                };
                match wire::decode(&buf[..n]) {
                    Ok(Message::Execute(seq, ops)) => {
                        if let Some(a) = agent {
                            a.execute(seq, &ops);
                        }
                    }
                    Ok(Message::Json(Envelope::Reply(id, r))) => {
                        self.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .replies
                            .insert(id, r);
                        self.replied.notify_all();
                    }
                    // A daemon that sends garbage is not one to keep talking to.
                    _ => return,
                }
            }
            if let Some(a) = agent {
                a.take_outbox(&mut changes);
                for part in changes.chunks(wire::MAX_RECORDS) {
                    if self.send(&wire::encode_changes(part)).is_err() {
                        return;
                    }
                }
                changes.clear();
            }
        }
    }

    /// Is the daemon still there?
    pub fn alive(&self) -> bool {
        !self.pending.lock().unwrap_or_else(|e| e.into_inner()).gone
    }

    /// Stop the link thread and close the connection. The daemon keeps what this process's
    /// merged pages refer to until the process exits.
    pub fn close(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.signal();
        if let Some(h) = self.link.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        socket::shutdown(self.sock.as_fd());
    }
}
