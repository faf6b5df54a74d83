//! VHDX
pub use disk::{Error, ErrorKind, Result};
