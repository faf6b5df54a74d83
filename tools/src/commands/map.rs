//! `vdisk map`: where every byte of the virtual disk comes from, like
//! `qemu-img map`: runs with the same attributes (the layer holding them,
//! whether they read as zeros, whether they are stored data, and where),
//! for the whole chain of a differencing disk.
//!
//! Each step asks the image for the extent at the current offset (at most a
//! block), and for what the image leaves to its parent, asks the parent
//! (depth 1), and so on: the cost is one lookup per block and layer, never
//! per byte.

use crate::cli::{MapArgs, OutputFormat};
use crate::open;
use anyhow::{bail, Result};
use disk::{FileOffset, Mapping, VirtualDisk};

/// A run of the virtual disk with one set of attributes (qemu-img's
/// MapEntry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Virtual offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// The layer (0 = the image, 1 = its parent, ...) that holds the run,
    /// or the last layer looked at when none does.
    pub depth: u32,
    /// Some layer holds the run (as data or as explicit zeros).
    pub present: bool,
    /// The run reads as zeros.
    pub zero: bool,
    /// The run is stored data.
    pub data: bool,
    /// Where the data is in the layer's file.
    pub offset: Option<u64>,
    /// The layer's file.
    pub filename: String,
}

impl Entry {
    /// Whether `next` continues this run (qemu-img's `entry_mergeable`).
    fn continued_by(&self, next: &Entry) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// The entry at virtual offset `pos` (at most `len` bytes), resolved down
/// the chain of `top`.
pub fn entry_at(top: &dyn VirtualDisk, pos: u64, len: u64) -> Result<Entry> {
    let mut layer = top;
    let mut depth = 0u32;
    let mut want = len;
    loop {
        let ext = layer.map_allocation(pos, want)?;
        if ext.offset != pos || ext.len == 0 {
            bail!(
                "{}: the driver mapped {pos:#x} to an empty or misplaced extent",
                layer.storage().name()
            );
        }
        let n = ext.len.min(want);
        let entry = |depth: u32, present, zero, data, offset: Option<u64>, file: &str| Entry {
            start: pos,
            length: n,
            depth,
            present,
            zero,
            data,
            offset,
            filename: file.to_string(),
        };
        let name = layer.storage().name();
        return Ok(match ext.mapping {
            Mapping::Data(FileOffset(fo)) => entry(depth, true, false, true, Some(fo), name),
            Mapping::Zero => entry(depth, true, true, false, None, name),
            Mapping::Unallocated => entry(depth, false, true, false, None, name),
            Mapping::Parent => match layer.parent() {
                Some(p) => {
                    layer = p.as_ref();
                    depth += 1;
                    want = n;
                    continue;
                }
                None => entry(depth, false, true, false, None, name),
            },
            Mapping::Ancestor {
                depth: d,
                offset: FileOffset(fo),
            } => {
                let file = layer.layer_storage(d).map_or(name, |s| s.name());
                entry(depth + d, true, false, true, Some(fo), file)
            }
        });
    }
}

/// Every entry of `top`, adjacent runs merged, handed to `emit` in order.
pub fn walk(top: &dyn VirtualDisk, mut emit: impl FnMut(&Entry) -> Result<()>) -> Result<()> {
    let size = top.virtual_size();
    let mut cur: Option<Entry> = None;
    let mut pos = 0u64;
    while pos < size {
        let e = entry_at(top, pos, size - pos)?;
        pos += e.length;
        match &mut cur {
            Some(c) if c.continued_by(&e) => c.length += e.length,
            _ => {
                if let Some(c) = cur.replace(e) {
                    emit(&c)?;
                }
            }
        }
    }
    if let Some(c) = cur {
        emit(&c)?;
    }
    Ok(())
}

/// qemu-img's `%#-16x`: "0" for zero, else 0x-prefixed hex, left-aligned in 16.
pub fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// One entry as qemu-img map's JSON object (keys in its order, then the file).
fn json_entry(e: &Entry) -> Result<String> {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": false",
        e.start, e.length, e.depth, e.present, e.zero, e.data
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push_str(&format!(
        ", \"filename\": {}}}",
        serde_json::to_string(&e.filename)?
    ));
    Ok(s)
}

pub fn run(args: &MapArgs) -> Result<()> {
    let img = open::open(&args.image, args.format, false)?;
    // The image's own layer: the walk follows its parents itself, to say
    // which layer holds each range (a chain view would answer for all).
    let top = img.driver().disk();
    let d = &*top;
    // Output goes out in pieces of at most this size, so that a huge map
    // streams and a closed pipe stops the walk early.
    const FLUSH_AT: usize = 64 * 1024;
    let mut out = String::new();
    match args.output {
        OutputFormat::Human => {
            out.push_str("Offset          Length          Mapped to       File\n");
            walk(d, |e| {
                if e.data && !e.zero {
                    out.push_str(&format!(
                        "{}{}{}{}\n",
                        hex16(e.start),
                        hex16(e.length),
                        hex16(e.offset.unwrap_or(0)),
                        e.filename
                    ));
                }
                if out.len() >= FLUSH_AT {
                    super::print_out(&std::mem::take(&mut out))?;
                }
                Ok(())
            })?;
        }
        OutputFormat::Json => {
            let mut first = true;
            walk(d, |e| {
                out.push_str(if first { "[" } else { ",\n" });
                first = false;
                out.push_str(&json_entry(e)?);
                if out.len() >= FLUSH_AT {
                    super::print_out(&std::mem::take(&mut out))?;
                }
                Ok(())
            })?;
            out.push_str(if first { "[]\n" } else { "]\n" });
        }
    }
    super::print_out(&out)
}

#[cfg(test)]
// Test images are a few MiB: their offsets and sizes fit any integer type.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use disk::MemStorage;
    use std::sync::Arc;
    use vhdx::{CreateOptions, Vhdx};

