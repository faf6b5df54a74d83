//! The state file of a VM checkpoint: a versioned, checksummed container
//! of tagged sections.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VMMSTATE"
//! 8       4     format version (little-endian; this VMM writes and reads 1)
//! 12      4     section count N
//! 16      ...   N sections: tag (4 ASCII bytes), length L (u64 LE), L bytes
//! end-4   4     CRC-32C of every byte before it
//! ```
//!
//! A file is written whole to a temporary name, synced and renamed into
//! place, so a crash leaves the old file or the new one. Reading checks,
//! in this order and each with its own message: that the file is not
//! larger than [`MAX_STATE`] (nothing is allocated beyond it), the magic,
//! the version, the checksum, then each section's bounds.

use std::io::Write;
use std::path::Path;

/// The magic at offset 0.
pub const MAGIC: &[u8; 8] = b"VMMSTATE";
/// The version this VMM writes and reads.
pub const VERSION: u32 = 1;
/// The largest state file read (vCPU registers, device registers and the
/// configuration take a few KiB per vCPU).
pub const MAX_STATE: u64 = 16 << 20;

/// A section's tag.
pub type Tag = [u8; 4];

/// The sections of a state file, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateFile {
    /// Each section: its tag and bytes.
    pub sections: Vec<(Tag, Vec<u8>)>,
}

impl StateFile {
    /// Add a section.
    pub fn push(&mut self, tag: Tag, bytes: Vec<u8>) {
        self.sections.push((tag, bytes));
    }

