//! `vdisk mount` and `vdisk unmount`: the virtual disk as one regular file
//! of a FUSE mount.
//!
//! The mount holds one directory with one file, [`FILE_NAME`], whose size
//! is the virtual size and whose bytes are the virtual disk's: reads and
//! writes call [`VirtualDisk::read_at`] and [`VirtualDisk::write_at`] with
//! the kernel's request buffer, and `fsync` (or the `flush` of a close after
//! writes) calls [`VirtualDisk::flush`]. A differencing chain is served
//! through a [`ChainView`]; with `--rw` only its leaf is written.
//!
//! Several FUSE worker threads serve requests (each with its own cloned
//! `/dev/fuse` descriptor); requests are up to [`IO_SIZE`] bytes and the
//! kernel's readahead is raised to the same (best effort: it needs write
//! access to `/sys/class/bdi`), so sequential reads move 1 MiB per request.
//!
//! Without `--foreground`, `vdisk mount` starts `vdisk mount --foreground`
//! in its own process group and returns once that process says the mount
//! is ready (and the mount shows in `/proc/self/mountinfo`), or relays its
//! error and exit status if it stops first. The serving process ends on
//! SIGINT, SIGTERM or SIGHUP (it unmounts, lazily when the file is still
//! open) or when the mount goes away (`vdisk unmount`, `umount`,
//! `fusermount3 -u`), and then flushes and closes the image.
//!
//! # Partitions
//! When the disk holds an MBR or GPT partition table
//! ([`disk::partition::partitions`]), each partition is one more file,
//! `partN` (N as Linux numbers them: sda1 → `part1`, logical MBR
//! partitions from `part5`), whose bytes are the partition's. The table is
//! read again whenever the directory is listed or a name looked up (names
//! are cached for [`PART_TTL`]), so partitions made through `disk` appear
//! without remounting.
//!
//! # Caching
//! By default every file is opened FOPEN_DIRECT_IO: each read and write
//! reaches the image, the kernel keeps no second copy of the data (the
//! host's page cache already holds the image file's), and the files always
//! agree with each other (`scripts/bench-mount.sh` measured this mode the
//! fastest for sequential reads, cold or hot). With `--page-cache`, `disk`
//! is opened with FOPEN_KEEP_CACHE instead (repeated reads come from
//! memory; shared mmap works on kernels before 6.6); partition files stay
//! direct, and `disk` drops its cached pages at the next open after a
//! partition file was written. As with `/dev/sda` and `/dev/sda1`, do not
//! write a partition file while `disk` is open with cached reads.
//!
//! The mount's source (`mount`, `df`, `/proc/self/mountinfo`) is
//! `vdisk[PID]:IMAGE`: `vdisk unmount` recognises its mounts by it, and
//! waits for process PID to exit, so that the image is closed when it
//! returns.

use crate::open::{self, Format};
use crate::{MountArgs, UnmountArgs};
use anyhow::{anyhow, bail, Context, Result};
use disk::partition::{self, Partition};
use disk::VirtualDisk;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionACL, TimeOrNow, WriteFlags,
};
use image::guard::RESTRICTION;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Name of the one file in the mount.
pub const FILE_NAME: &str = "disk";

/// Largest read or write request asked of the kernel, and its readahead.
pub const IO_SIZE: u32 = 1 << 20;

/// Inode of the file (the root directory is [`INodeNo::ROOT`]).
const FILE_INO: INodeNo = INodeNo(2);

/// How long the kernel may cache names and attributes (they never change).
const TTL: Duration = Duration::from_secs(60);

/// How long the kernel may cache a partition file's name and attributes
/// (the table can change through `disk`).
const PART_TTL: Duration = Duration::from_secs(1);

/// Inode of partition file `partN`: N + [`PART_INO_BASE`] (N ≥ 1).
const PART_INO_BASE: u64 = 2;

/// Most FUSE worker threads.
const MAX_THREADS: usize = 4;

/// How long `vdisk unmount` waits for the serving process to close the image.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(300);

