//! Format-specific creation options (`-o key=value,key=value`).

use crate::open::Format;
use crate::size::parse_size_u32;
use anyhow::{bail, Context, Result};
use vhdx::CreateOptions;

/// Options every VHDX creation accepts.
const VHDX_KEYS: &str =
    "subformat, block_size, logical_sector_size, physical_sector_size, log_size";
/// Options every VHD creation accepts.
const VHD_KEYS: &str = "subformat, block_size, azure";

/// What to create: the format with its parsed options.
#[derive(Debug, Clone)]
pub enum Target {
    /// A raw image (no options).
    Raw,
    /// A VHDX image.
    Vhdx(CreateOptions),
    /// A VHD image.
    Vhd(vhd::CreateOptions),
}

/// Split `-o` arguments (each a comma-separated list) into key/value pairs.
pub fn split(options: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in options.iter().flat_map(|o| o.split(',')) {
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            bail!("option '{item}' needs a value (key=value)");
        };
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// Parse the `-o` options for creating a `format` image of `size` bytes.
pub fn target(format: Format, size: u64, options: &[String]) -> Result<Target> {
    let kv = split(options)?;
    match format {
        Format::Raw => {
            if let Some((k, _)) = kv.first() {
                bail!("unknown option '{k}' for format raw (raw images take no options)");
            }
            Ok(Target::Raw)
        }
        Format::Vhdx => vhdx_options(size, &kv).map(Target::Vhdx),
        Format::Vhd => vhd_options(size, &kv).map(Target::Vhd),
    }
}

/// A qemu-style boolean: on/off (also true/false, yes/no, 1/0).
fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => bail!("invalid value '{v}' for option {k} (use on or off)"),
    }
}

fn vhd_options(size: u64, kv: &[(String, String)]) -> Result<vhd::CreateOptions> {
    let mut o = vhd::CreateOptions::new(size);
    let mut subformat = None;
    let mut block_size = None;
    for (k, v) in kv {
        match k.as_str() {
            "subformat" => {
                subformat = Some(match v.as_str() {
                    "fixed" => true,
                    "dynamic" => false,
                    _ => bail!("invalid value '{v}' for option subformat (use fixed or dynamic)"),
                })
            }
            "block_size" => {
                block_size = Some(
                    parse_size_u32(v).with_context(|| format!("invalid value for option {k}"))?,
                )
            }
            "azure" => o.azure = parse_bool(k, v)?,
            _ => bail!("unknown option '{k}' for format vhd (supported: {VHD_KEYS})"),
        }
    }
    if o.azure {
        if subformat == Some(false) {
            bail!(
                "option azure=on creates a fixed VHD: it cannot be combined with subformat=dynamic"
            );
        }
        o.fixed = true;
    } else {
        o.fixed = subformat.unwrap_or(false);
    }
    if let Some(b) = block_size {
        if o.fixed {
            bail!("option block_size applies to dynamic VHDs only (a fixed VHD has no blocks)");
        }
        o.block_size = b;
    }
    Ok(o)
}

fn vhdx_options(size: u64, kv: &[(String, String)]) -> Result<CreateOptions> {
    let mut o = CreateOptions::new(size);
    for (k, v) in kv {
        let bad = || format!("invalid value for option {k}");
        match k.as_str() {
            "subformat" => {
                o.fixed = match v.as_str() {
                    "fixed" => true,
                    "dynamic" => false,
                    _ => bail!("invalid value '{v}' for option subformat (use fixed or dynamic)"),
                }
            }
            "block_size" => o.block_size = parse_size_u32(v).with_context(bad)?,
            "logical_sector_size" => o.logical_sector_size = parse_size_u32(v).with_context(bad)?,
            "physical_sector_size" => {
                o.physical_sector_size = parse_size_u32(v).with_context(bad)?
            }
            "log_size" => o.log_size = parse_size_u32(v).with_context(bad)?,
            _ => bail!("unknown option '{k}' for format vhdx (supported: {VHDX_KEYS})"),
        }
    }
    Ok(o)
}

