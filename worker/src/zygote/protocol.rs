//! What a worker and its zygote say to each other, over a `SOCK_SEQPACKET` unix socket pair: one
//! JSON message per packet, with descriptors passed alongside as `SCM_RIGHTS`.
//!
//! The worker asks for warm children ([`Request::Spawn`], with the child's ends of its five
//! pipes) and for kills; the zygote answers with [`Event`]s. A warm child reads its job from its
//! code pipe: one [`JobHeader`] line of JSON, then the code, until end of file.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{self, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest message, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The descriptor number the zygote finds its end of the socket at.
pub const CONTROL_FD: RawFd = 3;
/// How many descriptors come with a spawn request: the child's stdin, stdout, stderr, code and
/// report ends, in that order (they become its descriptors 0 to 4).
pub const SPAWN_FDS: usize = 5;
/// The byte that starts a warm child's [`ReadyRecord`].
pub const READY: u8 = b'R';
/// Exit code of a warm child that could not enter its sandbox (its stderr says why).
pub const ENTRY_FAILED: i32 = 125;

/// A message from the worker to the zygote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Fork a warm child into its sandbox.
    Spawn(SpawnSpec),
    /// Kill the process group of a child that has not been reaped yet.
    Kill { token: u64 },
}

/// Everything a warm child needs to enter its sandbox, apart from its descriptors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpawnSpec {
    /// Names the child in later messages.
    pub token: u64,
    /// Uid and gid to take; none keeps the zygote's own.
    pub ids: Option<(u32, u32)>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The run's private working directory.
    pub workdir: PathBuf,
    /// Resource limits of the pool, as `(resource, soft, hard)`.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// Whether a Landlock ruleset comes after the pipes, to install as descriptor 5 and enforce.
    #[serde(default)]
    pub landlock: bool,
    /// Whether the child makes private UTS and IPC namespaces.
    #[serde(default)]
    pub private_namespaces: bool,
    /// The size of each private tmpfs of the child (its directory, /tmp, /dev/shm), if it
    /// makes a mount namespace: a copy of the view, whose descriptor then comes last.
    #[serde(default)]
    pub private_mounts: Option<u64>,
    /// The Landlock rights the child grants itself on those mounts (0 without Landlock).
    #[serde(default)]
    pub landlock_mount_access: u64,
    /// Whether the child is forked into a PID namespace of its own (as pid 2, after an init)
    /// and mounts its /proc; it needs `private_mounts`.
    #[serde(default)]
    pub pid_namespace: bool,
    /// The Landlock rights the child grants itself on its /proc (0 without Landlock).
    #[serde(default)]
    pub landlock_proc_access: u64,
    /// Whether the child makes a user namespace of its own once it has taken `ids`.
    #[serde(default)]
    pub user_namespace: bool,
}

/// A message from the zygote to the worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Event {
    /// The interpreter is initialised and the preload set imported.
    Ready {
        /// `sys.version` of the embedded interpreter.
        python: String,
        /// The modules imported, with the milliseconds each took.
        preloaded: Vec<(String, u64)>,
        /// Milliseconds from the zygote's start until ready.
        startup_ms: u64,
        /// How much of the preloaded heap moved to 2 MiB pages.
        huge_pages_mib: u64,
        /// How much of it is object arenas laid out for that (0: CPython's own layout).
        #[serde(default)]
        arena_mib: u64,
    },
    /// The zygote cannot serve; it exits after this message.
    Failed { error: String },
    /// A warm child could not be forked.
    SpawnFailed { token: u64, error: String },
    /// A child ended and was reaped; what was left of its process group was killed.
    Exited {
        token: u64,
        /// Exit code, or the negated number of the signal that ended it.
        status: i32,
        /// CPU time of the child and its waited-for children since the fork, as the kernel
        /// counted it.
        cpu_us: u64,
        /// Largest resident set of the child or of one of those children, shared pages
        /// included.
        peak_rss_kb: u64,
    },
}