    const MIB: u64 = 1 << 20;

    #[test]
    fn merges_runs_and_follows_the_parent() {
        let mut o = CreateOptions::new(8 * MIB);
        o.block_size = MIB as u32;
        let base = Arc::new(Vhdx::create_on(Box::new(MemStorage::new("base.vhdx")), &o).unwrap());
        base.write_at(&vec![1; 2 * MIB as usize], 0).unwrap();
        base.flush().unwrap();
        let loc = vhdx::parent_locator_for(
            std::path::Path::new("child.avhdx"),
            std::path::Path::new("."),
            base.info().header.data_write_guid,
        )
        .unwrap();
        let child = Vhdx::create_differencing_on(
            Box::new(MemStorage::new("child.avhdx")),
            &o,
            loc,
            base.clone(),
        )
        .unwrap();
        child.write_at(&vec![2; MIB as usize], MIB).unwrap();
        let mut v = Vec::new();
        walk(&child, |e| {
            v.push(e.clone());
            Ok(())
        })
        .unwrap();
        let brief: Vec<(u64, u64, u32, bool, bool)> = v
            .iter()
            .map(|e| (e.start, e.length, e.depth, e.data, e.present))
            .collect();
        assert_eq!(
            brief,
            vec![
                (0, MIB, 1, true, true),
                (MIB, MIB, 0, true, true),
                (2 * MIB, 6 * MIB, 1, false, false),
            ],
            "{v:#?}"
        );
        assert_eq!(v[0].filename, "base.vhdx");
        assert_eq!(v[1].filename, "child.avhdx");
        assert!(v[2].zero);
        let j = json_entry(&v[1]).unwrap();
        assert!(j.starts_with("{ \"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": "), "{j}");
        assert_eq!(hex16(0), format!("{:<16}", "0"));
        assert_eq!(hex16(0x200000), format!("{:<16}", "0x200000"));
    }
}
