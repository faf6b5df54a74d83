//! The metadata region (MS-VHDX 2.6): its table and the system items, and
//! the BAT geometry they give.

use super::log::View;
use crate::bat::BatGeometry;
use crate::image::MAX_METADATA_REGION;
use crate::metadata::{Metadata, MetadataTable};
use crate::region_table::RegionTable;
use crate::Result;
use disk::check::{CheckReport, Problem};
use disk::ResultExt;

/// The metadata table and items of the region `table` names, and the BAT
/// geometry of the disk they describe; `None` (the problem reported) when
/// the region is too large to read, does not parse, or describes no valid
/// disk: the BAT is then not checked.
pub(super) fn items(
    view: &View<'_>,
    name: &str,
    table: &RegionTable,
    report: &mut CheckReport,
) -> Result<Option<(MetadataTable, Metadata, BatGeometry)>> {
    let meta = *table.metadata();
    let meta_len = u64::from(meta.length);
    if meta_len > MAX_METADATA_REGION {
        report.check_error(
            "VHDX metadata",
            meta.file_offset,
            format!("a metadata region of {meta_len} bytes is larger than {MAX_METADATA_REGION}: not checked"),
        );
        return Ok(None);
    }
    let meta_buf = view.read(meta.file_offset, meta_len)?;
    let (meta_table, md) = match Metadata::parse(&meta_buf).in_file(name, meta.file_offset) {
        Ok(m) => m,
        Err(e) => {
            report.add(
                Problem::from_error(&e, "VHDX metadata", meta.file_offset),
                0,
            );
            return Ok(None);
        }
    };
    let fp = md.file_parameters;
    let geo = match BatGeometry::new(
        md.virtual_disk_size,
        fp.block_size,
        md.logical_sector_size,
        fp.has_parent,
    ) {
        Ok(g) => g,
        Err(e) => {
            report.corrupt("VHDX metadata", meta.file_offset, e);
            return Ok(None);
        }
    };
    Ok(Some((meta_table, md, geo)))
}
