//! Test support shared by the format crates' integration tests (feature
//! `testing`): the corpus, external tools (qemu-img as the oracle), sparse
//! raw dumps and deterministic data. Panics on failure: tests only.
#![allow(clippy::missing_panics_doc)]

use crate::{Mapping, VirtualDisk};
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

/// Whether `tool --version` runs (prints a skip message when not).
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed");
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

/// Run a command and return its stdout, panicking when it fails.
pub fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
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

/// Write the first `size` virtual bytes of `d` to a sparse raw file: only
/// extents mapped as data, and only their non-zero 64 KiB pieces.
pub fn dump_raw(d: &dyn VirtualDisk, out: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(out).unwrap();
    f.set_len(size).unwrap();
    let mut pos = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let ext = d.map(pos, size - pos).unwrap();
        let len = ext.len.min(size - pos);
        if let Mapping::Data(_) | Mapping::Parent = ext.mapping {
            let mut p = pos;
            while p < pos + len {
                let n = (pos + len - p).min(buf.len() as u64) as usize;
                d.read_at(&mut buf[..n], p).unwrap();
                for (i, piece) in buf[..n].chunks(65536).enumerate() {
                    if piece.iter().any(|&b| b != 0) {
                        f.write_all_at(piece, p + (i * 65536) as u64).unwrap();
                    }
                }
                p += n as u64;
            }
        }
        pos += len;
    }
}

/// The virtual size qemu-img reports for an image of `format`.
pub fn qemu_virtual_size(img: &Path, format: &str) -> u64 {
    let info = run(Command::new("qemu-img")
        .args(["info", "--output", "json", "-f", format])
        .arg(img));
    let key = "\"virtual-size\":";
    let at = info.rfind(key).expect("virtual-size in qemu-img info") + key.len();
    info[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A cheap fingerprint of a whole file (to prove a read-only open changed nothing).
pub fn file_hash(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `qemu-img compare` (with `-f`/`-F`, or image-opts strings when `fa` is
/// "--image-opts"); Ok when identical, else qemu-img's output.
pub fn qemu_compare(
    a: impl AsRef<std::ffi::OsStr>,
    fa: &str,
    b: impl AsRef<std::ffi::OsStr>,
    fb: &str,
) -> Result<(), String> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("compare");
    if fa == "--image-opts" {
        cmd.arg("--image-opts");
    } else {
        cmd.args(["-f", fa, "-F", fb]);
    }
    let out = cmd.arg(a).arg(b).output().unwrap();
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
