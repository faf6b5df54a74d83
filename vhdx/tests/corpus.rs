//! Every image in `../shared/corpus/vhdx` reads byte-identical to qemu-img's
//! reading of it (after `qemu-img check -r all` on a copy where the log is
//! dirty); the orphan differencing image is refused naming its parent.

mod common;
use common::*;
use disk::{ErrorKind, VirtualDisk};
use std::path::Path;
use std::process::Command;
use vhdx::{OpenOptions, Vhdx};

fn check_image(src: &Path, tmp: &Path) {
    let img = decompress(src, tmp);
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let before = file_hash(&img);

    // Our read-only view (a dirty log is replayed in memory only).
    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let dirty = d.info().log_replayed;
    let ours = tmp.join(format!("{name}.ours.raw"));
    dump_raw(&d, &ours, d.virtual_size());
    drop(d);
    assert_eq!(
        before,
        file_hash(&img),
        "{name}: read-only open changed the file"
    );

    // qemu-img's reading; it refuses dirty logs read-only, so repair a copy.
    let qsrc = if dirty {
        let copy = tmp.join(format!("{name}.qemu-copy"));
        std::fs::copy(&img, &copy).unwrap();
        run(Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx"])
            .arg(&copy));
        copy
    } else {
        img.clone()
    };
    let theirs = tmp.join(format!("{name}.qemu.raw"));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&qsrc)
        .arg(&theirs));
    if let Err(e) = qemu_compare(&ours, "raw", &theirs, "raw") {
        panic!("{name}: our reading differs from qemu-img's: {e}");
    }

    if dirty {
        // A writable open replays into the file and leaves the log empty.
        let copy = tmp.join(format!("{name}.rw"));
        std::fs::copy(&img, &copy).unwrap();
        let d = Vhdx::open(
            &copy,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(d.info().log_replayed);
        d.close().unwrap();
        let d = Vhdx::open(&copy, &OpenOptions::default()).unwrap();
        assert!(!d.info().log_replayed, "{name}: log not empty after replay");
        assert!(d.info().header.log_guid.is_nil());
        let after = tmp.join(format!("{name}.replayed.raw"));
        dump_raw(&d, &after, d.virtual_size());
        if let Err(e) = qemu_compare(&after, "raw", &theirs, "raw") {
            panic!("{name}: after writable replay: {e}");
        }
        // And qemu-img accepts the replayed file as clean.
        run(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&copy));
    }
    eprintln!("{name}: ok (dirty log: {dirty})");
}

#[test]
fn corpus_images_read_like_qemu() {
    let Some(entries) = corpus_images("vhdx") else {
        return;
    };
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for src in entries {
        let sub = tempfile::tempdir_in(tmp.path()).unwrap();
        check_image(&src, sub.path());
        n += 1;
    }
    assert!(n >= 12, "expected the whole corpus, checked {n}");
}

#[test]
fn orphan_differencing_is_refused_naming_parent_but_inspectable() {
    let Some(dir) = corpus("vhdx") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let img = decompress(
        &dir.join("dissect-differencing-orphan.avhdx.gz"),
        tmp.path(),
    );
    let err = Vhdx::open(&img, &OpenOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("dissect-differencing-orphan.avhdx"), "{msg}");
    assert!(msg.contains("parent"), "{msg}");
    assert_ne!(err.kind(), ErrorKind::Io);
    let info = Vhdx::inspect(&img).unwrap();
    assert!(info.metadata.file_parameters.has_parent);
    let pl = info
        .metadata
        .parent_locator
        .as_ref()
        .expect("parent locator");
    assert!(pl.get("parent_linkage").is_some());
    let rel = pl
        .get("relative_path")
        .or(pl.get("absolute_win32_path"))
        .unwrap();
    assert!(
        msg.contains(rel),
        "error should name the parent path {rel}: {msg}"
    );
}

#[test]
fn disk2vhd_equal_sequence_headers_accepted() {
    let Some(dir) = corpus("vhdx") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let img = decompress(&dir.join("test-disk2vhd.vhdx.bz2"), tmp.path());
    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(d.virtual_size(), 256 << 20);
}
