//! `vdisk check`: look for inconsistencies in an image's structures and,
//! with `-r`, repair them — `qemu-img check`'s output and exit status
//! (0 no problem, 1 the check could not be completed, 2 corruptions,
//! 3 only leaks; after a repair, what remains).

use crate::cli::{CheckArgs, OutputFormat, RepairArg};
use crate::open::{self, Format};
use anyhow::{bail, Result};
use disk::check::{CheckReport, Problem, ProblemKind, RepairMode, RepairReport};
use serde::Serialize;
use std::path::Path;

impl From<RepairArg> for RepairMode {
    fn from(r: RepairArg) -> Self {
        match r {
            RepairArg::Leaks => RepairMode::Leaks,
            RepairArg::All => RepairMode::All,
        }
    }
}

/// Check (and repair): the exit status.
pub fn run(args: &CheckArgs) -> Result<u8> {
    let path = args.image.as_path();
    let format = open::resolve(path, args.format)?;
    let first = check(path, format)?;
    let mut repaired = None;
    let last = match args.repair.map(RepairMode::from) {
        Some(mode) if first.needs_repair(mode) => {
            let fix = repair(path, format, mode)?;
            let after = check(path, format)?;
            repaired = Some((first.clone(), fix));
            after
        }
        _ => first,
    };
    let text = match args.output {
        OutputFormat::Human => human(&last, repaired.as_ref()),
        OutputFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&json(&last, repaired.as_ref()))?
        ),
    };
    super::print_out(&text)?;
    Ok(last.exit_code())
}

fn vhdx_options() -> vhdx::check::CheckOptions {
    vhdx::check::CheckOptions {
        parent_policy: open::policy().clone(),
        check_parent: true,
        lock: open::read_lock(),
        ..Default::default()
    }
}

fn vhd_options() -> vhd::check::CheckOptions {
    vhd::check::CheckOptions {
        parent_policy: open::policy().clone(),
        check_parent: true,
        lock: open::read_lock(),
        ..Default::default()
    }
}

fn check(path: &Path, format: Format) -> Result<CheckReport> {
    Ok(match format {
        Format::Vhdx => vhdx::check::check_file(path, &vhdx_options())?,
        Format::Vhd => vhd::check::check_file(path, &vhd_options())?,
        Format::Raw => bail!(
            "{}: format raw does not support checks (a raw image has no structure to check)",
            path.display()
        ),
    })
}

fn repair(path: &Path, format: Format, mode: RepairMode) -> Result<RepairReport> {
    Ok(match format {
        Format::Vhdx => vhdx::check::repair_file(path, mode, &vhdx_options())?,
        Format::Vhd => vhd::check::repair_file(path, mode, &vhd_options())?,
        Format::Raw => bail!("{}: format raw does not support checks", path.display()),
    })
}

/// One problem as a line: `ERROR ...` for corruptions (and what the check
/// could not verify), `Leaked ...` for leaks, with the repair that fixes it,
/// `Unused ...` for unused space between structures.
fn problem_line(p: &Problem) -> String {
    let fix = match p.repair {
        Some(RepairMode::All) => " (repair with -r all)",
        Some(RepairMode::Leaks) => " (reclaim with -r leaks)",
        None => "",
    };
    match p.kind {
        ProblemKind::Corruption => format!("ERROR {p}{fix}\n"),
        ProblemKind::Leak => format!(
            "Leaked space at offset {:#x}: {}{fix}\n",
            p.offset, p.message
        ),
        ProblemKind::CheckError => format!("ERROR (not checked) {p}\n"),
        ProblemKind::Unused => format!("Unused space at offset {:#x}: {}\n", p.offset, p.message),
    }
}

fn problem_lines(r: &CheckReport) -> String {
    let mut s: String = r.problems.iter().map(problem_line).collect();
    if r.problems_omitted > 0 {
        s.push_str(&format!("... and {} more problems\n", r.problems_omitted));
    }
    s
}

/// Like qemu-img: the problems found, the repair, then the verdict and the
/// allocation summary of the (re)checked image.
fn human(last: &CheckReport, repaired: Option<&(CheckReport, RepairReport)>) -> String {
    let mut s = String::new();
    if let Some((first, fix)) = repaired {
        s.push_str(&problem_lines(first));
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    \
             {} leaked clusters\n    {} corruptions\n\n",
            fix.leaks_fixed, fix.corruptions_fixed
        ));
        for a in &fix.actions {
            s.push_str(&format!("Repair: {a}\n"));
        }
        s.push_str("Double checking the fixed image now...\n");
    }
    s.push_str(&problem_lines(last));
    if last.is_clean() {
        s.push_str("No errors were found on the image.\n");
    } else {
        if last.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                last.corruptions
            ));
        }
        if last.truncated_blocks > 0 {
            s.push_str(&format!(
                "\nThe image is truncated: {} blocks lie past the end of the file.\n\
                 No repair brings their lost data back (vdisk convert --salvage copies what is \
                 left, with zeros for what is lost).\n",
                last.truncated_blocks
            ));
        }
        if last.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                last.leaks
            ));
        }
        if last.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                last.check_errors
            ));
        }
    }
    if last.total_clusters > 0 {
        let pct = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                n as f64 * 100.0 / of as f64
            }
        };
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, 0.00% compressed clusters\n",
            last.allocated_clusters,
            last.total_clusters,
            pct(last.allocated_clusters, last.total_clusters),
            pct(last.fragmented_clusters, last.allocated_clusters)
        ));
    }
    if last.image_end_offset > 0 {
        s.push_str(&format!("Image end offset: {}\n", last.image_end_offset));
    }
    s
}

