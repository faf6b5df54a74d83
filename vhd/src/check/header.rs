//! The dynamic disk header pass ("Dynamic Disk Header Format"): where the
//! footer says it is, its cookie, checksum, version and block size, and a
//! table (the BAT) large enough for the disk and inside the file.

use super::{read, Findings, FooterFound, Layout, HEADER, STRUCTURE};
use crate::bat::SECTOR;
use crate::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::footer::FOOTER_SIZE;
use crate::{sector_bitmap, Result};
use disk::check::{Problem, Used};
use disk::{ResultExt, Storage};

/// Check the header of the dynamic disk whose footer `ff` found. `None`
/// when it cannot be read or parsed (reported): nothing past it can be
/// checked.
pub(super) fn check(
    storage: &dyn Storage,
    f: &mut Findings,
    ff: &FooterFound,
) -> Result<Option<Layout>> {
    let name = storage.name();
    let size = ff.footer.disk_size();
    let data_limit = ff.data_limit();
    let footer_field = |field: u64| ff.at_end.map_or(field, |(off, _)| off + field);
    let hdr_off = ff.footer.data_offset;
    if hdr_off < FOOTER_SIZE as u64
        || hdr_off
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > data_limit)
    {
        f.report.corrupt(
            "VHD footer",
            footer_field(16),
            format!(
                "data offset {hdr_off:#x}: the dynamic disk header would lie outside the \
                 {data_limit:#x} bytes before the footer"
            ),
        );
        return Ok(None);
    }
    let hbuf = read(storage, hdr_off, HEADER_SIZE as u64)?;
    let header = match DynamicHeader::parse(&hbuf).in_file(name, hdr_off) {
        Ok(h) => h,
        Err(e) => {
            f.report.add(
                Problem::from_error(&e, "VHD dynamic disk header", hdr_off),
                0,
            );
            return Ok(None);
        }
    };
    let bs = u64::from(header.block_size);
    let slot = sector_bitmap::size(header.block_size) + bs;
    let needed = size.div_ceil(bs);
    let entries = u64::from(header.max_table_entries);
    if entries < needed {
        f.report.corrupt(
            HEADER,
            hdr_off + 28,
            format!(
                "max table entries {entries} is too small: a {size}-byte disk with {bs}-byte \
                 blocks needs {needed}"
            ),
        );
    }
    let table_off = header.table_offset;
    let table_bytes = entries * 4;
    let table_end = table_off.saturating_add(table_bytes.div_ceil(SECTOR) * SECTOR);
    let mut n = needed.min(entries);
    let mut table_unread = false;
    if table_off < FOOTER_SIZE as u64 || table_off.saturating_add(table_bytes) > data_limit {
        f.report.corrupt(
            HEADER,
            hdr_off + 16,
            format!(
                "the BAT at table offset {table_off:#x} ({entries} entries, {table_bytes} bytes) \
                 does not fit between the footer copy and the {data_limit:#x} bytes before the \
                 footer"
            ),
        );
        n = if table_off < FOOTER_SIZE as u64 {
            0
        } else {
            n.min(data_limit.saturating_sub(table_off) / 4)
        };
        // Blocks whose entries are not read may lie anywhere.
        table_unread = true;
    }
    let used = vec![
        Used {
            start: 0,
            end: FOOTER_SIZE as u64,
            what: STRUCTURE,
        },
        Used {
            start: hdr_off,
            end: hdr_off + HEADER_SIZE as u64,
            what: STRUCTURE | 1,
        },
        Used {
            start: table_off,
            end: table_end.min(data_limit),
            what: STRUCTURE | 2,
        },
    ];
    Ok(Some(Layout {
        hdr_off,
        header,
        bs,
        slot,
        needed,
        table_off,
        table_bytes,
        readable: n,
        table_unread,
        used,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::dynamic_header::DynamicHeader;

    #[test]
    fn header_damage_and_short_table() {
        let mut img = image(&[0]);
        img[512 + 100] ^= 1; // checksum
        let p = run(img).problems.remove(0);
        assert_eq!(
            (p.structure.as_str(), p.offset),
            ("VHD dynamic disk header", 512 + 36)
        );
        let mut img = image(&[0]);
        let mut h = DynamicHeader::parse(&img[512..1536]).unwrap();
        h.max_table_entries = 2;
        h.write_to(&mut img[512..1536]);
        let p = run(img).problems.remove(0);
        assert_eq!(p.offset, 512 + 28);
    }
}