// ---- The filesystem. ----

thread_local! {
    /// Each worker thread's read buffer (a worker serves one request at a time).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One directory holding one file, the virtual disk.
struct DiskFs {
    disk: Arc<dyn VirtualDisk>,
    /// The image, for messages.
    image: String,
    size: u64,
    writable: bool,
    /// Open `disk` with FOPEN_KEEP_CACHE (`--page-cache`) rather than
    /// FOPEN_DIRECT_IO.
    page_cache: bool,
    /// Owner of the directory and the file: the mounting user.
    uid: u32,
    gid: u32,
    /// Timestamps shown: the image file's modification time at mount.
    time: SystemTime,
    /// Whether a write completed since the last flush.
    dirty: AtomicBool,
    /// The partitions, as last read from the table.
    parts: RwLock<Vec<Partition>>,
    /// Whether a partition file was written since `disk` was last opened
    /// (its cached pages may then be stale).
    part_written: AtomicBool,
}

/// The errno for a failed disk operation: ENOSPC and EDQUOT pass through,
/// the rest is EIO.
fn errno_of(e: &disk::Error) -> Errno {
    match e.io_error().and_then(|io| io.raw_os_error()) {
        Some(code) if code == Errno::ENOSPC.code() || code == Errno::EDQUOT.code() => {
            Errno::from_i32(code)
        }
        _ => Errno::EIO,
    }
}

/// Print a message on stderr, ignoring failures (the serving process's
/// stderr may be gone).
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "vdisk: {msg}");
}

