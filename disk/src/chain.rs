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
    fn copy_up_locks(&self) -> Option<&crate::CopyUpLocks> {
        self.layers[0].copy_up_locks()
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
        // Folds the product's two halves: dropping the high bits is the point.
        #[allow(clippy::cast_possible_truncation)]
        let (lo, hi) = (m as u64, (m >> 64) as u64);
        self.0 = lo ^ hi;
    }
}

#[cfg(test)]
mod tests;
