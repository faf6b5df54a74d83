//! A differencing disk's parent (MS-VHDX 2.6.2.6): found through the
//! parent locator as opening would, and its identity checked.

use crate::metadata::Metadata;
use crate::parent_locator::VHDX_PARENT_LOCATOR_TYPE;
use crate::parent_search::parent_candidates;
use crate::{OpenOptions, Vhdx};
use disk::check::CheckReport;
use disk::parent::{ChainSearch, ParentPolicy};
use std::path::Path;
use uuid::Uuid;

/// Find a differencing disk's parent as opening would, and check that it is
/// this disk's parent: its DataWriteGuid is a linkage the locator records
/// (MS-VHDX 2.6.2.6.2), its size and sector size are this disk's.
pub(super) fn linkage(
    report: &mut CheckReport,
    name: &str,
    md: &Metadata,
    loc_at: u64,
    policy: &ParentPolicy,
    popts: &OpenOptions,
) {
    const S: &str = "VHDX parent locator";
    let Some(loc) = &md.parent_locator else {
        return; // Metadata::parse requires one with HasParent.
    };
    if loc.locator_type != VHDX_PARENT_LOCATOR_TYPE {
        report.check_error(
            S,
            loc_at,
            format!(
                "parent locator type {} is not the VHDX one: the parent is not checked",
                loc.locator_type
            ),
        );
        return;
    }
    let linkages: Vec<Uuid> = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| loc.get(k))
        .filter_map(|v| {
            Uuid::parse_str(v.trim().trim_start_matches('{').trim_end_matches('}')).ok()
        })
        .collect();
    if linkages.is_empty() {
        report.corrupt(
            S,
            loc_at,
            "the parent locator has no valid parent_linkage GUID",
        );
        return;
    }
    let child = Path::new(name);
    let mut chain = ChainSearch::new(policy, child);
    if let Err(e) = chain.enter(name, child) {
        report.check_error(S, loc_at, e);
        return;
    }
    let res = chain.resolve(&parent_candidates(child, loc));
    let Some(path) = res.found.clone() else {
        let e = res.not_found_error(
            name,
            "VHDX",
            &format!(
                "parent not found (parent_linkage {})",
                loc.get("parent_linkage").unwrap_or("(none)")
            ),
            "its parent locator names no path",
        );
        report.check_error(S, loc_at, e);
        return;
    };
    let pinfo = match Vhdx::inspect_with(&path, popts) {
        Ok(i) => i,
        Err(e) => {
            report.check_error(
                S,
                loc_at,
                format!("cannot read the parent {}: {e}", path.display()),
            );
            return;
        }
    };
    let dwg = pinfo.header.data_write_guid;
    if !linkages.contains(&dwg) {
        report.corrupt(
            S,
            loc_at,
            format!(
                "the parent {} has DataWriteGuid {}, but the parent locator's parent_linkage is \
                 {}: the parent was changed after this disk was made, or is another disk",
                path.display(),
                crate::linkage_string(dwg),
                loc.get("parent_linkage").unwrap_or("(none)")
            ),
        );
    }
    let pm = &pinfo.metadata;
    if pm.virtual_disk_size != md.virtual_disk_size
        || pm.logical_sector_size != md.logical_sector_size
    {
        report.corrupt(
            S,
            loc_at,
            format!(
                "the parent {} has a virtual size of {} bytes and {}-byte sectors, this disk {} \
                 and {}",
                path.display(),
                pm.virtual_disk_size,
                pm.logical_sector_size,
                md.virtual_disk_size,
                md.logical_sector_size
            ),
        );
    }
}
