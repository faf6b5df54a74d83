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

/// A UUID for the file `(device, inode)`: the same for every open of the
/// file, different for other files (two 64-bit mixes of both numbers),
/// marked as a version 8 (custom) RFC 4122 UUID.
pub(crate) fn file_uuid(dev: u64, ino: u64) -> uuid::Uuid {
    fn mix(mut x: u64) -> u64 {
        // splitmix64's finalizer.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let hi = mix(dev ^ mix(ino));
    let lo = mix(ino ^ mix(dev.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b)
}

impl<S: Storage> VirtualDisk for RawDisk<S> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn disk_id(&self) -> Option<uuid::Uuid> {
        self.storage.file_id().map(|(dev, ino)| file_uuid(dev, ino))
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
    fn map_allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        let (mapping, run) = match self.storage.data_run(offset)? {
            Some((start, _)) if start > offset => (Mapping::Unallocated, start - offset),
            Some((_, end)) => (Mapping::Data(FileOffset(offset)), end - offset),
            None => (Mapping::Unallocated, len),
        };
        Ok(Extent {
            offset,
            len: run.clamp(1, len),
            mapping,
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
            copy_up: None,
        })
    }
    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileStorage;

    #[test]
    fn holes_of_a_sparse_file_are_unallocated() {
        let dir = std::env::temp_dir().join(format!("disk-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse.raw");
        let st = FileStorage::create(&path, true).unwrap();
        let raw = RawDisk::create(st, 64 << 20).unwrap();
        raw.write_at(&[7u8; 4096], 32 << 20).unwrap();
        let size = raw.virtual_size();
        let mut pos = 0;
        let mut data = 0;
        while pos < size {
            let e = raw.map_allocation(pos, size - pos).unwrap();
            assert_eq!(e.offset, pos);
            assert!(e.len > 0 && pos + e.len <= size);
            if let Mapping::Data(_) = e.mapping {
                data += e.len;
                let mut b = vec![0u8; usize::try_from(e.len).unwrap()];
                raw.read_at(&mut b, pos).unwrap();
            }
            pos += e.len;
        }
        // The written page is data; (nearly) everything else is a hole on
        // file systems that track holes, and all data on those that do not.
        assert!(data >= 4096);
        let mut b = [0u8; 4096];
        raw.read_at(&mut b, 32 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
