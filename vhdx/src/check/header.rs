//! The header section's first structures: the file type identifier
//! (MS-VHDX 2.2.1) and the two headers (2.2.2).

use super::{read, Findings};
use crate::file_identifier::FileIdentifier;
use crate::header::Header;
use crate::region_table::RegionTable;
use crate::{Error, Result};
use disk::check::{Problem, ProblemKind, RepairMode};
use disk::{ResultExt, Storage};

/// 2.2.1: without the identifier this is not a VHDX at all (an error),
/// unless a header and a region table are intact: then only the signature
/// was lost (zeroed or overwritten), and -r all writes it back.
pub(super) fn identifier(storage: &dyn Storage, name: &str, f: &mut Findings) -> Result<()> {
    if let Err(e) = FileIdentifier::parse(&read(storage, 0, 520)?).in_file(name, 0) {
        let header_ok = Header::OFFSETS.iter().any(|&off| {
            read(storage, off, Header::SIZE as u64).is_ok_and(|b| Header::parse(&b).is_ok())
        });
        let regions_ok = RegionTable::OFFSETS.iter().any(|&off| {
            read(storage, off, RegionTable::SIZE as u64)
                .is_ok_and(|b| RegionTable::parse(&b).is_ok())
        });
        if !(header_ok && regions_ok) {
            return Err(e);
        }
        f.report.add(
            Problem::new(
                ProblemKind::Corruption,
                "VHDX file identifier",
                0,
                format!(
                    "{}; a header and a region table are intact, so only the signature is lost",
                    e.message()
                ),
            )
            .repairable(RepairMode::All),
            0,
        );
        f.identifier_fix = true;
    }
    Ok(())
}

/// 2.2.2: both header copies, which one is current (recorded in
/// `f.header`), and whether the log region it names lies inside the file.
/// `None` when neither copy is valid: nothing further can be checked.
pub(super) fn headers(
    storage: &dyn Storage,
    name: &str,
    file_len: u64,
    f: &mut Findings,
) -> Result<Option<Header>> {
    let mut hdrs: Vec<(u64, Vec<u8>, std::result::Result<Header, Error>)> = Vec::new();
    for off in Header::OFFSETS {
        let buf = read(storage, off, Header::SIZE as u64)?;
        let parsed = Header::parse(&buf).in_file(name, off);
        hdrs.push((off, buf, parsed));
    }
    let current = match (&hdrs[0].2, &hdrs[1].2) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number == b.sequence_number && hdrs[0].1 != hdrs[1].1 {
                f.report.add(
                    Problem::new(
                        ProblemKind::Corruption,
                        "VHDX header",
                        Header::OFFSETS[1] + 8,
                        format!(
                            "both headers have SequenceNumber {} but different contents",
                            a.sequence_number
                        ),
                    )
                    .repairable(RepairMode::All),
                    0,
                );
                f.header_fix += 1;
            }
            if b.sequence_number > a.sequence_number {
                (1, b.clone())
            } else {
                (0, a.clone())
            }
        }
        (Ok(h), Err(e)) | (Err(e), Ok(h)) => {
            let (slot, bad) = if hdrs[0].2.is_ok() { (0, 1) } else { (1, 0) };
            f.report.add(
                Problem::from_error(e, "VHDX header", Header::OFFSETS[bad])
                    .repairable(RepairMode::All),
                0,
            );
            f.header_fix += 1;
            (slot, h.clone())
        }
        (Err(e0), Err(e1)) => {
            for (e, off) in [(e0, Header::OFFSETS[0]), (e1, Header::OFFSETS[1])] {
                f.report.add(Problem::from_error(e, "VHDX header", off), 0);
            }
            return Ok(None);
        }
    };
    let (slot, hdr) = current;
    f.header = Some((slot, hdr.clone()));
    let hdr_off = Header::OFFSETS[slot];
    let log_off = hdr.log_offset;
    let log_len = u64::from(hdr.log_length);
    // Header::parse checked that this does not overflow.
    let log_end = log_off.saturating_add(log_len);
    if log_end > file_len {
        f.report.corrupt(
            "VHDX header",
            hdr_off + 72,
            format!(
                "the log region {log_off:#x}+{log_len:#x} extends past the end of the file \
                 ({file_len:#x} bytes)"
            ),
        );
    }
    Ok(Some(hdr))
}
