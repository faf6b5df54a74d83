//! Parsing and printing byte sizes: `512`, `64K`, `1.5G`, `2GiB`, `1tb`...

use anyhow::{anyhow, bail, Result};

/// The usual reminder of what a size looks like.
const FORM: &str = "expected a number of bytes with an optional K, M, G or T suffix, e.g. \
                    512, 64K, 1.5G";

/// A parsed size: `bytes` rounded up to a whole byte; `whole` says whether
/// the text named a whole number of bytes (`1.3K` is 1331.2 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    bytes: u64,
    whole: bool,
}

/// Parse a size: a decimal number, possibly with a fraction (`1.5`), and an
/// optional K, M, G or T suffix (powers of 1024, case-insensitive,
/// optionally followed by "B" or "iB"). A bare "B" suffix means bytes.
fn parse(s: &str) -> Result<Parsed> {
    let bad = |why: &str| anyhow!("invalid size '{s}': {why}");
    if s.starts_with('-') {
        return Err(bad("a size cannot be negative"));
    }
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at(int_len);
    let (frac, suffix) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(r.bytes().take_while(u8::is_ascii_digit).count()),
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad(FORM));
    }
    if rest.starts_with('.') && frac.is_empty() {
        return Err(bad("a decimal point needs digits after it"));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(bad(&format!(
                "unknown suffix '{suffix}' (use K, M, G or T: powers of 1024)"
            )))
        }
    };
    let too_large = || bad("too large (the limit is 2^64 - 1 bytes, 16 EiB)");
    // Trailing zeros of the fraction change nothing; more digits than
    // this cannot matter to a count of bytes below 2^64 (2^40 * 10^-19 is
    // far below one byte) but would overflow the arithmetic.
    let frac = frac.trim_end_matches('0');
    let digits = u32::try_from(frac.len())
        .ok()
        .filter(|&d| d <= 19)
        .ok_or_else(|| bad("too many digits after the decimal point"))?;
    // The value is (int * 10^f + frac) * 2^shift / 10^f, in u128.
    let scale = 10u128.pow(digits);
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().map_err(|_| too_large())?.into()
    };
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| too_large())?
    };
    let num = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(1u128 << shift))
        .ok_or_else(too_large)?;
    let bytes = u64::try_from(num.div_ceil(scale)).map_err(|_| too_large())?;
    Ok(Parsed {
        bytes,
        whole: num % scale == 0,
    })
}

