//! `vdisk merge` and `vdisk rebase`: change the layers of a differencing chain.

use crate::cli::{MergeArgs, RebaseArgs};
use crate::open;
use crate::progress::Progress;
use crate::size::human_exact;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The chain of `image`, the image first; refuses a disk with no parent.
fn chain_of(image: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let format = open::detect(image)?;
    if format == open::Format::Raw {
        bail!(
            "{}: a raw image is not a differencing disk: nothing to {what}",
            image.display()
        );
    }
    let files = image::chain::chain_files(image, &open::options(Some(format), false))?;
    if files.len() < 2 {
        bail!(
            "{}: not a differencing disk (it has no parent): nothing to {what}",
            image.display()
        );
    }
    Ok(files)
}

/// The chain as "a -> b -> c" for messages.
fn show_chain(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Run `work` with a progress callback feeding `-p` (when `enabled`); the
/// rate is of the bytes copied into the image.
fn with_progress<T>(
    enabled: bool,
    message: &str,
    done: &str,
    work: impl FnOnce(disk::Progress<'_>) -> Result<T>,
) -> Result<T> {
    let progress = Progress::bytes(enabled, 0, message, "copied");
    let result = work(&mut |s| progress.step(s));
    match &result {
        Ok(_) => {
            progress.set_message(done);
            progress.finish();
        }
        Err(_) => progress.abandon(),
    }
    result
}

pub fn merge(args: &MergeArgs) -> Result<()> {
    let image = args.image.as_path();
    let files = chain_of(image, "merge")?;
    let depth = match (&args.into, args.depth) {
        (Some(into), _) => match files.iter().skip(1).position(|f| same_file(f, into)) {
            Some(i) => i + 1,
            None => bail!(
                "{}: {} is not an ancestor of this image (its chain: {})",
                image.display(),
                into.display(),
                show_chain(&files)
            ),
        },
        (None, Some(0)) => bail!(
            "{}: --depth must be at least 1 (1 merges into the parent)",
            image.display()
        ),
        (None, Some(d)) if d >= files.len() => bail!(
            "{}: --depth {d} is beyond the chain: {} below the image ({})",
            image.display(),
            match files.len() - 1 {
                1 => "1 layer".to_string(),
                n => format!("{n} layers"),
            },
            show_chain(&files)
        ),
        (None, d) => d.unwrap_or(1),
    };
    let (ancestor, stats) = with_progress(args.progress, "merging", "merged", |cb| {
        Ok(checkpoint::merge::merge_into_ancestor(
            image,
            depth,
            &open::options(None, false),
            cb,
        )?)
    })?;
    let merged = &files[..depth];
    crate::outln!(
        "Merged {} into '{}': {} copied",
        merged
            .iter()
            .map(|f| format!("'{}'", f.display()))
            .collect::<Vec<_>>()
            .join(", "),
        ancestor.display(),
        human_exact(stats.bytes_copied)
    )?;
    if args.keep {
        return Ok(());
    }
    for f in merged {
        std::fs::remove_file(f).with_context(|| format!("{}: cannot delete", f.display()))?;
        crate::outln!("Deleted '{}'", f.display())?;
    }
    open::sync_parent_dir(image)?;
    Ok(())
}

pub fn rebase(args: &RebaseArgs) -> Result<()> {
    let image = args.image.as_path();
    let new_parent = args.backing.as_path();
    if same_file(image, new_parent) {
        bail!(
            "{}: an image cannot be its own parent ({})",
            image.display(),
            new_parent.display()
        );
    }
    let opts = open::options(None, false);
    if args.unsafe_relink {
        image::chain::set_parent(image, new_parent, true, &opts)?;
        crate::outln!(
            "Rebased '{}' onto '{}' (unsafe: link rewritten, 0 bytes copied)",
            image.display(),
            new_parent.display()
        )?;
        return Ok(());
    }
    chain_of(image, "rebase")?;
    let stats = with_progress(args.progress, "rebasing", "rebased", |cb| {
        Ok(checkpoint::merge::rebase(image, new_parent, &opts, cb)?)
    })?;
    crate::outln!(
        "Rebased '{}' onto '{}': {} copied",
        image.display(),
        new_parent.display(),
        human_exact(stats.bytes_copied)
    )?;
    Ok(())
}
