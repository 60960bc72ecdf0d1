//! The protocol between `samepage daemon` and its clients, over a `SOCK_SEQPACKET` Unix
//! socket (each message one record; descriptors travel with `SCM_RIGHTS`).
//!
//! A message is one kind byte and its payload:
//! - `J` ([`Envelope`] as JSON): requests, replies and the handshake, which are rare;
//! - `X` (binary): a batch of [`Op`]s for the client's agent to execute;
//! - `C` (binary): a run of [`Change`]s the agent reports, in the order they happened.
//!
//! Batches and changes, which come once per scan chunk, use a fixed binary layout: a
//! `u64` sequence number or count, then 17-byte records (a tag byte, two `u64`s). Every
//! decoder checks lengths and tags and answers [`WireError`] for anything malformed: a
//! client sending garbage gets its connection closed, never a crash.

use crate::ops::{Change, FailReason, Op};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// Version of this protocol; the daemon refuses other versions with a sentence.
pub const VERSION: u32 = 3;
/// Largest message (a record); longer runs of changes are split.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Records per `X` or `C` message.
pub const MAX_RECORDS: usize = (MAX_MESSAGE - 16) / RECORD;
const RECORD: usize = 17;

/// A malformed message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// Empty, truncated or too long.
    #[error("a message of {0} bytes has no valid layout")]
    Length(usize),
    /// An unknown message kind or record tag.
    #[error("unknown {what} {tag:#x}")]
    Tag {
        /// What the tag was of.
        what: &'static str,
        /// The tag.
        tag: u8,
    },
    /// The JSON of a request or reply does not parse.
    #[error("malformed request: {0}")]
    Json(String),
}

/// What a client asks the daemon, or tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first message. `agent`: the process offers its memory (its agent will execute
    /// batches); otherwise it only controls or reads the daemon (`samepage ctl`, `stat`).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The security domain to merge in (None: the uid's own domain).
        domain: Option<String>,
        /// The client has an agent.
        agent: bool,
        /// It asked for `PR_SET_MEMORY_MERGE` before (a fork child inheriting it).
        merge_any: bool,
    },
    /// The agent manages `[start, end)` now (private anonymous memory); `mergeable` is
    /// `MADV_MERGEABLE` at once.
    Register {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// `VM_MERGEABLE` from the start.
        mergeable: bool,
    },
    /// `MADV_MERGEABLE` (`on`) or `MADV_UNMERGEABLE` on `[start, end)`.
    Madvise {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// Mergeable or not.
        on: bool,
    },
    /// `prctl(PR_SET_MEMORY_MERGE, on)`.
    SetMemoryMerge {
        /// Merge everything or nothing.
        on: bool,
    },
    /// `prctl(PR_GET_MEMORY_MERGE)`.
    GetMemoryMerge,
    /// `echo value > /sys/kernel/mm/ksm/name`.
    WriteKnob {
        /// The knob.
        name: String,
        /// Its new value.
        value: String,
    },
    /// `/sys/kernel/mm/ksm` and every client's `ksm_stat`.
    Stat,
    /// What the daemon keeps for its bookkeeping and what its own mappings cost (taken
    /// between two scan chunks; not for every reading of the counters).
    Costs,
    /// The process advised memory the kernel's KSM would ignore (shared or file-backed):
    /// for the daemon's log and its report.
    Ignored {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// Why, as a sentence fragment.
        reason: String,
    },
    /// Answer once `full_scans` has grown by `n` (or `Error` ETIMEDOUT after
    /// `timeout_ms`); `n == 0`: once the scanner has finished another chunk.
    Wait {
        /// Full scans to wait for.
        n: u64,
        /// At most this long.
        timeout_ms: u64,
    },
}

/// The daemon's answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// The handshake: the process is address space `pid` of the engine (its real pid);
    /// its domain's store comes attached to this message. `merge_any`: the process asked
    /// for `PR_SET_MEMORY_MERGE` before an exec.
    Welcome {
        /// The process's pid as the daemon knows it.
        pid: u32,
        /// `MMF_VM_MERGE_ANY` survived an exec.
        merge_any: bool,
    },
    /// `PR_GET_MEMORY_MERGE`.
    MemoryMerge(bool),
    /// The daemon's state: every file of `/sys/kernel/mm/ksm` by name, as numbers where
    /// they are numbers, and one `ksm_stat` per client.
    Stat(StatReply),
    /// The daemon's bookkeeping and own mappings.
    Costs(Costs),
    /// Refused, with the sentence to show; `errno` is what a system call would return.
    Error {
        /// The errno equivalent (EINVAL, EBUSY, ENOMEM, EPERM, ...).
        errno: i32,
        /// A sentence.
        message: String,
    },
}

