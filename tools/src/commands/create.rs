//! `vdisk create`: a new empty image.

use crate::cli::CreateArgs;
use crate::open::{self, Format};
use crate::options::{self, Target};
use crate::size::image_size;
use anyhow::{bail, Result};
use image::{Image, Kind};
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
    let format = open::new_image_format(&args.image, args.format, "-f");
    // The options first: a VHDX with 4096-byte logical sectors rounds the
    // size to those.
    let sector = options::sector_size(&options::target(format, 0, &args.options)?);
    let size = image_size("SIZE", size, sector)?;
    let target = options::target(format, size, &args.options)?;
    let img = create(&args.image, &target, size)?;
    let actual = img.disk().virtual_size();
    img.close()?;
    open::sync_parent_dir(&args.image)?;
    note_rounding(&target, size, actual);
    crate::outln!(
        "Formatted '{}', {}",
        args.image.display(),
        options::describe(&target, actual)
    )?;
    Ok(())
}

/// `create -b PARENT`: a differencing VHDX or VHD over PARENT.
fn differencing(args: &CreateArgs, parent: &Path) -> Result<()> {
    let pformat = open::resolve(parent, args.backing_format)?;
    // Without -f, the child takes the parent's format; a name that says
    // otherwise is refused (the child would not be what its name says).
    let claim = Format::claimed_by(&args.image);
    if let (None, Some(c)) = (args.format, claim) {
        if c != pformat && pformat != Format::Raw {
            bail!(
                "{}: the name says {}, but the parent {} is {}, whose format a child takes \
                 without -f: name the child .{} (or pass -f {} to create {} under this name \
                 anyway)",
                args.image.display(),
                c.describe(),
                parent.display(),
                pformat.describe(),
                if pformat == Format::Vhdx {
                    "avhdx"
                } else {
                    "avhd"
                },
                pformat.name(),
                pformat.describe()
            );
        }
    }
    let format = match args.format {
        Some(f) => open::new_image_format(&args.image, Some(f), "-f"),
        None => pformat,
    };
    let size = match &args.size {
        Some(s) => Some(image_size("SIZE", s, 512)?),
        None => None,
    };
    match (format, pformat) {
        (Format::Vhdx, Format::Vhdx) => differencing_vhdx(args, parent, size),
        (Format::Vhd, Format::Vhd) => differencing_vhd(args, parent, size),
        (Format::Raw, _) => bail!(
            "{}: a raw image cannot have a backing file (-b): use -f vhdx or -f vhd",
            args.image.display()
        ),
        (Format::Vhdx, p) => bail!(
            "{}: the parent of a differencing VHDX must be a VHDX, not {} \
             (a differencing VHD needs -f vhd and a VHD parent)",
            parent.display(),
            p.describe()
        ),
        (Format::Vhd, p) => bail!(
            "{}: the parent of a differencing VHD must be a VHD, not {} \
             (a differencing VHDX needs -f vhdx and a VHDX parent)",
            parent.display(),
            p.describe()
        ),
    }
}

/// Refuse a SIZE that is not the parent's virtual size.
fn check_size(
    args: &CreateArgs,
    parent: &Path,
    given: Option<u64>,
    parent_size: u64,
) -> Result<()> {
    match given {
        Some(s) if s != parent_size => bail!(
            "{}: SIZE {s} is not the virtual size of the parent {} ({parent_size} bytes): \
             a differencing disk has its parent's size (omit SIZE)",
            args.image.display(),
            parent.display()
        ),
        _ => Ok(()),
    }
}

/// Options a differencing VHDX accepts (the rest comes from the parent).
const VHDX_DIFFERENCING_KEYS: &[&str] = &["subformat", "block_size", "log_size"];

fn differencing_vhdx(args: &CreateArgs, parent: &Path, size: Option<u64>) -> Result<()> {
    let kv = options::split(&args.options)?;
    for (k, v) in &kv {
        if !VHDX_DIFFERENCING_KEYS.contains(&k.as_str()) {
            bail!(
                "option '{k}' does not apply to a differencing VHDX (its sizes come from the \
                 parent; supported: {})",
                VHDX_DIFFERENCING_KEYS.join(", ")
            );
        }
        if k == "subformat" && v == "fixed" {
            bail!("a differencing VHDX is dynamic: subformat=fixed does not apply");
        }
    }
    let Target::Vhdx(mut o) = options::target(Format::Vhdx, 0, &args.options)? else {
        bail!("internal error: VHDX options expected");
    };
    if !kv.iter().any(|(k, _)| k == "block_size") {
        o.block_size = vhdx::DEFAULT_DIFFERENCING_BLOCK_SIZE;
    }
    if size.is_some() {
        let psize = open::open(parent, Some(Format::Vhdx), false)?
            .disk()
            .virtual_size();
        check_size(args, parent, size, psize)?;
    }
    same_file_guard(&args.image, parent)?;
    let img = open::create(&args.image, Kind::Vhdx(o.clone()), Some(parent))?;
    let actual = img.disk().virtual_size();
    img.close()?;
    open::sync_parent_dir(&args.image)?;
    note_policy(&args.image, parent);
    crate::outln!(
        "Formatted '{}', fmt=vhdx size={actual} subformat=differencing block_size={} \
         log_size={} backing_file={}",
        args.image.display(),
        o.block_size,
        o.log_size,
        parent.display()
    )?;
    Ok(())
}

fn differencing_vhd(args: &CreateArgs, parent: &Path, size: Option<u64>) -> Result<()> {
    let Target::Vhd(o) = options::target(Format::Vhd, size.unwrap_or(0), &args.options)? else {
        bail!("internal error: VHD options expected");
    };
    if o.fixed {
        bail!("a differencing VHD is dynamic: subformat=fixed and azure=on do not apply");
    }
    let img = open::create(&args.image, Kind::Vhd(o.clone()), Some(parent))?;
    let actual = img.disk().virtual_size();
    img.close()?;
    open::sync_parent_dir(&args.image)?;
    note_policy(&args.image, parent);
    crate::outln!(
        "Formatted '{}', fmt=vhd size={actual} subformat=differencing block_size={} \
         backing_file={}",
        args.image.display(),
        o.block_size,
        parent.display()
    )?;
    Ok(())
}

/// Refuse to overwrite the parent with its own child.
fn same_file_guard(child: &Path, parent: &Path) -> Result<()> {
    if let (Ok(c), Ok(p)) = (std::fs::canonicalize(child), std::fs::canonicalize(parent)) {
        if c == p {
            bail!(
                "{}: the differencing disk would overwrite its own parent",
                child.display()
            );
        }
    }
    Ok(())
}

/// Tell (on stderr) when opening the new child will need a wider parent
/// policy than the default: its parent is outside the child's directory.
fn note_policy(child: &Path, parent: &Path) {
    let default = disk::ParentPolicy::default();
    if !disk::ChainSearch::new(&default, child).permits(parent) {
        eprintln!(
            "vdisk: note: the parent {} is outside the directory of {}: opening it will need \
             --parent-dir {} (or --allow-any-parent)",
            parent.display(),
            child.display(),
            parent
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .display()
        );
    }
}

/// Create `path` as `target` with a virtual size of `size` bytes.
pub fn create(path: &Path, target: &Target, size: u64) -> Result<Image> {
    open::create(path, kind(target, size), None)
}

/// What the library creates for `target` with a virtual size of `size`.
pub fn kind(target: &Target, size: u64) -> Kind {
    match target {
        Target::Raw => Kind::Raw { size },
        Target::Vhdx(o) => Kind::Vhdx(o.clone()),
        Target::Vhd(o) => Kind::Vhd(o.clone()),
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
