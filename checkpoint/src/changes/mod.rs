//! Changed-block tracking: the ranges of the virtual disk whose content may
//! differ between two disks of one chain (or of one checkpoint tree), found
//! from the layers' block tables and sector bitmaps alone: no payload byte
//! is read.
//!
//! # Why the layers tell
//! Two disks FROM and TO whose chains share a file L (the lowest common
//! ancestor: the first file of TO's chain that FROM's chain holds too) read
//! what L's chain reads wherever no layer strictly above L, on FROM's side
//! or on TO's, holds the range: a differencing layer that does not hold a
//! range ([`Mapping::Parent`]) reads it from below. So every byte where
//! FROM and TO differ lies where one of those layers holds something: data
//! (a whole block, or the sectors a VHDX sector bitmap or a VHD block bitmap
//! marks present), or an explicit zero (a VHDX ZERO or UNMAPPED block). The
//! union of those ranges is a superset of the truly changed ranges: a layer
//! may hold bytes equal to what the other side reads (the same data written
//! again, zeros over zeros), and a write of part of a sector marks the
//! whole sector. When FROM is an ancestor of TO (or TO of FROM), only one
//! side has layers above L.
//!
//! # Cost
//! One [`VirtualDisk::map`] per extent of each layer above L (at most a
//! block, or a run of sectors of one state), in one sweep over the disk
//! with a cursor per layer: memory does not grow with the disk or the
//! number of changes ([`Changes`] is a stream). Each change is then split
//! by what TO's chain maps there (zeros or data), again from metadata.
//!
//! # Using the changes
//! [`Changes::verify`] reads FROM and TO whole and checks that every
//! differing sector lies inside a reported change. [`Changes::write_delta`]
//! writes TO's content of the changes into a new differencing disk over
//! FROM's file: read over FROM, it reads as TO (an incremental backup).

mod delta;
#[cfg(test)]
mod tests;
mod verify;

pub use delta::DeltaStats;
pub use verify::{VerifyReport, MAX_MISSED};

use crate::{Error, Result};
use disk::{Mapping, VirtualDisk};
use image::{Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A range of the virtual disk whose content may differ between FROM and
/// TO (serialized with kebab-case keys, `start`, `length`, `zero`, as
/// `vdisk map`'s; `vdisk changes` adds `data`, the opposite of `zero`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Change {
    /// Virtual offset.
    pub start: u64,
    /// Bytes (never 0).
    pub length: u64,
    /// TO reads the range as zeros, by its mapping (a ZERO block, nothing
    /// allocated down its chain): no data need be read to reproduce it.
    pub zero: bool,
}

