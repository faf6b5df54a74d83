//! A merged view of a differencing chain: reads of data that lives in an
//! ancestor cost one lookup in the top layer and one cache lookup, not one
//! lookup per layer.
//!
//! Read through a bare differencing layer, a block the layer does not hold
//! maps to [`Mapping::Parent`] and the read loop asks the parent, which may
//! answer `Parent` again: a chain of depth 64 costs 64 lookups per read.
//! [`ChainView`] answers for the whole chain instead. It asks the top layer
//! first (the only writable one, so its answers are never cached); when the
//! top says `Parent`, it resolves the range in the ancestors and answers
//! [`Mapping::Ancestor`] (which layer's storage, and where), `Zero` or
//! `Unallocated`. The shared read loop ([`VirtualDisk::read_at`]) then reads
//! an `Ancestor` extent straight from that layer's storage
//! ([`VirtualDisk::layer_storage`]).
//!
//! # The granule cache
//! The ancestors' answers are remembered per granule of 1 MiB of virtual
//! offset ([`ChainView::GRANULE`]): a granule the ancestors resolve *wholly* to one
//! answer (bytes contiguous in one layer's file, all zero, or all
//! unallocated) is stored as that answer and its file offset at the granule
//! start, so a later read anywhere in it is one hash lookup. A granule whose
//! ancestors' answer changes inside it (e.g. a differencing layer holding
//! some of its sectors) is remembered as *mixed*, and its requests keep
//! walking the ancestors layer by layer, as a bare chain would. At most
//! [`ChainView::MAX_GRANULES`] granules (1 TiB of virtual disk; at most
//! about 50 MiB of memory) are remembered; when the cache is full it is
//! cleared and refilled, so its memory is bounded whatever the disk size.
//! (A chain whose layers' blocks are smaller than a granule and scattered in
//! their files, e.g. 64 KiB VHD blocks, has mostly mixed granules and gains
//! little.)
//!
//! # Why cached answers never go stale
//! Writes go to the top layer only ([`VirtualDisk::map_write`] and friends
//! forward to it), and the top layer's answers are never cached. The
//! ancestors are read-only while the view exists: the format drivers open a
//! differencing disk's parents read-only, and nothing may write them
//! through another handle (doing so would change the contents of every
//! disk above them anyway). So an ancestor's answer, once cached, stays
//! true for the life of the view.
//!
//! # Locks
//! One `RwLock` around the cache map. Lookups take it shared, inserts (and
//! the clear when full) exclusively; it is never held across a layer's
//! `map` or any I/O, and no other lock is taken while it is held. The
//! layers' own locks are taken by their `map` calls, outside it.

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::virtual_disk::{Extent, FileOffset, Geometry, Mapping, VirtualDisk, WriteExtent};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

const GRANULE: u64 = ChainView::GRANULE;

/// A differencing chain seen as one disk: reads of data held by an ancestor
/// cost one lookup in the top layer and one cache lookup, whatever the
/// chain's depth.
///
/// The top layer (the leaf, the only writable one) is asked first and its
/// answers are never cached. What it leaves to its parent is resolved in
/// the ancestors and answered as [`Mapping::Ancestor`] (read by the shared
/// read loop from [`VirtualDisk::layer_storage`]), `Zero` or `Unallocated`.
/// The ancestors' answers are cached per [`ChainView::GRANULE`] of virtual
/// offset, for granules they resolve wholly to one answer; other granules
/// are resolved layer by layer per request. At most
/// [`ChainView::MAX_GRANULES`] entries are kept (the cache is cleared when
/// full). Cached answers never go stale because the ancestors are read-only
/// while the view exists (drivers open parents read-only); writes go to the
/// top layer. The cache's one `RwLock` is never held across a layer's
/// lookup or I/O.
///
/// ```
/// use disk::{ChainView, MemStorage, RawDisk, VirtualDisk};
/// use std::sync::Arc;
/// let raw = RawDisk::create(MemStorage::new("base"), 4096).unwrap();
/// raw.write_at(b"hello", 100).unwrap();
/// let view = ChainView::new(Arc::new(raw));
/// assert_eq!(view.depth(), 1);
/// let mut buf = [0u8; 5];
/// view.read_at(&mut buf, 100).unwrap();
/// assert_eq!(&buf, b"hello");
/// ```
pub struct ChainView {
    /// The chain, leaf (the top, index 0) first.
    layers: Vec<Arc<dyn VirtualDisk>>,
    /// Granule index → the ancestors' answer for it.
    cache: RwLock<HashMap<u64, Granule, BuildHasherDefault<GranuleHasher>>>,
    /// Entries the cache may hold before it is cleared.
    limit: usize,
}

