//! Unit tests of ChainView over synthetic layers: answers, the granule cache and its bounds.
// Test data: sizes and offsets of small test disks (they fit in memory),
// block sizes and byte patterns.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::error::ErrorKind;
use crate::storage::MemStorage;
use std::sync::atomic::{AtomicU64, Ordering};

const MIB: u64 = 1 << 20;

/// Where one unit of a test layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Absent,
    Zero,
    At(u64),
}

/// A tiny in-memory driver: a table of `unit`-byte units, each absent
/// (the parent's, or unallocated), zero, or at a storage offset; writes
/// copy a whole unit up on first touch.
struct TestDisk {
    size: u64,
    unit: u64,
    storage: MemStorage,
    table: RwLock<Vec<Slot>>,
    parent: Option<Arc<dyn VirtualDisk>>,
    /// Every map answers this instead (for the error tests).
    lie: Option<Mapping>,
    maps: AtomicU64,
}

impl TestDisk {
    fn new(name: &str, size: u64, unit: u64, parent: Option<Arc<TestDisk>>) -> TestDisk {
        Self::over(name, size, unit, parent.map(|p| p as Arc<dyn VirtualDisk>))
    }
    fn over(name: &str, size: u64, unit: u64, parent: Option<Arc<dyn VirtualDisk>>) -> TestDisk {
        TestDisk {
            size,
            unit,
            storage: MemStorage::new(name),
            table: RwLock::new(vec![Slot::Absent; size.div_ceil(unit) as usize]),
            parent,
            lie: None,
            maps: AtomicU64::new(0),
        }
    }
    fn set_zero(&self, offset: u64, len: u64) {
        let mut t = self.table.write().unwrap();
        for u in offset / self.unit..(offset + len).div_ceil(self.unit) {
            t[u as usize] = Slot::Zero;
        }
    }
    fn maps(&self) -> u64 {
        self.maps.load(Ordering::Relaxed)
    }
}

impl VirtualDisk for TestDisk {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }
    fn storage(&self) -> &dyn Storage {
        &self.storage
    }
    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.parent.as_ref()
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        assert!(len > 0 && offset < self.size, "map {offset:#x}+{len:#x}");
        let run = len.min(self.size - offset);
        if let Some(mapping) = self.lie {
            return Ok(Extent {
                offset,
                len: run,
                mapping,
            });
        }
        let t = self.table.read().unwrap();
        let u = (offset / self.unit) as usize;
        let within = offset % self.unit;
        let first = t[u];
        let mut covered = self.unit - within;
        let mut next = u + 1;
        while covered < run && next < t.len() {
            let same = match (first, t[next]) {
                (Slot::At(a), Slot::At(b)) => b == a + (next - u) as u64 * self.unit,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            covered += self.unit;
            next += 1;
        }
        let mapping = match first {
            Slot::Absent if self.parent.is_some() => Mapping::Parent,
            Slot::Absent => Mapping::Unallocated,
            Slot::Zero => Mapping::Zero,
            Slot::At(fo) => Mapping::Data(FileOffset(fo + within)),
        };
        Ok(Extent {
            offset,
            len: covered.min(run),
            mapping,
        })
    }
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        let u = offset / self.unit;
        let within = offset % self.unit;
        let slot = self.table.read().unwrap()[u as usize];
        let fo = match slot {
            Slot::At(fo) => fo,
            Slot::Absent | Slot::Zero => {
                let mut unit = vec![0u8; self.unit.min(self.size - u * self.unit) as usize];
                self.read_at(&mut unit, u * self.unit)?;
                let fo = self.storage.len()?;
                self.storage.write_at(&unit, fo)?;
                self.storage.set_len(fo + self.unit)?;
                self.table.write().unwrap()[u as usize] = Slot::At(fo);
                fo
            }
        };
        Ok(WriteExtent {
            offset,
            len: len.min(self.unit - within).min(self.size - offset),
            file_offset: FileOffset(fo + within),
            fill_partial_sectors: false,
            token: 0,
            copy_up: None,
        })
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A small xorshift generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn put(d: &dyn VirtualDisk, model: &mut [u8], data: &[u8], offset: u64) {
    d.write_at(data, offset).unwrap();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn read(d: &dyn VirtualDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.read_at(&mut v, offset).unwrap();
    v
}

fn check_all(view: &ChainView, model: &[u8], what: &str) {
    let got = read(view, 0, model.len());
    let bare = read(view.top(), 0, model.len());
    for (name, got) in [("view", &got), ("bare leaf", &bare)] {
        if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
            panic!("{what}: {name} differs from the model at byte {i:#x}");
        }
    }
}

