//! The BAT pass ("Block Allocation Table and Data Blocks"): every
//! allocated block (its sector bitmap and data, sector-aligned by the
//! entry's unit) lies inside the file before the footer and overlaps no
//! structure nor another block; a file cut short loses blocks (truncation);
//! then the sweep of every used range finds overlaps, unused space and the
//! leak before the footer that a repair reclaims.

use super::{read, Findings, FooterFound, Layout, HEADER, STRUCTURE};
use crate::bat::{SECTOR, UNALLOCATED};
use crate::footer::FOOTER_SIZE;
use crate::Result;
use disk::check::{sweep, Used};
use disk::Storage;

/// Check the BAT entries the disk uses, then the space of the whole file.
pub(super) fn check(
    storage: &dyn Storage,
    f: &mut Findings,
    ff: &FooterFound,
    layout: &mut Layout,
) -> Result<()> {
    let Layout {
        hdr_off,
        bs,
        slot,
        needed,
        table_off,
        table_bytes,
        table_unread,
        ..
    } = *layout;
    let size = ff.footer.disk_size();
    let (at_end, tail_off, file_len) = (ff.at_end, ff.tail_off, ff.file_len);
    let data_limit = ff.data_limit();
    let footer_size = ff.size();
    let used = &mut layout.used;
    // The BAT entries the disk uses, 64 Ki entries at a time. At most as
    // many blocks as the data area holds can be disjoint: past that many,
    // blocks are not kept for the overlap sweep (bounded memory on a
    // hostile table), the excess is one corruption.
    let max_blocks = data_limit / slot + 1;
    let mut kept = 0u64;
    // One past the last byte a block references, inside the file or not.
    let mut referenced_end = 0u64;
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    let mut prev_end: Option<u64> = None;
    let mut first = 0u64;
    while first < layout.readable {
        let k = (layout.readable - first).min(64 * 1024);
        let buf = read(storage, table_off + first * 4, k * 4)?;
        for (j, raw) in buf.chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes(raw.try_into().expect("4 bytes"));
            if e == UNALLOCATED {
                continue;
            }
            let i = first + j as u64;
            allocated += 1;
            let start = u64::from(e) * SECTOR;
            let end = start + slot; // < 2^41 + 2^32: no overflow
            if prev_end.is_some_and(|p| p != start) {
                fragmented += 1;
            }
            prev_end = Some(end);
            referenced_end = referenced_end.max(end);
            if end > data_limit && at_end.is_none() {
                // No footer at the end and a block running past it: the
                // file was truncated. What is left of the block inside the
                // file is used (never a leak, never overwritten).
                if start < data_limit {
                    kept += 1;
                    if kept <= max_blocks {
                        used.push(Used {
                            start,
                            end: data_limit,
                            what: i,
                        });
                    }
                }
                f.report.truncated_block(
                    "VHD BAT",
                    table_off + i * 4,
                    &format!("block {i}"),
                    (i * bs, ((i + 1) * bs).min(size)),
                    start,
                    slot,
                    data_limit,
                );
                continue;
            }
            if end > data_limit {
                f.report.corrupt(
                    "VHD BAT",
                    table_off + i * 4,
                    format!(
                        "block {i} at sector {e:#x} (file offset {start:#x}+{slot:#x}: sector \
                         bitmap and data) extends past the end of the data area \
                         ({data_limit:#x}{})",
                        if at_end.is_some() {
                            ", where the footer is"
                        } else {
                            ", the end of the file"
                        }
                    ),
                );
                continue;
            }
            kept += 1;
            if kept == max_blocks + 1 {
                f.report.corrupt(
                    "VHD BAT",
                    table_off + i * 4,
                    format!(
                        "block {i}: more blocks than the {data_limit:#x} bytes of data area can \
                         hold side by side ({max_blocks} of {slot:#x} bytes): blocks overlap"
                    ),
                );
            }
            if kept <= max_blocks {
                used.push(Used {
                    start,
                    end,
                    what: i,
                });
            }
        }
        first += k;
    }
    f.report.cluster_size = bs;
    f.report.total_clusters = needed;
    f.report.allocated_clusters = allocated;
    f.report.fragmented_clusters = fragmented;

    let describe = |u: &Used| -> String {
        if u.what & STRUCTURE == 0 {
            return format!(
                "block {} (file offset {:#x}+{:#x})",
                u.what,
                u.start,
                u.end - u.start
            );
        }
        match u.what & !STRUCTURE {
            0 => "the footer copy at offset 0".to_string(),
            1 => format!("the dynamic disk header at {hdr_off:#x}"),
            2 => format!("the BAT ({table_off:#x}+{:#x})", u.end - u.start),
            k => format!(
                "the data of parent locator {} ({:#x}+{:#x})",
                k - 3,
                u.start,
                u.end - u.start
            ),
        }
    };
    let s = sweep(used);
    for (a, b) in &s.overlaps {
        let (at, msg) = if b.what & STRUCTURE == 0 {
            (
                table_off + b.what * 4,
                format!("{} overlaps {}", describe(b), describe(a)),
            )
        } else if a.what & STRUCTURE == 0 {
            (
                table_off + a.what * 4,
                format!("{} overlaps {}", describe(a), describe(b)),
            )
        } else {
            f.report.corrupt(
                HEADER,
                hdr_off,
                format!("{} overlaps {}", describe(b), describe(a)),
            );
            continue;
        };
        f.report.corrupt("VHD BAT", at, msg);
    }
    // Gaps smaller than a block are alignment padding, not leaks.
    for &(start, end) in &s.gaps {
        let len = end - start;
        if len >= slot {
            f.report.unused(start, len);
        }
    }
    let used_end = s.end.div_ceil(SECTOR) * SECTOR;
    let footer_at = match at_end {
        Some((off, _)) => off,
        None => {
            // Where the restored footer goes: over the damaged one, or
            // after the last structure if that reaches further.
            let at = used_end.max(file_len.saturating_sub(FOOTER_SIZE as u64));
            f.restore_tail = Some(at);
            at
        }
    };
    // Space is a leak only when nothing references it and it lies past the
    // last referenced byte.
    let may_leak = !table_unread && referenced_end <= used_end;
    let table_reach = table_off.saturating_add(table_bytes);
    if f.report.truncated_blocks > 0 || (at_end.is_none() && table_reach > data_limit) {
        // The footer cannot go back at the end: over the surviving part of
        // a truncated block (or BAT) it would destroy data, after it the
        // block (or BAT) would run over it. The damaged footer stays as it is (the image opens
        // read-only from the copy at offset 0).
        f.restore_tail = None;
        if let Some(p) = f
            .report
            .problems
            .iter_mut()
            .find(|p| p.structure == "VHD footer" && p.offset == tail_off && p.repair.is_some())
        {
            p.repair = None;
            p.message.push_str(
                "; it cannot be restored while blocks or the BAT run past the end of the file \
                 (the file is truncated): vdisk convert --salvage copies what is left",
            );
        }
    }
    if may_leak && footer_at > used_end && footer_at - used_end >= slot {
        let len = footer_at - used_end;
        f.report.leak(used_end, len, len / slot, true);
        f.tail_leak = Some((used_end, len / slot));
    }
    f.report.image_end_offset =
        used_end
            .max(referenced_end)
            .max(if f.tail_leak.is_some() { 0 } else { footer_at })
            + footer_size;
    Ok(())
}

