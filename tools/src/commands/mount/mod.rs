//! `vdisk mount` and `vdisk unmount`: the virtual disk as one regular file
//! of a FUSE mount.
//!
//! The mount holds one directory with one file, [`FILE_NAME`], whose size
//! is the virtual size and whose bytes are the virtual disk's: reads and
//! writes call [`disk::VirtualDisk::read_at`] and [`disk::VirtualDisk::write_at`] with
//! the kernel's request buffer, and `fsync` (or the `flush` of a close after
//! writes) calls [`disk::VirtualDisk::flush`]. A differencing chain is served
//! through a [`disk::ChainView`]; with `--rw` only its leaf is written.
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
//! are cached for `PART_TTL`), so partitions made through `disk` appear
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

mod daemon;
mod fs;
mod table;

use crate::cli::MountArgs;
use crate::open::{self, Format};
use anyhow::{bail, Context, Result};
use image::guard::RESTRICTION;
use std::io::Write;
use std::path::Path;

pub use table::unmount;

/// Name of the one file in the mount.
pub const FILE_NAME: &str = "disk";

/// Largest read or write request asked of the kernel, and its readahead.
pub const IO_SIZE: u32 = 1 << 20;

/// Print a message on stderr, ignoring failures (the serving process's
/// stderr may be gone).
pub(super) fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "vdisk: {msg}");
}

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
        daemon::serve(args)
    } else {
        daemon::start_background(args)
    }
}
