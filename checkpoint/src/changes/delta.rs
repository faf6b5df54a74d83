//! [`Changes::write_delta`]: the changes as a differencing disk over FROM.

use super::Changes;
use crate::{Error, Result};
use disk::{LockMode, VirtualDisk};
use image::{CreateOptions, Format, Kind};
use std::path::{Path, PathBuf};

/// Bytes copied per I/O.
const CHUNK: u64 = 1 << 20;

/// What [`Changes::write_delta`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Changes written.
    pub changes: u64,
    /// Bytes of TO's data copied into the delta.
    pub bytes_copied: u64,
    /// Bytes made to read as zeros in the delta (changes TO maps as zeros).
    pub bytes_zeroed: u64,
}

/// `path` with `.tmp` appended to its name.
fn tmp_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// The directory holding `path` ("." for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn canonical(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

impl Changes {
    /// Write the changes as a differencing disk at `delta` over FROM's file
    /// (FROM's format: VHDX with 2 MiB blocks, or VHD): for each change,
    /// TO's bytes (or zeros, where TO maps zeros), so that `delta`, read
    /// over FROM, reads as TO. FROM and TO are only read. The disk is made
    /// as `delta` + `.tmp`, closed, synced and renamed into place, so a
    /// file at `delta` is always complete; an existing `delta` is replaced
    /// only with `overwrite` (and not while another open holds it).
    /// Walks the changes from the start; `progress` gets the offset reached
    /// and the bytes written.
    ///
    /// # Errors
    /// `delta` is a file of either chain, lies in a bundle's directory or
    /// below it (for the changes of a bundle), exists (without `overwrite`) or is in
    /// use; FROM is raw (no differencing disk over it); read or write
    /// errors.
    pub fn write_delta(
        &mut self,
        delta: &Path,
        overwrite: bool,
        progress: disk::Progress<'_>,
    ) -> Result<DeltaStats> {
        let name = delta.display().to_string();
        self.check_delta(delta)?;
        let kind = match self.from.format() {
            Format::Vhdx => {
                let mut o = vhdx::CreateOptions::new(0);
                o.block_size = vhdx::DEFAULT_DIFFERENCING_BLOCK_SIZE;
                Kind::Vhdx(o)
            }
            Format::Vhd => Kind::Vhd(vhd::CreateOptions::new(0)),
            Format::Raw => {
                return Err(Error::invalid(format!(
                    "{} is a raw image: a delta is a differencing disk over it, which raw \
                     images cannot have",
                    self.from_path.display()
                ))
                .in_file(&name, 0))
            }
        };
        let held = if delta.exists() {
            if !overwrite {
                return Err(Error::invalid("the file exists").in_file(&name, 0));
            }
            // Claimed (refused if in use) until replaced.
            Some(self.opts.opener.open(delta, true, LockMode::Auto)?)
        } else {
            None
        };
        let tmp = tmp_of(delta);
        let opts = CreateOptions {
            parent: Some(self.from_path.clone()),
            parent_policy: self.opts.parent_policy.clone(),
            overwrite: true,
            opener: self.opts.opener.clone(),
            ..CreateOptions::new(kind)
        };
        let result = self.fill_delta(&tmp, &opts, progress);
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, delta).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("cannot rename into place", e).in_file(&tmp.display().to_string(), 0)
        })?;
        drop(held);
        std::fs::File::open(dir_of(delta))
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                Error::io("cannot sync the directory", e)
                    .in_file(&dir_of(delta).display().to_string(), 0)
            })?;
        Ok(stats)
    }

    /// Whether [`Changes::write_delta`] may write a delta at `delta`: not
    /// over a file of either chain, nor into the bundle's directory or
    /// below it (for the changes of a bundle). Nothing is written.
    ///
    /// # Errors
    /// One of those, naming `delta`.
    pub fn check_delta(&self, delta: &Path) -> Result<()> {
        self.check_delta_path(delta)
            .map_err(|e| e.in_file(&delta.display().to_string(), 0))
    }

    fn check_delta_path(&self, delta: &Path) -> Result<()> {
        // Under the bundle, even in a subdirectory: the bundle deletes files
        // of its own there (VM state files of no checkpoint).
        let dir = canonical(dir_of(delta));
        if let (Some(g), Some(d)) = (self.guarded.as_deref().and_then(canonical), &dir) {
            if d.starts_with(&g) {
                return Err(Error::invalid(format!(
                    "the delta may not be written into the bundle {} (write it outside)",
                    g.display()
                )));
            }
        }
        let Some(target) = canonical(delta) else {
            return Ok(());
        };
        let layers = super::layers_of(&self.from)
            .into_iter()
            .chain(super::layers_of(&self.to));
        for l in layers {
            if canonical(Path::new(l.storage().name())).as_ref() == Some(&target) {
                return Err(Error::invalid(
                    "the delta would replace a disk of the chains compared",
                ));
            }
        }
        Ok(())
    }

    /// Create the delta at `tmp` and copy the changes into it; closed and
    /// synced on success.
    fn fill_delta(
        &mut self,
        tmp: &Path,
        opts: &CreateOptions,
        progress: disk::Progress<'_>,
    ) -> Result<DeltaStats> {
        let img = image::create(tmp, opts)?;
        let out = img.disk().clone();
        let to = self.to_disk().clone();
        let size = self.size;
        let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 20)];
        let mut stats = DeltaStats::default();
        self.rewind();
        while let Some(c) = self.next_change()? {
            stats.changes += 1;
            if c.zero {
                out.write_zeroes(c.start, c.length, false)?;
                stats.bytes_zeroed += c.length;
            } else {
                let mut at = c.start;
                while at < c.end() {
                    let n = (c.end() - at).min(CHUNK);
                    let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
                    to.read_at(b, at)?;
                    out.write_at(b, at)?;
                    at += n;
                    stats.bytes_copied += n;
                    progress(disk::Step {
                        done: at,
                        total: size,
                        copied: stats.bytes_copied + stats.bytes_zeroed,
                    });
                }
            }
        }
        out.flush()?;
        drop(out);
        img.close()?;
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("cannot sync", e).in_file(&tmp.display().to_string(), 0))?;
        progress(disk::Step {
            done: size,
            total: size,
            copied: stats.bytes_copied + stats.bytes_zeroed,
        });
        Ok(stats)
    }
}
