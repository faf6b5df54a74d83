//! A differencing disk's parent (MS-VHDX 2.6.2.6): the parent locator a new
//! child records, where a locator leads (parent search under a
//! [`disk::ParentPolicy`], the linkage checked), and stale locator paths
//! updated at open.

use crate::parent_locator::{ParentLocator, VHDX_PARENT_LOCATOR_TYPE};
use crate::{Error, Info, OpenOptions, Result, Vhdx};
use disk::parent::{self, ChainSearch};
use disk::VirtualDisk;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

impl Vhdx {
    /// MS-VHDX 2.6.2.6.3: "Upon successful open of a chain, an
    /// implementation has to update any existing stale path entries to point
    /// to its current parent file." Done when the disk is open writable and
    /// its parent was found by searching from `child` (its path): each
    /// `relative_path` or `absolute_win32_path` entry present that does not
    /// lead to the parent file opened is rewritten to one that does, through
    /// the log ([`Vhdx::set_parent_locator`]); the linkage entries and the
    /// DataWriteGuid are kept, so the disk's own children stay linked. A
    /// `volume_path` (a Windows volume GUID path, which cannot be made here)
    /// is left as it is, and so is an `absolute_win32_path` naming a drive,
    /// UNC or volume path (`C:\vms\base.vhdx`, as Windows writes it): it
    /// names a file on another system, which may well be right there, and
    /// no path of this system could replace it. Entries that still lead to
    /// the parent, whatever their spelling, are not touched.
    pub(crate) fn update_stale_parent_paths(&self, child: &Path) -> Result<()> {
        let (Some(parent), Some(loc)) = (
            self.info.parent_file.as_deref(),
            self.info.metadata.parent_locator.as_ref(),
        ) else {
            return Ok(());
        };
        if !self.writable {
            return Ok(());
        }
        let Ok(parent_abs) = std::fs::canonicalize(parent) else {
            return Ok(());
        };
        let dir = parent::dir_of(child);
        let leads_to_parent = |key: &str, v: &str| {
            locator_path(dir, key, v)
                .and_then(|c| std::fs::canonicalize(c).ok())
                .is_some_and(|c| c == parent_abs)
        };
        let fresh = parent_locator_for(child, &parent_abs, Uuid::nil())?;
        let mut updated = loc.clone();
        let mut changed = false;
        for (key, value) in updated.entries.iter_mut() {
            let windows_drive_path = key == "absolute_win32_path"
                && parent::is_windows_absolute(value)
                && parent::absolute_candidate(dir, value).is_none();
            if !matches!(key.as_str(), "relative_path" | "absolute_win32_path")
                || windows_drive_path
                || leads_to_parent(key, value)
            {
                continue;
            }
            if let Some(v) = fresh.get(key) {
                *value = v.to_string();
                changed = true;
            }
        }
        if changed {
            self.set_parent_locator(&updated)?;
        }
        Ok(())
    }
}

