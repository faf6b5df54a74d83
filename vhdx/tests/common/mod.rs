//! Helpers for the vhdx integration tests: the shared ones from
//! `disk::testing`, plus what only VHDX needs.
#![allow(dead_code, unused_imports)]

pub use disk::testing::*;

/// Whether qemu-img is installed (prints a skip message when not).
pub fn have_qemu() -> bool {
    have("qemu-img")
}