impl Change {
    /// The offset just past the range.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// One layer above the common ancestor, with the extent last mapped.
struct Cursor {
    layer: Arc<dyn VirtualDisk>,
    /// Where the last extent mapped ends (the layer is asked again at or
    /// past it).
    end: u64,
    /// Whether that extent holds something (anything but
    /// [`Mapping::Parent`]).
    held: bool,
}

/// The changes between two disks, as a stream in increasing offset order,
/// adjacent ranges of the same kind merged. Made by [`Changes::open`] (or
/// [`crate::Bundle::changes`]); iterate it ([`Iterator`] or
/// [`Changes::next_change`]), [`Changes::rewind`] it to walk again.
///
/// FROM and TO stay open read-only (their image locks shared) while this
/// value lives.
pub struct Changes {
    opts: OpenOptions,
    from_path: PathBuf,
    from: Image,
    to: Image,
    /// The common ancestor's file (as its child names it).
    common: PathBuf,
    /// Files of the layers above the common ancestor: FROM's side, TO's.
    from_side: Vec<PathBuf>,
    to_side: Vec<PathBuf>,
    cursors: Vec<Cursor>,
    size: u64,
    /// Where the sweep stands.
    pos: u64,
    /// A changed run being split by TO's mapping: `[start, end)`.
    run: Option<(u64, u64)>,
    /// The change being grown (adjacent pieces of the same kind merged).
    pending: Option<Change>,
    /// A directory a delta may not be written into (a bundle's).
    pub(crate) guarded: Option<PathBuf>,
    failed: bool,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("from", &self.from_path)
            .field("common", &self.common)
            .field("from_side", &self.from_side)
            .field("to_side", &self.to_side)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

/// The layers of an open image, the image's own first, each followed by
/// its parent.
fn layers_of(img: &Image) -> Vec<Arc<dyn VirtualDisk>> {
    let mut out = vec![img.driver().disk()];
    while let Some(p) = out.last().and_then(|l| l.parent()).cloned() {
        out.push(p);
    }
    out
}

/// A layer's file, as a key that names the same file however it was
/// reached (canonical when it exists).
fn file_key(layer: &dyn VirtualDisk) -> PathBuf {
    let name = Path::new(layer.storage().name());
    std::fs::canonicalize(name).unwrap_or_else(|_| name.to_path_buf())
}

fn names(layers: &[Arc<dyn VirtualDisk>]) -> Vec<PathBuf> {
    layers
        .iter()
        .map(|l| PathBuf::from(l.storage().name()))
        .collect()
}

fn show(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

impl Changes {
    /// The changes between the images `from` and `to` (each opened
    /// read-only with its chain, as `opts` says; `opts.writable` is
    /// ignored): their chains must share a file.
    ///
    /// # Errors
    /// An image cannot be opened; the chains share no file ("not of one
    /// chain", both chains listed); different virtual sizes.
    pub fn open(from: &Path, to: &Path, opts: &OpenOptions) -> Result<Changes> {
        let opts = OpenOptions {
            writable: false,
            ..opts.clone()
        };
        let from_img = image::open(from, &opts)?;
        let to_img = image::open(to, &opts)?;
        let fl = layers_of(&from_img);
        let tl = layers_of(&to_img);
        let fkeys: Vec<PathBuf> = fl.iter().map(|l| file_key(&**l)).collect();
        let common = tl.iter().enumerate().find_map(|(i, l)| {
            let k = file_key(&**l);
            fkeys.iter().position(|f| *f == k).map(|j| (j, i))
        });
        let Some((j, i)) = common else {
            return Err(Error::invalid(format!(
                "{} and {} are not of one chain: their chains share no file ({}; {})",
                from.display(),
                to.display(),
                show(&names(&fl)),
                show(&names(&tl))
            ))
            .in_file(&to.display().to_string(), 0));
        };
        let (fs, ts) = (fl[0].virtual_size(), tl[0].virtual_size());
        if fs != ts {
            return Err(Error::invalid(format!(
                "{} has a virtual size of {fs} bytes, {} {ts}",
                from.display(),
                to.display()
            ))
            .in_file(&to.display().to_string(), 0));
        }
        let cursors = fl[..j]
            .iter()
            .chain(&tl[..i])
            .map(|l| Cursor {
                layer: l.clone(),
                end: 0,
                held: false,
            })
            .collect();
        Ok(Changes {
            from_path: from.to_path_buf(),
            common: PathBuf::from(tl[i].storage().name()),
            from_side: names(&fl[..j]),
            to_side: names(&tl[..i]),
            from: from_img,
            to: to_img,
            opts,
            cursors,
            size: ts,
            pos: 0,
            run: None,
            pending: None,
            guarded: None,
            failed: false,
        })
    }

    /// FROM, read through its chain.
    pub fn from_disk(&self) -> &Arc<dyn VirtualDisk> {
        self.from.disk()
    }

    /// TO, read through its chain.
    pub fn to_disk(&self) -> &Arc<dyn VirtualDisk> {
        self.to.disk()
    }

    /// FROM's format (TO's too: a chain is of one format), the format of
    /// a delta ([`Changes::write_delta`]).
    pub fn format(&self) -> image::Format {
        self.from.format()
    }

    /// The virtual size of both disks.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The file of the lowest common ancestor (FROM's or TO's own file
    /// when one is an ancestor of the other, or both are the same file).
    pub fn common_ancestor(&self) -> &Path {
        &self.common
    }

    /// The files of FROM's chain above the common ancestor, FROM's first
    /// (empty when FROM is the common ancestor).
    pub fn from_side(&self) -> &[PathBuf] {
        &self.from_side
    }

    /// The files of TO's chain above the common ancestor, TO's first.
    pub fn to_side(&self) -> &[PathBuf] {
        &self.to_side
    }

    /// Start the walk again from offset 0.
    pub fn rewind(&mut self) {
        self.pos = 0;
        self.run = None;
        self.pending = None;
        self.failed = false;
        for c in &mut self.cursors {
            c.end = 0;
            c.held = false;
        }
    }

    /// Whether some layer above the common ancestor holds `pos`, and up to
    /// where that answer stands.
    fn step(&mut self) -> Result<(bool, u64)> {
        let (pos, size) = (self.pos, self.size);
        let mut held = false;
        let mut end = size;
        for c in &mut self.cursors {
            if c.end <= pos {
                let e = c.layer.map(pos, size - pos)?;
                if e.offset != pos || e.len == 0 {
                    return Err(misplaced(&*c.layer, pos));
                }
                c.end = pos + e.len.min(size - pos);
                c.held = e.mapping != Mapping::Parent;
            }
            held |= c.held;
            end = end.min(c.end);
        }
        Ok((held, end))
    }

    /// The next maximal run held by some layer above the common ancestor.
    fn next_run(&mut self) -> Result<Option<(u64, u64)>> {
        let mut start = None;
        while self.pos < self.size {
            let (held, end) = self.step()?;
            if held {
                start.get_or_insert(self.pos);
            } else if let Some(s) = start {
                return Ok(Some((s, self.pos)));
            }
            self.pos = end;
        }
        Ok(start.map(|s| (s, self.pos)))
    }

    /// The next change, or `None` past the last one.
    ///
    /// # Errors
    /// Corrupt metadata or I/O errors while mapping a layer.
    pub fn next_change(&mut self) -> Result<Option<Change>> {
        loop {
            let (mut at, end) = match self.run {
                Some(r) => r,
                None => match self.next_run()? {
                    Some(r) => r,
                    None => return Ok(self.pending.take()),
                },
            };
            while at < end {
                let to = self.to.disk();
                let e = to.map(at, end - at)?;
                if e.offset != at || e.len == 0 {
                    return Err(misplaced(&**to, at));
                }
                let n = e.len.min(end - at);
                let zero = matches!(e.mapping, Mapping::Zero | Mapping::Unallocated);
                let piece = Change {
                    start: at,
                    length: n,
                    zero,
                };
                at += n;
                self.run = (at < end).then_some((at, end));
                match &mut self.pending {
                    Some(p) if p.zero == zero && p.end() == piece.start => p.length += n,
                    _ => {
                        if let Some(done) = self.pending.replace(piece) {
                            return Ok(Some(done));
                        }
                    }
                }
            }
            self.run = None;
        }
    }
}

impl Iterator for Changes {
    type Item = Result<Change>;

    /// [`Changes::next_change`]; after an error, `None`.
    fn next(&mut self) -> Option<Result<Change>> {
        if self.failed {
            return None;
        }
        match self.next_change() {
            Ok(c) => c.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn misplaced(layer: &dyn VirtualDisk, pos: u64) -> Error {
    Error::corrupt(
        "block mapping",
        pos,
        "driver returned an empty or misplaced extent",
    )
    .in_file(layer.storage().name(), 0)
}

impl crate::Bundle {
    /// The changes from checkpoint `from` to checkpoint `to`, or to the
    /// active disk when `to` is `None` (see [`Changes`]): the layers above
    /// their lowest common ancestor in the tree (a revert makes the active
    /// disk a new child of the checkpoint, so FROM and TO may be on
    /// different branches). A delta of these changes
    /// ([`Changes::write_delta`]) may not be written into the bundle.
    ///
    /// # Errors
    /// No such checkpoint (the message lists the names); a disk cannot be
    /// opened (the active disk is written by another process, say).
    pub fn changes(&self, from: &str, to: Option<&str>) -> Result<Changes> {
        let f = self.disk_path(self.checkpoint(from)?);
        let t = match to {
            Some(n) => self.disk_path(self.checkpoint(n)?),
            None => self.active_path(),
        };
        let mut c = Changes::open(&f, &t, &self.opts)?;
        c.guarded = Some(self.dir.clone());
        Ok(c)
    }
}