/// A `parent_linkage` value (`{83ed0ec3-...}`) as a GUID.
pub(crate) fn parse_linkage(v: &str) -> Option<Uuid> {
    Uuid::parse_str(v.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

/// A GUID as a locator writes it: lowercase, in braces.
pub fn linkage_string(g: Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

/// The locator a new child at `child` records for the parent at
/// `parent_path` whose DataWriteGuid is `linkage`, the way Windows writes
/// one (as in the corpus image made by Hyper-V, in its order):
/// `parent_linkage`, `absolute_win32_path` and `relative_path` (MS-VHDX
/// 2.6.2.6.3 requires the linkage and at least one path).
///
/// `relative_path` is relative to the child's directory, with backslashes
/// (`.\base.vhdx`, `..\dir\base.vhdx`). `absolute_win32_path` is the
/// parent's absolute path in Win32 syntax: Windows writes `C:\dir\base.vhdx`;
/// a Unix path has no drive letter, so this is the rooted path
/// `\dir\base.vhdx` ([`parent::windows_absolute_path`]), which our parent
/// search reads back as `/dir/base.vhdx`. The entry must be there and use
/// backslashes: libvhdi (`vhdimount`) takes the parent's file name from it
/// (or from `volume_path`), as the part after its last backslash, and
/// looks for that file beside the child; it ignores `relative_path`.
/// Windows itself tries `relative_path` first. When a name on the way holds
/// a backslash (legal on Unix, a separator in Win32 syntax) there is no
/// Windows form: `relative_path` is left out and `absolute_win32_path` is
/// the Unix path, as this library wrote before (only it reads that).
///
/// # Errors
/// The parent's path cannot be made absolute.
pub fn parent_locator_for(
    child: &Path,
    parent_path: &Path,
    linkage: Uuid,
) -> Result<ParentLocator> {
    let abs = std::fs::canonicalize(parent_path).map_err(|e| {
        Error::io(
            format!("cannot resolve the parent path {}", parent_path.display()),
            e,
        )
    })?;
    let child_dir = parent::dir_of(child).to_path_buf();
    let child_dir = std::fs::canonicalize(&child_dir).unwrap_or(child_dir);
    let absolute = parent::windows_absolute_path(&abs).unwrap_or_else(|| abs.display().to_string());
    let mut entries = vec![
        ("parent_linkage".to_string(), linkage_string(linkage)),
        ("absolute_win32_path".to_string(), absolute),
    ];
    if let Some(rel) = parent::windows_relative_path(&child_dir, &abs) {
        entries.push(("relative_path".to_string(), rel));
    }
    Ok(ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries,
    })
}

/// The path on this system that the locator entry `key` = `value` names,
/// for a child in `dir`: `relative_path` is relative to it, the other
/// path entries are absolute (None: not a path here).
pub(crate) fn locator_path(dir: &Path, key: &str, value: &str) -> Option<PathBuf> {
    if key == "relative_path" {
        parent::relative_candidate(dir, value)
    } else {
        parent::absolute_candidate(dir, value)
    }
}

/// Where a differencing disk's parent may be, best first (MS-VHDX
/// 2.6.2.6.3): `relative_path`, `volume_path`, `absolute_win32_path`, then
/// the file name those paths end in, beside the child (Windows drive and
/// volume paths cannot exist here: a moved chain is usually one directory).
pub(crate) fn parent_candidates(
    child: &Path,
    loc: &ParentLocator,
) -> Vec<(String, Option<PathBuf>)> {
    let dir = parent::dir_of(child);
    let keys = ["relative_path", "volume_path", "absolute_win32_path"];
    let mut out = Vec::new();
    for key in keys {
        if let Some(v) = loc.get(key) {
            out.push((format!("{key}={v}"), locator_path(dir, key, v)));
        }
    }
    let mut names: Vec<&str> = Vec::new();
    for key in keys {
        if let Some(f) = loc.get(key).and_then(parent::file_name_of) {
            if !names.contains(&f) {
                names.push(f);
                out.push((
                    format!("file name \"{f}\" beside the child"),
                    Some(dir.join(f)),
                ));
            }
        }
    }
    out
}

/// Find, open (read-only, with its own chain) and check a differencing
/// disk's parent.
pub(crate) fn find_parent(
    name: &str,
    child: &Path,
    loc: &ParentLocator,
    info: &Info,
    opts: &OpenOptions,
    chain: &mut ChainSearch,
) -> Result<Arc<dyn VirtualDisk>> {
    let linkages = info.parent_linkages();
    let linkage_text = loc.get("parent_linkage").unwrap_or("(none)");
    let res = chain.resolve(&parent_candidates(child, loc));
    let Some(path) = res.found else {
        return Err(res.not_found_error(
            name,
            "VHDX",
            &format!("parent not found (parent_linkage {linkage_text})"),
            "its parent locator names no path",
        ));
    };
    let depth = chain.depth();
    chain.enter(name, &path)?;
    let popts = OpenOptions {
        writable: false,
        keep_data_write_guid: false,
        data_write_guid: None,
        ..opts.clone()
    };
    let parent = Vhdx::open_path(&path, &popts, chain);
    chain.truncate(depth);
    let parent = parent.map_err(|e| parent::parent_error(e, name, &path))?;
    let dwg = parent.info.header.data_write_guid;
    if !linkages.contains(&dwg) && !opts.ignore_parent_linkage {
        return Err(Error::invalid(format!(
            "parent {} has DataWriteGuid {}, but this differencing VHDX expects \
             parent_linkage {linkage_text}: it is not this disk's parent, or it was modified \
             after the child was made (open ignoring the parent linkage to use it anyway)",
            path.display(),
            linkage_string(dwg),
        ))
        .in_file(name, 0));
    }
    Ok(Arc::new(parent))
}