/// base (64 KiB units) ← mid ← top, each holding different granules.
fn three_layers(size: u64) -> (Arc<TestDisk>, Arc<TestDisk>, Arc<TestDisk>, Vec<u8>) {
    let mut rng = Rng(0x5eed);
    let mut model = vec![0u8; size as usize];
    let base = Arc::new(TestDisk::new("base", size, 64 * 1024, None));
    // Base: granules 0..4 wholly (written in one go: contiguous).
    put(&*base, &mut model, &rng.bytes(4 * MIB as usize), 0);
    let mid = Arc::new(TestDisk::new("mid", size, 64 * 1024, Some(base.clone())));
    put(&*mid, &mut model, &rng.bytes(MIB as usize), 2 * MIB);
    let top = Arc::new(TestDisk::new("top", size, 64 * 1024, Some(mid.clone())));
    put(&*top, &mut model, &rng.bytes(MIB as usize), 3 * MIB);
    (base, mid, top, model)
}

#[test]
fn data_in_each_layer_comes_from_that_layers_storage() {
    let (base, mid, top, model) = three_layers(8 * MIB);
    let view = ChainView::new(top.clone());
    assert_eq!(view.depth(), 3);
    assert_eq!(view.layers().len(), 3);
    assert_eq!(view.top().storage().name(), "top");
    assert_eq!(view.layer_storage(1).unwrap().name(), "mid");
    assert_eq!(view.layer_storage(2).unwrap().name(), "base");
    check_all(&view, &model, "three layers");

    // Base data: the base's storage, at the base's file offset.
    let e = view.map(MIB + 100, 3 * MIB).unwrap();
    assert_eq!(e.len, MIB - 100);
    assert_eq!(
        e.mapping,
        Mapping::Ancestor {
            depth: 2,
            offset: FileOffset(MIB + 100)
        }
    );
    let e = view.map(2 * MIB + 7, 10).unwrap();
    assert_eq!(
        (e.len, e.mapping),
        (
            10,
            Mapping::Ancestor {
                depth: 1,
                offset: FileOffset(7)
            }
        )
    );
    // Top data stays Data.
    let e = view.map(3 * MIB + 5, 10).unwrap();
    assert_eq!(e.mapping, Mapping::Data(FileOffset(5)));
    // Beyond the base's data: unallocated everywhere.
    let e = view.map(5 * MIB + 1, 4 * MIB).unwrap();
    assert_eq!((e.len, e.mapping), (MIB - 1, Mapping::Unallocated));

    // Once cached, reads of ancestors' data ask neither ancestor again.
    let (b, m) = (base.maps(), mid.maps());
    let mut rng = Rng(7);
    for _ in 0..200 {
        let off = rng.below(8 * MIB - 5000);
        let want = &model[off as usize..off as usize + 5000];
        assert_eq!(read(&view, off, 5000), want, "read at {off:#x}");
    }
    assert_eq!((base.maps(), mid.maps()), (b, m));
}

