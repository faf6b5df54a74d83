//! Finding a differencing disk's parent ("Dynamic Disk Header Format" and
//! "Parent Locator Entries" in the VHD specification, 2006): the candidate
//! paths its locators and parent name give, best first, and the search
//! that opens the first one with the expected unique id; and what a new
//! differencing disk (or a relinked one) records about its parent
//! ([`ParentLink`]).

use crate::dynamic_header::DynamicHeader;
use crate::image::{OpenOptions, Vhd};
use crate::{Error, Result};
use disk::parent::{self, ChainSearch};
use disk::VirtualDisk;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a new differencing disk records about its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's file name (the header's parent Unicode name).
    pub name: String,
    /// The `W2ru` locator: the parent's path relative to the child's
    /// directory, Windows style (`.\\parent.vhd`, `..\\dir\\parent.vhd`).
    pub relative: String,
    /// The `W2ku` locator: the parent's absolute path in Win32 syntax.
    /// Windows writes a drive path (`C:\\dir\\parent.vhd`); a Unix path has
    /// no drive, so this is the rooted path `\\dir\\parent.vhd`
    /// ([`parent::windows_absolute_path`]), which our parent search reads
    /// back as `/dir/parent.vhd` (disks this library made before hold the
    /// Unix path itself, which it still reads).
    pub absolute: String,
    /// The parent's modification time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
}

/// Where a differencing disk's parent may be, best first: the `W2ru`
/// locators (relative to the child's directory), the `W2ku` locators
/// (absolute; a Windows path such as `C:\dir\p.vhd` cannot exist here and
/// is skipped), the parent's Unicode name (its file name only) in the
/// child's directory, then the deprecated `Wi2r` and `Wi2k` locators and
/// `MacX` file URLs. Each with a label for messages; `None` when the
/// locator cannot name a file on this system.
pub(crate) fn parent_candidates(
    child: &Path,
    h: &DynamicHeader,
    locators: &[(String, String)],
) -> Vec<(String, Option<PathBuf>)> {
    let dir = parent::dir_of(child);
    let relative = |p: &str| parent::relative_candidate(dir, p);
    let absolute = |p: &str| parent::absolute_candidate(dir, p);
    let by_code = |code: &str, f: &dyn Fn(&str) -> Option<PathBuf>| {
        locators
            .iter()
            .filter(|(c, _)| c == code)
            .map(|(c, p)| (format!("{c}={p}"), f(p)))
            .collect::<Vec<_>>()
    };
    let mut out = by_code("W2ru", &relative);
    out.extend(by_code("W2ku", &absolute));
    let pname = h.parent_name();
    if let Some(file) = parent::file_name_of(&pname) {
        out.push((format!("parent name \"{pname}\""), Some(dir.join(file))));
    }
    out.extend(by_code("Wi2r", &relative));
    out.extend(by_code("Wi2k", &absolute));
    out.extend(by_code("MacX", &absolute));
    out
}

/// Find, open (read-only, recursively) and check a differencing disk's
/// parent: the first candidate (see [`parent_candidates`]) that exists, is
/// permitted, and has the unique id the header expects. A candidate with
/// another id is not this disk's parent and the search goes on: a relink
/// interrupted by a power cut can leave the old header (old id and name)
/// with locator data already naming the new parent, and the old parent is
/// then still found by its name (the relink is only done when both parents
/// read the same for this child, so either one is right). When no candidate
/// has the id, the error names the first one that was found.
pub(crate) fn find_parent(
    name: &str,
    child: &Path,
    hdr_off: u64,
    h: &DynamicHeader,
    locators: &[(String, String)],
    opts: &OpenOptions,
    chain: &mut ChainSearch,
) -> Result<Arc<dyn VirtualDisk>> {
    let mut all = parent::Resolution::default();
    let mut mismatch: Option<Error> = None;
    let mut seen: Vec<PathBuf> = Vec::new();
    for cand in parent_candidates(child, h, locators) {
        let res = chain.resolve(std::slice::from_ref(&cand));
        all.tried.extend(res.tried);
        all.refused |= res.refused;
        let Some(path) = res.found else {
            continue;
        };
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            continue;
        }
        seen.push(canon);
        let popts = OpenOptions {
            writable: false,
            ..opts.clone()
        };
        // A candidate whose footer says it is another disk is passed over
        // before its own chain is opened: opening each candidate's whole
        // chain to learn its id made a hostile set of files, each naming a
        // wrong candidate before the right one, open 2^depth chains.
        if !opts.ignore_parent_id {
            if let Some(pid) = footer_id(&path, &popts).filter(|&id| id != h.parent_unique_id) {
                mismatch.get_or_insert_with(|| id_mismatch(name, &path, pid, h, hdr_off));
                continue;
            }
        }
        let depth = chain.depth();
        chain.enter(name, &path)?;
        let parent = Vhd::open_path(&path, &popts, chain);
        chain.truncate(depth);
        let parent = parent.map_err(|e| parent::parent_error(e, name, &path))?;
        let pid = parent.info.footer.unique_id;
        if pid == h.parent_unique_id || opts.ignore_parent_id {
            return Ok(Arc::new(parent));
        }
        mismatch.get_or_insert_with(|| id_mismatch(name, &path, pid, h, hdr_off));
    }
    if let Some(e) = mismatch {
        return Err(e);
    }
    Err(all.not_found_error(
        name,
        "VHD",
        &format!(
            "parent \"{}\" (id {}) not found",
            h.parent_name(),
            h.parent_unique_id
        ),
        "no parent locator or parent name names a path",
    ))
}

