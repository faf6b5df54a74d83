//! What the `vdisk` and `vmm` binaries share: parsing and printing byte
//! sizes, and the client of vmm's control API. (The binaries themselves are `src/main.rs` and
//! `src/bin/vmm/main.rs`.)

pub mod size;
pub mod vmm_api;
