//! A catalogue of hostile images (issue 16 item 2): each case builds a
//! damaged or malicious image from a valid one the library creates, patching
//! bytes (and recomputing a checksum where the point is to get past it to
//! the next check), then opens it through the front door (`image::open`,
//! probing and with the format given; chains through parent resolution),
//! reads its first and last MiB and closes it. Each asserts the outcome:
//! an error of a given kind whose message names the file (and, for
//! corruption, the structure and the offset where the code knows them), or,
//! where the specification or Windows says the damage is to be ignored, a
//! successful open that reads the right data. Never a panic, never a hang.
//!
//! Memory: a counting global allocator (this test binary only) measures
//! the live heap of the thread running each case; every open + read of the
//! first and last MiB + close must stay within [`harness::BOUND`] of where
//! it started (see there for why that bound).
//!
//! Modules by what they damage: `vhdx` (headers, region tables, metadata,
//! BAT), `vhdx_log` (the metadata log), `differencing` (sector bitmaps of
//! differencing VHDX), `vhd`, `chain` (parents of either format),
//! `truncation` (files cut at every structure boundary),
//! `partition` (partition tables inside a valid image).
// Test data: sizes and offsets of small test images (they fit any integer
// type), patterns and field values.
#![allow(clippy::cast_possible_truncation)]

mod harness;

mod chain;
mod differencing;
mod partition;
mod truncation;
mod vhd;
mod vhdx;
mod vhdx_log;

#[global_allocator]
static ALLOC: harness::Counting = harness::Counting;
