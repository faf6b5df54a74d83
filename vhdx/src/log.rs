//! The metadata log (MS-VHDX 2.3): a circular buffer of 4 KiB sectors
//! holding log entries that describe pending updates of the file's
//! metadata structures.
//!
//! A log entry (MS-VHDX 2.3.1) is a whole number of sectors:
//!
//! * the entry header (2.3.1.1, 64 bytes): `Signature` "loge" (0),
//!   `Checksum` (4), `EntryLength` (8), `Tail` (12), `SequenceNumber` (16),
//!   `DescriptorCount` (24), reserved (28), `LogGuid` (32),
//!   `FlushedFileOffset` (48), `LastFileOffset` (56);
//! * right after it, `DescriptorCount` descriptors of 32 bytes, continuing
//!   over as many sectors as needed (126 fit in the first sector, 128 in
//!   each further one): zero descriptors (2.3.1.2: "zero", reserved,
//!   `ZeroLength`, `FileOffset`, `SequenceNumber`) and data descriptors
//!   (2.3.1.3: "desc", `TrailingBytes` u32, `LeadingBytes` u64, `FileOffset`,
//!   `SequenceNumber`);
//! * then one data sector (2.3.1.4) per data descriptor, in descriptor
//!   order: "data", `SequenceHigh` (4), 4084 data bytes (8..4092),
//!   `SequenceLow` (4092). A data descriptor's 4 KiB page is its
//!   `LeadingBytes` (page bytes 0..8), the sector's data (page bytes
//!   8..4092) and its `TrailingBytes` (page bytes 4092..4096).
//!
//! `Checksum` is CRC-32C over the `EntryLength` bytes of the entry with the
//! checksum field taken as zero. Finding the entries to replay (the active
//! sequence) is MS-VHDX 2.3.2 and 2.3.3, see [`find_active_sequence`].

use crate::guid::{
    is_aligned, le_u32, le_u64, put_u32, put_u64, read_guid, show_signature, write_guid,
};
use crate::{Error, Result};
use uuid::Uuid;

/// Bytes of one log sector.
pub const LOG_SECTOR: usize = 4096;
/// `Signature` of a log entry header: "loge".
pub const ENTRY_SIGNATURE: [u8; 4] = *b"loge";
/// Signature of a zero descriptor: "zero".
pub const ZERO_SIGNATURE: [u8; 4] = *b"zero";
/// Signature of a data descriptor: "desc".
pub const DESC_SIGNATURE: [u8; 4] = *b"desc";
/// Signature of a data sector: "data".
pub const DATA_SIGNATURE: [u8; 4] = *b"data";
/// Bytes of the log entry header.
pub const HEADER_SIZE: usize = 64;
/// Bytes of one descriptor.
pub const DESCRIPTOR_SIZE: usize = 32;

/// Structure name used in error messages.
const NAME: &str = "VHDX log entry";
const CHECKSUM_AT: usize = 4;
const SECTOR: u64 = LOG_SECTOR as u64;

/// One update described by a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Zero `length` bytes at `file_offset` (both multiples of 4 KiB).
    Zero {
        /// File offset of the range (4 KiB-aligned).
        file_offset: u64,
        /// Bytes to zero (multiple of 4 KiB).
        length: u64,
    },
    /// Write one 4 KiB page at `file_offset`.
    Data {
        /// File offset of the page (4 KiB-aligned).
        file_offset: u64,
        /// The page's full contents.
        page: Box<[u8; LOG_SECTOR]>,
    },
}

/// A log entry (MS-VHDX 2.3.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// The entry's sequence number; consecutive entries of a sequence
    /// increase it by one.
    pub sequence_number: u64,
    /// Must equal the header's `LogGuid` for the entry to be valid.
    pub log_guid: Uuid,
    /// Offset in the log of the oldest entry still needed for replay.
    pub tail: u32,
    /// File size that was guaranteed flushed when the entry was written.
    pub flushed_file_offset: u64,
    /// File size that all allocated structures fit in when the entry was written.
    pub last_file_offset: u64,
    /// Bytes of the entry as stored (computed by [`LogEntry::encode`]).
    pub entry_length: u32,
    /// The updates, in descriptor order.
    pub ops: Vec<LogOp>,
}

