//! The region table (MS-VHDX 2.2.3): both copies, identical, and every
//! region inside the file.

use super::log::View;
use super::space::{Layout, Space};
use super::{Findings, STRUCTURE};
pub(super) use crate::region_table::region_name;
use crate::region_table::{RegionTable, METADATA_REGION};
use crate::{Error, ErrorKind, Result};
use disk::check::{CheckReport, Problem, ProblemKind, RepairMode, Used};
use disk::ResultExt;

/// Both copies: a damaged or different copy is repairable from the other
/// (recorded in `f.region_fix`). Returns the valid table and its offset;
/// `None` when neither copy is valid, or a copy needs an unsupported
/// feature: nothing further can be checked.
pub(super) fn tables(
    view: &View<'_>,
    name: &str,
    f: &mut Findings,
) -> Result<Option<(u64, RegionTable)>> {
    let mut tables: Vec<(u64, Vec<u8>, std::result::Result<RegionTable, Error>)> = Vec::new();
    for off in RegionTable::OFFSETS {
        let buf = view.read(off, RegionTable::SIZE as u64)?;
        let parsed = RegionTable::parse(&buf).in_file(name, off);
        if let Err(e) = &parsed {
            if e.kind() == ErrorKind::Unsupported {
                f.report
                    .add(Problem::from_error(e, "VHDX region table", off), 0);
                return Ok(None);
            }
        }
        tables.push((off, buf, parsed));
    }
    let found = match (&tables[0].2, &tables[1].2) {
        (Ok(a), Ok(_)) => {
            if tables[0].1 != tables[1].1 {
                f.report.add(
                    Problem::new(
                        ProblemKind::Corruption,
                        "VHDX region table",
                        tables[1].0,
                        format!(
                            "the two region table copies (at {:#x} and {:#x}) differ",
                            tables[0].0, tables[1].0
                        ),
                    )
                    .repairable(RepairMode::All),
                    0,
                );
                f.region_fix = Some((tables[0].0, tables[1].0));
            }
            (tables[0].0, a.clone())
        }
        (Ok(t), Err(e)) | (Err(e), Ok(t)) => {
            let (good, bad) = if tables[0].2.is_ok() { (0, 1) } else { (1, 0) };
            f.report.add(
                Problem::from_error(e, "VHDX region table", tables[bad].0)
                    .repairable(RepairMode::All),
                0,
            );
            f.region_fix = Some((tables[good].0, tables[bad].0));
            (tables[good].0, t.clone())
        }
        (Err(e0), Err(e1)) => {
            for (e, off) in [(e0, tables[0].0), (e1, tables[1].0)] {
                f.report
                    .add(Problem::from_error(e, "VHDX region table", off), 0);
            }
            return Ok(None);
        }
    };
    Ok(Some(found))
}

/// Every region's file space, recorded as used (and referenced). Returns
/// false when the metadata region runs past the end of the file (`view_len`
/// bytes): the metadata and the BAT are then not checked.
pub(super) fn placement(
    layout: &Layout<'_>,
    view_len: u64,
    space: &mut Space,
    report: &mut CheckReport,
) -> bool {
    let mut regions_ok = true;
    for (i, r) in layout.table.entries.iter().enumerate() {
        // RegionTable::parse validated that the end does not overflow.
        let end = r.end().unwrap_or(u64::MAX);
        if end > view_len {
            report.corrupt(
                "VHDX region table",
                layout.entry_at(i) + 16,
                format!(
                    "the {} {:#x}+{:#x} extends past the end of the file ({view_len:#x} bytes)",
                    region_name(r.guid),
                    r.file_offset,
                    r.length
                ),
            );
            if r.guid == METADATA_REGION {
                regions_ok = false;
            }
        }
        space.used.push(Used {
            start: r.file_offset,
            end: end.min(view_len),
            what: STRUCTURE | (2 + i as u64),
        });
        space.referenced_end = space.referenced_end.max(end);
    }
    regions_ok
}