/// The logical sector size of a new image of `target`: its virtual size
/// is a whole number of these.
pub fn sector_size(target: &Target) -> u64 {
    match target {
        Target::Vhdx(o) => u64::from(o.logical_sector_size).max(512),
        Target::Raw | Target::Vhd(_) => 512,
    }
}

/// A one-line summary like qemu-img's "Formatting ..." line.
pub fn describe(target: &Target, size: u64) -> String {
    match target {
        Target::Raw => format!("fmt=raw size={size}"),
        Target::Vhdx(o) => format!(
            "fmt=vhdx size={size} subformat={} block_size={} logical_sector_size={} \
             physical_sector_size={} log_size={}",
            if o.fixed { "fixed" } else { "dynamic" },
            o.block_size,
            o.logical_sector_size,
            o.physical_sector_size,
            o.log_size
        ),
        Target::Vhd(o) if o.fixed => format!(
            "fmt=vhd size={size} subformat=fixed azure={}",
            if o.azure { "on" } else { "off" }
        ),
        Target::Vhd(o) => format!(
            "fmt=vhd size={size} subformat=dynamic block_size={}",
            o.block_size
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    #[test]
    fn vhdx_options_parse() {
        let Target::Vhdx(o) = target(
            Format::Vhdx,
            1 << 30,
            &opts("subformat=fixed,block_size=1M,logical_sector_size=4096,physical_sector_size=512,log_size=2M"),
        )
        .unwrap() else {
            panic!("not vhdx")
        };
        assert!(o.fixed);
        assert_eq!(o.block_size, 1 << 20);
        assert_eq!(o.logical_sector_size, 4096);
        assert_eq!(o.physical_sector_size, 512);
        assert_eq!(o.log_size, 2 << 20);
    }

    #[test]
    fn bad_options_are_named() {
        let e = target(Format::Vhdx, 1 << 30, &opts("colour=blue")).unwrap_err();
        assert!(e.to_string().contains("'colour'"), "{e}");
        let e = target(Format::Raw, 1 << 30, &opts("block_size=1M")).unwrap_err();
        assert!(e.to_string().contains("'block_size'"), "{e}");
        let e = target(Format::Vhdx, 1 << 30, &opts("subformat=sparse")).unwrap_err();
        assert!(e.to_string().contains("'sparse'"), "{e}");
        let e = target(Format::Vhdx, 1 << 30, &opts("block_size")).unwrap_err();
        assert!(e.to_string().contains("'block_size'"), "{e}");
        let e = target(Format::Vhdx, 1 << 30, &opts("block_size=huge")).unwrap_err();
        assert!(format!("{e:#}").contains("'huge'"), "{e:#}");
        let e = target(Format::Vhd, 1 << 30, &opts("log_size=1M")).unwrap_err();
        assert!(e.to_string().contains("'log_size'"), "{e}");
        assert!(e.to_string().contains(VHD_KEYS), "{e}");
        let e = target(Format::Vhd, 1 << 30, &opts("azure=maybe")).unwrap_err();
        assert!(e.to_string().contains("'maybe'"), "{e}");
        let e = target(Format::Vhd, 1 << 30, &opts("azure=on,subformat=dynamic")).unwrap_err();
        assert!(e.to_string().contains("subformat=dynamic"), "{e}");
        let e = target(Format::Vhd, 1 << 30, &opts("subformat=fixed,block_size=1M")).unwrap_err();
        assert!(e.to_string().contains("block_size"), "{e}");
    }

    #[test]
    fn vhd_options_parse() {
        let vhd = |s: &str| match target(Format::Vhd, 1 << 30, &opts(s)).unwrap() {
            Target::Vhd(o) => o,
            t => panic!("not vhd: {t:?}"),
        };
        let o = vhd("");
        assert!(!o.fixed && !o.azure);
        assert_eq!(o.block_size, 2 << 20);
        let o = vhd("subformat=dynamic,block_size=512K");
        assert!(!o.fixed);
        assert_eq!(o.block_size, 512 << 10);
        assert!(vhd("subformat=fixed").fixed);
        let o = vhd("azure=on");
        assert!(o.fixed && o.azure);
        let o = vhd("subformat=fixed,azure=off");
        assert!(o.fixed && !o.azure);
    }
}