/// Header fields of an entry that passed every validity check.
#[derive(Clone, Copy, Debug)]
struct ValidHeader {
    sequence_number: u64,
    tail: u32,
    entry_length: u32,
    descriptor_count: u32,
    descriptor_sectors: usize,
}

impl LogEntry {
    /// Sectors an entry with `descriptors` descriptors of which `data_pages`
    /// are data descriptors occupies: the header and descriptor sectors plus
    /// one data sector per page.
    pub fn sectors_needed(descriptors: usize, data_pages: usize) -> usize {
        (HEADER_SIZE + DESCRIPTOR_SIZE * descriptors).div_ceil(LOG_SECTOR) + data_pages
    }

    /// Serialize the entry: header, descriptor sectors, data sectors, with
    /// `EntryLength` computed from the ops (`self.entry_length` is ignored)
    /// and the checksum filled in. The ops are written as given; their
    /// alignment is checked only when decoding.
    ///
    /// # Panics
    /// If the entry would exceed 4 GiB (`EntryLength` is a u32).
    pub fn encode(&self) -> Vec<u8> {
        let data_pages = self
            .ops
            .iter()
            .filter(|op| matches!(op, LogOp::Data { .. }))
            .count();
        let descriptor_sectors = Self::sectors_needed(self.ops.len(), 0);
        let total = Self::sectors_needed(self.ops.len(), data_pages) * LOG_SECTOR;
        let mut buf = vec![0u8; total];
        buf[..4].copy_from_slice(&ENTRY_SIGNATURE);
        put_u32(
            &mut buf,
            8,
            u32::try_from(total).expect("log entry fits in u32"),
        );
        put_u32(&mut buf, 12, self.tail);
        put_u64(&mut buf, 16, self.sequence_number);
        put_u32(
            &mut buf,
            24,
            u32::try_from(self.ops.len()).expect("descriptor count fits in u32"),
        );
        write_guid(&mut buf, 32, self.log_guid);
        put_u64(&mut buf, 48, self.flushed_file_offset);
        put_u64(&mut buf, 56, self.last_file_offset);
        let seq = self.sequence_number;
        let mut data_index = 0;
        for (i, op) in self.ops.iter().enumerate() {
            let d = HEADER_SIZE + DESCRIPTOR_SIZE * i;
            match op {
                LogOp::Zero {
                    file_offset,
                    length,
                } => {
                    buf[d..d + 4].copy_from_slice(&ZERO_SIGNATURE);
                    put_u64(&mut buf, d + 8, *length);
                    put_u64(&mut buf, d + 16, *file_offset);
                    put_u64(&mut buf, d + 24, seq);
                }
                LogOp::Data { file_offset, page } => {
                    buf[d..d + 4].copy_from_slice(&DESC_SIGNATURE);
                    buf[d + 4..d + 8].copy_from_slice(&page[LOG_SECTOR - 4..]);
                    buf[d + 8..d + 16].copy_from_slice(&page[..8]);
                    put_u64(&mut buf, d + 16, *file_offset);
                    put_u64(&mut buf, d + 24, seq);
                    let s = (descriptor_sectors + data_index) * LOG_SECTOR;
                    let sector = &mut buf[s..s + LOG_SECTOR];
                    sector[..4].copy_from_slice(&DATA_SIGNATURE);
                    put_u32(sector, 4, (seq >> 32) as u32);
                    sector[8..LOG_SECTOR - 4].copy_from_slice(&page[8..LOG_SECTOR - 4]);
                    // SequenceLow: the low 32 bits.
                    put_u32(sector, LOG_SECTOR - 4, (seq & 0xffff_ffff) as u32);
                    data_index += 1;
                }
            }
        }
        let crc = crate::guid::crc32c_zeroed(&buf, CHECKSUM_AT);
        put_u32(&mut buf, CHECKSUM_AT, crc);
        buf
    }