/// What `samepage stat --daemon` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatReply {
    /// Every file of `/sys/kernel/mm/ksm`, in `ls` order, with its value as `cat` prints it.
    pub ksm: BTreeMap<String, String>,
    /// One `/proc/PID/ksm_stat` per client.
    pub ksm_stat: Vec<ClientStat>,
    /// What ksmd did (batches, operations, zero pages placed, canonical pages released).
    #[serde(default)]
    pub ksmd: crate::ksmd::KsmdStats,
}

/// What `samepage daemon` spends besides the memory it saves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// Its bookkeeping: the engine's, and its mirror of the clients' page states.
    pub metadata: crate::live::Metadata,
    /// Its own mappings (store views, thread stacks) and what they cost the kernel; `None`
    /// when `/proc/self/smaps` could not be read.
    pub footprint: Option<crate::footprint::Footprint>,
}

/// One client's `ksm_stat`, with its pid and domain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStat {
    /// The process.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its security domain.
    pub domain: String,
    /// `ksm_rmap_items`.
    pub ksm_rmap_items: u64,
    /// `ksm_zero_pages`.
    pub ksm_zero_pages: i64,
    /// `ksm_merging_pages`.
    pub ksm_merging_pages: u64,
    /// `ksm_process_profit`.
    pub ksm_process_profit: i64,
    /// `ksm_merge_any`.
    pub ksm_merge_any: bool,
    /// `ksm_mergeable`.
    pub ksm_mergeable: bool,
    /// Ranges it advised that cannot be merged (shared or file-backed memory), with why.
    #[serde(default)]
    pub ignored: Vec<String>,
}

impl ClientStat {
    /// As the engine's `KsmStat`.
    pub fn to_ksm_stat(&self) -> samepage_engine::KsmStat {
        samepage_engine::KsmStat {
            pid: self.pid,
            ksm_rmap_items: self.ksm_rmap_items,
            ksm_zero_pages: self.ksm_zero_pages,
            ksm_merging_pages: self.ksm_merging_pages,
            ksm_process_profit: self.ksm_process_profit,
            ksm_merge_any: self.ksm_merge_any,
            ksm_mergeable: self.ksm_mergeable,
        }
    }
}

/// The counters among the files of a [`StatReply`] (a counter the map lacks reads as 0).
pub fn counters_of(ksm: &BTreeMap<String, String>) -> samepage_engine::KsmCounters {
    let i = |n: &str| ksm.get(n).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let u = |n: &str| i(n).max(0) as u64;
    samepage_engine::KsmCounters {
        pages_shared: u("pages_shared"),
        pages_sharing: u("pages_sharing"),
        pages_unshared: u("pages_unshared"),
        pages_volatile: u("pages_volatile"),
        pages_scanned: u("pages_scanned"),
        pages_skipped: u("pages_skipped"),
        full_scans: u("full_scans"),
        stable_node_chains: u("stable_node_chains"),
        stable_node_dups: u("stable_node_dups"),
        ksm_zero_pages: i("ksm_zero_pages"),
        general_profit: i("general_profit"),
    }
}

/// A request or reply with the id that pairs them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    /// A request `id`.
    Request(u32, Request),
    /// The reply to request `id`.
    Reply(u32, Response),
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A request or a reply.
    Json(Envelope),
    /// Batch `seq` of operations.
    Execute(u64, Vec<Op>),
    /// Changes the agent reports.
    Changes(Vec<Change>),
}

/// Encode a request or reply.
pub fn encode_json(e: &Envelope) -> Vec<u8> {
    let mut v = vec![b'J'];
    // Serializing these plain types cannot fail.
    v.extend(serde_json::to_vec(e).expect("plain data serializes"));
    v
}

