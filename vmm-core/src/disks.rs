//! Opening the images the virtio-blk devices serve, through the library's
//! front door ([`image::open`]), with the image locks it takes.
//!
//! # How a disk's format is chosen
//!
//! The format is the one given (`--format`, or `format=` in the disk's own
//! options); without one, it is probed from the file's content once, at
//! open ([`image::probe()`]): a VHDX signature ("vhdxfile" at offset 0)
//! makes it a VHDX, a VHD footer cookie ("conectix" in the last 512 bytes
//! or at offset 0) a VHD, a name ending in `.vhdx`/`.avhdx`/`.vhd`/`.avhd`
//! without the signature is refused as damaged, and anything else is raw —
//! a *guarded* raw disk: the guest cannot write its first sector (bytes
//! 0-511), nor put a VHD footer cookie at the start of its last 512 (or
//! 511) bytes; such writes fail with VIRTIO_BLK_S_IOERR.
//!
//! Why: probing is only safe for files whose content the guest does not
//! control. A guest can write anything to a raw disk, including a VHD
//! footer in its last sector or "vhdxfile" at its start; the next probe
//! would then open the file as a VHD or VHDX — a differencing one whose
//! parent locators the guest wrote — and the VMM would read host files the
//! guest named into the guest (the footer attack). The guard makes a
//! probed raw disk unable to change what the next probe says. A raw disk a
//! guest must write whole (a partition table in sector 0) is given as raw:
//! `--format raw` or `--disk FILE,format=raw`, and then never probed.
//! VHD and VHDX files are safe to probe: the guest writes their blocks,
//! never their headers or footer.
//!
//! A directory holding a checkpoint bundle ([`checkpoint::Bundle`]) is
//! served as the bundle's active disk (in the bundle's format), the
//! bundle held (its directory lock) for the whole run so that no
//! checkpoint operation changes the chain under the guest.

use crate::qos::{Limits, Qos};
use crate::{Error, Result};
use disk::VirtualDisk;
use image::{Format, Image, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

/// A disk to serve, as `vmm run --disk` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file, or a checkpoint bundle's directory.
    pub path: PathBuf,
    /// Serve it read-only (VIRTIO_BLK_F_RO; writes fail).
    pub read_only: bool,
    /// Its format; `None` to probe (see the module docs).
    pub format: Option<Format>,
    /// Its QoS limits (`iops=N`, `bps=N`; none by default).
    pub qos: Limits,
}

impl DiskSpec {
    /// Parse `PATH[,ro][,format=FMT][,iops=N][,bps=N]` (the `--disk`
    /// argument). IOPS count 8 KiB units, as Hyper-V's Storage QoS does
    /// ([`crate::qos`]); `bps` takes a K, M or G suffix (powers of 1024).
    ///
    /// # Errors
    /// An unknown option or format.
    pub fn parse(s: &str) -> std::result::Result<DiskSpec, String> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("'{s}': no image path"));
        }
        let mut spec = DiskSpec {
            path: PathBuf::from(path),
            read_only: false,
            format: None,
            qos: Limits::default(),
        };
        for p in parts {
            match p.split_once('=') {
                None if p == "ro" => spec.read_only = true,
                None if p == "rw" => spec.read_only = false,
                Some(("format", f)) => spec.format = Some(Format::parse(f)?),
                Some(("iops", v)) => spec.qos.iops = Some(rate(s, "iops", v)?),
                Some(("bps", v)) => spec.qos.bps = Some(rate(s, "bps", v)?),
                _ => {
                    return Err(format!(
                        "'{s}': unknown disk option '{p}' (known: ro, rw, format=raw|vhdx|vhd, \
                         iops=N, bps=N)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// A QoS rate: a positive whole number, K/M/G (powers of 1024) allowed.
fn rate(spec: &str, what: &str, v: &str) -> std::result::Result<u64, String> {
    let (digits, scale) = match v.char_indices().last() {
        Some((i, 'k' | 'K')) => (&v[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&v[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("'{spec}': {what}={v} is not a positive whole number"))
}

/// An open disk, and what must stay held while it is served.
pub struct OpenDisk {
    /// What the spec named.
    pub spec: DiskSpec,
    /// The open image.
    pub image: Image,
    /// The bundle whose active disk this is (held for its directory lock).
    pub bundle: Option<checkpoint::Bundle>,
}

impl OpenDisk {
    /// The disk to serve.
    pub fn disk(&self) -> Arc<dyn VirtualDisk> {
        self.image.disk().clone()
    }

    /// The QoS limits its spec gives, shared with the device (`None`
    /// without limits).
    pub fn qos(&self) -> Option<Arc<Qos>> {
        self.spec
            .qos
            .any()
            .then(|| Arc::new(Qos::new(self.spec.qos)))
    }

    /// A name for messages: the file served.
    pub fn name(&self) -> String {
        self.image.storage().name().to_string()
    }
}

/// Open the disk `spec` names, `default_format` applying when the spec
/// gives none.
///
/// # Errors
/// The file is missing, locked by another process (the message names it),
/// damaged, or a probe refuses it; a bundle that cannot be opened.
pub fn open(spec: &DiskSpec, default_format: Option<Format>) -> Result<OpenDisk> {
    let mut spec = spec.clone();
    if spec.format.is_none() {
        spec.format = default_format;
    }
    let (path, format, bundle) = if spec.path.is_dir() {
        if !spec.path.join(checkpoint::MANIFEST).exists() {
            return Err(Error::Config(format!(
                "{}: a directory, but not a checkpoint bundle (no {})",
                spec.path.display(),
                checkpoint::MANIFEST
            )));
        }
        let b = checkpoint::Bundle::open(&spec.path)?;
        let f = b.manifest().format.image();
        if let Some(given) = spec.format.filter(|g| *g != f) {
            return Err(Error::Config(format!(
                "{}: the bundle's disks are {}, not {given}",
                spec.path.display(),
                f.describe()
            )));
        }
        (b.active_path(), Some(f), Some(b))
    } else {
        (spec.path.clone(), spec.format, None)
    };
    let opts = OpenOptions {
        format,
        writable: !spec.read_only,
        ..OpenOptions::probing()
    };
    let image = image::open(&path, &opts)?;
    Ok(OpenDisk {
        spec,
        image,
        bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = DiskSpec::parse("a.vhdx").unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.read_only, d.format),
            ("a.vhdx", false, None)
        );
        let d = DiskSpec::parse("/x/b.img,ro,format=raw").unwrap();
        assert_eq!((d.read_only, d.format), (true, Some(Format::Raw)));
        assert!(DiskSpec::parse("a,format=qcow2")
            .unwrap_err()
            .contains("qcow2"));
        assert!(DiskSpec::parse("a,bogus")
            .unwrap_err()
            .contains("unknown disk option 'bogus'"));
        assert!(DiskSpec::parse(",ro").is_err());
        let d = DiskSpec::parse("a.vhd,iops=500,bps=10M").unwrap();
        assert_eq!(
            d.qos,
            Limits {
                iops: Some(500),
                bps: Some(10 << 20)
            }
        );
        for bad in ["a,iops=0", "a,iops=x", "a,bps=1.5M", "a,bps=99999999999G"] {
            let e = DiskSpec::parse(bad).unwrap_err();
            assert!(e.contains("not a positive whole number"), "{e}");
        }
    }
}
