//! `vdisk info`: what an image is and how much of it is allocated.

use crate::cli::{InfoArgs, OutputFormat};
use crate::open::{self, Format};
use crate::size::human_exact;
use anyhow::{Context, Result};
use disk::ParentPolicy;
use serde::{Serialize, Serializer};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use vhdx::{Info, Vhdx};

/// Everything `info` reports. The JSON form has exactly these fields, with
/// these (stable) kebab-case names, qemu-img's where it has the same thing
/// (`virtual-size`, `cluster-size`, `actual-size`, `backing-filename`,
/// `full-backing-filename`), for every format: fields that do not apply
/// are null (`vhd` holds what only VHD images have).
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct Report {
    filename: String,
    format: &'static str,
    subformat: Option<&'static str>,
    virtual_size: u64,
    /// The block size (qemu-img's name for it).
    #[serde(rename = "cluster-size")]
    block_size: Option<u64>,
    logical_sector_size: u32,
    physical_sector_size: u32,
    /// The file's length (`ls -l`).
    file_size: u64,
    /// Space the file takes on the host (`du`; qemu-img's "disk size"):
    /// less than its length where the file is sparse.
    actual_size: u64,
    /// None when the image could only be inspected (parent missing).
    allocated_bytes: Option<u64>,
    log: Option<&'static str>,
    /// VHDX: entries of a dirty log (replayed in memory).
    log_entries: Option<usize>,
    creator: Option<String>,
    virtual_disk_id: Option<String>,
    data_write_guid: Option<String>,
    /// Parent locator entries in on-disk order.
    #[serde(serialize_with = "ordered_map")]
    parent: Option<Vec<(String, String)>>,
    /// Differencing disks: the parent's path as the image records it.
    backing_filename: Option<String>,
    /// Differencing disks whose parent was found: the parent file opened.
    #[serde(rename = "full-backing-filename")]
    parent_file: Option<String>,
    /// VHDX and VHD: blocks that run past the end of the file (a truncated
    /// image; null when not scanned).
    truncated_blocks: Option<u64>,
    /// VHDX: BAT entries that lie past the end of the file (a file cut
    /// inside its BAT; null when not scanned).
    lost_bat_entries: Option<u64>,
    /// VHD-only details.
    vhd: Option<VhdReport>,
}

/// The VHD-specific part of the report.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct VhdReport {
    disk_type: &'static str,
    creator_application: String,
    creator_version: String,
    creator_host_os: String,
    /// Seconds since the Unix epoch.
    timestamp: u64,
    original_size: u64,
    current_size: u64,
    geometry: Chs,
    unique_id: String,
    saved_state: bool,
    /// "end", "end-511" (old 511-byte footer) or "copy-at-start".
    footer: &'static str,
    /// Dynamic and differencing disks.
    allocated_blocks: Option<u64>,
    max_table_entries: Option<u32>,
    /// Differencing disks.
    parent_name: Option<String>,
    parent_unique_id: Option<String>,
    parent_locators: Option<Vec<Locator>>,
    /// Differencing disks whose parent was found: where.
    parent_file: Option<String>,
    warnings: Vec<String>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct Chs {
    cylinders: u16,
    heads: u8,
    sectors_per_track: u8,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct Locator {
    platform_code: String,
    path: String,
}

fn ordered_map<S: Serializer>(v: &Option<Vec<(String, String)>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(entries) => s.collect_map(entries.iter().map(|(k, v)| (k, v))),
        None => s.serialize_none(),
    }
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let path = args.image.as_path();
    if args.backing_chain {
        return chain(args);
    }
    let report = report(path, args.format, open::policy())?;
    match args.output {
        OutputFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&report)?)?,
        OutputFormat::Human => super::print_out(&human(&report))?,
    }
    Ok(())
}

/// `info --backing-chain`: the report of every layer, the image first.
fn chain(args: &InfoArgs) -> Result<()> {
    let path = args.image.as_path();
    let format = open::resolve(path, args.format)?;
    let files = match format {
        Format::Raw => vec![path.to_path_buf()],
        Format::Vhdx | Format::Vhd => {
            image::chain::chain_files(path, &open::options(Some(format), false))?
        }
    };
    // Each layer is opened on its own, with its own directory as the
    // default root: the top's directory (where the chain open found the
    // layers) is allowed too.
    let mut lower = open::policy().clone();
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        lower.allowed_dirs.push(d.to_path_buf());
    }
    let mut reports = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        reports.push(if i == 0 {
            report(f, Some(format), open::policy())?
        } else {
            report(f, None, &lower)?
        });
    }
    match args.output {
        OutputFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&reports)?)?,
        OutputFormat::Human => {
            let text: Vec<String> = reports.iter().map(human).collect();
            super::print_out(&text.join("\n"))?;
        }
    }
    Ok(())
}

