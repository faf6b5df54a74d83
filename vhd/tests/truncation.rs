//! A dynamic VHD file cut short (issue "repairs never destroy data"): its
//! footer is gone, the copy at offset 0 remains. Cut at a block boundary,
//! in the middle of a block, inside the BAT, inside the dynamic disk
//! header, and just the footer. The check names every truncated block with
//! its virtual range (exit 2), a repair never writes the footer over (or
//! into) a truncated block nor changes the file's length, the image opens
//! read-only reading what is left, and reading lost data fails naming the
//! block. A footer lost alone is restored, and `check -r all` cut at every
//! write leaves an image that reads what it read before.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::check::{CheckOptions, CheckReport, RepairMode};
use disk::fault::RecordingStorage;
use disk::testing::crash::for_each_crash;
use disk::{MemStorage, Storage, VirtualDisk};
use std::sync::Arc;
use vhd::check::{check, repair};
use vhd::{CreateOptions, FooterSource, OpenOptions, Vhd};

/// [`image`]'s layout: footer copy, header at 512, BAT at 1536, blocks
/// (512-byte bitmap + 2 MiB) from 2048 in write order, then the footer.
const BAT: u64 = 1536;
const FIRST: u64 = 2048;
const SLOT: u64 = 2 * MIB + 512;
const BS: u64 = 2 * MIB;
/// Blocks written, in this order: block `ORDER[k]` lies at FIRST + k SLOT.
const ORDER: [u64; 4] = [2, 0, 3, 1];

/// A closed dynamic VHD of 8 MiB (5 blocks after CHS rounding): [`ORDER`]'s
/// blocks hold `pattern(2 MiB, block)`.
fn image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new("t.vhd"));
    let d = Vhd::create_on(Box::new(st.clone()), &CreateOptions::new(8 * MIB)).unwrap();
    for b in ORDER {
        d.write_at(&pattern(BS as usize, b), b * BS).unwrap();
    }
    d.close().unwrap();
    let v = st.to_vec();
    assert_eq!(v.len() as u64, FIRST + 4 * SLOT + 512);
    v
}

fn block_at(b: u64) -> u64 {
    FIRST + ORDER.iter().position(|&x| x == b).unwrap() as u64 * SLOT
}

fn cut(len: u64) -> Arc<MemStorage> {
    let mut v = image();
    v.truncate(len as usize);
    Arc::new(MemStorage::from_vec("t.vhd", v))
}

fn run_check(st: &dyn Storage) -> CheckReport {
    check(st, &CheckOptions::default()).unwrap()
}

fn truncated(r: &CheckReport) -> Vec<((u64, u64), u64)> {
    r.problems
        .iter()
        .filter_map(|p| p.virtual_range.map(|v| (v, p.offset)))
        .collect()
}

/// `-r all` then `-r leaks` change nothing: same length, same bytes.
fn repairs_change_nothing(st: &Arc<MemStorage>) {
    let before = st.to_vec();
    for mode in [RepairMode::All, RepairMode::Leaks] {
        let fix = repair(&**st, mode, &CheckOptions::default()).unwrap();
        assert_eq!(st.len().unwrap(), before.len() as u64, "{mode:?} {fix:?}");
        assert!(st.to_vec() == before, "{mode:?} changed the file: {fix:?}");
    }
}

fn open(st: &Arc<MemStorage>, writable: bool) -> disk::Result<Vhd> {
    Vhd::open_storage(
        Box::new(st.clone()),
        &OpenOptions {
            writable,
            ..OpenOptions::default()
        },
    )
}

fn read(d: &dyn VirtualDisk, at: u64, len: u64) -> disk::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, at).map(|()| b)
}

/// The footer problem says it cannot be restored, and nothing repairs it.
fn footer_not_restorable(r: &CheckReport) {
    let p = r
        .problems
        .iter()
        .find(|p| p.structure == "VHD footer")
        .expect("the lost footer is reported");
    assert_eq!(p.repair, None, "{p}");
    assert!(p.message.contains("cannot be restored"), "{p}");
    assert!(!r.needs_repair(RepairMode::All));
}

#[test]
fn cut_at_a_block_boundary() {
    // The file ends where block 1's slot starts: block 1 is lost whole.
    let st = cut(block_at(1));
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    assert_eq!(r.truncated_blocks, 1);
    assert_eq!(truncated(&r), vec![((BS, 2 * BS), BAT + 4)]);
    assert_eq!(r.leaks, 0);
    footer_not_restorable(&r);
    repairs_change_nothing(&st);
    let d = open(&st, false).unwrap();
    assert_eq!(d.info().footer_source, FooterSource::CopyAtStart);
    assert_eq!(d.info().truncated_blocks, 1);
    for b in [2, 0, 3] {
        assert!(read(&d, b * BS, BS).unwrap() == pattern(BS as usize, b));
    }
    let e = read(&d, BS + 4096, 512).unwrap_err().to_string();
    assert!(
        e.contains("block 1 (virtual 0x200000..0x400000) at file offset 0x600e00+0x200200"),
        "{e}"
    );
    assert!(e.contains("virtual 0x200000..0x400000 is lost"), "{e}");
    // A block never allocated still reads zeros.
    assert_eq!(read(&d, 4 * BS, 512).unwrap(), vec![0u8; 512]);
}

