//! The virtual-disk trait and the one I/O loop every format shares.
//!
//! A format driver only answers "where does this range live?"
//! ([`VirtualDisk::map`]) and "where may I write this range?"
//! ([`VirtualDisk::map_write`]); the provided [`VirtualDisk::read_at`] and
//! [`VirtualDisk::write_at`] do the actual byte moving, outside any driver lock.
//!
//! A differencing layer answers [`Mapping::Parent`] for what it does not
//! hold, and the read loop asks the parent, which may ask its own parent: a
//! lookup per layer. A chain view ([`crate::ChainView`]) instead answers
//! [`Mapping::Ancestor`] (which layer's storage, and where), and the same
//! read loop reads those bytes straight from that layer's storage
//! ([`VirtualDisk::layer_storage`]).

use crate::copy_up::CopyUpLocks;
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::ops::Range;
use std::sync::Arc;

/// An offset in a backing file (as opposed to a virtual-disk offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FileOffset(pub u64);

/// Where a range of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this layer's storage, starting at this file offset.
    Data(FileOffset),
    /// Explicitly zero in this layer (e.g. a VHDX block in state ZERO).
    Zero,
    /// Not stored in this layer: the parent holds it.
    Parent,
    /// Not allocated and no parent: reads as zeros.
    Unallocated,
    /// Stored in the storage of the layer `depth` levels below this disk in
    /// its chain (1 = the parent), at `offset`: the read loop reads it from
    /// [`VirtualDisk::layer_storage`]`(depth)`. Only chain views (which
    /// resolve [`Mapping::Parent`] through the ancestors themselves, see
    /// [`crate::ChainView`]) return it; format drivers never do.
    Ancestor {
        /// How many layers below this disk (1 = the parent).
        depth: u32,
        /// Where the bytes start in that layer's storage.
        offset: FileOffset,
    },
}

/// A run of the virtual disk with one [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Virtual offset where the run starts.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Where it lives.
    pub mapping: Mapping,
}

/// File space a driver handed out for a write; see [`VirtualDisk::map_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteExtent {
    /// Virtual offset where the run starts.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Where the bytes go in this layer's storage.
    pub file_offset: FileOffset,
    /// Sectors only partly covered by this write must first be filled with
    /// their current virtual content (a differencing layer whose sector is
    /// still in the parent).
    pub fill_partial_sectors: bool,
    /// Driver-private value handed back to [`VirtualDisk::commit_write`].
    pub token: u64,
    /// `Some(block)` when the write lands in a block whose sectors are
    /// tracked one by one: the shared loop then holds that block's copy-up
    /// lock ([`VirtualDisk::copy_up_locks`], [`crate::copy_up`]) from the
    /// partial-sector fill through `commit_write`.
    pub copy_up: Option<u64>,
}

/// Sizes that describe a virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes (512 or 4096).
    pub physical_sector_size: u32,
}

/// A virtual disk: the abstraction every format, chain, mount and VMM uses.
///
/// Implementations are `Send + Sync`; all I/O takes `&self`.
pub trait VirtualDisk: Send + Sync {
    /// Virtual size and sector sizes.
    fn geometry(&self) -> Geometry;

    /// The storage holding this layer's bytes.
    fn storage(&self) -> &dyn Storage;

