//! A raw image: the virtual disk is the file itself.

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::virtual_disk::{Extent, FileOffset, Geometry, Mapping, VirtualDisk, WriteExtent};

/// A raw disk image over any [`Storage`]; its size is fixed at open.
pub struct RawDisk<S> {
    storage: S,
    geometry: Geometry,
}

impl<S: Storage> RawDisk<S> {
    /// Wrap `storage`; the virtual size is its current length.
    ///
    /// # Errors
    /// I/O errors reading the length.
    pub fn new(storage: S) -> Result<Self> {
        let virtual_size = storage.len()?;
        Ok(RawDisk {
            storage,
            geometry: Geometry {
                virtual_size,
                logical_sector_size: 512,
                physical_sector_size: 512,
            },
        })
    }

    /// Create a raw image of `size` bytes (sparse where the file system allows).
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(storage: S, size: u64) -> Result<Self> {
        storage.set_len(size)?;
        Self::new(storage)
    }
}

impl<S: Storage> VirtualDisk for RawDisk<S> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn storage(&self) -> &dyn Storage {
        &self.storage
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            offset,
            len,
            mapping: Mapping::Data(FileOffset(offset)),
        })
    }
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        if !self.storage.is_writable() {
            return Err(Error::invalid("disk is read-only").in_file(self.storage.name(), 0));
        }
        Ok(WriteExtent {
            offset,
            len,
            file_offset: FileOffset(offset),
            fill_partial_sectors: false,
            token: 0,
        })
    }
    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }
}