#[test]
fn cut_in_the_middle_of_a_block() {
    // 300 KiB of block 1's data are left (after its 512-byte bitmap).
    let end = block_at(1) + 512 + 300 * 1024;
    let st = cut(end);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    assert_eq!(truncated(&r), vec![((BS, 2 * BS), BAT + 4)]);
    assert_eq!((r.leaks, r.unused_bytes), (0, 0), "{:#?}", r.problems);
    footer_not_restorable(&r);
    // Before the fix, -r all wrote the footer over the last 512 bytes.
    repairs_change_nothing(&st);
    let want = pattern(BS as usize, 1);
    let d = open(&st, false).unwrap();
    assert!(read(&d, BS, 300 * 1024).unwrap() == want[..300 * 1024]);
    let e = read(&d, BS + 300 * 1024 - 512, 1024)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block 1 (virtual 0x200000..0x400000)")
            && e.contains("virtual 0x24b000..0x400000 is lost"),
        "{e}"
    );
    drop(d);
    // A writable open is read-only (no footer at the end): writes fail and
    // the file stays as it is.
    let before = st.to_vec();
    let d = open(&st, true).unwrap();
    assert!(!d.is_writable());
    assert!(d.write_at(&[1; 512], 4 * BS).is_err());
    drop(d);
    assert!(st.to_vec() == before);
}

#[test]
fn cut_inside_the_bat() {
    let st = cut(BAT + 8);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    assert!(
        r.problems
            .iter()
            .any(|p| p.structure == "VHD dynamic disk header" && p.message.contains("BAT")),
        "{:#?}",
        r.problems
    );
    footer_not_restorable(&r);
    repairs_change_nothing(&st);
    let e = open(&st, false).expect_err("refused").to_string();
    assert!(
        e.contains("VHD dynamic disk header") && e.contains("does not fit in the file"),
        "{e}"
    );
}

#[test]
fn cut_inside_the_dynamic_header() {
    let st = cut(1200);
    let r = run_check(&*st);
    assert_eq!(r.exit_code(), 2, "{:#?}", r.problems);
    // Before the fix, -r all wrote the footer at 688, over the header.
    repairs_change_nothing(&st);
    let e = open(&st, false).expect_err("refused").to_string();
    assert!(e.contains("dynamic disk header"), "{e}");
}

#[test]
fn a_lost_footer_alone_is_restored_after_the_last_block() {
    let full = image();
    let st = Arc::new(MemStorage::from_vec(
        "t.vhd",
        full[..full.len() - 512].to_vec(),
    ));
    let r = run_check(&*st);
    assert_eq!(
        (r.exit_code(), r.truncated_blocks),
        (2, 0),
        "{:#?}",
        r.problems
    );
    assert!(r.needs_repair(RepairMode::All));
    let want = read_all(&open(&st, false).unwrap());
    let fix = repair(&*st, RepairMode::All, &CheckOptions::default()).unwrap();
    assert_eq!(fix.corruptions_fixed, 1, "{fix:?}");
    // Written after the last block, none of whose bytes changed.
    assert!(st.to_vec() == full);
    assert!(run_check(&*st).is_clean());
    let d = open(&st, false).unwrap();
    assert_eq!(d.info().footer_source, FooterSource::End);
    assert!(read_all(&d) == want);
}

// ---- check -r all cut at every write. ----

fn crash_repair(image: Vec<u8>, what: &str) {
    let want = read_all(
        &Vhd::open_storage(
            Box::new(MemStorage::from_vec("orig", image.clone())),
            &OpenOptions::default(),
        )
        .unwrap(),
    );
    let rec = Arc::new(RecordingStorage::new("rec.vhd", image));
    let fix = repair(&*rec, RepairMode::All, &CheckOptions::default()).unwrap();
    assert!(
        fix.corruptions_fixed + fix.leaks_fixed > 0,
        "{what}: {fix:?}"
    );
    assert!(run_check(&*rec).is_clean(), "{what}");
    assert!(rec.op_count() > 0);
    for_each_crash(&rec, 5, |img, cut, strategy| {
        let w = format!("{what}: {strategy} cut {cut}");
        let st = Arc::new(MemStorage::from_vec("crash.vhd", img));
        let got = read_all(&open(&st, false).unwrap_or_else(|e| panic!("{w}: {e}")));
        assert!(got == want, "{w}: reads differ");
        repair(&*st, RepairMode::All, &CheckOptions::default())
            .unwrap_or_else(|e| panic!("{w}: repair again: {e}"));
        let r = run_check(&*st);
        assert!(r.is_clean(), "{w}: {:#?}", r.problems);
        assert!(read_all(&open(&st, false).unwrap()) == want, "{w}: after");
    });
}

#[test]
fn repair_cut_at_every_write_restoring_a_damaged_footer() {
    let mut img = image();
    let n = img.len();
    img[n - 512 + 20] ^= 0xff; // the footer's checksum no longer matches
    let r = run_check(&MemStorage::from_vec("d", img.clone()));
    assert!(r.needs_repair(RepairMode::All), "{:#?}", r.problems);
    crash_repair(img, "damaged footer");
}

#[test]
fn repair_cut_at_every_write_reclaiming_a_leak_before_the_footer() {
    let img = image();
    let at = img.len() - 512;
    let mut v = img[..at].to_vec();
    v.extend(pattern(SLOT as usize + 4096, 77));
    v.extend_from_slice(&img[at..]);
    let r = run_check(&MemStorage::from_vec("l", v.clone()));
    assert_eq!(r.exit_code(), 3, "{:#?}", r.problems);
    crash_repair(v, "leak before the footer");
}
