//! Image locks: every open of an image file claims it against every other
//! open, in this process or another, with the byte-range locks QEMU's
//! file-posix driver takes, so that vdisk and QEMU's tools (qemu-img,
//! qemu-io, qemu-nbd, qemu-storage-daemon) refuse each other exactly as they
//! refuse themselves.
//!
//! # Layout
//! Open-file-description (OFD) byte-range locks, every one a read (shared)
//! lock of one byte of the image file. The locks are advisory: the bytes
//! themselves are never read or written for this.
//! - byte 100 + p: this open uses permission p;
//! - byte 200 + p: this open does not let others use permission p;
//!
//! where p is QEMU's permission bit number: 0 consistent read, 1 write,
//! 2 write unchanged, 3 resize. Two opens conflict when one uses a
//! permission the other does not share. An open finds the others' locks by
//! asking (F_OFD_GETLK) whether it could take a *write* lock on a byte:
//! read locks never conflict with each other, so the answer shows exactly
//! the other opens' locks.
//!
//! | open ([`LockMode`]) | uses | does not share | bytes locked |
//! |---|---|---|---|
//! | writable ([`LockMode::Auto`]) | consistent read, write, resize | write, resize | 100, 101, 103, 201, 203 |
//! | read-only ([`LockMode::Auto`]) | consistent read | write, resize | 100, 201, 203 |
//! | read-only, [`LockMode::ForceShare`] | consistent read | nothing | 100 |
//!
//! These are the bytes qemu-io 10.0 takes on a VHDX opened writable,
//! read-only, and read-only with `-U` (read off `/proc/locks`). So a
//! writable open is refused while any other open holds the file (but a
//! force-share reader), a read-only open is refused while a writer holds
//! it, readers share, and force-share readers are refused by nobody.
//! QEMU's raw format driver shares write access (qemu-io holding a raw file
//! writable locks bytes 100 and 101 only, so two QEMU writers may share a
//! raw file); here a writable open is exclusive whatever the format.
//!
//! # Races
//! As in QEMU, an open first takes its locks and then looks for the
//! others', so of two racing opens at least one sees the other. Between
//! vdisk processes that step is also serialized by an `flock(2)` of the
//! file held for its duration (microseconds), so exactly one of several
//! racing writers wins. QEMU takes no such flock, so a vdisk open racing a
//! QEMU open may, as two racing QEMU opens may, see both refused.
//!
//! A process forked by another thread shares every open file description
//! of its parent until it execs, and so holds the parent's image locks for
//! that moment even after the parent closed the image (measured: a thread
//! spawning `true` in a loop makes a close-then-reopen in another thread
//! fail within a few hundred tries). An open that meets a conflict
//! therefore tries again, for up to 250 ms, before it is refused.
//!
//! # Lifetime
//! The locks belong to the open file description: they last as long as the
//! [`crate::FileStorage`] that took them and go when it is dropped (or the
//! process dies). A second open of the same file in this process is an
//! open like any other: refused if the two conflict.

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

/// How an open claims its image file against other opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// A writable open holds an exclusive claim, a read-only open a shared
    /// one (see the module docs).
    #[default]
    Auto,
    /// Read-only, sharing every permission, like qemu-img's `-U`
    /// (`force-share`): the open is refused by nobody, and sees whatever a
    /// writer holding the image has written so far (possibly a state that
    /// is not self-consistent). Refused for writable opens.
    ForceShare,
    /// Take and test no locks (for callers that lock by other means).
    Off,
}

/// Where the "uses permission p" bytes start (QEMU's RAW_LOCK_PERM_BASE).
pub const PERM_BASE: u64 = 100;
/// Where the "does not share permission p" bytes start (QEMU's
/// RAW_LOCK_SHARED_BASE).
pub const SHARED_BASE: u64 = 200;

/// QEMU's permission names, by bit number (`bdrv_perm_names`).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const RESIZE: u8 = 1 << 3;
const ALL: u8 = 0b1111;

/// How long an open waits for another vdisk open's take-and-test step
/// before doing its own unserialized.
const SERIALIZE_WAIT: Duration = Duration::from_secs(2);
/// How long an open tries again after a conflict before it is refused.
const CONFLICT_RETRY: Duration = Duration::from_millis(250);