/// What a warm child writes to its report pipe once it is inside its sandbox: [`READY`], then
/// what it has used so far, in binary. It comes before any code of the run, so it is believed:
/// the run's own CPU time and memory are the kernel's figures at the child's exit less these
/// (the child's preparation is the service's, not the run's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadyRecord {
    /// CPU time used since the fork, in microseconds.
    pub cpu_us: u64,
    /// Resident set: mostly the zygote's pages, which the child maps.
    pub resident_kb: u64,
}

impl ReadyRecord {
    /// Length of the record on the pipe.
    pub const LEN: usize = 17;

    /// The record as written to the report pipe.
    pub fn bytes(&self) -> [u8; Self::LEN] {
        let mut bytes = [0; Self::LEN];
        bytes[0] = READY;
        bytes[1..9].copy_from_slice(&self.cpu_us.to_le_bytes());
        bytes[9..].copy_from_slice(&self.resident_kb.to_le_bytes());
        bytes
    }

    /// The record in `bytes`, if they are one.
    pub fn parse(bytes: &[u8; Self::LEN]) -> Option<Self> {
        let word =
            |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
        (bytes[0] == READY).then(|| Self {
            cpu_us: word(1),
            resident_kb: word(9),
        })
    }
}

/// What a warm child writes at the very end of its report pipe once its run is over, just
/// before it closes its descriptors and exits: the worker can answer without waiting for the
/// exit, whose teardown of the address space it shares with the zygote takes about a
/// millisecond. The run's own code can write to the same pipe, so the record holds only what
/// the run may say of itself, its exit code (a run that forges it ends itself early, as
/// `os._exit` would); what it used comes from the kernel.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndRecord {
    pub exit: i32,
}

/// Marks the start of the end record in the report pipe.
const END_MARK: &[u8] = b"\n\x1epyrunner-end ";

impl EndRecord {
    /// The record as written to the report pipe.
    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = END_MARK.to_vec();
        bytes.extend(serde_json::to_vec(self).expect("a record serialises"));
        bytes.push(b'\n');
        bytes
    }

    /// Splits a report into what precedes the end record, and the record if the report ends
    /// with one.
    pub fn split(report: &[u8]) -> (&[u8], Option<Self>) {
        let Some(start) = report.windows(END_MARK.len()).rposition(|w| w == END_MARK) else {
            return (report, None);
        };
        let tail = &report[start + END_MARK.len()..];
        match tail
            .strip_suffix(b"\n")
            .and_then(|json| serde_json::from_slice(json).ok())
        {
            Some(record) => (&report[..start], Some(record)),
            None => (report, None),
        }
    }
}

/// The limits a warm child applies to itself once its job arrives.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobHeader {
    /// Soft CPU-time limit in seconds; the hard limit is one more.
    pub cpu_secs: u64,
    /// Address space the run may add to what the child has mapped when its job arrives.
    pub address_space_bytes: u64,
    /// The worker waits for the child's exit, to take the run's figures from it (no cgroup
    /// counts them): the child then ends at its normal priority, not at the lowest.
    #[serde(default)]
    pub exit_awaited: bool,
}

impl JobHeader {
    /// The header line as sent ahead of the code.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a header serialises");
        line.push(b'\n');
        line
    }

    /// Splits what a warm child read from its code pipe into header and code.
    pub fn split(input: &[u8]) -> Option<(Self, &[u8])> {
        let end = input.iter().position(|&b| b == b'\n')?;
        let header = serde_json::from_slice(&input[..end]).ok()?;
        Some((header, &input[end + 1..]))
    }
}

/// A message could not be exchanged.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("cannot send to the zygote socket: {0}")]
    Send(nix::Error),
    #[error("cannot receive from the zygote socket: {0}")]
    Receive(nix::Error),
    #[error("malformed message on the zygote socket: {0}")]
    Malformed(String),
}

