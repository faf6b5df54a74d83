//! `vdisk create`: a new empty image.

use crate::open::{self, Image};
use crate::options::{self, Target};
use crate::size::parse_arg;
use crate::CreateArgs;
use anyhow::Result;
use std::path::Path;

pub fn run(args: &CreateArgs) -> Result<()> {
    let size = parse_arg("SIZE", &args.size)?;
    let target = options::target(args.format, size, &args.options)?;
    let img = create(&args.image, &target, size)?;
    let actual = img.disk().virtual_size();
    img.close()?;
    open::sync_parent_dir(&args.image)?;
    note_rounding(&target, size, actual);
    println!(
        "Formatted '{}', {}",
        args.image.display(),
        options::describe(&target, actual)
    );
    Ok(())
}

/// Create `path` as `target` with a virtual size of `size` bytes.
pub fn create(path: &Path, target: &Target, size: u64) -> Result<Image> {
    match target {
        Target::Raw => open::create_raw(path, size),
        Target::Vhdx(o) => open::create_vhdx(path, o),
        Target::Vhd(o) => open::create_vhd(path, o),
    }
}

/// Tell (on stderr) when the format made the disk larger than asked: a VHD
/// (unless Azure) is sized to a whole CHS geometry, like qemu-img does.
pub fn note_rounding(target: &Target, requested: u64, actual: u64) {
    if actual != requested {
        let hint = match target {
            Target::Vhd(_) => {
                " to fit a VHD CHS geometry (use -o azure=on for an exact whole-MiB size)"
            }
            _ => "",
        };
        eprintln!("vdisk: note: virtual size rounded up from {requested} to {actual} bytes{hint}");
    }
}
