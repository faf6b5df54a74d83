//! Telling an image's format from its content, never taking a damaged VHDX
//! or VHD for a raw image: the one detection `vdisk` and the chain code
//! share.
//!
//! A file is a VHDX when it starts with "vhdxfile" (the file type
//! identifier, MS-VHDX 2.2.1); a VHD when it starts with "conectix" (the
//! footer copy of dynamic and differencing disks) or its last 512 bytes do
//! (the footer; 511 for images made before Virtual PC 2004, whose footer
//! is one byte short). Anything else is no VHDX or VHD, unless its name
//! says it is one (`.vhdx`, `.avhdx`, `.vhd`, `.avhd`, any case, as Windows
//! picks the format by extension): such a file is damaged, not raw, and
//! [`sniff`] refuses it as corrupt, listing what survives of either format
//! ([`vhdx::probe`], [`vhd::probe`]) so that the error says what there is
//! to recover.

use crate::Format;
use disk::{Error, LockMode, Opener, Result, Storage};
use std::path::Path;

/// VHDX file type identifier signature (MS-VHDX 2.2.1).
const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// VHD footer cookie.
const VHD_COOKIE: &[u8; 8] = b"conectix";
/// The VHD footer, and its size in images made before Virtual PC 2004.
const VHD_FOOTER: u64 = 512;
const VHD_OLD_FOOTER: usize = 511;

/// The format of the file at `path` by its content (see the module docs):
/// `Some` for a VHDX or VHD signature, `None` for a file with neither whose
/// name claims no format (a raw image, for a caller that has one).
///
/// # Errors
/// The file cannot be read; [`crate::ErrorKind::Corrupt`] when the name
/// claims VHDX or VHD but the signature is missing: the message names the
/// file, the first 8 bytes, and what survives of either format.
pub fn sniff(path: &Path, opener: &dyn Opener) -> Result<Option<Format>> {
    // No image lock: detection only looks, and the open that follows
    // takes the lock.
    let st = opener.open(path, false, LockMode::Off)?;
    let len = st.len()?;
    let mut head = vec![0u8; len.min(8) as usize];
    st.read_at(&mut head, 0)?;
    if head == VHDX_SIGNATURE {
        return Ok(Some(Format::Vhdx));
    }
    if head == VHD_COOKIE {
        return Ok(Some(Format::Vhd));
    }
    if len >= VHD_OLD_FOOTER as u64 {
        let n = len.min(VHD_FOOTER);
        let mut tail = vec![0u8; n as usize];
        st.read_at(&mut tail, len - n)?;
        let old = tail.len() - VHD_OLD_FOOTER;
        if (n == VHD_FOOTER && tail.starts_with(VHD_COOKIE)) || tail[old..].starts_with(VHD_COOKIE)
        {
            return Ok(Some(Format::Vhd));
        }
    }
    let Some(claim) = Format::claimed_by(path) else {
        return Ok(None);
    };
    let mut found = vhdx::probe::traces(&*st);
    found.extend(vhd::probe::traces(&*st));
    let found = if found.is_empty() {
        "no VHDX or VHD structure found".to_string()
    } else {
        format!("found: {}", found.join("; "))
    };
    let first = if len < 8 {
        format!("it is {len} bytes long")
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("its first 8 bytes are {}", hex.join(" "))
    };
    let err = match claim {
        Format::Raw => return Ok(None),
        Format::Vhdx => Error::corrupt(
            "VHDX file identifier",
            0,
            format!(
                "the name says VHDX, but the file does not start with the signature \
                 \"vhdxfile\" ({first}); {found}"
            ),
        ),
        Format::Vhd => Error::corrupt(
            "VHD footer",
            len.saturating_sub(VHD_FOOTER),
            format!(
                "the name says VHD, but neither its last 512 bytes nor its first 512 start with \
                 the cookie \"conectix\" ({first}); {found}"
            ),
        ),
    };
    Err(err.in_file(st.name(), 0))
}

/// The format of the file at `path` by its content: [`sniff`], and raw for
/// a file with no VHDX or VHD signature whose name claims neither.
///
/// Probing is for files whose content the caller trusts. A VMM must not
/// probe a disk a guest writes: a raw disk whose guest wrote a VHD footer
/// into its last sector (or "vhdxfile" at its start) would be taken for a
/// VHD (or VHDX) at the next probe, and the disk would then follow parent
/// paths the guest chose, reading host files into the guest. Give the
/// format instead ([`crate::OpenOptions::new`]).
///
/// # Errors
/// As [`sniff`].
pub fn probe(path: &Path, opener: &dyn Opener) -> Result<Format> {
    Ok(sniff(path, opener)?.unwrap_or(Format::Raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::{ErrorKind, FileOpener};

    #[test]
    fn signatures_names_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, b: &[u8]| {
            let p = dir.path().join(n);
            std::fs::write(&p, b).unwrap();
            p
        };
        let mut fixed = vec![0u8; 4096];
        fixed[4096 - 512..4096 - 504].copy_from_slice(VHD_COOKIE);
        let mut old = vec![0u8; 4095];
        old[4095 - 511..4095 - 503].copy_from_slice(VHD_COOKIE);
        assert_eq!(
            sniff(&w("x.img", b"vhdxfile.."), &FileOpener).unwrap(),
            Some(Format::Vhdx)
        );
        assert_eq!(
            sniff(&w("y.vhdx", b"conectix"), &FileOpener).unwrap(),
            Some(Format::Vhd)
        );
        assert_eq!(
            sniff(&w("f.img", &fixed), &FileOpener).unwrap(),
            Some(Format::Vhd)
        );
        assert_eq!(
            sniff(&w("o.vhd", &old), &FileOpener).unwrap(),
            Some(Format::Vhd)
        );
        assert_eq!(sniff(&w("z.img", &[0u8; 4096]), &FileOpener).unwrap(), None);
        assert_eq!(sniff(&w("empty", &[]), &FileOpener).unwrap(), None);
        for (n, what) in [("z.vhdx", "VHDX file identifier"), ("z.avhd", "VHD footer")] {
            let p = w(n, &[0u8; 4096]);
            let e = sniff(&p, &FileOpener).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{}: corrupt {what}", p.display())),
                "{msg}"
            );
            assert!(msg.contains("00 00 00 00 00 00 00 00"), "{msg}");
            assert!(msg.contains("no VHDX or VHD structure found"), "{msg}");
        }
        let e = sniff(&w("tiny.vhd", b"abc"), &FileOpener)
            .unwrap_err()
            .to_string();
        assert!(e.contains("it is 3 bytes long"), "{e}");
        assert!(sniff(&dir.path().join("missing.vhdx"), &FileOpener).is_err());
    }
}
