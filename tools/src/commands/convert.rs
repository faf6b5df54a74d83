//! `vdisk convert`: copy the virtual contents of one image into a new one,
//! through the library's [`image::convert()`] (zero ranges skipped,
//! `--salvage`, the target removed when the convert fails).

use crate::cli::ConvertArgs;
use crate::commands::create;
use crate::open;
use crate::options;
use crate::progress::Progress;
use anyhow::{bail, Result};
use image::convert::Lost;
use image::CreateOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Exit status of a salvage that replaced unreadable ranges by zeros.
pub const EXIT_SALVAGED: u8 = 2;

/// Convert: the exit status (0, or [`EXIT_SALVAGED`] when `--salvage`
/// replaced unreadable ranges by zeros; the ranges are listed on stderr).
pub fn run(args: &ConvertArgs) -> Result<u8> {
    let src_img = open::open(&args.source, args.format, false)?;
    let src = src_img.disk();
    let size = src.virtual_size();
    if same_file(&args.source, &args.target) {
        bail!(
            "{}: the source and the target are the same file",
            args.target.display()
        );
    }
    let format = open::new_image_format(&args.target, args.output_format, "-O");
    let target = options::target(format, size, &args.options)?;
    // As `vdisk create` (and qemu-img) do: an existing target is replaced.
    let opts = CreateOptions {
        parent_policy: open::policy().clone(),
        overwrite: true,
        ..CreateOptions::new(create::kind(&target, size))
    };
    // The rate: bytes written into the target (zero ranges are skipped).
    let progress = Progress::bytes(args.progress, size, "converting", "written");
    let mut cb = |s: disk::Step| {
        progress.step(s);
        if s.done == s.total {
            progress.set_message("flushing");
        }
    };
    match image::convert(&**src, &args.target, &opts, args.salvage, &mut cb) {
        Ok(done) => {
            progress.set_message("converted");
            progress.finish();
            create::note_rounding(&target, size, done.virtual_size);
            if done.lost.is_empty() {
                return Ok(0);
            }
            eprint!("{}", lost_report(&args.source, &args.target, &done.lost));
            Ok(EXIT_SALVAGED)
        }
        Err(e) => {
            progress.abandon();
            Err(e.into())
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What a salvage lost, for stderr: the total, then each range.
fn lost_report(source: &Path, target: &Path, lost: &[Lost]) -> String {
    let total: u64 = lost.iter().map(|l| l.len).sum();
    let mut s = format!(
        "vdisk: salvage: {} ranges ({total} bytes) of {} could not be read; they are zeros in \
         {}:\n",
        lost.len(),
        source.display(),
        target.display()
    );
    for l in lost {
        s.push_str(&format!(
            "  virtual {:#x}..{:#x} ({} bytes): {}\n",
            l.offset,
            l.offset + l.len,
            l.len,
            l.reason
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_report_lists_every_range() {
        let one = Lost {
            offset: 0x200,
            len: 0x400,
            reason: "why".into(),
        };
        let report = lost_report(Path::new("a.vhdx"), Path::new("b.raw"), &[one]);
        assert_eq!(
            report,
            "vdisk: salvage: 1 ranges (1024 bytes) of a.vhdx could not be read; they are zeros \
             in b.raw:\n  virtual 0x200..0x600 (1024 bytes): why\n"
        );
    }
}
