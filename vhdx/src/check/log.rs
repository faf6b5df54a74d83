//! The log (MS-VHDX 2.3): an active sequence (2.3.3) is a log that was never
//! replayed; the passes after this one read the file as the replayed log
//! makes it ([`View`]).

use super::Findings;
use crate::header::Header;
use crate::image::MAX_LOG;
use crate::log::{self, LogOp, LOG_SECTOR};
use crate::{Error, Result};
use disk::check::{Problem, ProblemKind, RepairMode};
use disk::Storage;

/// A log to replay: its operations in order.
#[derive(Debug, Clone)]
pub(super) struct Replay {
    pub(super) ops: Vec<LogOp>,
    pub(super) last_file_offset: u64,
    pub(super) entries: usize,
}

/// The file as the replayed log makes it (reads only).
pub(super) struct View<'a> {
    pub(super) inner: &'a dyn Storage,
    pub(super) inner_len: u64,
    pub(super) ops: &'a [LogOp],
}

impl View<'_> {
    /// `len` bytes at `offset`; bytes past the end of the file read as
    /// zeros (as the driver reads a short BAT).
    // Every index is an offset inside `buf` (`n`, a usize, bytes long) or
    // inside a 4 KiB page: no cast to usize below can truncate.
    #[allow(clippy::cast_possible_truncation)]
    pub(super) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let n = usize::try_from(len).map_err(|_| Error::invalid("read too large"))?;
        let mut buf = vec![0u8; n];
        let end = offset.saturating_add(len);
        let from_file = end.min(self.inner_len).saturating_sub(offset);
        if from_file > 0 {
            self.inner.read_at(&mut buf[..from_file as usize], offset)?;
        }
        for op in self.ops {
            let (at, n) = match op {
                LogOp::Data { file_offset, .. } => (*file_offset, LOG_SECTOR as u64),
                LogOp::Zero {
                    file_offset,
                    length,
                } => (*file_offset, *length),
            };
            let (s, e) = (offset.max(at), end.min(at.saturating_add(n)));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match op {
                LogOp::Data { page, .. } => {
                    dst.copy_from_slice(&page[(s - at) as usize..(e - at) as usize]);
                }
                LogOp::Zero { .. } => dst.fill(0),
            }
        }
        Ok(buf)
    }
}

/// The log of the current header `hdr`: a dirty log is a corruption until
/// replayed (recorded in `f.replay` for a repair), a FlushedFileOffset past
/// the end of the file one that cannot be replayed. Returns the operations
/// of the active sequence and the file's length once they are applied.
pub(super) fn active_sequence(
    storage: &dyn Storage,
    hdr: &Header,
    file_len: u64,
    f: &mut Findings,
) -> Result<(Vec<LogOp>, u64)> {
    let log_off = hdr.log_offset;
    let log_len = u64::from(hdr.log_length);
    // Header::parse checked that this does not overflow.
    let log_end = log_off.saturating_add(log_len);
    let mut ops: Vec<LogOp> = Vec::new();
    let mut view_len = file_len;
    if hdr.log_guid.is_nil() {
        return Ok((ops, view_len));
    }
    if log_len > MAX_LOG {
        f.report.check_error(
            "VHDX log",
            log_off,
            format!("a log of {log_len} bytes is larger than {MAX_LOG}: not checked"),
        );
    } else if log_end <= file_len {
        let log_buf = super::read(storage, log_off, log_len)?;
        let seq = log::find_active_sequence(&log_buf, hdr.log_guid);
        if let Some((at, head)) = seq.last() {
            let at = log_off + *at as u64;
            let (first, last) = (
                seq.first().map_or(0, |(_, e)| e.sequence_number),
                head.sequence_number,
            );
            if head.flushed_file_offset > file_len {
                f.report.corrupt(
                    "VHDX log entry",
                    at,
                    format!(
                        "FlushedFileOffset {:#x} is beyond the end of the file ({file_len:#x}): \
                         the file was truncated after the log was written, the log cannot be \
                         replayed",
                        head.flushed_file_offset
                    ),
                );
            } else {
                let entries = seq.len();
                f.report.add(
                    Problem::new(
                        ProblemKind::Corruption,
                        "VHDX log",
                        at,
                        format!(
                            "dirty log: {entries} entries (sequence numbers {first}..={last}) \
                             were never replayed into the file (the image was not closed \
                             cleanly); the log needs replay"
                        ),
                    )
                    .repairable(RepairMode::All),
                    0,
                );
                let last_file_offset = head.last_file_offset;
                view_len = view_len.max(last_file_offset);
                ops = seq.into_iter().flat_map(|(_, e)| e.ops).collect();
                f.replay = Some(Replay {
                    ops: ops.clone(),
                    last_file_offset,
                    entries,
                });
            }
        }
    }
    Ok((ops, view_len))
}
