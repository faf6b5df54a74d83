//! `vdisk info`: what an image is and how much of it is allocated.

use crate::open::{self, Format};
use crate::size::human_exact;
use crate::{InfoArgs, OutputFormat};
use anyhow::Result;
use serde::{Serialize, Serializer};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use vhdx::{Info, OpenOptions, Vhdx};

/// Everything `info` reports. The JSON form has exactly the non-skipped
/// fields, with these (stable) names.
#[derive(Serialize, Debug)]
struct Report {
    filename: String,
    format: &'static str,
    subformat: Option<&'static str>,
    virtual_size: u64,
    block_size: Option<u64>,
    logical_sector_size: u32,
    physical_sector_size: u32,
    file_size: u64,
    /// None when the image could only be inspected (parent missing).
    allocated_bytes: Option<u64>,
    log: Option<&'static str>,
    #[serde(skip)]
    log_entries: Option<usize>,
    creator: Option<String>,
    virtual_disk_id: Option<String>,
    #[serde(skip)]
    data_write_guid: Option<String>,
    /// Parent locator entries in on-disk order.
    #[serde(serialize_with = "ordered_map")]
    parent: Option<Vec<(String, String)>>,
}

fn ordered_map<S: Serializer>(v: &Option<Vec<(String, String)>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(entries) => s.collect_map(entries.iter().map(|(k, v)| (k, v))),
        None => s.serialize_none(),
    }
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let path = args.image.as_path();
    let format = open::resolve(path, args.format)?;
    let name = path.display().to_string();
    let meta =
        std::fs::metadata(path).map_err(|e| disk::Error::io("cannot stat", e).in_file(&name, 0))?;
    let report = match format {
        Format::Raw => {
            let img = open::open(path, Some(Format::Raw), false)?;
            let g = img.disk().geometry();
            Report {
                filename: name,
                format: Format::Raw.name(),
                subformat: None,
                virtual_size: g.virtual_size,
                block_size: None,
                logical_sector_size: g.logical_sector_size,
                physical_sector_size: g.physical_sector_size,
                file_size: meta.len(),
                allocated_bytes: Some(meta.blocks() * 512),
                log: None,
                log_entries: None,
                creator: None,
                virtual_disk_id: None,
                data_write_guid: None,
                parent: None,
            }
        }
        Format::Vhdx => vhdx_report(path, name, meta.len())?,
        Format::Vhd => return Err(open::vhd_unsupported()),
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Human => print!("{}", human(&report)),
    }
    Ok(())
}

fn vhdx_report(path: &Path, name: String, file_size: u64) -> Result<Report> {
    let (info, allocated_bytes) = match Vhdx::open(path, &OpenOptions::default()) {
        Ok(d) => {
            let stats = d.allocation_stats()?;
            (d.info().clone(), Some(stats.allocated_bytes))
        }
        Err(open_err) => match Vhdx::inspect(path) {
            // A differencing disk whose parent cannot be opened: show its
            // metadata anyway, without the allocation scan.
            Ok(info) if info.metadata.file_parameters.has_parent => (info, None),
            _ => return Err(open_err.into()),
        },
    };
    Ok(vhdx_fields(&info, name, file_size, allocated_bytes))
}

fn vhdx_fields(info: &Info, name: String, file_size: u64, allocated: Option<u64>) -> Report {
    let m = &info.metadata;
    let parent = if m.file_parameters.has_parent {
        Some(
            m.parent_locator
                .as_ref()
                .map(|pl| pl.entries.clone())
                .unwrap_or_default(),
        )
    } else {
        None
    };
    Report {
        filename: name,
        format: Format::Vhdx.name(),
        subformat: Some(info.subformat()),
        virtual_size: m.virtual_disk_size,
        block_size: Some(u64::from(m.file_parameters.block_size)),
        logical_sector_size: m.logical_sector_size,
        physical_sector_size: m.physical_sector_size,
        file_size,
        allocated_bytes: allocated,
        log: Some(if info.log_replayed { "dirty" } else { "clean" }),
        log_entries: Some(info.log_entries),
        creator: Some(info.creator.clone()),
        virtual_disk_id: Some(m.virtual_disk_id.to_string()),
        data_write_guid: Some(info.header.data_write_guid.to_string()),
        parent,
    }
}

fn human(r: &Report) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: &dyn std::fmt::Display| s.push_str(&format!("{k}: {v}\n"));
    line("image", &r.filename);
    line("file format", &r.format);
    if let Some(sf) = r.subformat {
        line("subformat", &sf);
    }
    line("virtual size", &human_exact(r.virtual_size));
    if let Some(b) = r.block_size {
        line("block size", &human_exact(b));
    }
    line("logical sector size", &r.logical_sector_size);
    line("physical sector size", &r.physical_sector_size);
    line("file size", &human_exact(r.file_size));
    match r.allocated_bytes {
        Some(a) => line("allocated bytes", &human_exact(a)),
        None => line(
            "allocated bytes",
            &"unknown (the parent of this differencing disk is not opened)",
        ),
    }
    if let Some(log) = r.log {
        let entries = r.log_entries.unwrap_or(0);
        if log == "dirty" {
            line(
                "log",
                &format!(
                    "dirty ({entries} {} replayed in memory)",
                    if entries == 1 { "entry" } else { "entries" }
                ),
            );
        } else {
            line("log", &log);
        }
    }
    if let Some(c) = &r.creator {
        line("creator", c);
    }
    if let Some(id) = &r.virtual_disk_id {
        line("virtual disk id", id);
    }
    if let Some(g) = &r.data_write_guid {
        line("data write guid", g);
    }
    if let Some(parent) = &r.parent {
        s.push_str("parent:\n");
        if parent.is_empty() {
            s.push_str("    (no parent locator)\n");
        }
        for (k, v) in parent {
            s.push_str(&format!("    {k}={v}\n"));
        }
    }
    s
}
