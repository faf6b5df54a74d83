//! Guest memory of a VM checkpoint: a sparse file as large as guest RAM,
//! each 64 KiB piece that holds a non-zero byte written at its own offset
//! and the rest left as holes, so untouched memory takes no space.
//!
//! Restoring maps the file privately (copy-on-write) as the new guest RAM:
//! a page is read from the file only when the guest first touches it, and
//! what the guest writes never reaches the file.

use crate::memory::Ram;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
use vm_memory::FileOffset;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The piece memory is scanned and written in.
const PIECE: usize = 64 << 10;

/// Write `ram` (of `size` bytes) to `path` as a sparse file, synced; the
/// bytes written (the non-zero pieces).
///
/// # Errors
/// I/O errors, naming the file.
pub fn save(ram: &Ram, size: u64, path: &Path) -> Result<u64, String> {
    let err = |e: std::io::Error| format!("writing guest memory to {}: {e}", path.display());
    let f = File::create(path).map_err(err)?;
    f.set_len(size).map_err(err)?;
    let mut buf = vec![0u8; PIECE];
    let mut written = 0u64;
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from((size - at).min(PIECE as u64)).unwrap_or(PIECE);
        ram.read_slice(&mut buf[..n], GuestAddress(at))
            .map_err(|e| format!("reading guest memory at {at:#x}: {e}"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], at).map_err(err)?;
            written += n as u64;
        }
        at += n as u64;
    }
    f.sync_all().map_err(err)?;
    Ok(written)
}

/// Map the memory file at `path` privately as guest RAM of `size` bytes.
///
/// # Errors
/// The file is missing, not `size` bytes long, or cannot be mapped.
pub fn restore(path: &Path, size: u64) -> Result<Ram, String> {
    let name = path.display();
    let f = File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let len = f.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    if len != size {
        return Err(format!(
            "{name}: {len} bytes, but the checkpoint's guest memory is {size} bytes (the \
             memory file does not belong to this state, or was cut)"
        ));
    }
    let n = usize::try_from(size).map_err(|_| format!("{name}: too large"))?;
    let region = MmapRegionBuilder::new(n)
        .with_file_offset(FileOffset::new(f, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| format!("mapping {name}: {e}"))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| format!("mapping {name}: an impossible guest region"))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| format!("mapping {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_save_and_private_restore() {
        let size = 64u64 << 20;
        let ram = crate::memory::create(size).unwrap();
        ram.write_slice(b"first page", GuestAddress(0)).unwrap();
        ram.write_slice(b"middle", GuestAddress(33 << 20)).unwrap();
        ram.write_slice(b"end", GuestAddress(size - 3)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.mem");
        let written = save(&ram, size, &p).unwrap();
        assert_eq!(written, 3 * PIECE as u64);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), size);
        // Sparse: a few pieces' worth of blocks, not 64 MiB.
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let back = restore(&p, size).unwrap();
        let mut b = [0u8; 10];
        back.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"first page");
        let mut b = [0u8; 6];
        back.read_slice(&mut b, GuestAddress(33 << 20)).unwrap();
        assert_eq!(&b, b"middle");
        let mut z = [1u8; 16];
        back.read_slice(&mut z, GuestAddress(1 << 20)).unwrap();
        assert_eq!(z, [0; 16]);
        // Private: the guest's writes do not reach the file.
        back.write_slice(b"CHANGED", GuestAddress(0)).unwrap();
        drop(back);
        let again = restore(&p, size).unwrap();
        let mut b = [0u8; 10];
        again.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"first page");
        // A file of another size is refused.
        let e = restore(&p, size * 2).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        assert!(restore(&dir.path().join("none"), size).is_err());
    }
}