/// The unique id in the footer of the VHD at `path`, read without opening
/// its parents; `None` when it has no readable footer (the full open then
/// says why).
fn footer_id(path: &Path, opts: &OpenOptions) -> Option<uuid::Uuid> {
    let st = opts.opener.open(path, false, opts.lock).ok()?;
    let len = st.len().ok()?;
    Vhd::find_footer(&*st, len).ok().map(|(f, ..)| f.unique_id)
}

/// The error for a candidate parent at `path` whose unique id `pid` is not
/// the one the header `h` (at `hdr_off`) of the child `name` expects.
fn id_mismatch(name: &str, path: &Path, pid: uuid::Uuid, h: &DynamicHeader, hdr_off: u64) -> Error {
    Error::invalid(format!(
        "parent {} has unique id {pid}, but this differencing VHD expects parent unique id {} \
         (dynamic disk header at offset {:#x}): it is not this disk's parent, or its id was \
         changed (open with ignore_parent_id to use it anyway)",
        path.display(),
        h.parent_unique_id,
        hdr_off + 40
    ))
    .in_file(name, 0)
}

/// What [`Vhd::set_parent`] records about the parent at `parent_abs`
/// (canonical) for the child at `child`: as [`Vhd::create_differencing`]
/// does.
pub(crate) fn parent_link_for(child: &Path, parent_abs: &Path) -> Result<ParentLink> {
    let name = child.display().to_string();
    let dir = parent::dir_of(child);
    let dir_abs = std::fs::canonicalize(dir)
        .map_err(|e| Error::io("cannot resolve the directory of", e).in_file(&name, 0))?;
    let unicode = |p: &Path| {
        p.to_str().map(str::to_string).ok_or_else(|| {
            Error::invalid(format!(
                "the parent path {} is not valid Unicode: a VHD locator cannot record it",
                p.display()
            ))
            .in_file(&name, 0)
        })
    };
    let file_name = parent_abs.file_name().map(Path::new).ok_or_else(|| {
        Error::invalid("the parent path has no file name")
            .in_file(&parent_abs.display().to_string(), 0)
    })?;
    let windows = |p: Option<String>| {
        p.ok_or_else(|| {
            Error::invalid(
                "the parent path cannot be written as a Windows path (a name in it is not \
                 valid Unicode, or holds a backslash)",
            )
            .in_file(&parent_abs.display().to_string(), 0)
        })
    };
    Ok(ParentLink {
        name: unicode(file_name)?,
        relative: windows(relative_windows_path(&dir_abs, parent_abs))?,
        absolute: windows(parent::windows_absolute_path(parent_abs))?,
        timestamp: std::fs::metadata(parent_abs)
            .and_then(|m| m.modified())
            .map_or(0, vhd_time),
    })
}

/// `file` relative to the directory `dir` (both absolute), Windows style:
/// `.\\name` beside it, else `..\\` steps up then down. None when a
/// component is not valid Unicode or holds a backslash.
fn relative_windows_path(dir: &Path, file: &Path) -> Option<String> {
    let d: Vec<_> = dir.components().collect();
    let f: Vec<_> = file.components().collect();
    let common = d.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == d.len() {
        parts.push(".".into());
    }
    for _ in common..d.len() {
        parts.push("..".into());
    }
    for c in &f[common..] {
        // A backslash inside a name would read back as a separator.
        let name = c.as_os_str().to_str().filter(|n| !n.contains('\\'))?;
        parts.push(name.to_string());
    }
    Some(parts.join("\\"))
}

/// A time as a VHD timestamp (seconds since 2000-01-01 UTC, saturating).
fn vhd_time(t: std::time::SystemTime) -> u32 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(crate::footer::VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_and_parent_candidates() {
        let rel = |d: &str, f: &str| relative_windows_path(Path::new(d), Path::new(f)).unwrap();
        assert_eq!(rel("/a/b", "/a/b/p.vhd"), ".\\p.vhd");
        assert_eq!(rel("/a/b", "/a/b/s/p.vhd"), ".\\s\\p.vhd");
        assert_eq!(rel("/a/b", "/a/c/p.vhd"), "..\\c\\p.vhd");
        assert_eq!(rel("/", "/p.vhd"), ".\\p.vhd");
        assert_eq!(
            relative_windows_path(Path::new("/a"), Path::new("/a/p\\q.vhd")),
            None
        );
        let mut h = DynamicHeader::new(1536, 1, 1 << 21);
        let name: Vec<u8> = "C:\\x\\p.vhd"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        h.parent_unicode_name[..name.len()].copy_from_slice(&name);
        let locs = vec![
            ("Wi2k".to_string(), "/abs/old.vhd".to_string()),
            ("W2ku".to_string(), "C:\\x\\p.vhd".to_string()),
            ("W2ku".to_string(), "\\abs\\new.vhd".to_string()),
            ("W2ru".to_string(), "..\\up\\p.vhd".to_string()),
            ("W2ru".to_string(), "\\\\server\\p.vhd".to_string()),
        ];
        let c = parent_candidates(Path::new("/d/child.vhd"), &h, &locs);
        let got: Vec<Option<PathBuf>> = c.into_iter().map(|(_, p)| p).collect();
        assert_eq!(
            got,
            vec![
                Some(PathBuf::from("/up/p.vhd")),
                None,
                None,
                Some(PathBuf::from("/abs/new.vhd")),
                Some(PathBuf::from("/d/p.vhd")),
                Some(PathBuf::from("/abs/old.vhd")),
            ]
        );
    }
}
