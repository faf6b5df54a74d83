//! Hostile VHDX metadata logs (MS-VHDX 2.3): entries built with the
//! library's own encoder, written into the log region of a base image whose
//! headers then name the log (LogGuid), and damaged one field at a time
//! (the entry checksum recomputed, so that the damage is what is judged).
//! A valid entry is replayed (the control case); an invalid one is no part
//! of any sequence and is ignored, as MS-VHDX 2.3.3 says; what cannot be
//! ignored is an error.

use crate::harness::*;
use disk::{ErrorKind, VirtualDisk};
use image::{Format, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vhdx::log::{LogEntry, LogOp, LOG_SECTOR};

const X: Format = Format::Vhdx;
/// The base image's log region.
const LOG: u64 = MIB;
/// Block 0's file offset in the base image.
const BLOCK0: u64 = 4 * MIB;
const GUID: Uuid = Uuid::from_u128(0x1060_1060_1060_1060_1060_1060_1060_1060);
const PAGE: u8 = 0xC3;

fn base(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = vhdx_image(dir.path(), &format!("{name}.vhdx"));
    (dir, p)
}

/// An entry writing one page of `byte` at `file_offset`.
fn entry(p: &Path, seq: u64, tail: u32, file_offset: u64, byte: u8) -> LogEntry {
    let len = file_len(p);
    LogEntry {
        sequence_number: seq,
        log_guid: GUID,
        tail,
        flushed_file_offset: len,
        last_file_offset: len,
        entry_length: 0,
        ops: vec![LogOp::Data {
            file_offset,
            page: Box::new([byte; LOG_SECTOR]),
        }],
    }
}

/// Put `bytes` at `at` in the log and point both headers at the log.
fn install(p: &Path, at: u64, bytes: &[u8]) {
    patch(p, LOG + at, bytes);
    for slot in [0, 1] {
        edit_header(p, slot, |h| h.log_guid = GUID);
    }
}

/// Recompute the checksum of the entry of `len` bytes at `at` in the log.
fn fix_entry_crc(p: &Path, at: u64, len: usize) {
    edit_vhdx_crc(p, LOG + at, len, true, |_| {});
}

/// The image opens with the log ignored: the base pattern.
fn ignored(what: &str, p: &Path) {
    opens_with_data(what, p, X);
}

#[test]
fn log_valid_entry_is_replayed() {
    // The control: the entry the other cases damage is replayed, in memory
    // by a read-only open, into the file by a writable one.
    let (_d, p) = base("lok");
    install(&p, 0, &entry(&p, 1, 0, BLOCK0, PAGE).encode());
    let r = front_door("valid log entry", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first[..LOG_SECTOR].iter().all(|&b| b == PAGE));
    assert!(r.first[LOG_SECTOR..].iter().all(|&b| b == FIRST));
    assert!(read_at(&p, BLOCK0, 4).iter().all(|&b| b == FIRST));
    let img = image::open(&p, &OpenOptions::new(X).writable()).unwrap();
    assert_eq!(img.vhdx().unwrap().info().log_entries, 1);
    img.close().unwrap();
    assert!(read_at(&p, BLOCK0, LOG_SECTOR).iter().all(|&b| b == PAGE));
}

#[test]
fn log_entry_with_bad_checksum_is_ignored() {
    let (_d, p) = base("lck");
    let mut b = entry(&p, 1, 0, BLOCK0, PAGE).encode();
    b[LOG_SECTOR + 100] ^= 1;
    install(&p, 0, &b);
    ignored("log entry bad checksum", &p);
}

#[test]
fn log_entry_with_tail_outside_the_log_is_ignored() {
    let (_d, p) = base("ltl");
    install(&p, 0, &entry(&p, 1, MIB as u32, BLOCK0, PAGE).encode());
    ignored("log Tail past the log", &p);
}

#[test]
fn log_entry_whose_tail_is_no_entry_is_ignored() {
    let (_d, p) = base("lte");
    install(
        &p,
        0,
        &entry(&p, 1, 8 * LOG_SECTOR as u32, BLOCK0, PAGE).encode(),
    );
    ignored("log Tail at no entry", &p);
}

#[test]
fn log_sequence_gap_ends_the_sequence() {
    // Entry 10 then entry 12 (tail at entry 10): 12 does not continue 10,
    // and alone its tail is not itself: only entry 10 is replayed.
    let (_d, p) = base("lgap");
    let a = entry(&p, 10, 0, BLOCK0, PAGE).encode();
    let b = entry(&p, 12, 0, BLOCK0 + LOG_SECTOR as u64, 0xD4).encode();
    install(&p, 0, &a);
    install(&p, a.len() as u64, &b);
    let r = front_door("log sequence gap", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first[..LOG_SECTOR].iter().all(|&x| x == PAGE));
    assert!(r.first[LOG_SECTOR..].iter().all(|&x| x == FIRST));
}

#[test]
fn log_descriptor_count_overflowing_is_ignored() {
    let (_d, p) = base("ldc");
    let mut b = entry(&p, 1, 0, BLOCK0, PAGE).encode();
    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    install(&p, 0, &b);
    fix_entry_crc(&p, 0, b.len());
    ignored("log DescriptorCount u32::MAX", &p);
}

#[test]
fn log_data_sector_with_wrong_sequence_is_ignored() {
    let (_d, p) = base("lds");
    let mut b = entry(&p, 1, 0, BLOCK0, PAGE).encode();
    // The data sector's SequenceLow.
    b[2 * LOG_SECTOR - 4] ^= 1;
    install(&p, 0, &b);
    fix_entry_crc(&p, 0, b.len());
    ignored("log data sector sequence", &p);
}

#[test]
fn log_flushed_offset_beyond_eof_is_corrupt() {
    let (_d, p) = base("lfo");
    let mut e = entry(&p, 1, 0, BLOCK0, PAGE);
    e.flushed_file_offset = 1 << 40;
    e.last_file_offset = 1 << 40;
    install(&p, 0, &e.encode());
    corrupt(
        "log FlushedFileOffset beyond EOF",
        &p,
        X,
        Stage::Open,
        "VHDX log entry",
        LOG,
        &["FlushedFileOffset 0x10000000000", "truncated"],
    );
}

#[test]
fn log_region_beyond_eof_is_corrupt() {
    let (_d, p) = base("lre");
    for slot in [0, 1] {
        edit_header(&p, slot, |h| {
            h.log_guid = GUID;
            h.log_offset = 1 << 40;
        });
    }
    corrupt(
        "log region beyond EOF",
        &p,
        X,
        Stage::Open,
        "VHDX log",
        1 << 40,
        &["past the end of the file"],
    );
}

#[test]
fn log_over_256_mib_is_unsupported() {
    let (_d, p) = base("lbig");
    for slot in [0, 1] {
        edit_header(&p, slot, |h| {
            h.log_guid = GUID;
            h.log_length = 512 << 20;
        });
    }
    fails(
        "log of 512 MiB",
        &p,
        X,
        Stage::Open,
        ErrorKind::Unsupported,
        &["log of 536870912 bytes"],
    );
}

#[test]
fn log_pages_beyond_eof_are_replayed_in_memory_only() {
    // GUID matches, the file offsets lie far past the end of the file: a
    // read-only open lays them over a longer view without allocating it.
    let (_d, p) = base("lpe");
    let mut e = entry(&p, 1, 0, 1 << 40, PAGE);
    e.last_file_offset = (1 << 40) + LOG_SECTOR as u64;
    install(&p, 0, &e.encode());
    opens_with_data("log page beyond EOF", &p, X);
}

#[test]
fn log_zero_descriptor_of_a_pebibyte_is_replayed_quickly() {
    // A zero descriptor over 1 PiB from block 0 on: replaying it writes
    // zeros where the file holds data, not a pebibyte of them.
    let (_d, p) = base("lz");
    let len = file_len(&p);
    let e = LogEntry {
        sequence_number: 1,
        log_guid: GUID,
        tail: 0,
        flushed_file_offset: len,
        last_file_offset: len,
        entry_length: 0,
        ops: vec![LogOp::Zero {
            file_offset: BLOCK0,
            length: 1 << 50,
        }],
    };
    install(&p, 0, &e.encode());
    let r = front_door("log zero descriptor of 1 PiB", &p, X);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first.iter().chain(&r.last).all(|&b| b == 0));
    let t = Instant::now();
    let (r, peak) = measure(|| {
        let img = image::open(&p, &OpenOptions::new(X).writable())?;
        let mut b = vec![1u8; 4096];
        img.disk().read_at(&mut b, SIZE - 4096)?;
        img.close()?;
        Ok::<_, disk::Error>(b)
    });
    assert_bounded("log zero descriptor of 1 PiB, writable", peak);
    assert!(r.unwrap().iter().all(|&b| b == 0));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(file_len(&p), len);
    assert!(read_at(&p, BLOCK0, 2 * MIB as usize)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn log_of_entry_headers_in_every_sector_is_read_in_linear_time() {
    // 32 MiB of log, each of its 8192 sectors the header of an entry that
    // claims the whole log: every one is a candidate whose checksum covers
    // 32 MiB. Checked one by one, that is 256 GiB of CRC.
    let (_d, p) = base("lbomb");
    let log_len: u64 = 32 * MIB;
    let log_off: u64 = 8 * MIB;
    truncate(&p, log_off + log_len);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    for s in 0..log_len / LOG_SECTOR as u64 {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"loge");
        h[8..12].copy_from_slice(&(log_len as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(s + 1).to_le_bytes());
        h[32..48].copy_from_slice(&GUID.to_bytes_le());
        std::os::unix::fs::FileExt::write_all_at(&f, &h, log_off + s * LOG_SECTOR as u64).unwrap();
    }
    drop(f);
    for slot in [0, 1] {
        edit_header(&p, slot, |h| {
            h.log_guid = GUID;
            h.log_offset = log_off;
            h.log_length = log_len as u32;
        });
    }
    let t = Instant::now();
    let r = run(&p, &OpenOptions::new(X));
    let took = t.elapsed();
    // The log is read whole (bounded by the file and 256 MiB): it is the
    // one thing here that grows with the input.
    eprintln!("hostile log sector bomb: peak {} bytes, {took:?}", r.peak);
    assert!(
        r.peak <= BOUND + i64::try_from(log_len).unwrap(),
        "{}",
        r.peak
    );
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first.iter().all(|&b| b == FIRST));
    assert!(took < Duration::from_secs(10), "{took:?}");
}