#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::super::testutil::*;

    #[test]
    fn bat_entry_past_the_end_of_the_file() {
        let mut img = image(&[0]);
        set_entry(&mut img, 3, 0x10_0000); // 512 MiB
        let r = run(img);
        assert_eq!(r.exit_code(), 2);
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!((p.structure.as_str(), p.offset), ("VHD BAT", BAT + 12));
        assert!(
            p.message.contains("0x20000000") && p.message.contains("past the end"),
            "{p}"
        );
    }

    #[test]
    fn overlapping_blocks_and_structures() {
        let mut img = image(&[0, 1]);
        set_entry(&mut img, 4, (FIRST / 512) as u32);
        let r = run(img.clone());
        let p = only(&r, ProblemKind::Corruption);
        assert_eq!(p.offset, BAT + 16);
        assert!(
            p.message.contains("block 4") && p.message.contains("block 0"),
            "{p}"
        );
        // A block over the dynamic disk header.
        set_entry(&mut img, 4, 1);
        let p = run(img).problems.remove(0);
        assert_eq!(p.offset, BAT + 16);
        assert!(p.message.contains("header"), "{p}");
    }

    #[test]
    fn spare_block_before_the_footer_is_a_reclaimable_leak() {
        let img = image(&[0, 1]);
        let r = run(with_spare(&img, SLOT as usize));
        assert_eq!(r.exit_code(), 3);
        let p = only(&r, ProblemKind::Leak);
        assert_eq!((p.offset, p.length), (FIRST + 2 * SLOT, SLOT));
        assert_eq!(r.leaks, 1);
        // Less than a block is padding.
        assert!(run(with_spare(&img, 4096)).is_clean());
        let st = Arc::new(MemStorage::from_vec(
            "t.vhd",
            with_spare(&img, SLOT as usize + 4096),
        ));
        let want = contents(st.clone());
        let fix = repair(&*st, RepairMode::Leaks, &CheckOptions::default()).unwrap();
        assert_eq!(fix.leaks_fixed, 1);
        assert_eq!(st.to_vec(), img);
        assert!(check(&*st, &CheckOptions::default()).unwrap().is_clean());
        assert_eq!(contents(st), want);
    }

    #[test]
    fn unallocated_block_between_others_is_unused_space_not_a_leak() {
        let mut img = image(&[0, 1, 2]);
        set_entry(&mut img, 1, u32::MAX);
        let r = run(img);
        let p = only(&r, ProblemKind::Unused);
        assert_eq!((p.offset, p.length, p.repair), (FIRST + SLOT, SLOT, None));
        assert_eq!((r.leaks, r.unused_bytes, r.exit_code()), (0, SLOT, 0));
        assert!(r.is_clean());
        assert!(!r.needs_repair(RepairMode::All));
    }

    #[test]
    fn many_entries_on_the_same_block_stay_bounded() {
        let st = Arc::new(MemStorage::new("m.vhd"));
        let d = Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(1 << 30)).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        d.close().unwrap();
        let mut img = st.to_vec();
        let first = u32::from_be_bytes(img[BAT as usize..BAT as usize + 4].try_into().unwrap());
        for i in 1..512 {
            set_entry(&mut img, i, first);
        }
        let r = run(img);
        assert!(r.corruptions > 1 && r.corruptions < 10, "{}", r.corruptions);
        assert!(r
            .problems
            .iter()
            .any(|p| p.message.contains("side by side")));
    }
}
