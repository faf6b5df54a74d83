//! The one error type shared by the disk layer and the format crates built on it.
//!
//! Every error says which file it is about; corruption errors also name the
//! on-disk structure and the absolute file offset where it was found.

use std::fmt;
use std::io;

/// Broad class of an [`Error`], for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image contradicts its format specification.
    Corrupt,
    /// The image is valid but uses something this library does not implement.
    Unsupported,
    /// The operating system reported an I/O failure.
    Io,
    /// The caller asked for something impossible (bad range, bad option...).
    InvalidInput,
    /// Another open (in this process or another, vdisk's or QEMU's) holds
    /// the image in a way this open may not share; see [`crate::lock`].
    Locked,
}

/// Errors of the disk layer and of the format drivers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A structure failed validation.
    #[error("{}corrupt {structure} at offset {offset:#x}: {msg}", file_prefix(.file))]
    Corrupt {
        /// File name (empty until [`Error::in_file`] fills it in).
        file: String,
        /// The on-disk structure, e.g. "VHDX header".
        structure: &'static str,
        /// Absolute offset in the file (relative to the structure until [`Error::in_file`]).
        offset: u64,
        /// What is wrong.
        msg: String,
    },
    /// A feature the image needs is not implemented.
    #[error("{}unsupported: {msg}", file_prefix(.file))]
    Unsupported {
        /// File name.
        file: String,
        /// What is unsupported.
        msg: String,
    },
    /// An I/O failure.
    #[error("{}{context}: {os_error}", file_prefix(.file))]
    Io {
        /// File name.
        file: String,
        /// What we were doing.
        context: String,
        /// The OS error (part of the message, so not also a `source()`:
        /// `{:#}` chains would print it twice).
        os_error: io::Error,
    },
    /// The image is in use: its image lock refuses this open.
    #[error("{}{msg}", file_prefix(.file))]
    Locked {
        /// File name.
        file: String,
        /// Which permission was refused, and who holds the image.
        msg: String,
    },
    /// Bad arguments from the caller.
    #[error("{}{msg}", file_prefix(.file))]
    InvalidInput {
        /// File name (may be empty).
        file: String,
        /// What is wrong with the request.
        msg: String,
    },
}

fn file_prefix(file: &str) -> String {
    if file.is_empty() {
        String::new()
    } else {
        format!("{file}: ")
    }
}

/// Result alias used throughout the disk crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A corruption error for `structure` at `offset` (relative to the structure
    /// until [`Error::in_file`] rebases it).
    pub fn corrupt(structure: &'static str, offset: u64, msg: impl fmt::Display) -> Self {
        Error::Corrupt {
            file: String::new(),
            structure,
            offset,
            msg: msg.to_string(),
        }
    }

    /// An unsupported-feature error.
    pub fn unsupported(msg: impl fmt::Display) -> Self {
        Error::Unsupported {
            file: String::new(),
            msg: msg.to_string(),
        }
    }

    /// An invalid-input error.
    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::InvalidInput {
            file: String::new(),
            msg: msg.to_string(),
        }
    }

    /// An I/O error with what we were doing.
    pub fn io(context: impl fmt::Display, source: io::Error) -> Self {
        Error::Io {
            file: String::new(),
            context: context.to_string(),
            os_error: source,
        }
    }

    /// The operating-system error behind an [`ErrorKind::Io`] error.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { os_error, .. } => Some(os_error),
            _ => None,
        }
    }

    /// What is wrong, without the file (and, for corruption, the structure
    /// and offset) that the full message names.
    pub fn message(&self) -> String {
        match self {
            Error::Corrupt { msg, .. }
            | Error::Unsupported { msg, .. }
            | Error::InvalidInput { msg, .. }
            | Error::Locked { msg, .. } => msg.clone(),
            Error::Io {
                context, os_error, ..
            } => format!("{context}: {os_error}"),
        }
    }

    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::Locked { .. } => ErrorKind::Locked,
        }
    }

    /// Name the file (if not yet named) and rebase a structure-relative
    /// corruption offset by `base` (the structure's offset in the file).
    pub fn in_file(mut self, name: &str, base: u64) -> Self {
        match &mut self {
            Error::Corrupt { file, offset, .. } => {
                if file.is_empty() {
                    *file = name.to_string();
                    *offset = offset.saturating_add(base);
                }
            }
            Error::Unsupported { file, .. }
            | Error::Io { file, .. }
            | Error::InvalidInput { file, .. }
            | Error::Locked { file, .. } => {
                if file.is_empty() {
                    *file = name.to_string();
                }
            }
        }
        self
    }
}

/// Attach file names to errors in a `Result`.
pub trait ResultExt<T> {
    /// See [`Error::in_file`].
    fn in_file(self, name: &str, base: u64) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn in_file(self, name: &str, base: u64) -> Result<T> {
        self.map_err(|e| e.in_file(name, base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_error_names_file_structure_and_absolute_offset() {
        let e = Error::corrupt("VHDX header", 4, "bad signature").in_file("a.vhdx", 0x10000);
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(
            e.to_string(),
            "a.vhdx: corrupt VHDX header at offset 0x10004: bad signature"
        );
        // A second in_file does not rebase again.
        let e = e.in_file("b.vhdx", 0x100);
        assert!(e
            .to_string()
            .starts_with("a.vhdx: corrupt VHDX header at offset 0x10004"));
    }
}
