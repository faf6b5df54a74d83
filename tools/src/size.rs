//! Parsing and printing byte sizes: `512`, `64K`, `1M`, `2GiB`, `1tb`...

use anyhow::{anyhow, bail, Result};

/// Parse a size: a decimal number of bytes with an optional K, M, G or T
/// suffix (powers of 1024, case-insensitive, optionally followed by "B" or
/// "iB"). A bare "B" suffix means bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, suffix) = s.split_at(digits);
    if num.is_empty() {
        bail!(
            "invalid size '{s}': expected a number of bytes with an optional K, M, G or T suffix"
        );
    }
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size '{s}': the number is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => bail!("invalid size '{s}': unknown suffix '{suffix}' (use K, M, G or T)"),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow!("invalid size '{s}': more than 2^64 bytes"))
}

/// Parse the command-line argument `what` (e.g. "OFFSET") as a size.
pub fn parse_arg(what: &str, s: &str) -> Result<u64> {
    parse_size(s).map_err(|e| anyhow!("invalid {what}: {e}"))
}

/// Parse a size that must fit in a `u32` (sector, block and log sizes).
pub fn parse_size_u32(s: &str) -> Result<u32> {
    let v = parse_size(s)?;
    u32::try_from(v).map_err(|_| anyhow!("invalid size '{s}': must be below 4 GiB"))
}

/// A size for people, like qemu-img: "64 MiB", "1.5 GiB", "512 B".
pub fn human(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && v >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{v} B");
    }
    let div = 1u64 << (10 * unit);
    if v & (div - 1) == 0 {
        return format!("{} {}", v / div, UNITS[unit]);
    }
    let s = format!("{:.3}", v as f64 / div as f64);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[unit])
}

/// A size for people with the exact byte count: "64 MiB (67108864 bytes)".
pub fn human_exact(v: u64) -> String {
    format!("{} ({v} bytes)", human(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64mib").unwrap(), 64 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1tib").unwrap(), 1 << 40);
    }

    #[test]
    fn rejects_bad_sizes_naming_them() {
        for bad in [
            "",
            "K",
            "-1",
            "1.5G",
            "12X",
            "1 G",
            "1KK",
            "1Bi",
            "99999999999T",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
        }
        assert!(parse_size_u32("4G").is_err());
        assert_eq!(parse_size_u32("4K").unwrap(), 4096);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1 KiB");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(u64::MAX), "16 EiB");
        assert_eq!(human_exact(512), "512 B (512 bytes)");
    }
}
