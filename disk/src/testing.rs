//! Test support shared by the format crates' integration tests (feature
//! `testing`): the corpus, external tools (qemu-img as the oracle), sparse
//! raw dumps and deterministic data. Panics on failure: tests only.
#![allow(clippy::missing_panics_doc)]
// Test support: models and buffers of small test disks, whose sizes and
// offsets fit in memory by construction; `as u8` makes test patterns.
#![allow(clippy::cast_possible_truncation)]

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

/// The images in `../shared/corpus/<sub>`, sorted, without the `*orphan*`
/// ones (whose parents are absent); None (with a message) when absent.
pub fn corpus_images(sub: &str) -> Option<Vec<PathBuf>> {
    let dir = corpus(sub)?;
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().contains("orphan"))
        .collect();
    v.sort();
    Some(v)
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
        if let Mapping::Data(_) | Mapping::Ancestor { .. } | Mapping::Parent = ext.mapping {
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

/// The whole virtual disk.
pub fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// A short text that names its own offset: written at `at` by tests that
/// check, after an operation, that what was written stayed in place.
pub fn mark(at: u64) -> Vec<u8> {
    format!("mark at {at:#x}").into_bytes()
}

/// Every [`mark`] of `marks` reads back at its offset.
pub fn check_marks(d: &dyn VirtualDisk, marks: &[u64], what: &str) {
    for &m in marks {
        let want = mark(m);
        let mut got = vec![0u8; want.len()];
        d.read_at(&mut got, m).unwrap();
        assert_eq!(got, want, "{what}: mark at {m:#x}");
    }
}

/// Where each [`mark`] of `marks` was, `d` reads zeros (a cut part that
/// was grown back).
pub fn check_marks_gone(d: &dyn VirtualDisk, marks: &[u64], what: &str) {
    for &m in marks {
        let mut b = vec![0xffu8; mark(m).len()];
        d.read_at(&mut b, m).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "{what}: cut data at {m:#x} came back"
        );
    }
}

/// Panic naming the first differing byte (a readable failure for disks).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

/// Where the `s`-th sector of [`copy_up_race`] lies: spread over 8 MiB.
pub fn copy_up_sector_at(s: u64) -> u64 {
    (s * 7 % 8) * (1 << 20) + (s / 8) * 512 * 3
}

