//! What every hostile case shares: the counting allocator, the valid images
//! the cases start from, byte patching (checksums recomputed on request),
//! and the run through the front door with its assertions.

use disk::{Error, ErrorKind, VirtualDisk};
use image::{Format, OpenOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

pub const MIB: u64 = 1 << 20;
/// Virtual size of the images the cases start from.
pub const SIZE: u64 = 8 * MIB;
/// The bytes written at the start and at the end of every base image.
pub const FIRST: u8 = 0xA1;
pub const LAST: u8 = 0xB2;

/// The most live heap an open, a read of the first and last MiB and a close
/// may add, whatever the image claims. The inputs are files of 1.5 to
/// 6 MiB. What the drivers read whole is bounded by the file: a VHDX's
/// metadata region (1 MiB here; the driver refuses more than 64 MiB) and
/// log region (1 MiB; refused past 256 MiB), plus the entries decoded from
/// the log (at most its size again); a VHD's BAT (a few KiB here) and
/// a bitmap per block. BAT and sector bitmap pages are cached 4 KiB at a
/// time. A read of 1 MiB maps and copies into the caller's buffer
/// (allocated before the measure). So about 4 MiB is legitimate for these
/// files; 8 MiB leaves room for the allocator's rounding and the error
/// strings, and is far below what any of the sizes the cases claim (64 TiB
/// disks, 4 GiB tables, 2^32 entries, huge item counts) would take if it
/// were believed.
pub const BOUND: i64 = 8 << 20;

/// The largest peak any case measured (printed by each case).
static MAX_PEAK: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Bytes allocated minus bytes freed by this thread (negative when it
    /// frees what another thread allocated).
    static CURRENT: Cell<i64> = const { Cell::new(0) };
    /// The largest `CURRENT` since the last [`measure`] began.
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    // Both cells are const-initialized without a destructor: no allocation
    // here, and `try_with` never fails, even while the thread exits.
    let _ = CURRENT.try_with(|c| {
        let v = c.get() + delta;
        c.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v);
            }
        });
    });
}

fn size_of(layout: Layout) -> i64 {
    i64::try_from(layout.size()).unwrap_or(i64::MAX)
}

/// The system allocator, counting live bytes per thread.
pub struct Counting;

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; the counting only updates two
// thread-local integers and never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(size_of(layout));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(size_of(layout));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        account(-size_of(layout));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(i64::try_from(new_size).unwrap_or(i64::MAX) - size_of(layout));
        }
        p
    }
}

/// Run `f` and return its result with the peak of this thread's live heap
/// above where it was when `f` began.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, i64) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get) - base;
    (r, peak)
}

/// Fail unless `peak` is within [`BOUND`]; record and print it.
pub fn assert_bounded(what: &str, peak: i64) {
    MAX_PEAK.fetch_max(peak, Ordering::Relaxed);
    eprintln!(
        "hostile {what}: peak {peak} bytes (largest so far {})",
        MAX_PEAK.load(Ordering::Relaxed)
    );
    assert!(
        peak <= BOUND,
        "{what}: {peak} bytes of heap at the peak, more than the {BOUND}-byte bound"
    );
}

// ---------------------------------------------------------------- images

/// A new dynamic VHDX in `dir`: 8 MiB, 1 MiB blocks, the first MiB filled
/// with [`FIRST`] and the last with [`LAST`] (blocks 0 and 7, at file
/// offsets 4 MiB and 5 MiB). Layout: headers at 64/128 KiB, region tables
/// at 192/256 KiB, log at 1 MiB (1 MiB), metadata at 2 MiB (1 MiB), BAT at
/// 3 MiB (1 MiB).
pub fn vhdx_image(dir: &Path, name: &str) -> PathBuf {
    vhdx_sized(dir, name, SIZE, true)
}