    /// The parent disk of a differencing layer.
    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        None
    }

    /// Where the range starting at `offset` lives: an extent starting at
    /// `offset`, at most `len` (> 0) bytes long.
    ///
    /// Format drivers answer for their own layer ([`Mapping::Parent`] for
    /// what the parent holds); chain views answer for the whole chain
    /// ([`Mapping::Ancestor`] for what an ancestor's storage holds).
    ///
    /// # Errors
    /// Corrupt metadata or I/O errors while looking it up.
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Like [`VirtualDisk::map`], but may spend system calls to find holes
    /// in the backing file, reporting them as [`Mapping::Unallocated`]. For
    /// tools that copy or compare whole disks; the I/O loop uses `map`.
    ///
    /// # Errors
    /// As [`VirtualDisk::map`].
    fn map_allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.map(offset, len)
    }

    /// The storage of the layer `depth` levels below this disk in its chain
    /// (0 = this disk, 1 = the parent), for reading
    /// [`Mapping::Ancestor`] extents. A disk that never returns
    /// [`Mapping::Ancestor`] only has its own storage (the default); `None`
    /// when there is no such layer.
    fn layer_storage(&self, depth: u32) -> Option<&dyn Storage> {
        (depth == 0).then(|| self.storage())
    }

    /// Make room for writing the range starting at `offset` (allocating if
    /// needed) and say where its first run goes: an extent starting at
    /// `offset`, at most `len` bytes long.
    ///
    /// # Errors
    /// Read-only disk, out of space, corrupt metadata, I/O errors.
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        let _ = (offset, len);
        Err(Error::invalid("disk is read-only").in_file(self.storage().name(), 0))
    }

    /// Called once the bytes of `ext` have been written to storage.
    ///
    /// # Errors
    /// I/O errors while recording the write.
    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        let _ = ext;
        Ok(())
    }

    /// Make every completed write durable.
    ///
    /// # Errors
    /// I/O errors.
    fn flush(&self) -> Result<()>;

    /// The copy-up locks of a disk that tracks sectors one by one (see
    /// [`crate::copy_up`]); `None` for a disk that does not.
    fn copy_up_locks(&self) -> Option<&CopyUpLocks> {
        None
    }

    /// Flush and close: what a driver does at a clean close (VHDX: an empty
    /// log in both headers). Idempotent, and through `&self`, so a disk
    /// shared between threads (`Arc`) is closed without unwrapping it; once
    /// closed, writes fail. The file itself (and its image lock) is released
    /// when the last handle is dropped. The default flushes.
    ///
    /// # Errors
    /// I/O errors.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Tell the disk that the range's contents are no longer needed. Drivers
    /// may deallocate whole blocks inside it; afterwards the range reads as
    /// zeros or as its old contents, block by block.
    ///
    /// # Errors
    /// I/O errors.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Make the range read as zeros. With `unmap`, the disk may also give
    /// back the space of whole blocks inside it (VHDX: such blocks become
    /// PAYLOAD_BLOCK_ZERO, MS-VHDX 2.5.1.1, keeping their file space
    /// unless `unmap`); what is not a whole block is written with zeros
    /// through the one write loop. The default writes zeros.
    ///
    /// # Errors
    /// Read-only disk, out-of-range requests, I/O errors.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = unmap;
        write_zero_bytes(self, offset, len)
    }

    /// The unit in which [`VirtualDisk::discard`] and an unmapping
    /// [`VirtualDisk::write_zeroes`] give space back: whole aligned blocks
    /// of this many bytes (for virtio-blk's discard_sector_alignment and
    /// SCSI's optimal unmap granularity); 0 when they never do.
    fn discard_granularity(&self) -> u64 {
        0
    }

    /// A stable identity of the disk, for virtio-blk GET_ID and SCSI VPD
    /// page 83: the VHDX virtual disk id, the VHD unique id, for a raw file
    /// one derived from its device and inode. The same across opens of the
    /// same image; `None` when the disk has none.
    fn disk_id(&self) -> Option<uuid::Uuid> {
        None
    }

    /// Read into several buffers, one after the other from `offset`
    /// (a guest request's descriptors): each is filled by
    /// [`VirtualDisk::read_at`], straight from the image, with no
    /// intermediate copy.
    ///
    /// # Errors
    /// As [`VirtualDisk::read_at`]; the range of all buffers is checked
    /// first.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        check_range(self, offset, usize::try_from(total).unwrap_or(usize::MAX))?;
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }

    /// Write several buffers, one after the other from `offset`, each by
    /// [`VirtualDisk::write_at`] (no intermediate copy).
    ///
    /// # Errors
    /// As [`VirtualDisk::write_at`]; the range of all buffers is checked
    /// first.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        check_range(self, offset, usize::try_from(total).unwrap_or(usize::MAX))?;
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }

    /// Whether [`VirtualDisk::write_at`] may succeed.
    fn is_writable(&self) -> bool {
        self.storage().is_writable()
    }

    /// Virtual size in bytes.
    fn virtual_size(&self) -> u64 {
        self.geometry().virtual_size
    }

    /// Read `buf.len()` bytes of the virtual disk at `offset` (any alignment).
    ///
    /// Each extent [`VirtualDisk::map`] returns is read from this disk's
    /// storage ([`Mapping::Data`]), from an ancestor's storage
    /// ([`Mapping::Ancestor`], via [`VirtualDisk::layer_storage`]), from the
    /// parent disk ([`Mapping::Parent`]), or is zeros.
    ///
    /// # Errors
    /// Out-of-range requests, corrupt metadata (including an
    /// [`Mapping::Ancestor`] naming a layer the disk does not have), I/O
    /// errors.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self, offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let ext = self.map(pos, want)?;
            let n = usize::try_from(ext.len.min(want)).unwrap_or(usize::MAX);
            if ext.offset != pos || n == 0 {
                return Err(Error::corrupt(
                    "block mapping",
                    pos,
                    "driver returned an empty or misplaced extent",
                )
                .in_file(self.storage().name(), 0));
            }
            let chunk = &mut buf[done..done + n];
            match ext.mapping {
                Mapping::Data(FileOffset(fo)) => self.storage().read_at(chunk, fo)?,
                Mapping::Zero | Mapping::Unallocated => chunk.fill(0),
                Mapping::Parent => match self.parent() {
                    Some(p) => p.read_at(chunk, pos)?,
                    None => chunk.fill(0),
                },
                Mapping::Ancestor {
                    depth,
                    offset: FileOffset(fo),
                } => {
                    let Some(s) = self.layer_storage(depth) else {
                        return Err(Error::corrupt(
                            "block mapping",
                            pos,
                            format!("mapped to layer {depth} below, which this disk does not have"),
                        )
                        .in_file(self.storage().name(), 0));
                    };
                    s.read_at(chunk, fo)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Write `buf` to the virtual disk at `offset` (any alignment).
    ///
    /// # Errors
    /// Read-only disk, out-of-range requests, I/O errors.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self, offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let ext = self.map_write(pos, want)?;
            let n = usize::try_from(ext.len.min(want)).unwrap_or(usize::MAX);
            if ext.offset != pos || n == 0 {
                return Err(Error::corrupt(
                    "block mapping",
                    pos,
                    "driver returned an empty or misplaced write extent",
                )
                .in_file(self.storage().name(), 0));
            }
            let chunk = &buf[done..done + n];
            // Held from the fill's read of the current contents until the
            // driver has recorded the write (see `copy_up`).
            let _copy_up = ext
                .copy_up
                .and_then(|block| self.copy_up_locks().map(|l| l.lock(block)));
            if ext.fill_partial_sectors {
                write_with_sector_fill(self, chunk, pos, ext.file_offset)?;
            } else {
                self.storage().write_at(chunk, ext.file_offset.0)?;
            }
            self.commit_write(&WriteExtent {
                len: n as u64,
                ..ext
            })?;
            done += n;
        }
        Ok(())
    }
}