/// The permissions an open uses and those it shares, as QEMU bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    uses: u8,
    shares: u8,
}

impl Claim {
    fn of(writable: bool, mode: LockMode) -> Result<Option<Claim>> {
        Ok(match (mode, writable) {
            (LockMode::Off, _) => None,
            (LockMode::ForceShare, true) => {
                return Err(Error::invalid(
                    "force-share (-U) is only for read-only opens: a writer must hold the \
                     image alone",
                ))
            }
            (LockMode::ForceShare, false) => Some(Claim {
                uses: CONSISTENT_READ,
                shares: ALL,
            }),
            (LockMode::Auto, true) => Some(Claim {
                uses: CONSISTENT_READ | WRITE | RESIZE,
                shares: ALL & !(WRITE | RESIZE),
            }),
            (LockMode::Auto, false) => Some(Claim {
                uses: CONSISTENT_READ,
                shares: ALL & !(WRITE | RESIZE),
            }),
        })
    }

    /// The bytes this claim locks.
    fn bytes(self) -> impl Iterator<Item = u64> {
        let uses = (0..4u8)
            .filter(move |p| self.uses & (1 << p) != 0)
            .map(|p| PERM_BASE + u64::from(p));
        let unshares = (0..4u8)
            .filter(move |p| self.shares & (1 << p) == 0)
            .map(|p| SHARED_BASE + u64::from(p));
        uses.chain(unshares)
    }
}

// The F_* and SEEK_SET constants are 0..=2 and the lock bytes lie in
// PERM_BASE..SHARED_BASE + 8 (100..208): every cast keeps its value.
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
fn flock_struct(l_type: i32, byte: u64) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

/// Claim `file` (opened `writable`, for `name`) as `mode` says; on a
/// conflict, release what was taken and return an [`Error::Locked`] that
/// names the permission and who holds the file.
pub(crate) fn claim(file: &File, name: &str, writable: bool, mode: LockMode) -> Result<()> {
    let Some(claim) = Claim::of(writable, mode).map_err(|e| e.in_file(name, 0))? else {
        return Ok(());
    };
    // A conflict may be transient: a process forked by another thread of
    // this (or another) process shares our earlier open of the file, and so
    // its locks, until it execs. Try again for a short while before
    // refusing.
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let serial = Serialize::take(file);
        let conflict = match try_claim(file, name, claim)? {
            None => return Ok(()),
            Some(byte) => byte,
        };
        drop(serial);
        if start.elapsed() >= CONFLICT_RETRY {
            return Err(locked(file, name, conflict));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Take `claim`'s locks and look for others'. `Ok(None)`: claimed (or no
/// OFD locks on this system); `Ok(Some(byte))`: another open's lock on
/// `byte` conflicts, and ours are released again.
fn try_claim(file: &File, name: &str, claim: Claim) -> Result<Option<u64>> {
    for (i, byte) in claim.bytes().enumerate() {
        match fcntl(
            file,
            FcntlArg::F_OFD_SETLK(&flock_struct(libc::F_RDLCK, byte)),
        ) {
            Ok(_) => {}
            // No OFD locks here (an old kernel, a file system without
            // them): like QEMU's locking=auto, go on without.
            Err(Errno::EINVAL | Errno::ENOLCK | Errno::EOPNOTSUPP) if i == 0 => return Ok(None),
            // A write lock there: neither QEMU nor vdisk takes one, but it
            // refuses us all the same.
            Err(Errno::EAGAIN | Errno::EACCES) => {
                release(file);
                return Ok(Some(byte));
            }
            Err(e) => {
                release(file);
                return Err(Error::io("cannot lock the image", e.into()).in_file(name, 0));
            }
        }
    }
    // Others' locks: on the "does not share" byte of each permission we
    // use, and on the "uses" byte of each we do not share.
    let mut tests = Vec::with_capacity(8);
    for p in 0..4u8 {
        if claim.uses & (1 << p) != 0 {
            tests.push(SHARED_BASE + u64::from(p));
        }
        if claim.shares & (1 << p) == 0 {
            tests.push(PERM_BASE + u64::from(p));
        }
    }
    for byte in tests {
        let mut probe = flock_struct(libc::F_WRLCK, byte);
        match fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) if i32::from(probe.l_type) == libc::F_UNLCK => {}
            Ok(_) => {
                release(file);
                return Ok(Some(byte));
            }
            Err(e) => {
                release(file);
                return Err(Error::io("cannot test the image locks", e.into()).in_file(name, 0));
            }
        }
    }
    Ok(None)
}

/// Drop every image lock this open file description holds.
// As in `flock_struct`: small constants, every cast keeps its value.
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
fn release(file: &File) {
    let all = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: PERM_BASE as libc::off_t,
        l_len: (SHARED_BASE + 8 - PERM_BASE) as libc::off_t,
        l_pid: 0,
    };
    let _ = fcntl(file, FcntlArg::F_OFD_SETLK(&all));
}