/// A new dynamic VHDX of `size` bytes in `dir` (1 MiB blocks), with the
/// base pattern when `data`.
pub fn vhdx_sized(dir: &Path, name: &str, size: u64, data: bool) -> PathBuf {
    let p = dir.join(name);
    let mut o = vhdx::CreateOptions::new(size);
    o.block_size = MIB as u32;
    let d = vhdx::Vhdx::create(&p, &o, false).unwrap();
    if data {
        d.write_at(&vec![FIRST; MIB as usize], 0).unwrap();
        d.write_at(&vec![LAST; MIB as usize], size - MIB).unwrap();
    }
    d.close().unwrap();
    p
}

/// A new dynamic VHD in `dir`: 8 MiB (CHS-rounded), 1 MiB blocks, the base
/// pattern at its first and last MiB. Layout: footer copy at 0, dynamic
/// disk header at 512, BAT at 1536, blocks from 4 KiB on, footer at the end.
pub fn vhd_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut o = vhd::CreateOptions::new(SIZE);
    o.block_size = MIB as u32;
    let d = vhd::Vhd::create(&p, &o, false).unwrap();
    let size = d.virtual_size();
    d.write_at(&vec![FIRST; MIB as usize], 0).unwrap();
    d.write_at(&vec![LAST; MIB as usize], size - MIB).unwrap();
    d.close().unwrap();
    p
}

// ------------------------------------------------------------- patching

pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

pub fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

/// Change `len` bytes at `off` with `f`, then store the CRC-32C of the
/// `len` bytes (checksum field zeroed) at `off + 4` when `fix_crc` (VHDX
/// headers, region tables).
pub fn edit_vhdx_crc(path: &Path, off: u64, len: usize, fix_crc: bool, f: impl FnOnce(&mut [u8])) {
    let mut b = read_at(path, off, len);
    f(&mut b);
    if fix_crc {
        let crc = vhdx::guid::crc32c_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    patch(path, off, &b);
}

/// Edit header copy `slot` (0 at 64 KiB, 1 at 128 KiB) as a structure; its
/// checksum is recomputed.
pub fn edit_header(path: &Path, slot: usize, f: impl FnOnce(&mut vhdx::header::Header)) {
    let off = vhdx::header::Header::OFFSETS[slot];
    let mut h = vhdx::header::Header::parse(&read_at(path, off, 4096)).unwrap();
    f(&mut h);
    patch(path, off, &h.to_bytes());
}

/// Edit both region table copies' bytes; checksums recomputed.
pub fn edit_regions(path: &Path, f: impl Fn(&mut [u8])) {
    for off in vhdx::region_table::RegionTable::OFFSETS {
        edit_vhdx_crc(path, off, 64 * 1024, true, &f);
    }
}

/// Edit both region table copies as structures; checksums recomputed.
pub fn edit_region_entries(path: &Path, f: impl Fn(&mut Vec<vhdx::region_table::RegionEntry>)) {
    use vhdx::region_table::RegionTable;
    let mut t = RegionTable::parse(&read_at(path, RegionTable::OFFSETS[0], 65536)).unwrap();
    f(&mut t.entries);
    for off in RegionTable::OFFSETS {
        patch(path, off, &t.to_bytes());
    }
}

/// The metadata region's file offset (2 MiB in the base image).
pub const METADATA: u64 = 2 * MIB;
/// The BAT's file offset (3 MiB in the base image).
pub const BAT: u64 = 3 * MIB;

/// Edit the metadata table (the metadata region's first 64 KiB).
pub fn edit_metadata_table(path: &Path, f: impl FnOnce(&mut vhdx::metadata::MetadataTable)) {
    use vhdx::metadata::MetadataTable;
    let mut buf = read_at(path, METADATA, 65536);
    let mut t = MetadataTable::parse(&buf, MIB).unwrap();
    f(&mut t);
    t.write_to(&mut buf);
    patch(path, METADATA, &buf);
}

/// The file offset of the system metadata item `id`.
pub fn metadata_item(path: &Path, id: uuid::Uuid) -> u64 {
    let t = vhdx::metadata::MetadataTable::parse(&read_at(path, METADATA, 65536), MIB).unwrap();
    METADATA + u64::from(t.find(id).unwrap().offset)
}

/// Set BAT entry `index` of a VHDX to `state` at `file_offset`.
pub fn set_bat(path: &Path, index: u64, state: u64, file_offset: u64) {
    patch(path, BAT + index * 8, &(file_offset | state).to_le_bytes());
}

/// The BAT entry `index` of a VHDX, raw.
pub fn bat(path: &Path, index: u64) -> u64 {
    u64::from_le_bytes(read_at(path, BAT + index * 8, 8).try_into().unwrap())
}

/// Edit the 512-byte VHD footer at `off`; its checksum is recomputed
/// when `fix`.
pub fn edit_vhd_footer(path: &Path, off: u64, fix: bool, f: impl FnOnce(&mut [u8])) {
    let mut b = read_at(path, off, 512);
    f(&mut b);
    if fix {
        let c = vhd::footer::checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
    }
    patch(path, off, &b);
}

/// Edit both VHD footers (the copy at 0 and the trailing one).
pub fn edit_vhd_footers(path: &Path, fix: bool, f: impl Fn(&mut [u8])) {
    let end = file_len(path) - 512;
    edit_vhd_footer(path, 0, fix, &f);
    edit_vhd_footer(path, end, fix, &f);
}

/// The VHD dynamic disk header's offset (512 in the base image).
pub const DYN_HEADER: u64 = 512;
/// The VHD BAT's offset (1536 in the base image).
pub const VHD_BAT: u64 = 1536;

/// Edit the 1024-byte VHD dynamic disk header; its checksum is recomputed
/// when `fix`.
pub fn edit_dyn_header(path: &Path, fix: bool, f: impl FnOnce(&mut [u8])) {
    let mut b = read_at(path, DYN_HEADER, 1024);
    f(&mut b);
    if fix {
        let c = vhd::footer::checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
    }
    patch(path, DYN_HEADER, &b);
}

/// Big-endian helpers for VHD fields.
pub fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// VHD BAT entry `i` (a sector number, big-endian).
pub fn vhd_bat(path: &Path, i: u64) -> u32 {
    be32(&read_at(path, VHD_BAT + i * 4, 4), 0)
}
pub fn set_vhd_bat(path: &Path, i: u64, sector: u32) {
    patch(path, VHD_BAT + i * 4, &sector.to_be_bytes());
}

// --------------------------------------------------------------- running

/// How far a run through the front door got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `image::open` failed.
    Open,
    /// The read of the first or last MiB failed.
    Read,
    /// Every step succeeded.
    Done,
}

