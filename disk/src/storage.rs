//! Backing storage: where a format driver's bytes live (a file, memory, or a
//! fault-injecting recorder in tests). Positional I/O only, `&self` everywhere.

use crate::error::{Error, Result};
use crate::lock::LockMode;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Positional byte storage under a virtual disk image.
///
/// Implementations must be `Send + Sync`; concurrent calls on disjoint ranges
/// must not interfere.
pub trait Storage: Send + Sync {
    /// A name for error messages (usually the file path).
    fn name(&self) -> &str;
    /// Read exactly `buf.len()` bytes at `offset`. Reading past the end is an error.
    ///
    /// # Errors
    /// I/O errors, or a short read past the end of storage.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    ///
    /// # Errors
    /// I/O errors.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make every completed write durable.
    ///
    /// # Errors
    /// I/O errors.
    fn flush(&self) -> Result<()>;
    /// Current length in bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn len(&self) -> Result<u64>;
    /// Whether the storage is empty.
    ///
    /// # Errors
    /// I/O errors.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend (with zeros) to `len` bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;

    /// The file behind the storage, as (device, inode), when there is one:
    /// what identifies a raw image across opens.
    fn file_id(&self) -> Option<(u64, u64)> {
        None
    }

    /// Where the byte range starting at `offset` (< length) holds data: the
    /// first data offset at or after `offset` and the end of that data run,
    /// or `None` when only holes follow. Storage that cannot tell reports
    /// everything up to its length as data.
    ///
    /// # Errors
    /// I/O errors.
    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        let len = self.len()?;
        Ok((offset < len).then_some((offset, len)))
    }
}

/// Bytes per read or write of [`copy_range`] and [`fill_range`].
const RANGE_CHUNK: u64 = 1 << 20;

/// Copy `len` bytes of `st` at `from` to `to`, 1 MiB at a time, front to
/// back (so `to` must not lie inside `(from, from + len)`); no sync.
///
/// # Errors
/// I/O errors.
pub fn copy_range(st: &dyn Storage, from: u64, to: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(RANGE_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(RANGE_CHUNK) as usize;
        st.read_at(&mut buf[..n], from + done)?;
        st.write_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Write `len` bytes of `byte` at `offset`, 1 MiB at a time; no sync.
///
/// # Errors
/// I/O errors.
pub fn fill_range(st: &dyn Storage, offset: u64, len: u64, byte: u8) -> Result<()> {
    let buf = vec![byte; len.min(RANGE_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(RANGE_CHUNK) as usize;
        st.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Whether every one of the `len` bytes of `st` at `offset` is `byte`
/// (read 1 MiB at a time).
///
/// # Errors
/// I/O errors (reading past the end is one).
pub fn range_is(st: &dyn Storage, offset: u64, len: u64, byte: u8) -> Result<bool> {
    let mut buf = vec![0u8; len.min(RANGE_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(RANGE_CHUNK) as usize;
        st.read_at(&mut buf[..n], offset + done)?;
        // A fold without early exit, which the compiler vectorizes.
        if buf[..n].iter().fold(0, |acc, &b| acc | (b ^ byte)) != 0 {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

/// A file on the host file system.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    name: String,
    writable: bool,
}

impl FileStorage {
    /// Open an existing file, read-only or read-write, with the image lock
    /// of [`LockMode::Auto`]: exclusive when writable, shared when not.
    ///
    /// # Errors
    /// The file cannot be opened, or another open holds it
    /// ([`crate::ErrorKind::Locked`]).
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self> {
        Self::open_with(path, writable, LockMode::Auto)
    }

    /// Open an existing file, read-only or read-write, claiming it as
    /// `lock` says (see [`crate::lock`]).
    ///
    /// # Errors
    /// The file cannot be opened, another open holds it
    /// ([`crate::ErrorKind::Locked`]), or [`LockMode::ForceShare`] was
    /// asked for a writable open.
    pub fn open_with(path: impl AsRef<Path>, writable: bool, lock: LockMode) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io("cannot open", e).in_file(&name, 0))?;
        crate::lock::claim(&file, &name, writable, lock)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            name,
            writable,
        })
    }

    /// Create a new file (failing if it exists unless `overwrite`), holding
    /// the exclusive image lock. An existing file is emptied only once the
    /// lock is held, so a file in use by another open is refused untouched.
    ///
    /// # Errors
    /// The file cannot be created, or another open holds it.
    pub fn create(path: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true);
        if overwrite {
            opts.create(true);
        } else {
            opts.create_new(true);
        }
        let file = opts
            .open(path)
            .map_err(|e| Error::io("cannot create", e).in_file(&name, 0))?;
        crate::lock::claim(&file, &name, true, LockMode::Auto)?;
        file.set_len(0)
            .map_err(|e| Error::io("cannot empty", e).in_file(&name, 0))?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            name,
            writable: true,
        })
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!("read of {} bytes at offset {offset:#x}", buf.len()),
                e,
            )
            .in_file(&self.name, 0)
        })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                format!("write of {} bytes at offset {offset:#x}", buf.len()),
                e,
            )
            .in_file(&self.name, 0)
        })
    }
    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync", e).in_file(&self.name, 0))?;
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", e).in_file(&self.name, 0))?
            .len())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(format!("resize to {len} bytes"), e).in_file(&self.name, 0))
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    fn file_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ok()?;
        Some((m.dev(), m.ino()))
    }
    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let err = |what: &str, e: rustix::io::Errno| {
            Error::io(format!("{what} at offset {offset:#x}"), e.into()).in_file(&self.name, 0)
        };
        let start = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(s) => s,
            // ENXIO: no data at or after `offset`.
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            // File systems without hole support: all data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                let len = self.len()?;
                return Ok((offset < len).then_some((offset, len)));
            }
            Err(e) => return Err(err("SEEK_DATA", e)),
        };
        let end = seek(&self.file, SeekFrom::Hole(start)).map_err(|e| err("SEEK_HOLE", e))?;
        Ok(Some((start, end)))
    }
}