impl DiskFs {
    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::Directory,
            perm: if self.writable { 0o755 } else { 0o555 },
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self) -> FileAttr {
        self.attr_for(FILE_INO, self.size)
    }

    fn attr_for(&self, ino: INodeNo, size: u64) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::RegularFile,
            perm: if self.writable { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Option<FileAttr> {
        match ino {
            INodeNo::ROOT => Some(self.dir_attr()),
            _ => self.range_of(ino).map(|(_, len)| self.attr_for(ino, len)),
        }
    }

    /// The byte range of the disk that file `ino` shows: all of it for
    /// `disk`, the partition's for `partN`.
    fn range_of(&self, ino: INodeNo) -> Option<(u64, u64)> {
        if ino == FILE_INO {
            return Some((0, self.size));
        }
        let n = ino.0.checked_sub(PART_INO_BASE)?;
        let parts = self.parts.read().unwrap_or_else(|e| e.into_inner());
        parts
            .iter()
            .find(|p| u64::from(p.number) == n)
            .map(|p| (p.start, p.len))
    }

    /// [`Self::range_of`] for a request: EISDIR for the directory, ENOENT
    /// for a partition that is gone.
    fn file_range(&self, ino: INodeNo) -> Result<(u64, u64), Errno> {
        match self.range_of(ino) {
            Some(r) => Ok(r),
            None if ino == INodeNo::ROOT => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Read the partition table again (a damaged one shows no partitions,
    /// with a note on stderr).
    fn rescan(&self) {
        let found = partition::partitions(&*self.disk).unwrap_or_else(|e| {
            note(&format!("{}: partition table: {e}", self.image));
            Vec::new()
        });
        *self.parts.write().unwrap_or_else(|e| e.into_inner()) = found;
    }

    /// The partition files: (inode, name, size).
    fn part_files(&self) -> Vec<(INodeNo, String, u64)> {
        let parts = self.parts.read().unwrap_or_else(|e| e.into_inner());
        parts
            .iter()
            .map(|p| {
                (
                    INodeNo(u64::from(p.number) + PART_INO_BASE),
                    format!("part{}", p.number),
                    p.len,
                )
            })
            .collect()
    }

    /// Flush the image if a write completed since the last flush.
    fn sync(&self) -> Result<(), Errno> {
        if !self.writable || !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.disk.flush().map_err(|e| {
            self.dirty.store(true, Ordering::Release);
            note(&format!("{}: flush failed: {e}", self.image));
            errno_of(&e)
        })
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each setter answers the nearest value it accepts when it refuses.
        if let Err(n) = config.set_max_write(IO_SIZE) {
            let _ = config.set_max_write(n);
        }
        if let Err(n) = config.set_max_readahead(IO_SIZE) {
            let _ = config.set_max_readahead(n);
        }
        let _ = config.set_max_background(64);
        // Shared mmap of a direct-I/O file (Linux 6.6 and later; older
        // kernels refuse it with ENODEV, see `--page-cache`).
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.file_attr(), fuser::Generation(0));
            return;
        }
        let part = name.to_str().and_then(|n| n.strip_prefix("part"));
        if parent != INodeNo::ROOT || part.is_none() {
            reply.error(Errno::ENOENT);
            return;
        }
        self.rescan();
        match self
            .part_files()
            .into_iter()
            .find(|(_, n, _)| n.as_str() == name)
        {
            Some((ino, _, len)) => {
                reply.entry(&PART_TTL, &self.attr_for(ino, len), fuser::Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = if ino == FILE_INO || ino == INodeNo::ROOT {
            TTL
        } else {
            PART_TTL
        };
        match self.attr_of(ino) {
            Some(a) => reply.attr(&ttl, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr_of(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            reply.error(Errno::EPERM);
        } else if size.is_some_and(|s| s != attr.size || ino == INodeNo::ROOT) {
            // The disk has a fixed size: it cannot be truncated or grown
            // (write with `dd conv=notrunc`).
            reply.error(Errno::EINVAL);
        } else {
            // Times are accepted and not kept (they are the image's).
            reply.attr(&TTL, &attr);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.file_range(ino) {
            reply.error(e);
        } else if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.writable {
            reply.error(Errno::EROFS);
        } else {
            // Our disk takes concurrent writes (no lock around data I/O).
            let direct = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
            let flags = if !self.page_cache || ino != FILE_INO {
                direct
            } else if self.part_written.swap(false, Ordering::AcqRel) {
                // A partition file changed the disk: start a fresh cache.
                FopenFlags::empty()
            } else {
                // Only this mount changes the disk: cached pages stay valid.
                FopenFlags::FOPEN_KEEP_CACHE
            };
            reply.opened(FileHandle(0), flags);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (base, len) = match self.file_range(ino) {
            Ok(r) => r,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        if offset >= len {
            reply.data(&[]);
            return;
        }
        let n = u64::from(size).min(len - offset) as usize;
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match self.disk.read_at(&mut buf[..n], base + offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(e) => {
                    note(&format!(
                        "{}: read of {n} bytes at disk offset {} failed: {e}",
                        self.image,
                        base + offset
                    ));
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (base, len) = match self.file_range(ino) {
            Ok(r) => r,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        if !self.writable {
            reply.error(Errno::EROFS);
            return;
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        if offset >= len {
            // Like a block device: nothing fits past the end.
            reply.error(Errno::ENOSPC);
            return;
        }
        // A write crossing the end is cut short there.
        let n = (data.len() as u64).min(len - offset) as usize;
        match self.disk.write_at(&data[..n], base + offset) {
            Ok(()) => {
                self.dirty.store(true, Ordering::Release);
                if ino != FILE_INO {
                    self.part_written.store(true, Ordering::Release);
                }
                reply.written(n as u32);
            }
            Err(e) => {
                note(&format!(
                    "{}: write of {n} bytes at disk offset {} failed: {e}",
                    self.image,
                    base + offset
                ));
                reply.error(errno_of(&e));
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        if offset == 0 {
            self.rescan();
        }
        let mut entries = vec![
            (INodeNo::ROOT, FileType::Directory, ".".to_string()),
            (INodeNo::ROOT, FileType::Directory, "..".to_string()),
            (FILE_INO, FileType::RegularFile, FILE_NAME.to_string()),
        ];
        for (ino, name, _) in self.part_files() {
            entries.push((ino, FileType::RegularFile, name));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.size.div_ceil(4096), 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode bits.
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Punching holes would need the range to read as zeros afterwards,
        // which VirtualDisk::discard does not promise.
        reply.error(Errno::EOPNOTSUPP);
    }
}

// ---- Mounts, as /proc/self/mountinfo lists them. ----

/// One line of /proc/self/mountinfo.
#[derive(Debug)]
struct MountEntry {
    /// "MAJOR:MINOR" of the filesystem.
    dev: String,
    mount_point: PathBuf,
    fs_type: String,
    source: String,
}

impl MountEntry {
    /// A mount made by `vdisk mount`.
    fn is_vdisk(&self) -> bool {
        (self.fs_type == "fuse" || self.fs_type.starts_with("fuse.")) && self.pid().is_some()
    }

    /// The serving process, from the source `vdisk[PID]:IMAGE`.
    fn pid(&self) -> Option<u32> {
        let rest = self.source.strip_prefix("vdisk[")?;
        let (pid, _image) = rest.split_once("]:")?;
        pid.parse().ok()
    }

    /// The image, from the source `vdisk[PID]:IMAGE`.
    fn image(&self) -> &str {
        self.source
            .split_once("]:")
            .map_or(self.source.as_str(), |(_, i)| i)
    }
}

/// Undo the octal escapes (`\040` for a space...) of mountinfo fields.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse one line of /proc/self/mountinfo.
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let f: Vec<&str> = before.split(' ').collect();
    let a: Vec<&str> = after.split(' ').collect();
    Some(MountEntry {
        dev: f.get(2)?.to_string(),
        mount_point: PathBuf::from(unescape(f.get(4)?)),
        fs_type: a.first()?.to_string(),
        source: unescape(a.get(1)?),
    })
}

/// The topmost mount at `mount_point` (an absolute path without symlinks).
fn find_mount(mount_point: &Path) -> Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .rev()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.mount_point == mount_point))
}

/// `path` made absolute, with symlinks resolved in its parent only (a dead
/// FUSE mount cannot be stat'ed itself).
fn absolute(path: &Path) -> Result<PathBuf> {
    let name = path.display();
    let abs = std::path::absolute(path).with_context(|| format!("{name}: bad path"))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(file)) => Ok(std::fs::canonicalize(parent)
            .with_context(|| format!("{name}: cannot resolve {}", parent.display()))?
            .join(file)),
        _ => Ok(abs),
    }
}

// ---- Unmounting. ----

/// Why an unmount failed.
enum UnmountError {
    /// Something uses the mount (an open file, a working directory).
    Busy,
    Other(String),
}

/// Unmount `mount_point`: umount2(2), or `fusermount3 -u` (`fusermount -u`)
/// for a user without the privilege. `lazy`: detach now, end when unused.
fn unmount_path(mount_point: &Path, lazy: bool) -> std::result::Result<(), UnmountError> {
    use nix::errno::Errno as E;
    use nix::mount::MntFlags;
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match nix::mount::umount2(mount_point, flags) {
        Ok(()) => Ok(()),
        Err(E::EBUSY) => Err(UnmountError::Busy),
        Err(E::EPERM) => fusermount_unmount(mount_point, lazy),
        Err(e) => Err(UnmountError::Other(e.desc().to_string())),
    }
}

/// `fusermount3 -u [-z] MOUNTPOINT`, or `fusermount` when there is no fusermount3.
fn fusermount_unmount(mount_point: &Path, lazy: bool) -> std::result::Result<(), UnmountError> {
    for bin in ["fusermount3", "fusermount"] {
        let mut cmd = Command::new(bin);
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = match cmd.arg(mount_point).stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(UnmountError::Other(format!("cannot run {bin}: {e}"))),
        };
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("busy") {
            return Err(UnmountError::Busy);
        }
        return Err(UnmountError::Other(format!("{bin} -u failed: {msg}")));
    }
    Err(UnmountError::Other(
        "operation not permitted, and neither fusermount3 nor fusermount is installed \
         (install fuse3)"
            .to_string(),
    ))
}

/// Whether process `pid` runs (and is not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// `vdisk unmount MOUNTPOINT`.
pub fn unmount(args: &UnmountArgs) -> Result<()> {
    let name = args.mountpoint.display();
    let mp = absolute(&args.mountpoint)?;
    let Some(m) = find_mount(&mp)? else {
        bail!("{name}: not a mount point (nothing is mounted there)");
    };
    if !m.is_vdisk() {
        bail!(
            "{name}: not a vdisk mount (it is a {} mount of {}); use umount",
            m.fs_type,
            m.source
        );
    }
    match unmount_path(&mp, false) {
        Ok(()) => {}
        Err(UnmountError::Busy) => bail!(
            "{name}: cannot unmount: the mount is busy (a process has {name}/{FILE_NAME} open or \
             its working directory in {name}); close it and retry"
        ),
        Err(UnmountError::Other(msg)) => bail!("{name}: cannot unmount: {msg}"),
    }
    // The serving process flushes and closes the image once unmounted: wait
    // for it, so that the image is consistent when this command returns.
    if let Some(pid) = m.pid() {
        let start = Instant::now();
        while process_alive(pid) {
            if start.elapsed() > CLOSE_TIMEOUT {
                bail!(
                    "{name}: unmounted, but the vdisk process {pid} serving {} did not exit \
                     within {} s",
                    m.image(),
                    CLOSE_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

// ---- Mounting. ----

/// Fail unless `mount_point` is an existing, empty directory: the mount
/// would hide the files of a non-empty one until it is unmounted (FUSE
/// allows it; a user who mounts over a directory by mistake would find its
/// files gone, or write the disk file believing it is another).
fn check_mount_point(mount_point: &Path) -> Result<()> {
    let name = mount_point.display();
    let meta = std::fs::metadata(mount_point)
        .with_context(|| format!("{name}: cannot use as mount point"))?;
    if !meta.is_dir() {
        bail!("{name}: not a directory (the mount point must be an existing directory)");
    }
    let mut entries = std::fs::read_dir(mount_point)
        .with_context(|| format!("{name}: cannot list the mount point"))?;
    if let Some(first) = entries.next() {
        let first = first.with_context(|| format!("{name}: cannot list the mount point"))?;
        let more = entries.count();
        bail!(
            "{name}: the mount point is not empty (it holds {}{}): the mount would hide its \
             files until unmounted; use an empty directory",
            first.file_name().to_string_lossy(),
            match more {
                0 => String::new(),
                1 => " and 1 more entry".to_string(),
                n => format!(" and {n} more entries"),
            }
        );
    }
    Ok(())
}

/// `vdisk mount`.
pub fn mount(args: &MountArgs) -> Result<()> {
    check_mount_point(&args.mountpoint)?;
    // Say it once, from the process the user started.
    if args.rw && args.format.is_none() && !args.daemon_child {
        if let Ok(Format::Raw) = open::detect(&args.image) {
            eprintln!(
                "vdisk: note: {}: no -f given, the format was guessed as raw: {RESTRICTION} \
                 (pass -f raw to allow them)",
                args.image.display()
            );
        }
    }
    if args.foreground {
        serve(args)
    } else {
        start_background(args)
    }
}

/// Start `vdisk mount --foreground` in its own process group and return
/// once it says the mount is ready; relay its error and exit status if it
/// stops first.
fn start_background(args: &MountArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the vdisk executable")?;
    let mut cmd = Command::new(exe);
    let policy = open::policy();
    for dir in &policy.allowed_dirs {
        cmd.arg("--parent-dir").arg(dir);
    }
    if policy.allow_any {
        cmd.arg("--allow-any-parent");
    }
    cmd.args(["mount", "--foreground", "--daemon-child"]);
    if args.rw {
        cmd.arg("--rw");
    }
    if args.page_cache {
        cmd.arg("--page-cache");
    }
    if let Some(f) = args.format {
        cmd.args(["-f", f.name()]);
    }
    cmd.arg("--").arg(&args.image).arg(&args.mountpoint);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .context("cannot start the background vdisk mount process")?;
    let mut ready = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let _ = out.read_line(&mut ready);
    if ready.ends_with('\n') {
        let mp = absolute(&args.mountpoint)?;
        let visible = find_mount(&mp)?.is_some_and(|m| m.pid() == Some(child.id()));
        if !visible {
            bail!(
                "{}: the mount process reported ready, but the mount is not in \
                 /proc/self/mountinfo",
                args.mountpoint.display()
            );
        }
        print!("{ready}");
        std::io::stdout()
            .flush()
            .context("cannot write to stdout")?;
        return Ok(());
    }
    // It stopped before the mount was ready: its stderr says why.
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child
        .wait()
        .context("cannot wait for the background vdisk mount process")?;
    if err.is_empty() {
        bail!(
            "{}: the background mount process stopped before the mount was ready ({status})",
            args.mountpoint.display()
        );
    }
    eprint!("{err}");
    std::process::exit(status.code().filter(|&c| c != 0).unwrap_or(1));
}

/// Whether the serving process was asked to stop, whether it is mounted,
/// and whether it unmounted on a signal already.
#[derive(Default)]
struct StopState {
    stop: bool,
    mounted: bool,
    unmounting: bool,
}

impl StopState {
    /// Unmount, once, when stopped and mounted.
    fn unmount_if_stopped(&mut self, mount_point: &Path) {
        if self.stop && self.mounted && !self.unmounting {
            self.unmounting = true;
            unmount_on_signal(mount_point);
        }
    }
}

/// Unmount on a signal: at once when nothing uses the mount, else detach it
/// (the session ends when the last user lets go).
fn unmount_on_signal(mount_point: &Path) {
    let name = mount_point.display();
    let result = match unmount_path(mount_point, false) {
        Err(UnmountError::Busy) => {
            note(&format!(
                "{name}: busy; detaching it: the image is closed once the last user closes \
                 {FILE_NAME}"
            ));
            unmount_path(mount_point, true)
        }
        other => other,
    };
    match result {
        Ok(()) => {}
        Err(UnmountError::Busy) => note(&format!("{name}: cannot unmount: busy")),
        Err(UnmountError::Other(msg)) => note(&format!("{name}: cannot unmount: {msg}")),
    }
}

/// Explain a failed mount.
fn mount_error(e: std::io::Error, mount_point: &Path) -> anyhow::Error {
    let name = mount_point.display();
    let dev_fuse = Path::new("/dev/fuse");
    if !dev_fuse.exists() {
        return anyhow!(
            "{name}: cannot mount: /dev/fuse does not exist (load the fuse kernel module: \
             modprobe fuse): {e}"
        );
    }
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "{name}: cannot mount: {e} (opening /dev/fuse or mounting is not permitted for \
             this user)"
        ),
        std::io::ErrorKind::NotFound => anyhow!(
            "{name}: cannot mount: {e} (without the privilege to mount, the fusermount3 helper \
             is needed: install fuse3)"
        ),
        _ => anyhow!("{name}: cannot mount: {e}"),
    }
}

/// Raise the kernel's readahead of the mount to [`IO_SIZE`] (best effort:
/// it needs write access to /sys/class/bdi).
fn raise_readahead(mount_point: &Path) {
    if let Ok(Some(m)) = find_mount(mount_point) {
        let path = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
        let _ = std::fs::write(path, format!("{}\n", IO_SIZE / 1024));
    }
}

/// Point stdout and stderr at /dev/null (the starting process has gone).
fn detach_stdio() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("/dev/null: cannot open")?;
    nix::unistd::dup2_stdout(&null).context("cannot redirect stdout to /dev/null")?;
    nix::unistd::dup2_stderr(&null).context("cannot redirect stderr to /dev/null")?;
    Ok(())
}

/// Mount, serve until unmounted or signalled, then close the image.
fn serve(args: &MountArgs) -> Result<()> {
    let image_name = args.image.display().to_string();
    let mp = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("{}: cannot use as mount point", args.mountpoint.display()))?;

    // Signals first: from here on they stop the mount cleanly.
    let state = Arc::new(Mutex::new(StopState::default()));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let signal_thread = {
        let state = state.clone();
        let mp = mp.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.stop = true;
                    st.unmount_if_stopped(&mp);
                }
            })
            .context("cannot start the signal thread")?
    };
    let stop_signals = move || {
        signal_handle.close();
        let _ = signal_thread.join();
    };

    let opened = match open::open(&args.image, args.format, args.rw) {
        Ok(o) => o,
        Err(e) => {
            stop_signals();
            return Err(e);
        }
    };
    let time = std::fs::metadata(&args.image)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let abs_image = std::fs::canonicalize(&args.image).unwrap_or_else(|_| args.image.clone());
    let fs = DiskFs {
        disk: opened.disk().clone(),
        image: image_name.clone(),
        size: opened.disk().virtual_size(),
        writable: args.rw,
        page_cache: args.page_cache,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        time,
        dirty: AtomicBool::new(false),
        parts: RwLock::new(Vec::new()),
        part_written: AtomicBool::new(false),
    };
    fs.rescan();

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!(
            "vdisk[{}]:{}",
            std::process::id(),
            abs_image.display()
        )),
        MountOption::Subtype("vdisk".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
        if args.rw {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.acl = SessionACL::Owner;
    // Two per CPU: a worker waiting for the image file's device leaves its
    // CPU to another.
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map_or(2, |n| 2 * n.get())
            .clamp(2, MAX_THREADS),
    );
    config.clone_fd = true;

    let stopped_early = state.lock().unwrap_or_else(|e| e.into_inner()).stop;
    let session = if stopped_early {
        None
    } else {
        match Session::new(fs, &mp, &config) {
            Ok(s) => Some(s),
            Err(e) => {
                stop_signals();
                let _ = opened.close();
                return Err(mount_error(e, &args.mountpoint));
            }
        }
    };
    let mut result = Ok(());
    if let Some(session) = session {
        {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.mounted = true;
            st.unmount_if_stopped(&mp);
        }
        raise_readahead(&mp);
        let path = mp.join(FILE_NAME);
        let announced = writeln!(std::io::stdout(), "{}", path.display())
            .and_then(|()| std::io::stdout().flush());
        if args.daemon_child {
            if let Err(e) = detach_stdio() {
                note(&format!("{e:#}"));
            }
            // Every path is resolved by now: keep no directory busy.
            let _ = std::env::set_current_dir("/");
        } else if let Err(e) = announced {
            note(&format!("cannot write to stdout: {e}"));
        }
        result = session
            .run()
            .with_context(|| format!("{}: the FUSE session failed", args.mountpoint.display()));
        // The session also ends when the kernel aborts the connection:
        // leave no dead mount behind.
        if let Ok(Some(m)) = find_mount(&mp) {
            if m.pid() == Some(std::process::id()) {
                let _ = unmount_path(&mp, true);
            }
        }
    }
    stop_signals();
    let closed = opened
        .close()
        .with_context(|| format!("{image_name}: cannot close the image cleanly after unmount"));
    result.and(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let m = parse_mountinfo_line(
            "97 27 0:52 / /tmp/a\\040b rw,nosuid,nodev,noexec,noatime - fuse \
             vdisk[4242]:/x/my\\040disk.vhdx rw,user_id=0,group_id=0,default_permissions",
        )
        .unwrap();
        assert_eq!(m.dev, "0:52");
        assert_eq!(m.mount_point, Path::new("/tmp/a b"));
        assert_eq!(m.fs_type, "fuse");
        assert!(m.is_vdisk());
        assert_eq!(m.pid(), Some(4242));
        assert_eq!(m.image(), "/x/my disk.vhdx");
        let ext4 = parse_mountinfo_line("29 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw").unwrap();
        assert!(!ext4.is_vdisk());
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }
}