/// One open + read of the first and last MiB + close.
pub struct Run {
    pub stage: Stage,
    pub err: Option<Error>,
    pub first: Vec<u8>,
    pub last: Vec<u8>,
    pub peak: i64,
}

impl Run {
    /// The error, which the run must have met at `stage`, of `kind`, its
    /// message naming `file`.
    pub fn failed(&self, stage: Stage, kind: ErrorKind, file: &Path) -> &Error {
        assert_eq!(self.stage, stage, "{:?}", self.err);
        let e = self.err.as_ref().expect("an error");
        assert_eq!(e.kind(), kind, "{e}");
        let name = file.display().to_string();
        assert!(e.to_string().contains(&name), "not naming {name}: {e}");
        e
    }
}

/// Open `path` with `opts`, read its first and last MiB, close it: the
/// whole measured.
pub fn run(path: &Path, opts: &OpenOptions) -> Run {
    let mut first = vec![0u8; MIB as usize];
    let mut last = vec![0u8; MIB as usize];
    let ((stage, err), peak) = measure(|| {
        let img = match image::open(path, opts) {
            Ok(i) => i,
            Err(e) => return (Stage::Open, Some(e)),
        };
        let d = img.disk();
        let size = d.virtual_size();
        let n = size.min(MIB) as usize;
        let r = d
            .read_at(&mut first[..n], 0)
            .and_then(|()| d.read_at(&mut last[..n], size - n as u64));
        if let Err(e) = r {
            return (Stage::Read, Some(e));
        }
        if let Err(e) = img.close() {
            return (Stage::Read, Some(e));
        }
        (Stage::Done, None)
    });
    Run {
        stage,
        err,
        first,
        last,
        peak,
    }
}