/// Storage in memory, for tests and scratch images.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    name: String,
}

impl MemStorage {
    /// An empty in-memory storage.
    pub fn new(name: impl Into<String>) -> Self {
        MemStorage {
            data: RwLock::new(Vec::new()),
            name: name.into(),
        }
    }
    /// In-memory storage holding `bytes`.
    pub fn from_vec(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
            name: name.into(),
        }
    }
    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Make `data` at least `len` bytes long (zeros), or fail as a file
/// system that is full would, never abort the process: memory is reserved
/// before it is filled.
fn grow(data: &mut Vec<u8>, len: usize, name: &str) -> Result<()> {
    if let Some(more) = len.checked_sub(data.len()).filter(|&m| m > 0) {
        data.try_reserve_exact(more).map_err(|e| {
            Error::io(
                format!("growing in-memory storage to {len} bytes: {e}"),
                std::io::ErrorKind::OutOfMemory.into(),
            )
            .in_file(name, 0)
        })?;
        data.resize(len, 0);
    }
    Ok(())
}

impl Storage for MemStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| Some((s, s.checked_add(buf.len())?)))
            .and_then(|(s, e)| data.get(s..e));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::io(
                format!("read of {} bytes at offset {offset:#x}", buf.len()),
                std::io::ErrorKind::UnexpectedEof.into(),
            )
            .in_file(&self.name, 0)),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let end = usize::try_from(offset)
            .ok()
            .and_then(|s| s.checked_add(buf.len()))
            .ok_or_else(|| Error::invalid("write beyond addressable memory"))?;
        grow(&mut data, end, &self.name)?;
        data[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| Error::invalid("length too large"))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        grow(&mut data, len, &self.name)?;
        data.truncate(len);
        Ok(())
    }
    fn is_writable(&self) -> bool {
        true
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn file_id(&self) -> Option<(u64, u64)> {
        (**self).file_id()
    }
    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        (**self).data_run(offset)
    }
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn file_id(&self) -> Option<(u64, u64)> {
        (**self).file_id()
    }
    fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        (**self).data_run(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn copy_fill_and_range_is_across_chunks() {
        let bytes: Vec<u8> = (0..=250u8).cycle().take(5 * MIB).collect();
        let st = MemStorage::from_vec("m", bytes.clone());
        // 2 MiB + 300 bytes: two whole chunks and a part, to later space.
        let (len, to) = (2 * MIB + 300, 3 * MIB - 5);
        copy_range(&st, 100, to as u64, len as u64).unwrap();
        let got = st.to_vec();
        assert!(got[to..to + len] == bytes[100..100 + len], "copied bytes");
        assert!(got[..to] == bytes[..to], "bytes before the copy");
        fill_range(&st, 7, (MIB + 9) as u64, 0xff).unwrap();
        let got = st.to_vec();
        assert!(got[7..MIB + 16].iter().all(|&b| b == 0xff));
        assert_eq!((got[6], got[MIB + 16]), (bytes[6], bytes[MIB + 16]));
        assert!(range_is(&st, 7, (MIB + 9) as u64, 0xff).unwrap());
        assert!(!range_is(&st, 6, (MIB + 9) as u64, 0xff).unwrap());
        assert!(!range_is(&st, 8, (MIB + 9) as u64, 0xff).unwrap());
        assert!(range_is(&st, 0, 0, 0xff).unwrap());
        let end = st.len().unwrap();
        assert!(range_is(&st, end, 1, 0).is_err(), "past the end");
        copy_range(&st, 0, 0, 0).unwrap();
        fill_range(&st, 0, 0, 1).unwrap();
    }

    #[test]
    fn memory_storage_refuses_an_impossible_size_with_an_error() {
        let st = MemStorage::from_vec("m", vec![1u8; 4096]);
        let e = st.write_at(&[2u8; 512], 1 << 62).unwrap_err();
        assert_eq!(
            e.io_error().map(std::io::Error::kind),
            Some(std::io::ErrorKind::OutOfMemory),
            "{e}"
        );
        assert!(e.to_string().starts_with("m: "), "names the storage: {e}");
        assert!(st.set_len(1 << 62).is_err());
        // Nothing changed; ordinary growth and cuts still work.
        assert_eq!(st.len().unwrap(), 4096);
        st.write_at(&[3u8; 512], 8192).unwrap();
        assert_eq!(st.len().unwrap(), 8704);
        st.set_len(100).unwrap();
        assert_eq!(st.to_vec(), vec![1u8; 100]);
    }
}