/// A problem in the JSON output.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonProblem<'a> {
    kind: &'static str,
    structure: &'a str,
    offset: u64,
    length: u64,
    message: &'a str,
    /// "leaks" or "all": the `-r` mode that fixes it; null when none does.
    repair: Option<&'static str>,
    /// A truncated block: the virtual range whose data it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_length: Option<u64>,
}

/// qemu-img check's JSON keys, plus the problems found.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonReport<'a> {
    filename: &'a str,
    format: &'static str,
    check_errors: u64,
    corruptions: u64,
    leaks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    corruptions_fixed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leaks_fixed: Option<u64>,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
    cluster_size: u64,
    leaked_bytes: u64,
    /// Space between used structures that none references: not a leak.
    unused_bytes: u64,
    /// Blocks that run past the end of the file (a truncated image).
    truncated_blocks: u64,
    file_size: u64,
    problems: Vec<JsonProblem<'a>>,
    problems_omitted: u64,
    /// After a repair: what was done, and the problems found before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    repairs: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems_before_repair: Option<Vec<JsonProblem<'a>>>,
}

fn json_problems(r: &CheckReport) -> Vec<JsonProblem<'_>> {
    r.problems
        .iter()
        .map(|p| JsonProblem {
            kind: p.kind.name(),
            structure: &p.structure,
            offset: p.offset,
            length: p.length,
            message: &p.message,
            repair: p.repair.map(|m| match m {
                RepairMode::Leaks => "leaks",
                RepairMode::All => "all",
            }),
            virtual_offset: p.virtual_range.map(|(s, _)| s),
            virtual_length: p.virtual_range.map(|(s, e)| e - s),
        })
        .collect()
}

fn json<'a>(
    last: &'a CheckReport,
    repaired: Option<&'a (CheckReport, RepairReport)>,
) -> JsonReport<'a> {
    JsonReport {
        filename: &last.filename,
        format: last.format,
        check_errors: last.check_errors,
        corruptions: last.corruptions,
        leaks: last.leaks,
        corruptions_fixed: repaired.map(|(_, f)| f.corruptions_fixed),
        leaks_fixed: repaired.map(|(_, f)| f.leaks_fixed),
        image_end_offset: last.image_end_offset,
        total_clusters: last.total_clusters,
        allocated_clusters: last.allocated_clusters,
        fragmented_clusters: last.fragmented_clusters,
        compressed_clusters: 0,
        cluster_size: last.cluster_size,
        leaked_bytes: last.leaked_bytes,
        unused_bytes: last.unused_bytes,
        truncated_blocks: last.truncated_blocks,
        file_size: last.file_size,
        problems: json_problems(last),
        problems_omitted: last.problems_omitted,
        repairs: repaired.map(|(_, f)| f.actions.as_slice()),
        problems_before_repair: repaired.map(|(first, _)| json_problems(first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_verdicts_like_qemu() {
        let mut r = CheckReport::new("a.vhdx", "vhdx");
        r.total_clusters = 4;
        r.allocated_clusters = 2;
        r.image_end_offset = 6 << 20;
        let s = human(&r, None);
        assert!(s.starts_with("No errors were found on the image.\n"), "{s}");
        assert!(s.contains("2/4 = 50.00% allocated, 0.00% fragmented, 0.00% compressed clusters"));
        assert!(s.contains("Image end offset: 6291456"));
        r.leak(6 << 20, 1 << 20, 1, true);
        let s = human(&r, None);
        assert!(
            s.contains("1 leaked clusters were found on the image."),
            "{s}"
        );
        assert!(s.contains("Leaked space at offset 0x600000"), "{s}");
        r.corrupt(
            "VHDX BAT",
            0x300010,
            "block 2 points past the end of the file",
        );
        let s = human(&r, None);
        assert!(
            s.contains("ERROR VHDX BAT at offset 0x300010: block 2"),
            "{s}"
        );
        assert!(s.contains("1 errors were found on the image."), "{s}");
        let j = serde_json::to_value(json(&r, None)).unwrap();
        assert_eq!(j["corruptions"], 1);
        assert_eq!(j["leaks"], 1);
        assert_eq!(j["check-errors"], 0);
        assert_eq!(j["problems"][1]["offset"], 0x300010);
        assert_eq!(j["problems"][0]["repair"], "leaks");
        assert!(j.get("corruptions-fixed").is_none());
        assert_eq!(j["truncated-blocks"], 0);
        assert!(j["problems"][1].get("virtual-offset").is_none());
        r.truncated_block(
            "VHDX BAT",
            0x300210,
            "block 66",
            (0x8400_0000, 0x8600_0000),
            0xa40_0000,
            0x200_0000,
            0xb53_2b80,
        );
        let s = human(&r, None);
        assert!(
            s.contains("The image is truncated: 1 blocks lie past the end of the file."),
            "{s}"
        );
        let j = serde_json::to_value(json(&r, None)).unwrap();
        assert_eq!(j["truncated-blocks"], 1);
        assert_eq!(j["problems"][2]["virtual-offset"], 0x8400_0000u64);
        assert_eq!(j["problems"][2]["virtual-length"], 0x200_0000u64);
    }
}
