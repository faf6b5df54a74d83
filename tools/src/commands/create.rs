//! `vdisk create`: a new empty image.

use crate::open::{self, Format, Image};
use crate::options::{self, Target};
use crate::size::parse_arg;
use crate::CreateArgs;
use anyhow::{bail, Result};
use std::path::Path;

pub fn run(args: &CreateArgs) -> Result<()> {
    if let Some(parent) = &args.backing {
        return differencing(args, parent);
    }
    if args.backing_format.is_some() {
        bail!("-F (the backing file's format) needs -b PARENT");
    }
    let Some(size) = &args.size else {
        bail!("the virtual size (SIZE) is required unless -b PARENT is given");
    };
    let size = parse_arg("SIZE", size)?;
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

/// `create -b PARENT`: a differencing VHD over PARENT.
fn differencing(args: &CreateArgs, parent: &Path) -> Result<()> {
    if args.format != Format::Vhd {
        bail!(
            "a backing file (-b) is supported for VHD images only (use -f vhd), not {}",
            args.format.name()
        );
    }
    let pformat = open::resolve(parent, args.backing_format)?;
    if pformat != Format::Vhd {
        bail!(
            "{}: the parent of a differencing VHD must be a VHD, not {}",
            parent.display(),
            pformat.name()
        );
    }
    let size = match &args.size {
        Some(s) => parse_arg("SIZE", s)?,
        None => 0,
    };
    let Target::Vhd(o) = options::target(Format::Vhd, size, &args.options)? else {
        bail!("internal error: VHD options expected");
    };
    if o.fixed {
        bail!("a differencing VHD is dynamic: subformat=fixed and azure=on do not apply");
    }
    let img = open::create_vhd_differencing(&args.image, parent, &o)?;
    let actual = img.disk().virtual_size();
    img.close()?;
    open::sync_parent_dir(&args.image)?;
    println!(
        "Formatted '{}', fmt=vhd size={actual} subformat=differencing block_size={} \
         backing_file={}",
        args.image.display(),
        o.block_size,
        parent.display()
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