    /// Decode and fully validate the entry starting at byte `at` of `log`
    /// (the whole log region); the entry may wrap around the end of `log`.
    ///
    /// Checks: signature; `EntryLength` a non-zero multiple of 4 KiB not
    /// larger than the log; `Tail` 4 KiB-aligned and inside the log;
    /// `LogGuid` equal to `log_guid`; the descriptors and one data sector per
    /// data descriptor fit in `EntryLength`; every descriptor's signature and
    /// `SequenceNumber`; every data sector's signature, `SequenceHigh` and
    /// `SequenceLow`; data file offsets 4 KiB-aligned; zero ranges 4 KiB
    /// aligned and sized, without overflow; the checksum. Error offsets are
    /// relative to the start of `log`. `FlushedFileOffset` and
    /// `LastFileOffset` are returned unchecked (they need the file size).
    pub fn decode_at(log: &[u8], at: usize, log_guid: Uuid) -> Result<LogEntry> {
        let h = validate_at(log, at, log_guid, None)?;
        let hdr = &log[at..at + HEADER_SIZE];
        // Bounded by the entry length, itself at most the log length.
        let mut ops = Vec::with_capacity(h.descriptor_count as usize);
        let mut data_index = 0;
        for i in 0..h.descriptor_count as usize {
            let d = descriptor(log, at, i);
            let file_offset = le_u64(d, 16);
            if d[..4] == ZERO_SIGNATURE {
                ops.push(LogOp::Zero {
                    file_offset,
                    length: le_u64(d, 8),
                });
            } else {
                let s = sector(log, at, h.descriptor_sectors + data_index);
                data_index += 1;
                let mut page = Box::new([0u8; LOG_SECTOR]);
                page[..8].copy_from_slice(&d[8..16]);
                page[8..LOG_SECTOR - 4].copy_from_slice(&s[8..LOG_SECTOR - 4]);
                page[LOG_SECTOR - 4..].copy_from_slice(&d[4..8]);
                ops.push(LogOp::Data { file_offset, page });
            }
        }
        Ok(LogEntry {
            sequence_number: h.sequence_number,
            log_guid: read_guid(hdr, 32),
            tail: h.tail,
            flushed_file_offset: le_u64(hdr, 48),
            last_file_offset: le_u64(hdr, 56),
            entry_length: h.entry_length,
            ops,
        })
    }
}

/// The 4 KiB sector `k` sectors after `at`, wrapping around the log.
/// `log.len()` is a non-zero multiple of 4 KiB and `at` is sector-aligned.
fn sector(log: &[u8], at: usize, k: usize) -> &[u8] {
    let n = log.len() / LOG_SECTOR;
    let s = (at / LOG_SECTOR + k % n) % n * LOG_SECTOR;
    &log[s..s + LOG_SECTOR]
}

/// Descriptor `i` of the entry at `at` (descriptors never straddle sectors).
fn descriptor(log: &[u8], at: usize, i: usize) -> &[u8] {
    let off = HEADER_SIZE + DESCRIPTOR_SIZE * i;
    let within = off % LOG_SECTOR;
    &sector(log, at, off / LOG_SECTOR)[within..within + DESCRIPTOR_SIZE]
}

/// Offset in the log of byte `off` of the entry at `at`, for errors.
fn log_offset(log: &[u8], at: usize, off: usize) -> u64 {
    (at as u64 + off as u64) % log.len().max(1) as u64
}

/// The CRC-32C of every prefix of the log's sectors (`0[i]`: sectors
/// `0..i`), from which the CRC of any run of whole sectors follows in
/// O(log length) ([`crc32c::crc32c_combine`]). Checking an entry's
/// checksum at every sector of the log then costs O(n log n) in all, where
/// computing each one over its `EntryLength` costs O(n²): a hostile log of
/// entry headers in every sector, each claiming the whole log, took 23 s
/// for 32 MiB, and would take half an hour for the 256 MiB we accept.
struct SectorCrcs(Vec<u32>);

impl SectorCrcs {
    fn new(log: &[u8]) -> Self {
        let mut v = Vec::with_capacity(log.len() / LOG_SECTOR + 1);
        let mut crc = 0;
        v.push(crc);
        for s in log.chunks_exact(LOG_SECTOR) {
            crc = crc32c::crc32c_append(crc, s);
            v.push(crc);
        }
        SectorCrcs(v)
    }

    /// The CRC-32C of sectors `a..b` (`a <= b`): the prefix up to `b` is
    /// the prefix up to `a` shifted over the run, combined with the run's.
    fn range(&self, a: usize, b: usize) -> u32 {
        self.0[b] ^ crc32c::crc32c_combine(self.0[a], 0, (b - a) * LOG_SECTOR)
    }