/// What the ancestors (layers 1..) hold somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Bytes in a layer's storage.
    Data,
    /// Explicitly zero.
    Zero,
    /// Not allocated anywhere in the chain.
    Unallocated,
    /// (Granules only) not one answer for the whole granule.
    Mixed,
}

/// A cache entry: the ancestors' answer for a whole granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Granule {
    kind: Kind,
    /// Layer index (Data only).
    depth: u32,
    /// File offset of the granule's first byte (Data only).
    start: u64,
}

/// The ancestors' answer for a run starting at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    len: u64,
    kind: Kind,
    /// Layer index (Data only).
    depth: u32,
    /// File offset of the run's first byte (Data only).
    fo: u64,
}

impl Piece {
    fn mapping(&self) -> Mapping {
        match self.kind {
            Kind::Data => Mapping::Ancestor {
                depth: self.depth,
                offset: FileOffset(self.fo),
            },
            Kind::Zero => Mapping::Zero,
            Kind::Unallocated | Kind::Mixed => Mapping::Unallocated,
        }
    }
}

impl ChainView {
    /// Bytes of virtual offset one cache entry describes (1 MiB).
    pub const GRANULE: u64 = 1 << 20;

    /// The most granules the cache of one view remembers before it is
    /// cleared (1 TiB of virtual disk; at most about 50 MiB of memory).
    pub const MAX_GRANULES: usize = 1 << 20;

    /// The chain whose leaf is `top`: its layers are `top`, its parent, the
    /// parent's parent... (see [`VirtualDisk::parent`]).
    pub fn new(top: Arc<dyn VirtualDisk>) -> ChainView {
        Self::with_cache_limit(top, Self::MAX_GRANULES)
    }

    /// [`ChainView::new`] remembering at most `max_granules` granules
    /// (at least 1).
    pub fn with_cache_limit(top: Arc<dyn VirtualDisk>, max_granules: usize) -> ChainView {
        let mut layers = vec![top];
        while let Some(p) = layers.last().and_then(|l| l.parent()).cloned() {
            layers.push(p);
        }
        ChainView {
            layers,
            cache: RwLock::new(HashMap::default()),
            limit: max_granules.max(1),
        }
    }

    /// The layers, leaf first (index = depth below the top).
    pub fn layers(&self) -> &[Arc<dyn VirtualDisk>] {
        &self.layers
    }

    /// The leaf: the layer that takes writes.
    pub fn top(&self) -> &Arc<dyn VirtualDisk> {
        &self.layers[0]
    }

