//! `vdisk compact`: give back the space of blocks that read as zeros (or,
//! in a differencing disk, as the parent does) and shrink the file (like
//! Hyper-V's Optimize-VHD), through [`vhdx::Vhdx::compact`] and
//! [`vhd::Vhd::compact`].

use crate::cli::{CompactArgs, OutputFormat};
use crate::open;
use crate::outln;
use crate::progress::Progress;
use anyhow::{bail, Result};
use disk::CompactReport;
use image::Driver;
use serde::Serialize;

pub fn run(args: &CompactArgs) -> Result<()> {
    let image = &args.image;
    let name = image.display().to_string();
    let driver = open::open(image, args.format, true)?.into_driver();
    if let Driver::Raw(_) = driver {
        bail!(
            "{name}: a raw image has no allocation table to compact (use `vdisk convert -O vhdx` \
             for a dynamic image, or `fallocate --dig-holes` to make the file sparse)"
        );
    }
    // The rate: bytes of the blocks moved.
    let bar = Progress::counting(args.progress, "compacting", "moved");
    let mut cb = |s: disk::Step| bar.step(s);
    let result = match driver {
        d @ Driver::Vhdx(_) => {
            let mut d = d.into_vhdx()?;
            d.compact(&mut cb).and_then(|r| d.close().map(|()| r))
        }
        d => {
            let mut d = d.into_vhd()?;
            d.compact(&mut cb).and_then(|r| d.close().map(|()| r))
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            bar.abandon();
            return Err(e.into());
        }
    };
    bar.finish();
    match args.output {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&json(&report))?),
        OutputFormat::Human => outln!("{}", human(&report)),
    }
}

/// `compact --output json`: what was done, kebab-case keys.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Json {
    blocks_freed: u64,
    blocks_moved: u64,
    old_file_size: u64,
    new_file_size: u64,
    reclaimed: u64,
}

fn json(r: &CompactReport) -> Json {
    Json {
        blocks_freed: r.blocks_freed,
        blocks_moved: r.blocks_moved,
        old_file_size: r.old_file_size,
        new_file_size: r.new_file_size,
        reclaimed: r.reclaimed(),
    }
}

fn human(r: &CompactReport) -> String {
    format!(
        "Image compacted: {} block(s) freed, {} moved; file {} -> {} bytes ({} reclaimed).",
        r.blocks_freed,
        r.blocks_moved,
        r.old_file_size,
        r.new_file_size,
        r.reclaimed()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_texts() {
        let r = CompactReport {
            blocks_freed: 3,
            blocks_moved: 2,
            old_file_size: 10 << 20,
            new_file_size: 4 << 20,
        };
        assert_eq!(
            human(&r),
            "Image compacted: 3 block(s) freed, 2 moved; file 10485760 -> 4194304 bytes \
             (6291456 reclaimed)."
        );
        let j = serde_json::to_value(json(&r)).unwrap();
        assert_eq!(j["reclaimed"], 6 << 20);
        assert_eq!(j["blocks-freed"], 3);
        assert_eq!(j["blocks-moved"], 2);
        assert_eq!(j["old-file-size"], 10 << 20);
        assert_eq!(j["new-file-size"], 4 << 20);
        assert_eq!(j.as_object().unwrap().len(), 5);
    }
}