/// A shared disk is a disk: every method forwards to the shared one
/// (overridden provided methods included).
impl<T: VirtualDisk + ?Sized> VirtualDisk for Arc<T> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn storage(&self) -> &dyn Storage {
        (**self).storage()
    }
    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        (**self).parent()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        (**self).map(offset, len)
    }
    fn map_allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        (**self).map_allocation(offset, len)
    }
    fn layer_storage(&self, depth: u32) -> Option<&dyn Storage> {
        (**self).layer_storage(depth)
    }
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        (**self).map_write(offset, len)
    }
    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        (**self).commit_write(ext)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn copy_up_locks(&self) -> Option<&CopyUpLocks> {
        (**self).copy_up_locks()
    }
    fn close(&self) -> Result<()> {
        (**self).close()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn discard_granularity(&self) -> u64 {
        (**self).discard_granularity()
    }
    fn disk_id(&self) -> Option<uuid::Uuid> {
        (**self).disk_id()
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
}

/// The blocks of `block_size` bytes lying wholly inside `[offset,
/// offset+len)` of a disk of `virtual_size` bytes (a last, partial block
/// counts as whole when the range reaches the end of the disk): what a
/// discard may deallocate.
pub fn whole_blocks(offset: u64, len: u64, block_size: u64, virtual_size: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(virtual_size);
    let first = offset.div_ceil(block_size);
    let mut last = end / block_size;
    if end == virtual_size && !end.is_multiple_of(block_size) {
        last += 1;
    }
    first..last.max(first)
}

/// Bytes of zeros written at a time by [`write_zero_bytes`].
const ZERO_CHUNK: u64 = 1 << 20;

/// Write `len` zero bytes at `offset` through the disk's write loop (what
/// [`VirtualDisk::write_zeroes`] does for what it cannot state as zeros).
///
/// # Errors
/// As [`VirtualDisk::write_at`].
pub fn write_zero_bytes<D: VirtualDisk + ?Sized>(disk: &D, offset: u64, len: u64) -> Result<()> {
    check_range(disk, offset, usize::try_from(len).unwrap_or(usize::MAX))?;
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        disk.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn check_range<D: VirtualDisk + ?Sized>(disk: &D, offset: u64, len: usize) -> Result<()> {
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= disk.virtual_size() => Ok(()),
        _ => Err(Error::invalid(format!(
            "range {offset:#x}+{len:#x} is beyond the virtual size {:#x}",
            disk.virtual_size()
        ))
        .in_file(disk.storage().name(), 0)),
    }
}

/// Write `chunk` at virtual `pos` / file `fo`, first merging the sectors it
/// only partly covers with their current virtual contents.
fn write_with_sector_fill<D: VirtualDisk + ?Sized>(
    disk: &D,
    chunk: &[u8],
    pos: u64,
    fo: FileOffset,
) -> Result<()> {
    let ss = u64::from(disk.geometry().logical_sector_size.max(1));
    let start = pos - pos % ss;
    let end = (pos + chunk.len() as u64).div_ceil(ss) * ss;
    if start == pos && end == pos + chunk.len() as u64 {
        return disk.storage().write_at(chunk, fo.0);
    }
    let bytes = |n: u64| {
        usize::try_from(n).map_err(|_| {
            Error::invalid(format!(
                "{n} bytes (a write of {} bytes in {ss}-byte sectors) do not fit in memory",
                chunk.len()
            ))
        })
    };
    let mut merged = vec![0u8; bytes(end - start)?];
    let head = bytes(pos - start)?;
    let sector = bytes(ss)?;
    // Current contents of the first and last partial sectors.
    disk.read_at(&mut merged[..sector], start)?;
    let last = merged.len() - sector;
    if last > 0 {
        disk.read_at(&mut merged[last..], end - ss)?;
    }
    merged[head..head + chunk.len()].copy_from_slice(chunk);
    disk.storage().write_at(&merged, fo.0 - (pos - start))
}

/// A thin `std::io` adapter (Read/Write/Seek) over a virtual disk.
pub struct Cursor<'a, D: ?Sized> {
    disk: &'a D,
    pos: u64,
}

impl<'a, D: VirtualDisk + ?Sized> Cursor<'a, D> {
    /// A cursor at offset 0.
    pub fn new(disk: &'a D) -> Self {
        Cursor { disk, pos: 0 }
    }
}

fn to_io(e: Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl<D: VirtualDisk + ?Sized> std::io::Read for Cursor<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.disk.virtual_size().saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        self.disk.read_at(&mut buf[..n], self.pos).map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: VirtualDisk + ?Sized> std::io::Write for Cursor<'_, D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.disk.write_at(buf, self.pos).map_err(to_io)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.disk.flush().map_err(to_io)
    }
}

impl<D: VirtualDisk + ?Sized> std::io::Seek for Cursor<'_, D> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let size = self.disk.virtual_size();
        let new = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )),
        }
    }
}