/// Sends `message` with `fds` attached. Fails with `EAGAIN` on a full non-blocking socket.
pub fn send<T: Serialize>(
    socket: impl AsFd,
    message: &T,
    fds: &[RawFd],
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(message).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(
            socket.as_fd().as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(ProtocolError::Send(e)),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one message and the descriptors that came with it (close-on-exec). `None` at end of
/// file (the other side closed). Fails with `EAGAIN` on an empty non-blocking socket.
pub fn receive<T: for<'de> Deserialize<'de>>(
    socket: impl AsFd,
) -> Result<Option<(T, Vec<OwnedFd>)>, ProtocolError> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let received =
        crate::sandbox::sys::receive_with_fds(socket.as_fd(), &mut buffer, SPAWN_FDS + 2)
            .map_err(ProtocolError::Receive)?;
    if received.len == 0 && received.fds.is_empty() {
        return Ok(None);
    }
    if received.truncated {
        return Err(ProtocolError::Malformed("message truncated".into()));
    }
    let message = serde_json::from_slice(&buffer[..received.len])
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    Ok(Some((message, received.fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn messages_and_descriptors_cross_the_socket() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = crate::sandbox::sys::pipe().unwrap();
        let request = Request::Spawn(SpawnSpec {
            token: 7,
            ids: Some((64_000, 64_000)),
            cgroup_procs: vec!["/sys/fs/cgroup/pids/x/cgroup.procs".into()],
            workdir: "/tmp/run-1".into(),
            rlimits: vec![(7, 256, 256)],
            landlock: false,
            private_namespaces: true,
            private_mounts: Some(1 << 20),
            landlock_mount_access: 0,
            pid_namespace: true,
            landlock_proc_access: 0,
            user_namespace: true,
        });
        send(&a, &request, &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let (got, fds): (Request, _) = receive(&b).unwrap().unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 2);
        // The received write end feeds the original read end.
        nix::unistd::write(&fds[1], b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&r, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
        drop(a);
        assert!(receive::<Request>(&b).unwrap().is_none());
    }

    #[test]
    fn end_record_is_found_only_at_the_end() {
        let record = EndRecord { exit: 3 };
        let mut report = br#"{"type": "ValueError"}"#.to_vec();
        report.extend(record.bytes());
        assert_eq!(
            EndRecord::split(&report),
            (&br#"{"type": "ValueError"}"#[..], Some(record))
        );
        assert_eq!(EndRecord::split(&record.bytes()), (&b""[..], Some(record)));
        // Anything after the record, or a damaged record, means there is none.
        let mut trailing = record.bytes();
        trailing.extend(b"more");
        assert_eq!(EndRecord::split(&trailing).1, None);
        let cut = &record.bytes()[..10];
        assert_eq!(EndRecord::split(cut), (cut, None));
        assert_eq!(EndRecord::split(b""), (&b""[..], None));
        // What else a run writes into a record of its own is not read.
        let forged = b"\n\x1epyrunner-end {\"exit\":7,\"cpu_ms\":0}\n";
        assert_eq!(EndRecord::split(forged).1, Some(EndRecord { exit: 7 }));
    }

    #[test]
    fn ready_record_round_trips() {
        let record = ReadyRecord {
            cpu_us: 2_345_678,
            resident_kb: 61_440,
        };
        let bytes = record.bytes();
        assert_eq!(bytes[0], READY);
        assert_eq!(ReadyRecord::parse(&bytes), Some(record));
        let mut other = bytes;
        other[0] = b'x';
        assert_eq!(ReadyRecord::parse(&other), None);
    }

    #[test]
    fn header_splits_from_code() {
        let header = JobHeader {
            cpu_secs: 3,
            address_space_bytes: 1 << 30,
            exit_awaited: true,
        };
        let mut input = header.line();
        input.extend_from_slice(b"print(1)\nprint(2)\n");
        let (got, code) = JobHeader::split(&input).unwrap();
        assert_eq!(got, header);
        assert_eq!(code, b"print(1)\nprint(2)\n");
        assert!(JobHeader::split(b"").is_none());
        assert!(JobHeader::split(b"{nonsense}\ncode").is_none());
    }
}