    /// The first section tagged `tag`.
    pub fn get(&self, tag: Tag) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, b)| b.as_slice())
    }

    /// Every section tagged `tag`, in order.
    pub fn all(&self, tag: Tag) -> impl Iterator<Item = &[u8]> {
        self.sections
            .iter()
            .filter(move |(t, _)| *t == tag)
            .map(|(_, b)| b.as_slice())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let n = u32::try_from(self.sections.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for (tag, bytes) in &self.sections {
            out.extend_from_slice(tag);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse a file's bytes (`name` for messages).
    ///
    /// # Errors
    /// What is wrong, and where.
    pub fn parse(name: &str, b: &[u8]) -> Result<StateFile, String> {
        if b.len() < 20 || &b[..8] != MAGIC {
            return Err(format!(
                "{name}: not a vmm state file (no \"VMMSTATE\" magic at offset 0)"
            ));
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != VERSION {
            return Err(format!(
                "{name}: state file version {version}: this vmm reads version {VERSION} \
                 (an incompatible vmm wrote it)"
            ));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        let want = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if crc32c::crc32c(body) != want {
            return Err(format!(
                "{name}: the state file is damaged or truncated (its checksum at offset {:#x} \
                 does not match its {} bytes)",
                body.len(),
                body.len()
            ));
        }
        let count = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let mut at = 16usize;
        let mut sections = Vec::new();
        for i in 0..count {
            let head = body.get(at..at + 12).ok_or_else(|| {
                format!("{name}: section {i} of {count} at offset {at:#x} is past the end")
            })?;
            let tag: Tag = [head[0], head[1], head[2], head[3]];
            let len = u64::from_le_bytes(head[4..12].try_into().unwrap_or_default());
            let start = at + 12;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|e| *e <= body.len())
                .ok_or_else(|| {
                    format!(
                        "{name}: section {i} ({}) at offset {at:#x} claims {len} bytes, past \
                         the end",
                        String::from_utf8_lossy(&tag)
                    )
                })?;
            sections.push((tag, body[start..end].to_vec()));
            at = end;
        }
        if at != body.len() {
            return Err(format!(
                "{name}: {} bytes after the last section, at offset {at:#x}",
                body.len() - at
            ));
        }
        Ok(StateFile { sections })
    }

    /// Write it to `path` atomically (a temporary file, synced, renamed;
    /// the directory synced).
    ///
    /// # Errors
    /// I/O errors, naming the file.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("state.tmp");
        let err = |e: std::io::Error| format!("writing {}: {e}", path.display());
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&self.to_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Read and check the file at `path`.
    ///
    /// # Errors
    /// It cannot be read, is too large, or is no valid state file.
    pub fn read(path: &Path) -> Result<StateFile, String> {
        let name = path.display().to_string();
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{name}: {e}"))?
            .len();
        if len > MAX_STATE {
            return Err(format!(
                "{name}: {len} bytes, larger than any vmm state file ({MAX_STATE} at most)"
            ));
        }
        let b = std::fs::read(path).map_err(|e| format!("{name}: {e}"))?;
        StateFile::parse(&name, &b)
    }
}

/// A little TLV inside a section: tag, u32 length, bytes.
#[derive(Debug, Default)]
pub struct Fields(Vec<u8>);

impl Fields {
    /// Add one field.
    pub fn put(&mut self, tag: Tag, bytes: &[u8]) {
        self.0.extend_from_slice(&tag);
        self.0
            .extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }

    /// The bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Split a section into its fields.
    ///
    /// # Errors
    /// A field runs past the end.
    pub fn parse(b: &[u8]) -> Result<Vec<(Tag, &[u8])>, String> {
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < b.len() {
            let head = b
                .get(at..at + 8)
                .ok_or_else(|| format!("a field header at {at:#x} is cut"))?;
            let tag: Tag = [head[0], head[1], head[2], head[3]];
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let start = at + 8;
            let end = start
                .checked_add(usize::try_from(len).unwrap_or(usize::MAX))
                .filter(|e| *e <= b.len())
                .ok_or_else(|| {
                    format!(
                        "field {} at {at:#x} claims {len} bytes, past the end",
                        String::from_utf8_lossy(&tag)
                    )
                })?;
            out.push((tag, &b[start..end]));
            at = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let mut s = StateFile::default();
        s.push(*b"CONF", b"{\"a\":1}".to_vec());
        s.push(*b"VCPU", vec![1, 2, 3]);
        s.push(*b"VCPU", vec![]);
        s
    }

    #[test]
    fn round_trip_and_lookups() {
        let s = sample();
        let b = s.to_bytes();
        let back = StateFile::parse("x", &b).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.get(*b"CONF"), Some(&b"{\"a\":1}"[..]));
        assert_eq!(back.all(*b"VCPU").count(), 2);
        assert_eq!(back.get(*b"NONE"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.state");
        s.write(&p).unwrap();
        assert_eq!(StateFile::read(&p).unwrap(), s);
        assert!(!p.with_extension("state.tmp").exists());
    }

    #[test]
    fn damage_is_named() {
        let b = sample().to_bytes();
        let e = StateFile::parse("s", b"nothing here at all..").unwrap_err();
        assert!(e.contains("not a vmm state file"), "{e}");
        let mut v = b.clone();
        v[8] = 2;
        let e = StateFile::parse("s", &v).unwrap_err();
        assert!(
            e.contains("version 2") && e.contains("reads version 1"),
            "{e}"
        );
        // Every truncation and every flipped byte past the header is caught
        // by the checksum.
        for cut in 20..b.len() {
            let e = StateFile::parse("s", &b[..cut]).unwrap_err();
            assert!(e.contains("damaged or truncated"), "cut {cut}: {e}");
        }
        for i in 16..b.len() {
            let mut v = b.clone();
            v[i] ^= 0x40;
            assert!(StateFile::parse("s", &v).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn lengths_past_the_end_are_refused_without_allocating() {
        // A section claiming 2^63 bytes, with a valid checksum.
        let mut v = Vec::new();
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(b"HUGE");
        v.extend_from_slice(&(1u64 << 63).to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        let e = StateFile::parse("s", &v).unwrap_err();
        assert!(e.contains("HUGE") && e.contains("past the end"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.state");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(MAX_STATE + 1)
            .unwrap();
        assert!(StateFile::read(&p).unwrap_err().contains("larger than"));
    }

    #[test]
    fn fields() {
        let mut f = Fields::default();
        f.put(*b"REGS", &[1, 2]);
        f.put(*b"NONE", &[]);
        let b = f.into_bytes();
        let p = Fields::parse(&b).unwrap();
        assert_eq!(p, vec![(*b"REGS", &[1u8, 2][..]), (*b"NONE", &[][..])]);
        assert!(Fields::parse(&b[..b.len() - 9]).is_err());
        let mut bad = b.clone();
        bad[4] = 200;
        assert!(Fields::parse(&bad).unwrap_err().contains("past the end"));
    }
}
