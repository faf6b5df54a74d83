//! Helpers shared by the vhdx integration tests.
#![allow(dead_code)]

use disk::{Mapping, VirtualDisk};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `../shared/corpus/<sub>`, or None (with a message) when absent.
pub fn corpus(sub: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus")
        .join(sub);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("SKIP: corpus directory {} is absent", p.display());
        None
    }
}

/// Whether qemu-img is installed (prints a skip message when not).
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-img is not installed");
    }
    ok
}

/// Run a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decompress a corpus file (.gz, .bz2, .zip) into `dir`; returns the image path.
pub fn decompress(src: &Path, dir: &Path) -> PathBuf {
    let name = src.file_name().unwrap().to_string_lossy().into_owned();
    if let Some(stem) = name.strip_suffix(".gz") {
        let out = dir.join(stem);
        let data = run_bytes(Command::new("gzip").arg("-dc").arg(src));
        std::fs::write(&out, data).unwrap();
        out
    } else if let Some(stem) = name.strip_suffix(".bz2") {
        let out = dir.join(stem);
        let data = run_bytes(Command::new("bzip2").arg("-dc").arg(src));
        std::fs::write(&out, data).unwrap();
        out
    } else if name.ends_with(".zip") {
        let list = run(Command::new("unzip").arg("-Z1").arg(src));
        let inner = list
            .lines()
            .find(|l| l.ends_with(".vhdx") || l.ends_with(".vhd"))
            .expect("an image in the zip")
            .to_string();
        let out = dir.join(Path::new(&inner).file_name().unwrap());
        let data = run_bytes(Command::new("unzip").arg("-p").arg(src).arg(&inner));
        std::fs::write(&out, data).unwrap();
        out
    } else {
        let out = dir.join(&name);
        std::fs::copy(src, &out).unwrap();
        out
    }
}

fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

/// Write the virtual contents of `d` to a sparse raw file: only extents that
/// the disk maps as data, and only their non-zero 64 KiB pieces.
pub fn dump_raw(d: &dyn VirtualDisk, out: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(out).unwrap();
    f.set_len(d.virtual_size()).unwrap();
    let mut pos = 0;
    let size = d.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let ext = d.map(pos, size - pos).unwrap();
        if let Mapping::Data(_) | Mapping::Parent = ext.mapping {
            let mut p = pos;
            while p < pos + ext.len {
                let n = (pos + ext.len - p).min(buf.len() as u64) as usize;
                d.read_at(&mut buf[..n], p).unwrap();
                for (i, piece) in buf[..n].chunks(65536).enumerate() {
                    if piece.iter().any(|&b| b != 0) {
                        f.write_all_at(piece, p + (i * 65536) as u64).unwrap();
                    }
                }
                p += n as u64;
            }
        }
        pos += ext.len;
    }
}

/// `qemu-img compare` of two raw files; true when identical.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// CRC-32C of a whole file (to prove a read-only open changed nothing).
pub fn file_crc(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).unwrap())
}
