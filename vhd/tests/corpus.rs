//! Every image in `../shared/corpus/vhd` reads byte-identical to
//! `qemu-img convert -f vpc -O raw`; the images in `../shared/corpus/bad`
//! are refused with clear errors; the orphan differencing image is refused
//! naming its missing parent (and still inspectable).
//!
//! Sizes: our size rule ([`vhd::footer::Footer::disk_size`]: CHS for creator
//! `"vpc "`, else the current size) and qemu's (CHS for every creator except
//! a few it knows, like `"win "`, `"d2v "` and `"qem2"`; the current size
//! for the maximum geometry) agree on every corpus image: virtualpc-dynamic
//! is sized by CHS (136363130880), hyperv2012r2-dynamic and d2v-zerofilled
//! by their current size. The test asserts that, and compares over the size
//! qemu reports.

mod common;
use common::*;
use disk::{ErrorKind, VirtualDisk};
use std::path::Path;
use std::process::Command;
use vhd::{FooterSource, OpenOptions, Vhd};

fn check_image(src: &Path, tmp: &Path) {
    let img = decompress(src, tmp);
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let before = file_hash(&img);
    let d = Vhd::open(&img, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(d.info().footer_source, FooterSource::End, "{name}");
    assert!(
        d.info().warnings.is_empty(),
        "{name}: {:?}",
        d.info().warnings
    );
    let qsize = qemu_virtual_size(&img, "vpc");
    assert_eq!(
        d.virtual_size(),
        qsize,
        "{name}: our size differs from qemu's ({})",
        String::from_utf8_lossy(&d.info().footer.creator_application)
    );
    let ours = tmp.join(format!("{name}.ours.raw"));
    dump_raw(&d, &ours, qsize);
    drop(d);
    assert_eq!(
        before,
        file_hash(&img),
        "{name}: read-only open changed the file"
    );
    let theirs = tmp.join(format!("{name}.qemu.raw"));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&theirs));
    if let Err(e) = qemu_compare(
        ours.to_str().unwrap(),
        "raw",
        theirs.to_str().unwrap(),
        "raw",
    ) {
        panic!("{name}: our reading differs from qemu-img's: {e}");
    }
    eprintln!("{name}: ok ({} bytes)", qsize);
}

#[test]
fn corpus_images_read_like_qemu() {
    let Some(entries) = corpus_images("vhd") else {
        return;
    };
    if !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for src in entries {
        let sub = tempfile::tempdir_in(tmp.path()).unwrap();
        check_image(&src, sub.path());
        n += 1;
    }
    assert!(n >= 8, "expected the whole corpus, checked {n}");
}

#[test]
fn size_rules_per_creator() {
    let Some(dir) = corpus("vhd") else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (file, size) in [
        ("virtualpc-dynamic.vhd.bz2", 65278u64 * 16 * 255 * 512), // CHS, not current size
        ("hyperv2012r2-dynamic.vhd.bz2", 0x1f_c000_0000),         // current size
        ("d2v-zerofilled.vhd.bz2", 0x0fb4_0000),                  // max CHS: current size
    ] {
        let img = decompress(&dir.join(file), tmp.path());
        let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(d.virtual_size(), size, "{file}");
    }
}

#[test]
fn bad_images_are_refused_clearly() {
    let Some(dir) = corpus("bad") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let expect = [
        ("qemu-afl5.vhd.bz2", "max table entries"),
        ("dfvfs-image-badcsum.vhd.gz", "checksum"),
        ("dfvfs-image-differential-badcsum.vhd.gz", "checksum"),
    ];
    for (file, what) in expect {
        let img = decompress(&dir.join(file), tmp.path());
        let stem = img.file_name().unwrap().to_string_lossy().into_owned();
        for writable in [false, true] {
            let err = Vhd::open(
                &img,
                &OpenOptions {
                    writable,
                    ..OpenOptions::default()
                },
            )
            .unwrap_err();
            let msg = err.to_string();
            eprintln!("{stem}: {msg}");
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{msg}");
            assert!(msg.contains(&stem), "{msg}");
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("at offset 0x"), "{msg}");
        }
        assert!(Vhd::inspect(&img).is_err());
    }
    // The AFL image: the error names the header field and its file offset.
    let img = tmp.path().join("qemu-afl5.vhd");
    let msg = Vhd::open(&img, &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("VHD dynamic disk header at offset 0x21c"),
        "{msg}"
    );
    assert!(msg.contains("0x40000001"), "{msg}");
}

#[test]
fn orphan_differencing_is_refused_naming_parent_but_inspectable() {
    let Some(dir) = corpus("vhd") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let img = decompress(
        &dir.join("dfvfs-fat-differential-orphan.vhd.gz"),
        tmp.path(),
    );
    let err = Vhd::open(&img, &OpenOptions::default()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("dfvfs-fat-differential-orphan.vhd"), "{msg}");
    assert!(msg.contains("differencing VHD"), "{msg}");
    assert!(msg.contains("parent is missing"), "{msg}");
    assert_ne!(err.kind(), ErrorKind::Io);
    let info = Vhd::inspect(&img).unwrap();
    assert_eq!(info.subformat(), "differencing");
    let h = info.header.as_ref().unwrap();
    assert!(!h.parent_name().is_empty());
    let codes: Vec<&str> = info
        .parent_locators
        .iter()
        .map(|(c, _)| c.as_str())
        .collect();
    assert!(
        codes.contains(&"W2ku") && codes.contains(&"W2ru"),
        "{codes:?}"
    );
    for (_, p) in &info.parent_locators {
        assert!(msg.contains(p.as_str()), "error should name {p}: {msg}");
    }
}

/// Writing into copies of real dynamic and fixed images (allocated and
/// unallocated blocks, unaligned edges) gives what qemu then reads.
#[test]
fn writes_into_corpus_copies_read_back_in_qemu() {
    use std::os::unix::fs::FileExt;
    let Some(dir) = corpus("vhd") else { return };
    if !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "dissect-dynamic.vhd.gz",
        "nodevhd-dynamic.vhd.gz",
        "d2v-zerofilled.vhd.bz2",
        "dissect-fixed.vhd.gz",
    ] {
        let img = decompress(&dir.join(file), tmp.path());
        let raw = tmp.path().join(format!("{file}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&img)
            .arg(&raw));
        let d = Vhd::open(
            &img,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let size = d.virtual_size();
        let rawf = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        for (i, off) in [100u64, size / 3 + 333, size - 70_001]
            .into_iter()
            .enumerate()
        {
            let p = pattern(70_000, i as u64 + 40);
            d.write_at(&p, off).unwrap();
            rawf.write_all_at(&p, off).unwrap();
        }
        d.close().unwrap();
        let d = Vhd::open(&img, &OpenOptions::default()).unwrap();
        assert!(d.info().warnings.is_empty());
        drop(d);
        if let Err(e) = qemu_compare(raw.to_str().unwrap(), "raw", img.to_str().unwrap(), "vpc") {
            panic!("{file}: after our writes: {e}");
        }
    }
}