    /// The checksum of the entry of `len` bytes at `at` (a sector offset),
    /// with its checksum field taken as zero, wrapping around the log.
    fn entry(&self, log: &[u8], at: usize, len: usize) -> u32 {
        let n = log.len() / LOG_SECTOR;
        let first = at / LOG_SECTOR + 1;
        let end = at / LOG_SECTOR + len / LOG_SECTOR;
        let head = crate::guid::crc32c_zeroed(&log[at..at + LOG_SECTOR], CHECKSUM_AT);
        let rest = if end <= n {
            self.range(first, end)
        } else {
            let wrapped = end - n;
            crc32c::crc32c_combine(
                self.range(first, n),
                self.range(0, wrapped),
                wrapped * LOG_SECTOR,
            )
        };
        crc32c::crc32c_combine(head, rest, len - LOG_SECTOR)
    }
}

/// Every validity check of [`LogEntry::decode_at`], without building the ops.
/// The cheap structural checks run before the checksum, which comes from
/// `crcs` when given (see [`SectorCrcs`]).
fn validate_at(
    log: &[u8],
    at: usize,
    log_guid: Uuid,
    crcs: Option<&SectorCrcs>,
) -> Result<ValidHeader> {
    let n = log.len();
    if n == 0 || !is_aligned(n as u64, SECTOR) {
        return Err(Error::invalid(format!(
            "log region of {n} bytes is not a non-zero multiple of 4 KiB"
        )));
    }
    if at >= n || !is_aligned(at as u64, SECTOR) {
        return Err(Error::invalid(format!(
            "log entry offset {at:#x} is not a 4 KiB-aligned offset inside the {n:#x}-byte log"
        )));
    }
    let err = |off: usize, msg: String| Err(Error::corrupt(NAME, log_offset(log, at, off), msg));
    let hdr = &log[at..at + HEADER_SIZE];
    if hdr[..4] != ENTRY_SIGNATURE {
        return err(
            0,
            format!(
                "bad signature \"{}\" (expected \"loge\")",
                show_signature(&hdr[..4])
            ),
        );
    }
    let entry_length = le_u32(hdr, 8);
    let len = entry_length as usize;
    if len == 0 || !is_aligned(len as u64, SECTOR) || len > n {
        return err(
            8,
            format!(
                "EntryLength {entry_length:#x} is not a non-zero multiple of 4 KiB within the {n:#x}-byte log"
            ),
        );
    }
    let tail = le_u32(hdr, 12);
    if !is_aligned(u64::from(tail), SECTOR) || tail as usize >= n {
        return err(
            12,
            format!("Tail {tail:#x} is not a 4 KiB-aligned offset inside the {n:#x}-byte log"),
        );
    }
    let sequence_number = le_u64(hdr, 16);
    let guid = read_guid(hdr, 32);
    if guid != log_guid {
        return err(
            32,
            format!("LogGuid {guid} does not match the header's LogGuid {log_guid}"),
        );
    }
    let descriptor_count = le_u32(hdr, 24);
    let entry_sectors = len / LOG_SECTOR;
    // In u64: a huge count must not overflow before the comparison.
    let descriptor_sectors = (HEADER_SIZE as u64
        + DESCRIPTOR_SIZE as u64 * u64::from(descriptor_count))
    .div_ceil(SECTOR);
    let descriptor_sectors = match usize::try_from(descriptor_sectors) {
        Ok(d) if d <= entry_sectors => d,
        _ => {
            return err(
                24,
                format!(
                    "DescriptorCount {descriptor_count} needs {descriptor_sectors} sectors but EntryLength {entry_length:#x} has {entry_sectors}"
                ),
            )
        }
    };
    let mut data_descriptors = 0usize;
    for i in 0..descriptor_count as usize {
        let d = descriptor(log, at, i);
        let off = HEADER_SIZE + DESCRIPTOR_SIZE * i;
        let file_offset = le_u64(d, 16);
        let desc_seq = le_u64(d, 24);
        let is_zero = d[..4] == ZERO_SIGNATURE;
        if !is_zero && d[..4] != DESC_SIGNATURE {
            return err(
                off,
                format!(
                    "descriptor {i}: bad signature \"{}\" (expected \"zero\" or \"desc\")",
                    show_signature(&d[..4])
                ),
            );
        }
        if desc_seq != sequence_number {
            return err(
                off + 24,
                format!(
                    "descriptor {i}: SequenceNumber {desc_seq:#x} differs from the entry's {sequence_number:#x}"
                ),
            );
        }
        if !is_aligned(file_offset, SECTOR) {
            return err(
                off + 16,
                format!("descriptor {i}: FileOffset {file_offset:#x} is not 4 KiB-aligned"),
            );
        }
        if is_zero {
            let length = le_u64(d, 8);
            if !is_aligned(length, SECTOR) || file_offset.checked_add(length).is_none() {
                return err(
                    off + 8,
                    format!(
                        "descriptor {i}: ZeroLength {length:#x} at {file_offset:#x} is not a multiple of 4 KiB or overflows"
                    ),
                );
            }
            continue;
        }
        if file_offset.checked_add(SECTOR).is_none() {
            return err(
                off + 16,
                format!("descriptor {i}: FileOffset {file_offset:#x} overflows"),
            );
        }
        let k = descriptor_sectors + data_descriptors;
        data_descriptors += 1;
        if k >= entry_sectors {
            return err(
                24,
                format!(
                    "{data_descriptors}+ data sectors after {descriptor_sectors} descriptor sectors exceed EntryLength {entry_length:#x}"
                ),
            );
        }
        let s = sector(log, at, k);
        let soff = k * LOG_SECTOR;
        if s[..4] != DATA_SIGNATURE {
            return err(
                soff,
                format!(
                    "data sector {} (descriptor {i}): bad signature \"{}\" (expected \"data\")",
                    data_descriptors - 1,
                    show_signature(&s[..4])
                ),
            );
        }
        let high = le_u32(s, 4);
        let low = le_u32(s, LOG_SECTOR - 4);
        if (u64::from(high) << 32 | u64::from(low)) != sequence_number {
            return err(
                soff + 4,
                format!(
                    "data sector {} (descriptor {i}): SequenceHigh/Low {high:#x}/{low:#x} do not match the entry's SequenceNumber {sequence_number:#x}",
                    data_descriptors - 1
                ),
            );
        }
    }
    // Checksum over the entry, which may wrap: [at..end of log] + [0..rest].
    let crc = match crcs {
        Some(c) => c.entry(log, at, len),
        None => {
            let first = &log[at..n.min(at + len)];
            let rest = &log[..len - first.len()];
            crc32c::crc32c_append(crate::guid::crc32c_zeroed(first, CHECKSUM_AT), rest)
        }
    };
    let stored = le_u32(hdr, CHECKSUM_AT);
    if crc != stored {
        return err(
            CHECKSUM_AT,
            format!("checksum mismatch: stored {stored:#010x}, computed {crc:#010x}"),
        );
    }
    Ok(ValidHeader {
        sequence_number,
        tail,
        entry_length,
        descriptor_count,
        descriptor_sectors,
    })
}

