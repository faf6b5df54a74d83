//! Differencing disks that other tools open: libvhdi's `vhdimount` (Debian
//! package libvhdi-utils) must find the parent of a child made by `vdisk
//! create -b` in the same directory, given the child's absolute path, and
//! read the bytes `vdisk read` reads. And children written before the
//! locators took Win32 syntax (a Unix path in `absolute_win32_path` or
//! `W2ku`) must still open.
//!
//! The vhdimount tests skip, with a message, where vhdimount or /dev/fuse
//! is absent; each mount is unmounted by a drop guard, also when a test
//! fails.

// Test images and buffers are small: their offsets and sizes fit any integer type.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// vhdimount, when it and /dev/fuse are there (says why not otherwise).
fn vhdimount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(tool) = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("vhdimount"))
        .find(|f| f.is_file())
    else {
        println!("vhdimount not found (Debian package libvhdi-utils): skipping");
        return None;
    };
    if !Path::new("/dev/fuse").exists() {
        println!("/dev/fuse is absent: skipping the vhdimount test");
        return None;
    }
    Some(tool)
}

/// Whether a mount is at `dir` (as /proc/self/mountinfo lists it).
fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p(&dir)))
}

/// A vhdimount mount, unmounted when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        for (prog, args) in [
            ("fusermount3", &["-u"][..]),
            ("fusermount", &["-u"][..]),
            ("umount", &[][..]),
            ("umount", &["-l"][..]),
        ] {
            if !is_mounted(&self.0) {
                return;
            }
            let _ = Command::new(prog).args(args).arg(&self.0).output();
        }
    }
}

