//! Interop with qemu-img both ways.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::VirtualDisk;
use std::path::Path;
use std::process::Command;
use vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

/// qemu-img creates (and qemu-io writes), we read the same bytes.
#[test]
fn qemu_made_images_read_identically() {
    if !have_qemu() {
        return;
    }
    let have_qemu_io = Command::new("qemu-io").arg("--version").output().is_ok();
    let tmp = tempfile::tempdir().unwrap();
    // QEMU 10 neither creates nor opens VHDX with 4096-byte logical sectors
    // ("Operation not supported"), so those are covered by our own tests.
    let cases = [
        ("dynamic", 1u64, 512u32),
        ("dynamic", 8, 512),
        ("dynamic", 256, 512),
        ("fixed", 2, 512),
        ("fixed", 16, 512),
    ];
    for (sub, block_mib, lss) in cases {
        let img = tmp.path().join(format!("q-{sub}-{block_mib}-{lss}.vhdx"));
        run(Command::new("qemu-img")
            .args(["create", "-f", "vhdx", "-o"])
            .arg(format!("subformat={sub},block_size={block_mib}M"))
            .arg(&img)
            .arg("100M"));
        let raw = tmp.path().join("src.raw");
        let mut src = vec![0u8; 100 * MIB as usize];
        for (i, off) in [0u64, 3 * MIB + 4096, 50 * MIB - 512, 99 * MIB]
            .iter()
            .enumerate()
        {
            let p = pattern(700_000.min((100 * MIB - off) as usize), i as u64 + 1);
            src[*off as usize..*off as usize + p.len()].copy_from_slice(&p);
        }
        std::fs::write(&raw, &src).unwrap();
        if have_qemu_io {
            // qemu writes into its own image through its VHDX driver.
            for off in [0u64, 3 * MIB + 4096, 50 * MIB - 512, 99 * MIB] {
                let len = 700_000u64.min(100 * MIB - off) / 512 * 512;
                let piece = tmp.path().join("piece.raw");
                std::fs::write(&piece, &src[off as usize..(off + len) as usize]).unwrap();
                run(Command::new("qemu-io")
                    .args(["-f", "vhdx", "-c"])
                    .arg(format!("write -s {} {off} {len}", piece.display()))
                    .arg(&img));
            }
            // Trim the model to what qemu wrote (whole 512-byte sectors).
            let mut model = vec![0u8; src.len()];
            for off in [0u64, 3 * MIB + 4096, 50 * MIB - 512, 99 * MIB] {
                let len = 700_000u64.min(100 * MIB - off) / 512 * 512;
                model[off as usize..(off + len) as usize]
                    .copy_from_slice(&src[off as usize..(off + len) as usize]);
            }
            std::fs::write(&raw, &model).unwrap();
        } else {
            eprintln!("SKIP part: qemu-io absent, comparing qemu-img convert output instead");
            run(Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "vhdx"])
                .arg(&raw)
                .arg(&img));
        }
        let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(d.virtual_size(), 100 * MIB);
        assert_eq!(d.geometry().logical_sector_size, lss);
        assert_eq!(d.block_size(), block_mib * MIB);
        let model = std::fs::read(&raw).unwrap();
        let mut got = vec![0u8; model.len()];
        d.read_at(&mut got, 0).unwrap();
        assert!(got == model, "{sub} {block_mib}M {lss}: contents differ");
    }
}

fn write_pattern_image(path: &Path, opts: &CreateOptions, raw: &Path) {
    let d = Vhdx::create(path, opts, true).unwrap();
    let size = opts.virtual_size;
    let mut model = vec![0u8; size as usize];
    let writes = [
        (0u64, 4096usize),
        (MIB + 17, 300_000),
        (size / 2 - 1, 3 * MIB as usize),
        (size - 5000, 5000),
    ];
    for (i, (off, len)) in writes.into_iter().enumerate() {
        let p = pattern(len, i as u64 + 7);
        d.write_at(&p, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
        if i == 1 {
            d.flush().unwrap();
        }
    }
    d.close().unwrap();
    std::fs::write(raw, &model).unwrap();
}

/// We create and write; qemu-img check and compare accept the result.
#[test]
fn our_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 512-byte logical sectors only: QEMU 10 refuses 4096 ("Operation not supported").
    for (fixed, block, lss, pss) in [
        (false, 32 * MIB as u32, 512, 4096),
        (false, MIB as u32, 512, 512),
        (true, 2 * MIB as u32, 512, 512),
        (false, 256 * MIB as u32, 512, 4096),
    ] {
        let img = tmp.path().join("ours.vhdx");
        let raw = tmp.path().join("model.raw");
        let mut o = CreateOptions::new(64 * MIB);
        o.fixed = fixed;
        o.block_size = block;
        o.logical_sector_size = lss;
        o.physical_sector_size = pss;
        write_pattern_image(&img, &o, &raw);
        run(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&img));
        if let Err(e) = qemu_compare(&raw, "raw", &img, "vhdx") {
            panic!("fixed={fixed} block={block} lss={lss}: {e}");
        }
        let info = run(Command::new("qemu-img")
            .args(["info", "--output", "json", "-f", "vhdx"])
            .arg(&img));
        assert!(
            info.contains(&format!("\"cluster-size\": {block}")),
            "{info}"
        );
    }
}

/// A crash after a flush leaves a dirty log that qemu-img replays too.
#[test]
fn our_dirty_log_is_replayed_by_qemu() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("dirty.vhdx");
    let d = Vhdx::create(&img, &CreateOptions::new(64 * MIB), true).unwrap();
    let p = pattern(2 * MIB as usize, 3);
    d.write_at(&p, 5 * MIB).unwrap();
    d.flush().unwrap();
    // Simulate a crash: copy the file while the session is open (log GUID set).
    let crashed = tmp.path().join("crashed.vhdx");
    std::fs::copy(&img, &crashed).unwrap();
    drop(d);
    let raw = tmp.path().join("model.raw");
    let mut model = vec![0u8; 64 * MIB as usize];
    model[5 * MIB as usize..7 * MIB as usize].copy_from_slice(&p);
    std::fs::write(&raw, &model).unwrap();
    // Our read-only open of the crashed copy sees the data.
    let d = Vhdx::open(&crashed, &OpenOptions::default()).unwrap();
    let mut got = vec![0u8; p.len()];
    d.read_at(&mut got, 5 * MIB).unwrap();
    assert!(got == p);
    drop(d);
    run(Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&crashed));
    if let Err(e) = qemu_compare(&raw, "raw", &crashed, "vhdx") {
        panic!("{e}");
    }
}
