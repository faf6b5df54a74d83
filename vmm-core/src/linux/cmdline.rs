//! The kernel command line (boot.rst, "The kernel command line"): what the
//! user gave, with the VMM's defaults added where the user said nothing.
//!
//! The rule: each default is added, before any `--` (after which the
//! arguments are init's), unless the user's line already has a parameter
//! of that name:
//!
//! - `console=ttyS0`: the kernel's messages go to the UART, that is to the
//!   VMM's console (unless some `console=` is given);
//! - `panic=-1`: a kernel panic reboots at once, which ends the run (a
//!   reboot is a triple fault to the VMM), rather than hang until the
//!   timeout (unless some `panic=` is given).
//!
//! The result, NUL included, must fit in what the kernel accepts: its
//! setup header's `cmdline_size` + 1 for a bzImage (protocol 2.06+),
//! 2048 bytes (x86's COMMAND_LINE_SIZE) for an ELF kernel, and never more
//! than [`CMDLINE_MAX`].

use crate::layout::CMDLINE_MAX;
use linux_loader::cmdline::Cmdline;

/// The defaults: (parameter name, what is added).
pub const DEFAULTS: [(&str, &str); 2] = [("console", "console=ttyS0"), ("panic", "panic=-1")];

/// The most an ELF kernel (no setup header) is given, NUL included.
pub const ELF_CMDLINE_SIZE: u64 = 2048;

/// Whether `line`'s boot arguments (before `--`) have a parameter named
/// `name` (`name=...` or `name` alone).
fn has_param(line: &str, name: &str) -> bool {
    line.split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == name || w.strip_prefix(name).is_some_and(|r| r.starts_with('=')))
}

/// The command line for `user` with the defaults, of at most `capacity`
/// bytes with its NUL; an error message (without the file's name) if it
/// is too long or not a valid command line.
pub fn build(user: &str, capacity: u64) -> Result<Vec<u8>, String> {
    let capacity = capacity.min(CMDLINE_MAX);
    let cap = usize::try_from(capacity).unwrap_or(usize::MAX);
    let too_long = |len: usize| {
        format!(
            "the kernel command line is {len} bytes with the VMM's defaults; the kernel accepts at \
             most {} (its cmdline_size)",
            capacity.saturating_sub(1)
        )
    };
    if let Some(c) = user
        .chars()
        .find(|c| !c.is_ascii() || (c.is_ascii_control() && !c.is_ascii_whitespace()))
    {
        return Err(format!(
            "the kernel command line {user:?} has {c:?}: only printable ASCII is allowed"
        ));
    }
    // Checked first against a capacity that cannot be the limit, so that a
    // long line is reported as such rather than as linux-loader's error.
    let mut cl = Cmdline::try_from(user.trim(), user.len() + 1 + 64)
        .map_err(|e| format!("the kernel command line {user:?}: {e}"))?;
    for (name, param) in DEFAULTS {
        if !has_param(user, name) {
            cl.insert_str(param)
                .map_err(|e| format!("the kernel command line: {e}"))?;
        }
    }
    let line = cl
        .as_cstring()
        .map_err(|e| format!("the kernel command line {user:?}: {e}"))?;
    let bytes = line.into_bytes_with_nul();
    if bytes.len() > cap {
        return Err(too_long(bytes.len() - 1));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(user: &str) -> String {
        let b = build(user, 2048).unwrap();
        assert_eq!(b.last(), Some(&0));
        String::from_utf8(b[..b.len() - 1].to_vec()).unwrap()
    }

    #[test]
    fn defaults_only_where_the_user_said_nothing() {
        assert_eq!(s(""), "console=ttyS0 panic=-1");
        assert_eq!(s("root=/dev/vda"), "root=/dev/vda console=ttyS0 panic=-1");
        assert_eq!(s("console=hvc0 quiet"), "console=hvc0 quiet panic=-1");
        assert_eq!(
            s("panic=5 console=ttyS0,115200"),
            "panic=5 console=ttyS0,115200"
        );
        // A name that only starts like a default's is no such parameter.
        assert_eq!(s("consoleblank=0"), "consoleblank=0 console=ttyS0 panic=-1");
        // The defaults go before init's arguments, and init's own
        // `console=` does not count.
        assert_eq!(
            s("ro -- console=x"),
            "ro console=ttyS0 panic=-1 -- console=x"
        );
    }

    #[test]
    fn too_long_or_invalid() {
        let long = "a".repeat(3000);
        let e = build(&long, 2048).unwrap_err();
        assert!(
            e.contains("3023 bytes") && e.contains("at most 2047"),
            "{e}"
        );
        // Exactly at the limit, NUL included.
        let fits = "b".repeat(2047 - " console=ttyS0 panic=-1".len());
        assert_eq!(build(&fits, 2048).unwrap().len(), 2048);
        let over = format!("{fits}b");
        assert!(build(&over, 2048).is_err());
        // The VMM's own limit wins over a larger cmdline_size.
        assert!(build(&"c".repeat(70000), 1 << 20)
            .unwrap_err()
            .contains("at most 65535"));
        assert!(build("a\u{e9}", 2048).is_err(), "not ASCII");
    }
}