/// Encode batch `seq` (at most [`MAX_RECORDS`] operations).
pub fn encode_execute(seq: u64, ops: &[Op]) -> Vec<u8> {
    debug_assert!(ops.len() <= MAX_RECORDS);
    let mut v = Vec::with_capacity(9 + ops.len() * RECORD);
    v.push(b'X');
    v.extend(seq.to_le_bytes());
    for op in ops {
        let (t, a, b) = match *op {
            Op::Merge { addr, k } => (1u8, addr, k as u64),
            Op::Zero { addr } => (2, addr, 0),
            Op::Unshare { start, end } => (3, start, end),
            Op::Refresh => (4, 0, 0),
        };
        record(&mut v, t, a, b);
    }
    v
}

/// Encode changes (at most [`MAX_RECORDS`]).
pub fn encode_changes(changes: &[Change]) -> Vec<u8> {
    debug_assert!(changes.len() <= MAX_RECORDS);
    let mut v = Vec::with_capacity(9 + changes.len() * RECORD * 2);
    v.push(b'C');
    v.extend((changes.len() as u64).to_le_bytes());
    for c in changes {
        match *c {
            Change::Merged { addr, k } => record(&mut v, 1, addr, k as u64),
            Change::Failed { addr, why } => record(&mut v, 2, addr, why as u64),
            Change::Unmerged { addr, k } => record(&mut v, 3, addr, k as u64),
            Change::Unmapped { start, end } => record(&mut v, 4, start, end),
            Change::Moved { from, to, len } => {
                record(&mut v, 5, from, to);
                record(&mut v, 6, len, 0);
            }
            Change::UnshareFailed { start, end, errno } => {
                record(&mut v, 7, start, end);
                record(&mut v, 8, errno as u64, 0);
            }
            Change::BatchDone { seq, zeros } => record(&mut v, 9, seq, zeros as u64),
            Change::Registered { start, end } => record(&mut v, 10, start, end),
            Change::ReadCopied { addr, k } => record(&mut v, 11, addr, k as u64),
        }
    }
    v
}

fn record(v: &mut Vec<u8>, t: u8, a: u64, b: u64) {
    v.push(t);
    v.extend(a.to_le_bytes());
    v.extend(b.to_le_bytes());
}

fn records(body: &[u8]) -> Result<impl Iterator<Item = (u8, u64, u64)> + '_, WireError> {
    if !body.len().is_multiple_of(RECORD) || body.len() / RECORD > 2 * MAX_RECORDS {
        return Err(WireError::Length(body.len() + 9));
    }
    Ok(body.chunks_exact(RECORD).map(|r| {
        let a = u64::from_le_bytes(r[1..9].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(r[9..17].try_into().expect("8 bytes"));
        (r[0], a, b)
    }))
}

fn fail_reason(v: u64) -> Result<FailReason, WireError> {
    Ok(match v {
        0 => FailReason::Gone,
        1 => FailReason::Changed,
        2 => FailReason::Pinned,
        3 => FailReason::Raced,
        4 => FailReason::Error,
        _ => {
            return Err(WireError::Tag {
                what: "failure reason",
                tag: v as u8,
            })
        }
    })
}

