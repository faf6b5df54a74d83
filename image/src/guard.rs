//! A raw image, guarded when its format was guessed rather than given.
//!
//! Detection takes a file for raw when it finds no signature. Such a guess
//! must not be able to destroy anything or to change what the next
//! detection says, so, as QEMU does for probed raw images (stricter: QEMU
//! refuses only writes that would change the probed format), a raw image
//! opened without `-f raw` refuses:
//! - any write touching its first sector (bytes 0 to 511), where the VHDX
//!   and VHD signatures are, and where a damaged image whose signature was
//!   lost keeps what is left of its header;
//! - a write that would put the VHD footer cookie ("conectix") at the start
//!   of its last 512 (or 511) bytes: the file would then detect as a fixed
//!   VHD.
//!
//! Every CLI path that writes guest data (`vdisk write`, `vdisk mount
//! --rw`) goes through this disk.

use crate::open::RawDriver;
use disk::{Error, Extent, Geometry, Result, Storage, VirtualDisk, WriteExtent};
use std::sync::Arc;

/// The first sector, which a guessed raw image does not let anyone write.
const FIRST_SECTOR: u64 = 512;
/// The VHD footer cookie, and where at the end of a file detection looks
/// for it (512 bytes before the end; 511 for old footers).
const VHD_COOKIE: &[u8; 8] = b"conectix";
const FOOTER_PLACES: [u64; 2] = [512, 511];

/// A raw image whose format was probed, not given: its writes are
/// guarded (see the module docs).
pub struct ProbedRaw {
    disk: Arc<RawDriver>,
}

impl ProbedRaw {
    /// Guard the raw disk `disk`.
    pub fn new(disk: Arc<RawDriver>) -> ProbedRaw {
        ProbedRaw { disk }
    }

    /// Refuse what a guessed raw image must not be written (module docs).
    fn check_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let name = self.disk.storage().name();
        if offset < FIRST_SECTOR {
            return Err(Error::invalid(
                "refusing to write the first sector (bytes 0 to 511) of an image whose format \
                 was guessed as raw: a write there could make it detect as another format, or \
                 destroy what is left of a damaged image's header; pass -f raw if it is a raw \
                 image",
            )
            .in_file(name, 0));
        }
        let size = self.disk.virtual_size();
        let end = offset.saturating_add(buf.len() as u64);
        for back in FOOTER_PLACES {
            let Some(at) = size.checked_sub(back) else {
                continue;
            };
            let cookie_end = at + VHD_COOKIE.len() as u64;
            if end <= at || cookie_end <= offset {
                continue;
            }
            let mut after = [0u8; 8];
            self.disk.storage().read_at(&mut after, at)?;
            for (i, b) in after.iter_mut().enumerate() {
                let pos = at + i as u64;
                if (offset..end).contains(&pos) {
                    // pos - offset < buf.len(), a usize.
                    if let Some(&v) = usize::try_from(pos - offset).ok().and_then(|k| buf.get(k)) {
                        *b = v;
                    }
                }
            }
            if &after == VHD_COOKIE {
                return Err(Error::invalid(format!(
                    "refusing a write that would put a VHD footer cookie (\"conectix\") at \
                     offset {at}, {back} bytes before the end of an image whose format was \
                     guessed as raw: it would then detect as a fixed VHD; pass -f raw if it is a \
                     raw image"
                ))
                .in_file(name, 0));
            }
        }
        Ok(())
    }
}

/// What a guessed raw image refuses, for the note `vdisk mount --rw` prints.
pub const RESTRICTION: &str = "writes to its first sector (bytes 0 to 511), and writes that \
     would make it look like a fixed VHD, fail (EIO)";

impl VirtualDisk for ProbedRaw {
    fn geometry(&self) -> Geometry {
        self.disk.geometry()
    }
    fn storage(&self) -> &dyn Storage {
        self.disk.storage()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.disk.map(offset, len)
    }
    fn map_allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.disk.map_allocation(offset, len)
    }
    /// The first sector stays out of reach here too, for callers that
    /// write through the mapping rather than [`ProbedRaw::write_at`].
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        if offset < FIRST_SECTOR && len > 0 {
            return self
                .check_write(&[0], offset)
                .and_then(|()| self.disk.map_write(offset, len));
        }
        self.disk.map_write(offset, len)
    }
    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        self.disk.commit_write(ext)
    }
    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }
    fn close(&self) -> Result<()> {
        self.disk.close()
    }
    fn disk_id(&self) -> Option<uuid::Uuid> {
        self.disk.disk_id()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.disk.discard(offset, len)
    }
    fn is_writable(&self) -> bool {
        self.disk.is_writable()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(buf, offset)?;
        self.disk.write_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, Format, OpenOptions};
    use std::path::Path;

    fn image(dir: &Path, len: usize, format: Option<Format>) -> Arc<dyn VirtualDisk> {
        let p = dir.join("g.raw");
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let opts = OpenOptions {
            format,
            writable: true,
            ..OpenOptions::probing()
        };
        open(&p, &opts).unwrap().disk().clone()
    }

    #[test]
    fn guessed_refuses_the_first_sector_and_a_footer_cookie() {
        let dir = tempfile::tempdir().unwrap();
        let d = image(dir.path(), 8192, None);
        for off in [0, 1, 511] {
            let e = d.write_at(b"x", off).unwrap_err().to_string();
            assert!(e.contains("first sector") && e.contains("-f raw"), "{e}");
        }
        let e = d.write_at(&[1u8; 1024], 0).unwrap_err().to_string();
        assert!(e.contains("first sector"), "{e}");
        assert!(d.map_write(100, 10).is_err());
        d.write_at(b"ok", 512).unwrap();
        // The cookie at 512 or 511 bytes before the end, whole or completing
        // bytes already there, is refused; elsewhere it is data.
        for at in [8192 - 512, 8192 - 511] {
            let e = d.write_at(VHD_COOKIE, at).unwrap_err().to_string();
            assert!(
                e.contains("fixed VHD") && e.contains(&at.to_string()),
                "{e}"
            );
            let mut pre = vec![7u8; 100];
            pre.extend_from_slice(VHD_COOKIE);
            assert!(d.write_at(&pre, at - 100).is_err());
        }
        d.write_at(b"conec", 8192 - 512).unwrap();
        assert!(d.write_at(b"tix", 8192 - 507).is_err());
        d.write_at(VHD_COOKIE, 8192 - 513).unwrap();
        d.write_at(VHD_COOKIE, 4096).unwrap();
        let mut b = [0u8; 2];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0, 0], "nothing reached the first sector");
    }

    #[test]
    fn given_raw_writes_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let d = image(dir.path(), 4096, Some(Format::Raw));
        d.write_at(b"vhdxfile", 0).unwrap();
        d.write_at(VHD_COOKIE, 4096 - 512).unwrap();
        let mut b = [0u8; 8];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"vhdxfile");
    }
}