/// The report of the image at `path` (format given or detected).
fn report(path: &Path, format: Option<Format>, policy: &ParentPolicy) -> Result<Report> {
    let format = open::resolve(path, format)?;
    let name = path.display().to_string();
    let meta =
        std::fs::metadata(path).map_err(|e| disk::Error::io("cannot stat", e).in_file(&name, 0))?;
    Ok(match format {
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
                actual_size: meta.blocks() * 512,
                allocated_bytes: Some(meta.blocks() * 512),
                log: None,
                log_entries: None,
                creator: None,
                virtual_disk_id: None,
                data_write_guid: None,
                parent: None,
                backing_filename: None,
                parent_file: None,
                truncated_blocks: None,
                lost_bat_entries: None,
                vhd: None,
            }
        }
        Format::Vhdx => vhdx_report(path, name, meta.len(), policy)?,
        Format::Vhd => vhd_report(path, name, meta.len(), policy)?,
    }
    .with_actual_size(meta.blocks() * 512))
}

impl Report {
    fn with_actual_size(self, actual_size: u64) -> Self {
        Report {
            actual_size,
            ..self
        }
    }
}

/// How `info` opens the image at `path` of `format`: read-only, under
/// `policy`.
fn info_options(format: Format, policy: &ParentPolicy) -> image::OpenOptions {
    image::OpenOptions {
        parent_policy: policy.clone(),
        ..open::options(Some(format), false)
    }
}

fn vhdx_report(path: &Path, name: String, file_size: u64, policy: &ParentPolicy) -> Result<Report> {
    let opts = info_options(Format::Vhdx, policy);
    let (info, allocated_bytes, truncation) = match image::open(path, &opts) {
        Ok(img) => {
            let d = img.vhdx().context("a VHDX open gives a VHDX driver")?;
            let stats = d.allocation_stats()?;
            let t = d.truncation()?;
            (d.info().clone(), Some(stats.allocated_bytes), Some(t))
        }
        Err(open_err) => match Vhdx::inspect_with(path, &opts.vhdx()) {
            // A differencing disk whose parent cannot be opened: show its
            // metadata anyway, without the allocation scan.
            Ok(info) if info.metadata.file_parameters.has_parent => {
                parent_note(&open_err);
                (info, None, None)
            }
            _ => return Err(open_err.into()),
        },
    };
    let mut r = vhdx_fields(&info, name, file_size, allocated_bytes);
    if let Some(t) = truncation {
        r.truncated_blocks = Some(t.truncated_blocks);
        r.lost_bat_entries = Some(t.total_entries - t.entries_in_file);
    }
    Ok(r)
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
        actual_size: 0,
        allocated_bytes: allocated,
        log: Some(if info.log_replayed { "dirty" } else { "clean" }),
        log_entries: Some(info.log_entries),
        creator: Some(info.creator.clone()),
        virtual_disk_id: Some(m.virtual_disk_id.to_string()),
        data_write_guid: Some(info.header.data_write_guid.to_string()),
        backing_filename: parent.as_ref().and_then(|entries| {
            // Windows's search order (MS-VHDX 2.6.2.6.3).
            ["relative_path", "volume_path", "absolute_win32_path"]
                .iter()
                .find_map(|key| entries.iter().find(|(k, _)| k == key))
                .map(|(_, v)| v.clone())
        }),
        parent,
        parent_file: info.parent_file.clone(),
        truncated_blocks: None,
        lost_bat_entries: None,
        vhd: None,
    }
}

fn vhd_report(path: &Path, name: String, file_size: u64, policy: &ParentPolicy) -> Result<Report> {
    let opts = info_options(Format::Vhd, policy);
    let info = match image::open(path, &opts) {
        Ok(img) => img
            .vhd()
            .context("a VHD open gives a VHD driver")?
            .info()
            .clone(),
        Err(open_err) => match vhd::Vhd::inspect_with(path, &opts.vhd()) {
            // A differencing disk (whose parent chain cannot be opened):
            // show its metadata anyway.
            Ok(info) if info.footer.disk_type == vhd::footer::DiskType::Differencing => {
                parent_note(&open_err);
                info
            }
            _ => return Err(open_err.into()),
        },
    };
    Ok(vhd_fields(&info, name, file_size))
}

/// Say on stderr why the parent of a differencing disk is not opened.
fn parent_note(e: &disk::Error) {
    eprintln!("vdisk: note: {e}");
    crate::hints::policy_hint(&e.to_string());
    crate::hints::linkage_hint(&e.to_string());
}

/// "vpc " → "vpc"; non-printable bytes escaped.
fn fourcc(c: &[u8; 4]) -> String {
    vhd::footer::fourcc(c).trim_end().to_string()
}