#[test]
fn zero_and_unallocated_ranges() {
    let size = 6 * MIB + 3 * 512; // a last partial granule
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(99);
    let base = Arc::new(TestDisk::new("base", size, 64 * 1024, None));
    put(&*base, &mut model, &rng.bytes(size as usize), 0);
    let mid = Arc::new(TestDisk::new("mid", size, 64 * 1024, Some(base)));
    // Mid: granule 1 wholly zero, granule 3 partly zero.
    mid.set_zero(MIB, MIB);
    model[MIB as usize..2 * MIB as usize].fill(0);
    mid.set_zero(3 * MIB + 128 * 1024, 64 * 1024);
    model[(3 * MIB + 128 * 1024) as usize..(3 * MIB + 192 * 1024) as usize].fill(0);
    let top = Arc::new(TestDisk::new("top", size, 64 * 1024, Some(mid)));
    let view = ChainView::new(top);
    check_all(&view, &model, "zeros");
    assert_eq!(view.map(MIB + 9, MIB).unwrap().mapping, Mapping::Zero);
    assert_eq!(view.map(MIB + 9, MIB).unwrap().len, MIB - 9);
    let e = view.map(3 * MIB + 128 * 1024 + 1, MIB).unwrap();
    assert_eq!((e.len, e.mapping), (64 * 1024 - 1, Mapping::Zero));
    let e = view.map(size - 512, 4096).unwrap();
    assert_eq!(e.len, 512);
    assert!(matches!(e.mapping, Mapping::Ancestor { depth: 2, .. }));

    // No data anywhere: unallocated through every layer.
    let base = Arc::new(TestDisk::new("empty", 3 * MIB, 4096, None));
    let mid = Arc::new(TestDisk::new("m", 3 * MIB, 4096, Some(base)));
    let view = ChainView::new(Arc::new(TestDisk::new("t", 3 * MIB, 4096, Some(mid))));
    let e = view.map(MIB / 2, 2 * MIB).unwrap();
    assert_eq!((e.len, e.mapping), (MIB / 2, Mapping::Unallocated));
    assert!(read(&view, 1000, 2 * MIB as usize).iter().all(|&b| b == 0));
}

#[test]
fn mixed_granule_with_sector_granular_presence() {
    let size = 4 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(1234);
    let base = Arc::new(TestDisk::new("base", size, 512, None));
    put(&*base, &mut model, &rng.bytes(size as usize), 0);
    // Mid holds every third sector of granule 1, and one sector of granule 2.
    let mid = Arc::new(TestDisk::new("mid", size, 512, Some(base.clone())));
    for s in (0..MIB / 512).step_by(3) {
        put(&*mid, &mut model, &rng.bytes(512), MIB + s * 512);
    }
    put(&*mid, &mut model, &rng.bytes(512), 2 * MIB + 4096);
    let top = Arc::new(TestDisk::new("top", size, 512, Some(mid.clone())));
    let view = ChainView::new(top.clone());
    check_all(&view, &model, "mixed");
    // Sector by sector in the mixed granule.
    let e = view.map(MIB, MIB).unwrap();
    assert_eq!(e.len, 512);
    assert!(matches!(e.mapping, Mapping::Ancestor { depth: 1, .. }));
    let e = view.map(MIB + 512 + 3, MIB).unwrap();
    assert_eq!(e.len, 1024 - 3);
    assert!(
        matches!(e.mapping, Mapping::Ancestor { depth: 2, offset } if offset == FileOffset(MIB + 512 + 3))
    );
    let e = view.map(2 * MIB, MIB).unwrap();
    assert_eq!(e.len, 4096);
    // Unaligned random reads across sectors of different layers.
    for _ in 0..300 {
        let off = rng.below(size - 3000);
        let len = 1 + rng.below(3000) as usize;
        assert_eq!(
            read(&view, off, len),
            model[off as usize..off as usize + len]
        );
    }
    // The mixed granules keep walking; the whole ones are cached.
    let before = base.maps();
    read(&view, 0, MIB as usize);
    assert_eq!(base.maps(), before, "granule 0 is cached");
    read(&view, MIB, 4096);
    assert!(base.maps() > before, "granule 1 walks");
}

#[test]
fn writes_through_the_view_after_cached_reads() {
    let (_base, _mid, top, mut model) = three_layers(8 * MIB);
    let view = ChainView::new(top.clone());
    check_all(&view, &model, "before");
    let mut rng = Rng(42);
    for _ in 0..100 {
        let off = rng.below(8 * MIB - 70_000);
        let len = 1 + rng.below(70_000) as usize;
        let data = rng.bytes(len);
        put(&view, &mut model, &data, off);
        assert_eq!(read(&view, off, data.len()), data);
    }
    check_all(&view, &model, "after writes through the view");
    // Written ranges are now the top's.
    put(&view, &mut model, b"new", MIB + 17);
    assert!(matches!(
        view.map(MIB + 17, 3).unwrap().mapping,
        Mapping::Data(_)
    ));
    // Writes straight to the top are seen too (its answers are never cached).
    put(&*top, &mut model, b"direct", 5 * MIB);
    check_all(&view, &model, "after a write to the top");
    assert!(view.is_writable());
    view.flush().unwrap();
}

