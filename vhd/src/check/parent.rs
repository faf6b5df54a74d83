//! The parent locators and parent pass ("Parent Locator Entries",
//! "Differencing Hard Disk Image"): each locator's data lies in the file;
//! a differencing disk's parent is found through the locators (under the
//! parent policy) as opening finds it, and its footer's unique id is the
//! Parent Unique Id the header records.

use super::{Layout, HEADER, STRUCTURE};
use crate::bat::SECTOR;
use crate::dynamic_header::LOCATOR_TABLE_OFFSET;
use crate::footer::{fourcc, FOOTER_SIZE};
use crate::parent_locator::{self, read_locators};
use crate::parent_search::parent_candidates;
use crate::{OpenOptions, Vhd};
use disk::check::{CheckReport, Used};
use disk::parent::{ChainSearch, ParentPolicy};
use disk::Storage;
use std::path::Path;

/// Every parent locator's data (its whole space) lies between the footer
/// copy and `data_limit`; those that do join `layout.used`.
pub(super) fn check_locators(report: &mut CheckReport, layout: &mut Layout, data_limit: u64) {
    for (i, l) in layout.header.locators() {
        let len = l
            .data_space_bytes()
            .max(u64::from(l.data_length))
            .div_ceil(SECTOR)
            * SECTOR;
        let entry_at = layout.hdr_off + (LOCATOR_TABLE_OFFSET + i * parent_locator::SIZE) as u64;
        match l.data_offset.checked_add(len) {
            Some(end) if l.data_offset >= FOOTER_SIZE as u64 && end <= data_limit => {
                layout.used.push(Used {
                    start: l.data_offset,
                    end,
                    what: STRUCTURE | (3 + i as u64),
                })
            }
            _ => report.corrupt(
                HEADER,
                entry_at + 16,
                format!(
                    "parent locator {i} ({}): its data {:#x}+{len:#x} lies outside the \
                     {data_limit:#x} bytes before the footer",
                    fourcc(&l.platform_code),
                    l.data_offset
                ),
            ),
        }
    }
}

/// Find a differencing disk's parent as opening would, and check that it is
/// this disk's parent: its footer's unique id is the header's Parent Unique
/// Id, its size is this disk's.
pub(super) fn check_parent(
    report: &mut CheckReport,
    storage: &dyn Storage,
    layout: &Layout,
    size: u64,
    policy: &ParentPolicy,
    popts: &OpenOptions,
) {
    const H: &str = HEADER;
    let (hdr_off, header) = (layout.hdr_off, &layout.header);
    let name = storage.name();
    let Ok(file_len) = storage.len() else {
        report.check_error(H, hdr_off, "cannot read the file length");
        return;
    };
    let locators = read_locators(storage, header, file_len);
    let child = Path::new(name);
    let mut chain = ChainSearch::new(policy, child);
    if let Err(e) = chain.enter(name, child) {
        report.check_error(H, hdr_off, e);
        return;
    }
    // As opening does: the first candidate whose unique id is the one
    // recorded wins; a candidate with another id is skipped.
    let mut all = disk::parent::Resolution::default();
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    let mut mismatch: Option<String> = None;
    let mut found = None;
    for cand in parent_candidates(child, header, &locators) {
        let res = chain.resolve(std::slice::from_ref(&cand));
        all.tried.extend(res.tried);
        all.refused |= res.refused;
        let Some(path) = res.found else {
            continue;
        };
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            continue;
        }
        seen.push(canon);
        let pinfo = match Vhd::inspect_with(&path, popts) {
            Ok(i) => i,
            Err(e) => {
                report.check_error(
                    H,
                    hdr_off + 40,
                    format!("cannot read the parent {}: {e}", path.display()),
                );
                return;
            }
        };
        let pid = pinfo.footer.unique_id;
        if pid == header.parent_unique_id {
            found = Some((path, pinfo));
            break;
        }
        mismatch.get_or_insert_with(|| {
            format!(
                "the parent {} has unique id {pid}, but this differencing disk records Parent \
                 Unique Id {}: the parent is another disk, or its id was changed",
                path.display(),
                header.parent_unique_id
            )
        });
    }
    let Some((path, pinfo)) = found else {
        match mismatch {
            Some(m) => report.corrupt(H, hdr_off + 40, m),
            None => {
                let e = all.not_found_error(
                    name,
                    "VHD",
                    &format!(
                        "parent \"{}\" (id {}) not found",
                        header.parent_name(),
                        header.parent_unique_id
                    ),
                    "no parent locator or parent name names a path",
                );
                report.check_error(H, hdr_off + 40, e);
            }
        }
        return;
    };
    if pinfo.virtual_size != size {
        report.corrupt(
            H,
            hdr_off + 40,
            format!(
                "the parent {} has a virtual size of {} bytes, this disk {size}",
                path.display(),
                pinfo.virtual_size
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;

    #[test]
    fn differencing_parent_unique_id() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        Vhd::create(&base, &CreateOptions::new(8 * MIB), false)
            .unwrap()
            .close()
            .unwrap();
        let c =
            Vhd::create_differencing(&child, &base, &CreateOptions::new(8 * MIB), false).unwrap();
        c.write_at(&[2; 512], MIB).unwrap();
        c.close().unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert!(r.is_clean(), "{:#?}", r.problems);
        // Another disk in the parent's place.
        Vhd::create(&base, &CreateOptions::new(8 * MIB), true)
            .unwrap()
            .close()
            .unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        let p = only(&r, ProblemKind::Corruption);
        assert!(p.message.contains("unique id"), "{p}");
        assert_eq!(p.offset, 512 + 40);
        std::fs::remove_file(&base).unwrap();
        let r = check_file(&child, &CheckOptions::default()).unwrap();
        assert_eq!(r.exit_code(), 1);
        let opts = CheckOptions {
            check_parent: false,
            ..CheckOptions::default()
        };
        assert!(check_file(&child, &opts).unwrap().is_clean());
    }
}