fn vhd_fields(info: &vhd::Info, name: String, file_size: u64) -> Report {
    let f = &info.footer;
    let app = fourcc(&f.creator_application);
    let version = format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff);
    let host = fourcc(&f.creator_host_os);
    let block_size = info.block_size().map(u64::from);
    let allocated = match block_size {
        Some(bs) => info.allocated_blocks * bs,
        None => info.virtual_size,
    };
    let differencing = f.disk_type == vhd::footer::DiskType::Differencing;
    let header = info.header.as_ref().filter(|_| differencing);
    let parent = header.map(|h| {
        let mut entries = vec![
            ("parent-name".to_string(), h.parent_name()),
            (
                "parent-unique-id".to_string(),
                h.parent_unique_id.to_string(),
            ),
        ];
        for (code, path) in &info.parent_locators {
            let mut key = code.clone();
            let mut n = 1;
            while entries.iter().any(|(k, _)| *k == key) {
                n += 1;
                key = format!("{code}#{n}");
            }
            entries.push((key, path.clone()));
        }
        entries
    });
    let vhd = VhdReport {
        disk_type: f.disk_type.name(),
        creator_application: app.clone(),
        creator_version: version.clone(),
        creator_host_os: host.clone(),
        timestamp: f.timestamp_unix(),
        original_size: f.original_size,
        current_size: f.current_size,
        geometry: Chs {
            cylinders: f.geometry.cylinders,
            heads: f.geometry.heads,
            sectors_per_track: f.geometry.sectors_per_track,
        },
        unique_id: f.unique_id.to_string(),
        saved_state: f.saved_state != 0,
        footer: match info.footer_source {
            vhd::FooterSource::End => "end",
            vhd::FooterSource::End511 => "end-511",
            vhd::FooterSource::CopyAtStart => "copy-at-start",
        },
        allocated_blocks: info.header.as_ref().map(|_| info.allocated_blocks),
        max_table_entries: info.header.as_ref().map(|h| h.max_table_entries),
        parent_name: header.map(|h| h.parent_name()),
        parent_unique_id: header.map(|h| h.parent_unique_id.to_string()),
        parent_locators: header.map(|_| {
            info.parent_locators
                .iter()
                .map(|(code, path)| Locator {
                    platform_code: code.clone(),
                    path: path.clone(),
                })
                .collect()
        }),
        parent_file: info.parent_file.clone(),
        warnings: info.warnings.clone(),
    };
    Report {
        filename: name,
        format: Format::Vhd.name(),
        subformat: Some(info.subformat()),
        virtual_size: info.virtual_size,
        block_size,
        logical_sector_size: 512,
        physical_sector_size: 512,
        file_size,
        actual_size: 0,
        allocated_bytes: Some(allocated),
        log: None,
        log_entries: None,
        creator: Some(format!("{app} {version} ({host})")),
        virtual_disk_id: Some(f.unique_id.to_string()),
        data_write_guid: None,
        // The relative locator, as Windows searches first; else the
        // absolute one; else the parent's name.
        backing_filename: header.map(|h| {
            ["W2ru", "W2ku"]
                .iter()
                .find_map(|code| info.parent_locators.iter().find(|(c, _)| c == code))
                .map_or_else(|| h.parent_name(), |(_, p)| p.clone())
        }),
        parent,
        parent_file: info.parent_file.clone(),
        truncated_blocks: info.header.as_ref().map(|_| info.truncated_blocks),
        lost_bat_entries: None,
        vhd: Some(vhd),
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
    line("disk size", &human_exact(r.actual_size));
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
    if let Some(v) = &r.vhd {
        line("disk type", &v.disk_type);
        line("creator application", &v.creator_application);
        line("creator version", &v.creator_version);
        line("creator host os", &v.creator_host_os);
        let g = &v.geometry;
        line(
            "chs geometry",
            &format!("{}/{}/{}", g.cylinders, g.heads, g.sectors_per_track),
        );
        line("original size", &human_exact(v.original_size));
        line("current size", &human_exact(v.current_size));
        line("unique id", &v.unique_id);
        if let Some(n) = v.allocated_blocks {
            line("allocated blocks", &n);
        }
        if v.footer == "end-511" {
            line("footer", &"511 bytes (made before Virtual PC 2004)");
        }
        for w in &v.warnings {
            line("warning", w);
        }
    } else {
        if let Some(c) = &r.creator {
            line("creator", c);
        }
        if let Some(id) = &r.virtual_disk_id {
            line("virtual disk id", id);
        }
    }
    if let Some(g) = &r.data_write_guid {
        line("data write guid", g);
    }
    if let Some(n) = r.truncated_blocks.filter(|&n| n > 0) {
        line(
            "warning",
            &format!("image is truncated: {n} blocks lie past the end of the file"),
        );
    }
    if let Some(n) = r.lost_bat_entries.filter(|&n| n > 0) {
        line(
            "warning",
            &format!(
                "image is truncated inside its BAT: {n} BAT entries lie past the end of the \
                 file (their blocks cannot be found)"
            ),
        );
    }
    if let Some(b) = &r.backing_filename {
        s.push_str(&format!("backing file: {b}\n"));
    }
    if let Some(p) = &r.parent_file {
        s.push_str(&format!("parent file: {p}\n"));
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
