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
    create(&args.image, &target, size)?.close()?;
    open::sync_parent_dir(&args.image)?;
    println!(
        "Formatted '{}', {}",
        args.image.display(),
        options::describe(&target, size)
    );
    Ok(())
}

/// Create `path` as `target` with a virtual size of `size` bytes.
pub fn create(path: &Path, target: &Target, size: u64) -> Result<Image> {
    match target {
        Target::Raw => open::create_raw(path, size),
        Target::Vhdx(o) => open::create_vhdx(path, o),
    }
}
