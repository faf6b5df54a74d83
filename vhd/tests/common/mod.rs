//! Helpers for the vhd integration tests: the shared ones from `disk::testing`.
#![allow(dead_code, unused_imports)]

pub use disk::testing::*;

pub const MIB: u64 = 1 << 20;