    /// Number of layers (1 for a disk without a parent).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Granules currently remembered.
    fn cached_granules(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn cached(&self, g: u64) -> Option<Granule> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&g)
            .copied()
    }

    fn remember(&self, g: u64, entry: Granule) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.limit && !cache.contains_key(&g) {
            cache.clear();
        }
        cache.insert(g, entry);
    }

    /// Resolve the run at `offset` (at most `run` > 0 bytes, inside the
    /// disk) in the ancestors, layer by layer.
    fn walk(&self, offset: u64, mut run: u64) -> Result<Piece> {
        for (d, layer) in self.layers.iter().enumerate().skip(1) {
            let ext = layer.map(offset, run)?;
            if ext.offset != offset || ext.len == 0 {
                return Err(misplaced(layer.storage().name(), offset));
            }
            let len = ext.len.min(run);
            let depth = u32::try_from(d).unwrap_or(u32::MAX);
            let piece = |kind, depth, fo| Piece {
                len,
                kind,
                depth,
                fo,
            };
            return Ok(match ext.mapping {
                Mapping::Parent => {
                    run = len;
                    continue;
                }
                Mapping::Data(FileOffset(fo)) => piece(Kind::Data, depth, fo),
                // A layer that is itself a view over the rest of our chain.
                Mapping::Ancestor {
                    depth: below,
                    offset: FileOffset(fo),
                } => piece(Kind::Data, depth.saturating_add(below), fo),
                Mapping::Zero => piece(Kind::Zero, 0, 0),
                Mapping::Unallocated => piece(Kind::Unallocated, 0, 0),
            });
        }
        Ok(Piece {
            len: run,
            kind: Kind::Unallocated,
            depth: 0,
            fo: 0,
        })
    }

    /// The ancestors' answer for granule `g`: one answer for all of it, or
    /// [`Kind::Mixed`].
    fn resolve_granule(&self, g: u64) -> Result<Granule> {
        let gstart = g * GRANULE;
        let gend = gstart.saturating_add(GRANULE).min(self.virtual_size());
        let mixed = Granule {
            kind: Kind::Mixed,
            depth: 0,
            start: 0,
        };
        if gstart >= gend {
            return Ok(mixed);
        }
        let first = self.walk(gstart, gend - gstart)?;
        let mut pos = gstart + first.len;
        while pos < gend {
            let next = self.walk(pos, gend - pos)?;
            let continues = next.kind == first.kind
                && (first.kind != Kind::Data
                    || (next.depth == first.depth && next.fo == first.fo + (pos - gstart)));
            if !continues {
                return Ok(mixed);
            }
            pos += next.len;
        }
        Ok(Granule {
            kind: first.kind,
            depth: first.depth,
            start: first.fo,
        })
    }

    /// The chain's answer at `offset` given the top layer's answer `top`
    /// for a request of `len` bytes.
    fn resolve(&self, offset: u64, len: u64, top: Extent) -> Result<Extent> {
        if top.mapping != Mapping::Parent {
            return Ok(top);
        }
        if top.offset != offset || top.len == 0 {
            return Err(misplaced(self.layers[0].storage().name(), offset));
        }
        let n = top.len.min(len);
        if self.layers.len() == 1 {
            return Ok(Extent {
                offset,
                len: n,
                mapping: Mapping::Unallocated,
            });
        }
        let g = offset / GRANULE;
        let entry = match self.cached(g) {
            Some(e) => e,
            None => {
                let e = self.resolve_granule(g)?;
                self.remember(g, e);
                e
            }
        };
        let piece = if entry.kind == Kind::Mixed {
            self.walk(offset, n)?
        } else {
            let within = offset - g * GRANULE;
            Piece {
                len: n.min(GRANULE - within),
                kind: entry.kind,
                depth: entry.depth,
                fo: entry.start + within,
            }
        };
        Ok(Extent {
            offset,
            len: piece.len,
            mapping: piece.mapping(),
        })
    }
}

fn misplaced(file: &str, offset: u64) -> Error {
    Error::corrupt(
        "block mapping",
        offset,
        "driver returned an empty or misplaced extent",
    )
    .in_file(file, 0)
}

impl fmt::Debug for ChainView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.layers.iter().map(|l| l.storage().name()).collect();
        f.debug_struct("ChainView")
            .field("layers", &names)
            .field("cached_granules", &self.cached_granules())
            .finish()
    }
}

impl VirtualDisk for ChainView {
    fn geometry(&self) -> Geometry {
        self.layers[0].geometry()
    }
    fn storage(&self) -> &dyn Storage {
        self.layers[0].storage()
    }
    fn parent(&self) -> Option<&Arc<dyn VirtualDisk>> {
        self.layers[0].parent()
    }
    fn layer_storage(&self, depth: u32) -> Option<&dyn Storage> {
        let d = usize::try_from(depth).ok()?;
        self.layers.get(d).map(|l| l.storage())
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let top = self.layers[0].map(offset, len)?;
        self.resolve(offset, len, top)
    }
    fn map_allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        let top = self.layers[0].map_allocation(offset, len)?;
        self.resolve(offset, len, top)
    }
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteExtent> {
        self.layers[0].map_write(offset, len)
    }
    fn commit_write(&self, ext: &WriteExtent) -> Result<()> {
        self.layers[0].commit_write(ext)
    }
    fn flush(&self) -> Result<()> {
        self.layers[0].flush()
    }
    fn close(&self) -> Result<()> {
        self.layers[0].close()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.layers[0].discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.layers[0].write_zeroes(offset, len, unmap)
    }
    fn discard_granularity(&self) -> u64 {
        self.layers[0].discard_granularity()
    }
    fn disk_id(&self) -> Option<uuid::Uuid> {
        self.layers[0].disk_id()
    }
    fn is_writable(&self) -> bool {
        self.layers[0].is_writable()
    }
    fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }
}

/// A cheap hash for granule indexes (a folded multiply; no DoS concern:
/// the keys are offsets the caller chose).
#[derive(Default)]
struct GranuleHasher(u64);

impl Hasher for GranuleHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }
    fn write_u64(&mut self, x: u64) {
        let m = u128::from(x) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
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
        fn over(
            name: &str,
            size: u64,
            unit: u64,
            parent: Option<Arc<dyn VirtualDisk>>,
        ) -> TestDisk {
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
}
