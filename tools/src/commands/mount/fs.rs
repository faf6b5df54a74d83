//! The FUSE filesystem: one directory holding the disk file and one file
//! per partition; reads and writes go to the virtual disk, `fsync` and the
//! `flush` after writes flush it.

use super::{note, FILE_NAME, IO_SIZE};
use crate::commands::min_len;
use disk::partition::{self, Partition};
use disk::VirtualDisk;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// Inode of the file (the root directory is [`INodeNo::ROOT`]).
const FILE_INO: INodeNo = INodeNo(2);

/// How long the kernel may cache names and attributes (they never change).
const TTL: Duration = Duration::from_secs(60);

/// How long the kernel may cache a partition file's name and attributes
/// (the table can change through `disk`).
const PART_TTL: Duration = Duration::from_secs(1);

/// Inode of partition file `partN`: N + [`PART_INO_BASE`] (N ≥ 1).
const PART_INO_BASE: u64 = 2;

thread_local! {
    /// Each worker thread's read buffer (a worker serves one request at a time).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One directory holding one file, the virtual disk.
pub(super) struct DiskFs {
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

impl DiskFs {
    /// The filesystem serving `disk` (the image named `image`, for
    /// messages), owned by the calling user, with `time` as its timestamps;
    /// its partitions are read at once.
    pub(super) fn new(
        disk: Arc<dyn VirtualDisk>,
        image: String,
        writable: bool,
        page_cache: bool,
        time: SystemTime,
    ) -> Self {
        let fs = DiskFs {
            size: disk.virtual_size(),
            disk,
            image,
            writable,
            page_cache,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            time,
            dirty: AtomicBool::new(false),
            parts: RwLock::new(Vec::new()),
            part_written: AtomicBool::new(false),
        };
        fs.rescan();
        fs
    }

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
        let n = min_len(len - offset, size as usize);
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
        let n = min_len(len - offset, data.len());
        match self.disk.write_at(&data[..n], base + offset) {
            Ok(()) => {
                self.dirty.store(true, Ordering::Release);
                if ino != FILE_INO {
                    self.part_written.store(true, Ordering::Release);
                }
                // n ≤ data.len(), which FUSE bounds by its u32 request size.
                reply.written(u32::try_from(n).unwrap_or(u32::MAX));
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
        for (i, (ino, kind, name)) in entries
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
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