/// Parse a size that must be a whole number of bytes (offsets, lengths,
/// option values): `1.5K` is 1536, `1.3K` (1331.2 bytes) is refused.
pub fn parse_size(s: &str) -> Result<u64> {
    let p = parse(s)?;
    if !p.whole {
        bail!("invalid size '{s}': not a whole number of bytes");
    }
    Ok(p.bytes)
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

/// Parse a size, fractions of a byte allowed: the bytes (rounded up) and
/// whether they are whole. For sizes that are rounded up to whole sectors
/// afterwards ([`round_to_sectors`]).
pub fn parse_size_ceil(s: &str) -> Result<(u64, bool)> {
    let p = parse(s)?;
    Ok((p.bytes, p.whole))
}

/// The virtual size of an image given as `s` (the argument `what`): a
/// size, fractions allowed, rounded up to a whole number of `sector`-byte
/// sectors (as qemu-img rounds a new image up to whole 512-byte sectors),
/// and the note saying so when it was not one.
pub fn image_size_note(what: &str, s: &str, sector: u64) -> Result<(u64, Option<String>)> {
    let p = parse(s).map_err(|e| anyhow!("invalid {what}: {e}"))?;
    round_to_sectors(what, s, p.bytes, p.whole, sector)
}

/// `bytes` (from the text `s`; `whole` unless a fraction of a byte was
/// asked for) rounded up to whole `sector`s, with the note when rounded.
pub fn round_to_sectors(
    what: &str,
    s: &str,
    bytes: u64,
    whole: bool,
    sector: u64,
) -> Result<(u64, Option<String>)> {
    let sector = sector.max(1);
    let rounded = bytes
        .checked_next_multiple_of(sector)
        .ok_or_else(|| anyhow!("invalid {what}: '{s}' is too large"))?;
    if rounded == bytes && whole {
        return Ok((bytes, None));
    }
    let asked = if whole {
        format!("{bytes} bytes")
    } else {
        "not a whole number of bytes".to_string()
    };
    Ok((
        rounded,
        Some(format!(
            "{what} {s} ({asked}) rounded up to {rounded} bytes, a whole number of \
             {sector}-byte sectors"
        )),
    ))
}

/// [`image_size_note`], printing the note on stderr.
pub fn image_size(what: &str, s: &str, sector: u64) -> Result<u64> {
    let (size, note) = image_size_note(what, s, sector)?;
    if let Some(n) = note {
        eprintln!("vdisk: note: {n}");
    }
    Ok(size)
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
    fn parses_fractions() {
        assert_eq!(parse_size("1.5G").unwrap(), 1_610_612_736);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size(".5M").unwrap(), 512 << 10);
        assert_eq!(parse_size("2.25MiB").unwrap(), (2 << 20) + (1 << 18));
        assert_eq!(parse_size("1.000K").unwrap(), 1024);
        assert_eq!(parse_size("3.0").unwrap(), 3);
        assert_eq!(
            parse_size("0.0000000000000000000000001T")
                .unwrap_err()
                .to_string(),
            "invalid size '0.0000000000000000000000001T': too many digits after the decimal point"
        );
        // A fraction of a byte is no whole number of bytes.
        for s in ["1.3K", "1.5", "0.1", "1.0000001G"] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains("not a whole number of bytes"), "{s}: {e}");
        }
        assert_eq!(
            parse("1.3K").unwrap(),
            Parsed {
                bytes: 1332,
                whole: false
            }
        );
        // Right at the limit and past it.
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        // 2^64 bytes is 16777216T.
        assert_eq!(parse_size("16777215T").unwrap(), u64::MAX - (1 << 40) + 1);
        assert_eq!(
            parse("16777215.99999999999T").unwrap(),
            Parsed {
                bytes: u64::MAX - 9,
                whole: false
            }
        );
        for big in [
            "18446744073709551616",
            "16777216T",
            "16777215.9999999999999999999T",
        ] {
            let e = parse_size(big).unwrap_err().to_string();
            assert!(e.contains("too large"), "{big}: {e}");
        }
    }

    #[test]
    fn rejects_bad_sizes_naming_them() {
        for (bad, why) in [
            ("", "expected a number"),
            ("K", "expected a number"),
            (".", "expected a number"),
            ("-1", "cannot be negative"),
            ("-1.5G", "cannot be negative"),
            ("1.G", "digits after it"),
            ("1..5G", "digits after it"),
            ("1.5.5G", "unknown suffix '.5G'"),
            ("12X", "unknown suffix 'X'"),
            ("1 G", "unknown suffix ' G'"),
            ("1e9", "unknown suffix 'e9'"),
            ("1KK", "unknown suffix"),
            ("1Bi", "unknown suffix"),
            ("0x10", "unknown suffix"),
            ("99999999999T", "too large"),
            ("99999999999999999999", "too large"),
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse_size_u32("4G").is_err());
        assert_eq!(parse_size_u32("4K").unwrap(), 4096);
        let e = parse_arg("OFFSET", "1.3K").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid OFFSET: invalid size '1.3K': not a whole number of bytes"
        );
    }

    #[test]
    fn image_sizes_round_up_to_whole_sectors() {
        assert_eq!(
            image_size_note("SIZE", "1.5G", 512).unwrap(),
            (3 << 29, None)
        );
        assert_eq!(
            image_size_note("SIZE", "64M", 4096).unwrap(),
            (64 << 20, None)
        );
        let (n, note) = image_size_note("SIZE", "1000", 512).unwrap();
        assert_eq!(n, 1024);
        assert_eq!(
            note.unwrap(),
            "SIZE 1000 (1000 bytes) rounded up to 1024 bytes, a whole number of 512-byte sectors"
        );
        let (n, note) = image_size_note("SIZE", "1.3K", 512).unwrap();
        assert_eq!(n, 1536);
        assert!(note
            .unwrap()
            .contains("(not a whole number of bytes) rounded up to 1536"));
        // A VHDX with 4096-byte logical sectors.
        let (n, note) = image_size_note("SIZE", "1.1M", 4096).unwrap();
        assert_eq!(n, 1_155_072);
        assert!(note.unwrap().contains("4096-byte sectors"));
        assert_eq!(image_size_note("SIZE", "0", 512).unwrap(), (0, None));
        let e = image_size_note("SIZE", "18446744073709551615", 512).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = image_size_note("SIZE", "-5G", 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid SIZE: invalid size '-5G': a size cannot be negative"
        );
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
