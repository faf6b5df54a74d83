//! Microsoft VHD (Virtual Hard Disk Image Format Specification, 2006).
#![forbid(unsafe_code)]

pub use disk::{Error, ErrorKind, Result};
