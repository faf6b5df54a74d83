//! `vdisk changes` and `vdisk checkpoint changes`: changed-block tracking.
//! The ranges that may differ between two disks of one chain or checkpoint
//! tree, from the layers' block tables alone ([`checkpoint::changes`]);
//! with `--verify` checked against the data, with `--output-image` written
//! as a delta disk over the older one.

use super::map::hex16;
use crate::cli::{ChangesArgs, ChangesOptions, OutputFormat};
use crate::open::{self, Format};
use crate::progress::Progress;
use crate::size::{human, human_exact};
use anyhow::{bail, Result};
use checkpoint::{Change, Changes};
use std::path::Path;

/// `vdisk changes OLD NEW`.
pub fn run(args: &ChangesArgs) -> Result<()> {
    let changes = Changes::open(&args.old, &args.new, &open::options(args.format, false))?;
    report(
        changes,
        &args.opts,
        &args.old,
        &args.new.display().to_string(),
    )
}

/// `vdisk checkpoint changes BUNDLE FROM [TO]`, on the open bundle.
pub fn run_bundle(
    b: &checkpoint::Bundle,
    from: &str,
    to: Option<&str>,
    opts: &ChangesOptions,
) -> Result<()> {
    let changes = b.changes(from, to)?;
    let old = b.disk_path(b.checkpoint(from)?);
    let to_name = match to {
        Some(n) => format!("checkpoint '{n}'"),
        None => "the active disk".into(),
    };
    report(changes, opts, &old, &to_name)
}

/// A change as qemu-img map's JSON object (start, length, zero, data).
fn json(c: &Change) -> String {
    format!(
        "{{ \"start\": {}, \"length\": {}, \"zero\": {}, \"data\": {} }}",
        c.start, c.length, c.zero, !c.zero
    )
}

/// Print a line of the report: on stdout for people, on stderr beside
/// JSON (which stdout keeps to itself).
fn note(output: OutputFormat, line: &str) -> Result<()> {
    match output {
        OutputFormat::Human => crate::outln!("{line}"),
        OutputFormat::Json => {
            eprintln!("{line}");
            Ok(())
        }
    }
}

fn report(mut c: Changes, opts: &ChangesOptions, old: &Path, new: &str) -> Result<()> {
    // The delta's name is checked before anything is printed or read.
    if let Some(delta) = &opts.output_image {
        let f = c.format();
        if f == Format::Raw {
            bail!(
                "{}: {} is a raw image, which cannot have a differencing disk (the delta)",
                delta.display(),
                old.display()
            );
        }
        if let Some(claim) = Format::claimed_by(delta) {
            if claim != f {
                bail!(
                    "{}: the name says {}, but the delta is a differencing disk over {}, which \
                     is {}: name it .{}",
                    delta.display(),
                    claim.describe(),
                    old.display(),
                    f.describe(),
                    if f == Format::Vhdx { "avhdx" } else { "avhd" }
                );
            }
        }
        c.check_delta(delta)?;
    }
    list(&mut c, opts.output)?;
    if opts.verify {
        verify(&mut c, opts, new)?;
    }
    if let Some(delta) = &opts.output_image {
        write_delta(&mut c, opts, delta, old, new)?;
    }
    Ok(())
}

/// Print the changes (streamed: a huge list goes out in pieces).
fn list(c: &mut Changes, output: OutputFormat) -> Result<()> {
    const FLUSH_AT: usize = 64 * 1024;
    let mut out = String::new();
    let (mut n, mut bytes) = (0u64, 0u64);
    if output == OutputFormat::Human {
        out.push_str("Offset          Length          Reads\n");
    }
    while let Some(ch) = c.next_change()? {
        match output {
            OutputFormat::Human => out.push_str(&format!(
                "{}{}{}\n",
                hex16(ch.start),
                hex16(ch.length),
                if ch.zero { "zeros" } else { "data" }
            )),
            OutputFormat::Json => {
                out.push_str(if n == 0 { "[" } else { ",\n" });
                out.push_str(&json(&ch));
            }
        }
        n += 1;
        bytes += ch.length;
        if out.len() >= FLUSH_AT {
            super::print_out(&std::mem::take(&mut out))?;
        }
    }
    match output {
        OutputFormat::Json => out.push_str(if n == 0 { "[]\n" } else { "]\n" }),
        OutputFormat::Human => out.push_str(&format!(
            "{n} change{}, {} that may differ of {}; common ancestor: {}\n",
            if n == 1 { "" } else { "s" },
            human_exact(bytes),
            human(c.virtual_size()),
            c.common_ancestor().display()
        )),
    }
    super::print_out(&out)
}

fn verify(c: &mut Changes, opts: &ChangesOptions, new: &str) -> Result<()> {
    let progress = Progress::bytes(opts.progress, c.virtual_size(), "verifying", "compared");
    let r = c.verify(&mut |s| progress.step(s));
    match &r {
        Ok(_) => progress.finish(),
        Err(_) => progress.abandon(),
    }
    let r = r?;
    if !r.ok() {
        let first: Vec<String> = r
            .missed
            .iter()
            .map(|(o, l)| format!("{o:#x}+{l:#x}"))
            .collect();
        bail!(
            "verify failed: {} in sectors where {} differs lie outside the {} changes listed: \
             {}{}",
            human_exact(r.missed_bytes),
            new,
            r.changes,
            first.join(", "),
            if r.missed.len() < checkpoint::changes::MAX_MISSED {
                ""
            } else {
                ", ..."
            }
        );
    }
    note(
        opts.output,
        &format!(
            "Verified: {} compared; {} differ, all inside the {} changes listed, of {}",
            human_exact(r.bytes_compared),
            human_exact(r.differing_bytes),
            r.changes,
            human_exact(r.reported_bytes)
        ),
    )
}

fn write_delta(
    c: &mut Changes,
    opts: &ChangesOptions,
    delta: &Path,
    old: &Path,
    new: &str,
) -> Result<()> {
    let progress = Progress::bytes(opts.progress, c.virtual_size(), "writing", "written");
    let r = c.write_delta(delta, true, &mut |s| progress.step(s));
    match &r {
        Ok(_) => progress.finish(),
        Err(_) => progress.abandon(),
    }
    let s = r?;
    note(
        opts.output,
        &format!(
            "Wrote '{}': {} differencing disk over {}, {} changes ({} copied, {} zeroed); read \
             over it, it reads as {new}",
            delta.display(),
            c.format().describe(),
            old.display(),
            s.changes,
            human_exact(s.bytes_copied),
            human_exact(s.bytes_zeroed),
        ),
    )
}
