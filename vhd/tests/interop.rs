//! Interop with qemu-img / qemu-io both ways, for fixed and dynamic VHDs.
//!
//! `qemu-img check` does not support the vpc format ("This image format does
//! not support checks", exit 63), so it is run and that answer accepted;
//! `qemu-img info` and `qemu-img compare` are the real oracles.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;
use disk::VirtualDisk;
use std::process::Command;
use vhd::{CreateOptions, OpenOptions, Vhd};

/// qemu-img creates and qemu-io writes; we read the same bytes.
#[test]
fn qemu_made_images_read_identically() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let img = tmp.path().join(format!("q-{sub}.vhd"));
        run(Command::new("qemu-img")
            .args(["create", "-f", "vpc", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&img)
            .arg("100M"));
        let size = qemu_virtual_size(&img, "vpc");
        let mut model = vec![0u8; size as usize];
        let writes = [
            0u64,
            3 * MIB + 4096,
            50 * MIB - 512,
            size - 700_000 / 512 * 512,
        ];
        for (i, off) in writes.into_iter().enumerate() {
            let len = 700_000u64.min(size - off) / 512 * 512;
            let p = pattern(len as usize, i as u64 + 1);
            let piece = tmp.path().join("piece.raw");
            std::fs::write(&piece, &p).unwrap();
            run(Command::new("qemu-io")
                .args(["-f", "vpc", "-c"])
                .arg(format!("write -s {} {off} {len}", piece.display()))
                .arg(&img));
            model[off as usize..(off + len) as usize].copy_from_slice(&p);
        }
        let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(d.virtual_size(), size, "{sub}");
        assert_eq!(d.info().subformat(), sub);
        let mut got = vec![0u8; size as usize];
        d.read_at(&mut got, 0).unwrap();
        assert!(got == model, "{sub}: contents differ");
        drop(d);
        // And we can write into qemu's image; qemu reads our write back.
        let d = Vhd::open(
            &img,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let p = pattern(3 * MIB as usize + 100, 99);
        d.write_at(&p, 20 * MIB + 7).unwrap();
        d.close().unwrap();
        model[(20 * MIB + 7) as usize..(20 * MIB + 7) as usize + p.len()].copy_from_slice(&p);
        let raw = tmp.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        if let Err(e) = qemu_compare(raw.to_str().unwrap(), "raw", img.to_str().unwrap(), "vpc") {
            panic!("{sub}: after our write: {e}");
        }
    }
}

fn qemu_check(img: &std::path::Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("does not support checks"),
        "qemu-img check: {err}"
    );
}

/// We create and write; qemu-img info, check and compare accept the result.
#[test]
fn our_images_pass_qemu_compare() {
    if !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // (fixed, azure, block size, requested size)
    let cases = [
        (false, false, 2 * MIB as u32, 64 * MIB),
        (false, false, 512 * 1024, 30 * MIB + 512),
        (false, false, 4096, 12 * MIB),
        (true, false, 0, 64 * MIB),
        (true, true, 0, 48 * MIB),
    ];
    for (fixed, azure, block, req) in cases {
        let what = format!("fixed={fixed} azure={azure} block={block}");
        let img = tmp.path().join("ours.vhd");
        let mut o = CreateOptions::new(req);
        o.fixed = fixed;
        o.azure = azure;
        if block != 0 {
            o.block_size = block;
        }
        let d = Vhd::create(&img, &o, true).unwrap();
        let size = d.virtual_size();
        assert!(size >= req);
        if azure {
            assert_eq!(size, req);
        }
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
        let raw = tmp.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        if !fixed {
            qemu_check(&img);
        }
        if azure {
            // qemu sizes unknown creators by CHS; Azure images need the
            // current size, which qemu uses with force_size_calc.
            let a = format!("driver=raw,file.filename={}", raw.display());
            let b = format!(
                "driver=vpc,force_size_calc=current_size,file.filename={}",
                img.display()
            );
            if let Err(e) = qemu_compare(&a, "--image-opts", &b, "") {
                panic!("{what}: {e}");
            }
        } else {
            assert_eq!(qemu_virtual_size(&img, "vpc"), size, "{what}");
            if let Err(e) = qemu_compare(raw.to_str().unwrap(), "raw", img.to_str().unwrap(), "vpc")
            {
                panic!("{what}: {e}");
            }
        }
    }
}