/// An `flock(2)` of the image file serializing the take-and-test step of
/// vdisk opens; released on drop. Not taken (after [`SERIALIZE_WAIT`])
/// when something else keeps the file flocked.
struct Serialize<'a>(Option<&'a File>);

impl<'a> Serialize<'a> {
    fn take(file: &'a File) -> Self {
        use rustix::fs::{flock, FlockOperation};
        let start = Instant::now();
        loop {
            match flock(file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Serialize(Some(file)),
                Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < SERIALIZE_WAIT => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return Serialize(None),
            }
        }
    }
}

impl Drop for Serialize<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0 {
            let _ = rustix::fs::flock(f, rustix::fs::FlockOperation::Unlock);
        }
    }
}

/// The error for a conflict found on lock byte `byte`.
fn locked(file: &File, name: &str, byte: u64) -> Error {
    // The other open's lock: on a "does not share" byte it refuses a
    // permission we want; on a "uses" byte it uses one we do not share.
    let (we_unshare, p) = if byte >= SHARED_BASE {
        (false, byte - SHARED_BASE)
    } else {
        (true, byte - PERM_BASE)
    };
    let perm = usize::try_from(p)
        .ok()
        .and_then(|i| PERM_NAMES.get(i))
        .copied()
        .unwrap_or("unknown");
    let who = holders(file, byte);
    let who = if who.is_empty() {
        "another process".to_string()
    } else {
        who.join(", ")
    };
    let what = if we_unshare {
        format!(
            "Failed to get shared \"{perm}\" lock: the image is in use by {who}, which holds \
             the {perm} permission"
        )
    } else {
        format!(
            "Failed to get \"{perm}\" lock: the image is in use by {who}, which does not share \
             the {perm} permission"
        )
    };
    Error::Locked {
        file: name.to_string(),
        msg: what,
    }
}

/// Who holds an OFD lock on `byte` of the file open as `file`: "NAME (pid
/// N)" for each process whose open of the same file (device and inode)
/// lists such a lock in `/proc/PID/fdinfo`. Best effort: processes this
/// user may not inspect are not seen. Our own open `file` is skipped.
fn holders(file: &File, byte: u64) -> Vec<String> {
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let my_fd = file.as_raw_fd();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            let num = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok());
            if pid == me && num == Some(my_fd) {
                return false;
            }
            let same = std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
            same && std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .is_ok_and(|info| fdinfo_locks_byte(&info, ino, byte))
        });
        if holds {
            out.push(if pid == me {
                format!("this process (pid {pid}, another open of the same file)")
            } else {
                describe_pid(pid)
            });
        }
    }
    out
}

/// Whether a `/proc/PID/fdinfo/FD` text lists an OFD lock of inode `ino`
/// covering `byte`. Its lock lines read like `/proc/locks`:
/// `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010731 100 101`.
fn fdinfo_locks_byte(info: &str, ino: u64, byte: u64) -> bool {
    info.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let Some(at) = f.iter().position(|w| *w == "OFDLCK") else {
                return false;
            };
            // OFDLCK ADVISORY READ|WRITE PID MAJ:MIN:INODE START END
            let (Some(id), Some(start), Some(end)) = (f.get(at + 4), f.get(at + 5), f.get(at + 6))
            else {
                return false;
            };
            let same_ino = id.rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) == Some(ino);
            let start = start.parse::<u64>().unwrap_or(u64::MAX);
            let end = if *end == "EOF" {
                u64::MAX
            } else {
                end.parse::<u64>().unwrap_or(0)
            };
            same_ino && start <= byte && byte <= end
        })
}