#[test]
fn missing_layer_is_an_error_not_a_panic() {
    let base = Arc::new(TestDisk::new("base", MIB, 4096, None));
    let mut liar = TestDisk::new("liar.img", MIB, 4096, Some(base));
    liar.lie = Some(Mapping::Ancestor {
        depth: 5,
        offset: FileOffset(0),
    });
    let liar = Arc::new(liar);
    let mut buf = [0u8; 100];
    // The bare driver has no layers below itself at all.
    let e = liar.read_at(&mut buf, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string().starts_with("liar.img: corrupt block mapping"),
        "{e}"
    );
    // Nor does a two-layer view have a layer 5.
    let view = ChainView::new(liar);
    assert!(view.layer_storage(2).is_none());
    assert!(view.layer_storage(u32::MAX).is_none());
    let e = view.read_at(&mut buf, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("block mapping"), "{e}");
}

#[test]
fn a_view_as_a_parent() {
    // A child whose parent is a view of (mid ← base): the outer view
    // sees the inner view as layer 1 and its layers below as 2, 3.
    let (base, mid, top, mut model) = three_layers(8 * MIB);
    let inner: Arc<dyn VirtualDisk> = Arc::new(ChainView::new(top));
    let child = Arc::new(TestDisk::over("child", 8 * MIB, 4096, Some(inner)));
    put(&*child, &mut model, b"child", 6 * MIB + 1);
    let view = ChainView::new(child);
    assert_eq!(view.depth(), 4);
    let names: Vec<&str> = view.layers().iter().map(|l| l.storage().name()).collect();
    assert_eq!(names, ["child", "top", "mid", "base"]);
    check_all(&view, &model, "nested views");
    let e = view.map(MIB, 1).unwrap();
    assert_eq!(
        e.mapping,
        Mapping::Ancestor {
            depth: 3,
            offset: FileOffset(MIB)
        }
    );
    let e = view.map(2 * MIB, 1).unwrap();
    assert!(matches!(e.mapping, Mapping::Ancestor { depth: 2, .. }));
    let e = view.map(3 * MIB, 1).unwrap();
    assert!(matches!(e.mapping, Mapping::Ancestor { depth: 1, .. }));
    drop((base, mid));
}

#[test]
fn cache_is_bounded() {
    let size = 16 * MIB;
    let mut model = vec![0u8; size as usize];
    let base = Arc::new(TestDisk::new("base", size, 64 * 1024, None));
    put(&*base, &mut model, &Rng(5).bytes(size as usize), 0);
    let top = Arc::new(TestDisk::new("top", size, 64 * 1024, Some(base)));
    let view = ChainView::with_cache_limit(top, 3);
    for round in 0..3 {
        for g in 0..16 {
            let off = g * MIB + round * 1000;
            assert_eq!(
                read(&view, off, 1000),
                model[off as usize..off as usize + 1000]
            );
            assert!(view.cached_granules() <= 3);
        }
    }
    check_all(&view, &model, "bounded");
    assert!(format!("{view:?}").contains("\"base\""));
}

#[test]
fn concurrent_readers_and_a_writer() {
    let (_base, _mid, top, mut model) = three_layers(8 * MIB);
    let view = ChainView::new(top);
    // The writer's range, written before and checked after.
    let data = Rng(3).bytes(300_000);
    let model_before = model.clone();
    model[6 * MIB as usize..6 * MIB as usize + data.len()].copy_from_slice(&data);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (view, model) = (&view, &model_before);
            s.spawn(move || {
                let mut rng = Rng(100 + t);
                for _ in 0..300 {
                    let off = rng.below(6 * MIB - 9000);
                    let len = 1 + rng.below(9000) as usize;
                    assert_eq!(
                        read(view, off, len),
                        model[off as usize..off as usize + len]
                    );
                }
            });
        }
        view.write_at(&data, 6 * MIB).unwrap();
    });
    check_all(&view, &model, "after concurrent use");
}