/// Run `path` through the front door twice, probing its format and with
/// `format` given; both runs must agree on how far they got and the error
/// kind, and stay within the memory bound. Returns the run with the format
/// given.
pub fn front_door(what: &str, path: &Path, format: Format) -> Run {
    let probed = run(path, &OpenOptions::probing());
    assert_bounded(&format!("{what} (probed)"), probed.peak);
    let given = run(path, &OpenOptions::new(format));
    assert_bounded(what, given.peak);
    assert_eq!(
        (probed.stage, probed.err.as_ref().map(Error::kind)),
        (given.stage, given.err.as_ref().map(Error::kind)),
        "{what}: probed {:?}, given {:?}",
        probed.err,
        given.err
    );
    given
}

/// The case opens and reads the base pattern.
pub fn opens_with_data(what: &str, path: &Path, format: Format) -> Run {
    let r = front_door(what, path, format);
    assert_eq!(r.stage, Stage::Done, "{what}: {:?}", r.err);
    assert!(r.first.iter().all(|&b| b == FIRST), "{what}: first MiB");
    assert!(r.last.iter().all(|&b| b == LAST), "{what}: last MiB");
    r
}

/// The case fails at `stage` with a corruption error naming `path`, the
/// on-disk `structure` and the file `offset`, its message holding each of
/// `words`.
pub fn corrupt(
    what: &str,
    path: &Path,
    format: Format,
    stage: Stage,
    structure: &str,
    offset: u64,
    words: &[&str],
) -> Error {
    let r = front_door(what, path, format);
    let e = r.failed(stage, ErrorKind::Corrupt, path).clone_error();
    assert_corrupt(&e, structure, offset);
    has_words(&e, words);
    e
}

/// The case fails at `stage` with an error of `kind` naming `path`, its
/// message holding each of `words`.
pub fn fails(
    what: &str,
    path: &Path,
    format: Format,
    stage: Stage,
    kind: ErrorKind,
    words: &[&str],
) -> Error {
    let r = front_door(what, path, format);
    let e = r.failed(stage, kind, path).clone_error();
    has_words(&e, words);
    e
}

/// `e` is a corruption of `structure` at file offset `offset`.
pub fn assert_corrupt(e: &Error, structure: &str, offset: u64) {
    match e {
        Error::Corrupt {
            structure: s,
            offset: o,
            ..
        } => assert_eq!((*s, *o), (structure, offset), "{e}"),
        _ => panic!("not a corruption: {e}"),
    }
}

pub fn has_words(e: &Error, words: &[&str]) {
    let m = e.to_string();
    for w in words {
        assert!(m.contains(w), "{w:?} not in: {m}");
    }
}

/// A copy of an error (`disk::Error` holds an `io::Error`, which is not
/// `Clone`).
pub trait CloneError {
    fn clone_error(&self) -> Error;
}

impl CloneError for Error {
    fn clone_error(&self) -> Error {
        match self {
            Error::Corrupt {
                file,
                structure,
                offset,
                msg,
            } => Error::Corrupt {
                file: file.clone(),
                structure,
                offset: *offset,
                msg: msg.clone(),
            },
            Error::Unsupported { file, msg } => Error::Unsupported {
                file: file.clone(),
                msg: msg.clone(),
            },
            Error::Io {
                file,
                context,
                os_error,
            } => Error::Io {
                file: file.clone(),
                context: context.clone(),
                os_error: std::io::Error::new(os_error.kind(), os_error.to_string()),
            },
            Error::InvalidInput { file, msg } => Error::InvalidInput {
                file: file.clone(),
                msg: msg.clone(),
            },
            Error::Locked { file, msg } => Error::Locked {
                file: file.clone(),
                msg: msg.clone(),
            },
        }
    }
}