/// An exclusive claim on a directory (a checkpoint bundle): an `flock(2)`
/// of the directory, held until dropped. Another claim on the same
/// directory, in this process or another, is refused while it is held.
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

impl DirLock {
    /// Claim the directory `dir` for `what` (a word for messages, e.g.
    /// "bundle").
    ///
    /// # Errors
    /// The directory cannot be opened, or another claim holds it
    /// ([`crate::ErrorKind::Locked`], naming the holder).
    pub fn exclusive(dir: &std::path::Path, what: &str) -> Result<DirLock> {
        use rustix::fs::{flock, FlockOperation};
        let name = dir.display().to_string();
        let file = File::open(dir).map_err(|e| Error::io("cannot open", e).in_file(&name, 0))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _dir: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
                let who = flock_holders(ino);
                let who = if who.is_empty() {
                    "another process".to_string()
                } else {
                    who.join(", ")
                };
                Err(Error::Locked {
                    file: name,
                    msg: format!("the {what} is in use by {who}"),
                })
            }
            // No flock here: go on without, as image locks do.
            Err(rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP) => {
                Ok(DirLock { _dir: file })
            }
            Err(e) => Err(Error::io(format!("cannot lock the {what}"), e.into()).in_file(&name, 0)),
        }
    }
}

/// Who holds an `flock(2)` of inode `ino`, from `/proc/locks` (whose FLOCK
/// lines carry the pid that took the lock).
fn flock_holders(ino: u64) -> Vec<String> {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for l in locks.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(at) = f.iter().position(|w| *w == "FLOCK") else {
            continue;
        };
        // FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END
        let (Some(pid), Some(id)) = (f.get(at + 3), f.get(at + 4)) else {
            continue;
        };
        if id.rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) != Some(ino) {
            continue;
        }
        out.push(describe_pid(pid.parse().unwrap_or(0)));
    }
    out
}

/// "NAME (pid N)", "this process (pid N)" or "pid N".
fn describe_pid(pid: u32) -> String {
    if pid == std::process::id() {
        return format!("this process (pid {pid})");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    match comm.trim() {
        "" => format!("pid {pid}"),
        c => format!("{c} (pid {pid})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(writable: bool, mode: LockMode) -> Vec<u64> {
        Claim::of(writable, mode)
            .unwrap()
            .map(|c| c.bytes().collect())
            .unwrap_or_default()
    }

    #[test]
    fn claims_lock_the_bytes_qemu_io_locks() {
        assert_eq!(bytes(true, LockMode::Auto), [100, 101, 103, 201, 203]);
        assert_eq!(bytes(false, LockMode::Auto), [100, 201, 203]);
        assert_eq!(bytes(false, LockMode::ForceShare), [100]);
        assert!(bytes(true, LockMode::Off).is_empty());
        assert!(Claim::of(true, LockMode::ForceShare).is_err());
    }

    #[test]
    fn fdinfo_lock_lines() {
        let info = "pos:\t0\nflags:\t02\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:77 100 101\n\
                    lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:77 203 203\n";
        assert!(fdinfo_locks_byte(info, 77, 101));
        assert!(fdinfo_locks_byte(info, 77, 203));
        assert!(!fdinfo_locks_byte(info, 77, 201));
        assert!(!fdinfo_locks_byte(info, 78, 100));
        let eof = "lock:\t1: OFDLCK ADVISORY  WRITE -1 08:01:5 0 EOF\n";
        assert!(fdinfo_locks_byte(eof, 5, 1 << 40));
        assert!(!fdinfo_locks_byte(
            "lock:\t1: POSIX  ADVISORY  READ 12 08:01:5 0 EOF",
            5,
            3
        ));
    }
}