/// The copy-up race of a differencing disk of at least 8 MiB whose parent
/// reads `parent` everywhere (see `disk::copy_up`). Two threads write bytes [0, 100) and [300, 400) of each test sector at
/// the same moment; every sector must end with both writes and the
/// parent's bytes around them.
pub fn copy_up_race(d: std::sync::Arc<dyn VirtualDisk>, sectors: u64, parent: u8) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let writer = |range: std::ops::Range<u64>, byte: u8| {
        let d = d.clone();
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let buf = vec![byte; usize::try_from(range.end - range.start).unwrap()];
            for s in 0..sectors {
                barrier.wait();
                d.write_at(&buf, copy_up_sector_at(s) + range.start)
                    .unwrap();
            }
        })
    };
    let a = writer(0..100, 0xa1);
    let b = writer(300..400, 0xb2);
    a.join().unwrap();
    b.join().unwrap();
    let mut lost = Vec::new();
    for s in 0..sectors {
        let mut sector = [0u8; 512];
        d.read_at(&mut sector, copy_up_sector_at(s)).unwrap();
        let ok = sector[..100].iter().all(|&x| x == 0xa1)
            && sector[100..300].iter().all(|&x| x == parent)
            && sector[300..400].iter().all(|&x| x == 0xb2)
            && sector[400..].iter().all(|&x| x == parent);
        if !ok {
            lost.push(s);
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {sectors} sectors lost a write: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Pattern writes that make a parent disk interesting: the first 3/8
/// (whole blocks), 70 000 bytes just past the middle (a partial block),
/// and the last 1/20 (the end). Returns the disk's content afterwards,
/// assuming it read as zeros before.
pub fn fill_parent(d: &dyn VirtualDisk, seed: u64) -> Vec<u8> {
    let size = d.virtual_size();
    let mut model = vec![0u8; size as usize];
    for (i, (off, len)) in [
        (0u64, size * 3 / 8),
        (size / 2 + 1000, 70_000),
        (size - size / 20, size / 20),
    ]
    .into_iter()
    .enumerate()
    {
        let p = pattern(len as usize, seed + i as u64);
        d.write_at(&p, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&p);
    }
    model
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

/// Crash-test harness: run a workload on a disk over a
/// [`RecordingStorage`](crate::fault::RecordingStorage), then check, for a
/// crash image cut at any point, that every write acknowledged by a
/// completed flush reads back.
pub mod crash {
    use crate::fault::RecordingStorage;
    use crate::VirtualDisk;
    use std::collections::{BTreeMap, BTreeSet};

    /// Bytes per workload write (one page, page-aligned).
    pub const PAGE: u64 = 4096;

    struct Write {
        start_op: usize,
        page: u64,
        data: Vec<u8>,
    }

    struct Flush {
        start_op: usize,
        done_op: usize,
    }

    /// The writes and flushes of a recorded workload.
    pub struct Workload {
        writes: Vec<Write>,
        flushes: Vec<Flush>,
    }

    fn fill(seed: u64) -> Vec<u8> {
        (0..PAGE)
            .map(|i| ((i * 31 + seed * 17) % 251) as u8 + 1)
            .collect()
    }

    impl Workload {
        /// Run 48 page writes (mostly fresh pages, some overwrites) on
        /// `d` within its first `pages` pages, with a flush after every 7th
        /// and at the end, recording the operation counts of `rec`. Leaves
        /// `d` unflushed past the last flush: the caller forgets it (a crash).
        pub fn run(rec: &RecordingStorage, d: &dyn VirtualDisk, pages: u64, seed: u64) -> Self {
            let mut w = Workload {
                writes: Vec::new(),
                flushes: Vec::new(),
            };
            let mut x = seed | 1;
            for i in 0..48u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = if i % 5 == 4 && !w.writes.is_empty() {
                    w.writes[(x as usize) % w.writes.len()].page
                } else {
                    x % pages
                };
                let data = fill(i + seed);
                let start_op = rec.op_count();
                d.write_at(&data, page * PAGE).unwrap();
                w.writes.push(Write {
                    start_op,
                    page,
                    data,
                });
                if i % 7 == 6 || i == 47 {
                    let start_op = rec.op_count();
                    d.flush().unwrap();
                    w.flushes.push(Flush {
                        start_op,
                        done_op: rec.op_count(),
                    });
                }
            }
            w
        }

        /// Check `d`, opened from the crash image cut before operation
        /// `cut`: each page written holds what the last flush completed
        /// before the cut acknowledged, or (in `tear`-byte pieces, the
        /// granularity at which an unacknowledged write may be torn) what
        /// a later write put there. `what` names the case in panics.
        pub fn verify(&self, d: &dyn VirtualDisk, cut: usize, tear: usize, what: &str) {
            let acked = self.flushes.iter().rev().find(|f| f.done_op <= cut);
            let ack_start = acked.map_or(0, |f| f.start_op);
            let mut required: BTreeMap<u64, &[u8]> = BTreeMap::new();
            let mut extras: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
            for w in &self.writes {
                if acked.is_some() && w.start_op < ack_start {
                    required.insert(w.page, &w.data);
                } else if w.start_op < cut {
                    extras.entry(w.page).or_default().push(&w.data);
                }
            }
            let zero = vec![0u8; PAGE as usize];
            let pages: BTreeSet<u64> = required.keys().chain(extras.keys()).copied().collect();
            for p in pages {
                let mut got = vec![0u8; PAGE as usize];
                d.read_at(&mut got, p * PAGE)
                    .unwrap_or_else(|e| panic!("{what}: read of page {p} failed: {e}"));
                let req: &[u8] = required.get(&p).copied().unwrap_or(&zero);
                for (i, piece) in got.chunks(tear).enumerate() {
                    let r = i * tear..(i + 1) * tear;
                    let ok = piece == &req[r.clone()]
                        || extras
                            .get(&p)
                            .is_some_and(|v| v.iter().any(|x| piece == &x[r.clone()]));
                    assert!(
                        ok,
                        "{what}: page {p} piece {i} lost an acknowledged write (or holds garbage)"
                    );
                }
            }
        }
    }

    /// A crash workload for differencing disks: random unaligned writes
    /// over a parent whose content is known, checked per 512-byte sector.
    pub struct DiffWorkload {
        parent: Vec<u8>,
        /// Per sector, the values the writes gave it, by write index.
        sectors: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
        /// Operation count of the recording when each write started.
        write_start: Vec<usize>,
        /// (start, done) operation counts of each flush.
        flushes: Vec<(usize, usize)>,
    }

    /// Bytes at the end of the disk the workload leaves alone (for a
    /// recovery write by the caller).
    pub const DIFF_SPARE: u64 = 64 * 1024;

    impl DiffWorkload {
        /// Run 40 writes of 1..9000 bytes at random offsets (never in the
        /// last [`DIFF_SPARE`] bytes) on `d`, whose parent reads `parent`,
        /// flushing after every 6th and at the end, recording the
        /// operation counts of `rec`. The caller then forgets `d` (a crash).
        pub fn run(
            rec: &RecordingStorage,
            d: &dyn VirtualDisk,
            parent: Vec<u8>,
            seed: u64,
        ) -> Self {
            let size = d.virtual_size();
            let mut h = DiffWorkload {
                parent,
                sectors: BTreeMap::new(),
                write_start: Vec::new(),
                flushes: Vec::new(),
            };
            let mut model = h.parent.clone();
            let mut x = seed | 1;
            for i in 0..40usize {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = (x >> 40) as usize % 9000 + 1;
                let off = x % (size - DIFF_SPARE - len as u64);
                let p = super::pattern(len, x);
                h.write_start.push(rec.op_count());
                d.write_at(&p, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&p);
                for s in off / 512..(off + len as u64).div_ceil(512) {
                    let r = (s * 512) as usize..(s * 512 + 512) as usize;
                    h.sectors.entry(s).or_default().push((i, model[r].to_vec()));
                }
                if i % 6 == 5 || i == 39 {
                    let start = rec.op_count();
                    d.flush().unwrap();
                    h.flushes.push((start, rec.op_count()));
                }
            }
            h
        }

        /// The parent's content.
        pub fn parent(&self) -> &[u8] {
            &self.parent
        }

        /// Check a disk opened from the crash image cut before operation
        /// `cut`: every sector holds the value the last completed flush
        /// acknowledged or one a later write (started before the cut) gave
        /// it; sectors never written read as the parent.
        pub fn verify(&self, d: &dyn VirtualDisk, cut: usize, what: &str) {
            let acked = self
                .flushes
                .iter()
                .rev()
                .find(|f| f.1 <= cut)
                .map_or(0, |f| self.write_start.iter().filter(|&&s| s < f.0).count());
            let started = self.write_start.iter().filter(|&&s| s < cut).count();
            let mut all = vec![0u8; d.virtual_size() as usize];
            d.read_at(&mut all, 0)
                .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
            for (s, vals) in &self.sectors {
                let r = (*s * 512) as usize..(*s * 512 + 512) as usize;
                let got = &all[r.clone()];
                let base: &[u8] = vals
                    .iter()
                    .rev()
                    .find(|(i, _)| *i < acked)
                    .map_or(&self.parent[r.clone()], |(_, v)| v);
                let ok = got == base
                    || vals
                        .iter()
                        .any(|(i, v)| (acked..started).contains(i) && got == &v[..]);
                assert!(
                    ok,
                    "{what}: sector {s} lost an acknowledged write or holds junk"
                );
            }
            let end = all.len() - DIFF_SPARE as usize;
            for (i, c) in all[..end].chunks(512).enumerate() {
                if !self.sectors.contains_key(&(i as u64)) {
                    assert!(
                        c == &self.parent[i * 512..i * 512 + 512],
                        "{what}: sector {i} changed"
                    );
                }
            }
        }
    }

    /// Call `check(image, cut, strategy)` for every cut point of `rec`'s
    /// recording and three strategies for the unflushed writes before the
    /// cut: all dropped, all kept, and a pseudo-random subset (torn).
    pub fn for_each_crash(
        rec: &RecordingStorage,
        seed: u64,
        mut check: impl FnMut(Vec<u8>, usize, &str),
    ) {
        for cut in 0..=rec.op_count() {
            check(rec.crash_image(cut, |_| false), cut, "drop-unflushed");
            check(rec.crash_image(cut, |_| true), cut, "keep-unflushed");
            let mut h = seed ^ cut as u64;
            let torn = rec.crash_image(cut, |_| {
                h = h
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                h >> 63 == 1
            });
            check(torn, cut, "torn");
        }
    }
}

/// A journal of what files opened through a recording [`crate::Opener`]
/// undergo under one directory, across files, to rebuild what a power cut
/// could leave of a multi-file operation (a merge writes several images,
/// each flushed on its own).
///
/// A crash at cut point `k` leaves each file as of its own last flush
/// before `k`, plus any subset of its later writes before `k` (4 KiB
/// pieces: a write can tear); a flush of one file makes nothing durable in
/// another. File creation and the directory itself are taken as durable.
pub mod journal {
    use crate::error::Result;
    use crate::fault::Op;
    use crate::lock::LockMode;
    use crate::opener::{FileOpener, Opener};
    use crate::storage::Storage;
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, MutexGuard};

    const PIECE: u64 = 4096;

    /// What was done, in order: (file, operation).
    type Ops = Arc<Mutex<Vec<(PathBuf, Op)>>>;

    fn lock(ops: &Ops) -> MutexGuard<'_, Vec<(PathBuf, Op)>> {
        ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An opener of real files that journals what is done to those
    /// directly in its directory.
    #[derive(Debug)]
    struct JournalOpener {
        dir: PathBuf,
        ops: Ops,
    }

    impl JournalOpener {
        /// `storage` (opened at `path`), journaled when `path` lies in the
        /// directory.
        fn wrap(&self, path: &Path, storage: Box<dyn Storage>) -> Box<dyn Storage> {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            if abs.parent() != Some(self.dir.as_path()) {
                return storage;
            }
            Box::new(Journaled {
                inner: storage,
                path: abs,
                ops: self.ops.clone(),
            })
        }
    }

    impl Opener for JournalOpener {
        fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Box<dyn Storage>> {
            Ok(self.wrap(path, FileOpener.open(path, writable, lock)?))
        }

        fn create(&self, path: &Path, overwrite: bool) -> Result<Box<dyn Storage>> {
            let st = self.wrap(path, FileOpener.create(path, overwrite)?);
            // A created (or emptied) file starts empty.
            st.set_len(0)?;
            Ok(st)
        }
    }

    /// A storage whose writes, length changes and flushes are journaled.
    struct Journaled {
        inner: Box<dyn Storage>,
        path: PathBuf,
        ops: Ops,
    }

    impl Journaled {
        fn record(&self, op: Op) {
            let mut ops = lock(&self.ops);
            match op {
                Op::Write { offset, data } => {
                    let mut at = 0usize;
                    while at < data.len() {
                        let off = offset + at as u64;
                        let n = ((PIECE - off % PIECE) as usize).min(data.len() - at);
                        ops.push((
                            self.path.clone(),
                            Op::Write {
                                offset: off,
                                data: data[at..at + n].to_vec(),
                            },
                        ));
                        at += n;
                    }
                }
                other => ops.push((self.path.clone(), other)),
            }
        }
    }

    impl Storage for Journaled {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.record(Op::Write {
                offset,
                data: buf.to_vec(),
            });
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()?;
            self.record(Op::Flush);
            Ok(())
        }
        fn len(&self) -> Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.record(Op::SetLen(len));
            self.inner.set_len(len)
        }
        fn is_writable(&self) -> bool {
            self.inner.is_writable()
        }
        fn file_id(&self) -> Option<(u64, u64)> {
            self.inner.file_id()
        }
        fn data_run(&self, offset: u64) -> Result<Option<(u64, u64)>> {
            self.inner.data_run(offset)
        }
    }

    /// A journal being recorded: pass [`Recorder::opener`] to the operation,
    /// then [`Recorder::finish`].
    pub struct Recorder {
        initial: BTreeMap<String, Vec<u8>>,
        opener: Arc<JournalOpener>,
    }

    /// Start recording what is done to the files directly in `dir` (which
    /// must exist) through the recorder's opener, after taking a copy of
    /// them.
    pub fn start(dir: &Path) -> Recorder {
        let dir = std::fs::canonicalize(dir).unwrap();
        let initial = read_dir_files(&dir);
        Recorder {
            initial,
            opener: Arc::new(JournalOpener {
                dir,
                ops: Arc::default(),
            }),
        }
    }

    /// The regular files directly in `dir`, by name.
    pub fn read_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                m.insert(name, std::fs::read(e.path()).unwrap());
            }
        }
        m
    }

    impl Recorder {
        /// The opener whose files are journaled.
        pub fn opener(&self) -> Arc<dyn Opener> {
            self.opener.clone()
        }

        /// Stop recording; the journal of what was done since [`start`].
        pub fn finish(self) -> Journal {
            let ops = std::mem::take(&mut *lock(&self.opener.ops))
                .into_iter()
                .map(|(p, op)| (p.file_name().unwrap().to_string_lossy().into_owned(), op))
                .collect();
            Journal {
                initial: self.initial,
                ops,
            }
        }
    }

    /// The files as they were, and what was done to them, in order.
    pub struct Journal {
        initial: BTreeMap<String, Vec<u8>>,
        ops: Vec<(String, Op)>,
    }

    impl Journal {
        /// Number of recorded operations (cut points are `0..=len`).
        pub fn len(&self) -> usize {
            self.ops.len()
        }

        /// Whether nothing was recorded.
        pub fn is_empty(&self) -> bool {
            self.ops.is_empty()
        }

        /// The files (by name) a power cut just before operation `cut` may
        /// leave: each file's operations up to its own last flush before
        /// `cut`, then those later ones before `cut` whose index `keep`
        /// accepts. Files created during the operation start empty.
        pub fn crash_files(
            &self,
            cut: usize,
            mut keep: impl FnMut(usize) -> bool,
        ) -> BTreeMap<String, Vec<u8>> {
            let cut = cut.min(self.ops.len());
            let mut files = self.initial.clone();
            let mut last_flush: BTreeMap<&str, usize> = BTreeMap::new();
            for (i, (f, op)) in self.ops[..cut].iter().enumerate() {
                if *op == Op::Flush {
                    last_flush.insert(f, i);
                }
            }
            for (i, (f, op)) in self.ops[..cut].iter().enumerate() {
                let durable = last_flush.get(f.as_str()).is_some_and(|&l| i < l);
                if !durable && !keep(i) {
                    continue;
                }
                let img = files.entry(f.clone()).or_default();
                match op {
                    Op::Write { offset, data } => {
                        let (s, e) = (*offset as usize, *offset as usize + data.len());
                        if img.len() < e {
                            img.resize(e, 0);
                        }
                        img[s..e].copy_from_slice(data);
                    }
                    Op::SetLen(n) => img.resize(*n as usize, 0),
                    Op::Flush => {}
                }
            }
            files
        }

        /// The cut points worth testing: every operation boundary when
        /// there are at most `max`, else `max` spread evenly plus every
        /// flush boundary (and the end).
        pub fn cut_points(&self, max: usize) -> Vec<usize> {
            let n = self.ops.len();
            let mut v: Vec<usize> = if n <= max {
                (0..=n).collect()
            } else {
                (0..max).map(|i| i * n / max).collect()
            };
            for (i, (_, op)) in self.ops.iter().enumerate() {
                if *op == Op::Flush {
                    v.push(i);
                    v.push(i + 1);
                }
            }
            v.push(n);
            v.sort_unstable();
            v.dedup();
            v
        }
    }

    /// Replace the files directly in `dir` by `files`.
    pub fn materialize(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
