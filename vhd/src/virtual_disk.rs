//! The [`VirtualDisk`] implementation of [`Vhd`]: geometry, mapping (fixed
//! disks map one to one, dynamic ones through `block_map`), the write
//! commit, flush, discard and zeroing.

use crate::image::Vhd;
use crate::{Error, Result};
use disk::{Extent, FileOffset, Geometry, Mapping, Storage, VirtualDisk, WriteExtent};
use std::sync::Arc;
use uuid::Uuid;

impl VirtualDisk for Vhd {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        if len == 0 || offset >= self.virtual_size {
            return Err(Error::invalid(format!(
                "map of {offset:#x}+{len:#x} outside the virtual size {:#x}",
                self.virtual_size
            ))
            .in_file(self.name(), 0));
        }
        let run = len.min(self.virtual_size - offset);
        match &self.dynamic {
            None => Ok(Extent {
                offset,
                len: run,
                mapping: Mapping::Data(FileOffset(offset)),
            }),
            Some(d) => {
                let run = run.min(d.block_size - offset % d.block_size);
                self.map_dynamic(d, offset, run)
            }
        }
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.check_writable()?;
        if len == 0 || offset >= self.virtual_size {
            return Err(Error::invalid(format!(
                "write of {offset:#x}+{len:#x} outside the virtual size {:#x}",
                self.virtual_size
            ))
            .in_file(self.name(), 0));
        }
        let run = len.min(self.virtual_size - offset);
        match &self.dynamic {
            None => Ok(WriteExtent {
                offset,
                len: run,
                file_offset: FileOffset(offset),
                fill_partial_sectors: false,
                token: 0,
                copy_up: None,
            }),
            Some(d) => {
                let run = run.min(d.block_size - offset % d.block_size);
                self.map_write_dynamic(d, offset, run)
            }
        }
    }

    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        match &self.dynamic {
            Some(d) => self.commit_dynamic(d, ext),
            None => Ok(()),
        }
    }

    fn close(&self) -> Result<()> {
        self.close_inner()
    }

    fn copy_up_locks(&self) -> Option<&disk::CopyUpLocks> {
        Some(&self.copy_up)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_blocks(offset, len)
    }

    /// A dynamic disk without a parent unmaps whole blocks (they read as
    /// zeros once unallocated); the rest, and every differencing disk (an
    /// unallocated block would read the parent: VHD has no zero state),
    /// gets zeros written.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let size = self.geometry().virtual_size;
        let end = offset.saturating_add(len);
        let bs = self.discard_granularity();
        if !unmap || bs == 0 || end > size {
            return disk::write_zero_bytes(self, offset, len);
        }
        let blocks = disk::whole_blocks(offset, len, bs, size);
        if blocks.is_empty() {
            return disk::write_zero_bytes(self, offset, len);
        }
        let (first, past) = (blocks.start * bs, (blocks.end * bs).min(size));
        disk::write_zero_bytes(self, offset, first - offset)?;
        self.discard_blocks(first, past - first)?;
        disk::write_zero_bytes(self, past, end - past)
    }

    fn discard_granularity(&self) -> u64 {
        match &self.dynamic {
            Some(d) if self.parent.is_none() => d.block_size,
            _ => 0,
        }
    }

    fn disk_id(&self) -> Option<Uuid> {
        Some(self.info.footer.unique_id)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("file", &self.name())
            .field("type", &self.info.subformat())
            .field("virtual_size", &self.virtual_size)
            .field("writable", &self.writable)
            .finish()
    }
}