/// Decode one message.
pub fn decode(m: &[u8]) -> Result<Message, WireError> {
    let Some((&kind, rest)) = m.split_first() else {
        return Err(WireError::Length(0));
    };
    if m.len() > MAX_MESSAGE {
        return Err(WireError::Length(m.len()));
    }
    match kind {
        b'J' => serde_json::from_slice(rest)
            .map(Message::Json)
            .map_err(|e| WireError::Json(e.to_string())),
        b'X' | b'C' => {
            if rest.len() < 8 {
                return Err(WireError::Length(m.len()));
            }
            let head = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let recs = records(&rest[8..])?;
            if kind == b'X' {
                let ops = recs
                    .map(|(t, a, b)| match t {
                        1 if b <= u32::MAX as u64 => Ok(Op::Merge {
                            addr: a,
                            k: b as u32,
                        }),
                        2 => Ok(Op::Zero { addr: a }),
                        3 => Ok(Op::Unshare { start: a, end: b }),
                        4 => Ok(Op::Refresh),
                        t => Err(WireError::Tag {
                            what: "operation",
                            tag: t,
                        }),
                    })
                    .collect::<Result<_, _>>()?;
                return Ok(Message::Execute(head, ops));
            }
            let recs: Vec<_> = recs.collect();
            let mut out = Vec::with_capacity(recs.len());
            let mut i = 0;
            let second = |i: usize, tag: u8| match recs.get(i + 1) {
                Some(&(t, a, b)) if t == tag => Ok((a, b)),
                _ => Err(WireError::Length(m.len())),
            };
            while i < recs.len() {
                let (t, a, b) = recs[i];
                let k32 = |b: u64| {
                    u32::try_from(b).map_err(|_| WireError::Tag {
                        what: "canonical page",
                        tag: 0xff,
                    })
                };
                out.push(match t {
                    1 => Change::Merged {
                        addr: a,
                        k: k32(b)?,
                    },
                    2 => Change::Failed {
                        addr: a,
                        why: fail_reason(b)?,
                    },
                    3 => Change::Unmerged {
                        addr: a,
                        k: k32(b)?,
                    },
                    4 => Change::Unmapped { start: a, end: b },
                    5 => {
                        let (len, _) = second(i, 6)?;
                        i += 1;
                        Change::Moved {
                            from: a,
                            to: b,
                            len,
                        }
                    }
                    7 => {
                        let (errno, _) = second(i, 8)?;
                        i += 1;
                        Change::UnshareFailed {
                            start: a,
                            end: b,
                            errno: errno as i32,
                        }
                    }
                    10 => Change::Registered { start: a, end: b },
                    11 => Change::ReadCopied {
                        addr: a,
                        k: k32(b)?,
                    },
                    9 => Change::BatchDone {
                        seq: a,
                        zeros: b as u32,
                    },
                    t => {
                        return Err(WireError::Tag {
                            what: "change",
                            tag: t,
                        })
                    }
                });
                i += 1;
            }
            if out.len() as u64 != head {
                return Err(WireError::Length(m.len()));
            }
            Ok(Message::Changes(out))
        }
        k => Err(WireError::Tag {
            what: "message kind",
            tag: k,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(|(addr, k)| Op::Merge { addr, k }),
            any::<u64>().prop_map(|addr| Op::Zero { addr }),
            Just(Op::Refresh),
            (any::<u64>(), any::<u64>()).prop_map(|(start, end)| Op::Unshare { start, end }),
        ]
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(|(addr, k)| Change::Merged { addr, k }),
            (any::<u64>(), 0..5u8).prop_map(|(addr, w)| Change::Failed {
                addr,
                why: fail_reason(w as u64).unwrap()
            }),
            (any::<u64>(), any::<u32>()).prop_map(|(addr, k)| Change::Unmerged { addr, k }),
            (any::<u64>(), any::<u64>()).prop_map(|(start, end)| Change::Unmapped { start, end }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(from, to, len)| Change::Moved {
                from,
                to,
                len
            }),
            (any::<u64>(), any::<u64>(), any::<i32>())
                .prop_map(|(start, end, errno)| Change::UnshareFailed { start, end, errno }),
            (any::<u64>(), any::<u32>()).prop_map(|(seq, zeros)| Change::BatchDone { seq, zeros }),
            (any::<u64>(), any::<u64>()).prop_map(|(start, end)| Change::Registered { start, end }),
            (any::<u64>(), any::<u32>()).prop_map(|(addr, k)| Change::ReadCopied { addr, k }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn batches_and_changes_round_trip(seq in any::<u64>(),
                                          ops in prop::collection::vec(op(), 0..64),
                                          ch in prop::collection::vec(change(), 0..64)) {
            prop_assert_eq!(decode(&encode_execute(seq, &ops)), Ok(Message::Execute(seq, ops)));
            prop_assert_eq!(decode(&encode_changes(&ch)), Ok(Message::Changes(ch)));
        }

        /// Garbage never panics and is never taken for a message it is not.
        #[test]
        fn garbage_is_refused_or_decoded_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn requests_round_trip_and_bad_json_is_an_error() {
        let e = Envelope::Request(
            7,
            Request::Register {
                start: 0x1000,
                end: 0x3000,
                mergeable: true,
            },
        );
        assert_eq!(decode(&encode_json(&e)), Ok(Message::Json(e)));
        assert!(matches!(decode(b"J{not json"), Err(WireError::Json(_))));
        assert!(matches!(decode(b"Z"), Err(WireError::Tag { .. })));
        assert!(matches!(decode(b""), Err(WireError::Length(0))));
        assert!(matches!(decode(b"X123"), Err(WireError::Length(_))));
    }
}