/// Find the active sequence of the log (MS-VHDX 2.3.2, 2.3.3) and return its
/// entries in replay order, each with its offset in `log`; empty when the log
/// holds no valid sequence (or `log_guid` is nil, which means an empty log).
///
/// Rules followed:
/// * an entry is valid when [`LogEntry::decode_at`] accepts it at a sector
///   boundary (this includes matching `log_guid`);
/// * a sequence is a run of valid entries, each starting right after the
///   previous one (circularly) with a sequence number one greater; runs are
///   extended as far as possible, so its head is a valid entry with no valid
///   successor;
/// * a sequence is valid when the `Tail` of its head entry is the offset of
///   one of its entries and the entries from there to the head fit in the
///   log without overlapping themselves;
/// * the active sequence is the valid sequence whose head has the largest
///   sequence number; it is replayed from the tail entry to the head.
///
/// Choices where the spec is silent: a run that would be valid if cut short
/// before its head is not considered (the spec extends the current sequence
/// as far as it goes before testing it); two valid sequences whose heads have
/// the same sequence number (impossible for a correct writer) resolve to the
/// one whose head is at the lower offset.
///
/// Cost: every sector is validated once (its checksum derived from the
/// prefix CRCs of the log's sectors in O(log n), see [`SectorCrcs`]), then
/// the sequence is picked in O(n) table lookups ([`pick_sequence`]).
pub fn find_active_sequence(log: &[u8], log_guid: Uuid) -> Vec<(usize, LogEntry)> {
    if log.is_empty() || !is_aligned(log.len() as u64, SECTOR) || log_guid.is_nil() {
        return Vec::new();
    }
    let n = log.len() / LOG_SECTOR;
    let crcs = SectorCrcs::new(log);
    // Most sectors of a log hold no entry header: skip them on the
    // signature alone (validate_at would build an error message for each).
    let valid: Vec<Option<ValidHeader>> = (0..n)
        .map(|s| {
            let at = s * LOG_SECTOR;
            (log[at..at + 4] == ENTRY_SIGNATURE)
                .then(|| validate_at(log, at, log_guid, Some(&crcs)).ok())
                .flatten()
        })
        .collect();
    let Some((tail, head)) = pick_sequence(&valid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = tail;
    loop {
        // Already validated above, so decoding succeeds.
        let Ok(e) = LogEntry::decode_at(log, cur * LOG_SECTOR, log_guid) else {
            return Vec::new();
        };
        out.push((cur * LOG_SECTOR, e));
        if cur == head {
            return out;
        }
        match successor(&valid, cur) {
            Some(t) if out.len() < n => cur = t,
            _ => return Vec::new(),
        }
    }
}

/// Sectors of a valid entry.
fn entry_sectors(h: &ValidHeader) -> usize {
    h.entry_length as usize / LOG_SECTOR
}

/// The successor of the valid entry at sector `s` of a log of
/// `valid.len()` sectors, when it continues the run (the next entry, its
/// sequence number one more).
fn successor(valid: &[Option<ValidHeader>], s: usize) -> Option<usize> {
    let h = valid[s]?;
    let t = (s + entry_sectors(&h)) % valid.len();
    let nh = valid[t]?;
    (Some(nh.sequence_number) == h.sequence_number.checked_add(1)).then_some(t)
}

/// The active sequence among the valid entries, as `(tail sector, head
/// sector)` (MS-VHDX 2.3.3): of the entries that end a run (no successor),
/// the one with the highest sequence number whose tail leads to it through
/// successors, the run no longer than the log.
///
/// Successors make a graph in which every entry has at most one way out,
/// so where each entry's run ends, and how many sectors it takes to get
/// there, is found once for every entry (a hostile log of runs whose
/// tails all point into one long run made walking each run from its tail
/// quadratic).
fn pick_sequence(valid: &[Option<ValidHeader>]) -> Option<(usize, usize)> {
    let n = valid.len();
    // For each entry: the end of its run and the sectors from it to there
    // (both ends counted); None on a cycle or an invalid sector.
    let mut end: Vec<Option<(usize, u64)>> = vec![None; n];
    let mut done = vec![false; n];
    let mut path = Vec::new();
    for start in 0..n {
        let mut cur = start;
        // Follow successors to an entry already known or a run's end.
        let mut result = loop {
            if done[cur] {
                break end[cur];
            }
            let Some(h) = valid[cur] else {
                done[cur] = true;
                break None;
            };
            done[cur] = true; // on the path: reaching it again is a cycle
            path.push(cur);
            match successor(valid, cur) {
                Some(t) => cur = t,
                None => {
                    path.pop();
                    let r = Some((cur, entry_sectors(&h) as u64));
                    end[cur] = r;
                    break r;
                }
            }
        };
        // Unwind. (Sequence numbers rise along successors, so there is no
        // cycle; were there one, reaching a path entry again would give
        // None here, its end not yet known.)
        while let Some(s) = path.pop() {
            result = result.map(|(e, d)| {
                let own = valid[s].map_or(0, |h| entry_sectors(&h) as u64);
                (e, d.saturating_add(own))
            });
            end[s] = result;
        }
    }
    let mut best: Option<(u64, usize, usize)> = None; // (head sequence, tail, head)
    for head in 0..n {
        let Some(h) = valid[head] else { continue };
        if successor(valid, head).is_some() {
            continue;
        }
        if best.is_some_and(|(seq, _, _)| seq >= h.sequence_number) {
            continue;
        }
        let tail = h.tail as usize / LOG_SECTOR;
        let reached = tail < n && end[tail].is_some_and(|(e, d)| e == head && d <= n as u64);
        if reached {
            best = Some((h.sequence_number, tail, head));
        }
    }
    best.map(|(_, tail, head)| (tail, head))
}

#[cfg(test)]
mod tests;
