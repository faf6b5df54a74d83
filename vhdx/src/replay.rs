//! Log replay (MS-VHDX 2.3.3): applying the active log sequence either to the
//! file (writable open) or to an in-memory overlay that serves the replayed
//! view of a read-only open without changing the file.

use crate::log::LogOp;
use crate::{Error, Result};
use disk::Storage;

/// Apply the operations of a replayed sequence to writable storage.
pub(crate) fn apply(storage: &dyn Storage, ops: &[LogOp]) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for op in ops {
        match op {
            LogOp::Data { file_offset, page } => storage.write_at(&page[..], *file_offset)?,
            LogOp::Zero {
                file_offset,
                length,
            } => zero_data(storage, *file_offset, *length, &zeros)?,
        }
    }
    Ok(())
}

/// Zero `length` bytes at `offset` (a zero descriptor, MS-VHDX 2.3.1.2),
/// writing only where the file holds data: past its end and in its holes
/// it reads zeros already (and a file is only ever extended with zeros).
/// The work is bounded by the data the file holds, not by the descriptor's
/// length, which a hostile log sets to petabytes (written out, that filled
/// the host's disk).
fn zero_data(storage: &dyn Storage, offset: u64, length: u64, zeros: &[u8]) -> Result<()> {
    let end = offset.saturating_add(length).min(storage.len()?);
    let mut pos = offset;
    while pos < end {
        let Some((data, data_end)) = storage.data_run(pos)? else {
            break;
        };
        let stop = data_end.min(end);
        let mut at = data.max(pos);
        while at < stop {
            let n = usize::try_from(stop - at).map_or(zeros.len(), |r| r.min(zeros.len()));
            storage.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        pos = stop.max(pos + 1);
    }
    Ok(())
}

/// A read-only view of a file with a replayed log laid over it.
pub(crate) struct ReplayOverlay {
    inner: Box<dyn Storage>,
    ops: Vec<LogOp>,
    len: u64,
    inner_len: u64,
}

impl ReplayOverlay {
    /// Lay `ops` (in replay order) over `inner`; the view is `len` bytes long
    /// (the larger of the file length and the log's LastFileOffset).
    pub(crate) fn new(inner: Box<dyn Storage>, ops: Vec<LogOp>, len: u64) -> Result<Self> {
        let inner_len = inner.len()?;
        Ok(ReplayOverlay {
            inner,
            ops,
            len: len.max(inner_len),
            inner_len,
        })
    }
}

fn overlap(a: u64, alen: u64, b: u64, blen: u64) -> Option<(u64, u64)> {
    let start = a.max(b);
    let end = (a + alen).min(b.saturating_add(blen));
    (start < end).then_some((start, end))
}

impl Storage for ReplayOverlay {
    fn name(&self) -> &str {
        self.inner.name()
    }
    // Every index is an offset inside `buf` (a usize length) or inside a
    // 4 KiB page: no cast to usize below can truncate.
    #[allow(clippy::cast_possible_truncation)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::io(
                    format!("read of {} bytes at offset {offset:#x}", buf.len()),
                    std::io::ErrorKind::UnexpectedEof.into(),
                )
                .in_file(self.name(), 0)
            })?;
        // The file's own bytes, zeros past its end.
        let from_file = end.min(self.inner_len).saturating_sub(offset) as usize;
        if from_file > 0 {
            self.inner.read_at(&mut buf[..from_file], offset)?;
        }
        buf[from_file..].fill(0);
        for op in &self.ops {
            match op {
                LogOp::Data { file_offset, page } => {
                    if let Some((s, e)) = overlap(offset, buf.len() as u64, *file_offset, 4096) {
                        buf[(s - offset) as usize..(e - offset) as usize].copy_from_slice(
                            &page[(s - file_offset) as usize..(e - file_offset) as usize],
                        );
                    }
                }
                LogOp::Zero {
                    file_offset,
                    length,
                } => {
                    if let Some((s, e)) = overlap(offset, buf.len() as u64, *file_offset, *length) {
                        buf[(s - offset) as usize..(e - offset) as usize].fill(0);
                    }
                }
            }
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::invalid("image is open read-only").in_file(self.name(), 0))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::invalid("image is open read-only").in_file(self.name(), 0))
    }
    fn is_writable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;

    #[test]
    fn a_zero_descriptor_of_a_pebibyte_zeroes_what_the_file_holds() {
        let st = MemStorage::from_vec("z.vhdx", vec![7u8; 3 << 20]);
        let ops = [
            LogOp::Zero {
                file_offset: 1 << 20,
                length: 1 << 50,
            },
            LogOp::Zero {
                file_offset: 1 << 40,
                length: 1 << 30,
            },
        ];
        apply(&st, &ops).unwrap();
        let v = st.to_vec();
        assert_eq!(v.len(), 3 << 20);
        assert!(v[..1 << 20].iter().all(|&b| b == 7));
        assert!(v[1 << 20..].iter().all(|&b| b == 0));
    }
}
