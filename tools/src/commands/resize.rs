//! `vdisk resize`: change the virtual size of an image (like `qemu-img
//! resize`), through [`vhdx::Vhdx::resize`], [`vhd::Vhd::resize`], or the
//! file length for raw images.

use crate::cli::ResizeArgs;
use crate::open::{self, Format};
use crate::outln;
use crate::progress::Progress;
use crate::size::{parse_size_ceil, round_to_sectors};
use anyhow::{anyhow, bail, Result};
use disk::{Storage, VirtualDisk};
use std::path::Path;

/// A size argument: absolute, or relative to the current size; in bytes
/// (rounded up when the text asks for a fraction of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeArg {
    Absolute(u64),
    Plus(u64),
    Minus(u64),
}

/// The size argument, and whether it is a whole number of bytes.
fn parse_size_arg(s: &str) -> Result<(SizeArg, bool)> {
    let bad = |e: anyhow::Error| anyhow!("invalid SIZE: {e}");
    Ok(if let Some(r) = s.strip_prefix('+') {
        let (n, whole) = parse_size_ceil(r).map_err(bad)?;
        (SizeArg::Plus(n), whole)
    } else if let Some(r) = s.strip_prefix('-') {
        let (n, whole) = parse_size_ceil(r).map_err(bad)?;
        (SizeArg::Minus(n), whole)
    } else {
        let (n, whole) = parse_size_ceil(s).map_err(bad)?;
        (SizeArg::Absolute(n), whole)
    })
}

/// The new size of `image` (now `current` bytes) that `text` asks for,
/// rounded up to whole `sector`s (with a note on stderr when it is not).
fn target(image: &Path, current: u64, text: &str, sector: u64) -> Result<u64> {
    let name = image.display();
    let (arg, whole) = parse_size_arg(text)?;
    let size = match arg {
        SizeArg::Absolute(n) => Some(n),
        SizeArg::Plus(n) => current.checked_add(n),
        SizeArg::Minus(n) => current.checked_sub(n),
    };
    match size {
        Some(s) if s > 0 => round_to_sectors_noted(text, s, whole, sector),
        _ => bail!(
            "{name}: the new size would be zero or out of range (current size {current} bytes)"
        ),
    }
}

/// [`round_to_sectors`], the note on stderr.
fn round_to_sectors_noted(text: &str, size: u64, whole: bool, sector: u64) -> Result<u64> {
    let (n, note) = round_to_sectors("new size", text, size, whole, sector)?;
    if let Some(note) = note {
        eprintln!("vdisk: note: {note}");
    }
    Ok(n)
}

pub fn run(args: &ResizeArgs) -> Result<()> {
    let bar = Progress::spinner(args.progress, "resizing");
    match resize(args) {
        Ok(()) => bar.finish(),
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    }
    outln!("Image resized.")
}

fn resize(args: &ResizeArgs) -> Result<()> {
    // A bad SIZE is refused before the image is looked at.
    parse_size_arg(&args.size)?;
    let text = args.size.as_str();
    let image = &args.image;
    let name = image.display().to_string();
    match open::resolve(image, args.format)? {
        Format::Vhdx => {
            let img = open::open(image, Some(Format::Vhdx), true)?;
            if img.driver().disk().parent().is_some() {
                bail!(
                    "{name}: cannot resize a differencing disk: its size must match its parent's"
                );
            }
            let sector = u64::from(
                img.vhdx()
                    .map_or(512, |v| v.info().metadata.logical_sector_size),
            );
            let size = target(image, img.disk().virtual_size(), text, sector)?;
            let mut d = img.into_driver().into_vhdx()?;
            d.resize(size, args.force)?;
            d.close()?;
        }
        Format::Vhd => {
            let img = open::open(image, Some(Format::Vhd), true)?;
            let size = target(image, img.disk().virtual_size(), text, 512)?;
            let mut d = img.into_driver().into_vhd()?;
            d.resize(size, args.force)?;
            d.close()?;
        }
        Format::Raw => {
            let img = open::open(image, Some(Format::Raw), true)?;
            let st = img.storage();
            let cur = st.len()?;
            let size = target(image, cur, text, 512)?;
            if size < cur && !args.force {
                if let Some(at) = first_nonzero(st, size, cur)? {
                    bail!(
                        "{name}: the part past the new end ({size} bytes) holds data (first \
                         non-zero byte at offset {at}): shrinking would lose it (use --force \
                         to discard it)"
                    );
                }
            }
            if size < cur && args.format.is_none() && ends_in_vhd_cookie(st, size)? {
                bail!(
                    "{name}: refusing to cut an image whose format was guessed as raw to {size} \
                     bytes: it would end in a VHD footer cookie (\"conectix\") and detect as a \
                     fixed VHD; pass -f raw if it is a raw image"
                );
            }
            st.set_len(size)?;
            st.flush()?;
        }
    }
    Ok(())
}

/// Whether the first `size` bytes of `st` end in a VHD footer cookie, 512
/// (or, as old footers, 511) bytes before their end: what detection takes
/// for a fixed VHD.
fn ends_in_vhd_cookie(st: &dyn Storage, size: u64) -> Result<bool> {
    for back in [512, 511] {
        if let Some(at) = size.checked_sub(back) {
            let mut b = [0u8; 8];
            st.read_at(&mut b, at)?;
            if &b == b"conectix" {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn first_nonzero(st: &dyn Storage, from: u64, to: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; super::CHUNK];
    let mut at = from;
    while at < to {
        let n = super::min_len(to - at, buf.len());
        st.read_at(&mut buf[..n], at)?;
        if let Some(i) = super::first_nonzero(&buf[..n]) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_args() {
        assert_eq!(
            parse_size_arg("1G").unwrap(),
            (SizeArg::Absolute(1 << 30), true)
        );
        assert_eq!(
            parse_size_arg("+1G").unwrap(),
            (SizeArg::Plus(1 << 30), true)
        );
        assert_eq!(
            parse_size_arg("-512M").unwrap(),
            (SizeArg::Minus(512 << 20), true)
        );
        assert_eq!(
            parse_size_arg("+1.5G").unwrap(),
            (SizeArg::Plus(3 << 29), true)
        );
        assert_eq!(
            parse_size_arg("+0.1K").unwrap(),
            (SizeArg::Plus(103), false)
        );
        assert!(parse_size_arg("+x").is_err());
        assert!(parse_size_arg("--1G").is_err());
        let img = Path::new("d.vhdx");
        assert_eq!(
            target(img, 1 << 20, "+1000", 512).unwrap(),
            (1 << 20) + 1024
        );
        assert_eq!(
            target(img, 1 << 20, "+1000", 4096).unwrap(),
            (1 << 20) + 4096
        );
        assert_eq!(target(img, 1 << 20, "-0.1K", 512).unwrap(), 1 << 20);
        assert_eq!(target(img, 1 << 20, "1.5M", 512).unwrap(), 3 << 19);
        assert!(target(img, 1 << 20, "-1M", 512).is_err());
        assert!(target(img, 1 << 20, "-2M", 512).is_err());
        assert_eq!(target(img, 1024, "-512", 512).unwrap(), 512);
        assert!(target(img, 1024, "-1K", 512).is_err());
        assert!(target(img, u64::MAX, "+1", 512).is_err());
    }
}