/// Mount `image` (an absolute path) with vhdimount at `dir`; `None` (with a
/// message) when FUSE mounts are not permitted here.
fn mount(tool: &Path, image: &Path, dir: &Path) -> Option<Mount> {
    assert!(image.is_absolute());
    fs::create_dir_all(dir).unwrap();
    let out = Command::new(tool).arg(image).arg(dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("fuse") && !stderr.contains("parent") {
        println!("vhdimount cannot mount here ({stderr}): skipping");
        return None;
    }
    assert!(
        out.status.success(),
        "vhdimount {} failed: {}{stderr}",
        image.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    let m = Mount(dir.to_path_buf());
    assert!(is_mounted(dir), "vhdimount returned without a mount");
    Some(m)
}

/// The files vhdimount shows (vhdi1 the base ... vhdiN the image opened),
/// in layer order.
fn layers(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let n = |f: &PathBuf| -> u32 {
        let name = f.file_name().unwrap().to_str().unwrap();
        name.trim_start_matches("vhdi").parse().unwrap()
    };
    v.sort_by_key(n);
    v
}

/// `vdisk read image 0 SIZE`.
fn vdisk_read(image: &Path) -> Vec<u8> {
    let out = run(&["read", p(image), "0", &SIZE.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len() as u64, SIZE);
    out.stdout
}

/// base (data at 0 and 3M) and child (`child_len` bytes at 1M and over
/// the base's data at 3M), made by vdisk in `dir`.
fn chain(dir: &Path, base: &str, child: &str, child_len: usize) -> (PathBuf, PathBuf) {
    let base = dir.join(base);
    let child = dir.join(child);
    ok(&["create", p(&base), &SIZE.to_string()]);
    let data = dir.join("data.bin");
    fs::write(&data, pattern(70_000, 1)).unwrap();
    ok(&["write", p(&base), "0", p(&data)]);
    ok(&["write", p(&base), "3M", p(&data)]);
    ok(&["create", "-b", p(&base), p(&child)]);
    fs::write(&data, pattern(child_len, 2)).unwrap();
    ok(&["write", p(&child), "1M", p(&data)]);
    ok(&["write", p(&child), "3M", p(&data)]);
    (base, child)
}

/// vhdimount opens the chain from the child's absolute path and reads
/// what vdisk reads, layer by layer.
fn vhdimount_reads_the_chain(base: &str, child: &str, child_len: usize) {
    let Some(tool) = vhdimount() else { return };
    let t = tmp();
    let dir = fs::canonicalize(t.path()).unwrap();
    let (base, child) = chain(&dir, base, child, child_len);
    let want_child = vdisk_read(&child);
    let want_base = vdisk_read(&base);
    assert_ne!(want_child, want_base, "the child holds data of its own");
    let mnt = dir.join("mnt");
    let Some(m) = mount(&tool, &child, &mnt) else {
        return;
    };
    let files = layers(&mnt);
    assert_eq!(files.len(), 2, "{files:?}");
    // vhdimount shows each layer as a file of the virtual size (a VHD's may
    // be rounded up to its CHS geometry: compare the common part).
    let got_base = fs::read(&files[0]).unwrap();
    let got_child = fs::read(&files[1]).unwrap();
    assert!(got_child.len() as u64 >= SIZE, "{}", got_child.len());
    assert!(
        got_child[..SIZE as usize] == want_child[..],
        "vhdimount reads the child differently from vdisk"
    );
    assert!(
        got_base[..SIZE as usize] == want_base[..],
        "vhdimount reads the base differently from vdisk"
    );
    drop(m);
    assert!(!is_mounted(&mnt));
}

#[test]
fn vhdimount_opens_a_vhdx_child_beside_its_parent() {
    // 5000 bytes: sectors partly present in a 4 KiB page.
    vhdimount_reads_the_chain("base.vhdx", "child.avhdx", 5000);
}

#[test]
fn vhdimount_opens_a_vhd_child_beside_its_parent() {
    // Whole 4 KiB pages, as Windows guests write: libvhdi (20210425, and
    // still in 2024) reads a VHD sector bitmap byte with its top bit set
    // as 8 present sectors (it shifts each bit down without masking), so a
    // write ending inside a page (bitmap byte 0xc0) reads as zeros there
    // through vhdimount, while vdisk (and the VHD specification) take the
    // bits one by one.
    vhdimount_reads_the_chain("base.vhd", "child.vhd", 8192);
}

#[test]
fn locators_are_written_in_win32_syntax() {
    let t = tmp();
    let dir = fs::canonicalize(t.path()).unwrap();
    let (_, child) = chain(&dir, "base.vhdx", "child.avhdx", 5000);
    let want_abs = format!("{}\\base.vhdx", p(&dir).replace('/', "\\"));
    let loc = vhdx::Vhdx::inspect(&child)
        .unwrap()
        .metadata
        .parent_locator
        .unwrap();
    let keys: Vec<&str> = loc.entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["parent_linkage", "absolute_win32_path", "relative_path"],
        "Hyper-V's order"
    );
    assert_eq!(loc.get("absolute_win32_path"), Some(want_abs.as_str()));
    assert_eq!(loc.get("relative_path"), Some(".\\base.vhdx"));
    let (_, vchild) = chain(&dir, "base.vhd", "child.vhd", 5000);
    let info = vhd::Vhd::inspect(&vchild).unwrap();
    assert_eq!(
        info.parent_locators,
        [
            ("W2ku".to_string(), want_abs.replace(".vhdx", ".vhd")),
            ("W2ru".to_string(), ".\\base.vhd".to_string()),
        ]
    );
}

/// A child whose parent is found only through the Unix path in its
/// absolute locator, as vdisk wrote children before: the relative path and
/// the parent's file name lead nowhere.
#[test]
fn old_children_with_a_unix_absolute_path_still_open() {
    let t = tmp();
    let dir = fs::canonicalize(t.path()).unwrap();
    let sub = dir.join("sub");
    fs::create_dir(&sub).unwrap();

    // VHDX.
    let (base, child) = chain(&sub, "base.vhdx", "child.avhdx", 5000);
    let want = vdisk_read(&child);
    let old = dir.join("old.avhdx");
    fs::rename(&child, &old).unwrap();
    {
        let parent = vhdx::Vhdx::open(&base, &vhdx::OpenOptions::default()).unwrap();
        let linkage = parent.info().header.data_write_guid;
        let c = vhdx::Vhdx::open_with_parent(
            &old,
            &vhdx::OpenOptions {
                writable: true,
                keep_data_write_guid: true,
                ..vhdx::OpenOptions::default()
            },
            Arc::new(parent),
        )
        .unwrap();
        let loc = vhdx::parent_locator::ParentLocator {
            locator_type: vhdx::parent_locator::VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![
                ("parent_linkage".into(), vhdx::linkage_string(linkage)),
                ("relative_path".into(), ".\\gone\\elsewhere.vhdx".into()),
                ("absolute_win32_path".into(), p(&base).into()),
            ],
        };
        c.set_parent_locator(&loc).unwrap();
        c.close().unwrap();
    }
    let info = ok(&["info", p(&old)]);
    assert!(
        info.contains(&format!("absolute_win32_path={}", p(&base))),
        "{info}"
    );
    assert!(
        info.contains(&format!("parent file: {}", p(&base))),
        "{info}"
    );
    assert!(
        vdisk_read(&old) == want,
        "the old VHDX child reads differently"
    );

    // VHD: the Unix path in W2ku, a parent name that is not beside it.
    let (vbase, vchild) = chain(&sub, "base.vhd", "child.vhd", 5000);
    let want = vdisk_read(&vchild);
    let vold = dir.join("old.vhd");
    fs::rename(&vchild, &vold).unwrap();
    {
        let parent = vhd::Vhd::open(&vbase, &vhd::OpenOptions::default()).unwrap();
        let st = Box::new(disk::FileStorage::open(&vold, true).unwrap());
        let link = vhd::ParentLink {
            name: "elsewhere.vhd".into(),
            relative: ".\\gone\\elsewhere.vhd".into(),
            absolute: p(&vbase).into(),
            timestamp: 0,
        };
        vhd::Vhd::set_parent_on(st, &parent, &link, false).unwrap();
    }
    let info = ok(&["info", p(&vold)]);
    assert!(info.contains(&format!("W2ku={}", p(&vbase))), "{info}");
    assert!(
        vdisk_read(&vold) == want,
        "the old VHD child reads differently"
    );
}
