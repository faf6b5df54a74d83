//! What the `vdisk` and `vmm` binaries share: parsing and printing byte
//! sizes. (The binaries themselves are `src/main.rs` and
//! `src/bin/vmm/main.rs`.)

pub mod size;
